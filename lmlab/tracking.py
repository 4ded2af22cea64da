"""MLflow: the embedded store by default, a tracking server when the user names one.

lmlab opens the run itself (so params, tags and the config are there before the first step and
a failed start marks the run FAILED), then hands its id to Lightning's ``MLFlowLogger`` for metrics.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab.errors import config_error

log = logging.getLogger(__name__)

# MLflow's own limits (mlflow.utils.validation); kept here so params never fail to log.
MAX_PARAM_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_PARAMS_PER_BATCH = 100


def default_tracking_uri(root: str | Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    return str(cfg.logger.tracking_uri) if cfg.logger.get("tracking_uri") else default_tracking_uri(cfg.paths.root)


def artifact_root(cfg: DictConfig) -> str | None:
    # Only the embedded store needs a place of ours; a server decides for itself.
    if cfg.logger.get("tracking_uri"):
        return None
    return (Path(str(cfg.paths.root)).resolve() / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any training when a tracking server does not answer."""
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):  # HOST:PORT without a scheme: MLflow would read a local path
        raise config_error("logger.tracking_uri", f"'{uri}' has no scheme",
                           f"A tracking server is http://{uri} (or https://); a local store is sqlite:///PATH.")
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status} on /health"
    except urllib.error.HTTPError as exc:
        problem = f"answered HTTP {exc.code} on /health"
    except (urllib.error.URLError, OSError) as exc:
        problem = f"is unreachable ({getattr(exc, 'reason', exc)})"
    raise config_error(
        "logger.tracking_uri", f"the MLflow tracking server {uri} {problem}",
        "Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`) "
        "or drop logger.tracking_uri to log to the embedded local store.",
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``, each key and value cut to MLflow's limits."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
            continue
        text = str(value)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 14] + "...(truncated)"
        flat[name[:MAX_PARAM_KEY]] = text
    return flat


def experiment_id(client: Any, cfg: DictConfig) -> str:
    """The id of ``logger.experiment_name``, created (with our artifact root) when it is new."""
    from mlflow.exceptions import MlflowException

    name = str(cfg.logger.experiment_name)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(cfg))
    except MlflowException:
        # Parallel sweep jobs may race to create it: the loser takes the winner's.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def start_run(cfg: DictConfig, tags: Mapping[str, str]) -> tuple[Any, str, str]:
    """A new MLflow run with the config as params; returns (client, run_id, experiment_id).

    Inside a Hydra multirun the run is a child of the sweep's parent run (see lmlab.sweep).
    The caller checks the server with ``check_reachable`` first, before any data work.
    """
    import mlflow
    from mlflow.entities import Param

    from lmlab import sweep

    uri = tracking_uri(cfg)
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg)
    job = sweep.job_context()
    all_tags = {**{str(k): str(v) for k, v in (cfg.logger.get("tags") or {}).items()}, **tags}
    run_name = cfg.logger.get("run_name")
    if job is not None:
        all_tags.update(sweep.child_tags(job, exp_id, uri))
        run_name = run_name or sweep.child_run_name(job)
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    if job is not None:
        sweep.job_started(job, run_id)
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])
    log.info("MLflow run %s in experiment '%s' at %s", run_id, cfg.logger.experiment_name, uri)
    return client, run_id, exp_id


def metrics_logger(cfg: DictConfig, run_id: str) -> Any:
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(
        experiment_name=str(cfg.logger.experiment_name), tracking_uri=tracking_uri(cfg), run_id=run_id,
        log_model=False,
    )


def quiet_env() -> None:
    # Fail fast instead of retrying a dead server for minutes (MLflow's default backoff).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
