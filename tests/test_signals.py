"""Signals to a real ``lmlab`` process (README: Preemption): where it stops, what it keeps, what the
run record and MLflow say, and its exit status.

During training a signal stops the run at the next step boundary with last.ckpt saved there, and
adds no validation of its own. After training (final validation, export, test) and in the modes
that do not train, SIGTERM ends the run KILLED with exit status 2 too, and MLflow does not call a
run FINISHED before all of that is done.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import SHARED_DATA, TINY, WIKI, compose_cfg, lmlab_command

pytestmark = pytest.mark.slow

TIMEOUT = 600
ROTTEN = SHARED_DATA / "classification" / "rotten_tomatoes"
LM = [*TINY, "data.max_documents=40", "trainer.max_steps=20", "checkpoint.every_n_steps=3",
      "trainer.log_every_n_steps=1"]


@dataclass
class Home:
    """One LMLAB_HOME for real ``lmlab`` processes; the homes of this module share one cache."""

    root: Path
    cache: Path

    def start(self, *args: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
        env.update(LMLAB_HOME=str(self.root), LMLAB_CACHE_DIR=str(self.cache), PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.root.mkdir(parents=True, exist_ok=True)
        # Ctrl-C's default disposition even where this test runs with SIGINT ignored (a background job).
        return subprocess.Popen([*lmlab_command(), *args], cwd=self.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def run(self, *args: str) -> tuple[int, str, str]:
        proc = self.start(*args)
        out, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out, err

    def run_dirs(self) -> list[Path]:
        runs = self.root / "runs"
        return sorted(p for p in runs.iterdir() if (p / "lmlab_run.json").exists()) if runs.is_dir() else []

    def record(self) -> dict[str, Any]:
        (run_dir,) = self.run_dirs()
        return json.loads((run_dir / "lmlab_run.json").read_text())

    def query(self, sql: str, *args: Any) -> list[tuple]:
        with sqlite3.connect(self.root / "mlflow.db", timeout=30) as con:
            return list(con.execute(sql, args))

    def runs(self) -> list[tuple[str, str]]:
        return self.query("SELECT run_uuid, status FROM runs")

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.query("SELECT step, value FROM metrics WHERE run_uuid=? AND key=? ORDER BY step", run_id, key)

    def metric_keys(self, run_id: str) -> set[str]:
        return {key for (key,) in self.query("SELECT DISTINCT key FROM metrics WHERE run_uuid=?", run_id)}


def checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # not there yet
        return None


def wait_for_checkpoint(home: Home, proc: subprocess.Popen, at_least: int) -> Path:
    """Poll last.ckpt (written atomically) until it is from step >= at_least; returns the run directory."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for run_dir in home.run_dirs():
            step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
            if step is not None and step >= at_least:
                return run_dir
        if proc.poll() is not None:
            raise AssertionError(f"lmlab ended (rc {proc.returncode}) before a step-{at_least} checkpoint\n"
                                 f"{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def error_message(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    return err[err.index("lmlab: error:"):]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("signals")


@pytest.fixture(scope="module")
def wiki(workspace: Path) -> str:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    path = workspace / "wiki.txt"
    path.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:600]) + "\n", encoding="utf-8")
    return f"data.path={path}"


@pytest.fixture(scope="module")
def rotten(workspace: Path) -> str:
    """A few hundred Rotten Tomatoes snippets with a test split: a run that validates, exports and tests."""
    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    folder = workspace / "rotten"
    folder.mkdir()
    for split, rows in {"train": 300, "validation": 60, "test": 60}.items():
        lines = (ROTTEN / f"{split}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / f"{split}.csv").write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return f"data.path={folder}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C
def test_a_signal_during_training_stops_without_a_validation_of_its_own(workspace: Path, wiki: str,
                                                                        signum: signal.Signals) -> None:
    # The only validation due is after step 20, the last: wherever the signal lands, the step it
    # stops after has none (Lightning validates before it honours trainer.should_stop, so stopping
    # with that would add one). One validation batch: Lightning cuts none short on SIGTERM then.
    home = Home(workspace / f"train_{signum.name.lower()}", workspace / "cache")
    proc = home.start(*LM, wiki, "trainer.val_check_interval=20", "trainer.limit_val_batches=1")
    run_dir = wait_for_checkpoint(home, proc, 3)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    message = error_message(err)
    assert f"stopped by {signum.name} after step" in message and f"resume={run_dir}" in message, message
    stopped = int(message.split("after step ")[1].split(";")[0])
    assert 3 <= stopped < 20
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]  # no best-step=N.ckpt
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == stopped
    ((run_id, status),) = home.runs()
    assert status == "KILLED" and home.record()["status"] == "killed"
    assert not {key for key in home.metric_keys(run_id) if key.startswith("val/")}
    # The step it stopped after logged its metrics (Lightning's step numbers count from 0): a
    # resumed run continues after that step and does not log it again.
    assert [step for step, _ in home.history(run_id, "train/loss")] == list(range(stopped))


