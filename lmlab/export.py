"""Hugging Face export: ``save_pretrained`` weights (safetensors), config and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.atomic import atomic_dir


def export_hf(model: Any, tokenizer: Any, destination: Path) -> Path:
    """Write the model and tokenizer to ``destination`` atomically; returns the directory."""
    destination = Path(destination)
    with atomic_dir(destination) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    return destination
