"""SIGTERM under DDP (README: Preemption): whichever rank gets the signal, and whenever, every rank
stops after the same step with last.ckpt saved, and none hangs.

Lightning's own SIGTERM handler broadcasts from rank 0 inside the handler. That collective pairs up
only when every rank takes the signal at a quiet moment: a signal to one rank alone, or to a rank
whose peer waited in a barrier, left both processes waiting for good. These runs send SIGTERM to
one rank from a callback, at a known step, in training and in validation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, wiki_head

pytestmark = pytest.mark.slow

# `python -m` this: lmlab's CLI plus the signalling callback. Lightning starts rank 1 by running the
# same command again, so the callback comes in with the command, on both ranks.
DRIVER = """
import os
import signal

import lightning as L

from lmlab import checkpointing


class SignalOneRank(L.Callback):
    def __init__(self, rank, step, in_validation):
        self.rank, self.step, self.in_validation, self.sent = rank, step, in_validation, False

    def _send(self, trainer, due):
        if due and not self.sent and trainer.global_rank == self.rank:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # global_step counts the steps done: step k trains while it is k - 1
        self._send(trainer, not self.in_validation and trainer.global_step == self.step - 1)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._send(trainer, self.in_validation and not trainer.sanity_checking
                   and trainer.global_step == self.step)


real = checkpointing.callbacks
sender = SignalOneRank(int(os.environ["SIGNAL_RANK"]), int(os.environ["SIGNAL_STEP"]),
                       os.environ["SIGNAL_IN"] == "validation")
checkpointing.callbacks = lambda cfg, last: [*real(cfg, last), sender]
from lmlab.cli import main
main()
"""


@pytest.mark.parametrize(("rank", "where", "stopped_after"), [
    (1, "training", 3),  # only rank 1 hears it; rank 1 has no process of its own to forward it to
    (0, "validation", 2),  # step 2's validation: the stop comes once it is over, before step 3
])
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(rank: int, where: str, stopped_after: int,
                                                                   tmp_path: Path) -> None:
    text = wiki_head(tmp_path, 600)
    (tmp_path / "signal_driver.py").write_text(DRIVER, encoding="utf-8")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", SIGNAL_RANK=str(rank), SIGNAL_STEP=str(stopped_after),
               SIGNAL_IN=where, PYTHONPATH=str(tmp_path))
    command = [sys.executable, "-m", "signal_driver", *TINY, "trainer=ddp_cpu", f"data.path={text}",
               "data.max_documents=80", "data.batch_size=4", "trainer.max_steps=8", "trainer.val_check_interval=2",
               "trainer.limit_val_batches=2", "checkpoint.every_n_steps=100"]
    # A session of its own, so a hung rank (the old behaviour) is killed with its peer, not left behind.
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the ranks hung after SIGTERM to rank {rank} in {where}")
    assert process.returncode == 2, stderr[-4000:]
    assert f"stopped by SIGTERM after step {stopped_after};" in stderr, stderr[-4000:]
    assert "Connection closed by peer" not in stderr and "Traceback" not in stderr, stderr[-4000:]
    (last,) = (home / "runs").glob("*/checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == stopped_after
