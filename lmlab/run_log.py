"""The MLflow run of one job, written by global rank 0 only.

Under DDP/FSDP every process runs lmlab's code; only rank 0 opens the MLflow run and writes to it,
so a job is one MLflow run however many processes it has. The other ranks hold a RunLog whose
calls do nothing (Lightning's MLFlowLogger is rank-0-only on its own).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmlab import tracking


@dataclass
class RunLog:
    client: Any | None
    run_id: str

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
        if self.client is not None:
            for key, value in values.items():
                self.client.log_param(self.run_id, key, value)

    def metric(self, key: str, value: float) -> None:
        if self.client is not None:
            self.client.log_metric(self.run_id, key, value)

    def survive_outages(self, uri: str, run_dir: Path) -> None:
        """Queue writes while a remote tracking server is unreachable (lmlab.pending)."""
        if self.client is not None and uri.startswith(("http://", "https://")):
            from lmlab.pending import ResilientClient

            self.client = ResilientClient(self.client, uri, run_dir)

    def terminate(self, status: str) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status)
            from lmlab.pending import ResilientClient

            if isinstance(self.client, ResilientClient):
                self.client.close()  # a last try at sending what an outage held back

    def metrics_logger(self, cfg: DictConfig) -> Any:
        from lightning.pytorch.loggers import MLFlowLogger

        if self.client is None:  # never touches the store: its methods are rank-zero-only
            return MLFlowLogger(experiment_name=str(cfg.logger.experiment_name),
                                tracking_uri=tracking.tracking_uri(cfg), log_model=False)
        logger = tracking.metrics_logger(cfg, self.run_id)
        logger._mlflow_client = self.client  # Lightning's metrics take the same path as lmlab's own calls
        return logger
