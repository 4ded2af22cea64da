"""Tasks, models and datamodules, looked up by name from Python entry points.

Built-ins are declared in lmlab's own pyproject.toml under the same groups a plugin uses, so
there is exactly one way in. Each group is a plain dict filled once from
``importlib.metadata``; nothing is scanned at import time.
"""

from __future__ import annotations

import functools
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from lmlab.errors import LmlabError

GROUPS: dict[str, str] = {
    "task": "lmlab.tasks",
    "model": "lmlab.models",
    "datamodule": "lmlab.datamodules",
}
# The override that picks an entry of each kind: a datamodule is chosen by a key inside data/.
OVERRIDE: dict[str, str] = {"task": "task", "model": "model", "datamodule": "data.datamodule"}
# A plugin's Hydra YAML: the entry point names an importable package whose folder holds
# config groups (task/, model/, data/ ...); see hydra_plugins/lmlab_searchpath.
CONFIG_GROUP = "lmlab.configs"


class RegistryError(LmlabError):
    pass


# Why each entry point that failed to import did, by (group, name): the warning is said once per process,
# but every later get() of it must still say why (a sweep's jobs, a warning filtered away).
_failures: dict[tuple[str, str], str] = {}


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ep.value


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise RegistryError(
                f"two packages register '{ep.name}' in the entry-point group '{group}': "
                f"'{previous.value}' from {_origin(previous)} and '{ep.value}' from {_origin(ep)}. "
                "Names must be unique: uninstall one package or rename its entry point."
            )
        # The same value twice happens when one distribution is visible on sys.path twice
        # (an editable checkout plus a wheel): that is one registration, not a clash.
        found[ep.name] = ep
    return found


@functools.cache
def _load(group: str, name: str) -> Any:
    ep = _entry_points(group)[name]
    try:
        return ep.load()
    except Exception as exc:  # a broken plugin must not take the rest down
        _failures[(group, name)] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"lmlab plugin '{name}' ({ep.value}, from {_origin(ep)}) failed to import and is "
            f"skipped: {_failures[(group, name)]}",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _wrong_type(kind: str, name: str, obj: Any) -> RegistryError | None:
    """The error for an entry point whose object is not what ``kind`` needs, else None.

    Caught here, a plugin's ``TASK = {...}`` is named with its entry point; otherwise it would
    surface as an AttributeError deep inside a run.
    """
    from lmlab.specs import ModelSpec, TaskSpec

    expected = {"task": (TaskSpec, "an lmlab.specs.TaskSpec"), "model": (ModelSpec, "an lmlab.specs.ModelSpec")}
    if kind in expected:
        cls, wanted = expected[kind]
        if isinstance(obj, cls):
            return None
    else:
        # Called as Cls(data_cfg, packing=..., cache_dir=..., seed=...): a class, or a factory.
        if callable(obj):
            return None
        wanted = "a datamodule class (a LightningDataModule subclass)"
    ep = _entry_points(GROUPS[kind])[name]
    return RegistryError(
        f"{kind} '{name}' ({ep.value}, from {_origin(ep)}) is a {type(obj).__name__}, but an entry point "
        f"in the group '{GROUPS[kind]}' must name {wanted}. Fix that object or the entry point in the "
        "plugin's packaging, or uninstall the plugin."
    )


def names(kind: str) -> list[str]:
    """Names registered for ``kind`` (task, model, datamodule), without importing them."""
    return sorted(_entry_points(GROUPS[kind]))


def available(kind: str) -> dict[str, Any]:
    """Every entry of ``kind`` that imports; the ones that fail become warnings."""
    loaded = {name: _load(GROUPS[kind], name) for name in names(kind)}
    usable = {}
    for name, obj in loaded.items():
        if obj is None:
            continue
        wrong = _wrong_type(kind, name, obj)
        if wrong is not None:
            warnings.warn(f"lmlab plugin skipped: {wrong}", RuntimeWarning, stacklevel=2)
            continue
        usable[name] = obj
    return usable


def get(kind: str, name: str) -> Any:
    """The registered object, or an error listing the valid names."""
    group = GROUPS[kind]
    if name not in _entry_points(group):
        valid = ", ".join(names(kind)) or "(none)"
        raise RegistryError(
            f"unknown {kind} '{name}'. Registered {kind}s: {valid}. "
            f"Pick one of them (e.g. {OVERRIDE[kind]}={names(kind)[0] if names(kind) else '...'}) or install "
            f"the plugin that provides '{name}'."
        )
    obj = _load(group, name)
    if obj is None:
        ep = _entry_points(group)[name]
        raise RegistryError(
            f"{kind} '{name}' ({ep.value}, from {_origin(ep)}) is registered but failed to import: "
            f"{_failures.get((group, name), 'see the warning above')}. Fix or reinstall that package "
            "(or install what it imports)."
        )
    wrong = _wrong_type(kind, name, obj)
    if wrong is not None:
        raise wrong
    return obj


def config_packages() -> dict[str, str]:
    """Plugin config packages by entry-point name: {name: 'pkg.module'}."""
    return {ep.name: ep.value for ep in _entry_points(CONFIG_GROUP).values()}


def config_origin(name: str) -> str:
    """The distribution ('name version') registering the plugin config package ``name``."""
    return _origin(_entry_points(CONFIG_GROUP)[name])


def clear_cache() -> None:
    """Forget what was read, e.g. after a plugin was pip-installed in the same process."""
    _entry_points.cache_clear()
    _load.cache_clear()
    _failures.clear()
