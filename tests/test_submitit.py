"""submitit jobs (``hydra/launcher=slurm``, here its local twin ``submitit_local``) near their time
limit or preempted (README: Preemption): submitit's signal stops training at the next step boundary
with last.ckpt saved there, the MLflow run ends KILLED, submitit requeues the job, and the job's next
start continues the same run from last.ckpt.

The end-to-end test is a real ``lmlab -m`` sweep whose one job runs under submitit's LocalExecutor;
the signal is sent to the job's process as submitit's local controller forwards it near the time
limit. The rest checks the rules directly: which run a requeued job continues, the hand-over to
submitit's handler, and that every DDP rank hands over when one rank got the signal.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from submitit.core import job_environment, utils
from submitit.local.local import LocalJobEnvironment

from conftest import WIKI, compose_cfg, lmlab_command
from lmlab import faults, resume
from lmlab.errors import LmlabError

TIMEOUT = 600
STEPS = 80


# -- end to end -----------------------------------------------------------------------------------
def _train_losses(db: Path) -> list[tuple[str, int]]:
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return list(con.execute("SELECT run_uuid, step FROM metrics WHERE key='train/loss' ORDER BY step"))
    except sqlite3.Error:  # the store is being created
        return []


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


@pytest.mark.slow
def test_a_submitit_job_stopped_by_its_signal_saves_is_requeued_and_finishes_the_same_run(tmp_path: Path) -> None:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    data = tmp_path / "wiki.txt"
    data.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    home, sweep_dir = tmp_path / "home", tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # No last.ckpt before the signal: none every N steps, and the only validation is at the end.
    proc = subprocess.Popen(
        [*lmlab_command(), "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}",
         "+experiment=debug", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         f"data.path={data}", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}",
         "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=0", "export=false"],
        cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = sweep_dir / "0"
    try:
        # Once training is under way (its first losses are in MLflow), the signal goes to the job's
        # process, as submitit's local controller sends it signal_delay_s before the time limit.
        deadline = time.monotonic() + TIMEOUT
        while not _train_losses(home / "mlflow.db"):
            assert proc.poll() is None, proc.communicate()[0][-5000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        first = json.loads((run_dir / "lmlab_run.json").read_text())
        os.kill(first["pid"], LocalJobEnvironment._usr_sig())
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-5000:]

    log = "".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_0_log.*")))
    name = signal.Signals(LocalJobEnvironment._usr_sig()).name
    stopped = f"lmlab: stopped by {name} after step "
    assert stopped in log, log[-5000:]
    step = int(log.split(stopped)[1].split(";")[0])
    assert 0 < step < STEPS, "the signal came during training"
    assert f"its state is saved in {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert "submitit requeues the job" in log and "Requeued job" in log  # submitit's own line
    # The job's second start continued from the checkpoint saved at the signal.
    assert f"from {run_dir / 'checkpoints' / 'last.ckpt'} (step {step})" in log, log[-5000:]
    assert "Traceback" not in log, log[-5000:]

    record = json.loads((run_dir / "lmlab_run.json").read_text())
    assert record["status"] == "finished" and record["mlflow_run_id"] == first["mlflow_run_id"]
    assert record["submitit_job_id"] == first["submitit_job_id"]
    assert [r["checkpoint"] for r in record["resumes"]] == [str(run_dir / "checkpoints" / "last.ckpt")]
    assert record["pid"] != first["pid"]
    assert _checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == STEPS

    with sqlite3.connect(home / "mlflow.db") as con:
        runs = dict(con.execute("SELECT run_uuid, status FROM runs"))
        tags = dict(con.execute("SELECT key, value FROM tags WHERE run_uuid=?", (record["mlflow_run_id"],)))
    assert len(runs) == 2 and set(runs.values()) == {"FINISHED"}  # the sweep's parent and its one job
    assert runs[record["mlflow_run_id"]] == "FINISHED"
    assert tags["lmlab.resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    losses = _train_losses(home / "mlflow.db")
    assert {run for run, _ in losses} == {record["mlflow_run_id"]}
    assert [s for _, s in losses] == list(range(STEPS)), "every step once: none lost, none done twice"
    job = json.loads((sweep_dir / "lmlab_jobs" / "0.json").read_text())
    assert job["status"] == "COMPLETED" and job["run_id"] == record["mlflow_run_id"]


# -- which run a requeued job continues -----------------------------------------------------------
def _submitit_env(monkeypatch: pytest.MonkeyPatch, job_id: str) -> None:
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", job_id)


def _run_dir(tmp_path: Path, job_id: str | None, status: str, ckpt: bool = True) -> Path:
    run_dir = tmp_path / "sweep" / "0"
    (run_dir / "checkpoints").mkdir(parents=True)
    record: dict[str, Any] = {"mlflow_run_id": "abc", "status": status, "task": "clm", "model": "gpt2"}
    if job_id is not None:
        record["submitit_job_id"] = job_id
    (run_dir / resume.RECORD).write_text(json.dumps(record))
    if ckpt:
        torch.save({"global_step": 7}, run_dir / resume.LAST)
    return run_dir


@pytest.mark.parametrize("status", ["killed", "running", "failed"])
def test_a_requeued_submitit_job_continues_its_own_unfinished_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  status: str) -> None:
    _submitit_env(monkeypatch, "4242")
    run_dir = _run_dir(tmp_path, "4242", status)
    cfg = compose_cfg(["+experiment=debug"])
    found = resume.prepare(cfg, run_dir)
    assert found == resume.Resume(run_dir / resume.LAST, run_dir, "abc")
    resume.check_new_run_dir(tmp_path)  # nothing else changes: a directory without a run is new


@pytest.mark.parametrize("case", ["another job", "not submitit", "finished", "no checkpoint", "no job id", "mode"])
def test_a_submitit_job_does_not_continue_a_run_that_is_not_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    case: str) -> None:
    if case != "not submitit":
        _submitit_env(monkeypatch, "4243" if case == "another job" else "4242")
    else:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    status = "finished" if case == "finished" else "killed"
    run_dir = _run_dir(tmp_path, None if case == "no job id" else "4242", status, ckpt=case != "no checkpoint")
    cfg = compose_cfg(["+experiment=debug", *(["mode=test", "model.pretrained=x"] if case == "mode" else [])])
    assert resume.requeued(cfg, run_dir) is None
    if case in ("another job", "not submitit", "finished", "no job id"):
        with pytest.raises(LmlabError, match="already holds an lmlab run"):  # refused as before
            resume.check_new_run_dir(run_dir)


def test_the_run_record_names_the_submitit_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _submitit_env(monkeypatch, "4242")
    cfg = compose_cfg(["+experiment=debug"])
    resume._write_record(cfg, tmp_path, "abc", None)
    assert resume.read_record(tmp_path)["submitit_job_id"] == "4242"
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    (tmp_path / "other").mkdir()
    resume._write_record(cfg, tmp_path / "other", "abc", None)
    assert "submitit_job_id" not in resume.read_record(tmp_path / "other")


# -- the hand-over to submitit's handler ----------------------------------------------------------
class FakeSignalHandler(job_environment.SignalHandler):
    """submitit's handler with its requeue replaced by what the test says: exit 144 as the local
    executor's requeue does, refuse as after too many time-outs, or return as on a rank other than 0."""

    def __init__(self, outcome: str) -> None:  # no job paths or pickled call needed
        self.outcome = outcome
        self.calls: list[int] = []

    def checkpoint_and_try_requeue(self, signum: int, frame: Any = None) -> None:
        self.calls.append(signum)
        if self.outcome == "requeue":
            raise SystemExit(144)
        if self.outcome == "refuse":
            raise utils.UncompletedJobError("Job not requeued because: timed-out too many times.")


