"""Plugin Hydra configs: where they are and that they never shadow a core config file."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.paths import config_dir


def _yaml_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}


def plugin_config_dirs() -> dict[str, tuple[str, Path]]:
    """{entry-point name: (package, folder)} for every plugin config package that imports."""
    found = {}
    for name, package in registry.config_packages().items():
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError) as exc:
            spec, reason = None, str(exc)
        else:
            reason = "package not found"
        if spec is None or not spec.submodule_search_locations:
            warnings.warn(f"lmlab plugin config '{name}' ({package}) is skipped: {reason}", RuntimeWarning, stacklevel=2)
            continue
        found[name] = (package, Path(list(spec.submodule_search_locations)[0]))
    return found


def check_no_shadowing() -> None:
    """A plugin may add group options; replacing one of lmlab's own files is an error."""
    core = _yaml_files(config_dir())
    seen: dict[str, str] = {}
    for name, (package, folder) in plugin_config_dirs().items():
        for rel in sorted(_yaml_files(folder)):
            if rel in core or rel == "config.yaml":
                raise LmlabError(
                    f"plugin '{name}' ({package}) ships '{rel}', which would shadow lmlab's own "
                    f"conf/{rel}. A plugin adds new options under new names: rename it (e.g. "
                    f"'{Path(rel).parent}/{name}_{Path(rel).name}') or uninstall the plugin."
                )
            if rel in seen:
                raise LmlabError(f"plugins '{seen[rel]}' and '{name}' both ship '{rel}'. Rename one of them.")
            seen[rel] = name
