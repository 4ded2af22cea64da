"""Atomic writes, safe loading and numerical faults.

* a checkpoint or export whose write fails (or is killed) leaves the previous one whole;
* checkpoints are read with ``weights_only=True``: a tampered file is refused and its payload never
  runs; what lmlab writes holds only types that reader accepts; remote code is off by default;
* a NaN loss stops the run at that step with a checkpoint from before it, or is skipped.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, compose_cfg, run_in_home, wiki_head
from lmlab import registry
from lmlab.atomic import atomic_file
from lmlab.checkpointing import AtomicCheckpointIO, LastCheckpoint, load_safely, plain
from lmlab.errors import LmlabError
from lmlab.export import export_hf
from lmlab.train import RunResult, build_trainer, run


def statuses(home: Path) -> list[str]:
    with sqlite3.connect(home / "mlflow.db") as con:
        return [row[0] for row in con.execute("SELECT status FROM runs")]


def metric_history(result: RunResult, key: str) -> list[tuple[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    return [(m.step, m.value) for m in client.get_metric_history(result.run_id, key)]


# -- atomic checkpoint writes ---------------------------------------------------------------------
def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, path)
    real_save = torch.save

    def crash_midway(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip archive")  # some bytes reach the disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # the staged .tmp is gone


KILLED_MID_WRITE = """
import sys, time, torch
from pathlib import Path
from lmlab.checkpointing import AtomicCheckpointIO

path = Path(sys.argv[1])
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1000)}}, path)
real = torch.save

def slow_save(obj, handle, *args, **kwargs):
    handle.write(b"PK\\x03\\x04 the first bytes")
    handle.flush()
    Path(sys.argv[2]).write_text("writing")
    time.sleep(600)  # killed here, mid-write

