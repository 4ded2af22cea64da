"""``resume=``: find the run to continue, check it is the same experiment, reopen its MLflow run.

Every run directory holds ``lmlab_run.json`` (written atomically): its MLflow run id and store,
task, model, status and the process running it. ``resume=auto`` picks, under
``${paths.root}/runs``, the newest directory of the same task and model whose run did not finish,
is not running now and has a ``checkpoints/last.ckpt``; ``resume=DIR`` names the directory and
``resume=FILE.ckpt`` a checkpoint (inside a run directory: that run continues; elsewhere: a new run
starts from it). The resumed run writes into its original directory and MLflow run, after removing
what a killed process left staged there (``.export.*`` folders, ``checkpoints/*.tmp`` files).

Under DDP only global rank 0 searches: it hands its choice to the other ranks (``_auto``).

A submitit job (``hydra/launcher=slurm``) that starts again, requeued after its time limit or a
preemption, resumes without ``resume=`` (``requeued``): its run directory holds the record of a run
that this same submitit job (by job id) started and did not finish, and a ``last.ckpt``. So does a
torchrun launch on one machine whose workers torchrun started again after a failure
(``--max-restarts``, ``restarted``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from lmlab import atomic, checkpointing, faults, fingerprint, tracking
from lmlab.distributed import is_rank_zero, launch_id, on_one_node, torchrun_restart
from lmlab.errors import config_error, file_error
from lmlab.run_log import RunLog, last_logged_steps

log = logging.getLogger(__name__)

RECORD = "lmlab_run.json"
LAST = Path("checkpoints") / "last.ckpt"
# Global rank 0's resume=auto choice, "PID RUN_DIR", for the ranks Lightning's launcher starts from it.
CHOICE_ENV = "LMLAB_RESUME_AUTO_CHOICE"
# How long the other ranks of a torchrun/srun launch wait for rank 0's choice: torch's default
# process-group timeout, as long as they would wait for rank 0 in Trainer.fit anyway.
CLAIM_WAIT_S = 1800.0
# A claim older than this before a rank looks is another launch's that happened to share the id.
CLAIM_MAX_AGE_S = 600.0

# Keys a resumed run may change: where things live, and what does not alter what is computed (or,
# for max_steps/max_epochs, extends it on purpose). The rest must match config_resolved.yaml.
MAY_CHANGE = ("resume", "paths", "export", "objective", "checkpoint.every_n_steps", "faults",
              "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.max_steps",
              "trainer.max_epochs", "data.num_workers", "data.num_proc",
              # what happens after training: which weights it ends on, how much of the test split is scored
              "checkpoint.load_best_at_end", "trainer.limit_test_batches")


@dataclass(frozen=True)
class Resume:
    checkpoint: Path
    run_dir: Path | None  # None: a checkpoint from outside any lmlab run, continued in a new run
    run_id: str | None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise file_error(path, f"is not a readable run record ({exc})",
                         "Restore it, or resume from the checkpoint file itself: resume=DIR/checkpoints/last.ckpt")


def prepare(cfg: DictConfig, run_dir: Path | None = None) -> Resume | None:
    """Check the reliability keys and find what ``resume=`` names, before any data is read.

    ``run_dir``: the directory a new run would write to; a submitit job started again continues the
    run it holds (``requeued``).
    """
    checkpointing.every_n_steps(cfg)
    faults.policy(cfg)
    _warn_of_the_shared_store()
    value = cfg.get("resume")
    if value is None or str(value).strip() in ("", "null", "none", "false", "False"):
        found = (requeued(cfg, run_dir) or restarted(cfg, run_dir)) if run_dir is not None else None
        if found is None:
            return None
    else:
        if str(cfg.get("mode") or "fit") != "fit":
            raise config_error("resume", f"mode={cfg.mode} does not train, so there is nothing to resume",
                               "Drop resume=, or use mode=fit.")
        # Absolute: the summary prints the run directory and export, which a relative resume= left relative.
        found = None if str(value) == "auto" else _named(Path(str(value)).expanduser().absolute(), cfg)
    if found is None:
        with _failure_told(cfg):
            found = _auto(cfg)
            _check_found(cfg, found)
            if found.run_dir is not None and is_rank_zero():
                _hand_on(found.run_dir)
    else:
        _check_found(cfg, found)
    # Lightning warns about a non-empty checkpoint folder: continuing one is the point here.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    log.info("Resuming from %s", found.checkpoint)
    return found


def submitit_job_id() -> str | None:
    """The id of the submitit job this process runs in (SLURM's job id, ``ARRAY_TASK`` for an array
    task; the same after a requeue), or None outside one."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    try:
        import submitit

        return str(submitit.JobEnvironment().job_id)
    except Exception:  # an environment submitit does not recognise: no job to speak of
        return None


