"""A Hydra sweep in MLflow, the sweep's side: the parent run and the callback that opens and closes it.

``hydra.callbacks.mlflow_sweep`` in conf/config.yaml. ``on_multirun_start`` opens the parent (or
reopens the one an earlier sweep of the same Optuna study left) and writes its id into the sweep
directory for the jobs (lmlab.sweep); ``on_multirun_end``, or an atexit hook when the sweep stops
early, closes it from the jobs' records with the best objective.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import LmlabError
from lmlab.sweep import (SWEEP_FILE, how_to_resume, job_context, job_records, objective_direction, read_sweep,
                         record_job, reset_job, write_json)

log = logging.getLogger(__name__)

# Sweeps this process opened and has not closed yet (the atexit hook closes what is left).
_open_sweeps: set[Path] = set()
_interrupted = False
_stop_signal: str | None = None
# The sweeper's settings of the sweep this process started, for the line that ends a stopped sweep.
_sweeper: dict[str, Any] | None = None


def note_interrupted(signum: int | None = None) -> None:
    """An unfinished sweep's parent then ends KILLED rather than FAILED."""
    global _interrupted, _stop_signal
    _interrupted = True
    if signum is not None and _stop_signal is None:
        _stop_signal = signal.Signals(signum).name


def stopped_message() -> str | None:
    """What ends a sweep stopped by Ctrl-C or SIGTERM: how to resume it; None outside a sweep."""
    if _sweeper is None:
        return None
    how = f"by {_stop_signal}" if _stop_signal else "by an interrupt"
    return f"the sweep was stopped {how}. {how_to_resume(_sweeper)}."


def _on_signal(signum: int, frame: Any) -> None:
    note_interrupted(signum)
    if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is not _on_signal:
        # Inside a Lightning fit, whose own handler called this one: training stops at the next step
        # with last.ckpt saved (lmlab.faults), and the sweep stops when that job returns (on_job_end).
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


def handle_stop_signals() -> None:
    """Ctrl-C and SIGTERM (scancel, a timeout) stop the sweep through its clean-up: the running
    job's run ends, the Optuna sweeper re-queues its trials and the parent ends KILLED. Without
    this, SIGTERM between two jobs would end the process on the spot. Handlers someone else set
    are left alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _on_signal)


# -- the parent run -------------------------------------------------------------------------------
def _swept_keys(config: DictConfig) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = dict(config.hydra.sweeper.get("params") or {})
    lines = [f"{k}={v}" for k, v in params.items()] + [str(o) for o in config.hydra.overrides.task]
    keys: list[str] = []
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.key_or_group
        if override.is_sweep_override() and key not in keys:
            keys.append(key)
        elif not override.is_sweep_override() and key in keys:
            keys.remove(key)  # a fixed value on the command line beats a searched one in the preset
    return keys


def _direction(config: DictConfig) -> str | None:
    wanted = config.hydra.sweeper.get("direction")
    return {"minimize": "min", "maximize": "max"}.get(str(wanted)) if wanted else None


def open_parent(config: DictConfig) -> dict[str, Any]:
    """Create the sweep's parent run (or take up the one a resumed sweep left) and write its id."""
    from lmlab import tracking

    sweep_dir = Path(str(config.hydra.sweep.dir))
    tracking.quiet_env()
    uri = tracking.tracking_uri(config)
    tracking.check_reachable(uri)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    client = tracking.open_client(uri)
    experiment_id = tracking.experiment_id(client, config)
    info = {
        "tracking_uri": uri, "experiment_id": experiment_id, "swept_keys": _swept_keys(config),
        "direction": _direction(config), "sweep_dir": str(sweep_dir.resolve()),
        "host": socket.gethostname(), "pid": os.getpid(),
        # Tells this session's job records from those an earlier one left in the same directory.
        "session": uuid.uuid4().hex,
    }
    sweeper = config.hydra.sweeper
    study = {f"optuna.{key}": str(sweeper[key]) for key in ("study_name", "storage") if sweeper.get(key)}
    parent = _resumable(client, read_sweep(sweep_dir), uri, experiment_id)
    if parent is None and len(study) == 2:
        parent = _study_parent(client, experiment_id, study)
    if parent is not None:
        # A session that stops before its first job (a refused study, Ctrl-C at once) gives it back as it was.
        info["resumed_status"] = client.get_run(parent).info.status
        client.update_run(parent, status="RUNNING")
        client.set_tag(parent, "lmlab.sweep.resumed", time.strftime("%Y-%m-%d %H:%M:%S"))
        log.info("Sweep resumed in %s: parent MLflow run %s", sweep_dir, parent)
    else:
        name = sweeper.get("study_name") or f"sweep {sweep_dir.name}"
        tags = {
            # The sweep's own command line (its jobs' runs carry each job's): lmlab -m ...
            **tracking.source_tags(shlex.join(["lmlab", *sys.argv[1:]])),
            **study,
            "lmlab.sweep.parent": "true",
            "lmlab.sweep.dir": info["sweep_dir"],
            "lmlab.sweep.overrides": " ".join(str(o) for o in config.hydra.overrides.task)[:5000],
            "lmlab.sweep.sweeper": str(sweeper.get("_target_", "")),
            "lmlab.sweep.launcher": str(config.hydra.launcher.get("_target_", "")),
            "lmlab.task": str(config.task.name), "lmlab.model": str(config.model.name),
            **tracking.user_tags(config),
        }
        parent = client.create_run(experiment_id, run_name=str(name), tags=tags).info.run_id
        log.info("Sweep parent MLflow run %s in experiment %s at %s", parent, experiment_id, uri)
    info["parent_run_id"] = parent
    write_json(sweep_dir / SWEEP_FILE, info)
    return info


