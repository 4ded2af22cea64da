"""An optimizer step's gradient as the mean over every target token (or example) behind it.

Lightning divides every micro-batch's loss by ``accumulate_grad_batches`` (N) and DDP averages the
gradients of its W processes, so a step's gradient is the mean of per-micro-batch means: with padded
or masked batches a micro-batch (or process) with fewer targets weighs more per target, and an
epoch's last, shorter window of k < N micro-batches gives k/N of its mean (Lightning issue #19987,
open). The Hugging Face Trainer divides by the window's target count across processes since 4.46
(``num_items_in_batch``, ``average_tokens_across_devices``); it reads every micro-batch of a window
before the first forward to count them. Lightning hands batches one at a time, and lmlab's MLM draws
its masks on the device inside the step, so the count is only known at the optimizer step. Gradients
are linear in the loss, so lmlab scales them there instead:

- ``weigh_by_tokens`` (called by a task's ``training_step``) turns a micro-batch's mean loss into
  its sum divided by R, one reference count shared by every micro-batch and process of the window
  (the first micro-batch's mean count over processes: it keeps the values near the mean loss, which
  fp16's gradient scaler needs, and depends only on the window's data, so a resumed run computes
  what the uninterrupted one did). It adds the micro-batch's count up on the device.
- ``WindowScaling``, in ``on_before_optimizer_step``, all-reduces the window's count C and
  multiplies the gradients, now R/(N·W) times the sum of the per-target gradients, by N·W/(R·C).

A module that does not call ``weigh_by_tokens`` (a plugin's, or MLM with next-sentence prediction,
whose two terms count different things) keeps Lightning's mean of micro-batch means, with only the
short window scaled to the mean of the micro-batches it holds (N/k). Under DeepSpeed, which keeps
the gradients in its engine, neither applies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy

from lmlab.data.loaders import process_group

log = logging.getLogger(__name__)

WINDOW_ATTR = "_lmlab_token_window"


@dataclass
class TokenWindow:
    """What ``weigh_by_tokens`` has seen of the current accumulation window on this process."""

    reference: torch.Tensor  # R: the same on every process, for every micro-batch of the window
    count: torch.Tensor  # this process's targets so far


def window_length(ready: int, accumulate: int) -> int:
    """Micro-batches behind the optimizer step taken after the ``ready``-th batch of an epoch.

    Lightning steps when ``ready`` is a multiple of N, or on the epoch's last batch: then the
    window holds what came after the last multiple.
    """
    return ready % accumulate or accumulate


def weigh_by_tokens(module: L.LightningModule, loss: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """The value to backpropagate for a training micro-batch whose ``loss`` is the mean over ``count`` targets.

    ``loss`` × ``count`` / R, so that ``WindowScaling`` can make the step's gradient the mean over
    every target of the window on every process. Returns ``loss`` itself where it already is that
    mean (one process, no accumulation), outside a Trainer's fit, under DeepSpeed, and in a Trainer
    without ``WindowScaling`` (which would leave the sums unscaled).
    """
    trainer = getattr(module, "_trainer", None)  # the public property raises when the module is not attached
    if (trainer is None or not trainer.training or isinstance(trainer.strategy, DeepSpeedStrategy)
            or not any(isinstance(c, WindowScaling) for c in trainer.callbacks)):
        return loss
    if int(trainer.accumulate_grad_batches) == 1 and trainer.world_size == 1:
        return loss  # one micro-batch per step: its mean is the step's, with no pass over the gradients
    if isinstance(count, torch.Tensor):
        count = count.detach().to(device=loss.device, dtype=torch.float32, copy=True)  # reduced in place below
    else:
        count = torch.full((), float(count), device=loss.device)  # a fill: no host-to-device copy to wait for
    window = getattr(module, WINDOW_ATTR, None)
    if window is None:
        reference = (_summed(count.clone()) / trainer.world_size).clamp(min=1)
        window = TokenWindow(reference, count)
        setattr(module, WINDOW_ATTR, window)
    else:
        window.count += count
    # count / R is exactly 1 where every micro-batch has as many targets (packed blocks).
    return loss * (count / window.reference)


class WindowScaling(L.Callback):
    """Makes each step's gradient the mean over its targets (or, failing a count, its micro-batches).

    Runs in ``on_before_optimizer_step``: after every backward of the step (and after the
    mixed-precision scaler unscaled the gradients), before Lightning's clipping and before the
    callbacks after it in the Trainer's list (the gradient-norm log and non-finite guard).
    """

    def __init__(self) -> None:
        self._warned = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.__dict__.pop(WINDOW_ATTR, None)  # a window an earlier fit left unfinished

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        accumulate = int(trainer.accumulate_grad_batches)
        window = pl_module.__dict__.pop(WINDOW_ATTR, None)
        if window is not None:
            total = _summed(window.count).clamp(min=1)
            _scale_gradients(optimizer, accumulate * trainer.world_size * window.reference / total)
            return
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
        _scale_gradients(optimizer, accumulate / k)


def _summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the processes, in place.

    torch.distributed's all-reduce itself rather than Lightning's ``strategy.reduce``: that one puts a
    barrier first, and a barrier on NCCL blocks the host until the GPU has run everything queued,
    here once or twice a step. The all-reduce alone is queued behind the step's kernels.
    """
    if process_group()[1] > 1:
        torch.distributed.all_reduce(t)
    return t


def _scale_gradients(optimizer: Any, factor: float | torch.Tensor) -> None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return
    if isinstance(factor, torch.Tensor):
        # One factor per device: FSDP's shards and a CPU-offloaded optimizer may sit elsewhere.
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        for device, group in by_device.items():
            torch._foreach_mul_(group, factor.to(device=device, dtype=torch.float32))
    else:
        torch._foreach_mul_(grads, factor)
