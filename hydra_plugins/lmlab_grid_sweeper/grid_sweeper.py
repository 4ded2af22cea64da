"""Hydra's basic sweeper, stopping a grid at its first failed job with the job's error and no traceback.

Hydra's ``BasicSweeper`` launches the whole grid as one batch (``max_batch_size: null``) and looks
at the jobs' results only when all have run: one bad value and every other job still trains before
the sweep ends in a traceback. ``GridSweeper`` launches as many jobs at a time as the launcher runs
at once (one for the in-process launcher, ``n_jobs`` for joblib, ``array_parallelism`` for SLURM),
and when a job of a batch failed with an lmlab error (already printed by the job) it launches no
more and ends the sweep with a one-line summary (``lmlab.sweep.SweepStopped``, exit status 2).
Any other error (a bug) ends it as Hydra does, with its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

HYDRA_BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
GRID = f"{__name__}.GridSweeper"


def jobs_at_once(launcher: DictConfig) -> Optional[int]:
    """How many jobs ``launcher`` runs at the same time (None: unknown, launch them all together)."""
    target = str(launcher.get("_target_", ""))
    if target.endswith(".BasicLauncher"):
        return 1
    if target.endswith(".JoblibLauncher"):
        import joblib

        # -1 is one per core, -2 all but one, ...: joblib's own reading of n_jobs.
        return max(1, joblib.effective_n_jobs(launcher.get("n_jobs", -1)))
    if launcher.get("array_parallelism") is not None:  # submitit (SLURM, local)
        return max(1, int(launcher.array_parallelism))
    return None


class UseGridSweeper(Callback):
    """``hydra.callbacks`` entry: Hydra's basic sweeper becomes ``GridSweeper``.

    A callback, because the config cannot choose it: only the defaults list picks the sweeper (where
    ``hparams_search=`` presets put Optuna's), and ``hydra.sweeper._target_`` in config.yaml would
    replace Optuna's too. on_multirun_start runs before Hydra instantiates the sweeper.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if sweeper.get("_target_") != HYDRA_BASIC:
            return
        with open_dict(sweeper):
            sweeper._target_ = GRID
            if sweeper.get("max_batch_size") is None:
                sweeper.max_batch_size = jobs_at_once(config.hydra.launcher)


class GridSweeper(BasicSweeper):
    """Hydra's ``BasicSweeper`` (same config: ``max_batch_size``, ``params``) that stops at a failed batch."""

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        total = sum(len(batch) for batch in self.overrides)

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        for batch in self.overrides:  # every job composes before the first one starts
            self.validate_batch_is_legal(batch)

        returns: List[List[JobReturn]] = []
        job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = list(self.launcher.launch(batch, initial_job_idx=job_idx))
            self._stop_at_failure(results, job_idx, job_idx + len(batch), total, swept)
            job_idx += len(batch)
            returns.append(results)
        return returns

    def _stop_at_failure(self, results: List[JobReturn], first: int, ran: int, total: int, swept: set[str]) -> None:
        # Here, not at the top: Hydra imports this module at every start, sweep or not.
        from lmlab.sweep import SweepStopped, reportable_failure, where_the_error_is

        failed = [(first + i, r) for i, r in enumerate(results) if r.status != JobStatus.COMPLETED]
        if not failed:
            return
        num, ret = failed[0]
        error = reportable_failure(ret)
        if error is None:
            _ = ret.return_value  # Hydra's own report, with the traceback
        assert self.config is not None
        values = " ".join(o for o in ret.overrides or [] if o.split("=", 1)[0] in swept)
        more = f", with {len(failed) - 1} more of its batch" if len(failed) > 1 else ""
        raise SweepStopped(f"job {num} ({values}) failed{more}, so the sweep stopped after launching {ran} of its "
                           f"{total} jobs ({where_the_error_is(self.config.hydra.launcher, error)}). Fix the "
                           "cause, then run the sweep again.")
