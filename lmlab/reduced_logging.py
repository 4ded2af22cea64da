"""Epoch-level metrics that are already reduced over processes when they are logged.

lmlab's tasks add validation and test sums into torchmetrics metrics, whose ``compute()``
all-reduces them, so every process logs the same global value. Lightning cannot tell and, under
DDP, warns once per name that ``sync_dist=True`` is recommended. Syncing would cost one more
collective per metric and only average equal values, so ``log_reduced`` logs them as they are and
silences that warning for exactly the names it logs: a plugin task that logs its own per-process
values under other names still gets Lightning's advice.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

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


def per_token(total: torch.Tensor, tokens: torch.Tensor, names: str | None) -> torch.Tensor:
    """``total / tokens``, or NaN when no token was counted, with a warning naming ``names`` (if given).

    ``total / tokens.clamp(min=1)`` would give 0 there: the best validation loss a checkpoint or a
    sweep could see, for an evaluation that measured nothing. NaN is the worst to ModelCheckpoint
    and no result to a sweep.
    """
    if names is not None and tokens == 0:  # one host read per evaluation, not per step
        rank_zero_warn(f"the evaluation counted no token (its rows are too short, fully masked, or there are "
                       f"none): {names} are logged as NaN. Give data a longer validation split or longer rows.")
    return torch.where(tokens > 0, total / tokens.clamp(min=1), math.nan)