def _resumable(client: Any, previous: dict[str, Any] | None, uri: str, experiment_id: str) -> str | None:
    """The parent of an earlier sweep in the same directory (hydra.sweep.dir given again)."""
    if not previous or previous.get("tracking_uri") != uri or previous.get("experiment_id") != experiment_id:
        return None
    try:
        run = client.get_run(previous["parent_run_id"])
    except Exception:  # deleted, or another store: start a new parent
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def _study_parent(client: Any, experiment_id: str, study: dict[str, str]) -> str | None:
    """The parent run an earlier sweep of the same stored Optuna study opened: one parent per study."""
    if any("'" in v for v in study.values()):
        return None  # not expressible in MLflow's filter syntax; a new parent is harmless
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in study.items()) + " and tags.`lmlab.sweep.parent` = 'true'"
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _best(records: list[dict[str, Any]], direction: str | None) -> dict[str, Any] | None:
    done = [r for r in records if r.get("status") == "COMPLETED" and isinstance(r.get("objective"), (int, float))
            and math.isfinite(r["objective"])]
    if not done:
        return None
    direction = direction or done[0].get("direction") or "min"
    pick = max if direction == "max" else min
    return pick(done, key=lambda r: r["objective"])


def close_parent(sweep_dir: str | Path, ended_normally: bool) -> str | None:
    """Mark the parent FINISHED, FAILED (a job failed, or the sweep died) or KILLED (Ctrl-C); log the best."""
    import mlflow

    sweep_dir = Path(sweep_dir)
    _open_sweeps.discard(sweep_dir.resolve())
    info = read_sweep(sweep_dir)
    if info is None:
        return None
    records = list(job_records(sweep_dir).values())
    client = mlflow.MlflowClient(tracking_uri=info["tracking_uri"])
    parent = info["parent_run_id"]
    previous = info.get("resumed_status")
    if not records and not ended_normally and previous in ("FINISHED", "FAILED", "KILLED"):
        # Nothing of this session is in it: the earlier sessions' verdict and records stand.
        client.set_terminated(parent, previous)
        log.info("Sweep parent MLflow run %s: %s again (this session ran no job)", parent, previous)
        return previous
    failed = [r for r in records if r.get("status") == "FAILED"]
    if failed:
        status = "FAILED"
    elif ended_normally:
        status = "FINISHED"
    else:
        status = "KILLED" if _interrupted else "FAILED"
    client.log_metric(parent, "sweep/jobs", len(records))
    client.log_metric(parent, "sweep/jobs_failed", len(failed))
    best = _best(records, info.get("direction"))
    results = sweep_dir / "optimization_results.yaml"
    study = OmegaConf.to_container(OmegaConf.load(results)) if results.is_file() else None
    if isinstance(study, dict) and study.get("best_value") is not None:
        # A resumed Optuna study's best may come from an earlier sweep dir: the study knows.
        client.log_metric(parent, "sweep/trials_finished", float(study.get("n_finished", 0)))
        best = {"objective": study["best_value"], "run_id": study.get("best_mlflow_run_id"),
                "metric": (best or {}).get("metric"), "optuna_trial": study.get("best_trial"),
                "overrides": study.get("best_overrides")
                or [f"{k}={v}" for k, v in (study.get("best_params") or {}).items()]}
    if best is not None:
        client.log_metric(parent, "best_objective", float(best["objective"]))
        for key, value in (("objective_metric", best.get("metric")), ("best_run_id", best.get("run_id")),
                           ("best_job", best.get("num")), ("best_optuna_trial", best.get("optuna_trial")),
                           ("best_overrides", " ".join(best.get("overrides") or []))):
            if value is not None:
                client.set_tag(parent, f"lmlab.sweep.{key}", str(value)[:5000])
        # The console's answer to "which job won?", as Optuna prints its best trial.
        log.info("Best job%s: %s = %.6g%s", f" {best['num']}" if best.get("num") is not None else "",
                 best.get("metric") or "objective", float(best["objective"]),
                 f" ({' '.join(best['overrides'])})" if best.get("overrides") else "")
    client.log_dict(parent, {str(r["num"]): r for r in records}, "sweep/jobs.json")
    for name in ("multirun.yaml", "optimization_results.yaml"):
        if (sweep_dir / name).is_file():
            client.log_artifact(parent, str(sweep_dir / name), artifact_path="sweep")
    client.set_terminated(parent, status)
    log.info("Sweep parent MLflow run %s: %s (%d jobs, %d failed)", parent, status, len(records), len(failed))
    return status


