"""A Hydra sweep in MLflow, the jobs' side: each job's run is a child of the sweep's parent run.

The process that starts the sweep and the jobs (the same process, joblib workers or SLURM nodes)
share one thing for sure: the sweep directory. The parent run's id lies in a file there (written by
lmlab.sweep_parent), and each job leaves a small JSON record beside it: its MLflow run, how it
ended, its objective. The parent is closed from those records, whichever launcher ran the jobs.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmlab.errors import LmlabError, config_error

log = logging.getLogger(__name__)

SWEEP_FILE = "lmlab_sweep.json"
JOBS_DIR = "lmlab_jobs"
# Written by the first job whose objective never appeared (see check_objective).
MISSING_OBJECTIVE_FILE = "lmlab_objective_missing.json"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's runs.name column: PostgreSQL and MySQL refuse a longer name, so the job would fail at its
# start (SQLite does not check). The lmlab.sweep.overrides tag keeps every value.
MAX_RUN_NAME = 250


class SweepStopped(SystemExit):
    """A sweep that ends early for a reason already explained (a job's error, a refused study).

    A SystemExit, so Hydra lets it through without its traceback; lmlab's CLI closes the parent
    run, prints ``message`` last and exits with 2. Anywhere else Python prints the code and exits 1.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"lmlab: error: {message}")
        self.message = message


@dataclass(frozen=True)
class JobContext:
    """Where a multirun job stands: its sweep directory, number, overrides and parent run."""

    sweep_dir: Path
    num: int
    overrides: list[str]
    sweep: dict[str, Any] | None


# -- files in the sweep directory -----------------------------------------------------------------
def write_json(path: Path, data: Mapping[str, Any]) -> None:
    # Write-then-rename: a reader on another machine never sees half a file.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_sweep(sweep_dir: str | Path) -> dict[str, Any] | None:
    return _read_json(Path(sweep_dir) / SWEEP_FILE)


