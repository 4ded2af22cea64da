"""OmegaConf resolvers used by lmlab's configs; registered when ``lmlab`` is imported."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def if_pretrained(pretrained: Any, when_pretrained: Any, otherwise: Any) -> Any:
    """``when_pretrained`` if ``model.pretrained`` names a model, else ``otherwise``.

    Fine-tuning trained weights wants a learning rate ~20x below training from scratch (1e-3 wipes
    out what an encoder learnt, and the head never leaves chance); one default cannot serve both.
    """
    return when_pretrained if pretrained not in (None, "", False) else otherwise


def register() -> None:
    if not OmegaConf.has_resolver("lmlab.if_pretrained"):
        OmegaConf.register_new_resolver("lmlab.if_pretrained", if_pretrained)
