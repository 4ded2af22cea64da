"""MLflow: the embedded store by default, a tracking server when the user names one.

lmlab opens the run itself (so params, tags and the config are there before the first step and
a failed start marks the run FAILED), then hands its id to Lightning's ``MLFlowLogger`` for metrics
(``lmlab.run_log.RunMetrics``), and ends it itself once everything after training is done too.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import logging
import os
import posixpath
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
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
MAX_TAG_VALUE = 8000
# What MLflow refuses in a param or tag name (anything but letters, digits, _ - . space and /;
# a colon passes only on some platforms, so it is replaced too).
_REFUSED = re.compile(r"[^/\w.\- ]")


def default_tracking_uri(root: str | Path) -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    """``logger.tracking_uri`` (whose default is ``MLFLOW_TRACKING_URI``), else the embedded store."""
    return str(cfg.logger.tracking_uri) if cfg.logger.get("tracking_uri") else default_tracking_uri(cfg.paths.root)


def open_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; a local SQLite store is created (or upgraded) by one process at a time.

    MLflow creates a new database's tables, and migrates an old one's, when a client is first built.
    Several processes doing that at once (a SLURM job array, runs started together by a script, on a
    fresh ``mlflow.db``) failed all but one with ``table ... already exists`` or ``duplicate column``:
    the first build takes an exclusive lock on ``<database>.lock``.
    """
    import mlflow

    database = _sqlite_file(uri)
    if database is None or uri in _READY_STORES:
        return mlflow.MlflowClient(tracking_uri=uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(database.with_name(database.name + ".lock")):
        made = mlflow.MlflowClient(tracking_uri=uri)
    _READY_STORES.add(uri)
    return made


_READY_STORES: set[str] = set()


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?")[0]
    return None if not path or path.startswith(":memory:") else Path(path)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent first starts are left to MLflow
        yield
        return
    try:
        handle = open(lock_file, "a")
    except OSError as exc:  # a read-only folder: MLflow says what it makes of the store itself
        log.debug("no lock file %s: %s", lock_file, exc)
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without locks (some NFS mounts): go on unlocked
            log.debug("no lock on %s: %s", lock_file, exc)
        yield  # the lock goes with the file's closing


def _from_env(uri: str) -> str:
    # conf/logger/mlflow.yaml takes MLFLOW_TRACKING_URI as logger.tracking_uri's default.
    return " (from MLFLOW_TRACKING_URI)" if os.environ.get("MLFLOW_TRACKING_URI") == uri else ""


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
        raise config_error("logger.tracking_uri", f"'{uri}'{_from_env(uri)} has no scheme",
                           f"A tracking server is http://{uri} (or https://); a local store is sqlite:///PATH.")
    if urlparse(uri).scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in (
            "1", "true"):
        # MLflow refuses its filesystem backend unless opted in, and would say so only at the first
        # write: after the data was read and the model built.
        raise config_error(
            "logger.tracking_uri",
            f"'{uri}'{_from_env(uri)} is a folder, and MLflow no longer accepts a folder as a tracking store",
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
        "logger.tracking_uri", f"the MLflow tracking server {uri}{_from_env(uri)} {problem}",
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


def entity_key(name: str) -> str:
    """``name`` as MLflow takes a param or tag name: a refused character becomes ``_``
    (``logger.tags.team (nlp)`` -> ``team _nlp_``), cut to the key's limit."""
    key = _REFUSED.sub("_", name)
    if posixpath.normpath(key) != key or key.startswith("/"):
        key = key.replace("/", "_")  # MLflow also wants a clean relative path: no a//b, a/./b, /a, a/
    if key in ("", ".") or key.startswith(".."):
        key = "_" + key
    return key[:MAX_PARAM_KEY]


def mlflow_safe(values: Mapping[str, Any], limit: int) -> dict[str, str]:
    """Param or tag names MLflow takes (``entity_key``), values cut to ``limit``. A name that
    becomes one already taken gets a number (``_2``) rather than failing the batch as a duplicate;
    names MLflow takes as they are come first, so they are never the ones renamed."""
    keys: dict[str, str] = {}
    for name in sorted(values, key=lambda n: entity_key(n) != n):
        key = entity_key(name)
        n = 1
        while key in keys.values():
            n += 1
            key = f"{entity_key(name)[:MAX_PARAM_KEY - 1 - len(str(n))]}_{n}"
        keys[name] = key
    renamed = [f"{name} -> {key}" for name, key in keys.items() if key != name]
    if renamed:
        log.warning("MLflow refuses some characters in names; logged as: %s", "; ".join(renamed))
    out: dict[str, str] = {}
    for name, value in values.items():
        text = str(value)
        out[keys[name]] = text if len(text) <= limit else text[: limit - 14] + "...(truncated)"
    return out


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
    uri = tracking_uri(cfg)
    database = _sqlite_file(uri)
    if database is not None and not database.exists():
        return
    name = str(cfg.logger.experiment_name)
    experiment = open_client(uri).get_experiment_by_name(name)
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
    return mlflow_safe(params, MAX_PARAM_VALUE)


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str, str] | None:
    """(commit, "true" | "false" for uncommitted changes) of the checkout lmlab runs from; None for
    an installed wheel (its folder may lie inside some other repository: the file must be tracked)."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return None
    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, "unknown" if status is None else str(bool(status)).lower()


def command_line() -> str:
    """The command that reproduces this run: the ``lmlab`` command line of a single run; for a
    sweep's job, ``lmlab`` with that job's own overrides; outside Hydra, the process's argv."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return shlex.join(sys.argv)
    if hc.mode != RunMode.MULTIRUN:
        return shlex.join(["lmlab", *sys.argv[1:]])
    args = ["lmlab"]
    for source in hc.runtime.get("config_sources") or []:
        if source.get("provider") == "command-line" and source.get("schema") == "file":
            args += ["--config-dir", str(source.path)]
    if hc.job.get("config_name") not in (None, "config"):
        args += ["--config-name", str(hc.job.config_name)]
    return shlex.join([*args, *(str(o) for o in hc.overrides.task)])


def source_tags(command: str | None = None) -> dict[str, str]:
    """What code made the run: lmlab's version, the git commit of its checkout (and whether it had
    uncommitted changes), the command line and the user, in MLflow's own tag names where it has them."""
    from lmlab import __version__

    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        user = ""
    tags = {"lmlab.version": __version__, "lmlab.command": (command or command_line())[:MAX_TAG_VALUE],
            "mlflow.source.name": "lmlab", "mlflow.source.type": "LOCAL"}
    if user:
        tags["mlflow.user"] = user
    git = _git_state()
    if git is not None:
        tags["mlflow.source.git.commit"], tags["lmlab.git.dirty"] = git
    return tags


def user_tags(cfg: DictConfig) -> dict[str, str]:
    """``logger.tags`` as MLflow takes them."""
    return mlflow_safe({str(k): str(v) for k, v in (cfg.logger.get("tags") or {}).items()}, MAX_TAG_VALUE)


def hydra_files() -> Path | None:
    """The job's ``.hydra`` folder (config.yaml as composed, hydra.yaml, overrides.yaml), if Hydra wrote one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if not hc.get("output_subdir"):
        return None
    folder = Path(str(hc.runtime.output_dir)) / str(hc.output_subdir)
    return folder if folder.is_dir() else None


def start_run(cfg: DictConfig, tags: Mapping[str, str]) -> tuple[Any, str, str]:
    """A new MLflow run with the config as params; returns (client, run_id, experiment_id).

    Inside a Hydra multirun the run is a child of the sweep's parent run (see lmlab.sweep).
    The caller checks the server with ``check_reachable`` first, before any data work.
    """
    from mlflow.entities import Param

    from lmlab import sweep

    uri = tracking_uri(cfg)
    client = open_client(uri)
    exp_id = experiment_id(client, cfg)
    job = sweep.job_context()
    all_tags = {**source_tags(), **user_tags(cfg), **tags}
    run_name = cfg.logger.get("run_name")
    if job is not None:
        all_tags.update(sweep.child_tags(job, exp_id, uri))
        run_name = run_name or sweep.child_run_name(job)
    run = client.create_run(exp_id, run_name=run_name or default_run_name(tags), tags=all_tags)
    run_id = run.info.run_id
    try:
        if job is not None:
            sweep.job_started(job, run_id)
        params = logged_params(cfg)
        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])
        hydra_dir = hydra_files()
        if hydra_dir is not None:  # the overrides as typed, beside the resolved config (config/)
            client.log_artifacts(run_id, str(hydra_dir), artifact_path="config/hydra")
    except BaseException:
        # Not left RUNNING for ever: the run's body (lmlab.resume.ending), which would end it, has not begun.
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception as exc:
            log.warning("Could not mark MLflow run %s FAILED: %s", run_id, exc)
        raise
    log.info("MLflow run %s in experiment '%s' at %s", run_id, cfg.logger.experiment_name, uri)
    return client, run_id, exp_id


def quiet_env() -> None:
    # Fail fast instead of retrying a dead server for minutes (MLflow's default backoff).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
