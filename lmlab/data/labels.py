"""The labels of the trained head a run starts from (``model.pretrained``), for the task datamodules.

A model is scored (``mode=test``) or fine-tuned further on data that often has only some of its
labels: a test file without a rare tag, a review set that is all positive. Such data is read with
the model's own ``label2id``, so ids, logits and metric names stay the model's; labels the model
does not have cannot be scored and are refused (in fit mode they get a fresh head instead).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig

log = logging.getLogger(__name__)
Where = TypeVar("Where")


@dataclass(frozen=True)
class ModelLabels:
    labels: list[str]  # in id order
    source: str  # the model directory (or hub name) they were read from
    mode: str  # the run's mode: fit, test, quantize, prune


def _root(data_cfg: DictConfig) -> DictConfig | None:
    # Datamodules are handed cfg.data alone; model.pretrained and mode live beside it in the run's
    # config. OmegaConf has no public way up the tree, so this uses the one it resolves
    # interpolations with. A data config built on its own (tests, plugins) has no model: None.
    root = data_cfg._get_root() if hasattr(data_cfg, "_get_root") else None
    if root is None or root is data_cfg or not isinstance(root, DictConfig) or "model" not in root:
        return None
    return root


def run_mode(data_cfg: DictConfig) -> str:
    root = _root(data_cfg)
    return str((root.get("mode") if root is not None else None) or "fit")


def starts_from_model(data_cfg: DictConfig) -> bool:
    """True when the run loads ``model.pretrained``: its labels are settled once the tokenizer is set."""
    root = _root(data_cfg)
    return root is not None and bool(root.model.get("pretrained"))


def of_pretrained(data_cfg: DictConfig, tokenizer: Any, head_suffix: str) -> ModelLabels | None:
    """The label names of ``model.pretrained``'s trained ``*{head_suffix}`` head, or None without one.

    A bare encoder (no such head in its ``architectures``) has placeholder labels (LABEL_0, ...)
    that mean nothing, so it gives None and the data's own labels build a fresh head.
    """
    from lmlab import pretrained

    root = _root(data_cfg)
    if root is None or not root.model.get("pretrained"):
        return None
    trust = bool(root.model.get("trust_remote_code", False))
    # train.py loads the tokenizer from model.pretrained's resolved directory: reading config.json
    # there spares a second download of an MLflow run's model.
    folder = str(getattr(tokenizer, "name_or_path", "") or "")
    if folder and (Path(folder) / "config.json").is_file():
        source = folder
    else:
        source = pretrained.resolve(str(root.model.pretrained), root)
    config = pretrained._auto_config(source, trust)
    if not any(str(a).endswith(head_suffix) for a in (getattr(config, "architectures", None) or [])):
        return None
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)))
    labels = [id2label.get(i, id2label.get(str(i))) for i in range(n)]
    if any(label is None for label in labels):
        return None
    return ModelLabels([str(label) for label in labels], source, run_mode(data_cfg))


def first_unknown(model: ModelLabels, labelled: Iterable[tuple[str, Where]]) -> tuple[str, Where] | None:
    """The first ``(label, where)`` whose label ``model`` lacks; None when the data fits the model.

    ``where`` is whatever the caller's error needs (a file and line). When the data fits and uses
    only some of the model's labels, that is logged: its ids stay the model's.
    """
    known, used = set(model.labels), set()
    for label, where in labelled:
        if label not in known:
            return label, where
        used.add(label)
    if len(used) < len(known):
        log.info("The data uses %d of the %d labels of %s; they keep the model's label ids",
                 len(used), len(known), model.source)
    return None
