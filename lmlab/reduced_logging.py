"""Epoch-level metrics that are already reduced over processes when they are logged.

lmlab's tasks add validation and test sums into torchmetrics metrics, whose ``compute()``
all-reduces them, so every process logs the same global value. Lightning cannot tell and, under
DDP, warns once per name that ``sync_dist=True`` is recommended. Syncing would cost one more
collective per metric and only average equal values, so ``log_reduced`` logs them as they are and
silences that warning for exactly the names it logs: a plugin task that logs its own per-process
values under other names still gets Lightning's advice.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L

_SILENCED: set[str] = set()


def _silence_sync_advice(name: str) -> None:
    if name in _SILENCED:
        return
    _SILENCED.add(name)
    warnings.filterwarnings(
        "ignore", message=re.escape(f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)`"))


def log_reduced(module: L.LightningModule, metrics: Mapping[str, Any], *, prog_bar: bool = False) -> None:
    """``module.log_dict(metrics)`` for values every process already holds in full (see above)."""
    for name in metrics:
        _silence_sync_advice(name)
    module.log_dict(dict(metrics), prog_bar=prog_bar)
