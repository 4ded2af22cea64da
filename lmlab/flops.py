"""Model FLOPs utilisation: the FLOPs a training step must do, over what the device could do.

Training FLOPs per token follow the PaLM / nanoGPT estimate used in our performance issue:
6·N for the matrix multiplies of the forward and backward pass over N parameters, plus
12·L·H·Q·T for attention scores and values (L layers, H heads, Q head dim, T sequence length).
"""

from __future__ import annotations

from typing import Any

import torch

# Dense bf16/fp16 tensor-core peak per device, FLOP/s (vendor data sheets, no sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "T4": 65e12,
}


def _first(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def flops_per_token(model: torch.nn.Module, sequence: int) -> float | None:
    """Training FLOPs per token of a Hugging Face transformer at this sequence length."""
    config = getattr(model, "config", None)
    layers = _first(config, "n_layer", "num_hidden_layers", "num_layers")
    heads = _first(config, "n_head", "num_attention_heads", "num_heads")
    width = _first(config, "n_embd", "hidden_size", "d_model")
    if not (layers and heads and width):
        return None
    params = sum(p.numel() for p in model.parameters())
    head_dim = _first(config, "d_kv", "head_dim") or width // heads
    return 6.0 * params + 12.0 * layers * heads * head_dim * sequence


def peak_flops(configured: float | None = None) -> float | None:
    """The device's peak: the configured value, else the table entry matching the GPU's name."""
    if configured:
        return float(configured)
    if not torch.cuda.is_available():
        return None  # CPUs vary too much for a table: set perf.peak_flops to get MFU there
    return peak_flops_of(torch.cuda.get_device_name(0))


def peak_flops_of(device_name: str) -> float | None:
    """The table entry matching a GPU's name (``torch.cuda.get_device_name``), or None."""
    return next((value for key, value in PEAK_FLOPS.items() if key in device_name), None)