torch.save = slow_save
io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(1000)}}, path)
"""


def test_a_kill_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path, flag = tmp_path / "last.ckpt", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(path), str(flag)])
    deadline = time.monotonic() + 120
    while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flag.exists(), "the writer never reached the write"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (tmp_path / "last.ckpt.tmp").exists()  # the half-written file is the staged one
    loaded = load_safely(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(1000))


def test_atomic_file_publishes_only_complete_files(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write(b"new but incomplete")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and not (tmp_path / "record.json.tmp").exists()


def test_a_failed_export_leaves_the_previous_export(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))

    class Tokenizer:
        def __init__(self, fail: bool):
            self.fail = fail

        def __len__(self) -> int:
            return 16

        def save_pretrained(self, where: str) -> None:
            (Path(where) / "tokenizer.json").write_text("{}")
            if self.fail:
                raise OSError("disk full")

    destination = tmp_path / "run" / "export"
    export_hf(model, Tokenizer(fail=False), destination)
    before = {p.name: p.read_bytes() for p in destination.iterdir()}
    with pytest.raises(OSError, match="disk full"):
        export_hf(model, Tokenizer(fail=True), destination)
    assert {p.name: p.read_bytes() for p in destination.iterdir()} == before
    assert [p.name for p in destination.parent.iterdir()] == ["export"]  # no staging folder left
    assert "model.safetensors" in before  # weights as safetensors, never pickled


def test_every_trainer_writes_through_the_atomic_plugin(tmp_path: Path) -> None:
    cfg = compose_cfg([*TINY, "checkpoint.every_n_steps=7"])
    task = registry.get("task", cfg.task.name)
    trainer, _, _ = build_trainer(cfg, task, tmp_path, False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    (last,) = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
    assert last.path == tmp_path / "checkpoints" / "last.ckpt"
    assert last._every_n_train_steps == 7


# -- safe loading ---------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('the payload ran')",))


def test_a_checkpoint_with_a_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "tampered.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"x": Payload(marker)}}, path)
    with pytest.raises(LmlabError) as caught:
        AtomicCheckpointIO().load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "refused" in message and "exec" in message, message
    assert "weights_only=True" in message
    assert not marker.exists()
    # The payload is real: a plain unpickler would have run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "the payload ran"


def test_plain_makes_hyperparameters_safe(tmp_path: Path) -> None:
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": OmegaConf.create({"lr": 0.1, "layers": [1, 2], "out": "x"}),
        "hparams_type": type(OmegaConf.create({})),
        "paths": [tmp_path / "a"],
    }
    path = tmp_path / "hparams.ckpt"
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    loaded = load_safely(path)
    assert loaded["hyper_parameters"] == {"lr": 0.1, "layers": [1, 2], "out": "x"}
    assert "hparams_type" not in loaded and loaded["paths"] == [str(tmp_path / "a")]
    state = torch.nn.Linear(2, 2).state_dict()
    assert plain(state) is state  # unchanged containers keep their type and metadata


def test_remote_code_is_off_unless_asked_for(tmp_path: Path, lmlab_home: Path) -> None:
    cfg = compose_cfg(TINY)
    assert cfg.model.trust_remote_code is False and cfg.data.trust_remote_code is False
    assert compose_cfg([*TINY, "tokenizer=pretrained"]).tokenizer.trust_remote_code is False
    # A model folder that wants its own Python code run: refused, and the code never runs.
    model = tmp_path / "custom_model"
    model.mkdir()
    marker = tmp_path / "custom_code_ran"
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": ["evil.EvilTokenizer", None]}
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (model / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map}))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(LmlabError) as caught:
        run(compose_cfg([*TINY, f"data.path={wiki_head(tmp_path)}", f"model.pretrained={model}"]))
    message = str(caught.value)
    assert "model.pretrained" in message and "trust_remote_code" in message, message
    assert not marker.exists()


# -- runs: safe checkpoints end to end, and numerical faults --------------------------------------
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    root = tmp_path_factory.mktemp("safety")
    return run_in_home(root, [*TINY, f"data.path={wiki_head(root)}"])[0], root


def test_run_checkpoints_hold_only_safe_types(finished: tuple[RunResult, Path]) -> None:
    result, _ = finished
    for path in sorted((result.output_dir / "checkpoints").glob("*.ckpt")):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        assert load_safely(path)["global_step"] > 0


def test_resume_refuses_a_tampered_checkpoint(finished: tuple[RunResult, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    result, root = finished
    home = tmp_path / "home"
    run_dir = home / "runs" / result.output_dir.name
    shutil.copytree(result.output_dir, run_dir)
    record = json.loads((run_dir / "lmlab_run.json").read_text())
    record.update(status="running", pid=None)
    (run_dir / "lmlab_run.json").write_text(json.dumps(record))
    shutil.copy(root / "home" / "mlflow.db", home / "mlflow.db")
    marker = tmp_path / "pwned"
    checkpoint = load_safely(run_dir / "checkpoints" / "last.ckpt")
    checkpoint["callbacks"]["evil"] = Payload(marker)
    torch.save(checkpoint, run_dir / "checkpoints" / "last.ckpt")

    monkeypatch.setenv("LMLAB_HOME", str(home))
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
    cfg = compose_cfg([*TINY, f"data.path={root / 'wiki.txt'}", "resume=auto"])
    with pytest.raises(LmlabError) as caught:
        run(cfg)
    message = str(caught.value)
    assert "last.ckpt" in message and "refused" in message, message
    assert not marker.exists()
    assert "RUNNING" not in statuses(home)


def _nan_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The training loss of the ``step``-th optimizer step (1-based) becomes NaN."""
    from lmlab.tasks.clm import CausalLMModule

    original = CausalLMModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * math.nan if self.global_step == step - 1 else loss

    monkeypatch.setattr(CausalLMModule, "training_step", training_step)


