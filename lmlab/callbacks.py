"""Small Lightning callbacks lmlab adds to every run."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from lmlab.flops import flops_per_token, peak_flops
from lmlab.step_logging import log_step

log = logging.getLogger("lmlab")


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_sec`` (non-padding tokens, all processes) every ``every`` steps.

    Lightning's ThroughputMonitor needs a FLOP count and its metric names use '|', which MLflow
    rejects; counting tokens over a window of steps is all this needs.
    """

    def __init__(self, every: int = 10, configured_peak: float | None = None):
        self.every = max(1, every)
        # Padded batches count their mask on the device; the host reads the count once per window,
        # not once per step (each read would stall a GPU).
        self._tokens: Any = 0
        self._since = 0.0
        self._total: Any = 0
        self.configured_peak = configured_peak
        self.peak: float | None = None  # per device, set at the start of training; None: no MFU
        self._flops_per_token: float | None = None

    @property
    def total_tokens(self) -> int:
        return int(self._total)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Only now are the device and the precision plugin known.
        found = peak_flops(self.configured_peak, trainer.strategy.root_device, str(trainer.precision))
        self.peak = found[0] if found else None
        if found and trainer.is_global_zero:
            log.info("train/mfu against %.3g FLOP/s per device (%s)", *found)
        self._since = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        tokens = mask.sum() if mask is not None else int(batch["input_ids"].numel())
        tokens = tokens * trainer.world_size
        if self.peak and self._flops_per_token is None and hasattr(pl_module, "model"):
            self._flops_per_token = flops_per_token(pl_module.model, int(batch["input_ids"].shape[-1])) or 0.0
        self._tokens = self._tokens + tokens
        self._total = self._total + tokens
        if (batch_idx + 1) % self.every == 0:
            now = time.perf_counter()
            rate = int(self._tokens) / max(now - self._since, 1e-9)
            pl_module.log("train/tokens_per_sec", float(rate), prog_bar=True)
            # Per device too, so runs on different device counts compare directly.
            pl_module.log("train/tokens_per_sec_per_device", float(rate) / trainer.world_size)
            if self.peak and self._flops_per_token:
                mfu = self._flops_per_token * rate / (self.peak * trainer.world_size)
                pl_module.log("train/mfu", float(mfu), prog_bar=True)
            self._tokens, self._since = 0, now


class LearningRate(L.Callback):
    """Logs ``train/lr`` of the first parameter group on the steps the loggers write."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.optimizers:
            log_step(pl_module, "train/lr", trainer.optimizers[0].param_groups[0]["lr"])


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
