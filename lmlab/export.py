"""Hugging Face export: ``save_pretrained`` weights (safetensors), config and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.atomic import atomic_dir


def export_hf(model: Any, tokenizer: Any, destination: Path, state_dict: dict[str, Any] | None = None) -> Path:
    """Write the model and tokenizer to ``destination`` atomically; returns the directory.

    ``state_dict`` replaces the model's own tensors: the full weights gathered from a sharded
    (FSDP / DeepSpeed) model, whose own parameters are only this process's shard.
    """
    destination = Path(destination)
    with atomic_dir(destination) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict or None)
        tokenizer.save_pretrained(str(tmp))
    return destination
