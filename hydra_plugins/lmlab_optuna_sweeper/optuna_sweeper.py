"""The Sweeper class Hydra instantiates; the Optuna work lives in ``_impl`` (imported on use)."""

from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: str,
        storage: Optional[str],
        study_name: Optional[str],
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: Optional[Dict[str, str]],
        heartbeat_interval: int,
        grace_period: Optional[int],
    ) -> None:
        from ._impl import OptunaSweeperImpl

        self._impl = OptunaSweeperImpl(
            sampler=sampler, direction=direction, storage=storage, study_name=study_name, n_trials=n_trials,
            n_jobs=n_jobs, max_failure_rate=max_failure_rate, params=params,
            heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self._impl.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self._impl.sweep(arguments)
