"""Keys that a user's own config file brings and nothing reads: typos that would otherwise pass.

Hydra refuses an unknown key on the command line (``optimizer.lrr=0.1``), but a config file of the
user's own (``--config-dir`` group files, ``+experiment=`` presets) is merged as written: its
``val_fracton: 0.02`` or ``optimizer: {learning_rate: 0.5}`` would sit unread beside the real key
and the run would use the default. The keys of the groups below are those lmlab's and the
installed plugins' config files define; anything else is refused, naming the key.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from lmlab.errors import config_error
from lmlab.paths import config_dir, experiments_dir

# Nodes whose keys are a fixed vocabulary. For task and model it is the union over every task's and
# model's files (a key of another task slips through; a misspelt one does not). model.config (any
# Hugging Face field, below model) and trainer (Lightning's Trainer checks its own arguments) are
# not checked.
CHECKED = ("data", "optimizer", "scheduler", "tokenizer", "logger", "checkpoint", "faults", "perf", "distill",
           "quantize", "prune", "objective", "task", "model")


def _roots() -> list[Path]:
    from lmlab.plugin_configs import plugin_config_dirs

    return [config_dir(), experiments_dir(), *(folder for _, folder in plugin_config_dirs().values())]


def _keys_in(path: Path, root: Path) -> dict[str, set[str]]:
    """{node: keys} that one shipped file defines."""
    text = path.read_text(encoding="utf-8")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}  # Hydra reports a broken file itself, naming it
    if not isinstance(doc, dict):
        return {}
    rel = path.relative_to(root).parts
    if "@package _global_" not in text and len(rel) == 2 and rel[0] in CHECKED:
        return {rel[0]: set(doc) - {"defaults"}}  # a group file: its keys are the group's
    return {node: set(doc[node]) for node in CHECKED if isinstance(doc.get(node), dict)}


@lru_cache(maxsize=1)
def known_keys() -> dict[str, frozenset[str]]:
    found: dict[str, set[str]] = {node: set() for node in CHECKED}
    for root in _roots():
        for path in root.rglob("*.yaml"):
            for node, keys in _keys_in(path, root).items():
                found[node] |= keys
    return {node: frozenset(keys) for node, keys in found.items()}


def check_known_keys(cfg: DictConfig) -> None:
    """Refuse a key of a checked group that no shipped config file defines (see the module docstring)."""
    known = known_keys()
    for node in CHECKED:
        value: Any = cfg.get(node)
        if not isinstance(value, DictConfig):
            continue
        for key in value:
            if key in known[node]:
                continue
            close = _nearest(known, node, str(key))
            hint = f"Did you mean {node}.{close}? " if close else ""
            raise config_error(
                f"{node}.{key}", "no config of lmlab or of an installed plugin has this key, so nothing would read it",
                f"{hint}Fix it where it is set (a +{node}.{key}= on the command line, your --config-dir group "
                f"file or +experiment= preset). The keys {node} takes"
                f"{' (of any ' + node + ')' if node in ('task', 'model') else ''}: {', '.join(sorted(known[node]))}.",
            )


def override_hints(args: list[str]) -> list[str]:
    """"Did you mean" lines for command-line overrides of keys no config defines, said after Hydra's
    own refusal (``Key 'whole_word_masking' is not in struct``), which names the key but no
    neighbour. Only keys one level under a checked group, with a close known key, get one."""
    known = known_keys()
    hints = []
    for arg in args:
        key, equals, _ = arg.partition("=")
        node, dot, name = key.partition(".")
        if not equals or not dot or "." in name or node not in known or name in known[node]:
            continue  # a group choice, +/~ additions and removals, nested or known keys
        close = _nearest(known, node, name)
        if close:
            hints.append(f"lmlab: {key} is no config key: did you mean {node}.{close}?")
    return hints


def _nearest(known: dict[str, frozenset[str]], node: str, name: str) -> str | None:
    """The key of ``node`` closest to the unknown ``name``, if any is close."""
    close = difflib.get_close_matches(name, sorted(known[node]), n=1)
    return close[0] if close else None
