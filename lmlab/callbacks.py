"""Small Lightning callbacks lmlab adds to every run."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from lmlab.flops import TrainingFlops, peak_flops, training_flops
from lmlab.step_logging import log_step

log = logging.getLogger("lmlab")


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_sec`` (non-padding tokens, all processes) every ``every`` training batches
    (batches since the start of training, across epochs).

    Lightning's ThroughputMonitor needs a FLOP count and its metric names use '|', which MLflow
    rejects; counting tokens over a window of steps is all this needs. Time spent validating inside
    a window is left out, as ThroughputMonitor does: the figure is the training speed.

    Under DDP each process counts its own batches and the window's count is summed over processes
    when it is logged (every rank reaches that batch together): padded batches differ by rank, so
    rank 0's count times the world size was not the processes' total. The running total and the
    window position go into checkpoints, so a resumed run's ``total_tokens`` counts the whole run
    and its windows end on the same batches as the uninterrupted run's.
    """

    def __init__(self, every: int = 10, configured_peak: float | None = None):
        self.every = max(1, every)
        # Padded batches count their mask on the device; the host reads the count once per window,
        # not once per step (each read would stall a GPU).
        self._tokens: Any = 0
        self._since = 0.0
        self._validating_since: float | None = None
        self._total = 0  # all processes' tokens of the windows logged so far
        # Counted here: Lightning's batch_idx restarts each epoch, which would stretch the window
        # that spans an epoch's end.
        self._batches = 0
        self.configured_peak = configured_peak
        self.peak: float | None = None  # per device, set at the start of training; None: no MFU
        # Counted in setup, before FSDP or ZeRO-3 shard the parameters; None: no MFU.
        self._flops: TrainingFlops | None = None
        self._window_flops: Any = 0.0
        self._world_size = 1
        self._restored: dict[str, Any] | None = None  # the checkpoint's counters, for a resumed fit

    @property
    def total_tokens(self) -> int:
        """Tokens trained on by all processes (read after training: ``on_train_end`` adds the last,
        unlogged window)."""
        return int(self._total)

    def state_dict(self) -> dict[str, Any]:
        # The unlogged window's count stays as it is (a device tensor for padded batches): reading
        # it here would stop a GPU's host at every checkpoint. It is this process's: under DDP the
        # other ranks' are taken to be as many (exact in one process, and for unpadded blocks).
        return {"total": int(self._total), "window": self._tokens, "world_size": self._world_size,
                "batches": self._batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Taken up only by a fit that continues (on_train_start): Lightning restores callbacks for
        # every checkpoint it loads, the best one that the final validation scores among them.
        self._restored = dict(state_dict)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total += round(self._summed(trainer, self._tokens)[0])
        self._tokens = 0

    @staticmethod
    def _summed(trainer: L.Trainer, *counts: Any) -> list[float]:
        """Each count summed over the processes, in one collective."""
        if trainer.world_size <= 1:
            return [float(c) for c in counts]
        device = trainer.strategy.root_device
        local = torch.stack([torch.as_tensor(c, dtype=torch.float64, device=device) for c in counts])
        return [float(c) for c in trainer.strategy.reduce(local, reduce_op="sum")]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning calls this before the strategy wraps the model: FSDP's parameters are this
        # process's shard afterwards, which made an MFU under 2 processes half of the true one.
        model = getattr(pl_module, "model", None)
        if stage == "fit" and isinstance(model, torch.nn.Module):
            self._flops = training_flops(model)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only now are the device and the precision plugin known.
        found = peak_flops(self.configured_peak, trainer.strategy.root_device, str(trainer.precision))
        self.peak = found[0] if found else None
        if found and trainer.is_global_zero:
            log.info("train/mfu against %.3g FLOP/s per device (%s)", *found)
        self._since = time.perf_counter()
        self._world_size = trainer.world_size
        if self._restored is not None:
            window = int(self._restored.get("window", 0)) * int(self._restored.get("world_size", 1))
            self._total = int(self._restored.get("total", 0)) + window
            self._batches = int(self._restored.get("batches", 0))
            # The clock restarts with the resumed run, and so does its first window.
            self._tokens, self._window_flops = 0, 0.0
            self._restored = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating_since = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validating_since is not None:  # the window's clock resumes where validation began
            self._since += time.perf_counter() - self._validating_since
        self._validating_since = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        tokens = mask.sum() if mask is not None else int(batch["input_ids"].numel())
        if self.peak and self._flops is not None:  # no peak (an unknown GPU): no MFU, nothing to add up
            # By each batch's own lengths: padded batches differ in how far their tokens attend.
            labels = batch.get("labels") if self._flops.target is not None else None
            self._window_flops = self._window_flops + self._flops.batch(
                tokens, int(batch["input_ids"].shape[-1]),
                0 if labels is None else (labels != -100).sum(), 0 if labels is None else int(labels.shape[-1]))
        self._tokens = self._tokens + tokens
        self._batches += 1
        if self._batches % self.every == 0:
            window, flops = self._summed(trainer, self._tokens, self._window_flops)
            self._total += round(window)
            now = time.perf_counter()
            seconds = max(now - self._since, 1e-9)
            rate = window / seconds
            pl_module.log("train/tokens_per_sec", float(rate), prog_bar=True)
            # Per device too, so runs on different device counts compare directly.
            pl_module.log("train/tokens_per_sec_per_device", float(rate) / trainer.world_size)
            if self.peak and flops:
                pl_module.log("train/mfu", flops / seconds / (self.peak * trainer.world_size), prog_bar=True)
            self._window_flops = 0.0
            self._tokens, self._since = 0, now


class MonitorLogged(L.Callback):
    """At the end of Lightning's sanity check (validation batches before training): the metric the
    best checkpoint monitors must be among those validation logged.

    Otherwise a misspelled checkpoint.monitor is found at the first real validation, after
    val_check_interval steps of training. ``build_trainer`` asks for a one-batch sanity check when
    the monitor is not the task's own; Lightning runs it under ``isolate_rng``, so training draws
    the same random numbers with or without it.
    """

    def __init__(self, monitor: str, error: Callable[[list[str]], Exception]):
        self.monitor, self.error = monitor, error

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise self.error(sorted(k for k in trainer.callback_metrics if k.startswith("val/")))


class LearningRate(L.Callback):
    """Logs ``train/lr`` of the first parameter group on the steps the loggers write: the rate the
    step uses. Read at the batch's start, as Lightning's LearningRateMonitor does; at its end the
    per-step scheduler has already moved on to the next step's rate."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.optimizers:
            # The same rate at every micro-batch of an optimizer step: logged as it is, not averaged.
            log_step(pl_module, "train/lr", trainer.optimizers[0].param_groups[0]["lr"], mean=False)


class ValidationCoverage(L.Callback):
    """Says once, at the first validation of ``fit``, when ``trainer.limit_val_batches`` leaves part
    of the validation split unscored: the val/* metrics and the best checkpoint then rest on part
    of it, which nothing else in the run's output shows."""

    def __init__(self) -> None:
        self.done = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.done or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.done = True
        loaders = trainer.val_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        try:
            whole = sum(len(loader) for loader in loaders)
        except TypeError:  # an iterable dataset without a length: nothing to compare with
            return
        scored = int(sum(trainer.num_val_batches))
        if scored < whole and trainer.is_global_zero:
            limit = trainer.limit_val_batches
            log.warning("Validation scores %d of its %d batches per process (trainer.limit_val_batches=%s): the "
                        "val/* metrics and the best checkpoint rest on that part of the split. "
                        "trainer.limit_val_batches=null scores all of it.", scored, whole, limit)


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, refreshed every step on the CPU and every ``every`` steps on accelerators.

    Each refresh reads the bar's metrics (the loss, tokens/s) as Python numbers, a host sync that
    would stall a GPU once per step; ``every`` is the logging interval, where Lightning syncs anyway.
    """

    def __init__(self, every: int):
        super().__init__()
        self.every = max(1, every)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._refresh_rate = 1 if trainer.strategy.root_device.type == "cpu" else self.every


class LastValidation(L.Callback):
    """Remembers what the newest validation during ``fit`` logged, and at which optimizer step.

    A run validates its final weights once more after ``fit`` so the printed numbers describe what
    is exported. When ``fit`` itself ended on a validation (``max_steps`` a multiple of
    ``val_check_interval``, the usual case) that second pass would score the same weights on the same
    batches again and log a second point at the same step: ``metrics_at`` hands back the first one.
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self.metrics: dict[str, float] = {}
        self._before: dict[str, Any] = {}

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = dict(trainer.logged_metrics)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":  # trainer.validate() after fit: not ours
            return
        # Lightning puts a fresh value object under every key this validation logged, so identity
        # against the snapshot picks exactly the validation's own metrics (what trainer.validate returns).
        logged = trainer.logged_metrics
        self.metrics = {k: float(v) for k, v in logged.items() if k not in self._before or v is not self._before[k]}
        self.step = trainer.global_step
        self._before = {}

    def metrics_at(self, step: int) -> dict[str, float] | None:
        """The metrics of a validation at ``step``; None when the newest one was earlier (or none ran)."""
        return dict(self.metrics) if self.step == step and self.metrics else None


class StepValidation(L.Callback):
    """Validation right after every ``every``-th optimizer step, counted across epochs: what lmlab's
    int ``trainer.val_check_interval`` means, with gradient accumulation too.

    ``build_trainer`` hands Lightning ``every × accumulate_grad_batches`` as its interval, which
    Lightning counts in training batches across epochs. It also steps the optimizer on an epoch's
    last, partial accumulation, so when an epoch is not a whole number of accumulations its batch
    count runs ahead of the optimizer steps from the first epoch's end on, and validation (with the
    checkpoints after it) would land in the middle of an accumulation: 10 batches an epoch,
    accumulating 4, every 2 steps, step 4 ends at batch 14 and Lightning validates at batch 16.
    Then this callback decides instead, after each training batch, from the optimizer step itself;
    the decision depends on the step only, so under DDP every rank takes the same one. Where each
    epoch is whole accumulations it does nothing: Lightning's own count is exact there.

    Lightning has no public "validate after this batch"; it reads ``trainer.val_check_batch`` (a
    Trainer attribute its fit loop sets from ``val_check_interval``) right after
    ``on_train_batch_end`` and validates when the number of training batches so far is a multiple
    of it: 1 is a yes, ``sys.maxsize`` a no. A Lightning without the attribute gets a warning and
    Lightning's own count.
    """

    def __init__(self, every: int):
        self.every = every
        self.active = False
        self._step = 0
        self._due = False  # whether the newest training batch ended a step to validate after
        self._warned = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed fit first asks whether the batch its checkpoint was written after validated.
        # lmlab writes checkpoints after optimizer steps, so that batch's step answers.
        self._step = trainer.global_step
        self._due = self._step > 0 and self._step % self.every == 0
        self.active = False
        self._activate_if_needed(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._activate_if_needed(trainer)  # reloaded loaders (reload_dataloaders_every_n_epochs) change length

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = trainer.global_step != self._step
        self._step = trainer.global_step
        self._due = stepped and trainer.global_step % self.every == 0
        if self.active:
            self._steer(trainer)

    def _activate_if_needed(self, trainer: L.Trainer) -> None:
        if self.active or not partial_accumulations(trainer) or trainer.check_val_every_n_epoch is not None:
            return  # with check_val_every_n_epoch, Lightning counts within an epoch, where steps align
        if not isinstance(getattr(trainer, "val_check_batch", None), int):
            if trainer.is_global_zero and not self._warned:
                log.warning("This Lightning version has no trainer.val_check_batch: with epochs of %s batches "
                            "and trainer.accumulate_grad_batches=%d, validation may fall between optimizer "
                            "steps.", trainer.num_training_batches, trainer.accumulate_grad_batches)
            self._warned = True
            return
        self.active = True
        self._steer(trainer)

    def _steer(self, trainer: L.Trainer) -> None:
        trainer.val_check_batch = 1 if self._due else sys.maxsize


def partial_accumulations(trainer: L.Trainer) -> bool:
    """Whether an epoch may end on a partial accumulation, which Lightning steps the optimizer on."""
    batches, accumulate = trainer.num_training_batches, int(trainer.accumulate_grad_batches)
    return accumulate > 1 and (not math.isfinite(batches) or int(batches) % accumulate != 0)
