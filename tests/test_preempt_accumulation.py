"""Preemption with gradient accumulation (README: Preemption): a signal that lands on a micro-batch
in the middle of an optimizer step stops training only once that step is done, so last.ckpt holds a
whole number of accumulations and the resumed run is the uninterrupted one.

40 documents make 6 training batches an epoch; accumulating 4, each epoch has one full step and
one of 2 micro-batches (Lightning steps on an epoch's last batch). The signal is sent on the 2nd
micro-batch of step 5 (epoch 3's first step), and last.ckpt is not written by the step counter in
between, so a stop there could not fall back on an earlier step-boundary checkpoint. Under DDP
(gloo, 2 processes) Lightning's own per-batch SIGTERM check must wait for the step as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from conftest import TINY, WIKI, in_process_starter, wiki_head

pytestmark = pytest.mark.slow

ACCUMULATE = 4
STEPS = 6
ARGS = [*TINY, "data.max_documents=40", f"trainer.max_steps={STEPS}", f"trainer.accumulate_grad_batches={ACCUMULATE}",
        f"trainer.val_check_interval={STEPS}", "checkpoint.every_n_steps=100", "trainer.log_every_n_steps=1"]
SIGNALLED_STEP = 5  # the optimizer step whose 2nd micro-batch gets the signal
# Steps 1-4 fill two epochs (4 + 2 micro-batches each); step 5 is epoch 3's first 4.
BATCHES_INTO_EPOCH = ACCUMULATE


class SignalOnMicroBatch(L.Callback):
    """Sends this process ``signum`` on the ``micro``-th micro-batch (from 1) of optimizer step
    ``step`` (from 1): as it starts, so the signal arrives while it trains, or (``at_end``) once
    the micro-batch is over, after lmlab's callbacks have seen it end (this one comes after them)."""

    def __init__(self, signum: int, step: int, micro: int, at_end: bool = False):
        self.signum, self.step, self.micro, self.at_end = signum, step, micro, at_end
        self._global_step = -1
        self._micro = 0
        self.sent = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step != self._global_step:  # the previous batch ended an optimizer step
            self._global_step, self._micro = trainer.global_step, 0
        self._micro += 1
        if not self.at_end:
            self._send_if_due(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.at_end:
            self._send_if_due(trainer)

    def _send_if_due(self, trainer: L.Trainer) -> None:
        # The step as the micro-batch started: at the end of one that stepped it has moved on.
        if not self.sent and self._global_step + 1 == self.step and self._micro == self.micro:
            self.sent = True
            os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory):
    """``start(name, *extra, callback=None)`` runs lmlab.train.run in this process in its own home;
    ``want`` is the uninterrupted run's result."""
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    root = tmp_path_factory.mktemp("preempt_accumulation")
    text = root / "wiki.txt"
    text.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:600]) + "\n", encoding="utf-8")
    return in_process_starter(root, [*ARGS, f"data.path={text}"], root / "cache")


def loader_batches(checkpoint: dict[str, Any]) -> int:
    """How many batches of its epoch the training loader (a ResumableLoader) had handed out."""
    found = [value["batches"] for value in _dicts(checkpoint["loops"]) if {"epoch", "batches"} <= set(value)]
    assert len(found) == 1, found
    return int(found[0])


def _dicts(tree: Any) -> list[dict[str, Any]]:
    if not isinstance(tree, dict):
        return [item for value in tree for item in _dicts(value)] if isinstance(tree, (list, tuple)) else []
    return [tree, *(item for value in tree.values() for item in _dicts(value))]


# SIGTERM is Lightning's signal, SIGUSR1 one of lmlab's. A SIGTERM at a micro-batch's end comes
# after lmlab has looked for one there, and Lightning looks again before the next micro-batch.
@pytest.mark.parametrize("signum, at_end", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGUSR1, False)],
                         ids=["sigterm", "sigterm_at_batch_end", "sigusr1"])
def test_a_signal_mid_accumulation_stops_after_the_optimizer_step_and_resumes_exactly(
        in_process, signum: signal.Signals, at_end: bool) -> None:
    from lmlab.faults import Preempted

    name = f"mid_accumulation_{signum.name.lower()}{'_at_end' if at_end else ''}"
    sender = SignalOnMicroBatch(signum, SIGNALLED_STEP, micro=2, at_end=at_end)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match=f"stopped by {signum.name} after step {SIGNALLED_STEP};"):
        in_process(name, callback=sender)
    assert sender.sent
    assert signal.getsignal(signal.SIGTERM) is before  # Lightning's handler, wrapped for the fit, is gone
    (run_dir,) = (in_process.root / name / "runs").iterdir()
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == SIGNALLED_STEP
    # The micro-batches of the interrupted step were all trained on: none is skipped on resume
    # without its gradient having reached the weights.
    assert loader_batches(saved) == BATCHES_INTO_EPOCH
    got = in_process(name, "resume=auto")
    want = in_process.want
    assert got.output_dir == run_dir and got.metrics == want.metrics
    assert (got.export_dir / "model.safetensors").read_bytes() == (want.export_dir / "model.safetensors").read_bytes()


# `python -m` this (lmlab's CLI plus a SignalOnMicroBatch on global rank 0): Lightning starts rank 1
# by running the same command again, so the callback has to come in with the command.
DRIVER = """
import os
import signal

from lmlab import checkpointing
from test_preempt_accumulation import SignalOnMicroBatch

class OnRankZero(SignalOnMicroBatch):
    def _send_if_due(self, trainer):
        if trainer.global_rank == 0:
            super()._send_if_due(trainer)

real = checkpointing.callbacks
sender = OnRankZero(signal.SIGTERM, int(os.environ["SIGNALLED_STEP"]), micro=2)
checkpointing.callbacks = lambda cfg, last: [*real(cfg, last), sender]
from lmlab.cli import main
main()
"""


def test_under_ddp_sigterm_mid_accumulation_stops_every_rank_after_the_optimizer_step(tmp_path: Path) -> None:
    # Lightning broadcasts rank 0's SIGTERM at the start of every batch and raises on it there; rank
    # 0's handler forwards the signal to rank 1. Step 3 is in the middle of the first epoch.
    text = wiki_head(tmp_path, 600)
    (tmp_path / "sigterm_driver.py").write_text(DRIVER, encoding="utf-8")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", SIGNALLED_STEP="3",
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).parent)]))
    done = subprocess.run(
        [sys.executable, "-m", "sigterm_driver", *TINY, "trainer=ddp_cpu", f"data.path={text}",
         "data.max_documents=80", "data.batch_size=4", "trainer.max_steps=6",
         f"trainer.accumulate_grad_batches={ACCUMULATE}", "trainer.val_check_interval=6", "trainer.limit_val_batches=1",
         "checkpoint.every_n_steps=100"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-4000:]
    assert "stopped by SIGTERM after step 3;" in done.stderr, done.stderr[-4000:]
    (last,) = (home / "runs").glob("*/checkpoints/last.ckpt")
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert loader_batches(saved) == 3 * ACCUMULATE  # per rank: rank 0's loader state is the one saved
