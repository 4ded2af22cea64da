"""Exact resume: a real ``lmlab`` process killed (SIGKILL) or preempted (SIGTERM) mid-training, then
continued with ``resume=auto``, ends with the same weights and metrics as a run never interrupted.

The runs cross epoch boundaries (40 documents: 6 batches an epoch, 20 steps), validate every 5 and
checkpoint every 3 steps, and run with one thread each so that the CPU arithmetic is reproducible.
The kill lands wherever the process is once a checkpoint of the chosen step is seen; the in-process
tests below place the interruption exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
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
import yaml

from conftest import TINY, WIKI, in_process_starter, lmlab_command

pytestmark = pytest.mark.slow

TIMEOUT = 600
STEPS = 20
ARGS = [*TINY, "data.max_documents=40", f"trainer.max_steps={STEPS}", "checkpoint.every_n_steps=3",
        "trainer.log_every_n_steps=1"]


@dataclass
class Home:
    """One LMLAB_HOME; every home of a test module shares the tokenizer/data cache."""

    root: Path
    cache: Path

    def start(self, *extra: str) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
        env.update(LMLAB_HOME=str(self.root), LMLAB_CACHE_DIR=str(self.cache), PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.root.mkdir(parents=True, exist_ok=True)
        # Ctrl-C's default disposition even where this test runs with SIGINT ignored (a background job).
        return subprocess.Popen([*lmlab_command(), *ARGS, *extra], cwd=self.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def run(self, *extra: str) -> tuple[int, str, str]:
        proc = self.start(*extra)
        out, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out, err

    def run_dirs(self) -> list[Path]:
        runs = self.root / "runs"
        return sorted(p for p in runs.iterdir() if (p / "lmlab_run.json").exists()) if runs.is_dir() else []

    def record(self) -> dict:
        (run_dir,) = self.run_dirs()
        return json.loads((run_dir / "lmlab_run.json").read_text())

    def runs(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.root / "mlflow.db") as con:
            return list(con.execute("SELECT run_uuid, status FROM runs"))

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        with sqlite3.connect(self.root / "mlflow.db") as con:
            return list(con.execute("SELECT step, value FROM metrics WHERE run_uuid=? AND key=? "
                                    "ORDER BY timestamp, step", (run_id, key)))

    def latest(self, run_id: str) -> dict[str, float]:
        with sqlite3.connect(self.root / "mlflow.db") as con:
            return dict(con.execute("SELECT key, value FROM latest_metrics WHERE run_uuid=?", (run_id,)))


def checkpoint_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # not there yet
        return None


def wait_for_checkpoint(home: Home, proc: subprocess.Popen, at_least: int) -> int:
    """Poll last.ckpt (written atomically, so always whole) until it is from step >= at_least."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for run_dir in home.run_dirs():
            step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
            if step is not None and step >= at_least:
                return step
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"lmlab ended (rc {proc.returncode}) before a step-{at_least} checkpoint\n"
                                 f"{err[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    root = tmp_path_factory.mktemp("resume")
    lines = WIKI.read_text(encoding="utf-8").splitlines()[:600]
    (root / "wiki.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def home(workspace: Path, name: str) -> Home:
    return Home(workspace / name, workspace / "cache")


def data(workspace: Path) -> str:
    return f"data.path={workspace / 'wiki.txt'}"


@pytest.fixture(scope="module")
def reference(workspace: Path) -> Home:
    """The run never interrupted (started once per module; tokenizer and data are cached by it)."""
    ref = home(workspace, "reference")
    rc, out, err = ref.run(data(workspace))
    assert rc == 0, err[-3000:]
    return ref


def assert_same_as_reference(resumed: Home, ref: Home, by_step: bool = True) -> None:
    (ref_id, ref_status), = ref.runs()
    (run_id, status), = resumed.runs()  # the resume reopened the same MLflow run, no second one
    assert status == ref_status == "FINISHED"
    assert resumed.record()["status"] == "finished"
    # Bit-equal weights, final metrics and every logged training loss (steps re-done after the kill
    # logged the same values again).
    ref_dir, run_dir = ref.run_dirs()[0], resumed.run_dirs()[0]
    weights = "export/model.safetensors"
    assert (run_dir / weights).read_bytes() == (ref_dir / weights).read_bytes()
    want, got = ref.latest(ref_id), resumed.latest(run_id)
    for key in ("val/loss", "val/perplexity", "train/loss"):
        assert got[key] == want[key], (key, got[key], want[key])
    reference_losses = dict(ref.history(ref_id, "train/loss"))
    assert len(reference_losses) == STEPS
    if not by_step:
        # A checkpoint taken after validation resumes with Lightning's logging step one ahead:
        # the same values, in the same order, under shifted step numbers.
        assert [v for _, v in resumed.history(run_id, "train/loss")] == list(reference_losses.values())
        return
    for step, value in resumed.history(run_id, "train/loss"):
        assert value == reference_losses[step], (step, value, reference_losses[step])
    assert {step for step, _ in resumed.history(run_id, "train/loss")} == set(reference_losses)
    for key in ("train/loss", "val/loss"):  # steps logged before a kill and trained again are logged once
        assert [step for step, _ in resumed.history(run_id, key)] == [step for step, _ in ref.history(ref_id, key)]
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == STEPS


@pytest.mark.parametrize("kill_after", [9, 15])  # 15: a checkpoint at a validation step
def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(workspace: Path, reference: Home,
                                                               kill_after: int) -> None:
    victim = home(workspace, f"killed_{kill_after}")
    proc = victim.start(data(workspace))
    step = wait_for_checkpoint(victim, proc, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert step < STEPS, "the run finished before it could be killed"
    ((run_id, status),) = victim.runs()
    assert status == "RUNNING"  # SIGKILL leaves no chance to say otherwise
    assert victim.record()["status"] == "running"

    rc, out, err = victim.run(data(workspace), "resume=auto")
    assert rc == 0, err[-3000:]
    assert victim.record()["resumes"][0]["checkpoint"].endswith("last.ckpt")
    assert_same_as_reference(victim, reference)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C
def test_sigterm_saves_last_checkpoint_marks_killed_and_resumes(workspace: Path, reference: Home,
                                                                signum: signal.Signals) -> None:
    victim = home(workspace, signum.name.lower())
    proc = victim.start(data(workspace))
    wait_for_checkpoint(victim, proc, 5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    message = err[err.index("lmlab: error:"):]
    assert f"stopped by {signum.name} after step" in message and "resume=" in message, message
    stopped = int(message.split("after step ")[1].split(";")[0])
    assert 5 <= stopped < STEPS
    (run_dir,) = victim.run_dirs()
    # The state it stopped in, not the last periodic checkpoint.
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == stopped
    assert not list(run_dir.rglob("*.tmp"))
    ((run_id, status),) = victim.runs()
    assert status == "KILLED"
    assert victim.record()["status"] == "killed"
    assert not (run_dir / "export").exists()

    rc, out, err = victim.run(data(workspace), "resume=auto")
    assert rc == 0, err[-3000:]
    assert_same_as_reference(victim, reference, by_step=False)


class Crash(L.Callback):
    """Raises once ``step`` optimizer steps are done: the process state is lost, last.ckpt stays."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture(scope="module")
def in_process(workspace: Path, tmp_path_factory: pytest.TempPathFactory):
    """``start(name, *extra, callback=None)`` runs lmlab.train.run in this process in its own home;
    ``want`` is the uninterrupted run's result."""
    overrides = [*ARGS, data(workspace), "trainer.enable_progress_bar=false"]
    return in_process_starter(tmp_path_factory.mktemp("in_process"), overrides, workspace / "cache")


@pytest.mark.parametrize("crash_at, saved", [(10, 9), (13, 12), (17, 15)])
def test_resume_from_each_kind_of_checkpoint_is_exact(in_process, crash_at: int, saved: int) -> None:
    # 9: mid-epoch; 12: the last batch of epoch 1; 15: a step that is also validated, which
    # Lightning does not repeat on resume (its loader setup must not disturb the generators).
    with pytest.raises(RuntimeError, match="simulated crash"):
        in_process(f"crash_{crash_at}", callback=Crash(crash_at))
    (run_dir,) = (in_process.root / f"crash_{crash_at}" / "runs").iterdir()
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == saved
    got = in_process(f"crash_{crash_at}", "resume=auto")
    want = in_process.want
    assert got.output_dir == run_dir and got.metrics == want.metrics
    assert (got.export_dir / "model.safetensors").read_bytes() == (want.export_dir / "model.safetensors").read_bytes()
    # The throughput counters come back with the checkpoint: the whole run's tokens, and windows
    # that end on the uninterrupted run's steps (the resumed process's count started at 0). Steps
    # after the checkpoint are trained, and logged, twice: the set of steps is what must match.
    import mlflow

    def throughput(result) -> tuple[float, list[int]]:
        client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
        steps = sorted({m.step for m in client.get_metric_history(result.run_id, "train/tokens_per_sec")})
        return client.get_run(result.run_id).data.metrics["train/total_tokens"], steps

    assert throughput(got) == throughput(want)


@pytest.mark.parametrize("crash_at", [10, 17])
def test_an_mlm_run_resumes_with_the_masks_it_would_have_drawn(in_process, crash_at: int) -> None:
    # MLM's training masks come from a generator seeded by (seed, rank, micro-batch index), not from
    # the saved default generator: the index Lightning restores must be the one the run would have had.
    if not hasattr(in_process, "mlm_want"):  # the uninterrupted MLM run, once for the module
        in_process.mlm_want = in_process("mlm_reference", "task=mlm")
    want = in_process.mlm_want
    with pytest.raises(RuntimeError, match="simulated crash"):
        in_process(f"mlm_crash_{crash_at}", "task=mlm", callback=Crash(crash_at))
    (run_dir,) = (in_process.root / f"mlm_crash_{crash_at}" / "runs").iterdir()
    assert 0 < checkpoint_step(run_dir / "checkpoints" / "last.ckpt") < crash_at
    got = in_process(f"mlm_crash_{crash_at}", "task=mlm", "resume=auto")
    assert got.output_dir == run_dir and got.metrics == want.metrics
    assert (got.export_dir / "model.safetensors").read_bytes() == (want.export_dir / "model.safetensors").read_bytes()


class SigtermInValidation(L.Callback):
    """Sends this process SIGTERM while the validation after ``step`` runs."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.state.fn == "fit" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_validation_saves_after_it_and_resumes_exactly(in_process) -> None:
    # The signal lands in step 10's validation, which finishes before the run stops: its metrics
    # are logged and last.ckpt is written after it (Lightning's own note would end the validation
    # after that batch, and the resumed run does not repeat a validation).
    import mlflow

    from lmlab.faults import Preempted

    with pytest.raises(Preempted, match="stopped by SIGTERM after step 10"):
        in_process("sigterm_in_validation", callback=SigtermInValidation(10))
    (run_dir,) = (in_process.root / "sigterm_in_validation" / "runs").iterdir()
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 10
    got = in_process("sigterm_in_validation", "resume=auto")
    want = in_process.want
    assert got.output_dir == run_dir and got.metrics == want.metrics
    assert (got.export_dir / "model.safetensors").read_bytes() == (want.export_dir / "model.safetensors").read_bytes()

    def history(result) -> list[tuple[int, float]]:
        client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
        return sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "val/loss"))

    assert history(got) == history(want)  # step 10's validation among them, logged once


class SigtermInFinalValidation(L.Callback):
    """Sends this process SIGTERM in the validation of the final weights, after fit."""

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.state.fn == "validate":
            os.kill(os.getpid(), signal.SIGTERM)


AFTER_FIT = ("trainer.val_check_interval=6", "data.eval_batch_size=1")


def test_sigterm_after_training_is_a_preemption_and_resume_finishes_the_run(in_process) -> None:
    # Lightning's SIGTERMException is a SystemExit without a code: unconverted, the process would
    # exit 0 with nothing scored or exported. Validating every 6 of 20 steps, the final weights
    # get a validation of their own, where the signal lands (in its first of two batches: Lightning
    # lets a signal in the last one pass).
    import mlflow

    from lmlab.faults import Preempted

    with pytest.raises(Preempted, match="stopped by SIGTERM after training had finished") as caught:
        in_process("sigterm_after_fit", *AFTER_FIT, callback=SigtermInFinalValidation())
    (run_dir,) = (in_process.root / "sigterm_after_fit" / "runs").iterdir()
    assert f"resume={run_dir}" in str(caught.value)
    assert json.loads((run_dir / "lmlab_run.json").read_text())["status"] == "killed"
    assert not (run_dir / "export").exists()
    uri = f"sqlite:///{in_process.root / 'sigterm_after_fit' / 'mlflow.db'}"
    (killed,) = mlflow.MlflowClient(tracking_uri=uri).search_runs(["0", "1"])
    assert killed.info.status == "KILLED"
    got = in_process("sigterm_after_fit", *AFTER_FIT, "resume=auto")
    assert got.output_dir == run_dir and (got.export_dir / "model.safetensors").is_file()
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == STEPS and math.isfinite(got.metrics["val/loss"])


def test_resume_auto_skips_finished_runs_other_models_and_live_runs(in_process) -> None:
    from lmlab.errors import LmlabError

    # The reference home holds one finished clm/gpt2 run: nothing to resume.
    with pytest.raises(LmlabError, match="resume=auto found no unfinished task=clm model=gpt2 run"):
        in_process("reference", "resume=auto")
    (run_dir,) = (in_process.root / "reference" / "runs").iterdir()
    record_path = run_dir / "lmlab_run.json"
    finished = record_path.read_text()
    try:
        record = json.loads(finished)
        record.update(status="running", pid=os.getpid())  # "still running", by this very process...
        record_path.write_text(json.dumps(record))
        with pytest.raises(LmlabError, match="no unfinished"):
            in_process("reference", "task=mlm", "resume=auto")  # ...and of another task anyway
        record.update(pid=os.getppid())  # a live process that is not this one: not taken over
        record_path.write_text(json.dumps(record))
        with pytest.raises(LmlabError, match="no unfinished"):
            in_process("reference", "resume=auto")
    finally:
        record_path.write_text(finished)


def test_resume_refuses_a_changed_config(in_process) -> None:
    from lmlab.errors import LmlabError

    (run_dir,) = (in_process.root / "reference" / "runs").iterdir()
    copy = in_process.root / "changed" / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "lmlab_run.json").read_text())
    record["status"] = "killed"
    (copy / "lmlab_run.json").write_text(json.dumps(record))
    with pytest.raises(LmlabError) as caught:
        in_process("changed", "optimizer.lr=0.01", "resume=auto")
    message = str(caught.value)
    assert "other settings (optimizer.lr: 0.001 -> 0.01)" in message, message
    assert "config_resolved.yaml" in message
    # A config from a version without a key that is now unset still resumes; many differences list
    # the task and model first.
    saved = copy / "config_resolved.yaml"
    config = yaml.safe_load(saved.read_text())
    del config["trainer"]["limit_test_batches"], config["checkpoint"]["load_best_at_end"]
    saved.write_text(yaml.safe_dump(config))
    with pytest.raises(LmlabError) as caught:
        in_process("changed", "task=mlm", "optimizer.weight_decay=0.5", f"resume={copy}")
    assert "limit_test_batches" not in str(caught.value) and "load_best_at_end" not in str(caught.value)
    assert "other settings (task.name: clm -> mlm; model.name: gpt2 -> bert;" in str(caught.value)


def test_a_checkpoint_that_does_not_fit_the_model_is_named(in_process) -> None:
    """An older lmlab grouped T5's weight-decay parameters otherwise (35 in a group, now 33), and a
    .ckpt from outside lmlab may hold another architecture: torch's bare ValueError / RuntimeError
    from deep inside Lightning's restore now names the checkpoint and what to do."""
    from lmlab.errors import LmlabError

    (run_dir,) = (in_process.root / "reference" / "runs").iterdir()
    shutil.copytree(in_process.root / "reference", in_process.root / "regrouped")  # the run and its MLflow store
    copy = in_process.root / "regrouped" / "runs" / run_dir.name
    record = json.loads((copy / "lmlab_run.json").read_text())
    (copy / "lmlab_run.json").write_text(json.dumps({**record, "status": "killed"}))
    last = copy / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    group = state["optimizer_states"][0]["param_groups"][0]
    group["params"] = group["params"][:-2]  # as written by a version with two fewer parameters in the group
    torch.save(state, last)
    with pytest.raises(LmlabError, match=rf"{re.escape(str(last))}: holds optimizer state that the model and "
                                         r"optimizer this run builds cannot take.*model.pretrained="):
        in_process("regrouped", f"resume={copy}")

    outside = in_process.root / "outside.ckpt"  # no run directory: a new run starts from it
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "h.0." not in k}  # a layer short
    torch.save(state, outside)
    with pytest.raises(LmlabError, match=rf"{re.escape(str(outside))}: holds weights that .*cannot take "
                                         r"\(Error\(s\) in loading state_dict"):
        in_process("outside", f"resume={outside}")


def test_a_finished_run_resumes_only_to_train_longer(in_process) -> None:
    import mlflow

    from lmlab.errors import LmlabError

    first = in_process("extended", "trainer.max_steps=6", "trainer.val_check_interval=3")
    with pytest.raises(LmlabError, match="finished at step 6, so there is nothing to resume.*trainer.max_steps above 6"):
        in_process("extended", "trainer.max_steps=6", "trainer.val_check_interval=3", f"resume={first.output_dir}")
    longer = in_process("extended", "trainer.max_steps=9", "trainer.val_check_interval=3", f"resume={first.output_dir}")
    assert longer.output_dir == first.output_dir and longer.run_id == first.run_id
    assert checkpoint_step(first.output_dir / "checkpoints" / "last.ckpt") == 9
    client = mlflow.MlflowClient(tracking_uri=longer.tracking_uri)
    assert client.get_run(longer.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(longer.run_id, "train/loss")] == list(range(9))
    assert [m.step for m in client.get_metric_history(longer.run_id, "val/loss")] == [2, 5, 8]
    assert json.loads((first.output_dir / "lmlab_run.json").read_text())["status"] == "finished"


def test_a_new_run_refuses_a_run_directory_in_use(workspace: Path) -> None:
    # A job script with a fixed hydra.run.dir, submitted again without resume=: the second run once
    # mixed its checkpoints with the first's (best-step=4.ckpt beside best-step=4-v1.ckpt), replaced
    # its export and rewrote its run record, all without a word.
    shared = home(workspace, "fixed_dir")
    run_dir = shared.root / "runs" / "fixed"
    fixed = (data(workspace), "trainer.val_check_interval=4", f"hydra.run.dir={run_dir}")
    code, _, err = shared.run(*fixed, "trainer.max_steps=4")
    assert code == 0, err[-3000:]
    record = json.loads((run_dir / "lmlab_run.json").read_text())
    code, _, err = shared.run(*fixed, "trainer.max_steps=4")
    assert code == 2
    assert f"config key 'hydra.run.dir': '{run_dir}' already holds an lmlab run" in err
    assert f"resume={run_dir}" in err
    assert json.loads((run_dir / "lmlab_run.json").read_text()) == record  # untouched
    assert len(shared.runs()) == 1  # no second MLflow run
    code, _, err = shared.run(*fixed, "trainer.max_steps=8", f"resume={run_dir}")
    assert code == 0, err[-3000:]  # what the message says to do works


def best_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("best-*.ckpt"))


def best_record(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The best-checkpoint callback's state in a loaded checkpoint (every checkpoint holds it)."""
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'val/loss'")]
    return checkpoint["callbacks"][key]


def test_a_run_trained_longer_ends_on_the_best_checkpoint_it_had(in_process) -> None:
    # Step 15 is a checkpoint step (every 3) and a validation step (every 5) that beats step 10.
    # last.ckpt written before that validation recorded best-step=10.ckpt, which the validation
    # then deleted: the longer run failed at its end, trying to load it.
    first = in_process("longer_best", "trainer.max_steps=15")
    run_dir = first.output_dir
    assert best_checkpoints(run_dir) == ["best-step=15.ckpt"], "step 15 must beat step 10 for this test"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert Path(best_record(last)["best_model_path"]).name == "best-step=15.ckpt"
    longer = in_process("longer_best", "trainer.max_steps=18", f"resume={run_dir}")  # no validation after 15
    assert longer.output_dir == run_dir and checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 18
    assert best_checkpoints(run_dir) == ["best-step=15.ckpt"]
    assert longer.metrics["val/loss"] == first.metrics["val/loss"]  # step 15's weights, validated again


def test_a_stale_best_record_from_an_older_lmlab_is_mended_on_resume(in_process,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    # Older lmlab versions wrote last.ckpt before the validation of its step, so a run finished at
    # step 15 holds a last.ckpt naming best-step=10.ckpt (gone) while best-step=15.ckpt is on disk.
    first = in_process("stale_record", "trainer.max_steps=15")
    last = first.output_dir / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    gone = str(first.output_dir / "checkpoints" / "best-step=10.ckpt")
    score = torch.tensor(99.0)
    best_record(state).update(best_model_path=gone, best_k_models={gone: score}, best_model_score=score,
                              kth_best_model_path=gone, kth_value=score)
    torch.save(state, last)
    assert best_checkpoints(first.output_dir) == ["best-step=15.ckpt"]

    with caplog.at_level("WARNING", logger="lmlab.checkpointing"):
        longer = in_process("stale_record", "trainer.max_steps=18", f"resume={first.output_dir}")
    assert "best-step=10.ckpt" in caplog.text and "best-step=15.ckpt" in caplog.text, caplog.text
    assert best_checkpoints(first.output_dir) == ["best-step=15.ckpt"]
    assert longer.metrics["val/loss"] == first.metrics["val/loss"]  # the best the run had, not step 18's

    # With no best checkpoint left at all, the validations after the resume pick the best.
    (first.output_dir / "checkpoints" / "best-step=15.ckpt").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmlab.checkpointing"):
        in_process("stale_record", "trainer.max_steps=21", f"resume={first.output_dir}")
    assert "(best-step=15.ckpt)" in caplog.text and "none yet" in caplog.text, caplog.text
    assert best_checkpoints(first.output_dir) == ["best-step=20.ckpt"]


def test_resume_removes_the_staging_folder_of_a_killed_export(in_process) -> None:
    from lmlab.atomic import atomic_dir

    with pytest.raises(RuntimeError, match="simulated crash"):
        in_process("killed_export", "trainer.max_steps=6", callback=Crash(4))
    (run_dir,) = (in_process.root / "killed_export" / "runs").iterdir()
    # What a SIGKILL in the middle of the export leaves: the staging folder, entered and never left
    # (the context manager is kept alive, or its clean-up on collection would remove the folder).
    export = atomic_dir(run_dir / "export")
    staged = export.__enter__()
    (staged / "model.safetensors").write_bytes(b"half a model")
    assert staged.name.startswith(".export.")
    got = in_process("killed_export", "trainer.max_steps=6", "resume=auto")
    assert got.output_dir == run_dir and (run_dir / "export" / "model.safetensors").is_file()
    assert not list(run_dir.glob(".export.*"))
