"""Per-step training scalars, logged only on the steps whose values Lightning writes to the loggers.

A step's ``self.log(..., on_step=True)`` value reaches MLflow only when the step is a multiple of
``trainer.log_every_n_steps``; on the other steps it is dropped unwritten. Logging it anyway is not
free: each call is a third of a millisecond of Lightning's Python on a 2.1 GHz Xeon (it deep-copies
the metric's metadata to move it to the value's device) and, with ``sync_dist``, a collective across
processes. The loss, the gradient norm and the learning rate took 1 ms of host time per step, 6% of
a tiny GPT-2's CPU step and time a GPU's host cannot spend queueing the next one. So lmlab logs them
on the written steps only; MLflow receives exactly what it did before, and the progress bar's loss
changes once per logging interval.
"""

from __future__ import annotations

from typing import Any

import lightning as L


def written_this_step(module: L.LightningModule) -> bool:
    """Whether the values logged during this training step will be handed to the loggers."""
    trainer = module._trainer
    if trainer is None:  # outside a Trainer self.log does nothing either
        return False
    # Lightning's own LearningRateMonitor asks the logger connector the same question.
    return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs


def log_step(module: L.LightningModule, name: str, value: Any, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` on the steps that are written (see the module docstring)."""
    if written_this_step(module):
        module.log(name, value, **kwargs)
