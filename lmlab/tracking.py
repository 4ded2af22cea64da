"""MLflow: the embedded store by default, a tracking server when the user names one.

lmlab opens the run itself (so params, tags and the config are there before the first step and
a failed start marks the run FAILED), then hands its id to Lightning's ``MLFlowLogger`` for metrics
(``lmlab.run_log.RunMetrics``), and ends it itself once everything after training is done too.
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
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from lmlab.errors import LmlabError, config_error

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
    """Where a new experiment keeps its artifacts: beside a local database (the embedded store's,
    or a sqlite:/// one given), else the server's choice."""
    uri = cfg.logger.get("tracking_uri")
    if not uri:
        return (Path(str(cfg.paths.root)).resolve() / "mlartifacts").as_uri()
    database = str(uri).removeprefix("sqlite:///") if str(uri).startswith("sqlite:///") else None
    if not database or database.startswith(":memory:"):
        return None
    # MLflow's own default is ./mlruns of whatever directory the command ran in.
    return (Path(database).resolve().parent / "mlartifacts").as_uri()


def ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any training when a tracking server does not answer."""
    if re.fullmatch(r"[\w.-]+:\d+(/.*)?", uri):  # HOST:PORT without a scheme: MLflow would read a local path
        raise config_error("logger.tracking_uri", f"'{uri}' has no scheme",
                           f"A tracking server is http://{uri} (or https://); a local store is sqlite:///PATH.")
    if urlparse(uri).scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
            "1", "true"):
        # MLflow refuses its filesystem backend unless opted in, and would say so only at the first
        # write: after the data was read and the model built.
        raise config_error(
            "logger.tracking_uri", f"'{uri}' is a folder, and MLflow no longer accepts a folder as a tracking store",
            "Use a database, e.g. logger.tracking_uri=sqlite:///PATH/mlflow.db, or a tracking server, "
            "logger.tracking_uri=http://HOST:PORT (`mlflow migrate-filestore` moves existing runs from the folder "
            "into a database), or drop logger.tracking_uri for the embedded local store.",
        )
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


def _deleted_error(name: str, experiment_id: str, uri: str) -> LmlabError:
    return config_error(
        "logger.experiment_name", f"the MLflow experiment '{name}' (id {experiment_id}) was deleted in {uri}, "
        "and MLflow takes no new runs into a deleted experiment",
        f"Restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}`, "
        "or pick another name with logger.experiment_name=NAME.",
    )


def experiment_id(client: Any, cfg: DictConfig) -> str:
    """The id of ``logger.experiment_name``, created (with our artifact root) when it is new."""
    from mlflow.exceptions import MlflowException

    name = str(cfg.logger.experiment_name)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise _deleted_error(name, experiment.experiment_id, tracking_uri(cfg))
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(cfg))
    except MlflowException:
        # Parallel sweep jobs may race to create it: the loser takes the winner's.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def check_experiment(cfg: DictConfig) -> None:
    """Fail before any data work when ``logger.experiment_name`` names a deleted experiment.

    Call after ``check_reachable``. A local store that does not exist yet holds no experiments:
    it is not created here, so a run that fails on its data leaves no empty store behind.
    """
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?")[0]).exists():
        return
    name = str(cfg.logger.experiment_name)
    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        raise _deleted_error(name, experiment.experiment_id, uri)


def default_run_name(tags: Mapping[str, str]) -> str | None:
    """The run directory's name (``2026-12-06_03-10-00-123456_clm_gpt2``): unique, and it says when and what.

    MLflow's own generated names come from ``random``, which the run has seeded by now: with a
    fixed seed every run would be named the same.
    """
    output_dir = tags.get("lmlab.output_dir")
    if not output_dir:
        return None
    folder = Path(output_dir)
    # A multirun job's folder is its number: the sweep folder's name says which sweep.
    return f"{folder.parent.name}_{folder.name}" if folder.name.isdigit() else folder.name


def logged_params(cfg: DictConfig) -> dict[str, str]:
    """The run's config as MLflow params; ``data.catalog`` is None when data.path or data.name
    replaced it, so a search by catalog finds only the runs that read it."""
    params = flatten(OmegaConf.to_container(cfg, resolve=True))
    if "data.catalog" in params and (params.get("data.path", "None") != "None" or params.get("data.name", "None") != "None"):
        params["data.catalog"] = "None"
    return params


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
    run = client.create_run(exp_id, run_name=run_name or default_run_name(tags), tags=all_tags)
    run_id = run.info.run_id
    if job is not None:
        sweep.job_started(job, run_id)
    params = logged_params(cfg)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])
    log.info("MLflow run %s in experiment '%s' at %s", run_id, cfg.logger.experiment_name, uri)
    return client, run_id, exp_id


def quiet_env() -> None:
    # Fail fast instead of retrying a dead server for minutes (MLflow's default backoff).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
