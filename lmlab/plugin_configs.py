"""Plugin Hydra configs: where they are and that they never shadow a core config file."""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.paths import config_dir, experiments_dir

# The folders are asked for several times per command (the shadowing check, Hydra's search path, the
# key check): a broken plugin is said once per process, not once per asking.
_reported: set[str] = set()


def _yaml_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*.yaml")}


def _skip(name: str, package: str, reason: str) -> None:
    message = (f"lmlab plugin config '{name}' ({package}, from {registry.config_origin(name)}) failed to import "
               f"and is skipped, with the options it adds: {reason}")
    if message not in _reported:
        _reported.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def plugin_config_dirs() -> dict[str, tuple[str, Path]]:
    """{entry-point name: (package, folder)} for every plugin config package that imports.

    Imported here, not only looked up: Hydra imports it to read its files, and an error raised by the
    package's ``__init__`` there would end every command, ``--help`` included, in a traceback.
    """
    found = {}
    for name, package in registry.config_packages().items():
        try:
            module = importlib.import_module(package)
        except Exception as exc:  # a broken plugin must not take the rest down
            _skip(name, package, f"{type(exc).__name__}: {exc}")
            continue
        folders = list(getattr(module, "__path__", []))
        if not folders:
            _skip(name, package, "it is a module, not a package folder of config groups")
            continue
        found[name] = (package, Path(folders[0]))
    return found


def _hydra_files() -> dict[str, str]:
    """The options Hydra itself and the Hydra plugins provide, by their path in the config tree.

    Those in Hydra's ConfigStore (lmlab's Optuna sweeper and samplers, the basic, joblib and submitit
    launchers) are replaced by a YAML file of the same path anywhere on the search path, a plugin's
    included, with no more than a deprecation note; Hydra's own files (pkg://hydra.conf) hide it.
    """
    import hydra.conf
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports every hydra_plugins module: what they store exists from here on

    def walk(node: dict, prefix: str) -> dict[str, str]:
        found = {}
        for key, value in node.items():
            if isinstance(value, dict):
                found.update(walk(value, f"{prefix}{key}/"))
            elif key.endswith(".yaml") and not key.startswith("_"):
                found[f"{prefix}{key}"] = (f"the option {prefix}{key.removesuffix('.yaml')} that '{value.provider}' "
                                           "stores in Hydra's ConfigStore")
        return found

    files = walk(ConfigStore.instance().repo, "")
    files.update({rel: f"Hydra's own {rel} (pkg://hydra.conf)" for folder in hydra.conf.__path__
                  for rel in _yaml_files(Path(folder))})
    return files


def _core_files() -> dict[str, str]:
    """lmlab's own config files, and Hydra's, by their path in Hydra's config tree: where each one lives.

    The experiment presets are not under conf/: ``lmlab.cli.register_experiments`` stores each
    experiments/NAME.yaml in Hydra's ConfigStore as experiment/NAME.
    """
    files = _hydra_files()
    files.update({rel: f"conf/{rel}" for rel in _yaml_files(config_dir())})
    for path in experiments_dir().glob("*.yaml"):
        files[f"experiment/{path.name}"] = f"experiments/{path.name} (+experiment={path.stem})"
    return files


def _owner(where: str) -> str:
    return where if where.startswith(("the option", "Hydra's")) else f"lmlab's own {where}"


def check_no_shadowing(user_dir: Path | None = None) -> None:
    """A plugin, or the folder of Hydra's ``--config-dir`` (``user_dir``), may add group options;
    replacing one of lmlab's own files, or an option Hydra or a Hydra plugin provides, is an error.

    Hydra would not say a word: a group file of lmlab's hides the other one, a file named like an
    experiment preset is merged into lmlab's preset, and one named like a ConfigStore option (the
    Optuna sampler ``tpe``) replaces it.
    """
    core = _core_files()
    seen: dict[str, str] = {}
    for name, (package, folder) in plugin_config_dirs().items():
        for rel in sorted(_yaml_files(folder)):
            if rel in core:
                raise LmlabError(
                    f"plugin '{name}' ({package}) ships '{rel}', which would shadow {_owner(core[rel])}. "
                    "A plugin adds new options under new names: rename it (e.g. "
                    f"'{Path(rel).parent}/{name}_{Path(rel).name}') or uninstall the plugin."
                )
            if rel in seen:
                raise LmlabError(f"plugins '{seen[rel]}' and '{name}' both ship '{rel}'. Rename one of them.")
            seen[rel] = name
    # The user's folder may shadow neither lmlab's files nor a plugin's: Hydra would drop one unseen.
    owners = {rel: _owner(where) for rel, where in core.items()}
    owners.update({rel: f"the file of plugin '{name}'" for rel, name in seen.items() if rel not in owners})
    shadowing = sorted(_yaml_files(user_dir) & set(owners)) if user_dir is not None else []
    if shadowing:
        rel = shadowing[0]
        raise LmlabError(
            f"--config-dir '{user_dir}' holds '{rel}', which would shadow {owners[rel]}. Your own "
            f"files add new options under new names: rename it (e.g. '{Path(rel).parent}/my_{Path(rel).name}')."
        )
