"""The sequence lengths a model was trained with, kept in its export so that scoring it reads the
data alike.

A classifier trained on 64-token texts and scored (``mode=test``) with the data preset's 128 gets
other inputs, and other numbers than its run printed. lmlab writes the training run's
``data.max_length`` / ``block_size`` / ... into the exported config.json (``lmlab_data_lengths``);
the modes that use a trained model without training it take them over unless the command line
sets them.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

LENGTH_KEYS = ("max_length", "block_size", "max_source_length", "max_target_length")
CONFIG_KEY = "lmlab_data_lengths"


def of_data(data_cfg: DictConfig) -> dict[str, int]:
    """The length settings ``data_cfg`` has (resolved), by key."""
    return {key: int(data_cfg[key]) for key in LENGTH_KEYS if data_cfg.get(key) is not None}


def record(model: Any, data_cfg: DictConfig) -> None:
    """Stores the training data's lengths in ``model.config``: save_pretrained writes them to config.json."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, of_data(data_cfg))


def given_on_command_line() -> set[str] | None:
    """The length keys the command line set (``data.max_length=...``); None outside a Hydra run,
    where nothing tells a given value from a preset's."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:
        return None
    return {key for override in overrides for key in LENGTH_KEYS
            if override.lstrip("+~").startswith(f"data.{key}=")}


def adopt_trained(cfg: DictConfig, model_config: Any, source: str) -> dict[str, int]:
    """Sets cfg.data's lengths to those ``model_config`` was trained with, unless the command line
    gave one of them (then, and outside a Hydra run, a warning says the scores will differ).
    Returns what it changed."""
    trained = getattr(model_config, CONFIG_KEY, None)
    if not isinstance(trained, dict):  # not an lmlab export, or an older one: the data config's lengths
        return {}
    given = given_on_command_line()
    # A length given on the command line is the user's choice; the others are left as they are too,
    # since presets tie them together (wnut16's max_length follows its block_size).
    adopt = given == set()
    changed: dict[str, int] = {}
    for key, value in trained.items():
        current = cfg.data.get(key) if key in LENGTH_KEYS else None
        if current is None or int(current) == int(value):
            continue
        if not adopt:
            log.warning("data.%s=%s, but %s was trained with data.%s=%s: its scores will differ from its "
                        "training run's", key, current, source, key, value)
            continue
        changed[key] = int(value)
    if changed:
        with open_dict(cfg):
            for key, value in changed.items():
                cfg.data[key] = value
        log.info("Reading the data as %s was trained: %s (set data.<key>= to choose otherwise)", source,
                 ", ".join(f"data.{k}={v}" for k, v in changed.items()))
    return changed


def adopt_for_mode(cfg: DictConfig, mode: str) -> dict[str, int]:
    """``adopt_trained`` for the modes that use model.pretrained as trained (test, predict, quantize, prune)."""
    ref = cfg.model.get("pretrained")
    if mode == "fit" or not ref:
        return {}
    from lmlab import pretrained

    trust = bool(cfg.model.get("trust_remote_code", False))
    source = pretrained.resolve(str(ref), cfg)
    return adopt_trained(cfg, pretrained._auto_config(source, trust), source)
