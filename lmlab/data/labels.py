"""The labels of the trained head a run starts from (``model.pretrained``), for the task datamodules.

A model is scored (``mode=test``) or fine-tuned further on data that often has only some of its
labels: a test file without a rare tag, a review set that is all positive. Such data is read with
the model's own ``label2id``, so ids, logits and metric names stay the model's; labels the model
does not have cannot be scored and are refused (in fit mode they get a fresh head instead).

train.py hands a datamodule the model it starts from (its ``start_from``, or None without
model.pretrained) before the tokenizer is trained or loaded, so the checks of the labels fail fast.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
Where = TypeVar("Where")


@dataclass(frozen=True)
class ModelLabels:
    labels: list[str]  # in id order
    source: str  # the model directory (or hub name) they were read from
    mode: str  # the run's mode: fit, test, quantize, prune


@dataclass(frozen=True)
class StartingModel:
    """The model a run starts from, as train.py hands it to a task datamodule (``start_from``)."""

    source: str  # model.pretrained resolved: a local directory, or a hub name
    mode: str  # the run's mode
    trust_remote_code: bool = False


def of_pretrained(model: StartingModel, head_suffix: str) -> ModelLabels | None:
    """The label names of ``model``'s trained ``*{head_suffix}`` head, or None without one.

    A bare encoder (no such head in its ``architectures``) has placeholder labels (LABEL_0, ...)
    that mean nothing, so it gives None and the data's own labels build a fresh head.
    """
    from lmlab import pretrained

    config = pretrained._auto_config(model.source, model.trust_remote_code)
    if not any(str(a).endswith(head_suffix) for a in (getattr(config, "architectures", None) or [])):
        return None
    id2label = getattr(config, "id2label", None) or {}
    n = int(getattr(config, "num_labels", len(id2label)))
    labels = [id2label.get(i, id2label.get(str(i))) for i in range(n)]
    if any(label is None for label in labels):
        return None
    return ModelLabels([str(label) for label in labels], model.source, model.mode)


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