@pytest.fixture
def submitit_handler(monkeypatch: pytest.MonkeyPatch):
    """Install a FakeSignalHandler for submitit's preemption signal, as submitit's job runner would."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    signum = job_environment.JobEnvironment._usr_sig()
    before = signal.getsignal(signum)

    def install(outcome: str) -> FakeSignalHandler:
        handler = FakeSignalHandler(outcome)
        signal.signal(signum, handler.checkpoint_and_try_requeue)
        return handler

    yield install
    signal.signal(signum, before)


def test_submitit_preemption_is_found_only_where_submitit_installed_it(submitit_handler,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    signum = job_environment.JobEnvironment._usr_sig()
    assert faults.submitit_preemption() is None  # the signal's handler is not submitit's
    handler = submitit_handler("requeue")
    assert faults.submitit_preemption() == (signum, handler.checkpoint_and_try_requeue)
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert faults.submitit_preemption() is None


@pytest.mark.parametrize("outcome", ["requeue", "refuse", "other rank"])
def test_a_stop_by_submitits_signal_is_handed_to_submitit(submitit_handler, outcome: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    signum = job_environment.JobEnvironment._usr_sig()
    handler = submitit_handler(outcome)
    faults.requeue(faults.Preempted("stopped by SIGTERM after step 3", signal.SIGTERM))  # not submitit's: kept
    faults.requeue(faults.Preempted("stopped", signum))  # not marked for submitit (not in a submitit job)
    assert handler.calls == []
    exc = faults.Preempted("stopped ... resume=DIR", signum, requeue=True, stopped="stopped after step 3")
    if outcome == "refuse":
        faults.requeue(exc)  # returns: the caller reports the stop as any other
        assert "submitit did not requeue the job" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as exit_:
            faults.requeue(exc)
        assert exit_.value.code == (144 if outcome == "requeue" else -1)
        assert "lmlab: stopped after step 3. " in capsys.readouterr().err
    assert handler.calls == [signum]


def test_preemption_takes_submitits_signal_for_fit_and_gives_it_back(submitit_handler) -> None:
    signum = job_environment.JobEnvironment._usr_sig()
    handler = submitit_handler("requeue")
    guard = faults.Preemption(SimpleNamespace())
    guard.setup(None, None, TrainerFn.VALIDATING)
    assert signal.getsignal(signum) == handler.checkpoint_and_try_requeue
    guard.setup(None, None, TrainerFn.FITTING)
    assert signal.getsignal(signum) == guard._note and guard.requeue_signum == signum
    os.kill(os.getpid(), signum)  # noted, not acted on: training stops at the step boundary
    assert guard.signum == signum and handler.calls == []
    guard.restore_signals()
    assert signal.getsignal(signum) == handler.checkpoint_and_try_requeue


def test_every_rank_hands_over_when_one_got_submitits_signal(submitit_handler) -> None:
    # This rank got nothing; another rank's submitit signal makes both reductions true.
    signum = job_environment.JobEnvironment._usr_sig()
    submitit_handler("requeue")
    saved: list[int] = []
    last = SimpleNamespace(save_now=lambda trainer: saved.append(trainer.global_step), path=Path("r/checkpoints/l"))
    guard = faults.Preemption(last)
    guard.setup(None, None, TrainerFn.FITTING)
    decisions: list[bool] = []

    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
        decisions.append(decision)
        return True  # another rank said yes

    trainer = SimpleNamespace(received_sigterm=False, global_step=5, state=SimpleNamespace(fn=TrainerFn.FITTING),
                              strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision))
    try:
        guard.on_train_batch_end(trainer, None, None, None, 4)
    finally:
        guard.restore_signals()
    assert decisions == [False, False] and saved == [5] and guard.stopped_after == 5
    assert guard.signum == signum
    exc = faults._preempted(guard, guard.signum)
    assert exc.requeue and exc.signum == signum and "after step 5" in exc.stopped


def test_submitits_signal_outside_training_ends_the_run_killed_and_hands_over(submitit_handler, tmp_path: Path) -> None:
    signum = job_environment.JobEnvironment._usr_sig()
    handler = submitit_handler("requeue")
    closed: list[str] = []
    mlrun = SimpleNamespace(terminate=closed.append)
    with pytest.raises(faults.Preempted) as caught:
        with resume.ending(mlrun, tmp_path, "fit", record=False):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises before this ends
    assert closed == ["KILLED"] and handler.calls == []
    assert signal.getsignal(signum) == handler.checkpoint_and_try_requeue  # given back when the run closed
    exc = caught.value
    assert exc.requeue and exc.signum == signum and "after training had finished" in exc.stopped
    with pytest.raises(SystemExit):
        faults.requeue(exc)
    assert handler.calls == [signum]


def test_the_slurm_preset_requeues_at_the_time_limit() -> None:
    from test_sweeps import compose_hydra

    launcher = compose_hydra(["hydra/launcher=slurm"]).hydra.launcher
    # hydra-submitit-launcher's own max_num_timeout (0) would end a job at its first time limit.
    assert launcher.max_num_timeout == 10 and launcher.signal_delay_s == 300
