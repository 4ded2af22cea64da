"""Gradient clipping (``trainer.gradient_clip_val``) where Lightning's own would fail.

Mixed precision: Lightning's ``MixedPrecision`` refuses to clip gradients for an optimizer that
unscales them inside its step (fused Adam/AdamW). The guard is meant for fp16, whose GradScaler
would otherwise be skipped before the clip, but it also fires under bf16, which has no scaler at
all (Lightning issue #21435, fixed upstream by #21436; Lightning 2.6.6 still has it). Every lmlab preset clips
(``trainer.gradient_clip_val=1.0``) with fused AdamW, so ``trainer=gpu`` would stop at its first step.

FSDP: Lightning's ``FSDPPrecision`` refuses to clip by norm, because the norm of sharded gradients
needs the root FSDP module's ``clip_grad_norm_``, which the precision plugin cannot reach. So under
FSDP lmlab takes ``gradient_clip_val`` away from Lightning and clips in a callback that can.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from lmlab.optim import steps_with_found_inf
from lmlab.precision import precision_name

MIXED = ("bf16-mixed", "16-mixed")


def _strategy_name(strategy: Any) -> str:
    return (strategy if isinstance(strategy, str) else type(strategy).__name__).lower()


class ClippingMixedPrecision(MixedPrecision):
    """``MixedPrecision`` whose clip works with fused optimizers, under bf16 and fp16 alike."""

    def clip_gradients(self, optimizer: Any, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        if clip_val > 0 and self.scaler is not None and steps_with_found_inf(optimizer):
            # fp16: unscale before clipping, as for any optimizer. The scaler's step then sees the
            # optimizer marked unscaled and hands the fused kernel no scale to divide by again.
            self.scaler.unscale_(optimizer)
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def _device(accelerator: Any) -> str | None:
    name = str(accelerator or "auto").lower()
    if name == "cpu":
        return "cpu"
    if name in ("gpu", "cuda"):
        return "cuda"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return None  # another accelerator (mps, tpu ...): Lightning's own choice


def use_clipping_mixed_precision(trainer_kwargs: dict[str, Any], strategy: Any) -> None:
    """Replaces ``precision: bf16-mixed | 16-mixed`` with :class:`ClippingMixedPrecision`, in place.

    Only where Lightning would build a plain ``MixedPrecision`` (one device or DDP). FSDP and
    DeepSpeed bring precision plugins of their own and keep the precision string. Lightning's
    aliases count as what they stand for (``bf16``, ``16``: lmlab.precision).
    """
    precision = str(precision_name(trainer_kwargs.get("precision")) or "")
    name = _strategy_name(strategy)
    device = _device(trainer_kwargs.get("accelerator"))
    if precision not in MIXED or device is None or "fsdp" in name or "deepspeed" in name:
        return
    plugins = trainer_kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, Precision) for p in plugins):
        return  # a precision plugin of the user's own wins
    trainer_kwargs["plugins"] = [*plugins, ClippingMixedPrecision(precision, device)]
    del trainer_kwargs["precision"]


class ShardedClipping(L.Callback):
    """Clips sharded (FSDP) gradients with the root module's ``clip_grad_norm_``, before the step."""

    def __init__(self, clip_val: float, algorithm: str):
        self.clip_val, self.algorithm = float(clip_val), str(algorithm or "norm")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and steps_with_found_inf(optimizer):
            scaler.unscale_(optimizer)  # fp16: clip the true gradients (Lightning did it for other optimizers)
        if self.algorithm == "value":
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_value_(params, self.clip_val)
        else:
            trainer.strategy.model.clip_grad_norm_(self.clip_val)


def sharded_clipping(trainer_kwargs: dict[str, Any], strategy: Any) -> list[L.Callback]:
    """Under FSDP: moves ``gradient_clip_val`` out of ``trainer_kwargs`` into a :class:`ShardedClipping`."""
    name = _strategy_name(strategy)
    clip_val = trainer_kwargs.get("gradient_clip_val")
    if "fsdp" not in name or not clip_val:
        return []
    trainer_kwargs["gradient_clip_val"] = None
    return [ShardedClipping(clip_val, trainer_kwargs.pop("gradient_clip_algorithm", None) or "norm")]
