"""Per-step training scalars, logged only on the steps whose values Lightning writes to the loggers.

A step's ``self.log(..., on_step=True)`` value reaches MLflow only when the step is a multiple of
``trainer.log_every_n_steps``; on the other steps it is dropped unwritten. Logging it anyway is not
free: each call is a third of a millisecond of Lightning's Python on a 2.1 GHz Xeon (it deep-copies
the metric's metadata to move it to the value's device) and, with ``sync_dist``, a collective across
processes. The loss, the gradient norm and the learning rate took 1 ms of host time per step, 6% of
a tiny GPT-2's CPU step and time a GPU's host cannot spend queueing the next one. So lmlab logs them
on the written steps only; MLflow receives exactly what it did before, and the progress bar's loss
changes once per logging interval.

With gradient accumulation (``trainer.accumulate_grad_batches``) an optimizer step runs several
training steps, and Lightning writes what was logged last, at the step's last micro-batch. A value
logged once per micro-batch (the loss) would be that micro-batch's alone; ``log_step`` logs the
mean of the values logged under the name during the optimizer step so far instead, as the Hugging
Face Trainer reports its loss. A value logged once per optimizer step is its own mean. The sum
stays on the value's device: no host sync.
"""

from __future__ import annotations

import weakref
from typing import Any

import lightning as L
import torch


def written_this_step(module: L.LightningModule) -> bool:
    """Whether the values logged during this training step will be handed to the loggers."""
    trainer = module._trainer
    if trainer is None:  # outside a Trainer self.log does nothing either
        return False
    # Lightning's own LearningRateMonitor asks the logger connector the same question.
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def _optimizer_step(trainer: L.Trainer) -> int:
    """Which optimizer step the running training step belongs to: the same for all its micro-batches."""
    # The counter written_this_step's answer rests on: it moves once per optimizer step.
    return trainer.fit_loop.epoch_loop._batches_that_stepped


class _StepSums:
    """The values logged under each name in one optimizer step: name -> (sum, count)."""

    def __init__(self, step: int):
        self.step = step
        self.sums: dict[str, tuple[Any, int]] = {}

    def mean(self, name: str, value: Any) -> Any:
        value = value.detach() if isinstance(value, torch.Tensor) else value
        total, count = self.sums.get(name, (0, 0))
        total, count = (value, 1) if count == 0 else (total + value, count + 1)
        self.sums[name] = (total, count)
        return total / count if count > 1 else total


# Per Trainer, gone with it; nothing is kept on the module (which may be pickled or copied).
_SUMS: weakref.WeakKeyDictionary[L.Trainer, _StepSums] = weakref.WeakKeyDictionary()


def log_step(module: L.LightningModule, name: str, value: Any, mean: bool = True, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` on the steps that are written (see the module docstring).

    ``mean``: log the mean of the values logged under ``name`` in this optimizer step (its
    micro-batches' under gradient accumulation); False logs ``value`` as it is.
    """
    if not written_this_step(module):
        return
    if mean:
        trainer = module._trainer
        step = _optimizer_step(trainer)
        sums = _SUMS.get(trainer)
        if sums is None or sums.step != step:
            sums = _SUMS[trainer] = _StepSums(step)
        value = sums.mean(name, value)
    module.log(name, value, **kwargs)
