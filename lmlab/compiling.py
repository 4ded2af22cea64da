"""``model.compile=true``: torch.compile a task's model in place, falling back to eager if it fails."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


def compile_in_place(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """Compiles ``module``'s forward in place (``nn.Module.compile``) when ``enabled``.

    In place, not ``torch.compile(module)``: a wrapper would prefix every parameter name with
    ``_orig_mod.``, and checkpoints and the Hugging Face export must keep the model's own names.
    Compilation happens at the first call; a graph the compiler cannot handle runs eagerly
    (dynamo's ``suppress_errors``) with a warning instead of ending the run.
    """
    if not enabled:
        return module
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    module.compile()
    log.info("model.compile=true: %s is compiled at its first step (this takes a while)", type(module).__name__)
    return module


def compile_function(function: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile(function)``, falling back to eager where a graph fails, as compile_in_place does."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    log.info("model.compile=true: %s is compiled at its first call (this takes a while)",
             getattr(function, "__qualname__", function))
    return torch.compile(function)
