"""The ``hydra/sweeper: optuna`` config and its samplers, registered in Hydra's ConfigStore."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    multivariate: bool = False
    # With n_jobs > 1 the trials of a batch are asked before any returns; the "constant liar"
    # keeps them from all landing on the same point.
    constant_liar: bool = False


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class GridSamplerConf:
    # The sweeper passes the search space (choice/range values only).
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: Optional[int] = None


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.lmlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # The sweeper builds the sampler itself (its seed moves on when a study is resumed).
    _recursive_: bool = False
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING
    # minimize or maximize: must agree with the objective a job returns (objective.metric).
    direction: str = "minimize"
    # An SQLAlchemy URL (sqlite:///path/optuna.db). null keeps the study in memory: no resuming.
    storage: Optional[str] = None
    study_name: Optional[str] = None
    # Trials the study should have finished; an interrupted sweep run again runs only the rest.
    n_trials: int = 20
    # Trials asked and launched together (the launcher may run them in parallel).
    n_jobs: int = 1
    # Share of failed jobs in a batch that is tolerated before the sweep stops.
    max_failure_rate: float = 0.0
    # key: Hydra sweep syntax, e.g. "tag(log, interval(1e-5, 1e-3))", "choice(16, 32)", "range(1, 5)".
    params: Optional[Dict[str, str]] = None
    # The sweep process marks its running trials alive every heartbeat_interval seconds; a RUNNING
    # trial silent for grace_period seconds (null: 3 intervals) was killed and is tried again.
    heartbeat_interval: int = 10
    grace_period: Optional[int] = None


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="lmlab")
store.store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf, provider="lmlab")
store.store(group="hydra/sweeper/sampler", name="random", node=RandomSamplerConf, provider="lmlab")
store.store(group="hydra/sweeper/sampler", name="grid", node=GridSamplerConf, provider="lmlab")