def requeued(cfg: DictConfig, run_dir: Path) -> Resume | None:
    """The run a requeued submitit job continues: the one in its own run directory, when this same
    submitit job started it (``submitit_job_id`` in the record), it did not finish and it left a
    ``last.ckpt``. A new submission (another job id) of the same directory is refused as before.

    hydra-submitit-launcher's requeue resubmits the same call, so the job's directory is the same;
    SLURM and submitit's LocalExecutor keep the job id across requeues. The previous start is over
    by then (one job id runs once at a time), so its record may still say ``running`` (killed
    outright at the time limit) or ``failed`` (submitit's handler exited before lmlab's took it).
    """
    job = submitit_job_id()
    if job is None or str(cfg.get("mode") or "fit") != "fit":
        return None
    return _continued(run_dir, "submitit_job_id", job, f"submitit job {job} started again: continuing its run")


def _continued(run_dir: Path, key: str, launch: str, why: str) -> Resume | None:
    """The unfinished run in ``run_dir`` that the launch whose id is ``launch`` (record field ``key``)
    started and left a ``last.ckpt``, or None; ``why`` begins the log line that says so."""
    try:
        record = read_record(run_dir)
    except Exception:  # unreadable: check_new_run_dir reports it
        return None
    if (record is None or record.get(key) != launch or record.get("status") == "finished"
            or not (run_dir / LAST).is_file()):
        return None
    log.info("%s in %s (status %s, MLflow run %s) from %s (step %s)", why, run_dir,
             record.get("status"), record.get("mlflow_run_id"), run_dir / LAST, checkpoint_step(run_dir / LAST))
    return Resume(run_dir / LAST, run_dir, record.get("mlflow_run_id"))


