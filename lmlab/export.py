"""Hugging Face export: ``save_pretrained`` weights (safetensors), config and tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.atomic import atomic_dir
from lmlab.models.build import padding_ids

# transformers' "no limit" default is int(1e30); anything this large was never a real limit.
UNSET_LENGTH = int(1e12)
POSITION_KEYS = ("max_position_embeddings", "n_positions")


def export_hf(model: Any, tokenizer: Any, destination: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Write the model and tokenizer to ``destination`` atomically; returns the directory.

    ``state_dict`` replaces the model's own tensors: the full weights gathered from a sharded
    (FSDP / DeepSpeed) model, whose own parameters are only this process's shard. The saved
    tokenizer's ``model_max_length`` is capped at the model's positions (see ``export_length``), and a
    generating model's ``generation_config.json`` suppresses its padding ids (see ``padding_suppressed``).
    """
    destination = Path(destination)
    with atomic_dir(destination) as tmp:
        with padding_suppressed(model, len(tokenizer)):
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict or None)
        with length_for_export(tokenizer, position_limit(getattr(model, "config", None))):
            tokenizer.save_pretrained(str(tmp))
    return destination


def position_limit(config: Any) -> int | None:
    """The longest input the model's position table holds, or None where nothing bounds it (T5's buckets)."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def export_length(current: int | None, positions: int | None) -> int | None:
    """The ``model_max_length`` an export records.

    A tokenizer trained from scratch carries transformers' huge "unset" value, so
    ``truncation=True`` never cuts and a long input overruns the position table; such a value, or
    one beyond the positions, becomes the positions. A smaller limit a pretrained tokenizer already
    had is kept.
    """
    if positions is None or current is None:
        return current
    if current >= UNSET_LENGTH or current > positions:
        return positions
    return current


@contextlib.contextmanager
def length_for_export(tokenizer: Any, positions: int | None) -> Iterator[None]:
    """Inside the block ``tokenizer.model_max_length`` is ``export_length``'s value for a save."""
    # The run goes on using the tokenizer after the export (test, predictions): it gets its value back.
    current = getattr(tokenizer, "model_max_length", None)
    wanted = export_length(current, positions)
    if wanted == current:
        yield
        return
    tokenizer.model_max_length = wanted
    try:
        yield
    finally:
        tokenizer.model_max_length = current


def suppressed_tokens(generation_config: Any, config: Any, tokens: int) -> list[int] | None:
    """``generation_config.suppress_tokens`` plus the model's padding ids (``padding_ids``); None if neither.

    A pretrained model's own suppressed ids are kept.
    """
    own = list(getattr(generation_config, "suppress_tokens", None) or [])
    padding = padding_ids(config, tokens)
    if not padding:
        return own or None
    return sorted({*own, *padding})


@contextlib.contextmanager
def padding_suppressed(model: Any, tokens: int) -> Iterator[None]:
    """Inside the block a generating model's ``generation_config`` suppresses its padding ids, for a save.

    ``model.vocab_multiple`` rounds the output rows up past the tokenizer's ``tokens`` ids. A bare
    ``generate()`` or a pipeline on the export reads generation_config.json, and its
    ``suppress_tokens`` sets those ids' logits to -inf in every decoding (greedy, beam, sampling at
    any temperature). The weights are left as they are, so the export scores the loss the run did;
    encoders (fill-mask) have no generation config to carry it.
    """
    generation_config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation_config is None or not (callable(can_generate) and can_generate()):
        yield
        return
    current = generation_config.suppress_tokens
    wanted = suppressed_tokens(generation_config, model.config, tokens)
    if wanted == current:
        yield
        return
    # The run goes on generating with the model after the export (test): it gets its value back.
    generation_config.suppress_tokens = wanted
    try:
        yield
    finally:
        generation_config.suppress_tokens = current
