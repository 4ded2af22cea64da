"""The shorter accumulation an epoch can end on, given the mean gradient of its micro-batches.

Lightning divides every micro-batch's loss by ``accumulate_grad_batches`` (N) and steps the
optimizer on an epoch's last batch even when fewer than N were accumulated (Lightning issue
#19987, open). An epoch of 7 batches with N = 4 then ends on a step whose gradient is 3/4 of the
mean of its 3 micro-batches: a smaller step, once per epoch, that no setting reaches. The Hugging
Face Trainer divides by the window's real length since 4.46. ``ShortWindowScaling`` multiplies
that step's gradients by N / k (k: the micro-batches it holds) before clipping, the non-finite
check and the optimizer see them, so every step takes the mean over its own micro-batches.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

log = logging.getLogger(__name__)


def window_length(ready: int, accumulate: int) -> int:
    """Micro-batches behind the optimizer step taken after the ``ready``-th batch of an epoch.

    Lightning steps when ``ready`` is a multiple of N, or on the epoch's last batch: then the
    window holds what came after the last multiple.
    """
    return ready % accumulate or accumulate


class ShortWindowScaling(L.Callback):
    """Scales a short final accumulation's gradients from sum/N to the mean over its k micro-batches.

    Runs in ``on_before_optimizer_step``: after every backward of the step (and after the
    mixed-precision scaler unscaled the gradients), before Lightning's clipping and before the
    callbacks after it in the Trainer's list (the gradient-norm log and non-finite guard).
    """

    def __init__(self) -> None:
        self._warned = False

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        accumulate = int(trainer.accumulate_grad_batches)
        if accumulate <= 1:
            return
        k = window_length(trainer.fit_loop.epoch_loop.batch_progress.current.ready, accumulate)
        if k == accumulate:
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed keeps (and under ZeRO-2/3 partitions) the gradients in its own engine, so
            # they are not the parameters' .grad: left as Lightning scales them, and said once.
            if not self._warned and trainer.is_global_zero:
                log.warning("DeepSpeed: an epoch ending on %d of %d accumulated micro-batches steps with "
                            "%d/%d of their mean gradient (Lightning's scaling).", k, accumulate, k, accumulate)
            self._warned = True
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, accumulate / k)
