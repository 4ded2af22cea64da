"""Where lmlab's own Hydra configs live: inside the package in a wheel, beside it in a checkout."""

from __future__ import annotations

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
