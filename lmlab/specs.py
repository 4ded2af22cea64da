"""What a task and a model contribute to the registry: two small, frozen records."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """A model family: how to build its Hugging Face config and which heads it has.

    ``heads`` maps a head name that tasks ask for (``causal_lm``, ``masked_lm``,
    ``pretraining`` ...) to the Hugging Face class built for it with ``from_config``.
    """

    name: str
    config_class: type
    sizes: Mapping[str, Mapping[str, Any]]
    heads: Mapping[str, type]
    tokenizer: str  # tokenizer trained from scratch when tokenizer=auto: "bpe" or "wordpiece"
    positions_key: str  # config field that bounds the sequence length
    description: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """A training objective: its LightningModule, the head it needs and how data is packed.

    Every callable receives the whole composed config ``cfg``:
    ``head(cfg)`` names the model head the task needs for this configuration;
    ``build_module(cfg, model, tokenizer)`` returns the LightningModule;
    ``packing(cfg)`` tells the datamodule how to lay out examples;
    ``validate(cfg)`` rejects bad task settings before any data is read.
    ``monitor`` / ``monitor_mode`` pick the best checkpoint and are the sweep objective unless the
    config overrides them (``checkpoint.monitor``, ``objective.metric``).
    """

    name: str
    head: Callable[[Any], str]
    build_module: Callable[..., Any]
    packing: Callable[[Any], str]
    validate: Callable[[Any], None] = field(default=lambda cfg: None)
    export_class: str = "AutoModel"  # the transformers Auto class that reloads an export
    monitor: str = "val/loss"
    monitor_mode: str = "min"  # "max" for accuracy / F1
    # mode=predict: predict(cfg, module, tokenizer, trainer, out_dir) labels cfg.data.path and returns
    # the files it wrote; None when the task has nothing to predict (the LM objectives).
    predict: Callable[..., list] | None = None
    description: str = ""