def stop_in_export(home: Home, proc: subprocess.Popen) -> Path | None:
    """SIGSTOP ``proc`` while it writes its export (a ``.export.*`` folder exists), after training
    and outside any Lightning trainer call; the run directory, or None where it was missed."""
    run_dir = wait_for_checkpoint(home, proc, 10)  # the debug preset's last step: training is ending
    while proc.poll() is None:
        if any(name.startswith(".export.") for name in os.listdir(run_dir)):
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.2)  # the stop takes effect at once; the folder may have been renamed just before
            if any(name.startswith(".export.") for name in os.listdir(run_dir)):
                return run_dir
            proc.send_signal(signal.SIGCONT)
            return None
        if (run_dir / "export").exists():
            return None
        time.sleep(0.0005)
    return None


def test_sigterm_during_the_export_after_training_ends_killed_with_exit_2(workspace: Path, rotten: str) -> None:
    args = [*TINY, "task=classification", rotten]
    for attempt in range(3):  # the export of a tiny model takes milliseconds: catching it may miss
        home = Home(workspace / f"export_{attempt}", workspace / "cache")
        proc = home.start(*args)
        run_dir = stop_in_export(home, proc)
        if run_dir is not None:
            break
        proc.communicate(timeout=TIMEOUT)
    else:
        pytest.fail("the export was never caught while it was written")
    ((run_id, while_exporting),) = home.runs()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    message = error_message(err)
    assert "stopped by SIGTERM after training had finished" in message and f"resume={run_dir}" in message, message
    assert home.record()["status"] == "killed"
    assert home.runs() == [(run_id, "KILLED")]
    assert not (run_dir / "export").exists() and not list(run_dir.glob(".export.*"))
    assert not {key for key in home.metric_keys(run_id) if key.startswith("test/")}
    # Lightning's MLFlowLogger would have ended the run FINISHED as soon as fit returned.
    assert while_exporting == "RUNNING"

    rc, out, err = home.run(*args, f"resume={run_dir}")  # what the message says to do
    assert rc == 0, err[-3000:]
    assert home.runs() == [(run_id, "FINISHED")] and home.record()["status"] == "finished"
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert {"test/accuracy", "test/loss"} <= home.metric_keys(run_id)


class SigtermAfterTheLastTestBatch(L.Callback):
    """Sends this process SIGTERM once the test loop has run its last batch."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_mode_test_ends_killed(workspace: Path, rotten: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning notes a SIGTERM in a trainer call but acts on it only at the end of a batch that is
    # not the last: on its own, the signal would be lost and the run end FINISHED, with status 0.
    from lmlab import checkpointing
    from lmlab.faults import Preempted
    from lmlab.train import run

    root = workspace / "mode_test"
    monkeypatch.setenv("LMLAB_HOME", str(root))
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(workspace / "cache"))
    trained = run(compose_cfg([*TINY, "task=classification", rotten, "trainer.max_steps=2"]))
    real = checkpointing.callbacks
    monkeypatch.setattr(checkpointing, "callbacks",
                        lambda cfg, last: [*real(cfg, last), SigtermAfterTheLastTestBatch()])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped by SIGTERM before mode=test had finished"):
        run(compose_cfg([*TINY, "task=classification", rotten, "mode=test", f"model.pretrained={trained.output_dir}"]))
    assert signal.getsignal(signal.SIGTERM) is before  # put back as the run found it
    home = Home(root, workspace / "cache")
    tested = [run_dir for run_dir in home.run_dirs() if run_dir != trained.output_dir]
    assert [json.loads((d / "lmlab_run.json").read_text())["status"] for d in tested] == ["killed"]
    assert sorted(status for _, status in home.runs()) == ["FINISHED", "KILLED"]


def test_sigterm_between_the_open_run_and_training_ends_killed(workspace: Path, rotten: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The MLflow run is open, the Trainer being built: the default handler would end the process
    # with no message and leave the run RUNNING for good (no last.ckpt to resume from).
    import lmlab.train as train
    from lmlab.faults import Preempted

    root = workspace / "before_fit"
    monkeypatch.setenv("LMLAB_HOME", str(root))
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(workspace / "cache"))
    real = train.build_trainer

    def build_trainer(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "build_trainer", build_trainer)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="stopped by SIGTERM before training started"):
        train.run(compose_cfg([*TINY, "task=classification", rotten, "trainer.max_steps=2"]))
    assert signal.getsignal(signal.SIGTERM) is before
    home = Home(root, workspace / "cache")
    (run_dir,) = home.run_dirs()
    assert json.loads((run_dir / "lmlab_run.json").read_text())["status"] == "killed"
    assert [status for _, status in home.runs()] == ["KILLED"]


def test_ctrl_c_outside_training_ends_the_run_killed_not_failed(tmp_path: Path) -> None:
    """A KeyboardInterrupt through the run's body (Ctrl-C during the final test or the export) ended
    the MLflow run FAILED, as an error would."""
    from types import SimpleNamespace

    from lmlab import resume

    closed: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        with resume.ending(SimpleNamespace(terminate=closed.append), tmp_path, "test", record=False):
            raise KeyboardInterrupt
    with pytest.raises(ValueError):
        with resume.ending(SimpleNamespace(terminate=closed.append), tmp_path, "test", record=False):
            raise ValueError("an error")
    assert closed == ["KILLED", "FAILED"]