def close_left_open() -> None:
    """Close the parents of sweeps that ended without on_multirun_end (a failed job, a dead sweeper,
    Ctrl-C): a parent left RUNNING forever would look like a live sweep. Also run at exit."""
    for sweep_dir in list(_open_sweeps):
        try:
            close_parent(sweep_dir, ended_normally=False)
        except Exception as exc:  # the store may be gone too; never hide the original error
            log.warning("Could not close the sweep's parent MLflow run in %s: %s", sweep_dir, exc)


def _fail_finished_run(cfg: DictConfig, run_id: str) -> None:
    """A job that failed after its run ended well (its objective missing, say): the child run says FAILED,
    as the job record and the parent's sweep/jobs_failed do."""
    from lmlab import tracking

    try:
        client = tracking.open_client(tracking.tracking_uri(cfg))
        if client.get_run(run_id).info.status == "FINISHED":
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # best effort: the job's own error is what the sweep reports
        log.warning("Could not mark the failed job's MLflow run %s FAILED: %s", run_id, exc)


class MlflowSweepCallback(Callback):
    """``hydra.callbacks`` entry: the MLflow parent run of a multirun and the jobs' records."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweeper
        handle_stop_signals()
        sweeper = config.hydra.sweeper
        _sweeper = {key: sweeper.get(key) for key in ("n_trials", "study_name", "storage") if key in sweeper}
        try:
            info = open_parent(config)
        except LmlabError as exc:
            # A dead tracking server, say: refuse the sweep before its first job, as a single run
            # would. (Hydra only warns about an Exception from a callback; SystemExit gets through.)
            print(f"lmlab: error: {exc}", file=sys.stderr)
            sys.exit(2)
        except Exception as exc:
            # Hydra would only warn and run every job anyway: with no parent (runs not grouped), or
            # under the parent an earlier sweep left in this directory, which this sweep then closes.
            log.debug("Opening the sweep's parent run failed", exc_info=True)
            print(f"lmlab: error: the sweep could not open its parent MLflow run ({type(exc).__name__}: {exc}), "
                  "so no job was started", file=sys.stderr)
            sys.exit(2)
        if not _open_sweeps:
            atexit.register(close_left_open)
        _open_sweeps.add(Path(info["sweep_dir"]))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        ctx = job_context()
        if ctx is not None:
            reset_job(ctx)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        ctx = job_context()
        if ctx is None:
            return
        from hydra.core.utils import JobStatus

        ok = job_return.status == JobStatus.COMPLETED
        fields: dict[str, Any] = {"status": "COMPLETED" if ok else "FAILED", "finished": time.time(),
                                  "overrides": list(job_return.overrides or [])}
        if ok:
            value = job_return.return_value
            fields["objective"] = float(value) if isinstance(value, (int, float)) else None
        else:
            # The exception itself: .return_value would print it and raise it again.
            error = job_return._return_value
            fields["error"] = f"{type(error).__name__}: {error}"[:2000]
        if _interrupted:
            fields["status"] = "KILLED"  # stopped by a signal, not by a fault of its own
        try:
            fields["metric"], fields["direction"], _ = objective_direction(job_return.cfg)
        except Exception:  # best effort: an unknown task, say, already failed the job itself
            pass
        record = record_job(ctx.sweep_dir, ctx.num, **fields)
        if record["status"] == "FAILED" and record.get("run_id"):
            _fail_finished_run(job_return.cfg, record["run_id"])
        if _interrupted:
            raise KeyboardInterrupt("the sweep was asked to stop")  # no further jobs (Hydra lets it through)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_parent(Path(str(config.hydra.sweep.dir)), ended_normally=True)
