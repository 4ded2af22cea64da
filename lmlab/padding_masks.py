"""Padding masks handed to a model so that its forward never waits for the GPU.

Given a (B, T) padding mask, transformers' SDPA path asks ``mask.all()`` on the host each forward
(to drop a mask without padding, which lets SDPA pick the flash kernel). On a GPU that read stops
the host until the device has caught up, once per step. Two things avoid it:

- collators know on the host whether they padded, and leave the mask out of a batch without
  padding (``drop_if_unpadded``): no mask, no read, and flash stays possible;
- a padded batch reaches a bidirectional encoder as a (B, 1, 1, T) boolean mask (True: attend),
  which transformers hands to SDPA as it is (``for_model``).
"""

from __future__ import annotations

from typing import Any

import torch

# Encoders whose transformers code builds its mask with create_bidirectional_mask, which passes a
# 4-D mask through. A decoder (GPT-2, BERT with is_decoder) would take a 4-D mask as its whole
# mask and lose causality, so it is not in the list; nor is a model whose attention adds a float
# mask (eager) or builds its own (DeBERTa).
BIDIRECTIONAL_SDPA = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert"})


def for_model(model: torch.nn.Module, mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` as ``model``'s attention takes it without a host read: (B, 1, 1, T) bool for the
    encoders in BIDIRECTIONAL_SDPA under SDPA attention, otherwise unchanged."""
    config = getattr(model, "config", None)
    if (mask is None or mask.dim() != 2 or config is None
            or getattr(config, "_attn_implementation", None) != "sdpa"
            or getattr(config, "model_type", None) not in BIDIRECTIONAL_SDPA
            or getattr(config, "is_decoder", False)):
        return mask
    return mask[:, None, None, :].bool()


def drop_if_unpadded(batch: dict[str, Any], lengths: list[int]) -> dict[str, Any]:
    """Removes ``batch['attention_mask']`` when every row of the batch is ``max(lengths)`` long.

    A model given no mask attends everywhere, which is what an all-ones mask says.
    """
    if lengths and min(lengths) == max(lengths):
        batch.pop("attention_mask", None)
    return batch
