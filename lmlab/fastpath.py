"""Faster, numerically equivalent pieces swapped into a Hugging Face model before training.

The model's config (and so its export) is left as it is: these change how a function is computed,
not which function it is.
"""

from __future__ import annotations

import torch
from transformers.activations import GELUTanh, NewGELUActivation


def fuse_activations(model: torch.nn.Module) -> int:
    """Replaces ``gelu_new`` modules (GPT-2's MLP activation) with torch's one-kernel tanh GELU.

    ``NewGELUActivation`` spells the tanh approximation out in eight elementwise operations, each a
    pass over the (tokens x 4·width) activations forward and again backward; on a CPU that was 12% of
    a tiny GPT-2's training step. ``F.gelu(x, approximate="tanh")`` is the same formula in one pass
    (equal to float rounding). Returns the number of modules replaced.
    """
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]
    for parent, name in targets:
        setattr(parent, name, GELUTanh())
    return len(targets)
