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


REQUIRED = "lmlab.required"


def required(what: str = "") -> Any:
    """A preset's key the user must set (``${lmlab.required:...}``); reading it unset is an error.

    Not ``???``: Hydra merges a preset over the group defaults, and OmegaConf keeps the old value
    when the merged one is ``???``, so the requirement would vanish. lmlab.checks.check_required
    names the key before anything reads it; this error is the backstop.
    """
    from lmlab.errors import LmlabError

    raise LmlabError(f"a required config key is not set ({what}); set it on the command line")


def launch_time(pattern: str) -> str:
    """A run directory's time (``hydra.run.dir``): one for every rank of a torchrun or srun launch,
    which each resolve the directory on their own (``lmlab.distributed.launch_time``)."""
    from lmlab.distributed import launch_time as shared_time

    return shared_time(pattern)


def register() -> None:
    for name, fn in (("lmlab.if_pretrained", if_pretrained), (REQUIRED, required)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    if not OmegaConf.has_resolver("lmlab.launch_time"):
        # Cached as Hydra's ${now:} is: the directory must not move if the config is resolved again.
        OmegaConf.register_new_resolver("lmlab.launch_time", launch_time, use_cache=True)
