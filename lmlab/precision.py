"""``trainer.precision`` in Lightning's own words: the one place lmlab reads what precision a run uses.

Lightning takes the short aliases ``16``, ``"16"``, ``"bf16"``, ``32``, ``"32"``, ``64`` and ``"64"``
for ``"16-mixed"``, ``"bf16-mixed"``, ``"32-true"`` and ``"64-true"`` (and warns about the mixed
ones), so lmlab compares its choices (lmlab/clipping.py, lmlab/flops.py) against the full names.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torchmetrics import Metric

# Lightning's _PRECISION_INPUT_STR_ALIAS_CONVERSION (lightning.fabric.plugins.precision.precision);
# the integers are the same keys, as Hydra reads `trainer.precision=16`.
ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def precision_name(value: Any) -> Any:
    """The full name of a ``trainer.precision`` alias (``bf16`` -> ``bf16-mixed``, ``16`` -> ``16-mixed``).

    Full names and None come back unchanged, and so do values Lightning does not know: its own
    error names them as they were written.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    return ALIASES.get(str(value), value)


HALF = (torch.bfloat16, torch.float16)


def _to_float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype in HALF else tensor


class MetricsInFloat32(L.Callback):
    """Keeps every torchmetrics state of the module in float32 under ``bf16-true`` / ``16-true``.

    Those precisions cast the module with ``.to(dtype)``, which torchmetrics applies to its floating
    states too: a validation loss summed in bfloat16 stops growing once a batch's share falls below
    the rounding step (bf16 holds integers exactly only to 256), and in float16 it overflows past
    65,504. ``Metric.set_dtype`` would also turn integer counts into floats, so only half-precision
    states are cast back. Every epoch start, when the states are zero: nothing is lost.
    """

    def _restore(self, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, Metric) and any(
                    tensor.dtype in HALF for state in module.metric_state.values()
                    for tensor in (state if isinstance(state, list) else [state]) if isinstance(tensor, torch.Tensor)):
                module._apply(_to_float32)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(pl_module)