@pytest.mark.parametrize("every, said", [
    (1, "training stopped before applying it"),
    # What a GPU run does by default (the host reads the verdict every log interval), forced on the CPU.
    (4, "found at the check after step 8, faults.check_every_n_steps=4); training stopped, and no non-finite update"),
])
def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(
    finished: tuple[RunResult, Path], lmlab_home: Path, monkeypatch: pytest.MonkeyPatch, every: int, said: str
) -> None:
    _, root = finished
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
    _nan_at_step(monkeypatch, 7)
    with pytest.raises(LmlabError) as caught:  # debug preset: last.ckpt every 5 steps
        run(compose_cfg([*TINY, f"data.path={root / 'wiki.txt'}", f"faults.check_every_n_steps={every}"]))
    message = str(caught.value)
    assert "training loss is nan at step 7" in message and said in message, message
    assert "last.ckpt (after step 5)" in message and "faults.nonfinite=skip" in message, message
    (run_dir,) = (lmlab_home / "runs").iterdir()
    last = load_safely(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 5
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert statuses(lmlab_home) == ["FAILED"]
    assert json.loads((run_dir / "lmlab_run.json").read_text())["status"] == "failed"


def test_nan_loss_is_skipped_when_asked(finished: tuple[RunResult, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _, root = finished
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
    _nan_at_step(monkeypatch, 3)
    result = run(compose_cfg([*TINY, f"data.path={root / 'wiki.txt'}", "faults.nonfinite=skip"]))
    assert math.isfinite(result.metrics["val/loss"])
    assert {value for _, value in metric_history(result, "train/skipped_steps")} == {1.0}
    assert len(metric_history(result, "train/grad_norm")) >= 4  # logged every 2 of 10 steps
    last = load_safely(result.output_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 10
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


# Step 3 is read at the periodic check after step 4; step 9 (after the last one, at step 8) when training ends.
@pytest.mark.parametrize("nan_step", [3, 9])
def test_deferred_skip_drops_the_same_update_as_the_per_step_check(
    finished: tuple[RunResult, Path], monkeypatch: pytest.MonkeyPatch, nan_step: int
) -> None:
    # The fused optimizer skipping on its found_inf flag must leave the run exactly where the
    # host-side skip (gradients dropped before the step) leaves it: same weights, same moments.
    _, root = finished
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
    _nan_at_step(monkeypatch, nan_step)
    states = {}
    for every in (1, 4):
        result = run(compose_cfg([*TINY, f"data.path={root / 'wiki.txt'}", "faults.nonfinite=skip",
                                  f"faults.check_every_n_steps={every}"]))
        assert {value for _, value in metric_history(result, "train/skipped_steps")} == {1.0}
        states[every] = load_safely(result.output_dir / "checkpoints" / "last.ckpt")
    assert states[1]["global_step"] == states[4]["global_step"] == 10
    per_step, deferred = states[1]["state_dict"], states[4]["state_dict"]
    assert per_step.keys() == deferred.keys()
    for name in per_step:
        assert torch.equal(per_step[name], deferred[name]), name
    moments = [s["optimizer_states"][0]["state"] for s in (states[1], states[4])]
    for key in moments[0]:
        assert torch.equal(moments[0][key]["step"], moments[1][key]["step"])
        assert torch.equal(moments[0][key]["exp_avg"], moments[1][key]["exp_avg"])


# Step 5 is the last step of the first part: the per-step check has counted it by the checkpoint;
# the deferred one (checks every 4 steps) holds it on the device, still unread.
@pytest.mark.parametrize("every", [1, 4])
def test_skipped_steps_carry_over_a_resume(finished: tuple[RunResult, Path], monkeypatch: pytest.MonkeyPatch,
                                           every: int) -> None:
    _, root = finished
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
    _nan_at_step(monkeypatch, 5)
    overrides = [*TINY, f"data.path={root / 'wiki.txt'}", "faults.nonfinite=skip",
                 f"faults.check_every_n_steps={every}"]
    first = run(compose_cfg([*overrides, "trainer.max_steps=5"]))
    resumed = run(compose_cfg([*overrides, "trainer.max_steps=10", f"resume={first.output_dir}"]))
    assert resumed.run_id == first.run_id
    history = metric_history(resumed, "train/skipped_steps")
    assert any(step > 5 for step, _ in history), history  # the resumed part still reports the count
    assert {value for _, value in history} == {1.0}, history


def test_a_huge_learning_rate_stops_the_run_at_a_named_step(
    finished: tuple[RunResult, Path], lmlab_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, root = finished
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
    with pytest.raises(LmlabError) as caught:
        run(compose_cfg([*TINY, f"data.path={root / 'wiki.txt'}", "optimizer.lr=1e30",
                         "scheduler=constant", "trainer.gradient_clip_val=null"]))
    message = str(caught.value)
    assert " at step " in message and "training stopped before applying it" in message, message
    assert statuses(lmlab_home) == ["FAILED"]



def test_progress_bar_reads_metrics_every_step_only_on_the_cpu() -> None:
    # The decision the bar makes at setup; a GPU is not needed to check it, only a device type.
    from types import SimpleNamespace

    from lmlab.callbacks import ProgressBar

    for device, expected in (("cpu", 1), ("cuda", 25), ("meta", 25)):
        bar = ProgressBar(every=25)
        trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), is_global_zero=True)
        bar.setup(trainer, None, "fit")
        assert bar.refresh_rate == expected, device