def _warn_of_the_shared_store() -> None:
    """torchrun with ``--max-restarts`` and its default shared rendezvous store: a restart's workers
    may read the failed attempt's addresses from it and never connect (pytorch issues #135712 and
    #167288; gloo here failed with "Connection refused" or hung in init_process_group)."""
    env = os.environ
    restarts = env.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if (restarts.isdigit() and int(restarts) > 0 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and is_rank_zero()):
        log.warning("torchrun --max-restarts=%s shares its rendezvous store with the workers, and a restart's "
                    "workers can then fail to connect (pytorch issue #135712): start torchrun with "
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment", restarts)


def restarted(cfg: DictConfig, run_dir: Path) -> Resume | None:
    """The run a torchrun restart continues: torchrun (``--max-restarts``) started every worker
    again after one failed, in ``run_dir``, the directory of the launch's first attempt
    (``distributed.launch_time``). Continued when this launch (by ``TORCHELASTIC_RUN_ID``) started
    the run there, it did not finish and it left a ``last.ckpt``; every rank reads the same record,
    so all load the same checkpoint.

    On several machines each agent names its own directory, so a restart there starts a new run, as
    it did before; ``resume=`` continues one.
    """
    attempt = torchrun_restart()
    if attempt == 0 or str(cfg.get("mode") or "fit") != "fit":
        return None
    if not on_one_node():
        if is_rank_zero():
            log.warning("torchrun started the workers again (restart %d) on several machines: this is a new run; "
                        "resume=DIR continues the one the failed attempt left", attempt)
        return None
    return _continued(run_dir, "torchrun_run_id", os.environ["TORCHELASTIC_RUN_ID"],
                      f"torchrun started the workers again (restart {attempt}): continuing the run")


def check_new_run_dir(run_dir: Path) -> None:
    """A new run does not write into a directory where another run left checkpoints or an export:
    a fixed ``hydra.run.dir`` used twice (a resubmitted job script) would mix the two runs'
    checkpoints, replace the export and rewrite the run record. A directory whose run left neither
    is reused; one with Lightning's SLURM requeue checkpoint (``hpc_ckpt_*.ckpt``) is Lightning's
    to resume; a requeued submitit job's own unfinished run is resumed before this (``requeued``).
    """
    try:
        record = read_record(run_dir)
    except Exception:  # an unreadable record: resume= reports it in full
        record = {}
    if record is None:
        return
    kept = [name for name in (str(LAST), "export") if (run_dir / name).exists()]
    if not kept or any(run_dir.glob("hpc_ckpt_*.ckpt")):
        return
    raise config_error("hydra.run.dir", f"'{run_dir}' already holds an lmlab run (status {record.get('status')}, "
                       f"MLflow run {record.get('mlflow_run_id')}, with {' and '.join(kept)}): a second run there "
                       "would mix its checkpoints with that run's and replace its export",
                       f"Continue that run with resume={run_dir} (a finished one with a higher trainer.max_steps), "
                       "or give the new run another hydra.run.dir.")


def _named(path: Path, cfg: DictConfig) -> Resume:
    if path.is_file():
        run_dir = path.parent.parent
        record = read_record(run_dir)
        if record is None:
            return Resume(path, None, None)
        _check_unfinished(run_dir, record, path, cfg)
        return Resume(path, run_dir, record.get("mlflow_run_id"))
    if path.is_dir():
        record = read_record(path)
        if record is None:
            raise config_error("resume", f"'{path}' is not an lmlab run directory (it has no {RECORD})",
                               "Give the run directory (lmlab_runs/runs/<time>_<task>_<model>) or a .ckpt file.")
        if not (path / LAST).is_file():
            raise config_error("resume", f"run directory '{path}' has no {LAST} yet: it stopped before its first "
                               "checkpoint", "Start it again without resume= (checkpoint.every_n_steps sets how "
                               "often checkpoints are written).")
        _check_unfinished(path, record, path / LAST, cfg)
        return Resume(path / LAST, path, record.get("mlflow_run_id"))
    raise config_error("resume", f"'{path}' does not exist",
                       "Give a run directory, a .ckpt file, or resume=auto for the newest unfinished run.")


def _check_unfinished(run_dir: Path, record: dict[str, Any], ckpt: Path, cfg: DictConfig) -> None:
    """A finished run resumes only to train longer: a ``trainer.max_steps`` past its checkpoint's step."""
    if record.get("status") != "finished":
        return
    reached = checkpoint_step(ckpt)
    wanted = cfg.trainer.get("max_steps")
    if reached is not None and wanted is not None and int(wanted) > reached:
        # As Hugging Face's resume_from_checkpoint with more steps: optimizer and counters carry on,
        # and the schedule is the one for the new total.
        log.info("The run in %s finished at step %d; training it on to step %d", run_dir, reached, int(wanted))
        return
    at = f" at step {reached}" if reached is not None else ""
    raise config_error("resume", f"the run in '{run_dir}' finished{at}, so there is nothing to resume",
                       f"Raise trainer.max_steps above {reached if reached is not None else 'its steps'} to train it "
                       f"longer, or start a new run from its weights with model.pretrained={run_dir}.")


def checkpoint_step(ckpt: Path) -> int | None:
    """The optimizer step a Lightning checkpoint was saved at; None when it cannot be read."""
    try:
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # a damaged file: Lightning's own load names it when the resume gets there
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def _alive(record: dict[str, Any]) -> bool:
    """Whether the process that wrote the record still runs (on this host; elsewhere we cannot tell)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


def _auto(cfg: DictConfig) -> Resume:
    """``resume=auto`` in this process: global rank 0 searches, every other rank takes its choice.

    The ranks cannot search alike: rank 0 skips runs whose process is alive (another job trains
    them), which the other ranks cannot tell apart from the run rank 0 claims for itself (its
    record takes rank 0's pid), nor at all on another host. Searching on their own, they took a
    newer live run while rank 0 resumed an older one: each rank loaded another checkpoint.
    No process group exists yet (Trainer.fit makes it), so the choice travels by what the launch
    offers. Lightning's launcher starts the other ranks from rank 0, after this, with a copy of its
    environment: ``CHOICE_ENV``, valid only in rank 0's own children (by pid), so a value left in
    the environment by another process is ignored. torchrun and srun start every rank at once:
    the others wait for rank 0's claim in the run record, named by the launch's id (``_claimed``).
    """
    if is_rank_zero():
        return _newest_unfinished(cfg)
    pid, _, chosen = os.environ.get(CHOICE_ENV, "").partition(" ")
    if chosen and pid == str(os.getppid()):
        run_dir = Path(chosen)
        record = read_record(run_dir)
        if record is None or not (run_dir / LAST).is_file():
            raise file_error(run_dir / LAST, "is gone: global rank 0 chose this run to resume",
                             "Start again; a run directory must not be moved or deleted while it resumes.")
        return Resume(run_dir / LAST, run_dir, record.get("mlflow_run_id"))
    launch = launch_id()
    if launch is not None:
        return _claimed(cfg, launch)
    log.warning("resume=auto: this launcher gives the processes no shared id, so rank %s searches on its own "
                "and may resume another run than rank 0 if runs change meanwhile; resume=DIR names one run "
                "for every rank", os.environ.get("RANK") or os.environ.get("LOCAL_RANK"))
    return _newest_unfinished(cfg)


def _check_found(cfg: DictConfig, found: Resume) -> None:
    checkpointing.check_readable(found.checkpoint)
    if found.run_dir is not None:
        _check_same_config(cfg, found.run_dir)
        _remove_staged(found.run_dir)


def _failure_path(cfg: DictConfig, launch: str) -> Path:
    name = fingerprint.of_params(launch=launch)[:20]
    return Path(str(cfg.paths.root)).absolute() / "resume_auto_failed" / f"{name}.json"


@contextmanager
def _failure_told(cfg: DictConfig) -> Iterator[None]:
    """Global rank 0 of a torchrun/srun launch writes why ``resume=auto`` failed for the ranks waiting
    for its claim (``_claimed``). torchrun stops them when rank 0 exits, srun only with
    ``--kill-on-bad-exit``: without it they waited ``CLAIM_WAIT_S`` (30 min) for a claim never made."""
    launch = launch_id() if is_rank_zero() else None
    try:
        yield
    except Exception as exc:
        if launch is not None:
            try:
                atomic.write_json(_failure_path(cfg, launch), {"launch": launch, "at": _now(), "error": str(exc)})
            except OSError as write_error:  # the first error is the one to report
                log.warning("Could not tell the other ranks that resume=auto failed: %s", write_error)
        raise


def _failure_of(cfg: DictConfig, launch: str, oldest: dt.datetime) -> str | None:
    """What global rank 0 of this launch wrote when ``resume=auto`` failed there (``_failure_told``)."""
    try:
        told = json.loads(_failure_path(cfg, launch).read_text(encoding="utf-8"))
        if told.get("launch") == launch and dt.datetime.fromisoformat(told["at"]) >= oldest:
            return str(told["error"])
    except Exception:  # none yet, being written, or another launch's
        pass
    return None


def _hand_on(run_dir: Path) -> None:
    """Global rank 0 tells the other ranks which run ``resume=auto`` chose (``_auto``)."""
    os.environ[CHOICE_ENV] = f"{os.getpid()} {run_dir}"
    launch = launch_id()
    if launch is None:  # one process, or Lightning's launcher: the environment is enough
        return
    record = read_record(run_dir) or {}
    record["claim"] = {"launch": launch, "at": _now()}
    atomic.write_json(run_dir / RECORD, record)


def _claimed(cfg: DictConfig, launch: str) -> Resume:
    """The run global rank 0 of this torchrun/srun launch claimed for ``resume=auto``, waited for."""
    root = Path(str(cfg.paths.root)).absolute() / "runs"
    oldest = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=CLAIM_MAX_AGE_S)
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        for run_dir in sorted(root.glob("*")) if root.is_dir() else []:
            try:
                record = read_record(run_dir) or {}
                claim = record.get("claim") or {}
                fresh = claim.get("launch") == launch and dt.datetime.fromisoformat(claim["at"]) >= oldest
            except Exception:  # damaged, or not a claim this launch could have written
                continue
            if fresh and (run_dir / LAST).is_file():
                log.info("resume=auto: global rank 0 chose %s", run_dir)
                return Resume(run_dir / LAST, run_dir, record.get("mlflow_run_id"))
        failure = _failure_of(cfg, launch, oldest)
        if failure is not None:
            raise config_error("resume", f"global rank 0 of launch {launch} stopped resume=auto: {failure}",
                               "Fix what it says, or name the run for every rank: resume=DIR.")
        if time.monotonic() >= deadline:
            raise config_error("resume", f"global rank 0 named no run for resume=auto within "
                               f"{CLAIM_WAIT_S:.0f} s (no {RECORD} under {root} claimed by launch {launch})",
                               "Read global rank 0's log for what stopped it, or name the run for every rank: "
                               "resume=DIR.")
        time.sleep(0.5)


def _newest_unfinished(cfg: DictConfig) -> Resume:
    root = Path(str(cfg.paths.root)).absolute() / "runs"
    task, model = str(cfg.task.name), str(cfg.model.name)
    candidates: list[tuple[str, Path, dict[str, Any]]] = []
    for run_dir in sorted(root.glob("*")) if root.is_dir() else []:
        try:
            record = read_record(run_dir)
        except Exception as exc:  # one damaged directory must not hide the others
            log.warning("Skipping %s: %s", run_dir, exc)
            continue
        if (record is None or record.get("task") != task or record.get("model") != model
                or record.get("status") == "finished" or not (run_dir / LAST).is_file()):
            continue
        # Only rank 0 searches but under an unknown launcher (``_auto``), whose ranks are meant to look
        # after rank 0 has claimed the run: its pid is theirs.
        if is_rank_zero() and _alive(record):
            log.info("Not resuming %s: process %s is still running it", run_dir, record.get("pid"))
            continue
        candidates.append((str(record.get("started", "")), run_dir, record))
    if not candidates:
        raise config_error("resume", f"resume=auto found no unfinished task={task} model={model} run with a "
                           f"checkpoint under {root}", "Start a new run without resume=, or name the run "
                           "directory: resume=DIR.")
    _, run_dir, record = max(candidates, key=lambda c: (c[0], c[1].name))
    return Resume(run_dir / LAST, run_dir, record.get("mlflow_run_id"))


def _remove_staged(run_dir: Path) -> None:
    """Delete what writes killed midway left in ``run_dir``: nothing reads it, and it never goes away.

    ``atomic.atomic_dir`` stages the export in ``.export.tmp-HOST-PID-XXXXXXXX/`` (and keeps the previous
    one as ``.export.old-HOST-PID-XXXXXXXX/`` between its two renames); ``atomic.atomic_file`` stages checkpoints as
    ``NAME.tmp``. Nothing is removed while the process that last ran the directory is alive.
    """
    record = read_record(run_dir)
    # Other DDP ranks leave it to rank 0; resume=DIR does not refuse a live run, whose export may be under way.
    if not is_rank_zero() or (record is not None and _alive(record)):
        return
    for path in [*run_dir.glob(".export.*"), *(run_dir / "checkpoints").glob("*.tmp")]:
        log.info("Removing %s, left by a process killed while writing it", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _telling_first(key: str) -> tuple[int, str]:
    # Of many differences, the ones that say "another experiment" come first in the message.
    for rank, prefix in enumerate(("task.name", "model.name", "data.", "task.", "model.")):
        if key.startswith(prefix):
            return rank, key
    return 5, key


def _check_same_config(cfg: DictConfig, run_dir: Path) -> None:
    saved = run_dir / "config_resolved.yaml"
    if not saved.is_file():
        return
    try:
        before = tracking.flatten(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except (OSError, yaml.YAMLError) as exc:
        raise file_error(saved, f"cannot be read ({exc})", "Restore it from the MLflow run's config/ artifact") from exc
    now = tracking.flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(
        (key for key in set(before) | set(now)
         if before.get(key) != now.get(key) and not any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)
         # a key a newer lmlab added with an unset value changes nothing the run did
         and not (key not in before and now.get(key) in (None, "None"))),
        key=_telling_first,
    )
    if changed:
        shown = "; ".join(f"{k}: {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise config_error("resume", f"the run in '{run_dir}' was made with other settings ({shown}{more})",
                           f"Resume with the overrides the run started with (its config: {saved}), or start a "
                           "new run without resume=.")


def run_dir(resuming: Resume | None) -> Path | None:
    return resuming.run_dir if resuming is not None else None


def checkpoint(resuming: Resume | None) -> str | None:
    return str(resuming.checkpoint) if resuming is not None else None


def open_run(cfg: DictConfig, resuming: Resume | None, tags: dict[str, str], output_dir: Path,
             rank_zero: bool) -> RunLog:
    """The MLflow run to log to: the resumed run reopened, or a new one; the run record follows."""
    if resuming is not None and resuming.run_id and rank_zero:
        client = tracking.open_client(tracking.tracking_uri(cfg))
        try:
            run = client.get_run(resuming.run_id)
        except Exception as exc:
            raise config_error("resume", f"the MLflow run {resuming.run_id} of '{resuming.run_dir}' is not in "
                               f"{tracking.tracking_uri(cfg)}", "Point logger.tracking_uri at the store the run "
                               "used, or resume from the checkpoint file into a new run.") from exc
        client.update_run(resuming.run_id, status="RUNNING")
        mlrun = RunLog(client, resuming.run_id, last_logged_steps(client, run))
        if mlrun.logged_through:
            log.info("MLflow holds this run's metrics up to step %d: steps it holds are not logged again",
                     max(mlrun.logged_through.values()))
    else:
        mlrun = RunLog.open(cfg, tags, rank_zero)
    mlrun.set_up_writes(tracking.tracking_uri(cfg), output_dir)
    if resuming is not None and mlrun.client is not None:
        mlrun.client.set_tag(mlrun.run_id, "lmlab.resumed_from", str(resuming.checkpoint))
    if rank_zero:
        _write_record(cfg, output_dir, mlrun.run_id, resuming)
    return mlrun


def _write_record(cfg: DictConfig, output_dir: Path, run_id: str, resuming: Resume | None) -> None:
    record = read_record(output_dir) if resuming is not None else None
    if record is None:
        record = {"mlflow_run_id": run_id, "tracking_uri": tracking.tracking_uri(cfg), "task": str(cfg.task.name),
                  "model": str(cfg.model.name), "started": _now(), "resumes": []}
    if resuming is not None:
        record.setdefault("resumes", []).append({"at": _now(), "checkpoint": str(resuming.checkpoint)})
    # A record without a run id (lost store) continues in the new MLflow run opened for it.
    record.update(mlflow_run_id=run_id or record.get("mlflow_run_id"), status="running", pid=os.getpid(),
                  host=socket.gethostname(), updated=_now())
    job = submitit_job_id()
    if job is not None:  # a requeue of this job continues the run (``requeued``)
        record["submitit_job_id"] = job
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # so does a torchrun restart of this launch (``restarted``)
        record["torchrun_run_id"] = os.environ["TORCHELASTIC_RUN_ID"]
    atomic.write_json(output_dir / RECORD, record)


def close(output_dir: Path, status: str) -> None:
    """Record how the run ended (MLflow's status, lower case) in its run record."""
    if not is_rank_zero():
        return
    try:
        record = read_record(output_dir)
        if record is not None:
            record.update(status=status.lower(), updated=_now())
            atomic.write_json(output_dir / RECORD, record)
    except Exception as exc:  # called from a finally block: never hide the error that ended the run
        log.warning("Could not update %s: %s", output_dir / RECORD, exc)


@dataclass
class Ending:
    """What ``ending`` needs to know of the run so far: which message a SIGTERM gets (``stage``,
    see ``faults.preempted_outside_training``) and the SIGTERM handler, for handing the signal to
    Lightning's ``Preemption`` during ``fit``."""

    stage: str
    sigterm: faults.SigtermOutsideTraining = field(default_factory=faults.SigtermOutsideTraining)
    status: str = "FAILED"


@contextmanager
def ending(mlrun: RunLog, output_dir: Path, stage: str, record: bool = True) -> Iterator[Ending]:
    """The body of a run whose MLflow run is open: it ends FINISHED, FAILED, or KILLED on a signal,
    never left RUNNING. From here on a SIGTERM (or, in a submitit job, submitit's preemption signal)
    raises at once (``SigtermOutsideTraining``) and ends the run KILLED with a message saying how to
    finish; ending the run is not cut short by a second one. ``record``: the run directory has a run
    record (``lmlab_run.json``) to close too."""
    end = Ending(stage)
    try:
        end.sigterm.start()
        yield end
        end.status = "FINISHED"
    except faults.Preempted:
        end.status = "KILLED"  # a stop during fit: last.ckpt holds its state, resume=auto continues it
        raise
    except KeyboardInterrupt:  # Ctrl-C outside fit (the final test, the export): stopped, not failed
        end.status = "KILLED"
        raise
    except SIGTERMException as exc:  # a SystemExit without a code: it would exit 0 as if all went well
        end.status = "KILLED"
        signum = end.sigterm.signum
        raise faults.preempted_outside_training(end.stage, output_dir, signum,
                                                requeue=signum == end.sigterm.submitit_signum) from exc
    finally:
        with end.sigterm.closing():
            mlrun.terminate(end.status)
            if record:
                close(output_dir, end.status)
