"""Where lmlab's own Hydra configs live (inside the package in a wheel, beside it in a checkout), and
whether a model reference is a path."""

from __future__ import annotations

import re
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _first_existing(name: str) -> Path:
    # A wheel carries conf/ and experiments/ inside the package (pyproject force-include);
    # an editable checkout keeps them at the top level next to the package.
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lmlab is installed without its '{name}' folder (looked in {_PACKAGE})")


def config_dir() -> Path:
    return _first_existing("conf")


def experiments_dir() -> Path:
    return _first_existing("experiments")


# A Hugging Face hub id: a name, or an owner and a name.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_local_reference(ref: str) -> bool:
    """Whether a model or tokenizer reference is a path on this machine, existing or not.

    Hub ids ("bert-base-uncased", "google/electra-small") are also valid relative paths. A reference
    that exists, starts like a path, cannot be a hub id (two '/', say), or whose parent folder exists
    here is a path, so a typo in it fails at once, naming the path, instead of going to the hub
    (a minute of retries offline, then an error about the network).
    """
    path = Path(ref).expanduser()
    if path.exists() or ref.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(ref):
        return True
    return path.parent != Path(".") and path.parent.is_dir()
