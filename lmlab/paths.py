"""Where lmlab's own Hydra configs live (inside the package in a wheel, beside it in a checkout),
whether a model reference is a path, and whether lmlab's cache can take a new entry."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from lmlab.errors import LmlabError, config_error

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


def writable_cache_dir(directory: Path) -> Path:
    """``directory`` of lmlab's cache (``paths.cache``), created if need be, once a file can be made in it.

    Called before the work whose result goes there (training a tokenizer, tokenizing a corpus,
    downloading a model), so a cache that cannot be written stops the run at once, named, instead of
    with a bare PermissionError after it. Reading entries needs none of this: a read-only cache
    still serves the entries in it.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise _not_writable(directory, exc) from exc
    return directory


def _not_writable(directory: Path, exc: OSError) -> LmlabError:
    blocker = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        reason = f"{blocker} is a file, not a folder"
    else:
        reason = exc.strerror or f"{type(exc).__name__}: {exc}"
    return config_error(
        "paths.cache", f"lmlab's cache folder {directory} cannot be written ({reason})",
        "Set the LMLAB_CACHE_DIR environment variable (or paths.cache=DIR) to a folder this user can write, or "
        "make that one writable. A read-only shared cache still serves the entries already in it (tokenizers, "
        "tokenized data, downloaded models); one it lacks must be made by a run of a user who can write there.",
    )