def record_job(sweep_dir: str | Path, num: int, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into job ``num``'s record (only that job's process or the sweeper writes it)."""
    path = Path(sweep_dir) / JOBS_DIR / f"{num}.json"
    record = {**(_read_json(path) or {}), **fields, "num": num}
    write_json(path, record)
    return record


def reset_job(ctx: JobContext) -> None:
    """Job ``ctx.num`` starts: a record an earlier session of the sweep left under that number is dropped.

    A sweep run again in its own directory (hydra.sweep.dir) reuses the job numbers: an earlier
    session's run id, objective or error must not stick to this attempt (a job failing before its
    run opens would report the old run's objective, and have that run marked FAILED). A record of
    this session stays: a requeued SLURM job reopens the run it started, without a new job_started.
    Optuna's tags, written by the sweeper for this very attempt, stay too.
    """
    path = ctx.sweep_dir / JOBS_DIR / f"{ctx.num}.json"
    previous = _read_json(path) or {}
    if previous.get("session") == (ctx.sweep or {}).get("session"):
        return
    write_json(path, {"num": ctx.num, **({"tags": previous["tags"]} if "tags" in previous else {})})


def job_records(sweep_dir: str | Path) -> dict[int, dict[str, Any]]:
    records = {}
    for path in sorted((Path(sweep_dir) / JOBS_DIR).glob("*.json")):
        record = _read_json(path)
        if record is not None and "num" in record:
            records[int(record["num"])] = record
    return records


def job_context() -> JobContext | None:
    """The current multirun job, or None outside a Hydra multirun (single runs, tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN or hc.job.get("num") is None:
        return None
    sweep_dir = Path(str(hc.sweep.dir))
    return JobContext(sweep_dir, int(hc.job.num), [str(o) for o in hc.overrides.task], read_sweep(sweep_dir))


# -- after a sweep stopped ------------------------------------------------------------------------
def is_optuna(sweeper: Mapping[str, Any]) -> bool:
    """lmlab's Optuna sweeper (``hydra/sweeper: optuna`` and its presets), told by its settings."""
    return "n_trials" in sweeper and "study_name" in sweeper


def how_to_resume(sweeper: Mapping[str, Any]) -> str:
    """The next step after a sweep stopped early: an Optuna study resumes, a grid starts anew."""
    if is_optuna(sweeper):
        if sweeper.get("storage") is None:
            return ("Its study was in memory (hydra.sweeper.storage=null): running the same command again "
                    "starts it anew")
        return (f"Run the same command again to resume: study '{sweeper.get('study_name')}' keeps its finished "
                "trials and runs only the missing ones (an interrupted trial again, from scratch)")
    return "Run the same command again to start the sweep anew (a grid sweep does not skip the jobs that finished)"


# Launchers whose jobs write to the sweep's own terminal: a failed job's error is on screen already.
SAME_TERMINAL = ("hydra._internal.core_plugins.basic_launcher.BasicLauncher",
                 "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher")


def reportable_failure(job_return: Any) -> LmlabError | None:
    """The lmlab error a failed job ended with, which the sweep sums up in a line; None for any other
    error (a bug, whose traceback Hydra shows) or when HYDRA_FULL_ERROR=1 asks for tracebacks."""
    error = job_return._return_value  # .return_value would print the overrides and raise it
    if isinstance(error, LmlabError) and os.environ.get("HYDRA_FULL_ERROR") != "1":
        return error
    return None


def where_the_error_is(launcher: Mapping[str, Any], error: Exception) -> str:
    return "its error is above" if launcher.get("_target_") in SAME_TERMINAL else f"it said: {error}"


def preempted_in_sweep(exc: Exception, ctx: JobContext) -> LmlabError:
    """A sweep job's answer to SIGTERM: its own folder is no run to resume, the sweep's command is."""
    from hydra.core.hydra_config import HydraConfig

    signum = getattr(exc, "signum", signal.SIGTERM)
    stopped = f"job {ctx.num} of the sweep was stopped by {signal.Signals(signum).name}; the sweep stops"
    if (ctx.sweep or {}).get("pid") == os.getpid():
        return LmlabError(f"{stopped}.")  # in the sweep's process, whose last line says how to resume
    sweeper = HydraConfig.get().sweeper
    fix = how_to_resume(sweeper)
    if not is_optuna(sweeper):
        fix += f", or only this job: lmlab {shlex.join(ctx.overrides)}"
    return LmlabError(f"{stopped}. {fix}.")


# -- what a job adds to its MLflow run ------------------------------------------------------------
def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def child_run_name(ctx: JobContext) -> str | None:
    """``optimizer.lr=3e-05 seed=2``: the job's values of the swept keys (None when nothing is swept)."""
    swept = set((ctx.sweep or {}).get("swept_keys") or [])
    parts = [f"{_override_key(o)}={_short(o.split('=', 1)[1])}" for o in ctx.overrides
             if "=" in o and _override_key(o) in swept]
    return " ".join(parts)[:MAX_RUN_NAME] or None


def _short(value: str) -> str:
    # Optuna's floats (0.0006466422717414558) make unreadable run names; the params keep them exact.
    try:
        number = float(value)
    except ValueError:
        return value
    return value if "." not in value and "e" not in value.lower() else f"{number:.4g}"


def child_tags(ctx: JobContext, experiment_id: str, tracking_uri: str) -> dict[str, str]:
    """Tags of a job's run: the sweep it belongs to and, in the parent's experiment, the parent."""
    record = _read_json(ctx.sweep_dir / JOBS_DIR / f"{ctx.num}.json") or {}
    tags = {
        "lmlab.sweep.dir": str(ctx.sweep_dir.resolve()),
        "lmlab.sweep.job": str(ctx.num),
        "lmlab.sweep.overrides": " ".join(ctx.overrides)[:5000],
        **{str(k): str(v) for k, v in (record.get("tags") or {}).items()},
    }
    sweep = ctx.sweep
    if sweep is None:
        return tags
    if sweep.get("experiment_id") == experiment_id and sweep.get("tracking_uri") == tracking_uri:
        tags[PARENT_TAG] = str(sweep["parent_run_id"])
    else:
        # MLflow nests runs only inside one experiment (a sweep over logger.experiment_name, say).
        log.warning("Sweep job %s logs to another experiment or store than its parent run %s: not nested",
                    ctx.num, sweep.get("parent_run_id"))
    tags["lmlab.sweep.parent_run_id"] = str(sweep["parent_run_id"])
    return tags


def job_started(ctx: JobContext, run_id: str) -> None:
    record_job(ctx.sweep_dir, ctx.num, run_id=run_id, status="RUNNING", started=time.time(),
               objective=None, finished=None, host=socket.gethostname(), pid=os.getpid(),
               session=(ctx.sweep or {}).get("session"))


def job_killed(sweep_dir: str | Path, num: int) -> None:
    """A job whose process died (found by a resumed sweep): its MLflow run ends KILLED, not RUNNING."""
    import mlflow

    record = _read_json(Path(sweep_dir) / JOBS_DIR / f"{num}.json")
    info = read_sweep(sweep_dir)
    if record is None or record.get("status") not in (None, "RUNNING"):
        return
    if record.get("run_id") and info is not None:
        client = mlflow.MlflowClient(tracking_uri=info["tracking_uri"])
        if client.get_run(record["run_id"]).info.status == "RUNNING":
            client.set_terminated(record["run_id"], "KILLED")
    record_job(sweep_dir, num, status="KILLED", finished=time.time())


# -- the objective --------------------------------------------------------------------------------
def objective_direction(cfg: DictConfig) -> tuple[str, str, bool]:
    """(metric, "min" | "max", known) of the objective a job returns.

    Known when the objective is the checkpoint's monitored metric (whose direction the task or
    checkpoint.mode declares), when objective.direction gives it, or when the metric's name says it
    (lmlab.train.metric_mode: losses and errors fall, accuracies and F1 rise). Otherwise "max" is a
    guess, and ``check_objective_direction`` refuses it in a sweep.
    """
    from lmlab import registry
    from lmlab.train import metric_mode, monitored, objective_metric

    task = registry.get("task", cfg.task.name)
    metric = objective_metric(cfg, task)
    given = (cfg.get("objective") or {}).get("direction")
    if given is not None:
        if str(given) not in ("min", "max"):
            raise config_error("objective.direction", f"'{given}' is neither min nor max",
                               "Use objective.direction=min or max.")
        return metric, str(given), True
    watched, mode = monitored(cfg, task)
    if metric == watched:
        return metric, mode, True
    named = metric_mode(metric)
    return metric, named or "max", named is not None


def monitored_metric(cfg: DictConfig) -> str:
    from lmlab import registry
    from lmlab.train import monitored

    return monitored(cfg, registry.get("task", cfg.task.name))[0]


def check_objective_direction(cfg: DictConfig) -> None:
    """Before a sweep job trains: the sweep must know whether its objective is best high or low."""
    if job_context() is None:
        return
    metric, _, known = objective_direction(cfg)
    if not known:
        raise config_error("objective.direction", f"it is unset, and the name of objective.metric={metric} does not "
                           "say whether higher or lower is better, so the sweep cannot pick its best job",
                           "Set objective.direction=max (an accuracy, a score) or objective.direction=min "
                           f"(a loss, an error), or check the name (the checkpoint monitors {monitored_metric(cfg)}).")


def check_direction(cfg: DictConfig) -> None:
    """Before training: a sweeper told to minimise an accuracy would waste the whole sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig

        wanted = HydraConfig.get().sweeper.get("direction")
    except ValueError:
        return
    if wanted is None or job_context() is None:
        return
    check_sweeper_direction(cfg, str(wanted))


def check_sweeper_direction(cfg: DictConfig, wanted: str) -> None:
    """``wanted`` (the sweeper's direction) against the objective's, where the task declares it.

    The Optuna sweeper calls this before it creates its study: a study stored with the wrong
    direction would refuse the corrected command line afterwards.
    """
    metric, mode, known = objective_direction(cfg)
    expected = {"min": "minimize", "max": "maximize"}[mode]
    if known and wanted != expected:
        raise config_error("hydra.sweeper.direction",
                           f"it is '{wanted}' but the objective {metric} is best at its {mode}",
                           f"Set hydra.sweeper.direction={expected} (or objective.metric to another metric).")


def _metric_source(cfg: DictConfig) -> str:
    """What decides the names a job's final metrics have: its task, data and teacher settings.

    Jobs that differ only in what a grid usually sweeps (learning rate, seed, model, trainer) log
    the same names, so one job's missing objective is every such job's.
    """
    from omegaconf import OmegaConf

    decisive = {key: cfg.get(key) for key in ("task", "data", "distill")}
    return json.dumps(OmegaConf.to_container(OmegaConf.create(decisive), resolve=True), sort_keys=True, default=str)


def check_objective(metric: str, metrics: Mapping[str, float], cfg: DictConfig | None = None) -> None:
    """A sweep job whose objective never appeared: a typo in objective.metric, not a bad trial.

    The verdict is left in the sweep directory, so the sweep's later jobs stop before training
    (``check_objective_known``) instead of each training to the same error.
    """
    if metric in metrics:
        return
    produced = ", ".join(sorted(metrics)) or "(none)"
    ctx = job_context()
    if ctx is not None and cfg is not None:
        write_json(ctx.sweep_dir / MISSING_OBJECTIVE_FILE,
                   {"metric": metric, "job": ctx.num, "produced": produced, "source": _metric_source(cfg)})
    raise config_error("objective.metric", f"the run produced no '{metric}'",
                       f"Use one of its final metrics: {produced}.")


def check_objective_known(cfg: DictConfig) -> None:
    """Before training a sweep job: an earlier job with the same task and data lacked this objective."""
    ctx = job_context()
    record = _read_json(ctx.sweep_dir / MISSING_OBJECTIVE_FILE) if ctx is not None else None
    if not record:
        return
    metric, _, _ = objective_direction(cfg)
    if record.get("metric") == metric and record.get("source") == _metric_source(cfg):
        raise config_error("objective.metric",
                           f"job {record.get('job')} of this sweep, with the same task and data, produced no '{metric}'",
                           f"Use one of its final metrics: {record.get('produced')}.")
