"""The MLflow run of one job, written by global rank 0 only.

Under DDP/FSDP every process runs lmlab's code; only rank 0 opens the MLflow run and writes to it,
so a job is one MLflow run however many processes it has. The other ranks hold a RunLog whose
calls do nothing and whose Lightning logger is a DummyLogger: they never open the store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from lmlab import tracking
from lmlab.background_log import BackgroundWriter

log = logging.getLogger(__name__)


class RunMetrics(MLFlowLogger):
    """Lightning's MLflow logger for the metrics of a run that lmlab opened and ends itself."""

    @property
    def experiment(self) -> Any:
        # Lightning's first call runs mlflow.set_tracking_uri, which also writes MLFLOW_TRACKING_URI
        # into os.environ, where logger.tracking_uri takes its default from (conf/logger/mlflow.yaml):
        # the next run of this process (a sweep's next job, a notebook's next call) would log to
        # this run's store. The environment stays as the user set it.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            # Lightning's private attributes: read with defaults, so a Lightning without them keeps
            # its own behaviour instead of failing every run.
            if not getattr(self, "_initialized", True) and getattr(self, "_run_id", None) is not None:
                # Lightning's own first call reads the run for its experiment id, and fails on the
                # "no run" that lmlab.pending's client answers while the tracking server is away:
                # the step that logs first would fail the training. The run exists (lmlab opened
                # it); its metrics are queued for the server like everything else.
                import mlflow

                mlflow.set_tracking_uri(self._tracking_uri)
                run = self._mlflow_client.get_run(self._run_id)
                self._experiment_id = run.info.experiment_id if run is not None else None
                self._initialized = True
            return super().experiment
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before

    # A resumed run's {key: last step} already in MLflow (see RunLog.logged_through).
    logged_through: dict[str, int] = {}

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if not _already_logged(self.logged_through, k, step)}
        if fresh:
            super().log_metrics(fresh, step)

    def finalize(self, status: str = "success") -> None:
        # Lightning calls this as each trainer call returns; MLFlowLogger's own would end the run
        # FINISHED as soon as fit returns, with the final validation, export and test still to come
        # (and a kill during them would leave it so). RunLog.terminate ends it once, with the
        # status of the whole run.
        return None


def _already_logged(logged_through: Mapping[str, int], key: str, step: int | None) -> bool:
    return step is not None and step <= logged_through.get(key, -1)


def last_logged_steps(client: Any, run: Any) -> dict[str, int]:
    """{metric key: the last step ``run`` holds}, for a run about to be resumed."""
    run_id = run.info.run_id
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
            for key in run.data.metrics}


@dataclass
class RunLog:
    client: Any | None
    run_id: str
    # A resumed run's metrics already in MLflow, by key: their last step. A process killed between its
    # last checkpoint and its death logged steps that the resume trains again; logged a second time
    # they were two points per step in MLflow's history and charts (equal values when training is
    # deterministic). Those steps are not logged again.
    logged_through: dict[str, int] = field(default_factory=dict)

    @classmethod
    def open(cls, cfg: DictConfig, tags: Mapping[str, str], rank_zero: bool) -> RunLog:
        if not rank_zero:
            return cls(None, "")
        client, run_id, _ = tracking.start_run(cfg, tags)
        return cls(client, run_id)

    def artifact(self, path: Any, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)

    def artifacts(self, directory: Any, artifact_path: str) -> None:
        if self.client is not None:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path=artifact_path)

    def dict(self, value: dict[str, Any], name: str) -> None:
        if self.client is not None:
            self.client.log_dict(self.run_id, value, name)

    def params(self, values: Mapping[str, Any]) -> None:
        """Log ``values`` as params. A resumed run keeps the values it holds: MLflow refuses to change
        a param, and a value that differs now (``world_size`` of ``trainer.devices=-1`` on another
        machine) would fail the resume."""
        if self.client is None:
            return
        run = self.client.get_run(self.run_id)  # None while the tracking server is away (lmlab.pending)
        logged = dict(run.data.params) if run is not None else {}
        changed = [f"{k}={logged[k]} (now {v})" for k, v in values.items() if k in logged and logged[k] != str(v)]
        if changed:
            log.warning("MLflow keeps the params this run started with: %s", "; ".join(changed))
        for key, value in values.items():
            if key not in logged:
                self.client.log_param(self.run_id, key, value)

    def metric(self, key: str, value: float, step: int | None = None) -> None:
        """``step``: where the value belongs in the run's history (MLflow's default is 0, so a run
        resumed to train longer would put a second, different point at step 0)."""
        if self.client is not None and not _already_logged(self.logged_through, key, step):
            self.client.log_metric(self.run_id, key, value, step=step)

    def set_up_writes(self, uri: str, run_dir: Path) -> None:
        """Queue writes while a remote tracking server is unreachable (lmlab.pending), and send
        metrics from a worker thread (lmlab.background_log), outside the training loop."""
        if self.client is None:
            return
        if uri.startswith(("http://", "https://")):
            from lmlab.pending import ResilientClient

            self.client = ResilientClient(self.client, uri, run_dir)
        self.client = BackgroundWriter(self.client)

    def terminate(self, status: str) -> None:
        if self.client is None:
            return
        writer = self.client if isinstance(self.client, BackgroundWriter) else None
        error = writer.close() if writer is not None else None  # the metrics still queued go first
        finished = status == "FINISHED"
        if error is not None:
            log.error("MLflow did not take the run's metrics: %s", error)
            status = "FAILED"
        self.client.set_terminated(self.run_id, status)
        from lmlab.pending import ResilientClient

        inner = writer.client if writer is not None else self.client
        if isinstance(inner, ResilientClient):
            inner.close()  # a last try at sending what an outage held back
        if error is not None and finished:
            raise error  # a blocking write would have failed the run (a run failing anyway keeps its own error)

    def metrics_logger(self, cfg: DictConfig) -> Any:
        if self.client is None:
            # Not rank 0: a logger that does nothing, so the Trainer is configured alike on every
            # rank. Not an MLFlowLogger: its constructor opens the store, and under torchrun or srun
            # every rank starts at once, so a new SQLite store got migrated by several processes
            # together (and was left broken for good).
            from lightning.pytorch.loggers.logger import DummyLogger

            return DummyLogger()
        logger = RunMetrics(experiment_name=str(cfg.logger.experiment_name), tracking_uri=tracking.tracking_uri(cfg),
                            run_id=self.run_id, log_model=False)
        logger._mlflow_client = self.client  # Lightning's metrics take the same path as lmlab's own calls
        logger.logged_through = self.logged_through
        return logger
