"""Model FLOPs utilisation: the FLOPs a training step must do, over what the device could do.

Training FLOPs per token follow the PaLM / nanoGPT estimate used in our performance issue:
6·N for the matrix multiplies of the forward and backward pass over N parameters, plus
12·L·H·Q·T for attention scores and values (L layers, H heads, Q head dim, T sequence length).
N is every parameter, as in the issue's figures for the Hugging Face Trainer (13% for GPT-2 124M at
150,870 tokens/s on an H100 needs the embeddings in N), so lmlab's MFU compares with them; it
overstates MLM's work, whose prediction head lmlab runs at the masked positions only. A word
embedding table that no output head shares (a classification or NER encoder's) is only looked up,
so it is left out of N; an encoder-decoder counts each stack at its own tokens (``TrainingFlops``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.precision import precision_name

# Dense peaks per device (vendor data sheets, no sparsity), FLOP/s, by the number format matrix
# multiplies run in: bf16 / fp16 on tensor cores, tf32 (fp32 matmuls that torch lets use TF32
# tensor cores), fp32 (plain fp32). A format a device lacks is absent: no MFU rather than a wrong one.
# Keys are matched against torch.cuda.get_device_name as whole words, first match wins, so
# "NVIDIA H100 PCIe" (756 TFLOP/s bf16) is not taken for an SXM H100 (989) nor "NVIDIA L40" for an L4.
_HOPPER = {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "GH200": _HOPPER,
    "H200": _HOPPER,
    "H100": _HOPPER,
    "H800": _HOPPER,
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A800": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},  # no bf16 tensor cores, no TF32
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},  # fp32 accumulation
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def matmul_format(precision: str) -> str | None:
    """The number format a run's matrix multiplies use under Lightning's ``precision``; None when no
    table speaks to it (fp64, fp8 plugins)."""
    name = str(precision_name(precision))
    if name.startswith("bf16"):
        return "bf16"
    if name.startswith("16"):
        return "fp16"
    if name.startswith("32"):
        # torch.set_float32_matmul_precision: "high" lets fp32 matmuls use TF32, "medium" bf16.
        return {"highest": "fp32", "high": "tf32", "medium": "bf16"}[torch.get_float32_matmul_precision()]
    return None


def _first(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def parameter_count(model: torch.nn.Module) -> int:
    """N: every parameter of ``model``, a tied one once (``parameters()`` yields it once).

    Take it before a sharding strategy wraps the model: FSDP's parameters are then views of this
    process's shard (half of N with 2 processes) and DeepSpeed ZeRO-3's are empty (``ds_numel`` keeps
    the full size).
    """
    return sum(_numel(p) for p in model.parameters())


@dataclass(frozen=True)
class StackFlops:
    """Training FLOPs per token of one transformer stack: ``matmul`` (6·N) plus ``attention``
    (12·L·H·Q) for every key the token attends to."""

    matmul: float
    attention: float

    def per_token(self, keys: int) -> float:
        return self.matmul + self.attention * keys


@dataclass(frozen=True)
class TrainingFlops:
    """The training FLOPs of a batch, from its token counts and padded lengths.

    ``source``: the whole model of a decoder-only or encoder-only transformer, per input token;
    for an encoder-decoder the encoder plus the decoder's cross-attention keys and values, which
    run over the encoder's output. ``target``: an encoder-decoder's decoder and output head, per
    target token, attending to the target and the source positions.
    """

    source: StackFlops
    target: StackFlops | None = None

    def batch(self, source_tokens: Any, source_length: int, target_tokens: Any = 0,
              target_length: int = 0) -> Any:
        """FLOPs of a training step over these tokens (ints, or device tensors left unread)."""
        flops = source_tokens * self.source.per_token(source_length)
        if self.target is not None:
            flops = flops + target_tokens * self.target.per_token(target_length + source_length)
        return flops


def _lookup_only(model: torch.nn.Module) -> torch.nn.Parameter | None:
    """The input word embedding table when no output head shares it: rows are gathered, not multiplied."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    table = getattr(embeddings, "weight", None)
    if not isinstance(table, torch.nn.Parameter) or getattr(head, "weight", None) is table:
        return None
    return table


def training_flops(model: torch.nn.Module) -> TrainingFlops | None:
    """Training FLOPs of a Hugging Face transformer, None when its config names no layers, heads or width.

    Call it before a sharding strategy wraps the model (see ``parameter_count``).
    """
    config = getattr(model, "config", None)
    layers = _first(config, "n_layer", "num_hidden_layers", "num_layers")
    heads = _first(config, "n_head", "num_attention_heads", "num_heads", "encoder_attention_heads")
    width = _first(config, "n_embd", "hidden_size", "d_model")
    if not (layers and heads and width):
        return None
    head_dim = _first(config, "d_kv", "head_dim") or width // heads
    unused = _lookup_only(model)
    params = parameter_count(model) - (_numel(unused) if unused is not None else 0)
    encoder = getattr(model, "get_encoder", lambda: None)() if getattr(config, "is_encoder_decoder", False) else None
    if encoder is None:
        return TrainingFlops(StackFlops(6.0 * params, 12.0 * layers * heads * head_dim))
    decoder_layers = _first(config, "decoder_layers", "num_decoder_layers") or layers
    decoder_heads = _first(config, "decoder_attention_heads", "num_heads") or heads
    head = getattr(getattr(model, "get_output_embeddings", lambda: None)(), "weight", None)
    # The encoder's own parameters, without the shared word table: an output head it is tied to runs
    # at the target tokens, and an untied one is only looked up (left out above).
    shared = {id(t) for t in (unused, head) if t is not None}
    encoder_params = sum(_numel(p) for p in encoder.parameters() if id(p) not in shared)
    # Each decoder layer's cross-attention projects the encoder's output to keys and values once.
    cross_kv = 2 * decoder_layers * width * decoder_heads * head_dim
    source = StackFlops(6.0 * (encoder_params + cross_kv), 12.0 * layers * heads * head_dim)
    target = StackFlops(6.0 * (params - encoder_params - cross_kv), 12.0 * decoder_layers * decoder_heads * head_dim)
    return TrainingFlops(source, target)


def flops_per_token(model: torch.nn.Module, sequence: int) -> float | None:
    """Training FLOPs per token of a decoder-only or encoder-only transformer at this sequence length.

    None for an encoder-decoder, whose FLOPs depend on both sides' tokens (``training_flops``).
    """
    flops = training_flops(model)
    if flops is None or flops.target is not None:
        return None
    return flops.source.per_token(sequence)


# fp32 FLOPs per cycle of one x86 core, by the /proc/cpuinfo flag of its widest FMA: two FMA units x
# SIMD lanes x 2 (multiply and add); 8 fp32 lanes with AVX2, 16 with AVX-512. Server cores since
# Skylake-SP have two 512-bit FMA units; the few Intel ones with one get an estimate twice too high.
CPU_FLOPS_PER_CYCLE = {"avx512f": 64, "avx2": 32}
# AMD's Zen 4 (family 25 with AVX-512) runs AVX-512 on its two 256-bit FMA units: AVX2's rate. On a
# Zen 4 EPYC a 2048x2048 fp32 matmul reached 135 GFLOP/s of 2 cores' 166 by this figure (332 by 64).
# Zen 5 (family 26) has full 512-bit units.
HALF_WIDTH_AVX512 = {("AuthenticAMD", "25")}
# "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz": the nominal clock, steadier than "cpu MHz", which
# follows frequency scaling on bare metal.
_NOMINAL_GHZ = re.compile(r"@\s*([0-9.]+)\s*GHz")


def cpu_peak_flops(threads: int, cpuinfo: str | None = None) -> tuple[float, str] | None:
    """An fp32 peak estimate for ``threads`` cores of this x86 CPU, and how it was reached.

    None where ``/proc/cpuinfo`` (or the text given) names no clock or no AVX2/AVX-512 FMA (other
    architectures, macOS). Turbo clocks run above the nominal one, so MFU can read a little high.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
        if not line.strip() and fields:  # the first processor's block is enough
            break
    nominal = _NOMINAL_GHZ.search(fields.get("model name", ""))
    try:
        ghz = float(nominal.group(1)) if nominal else float(fields.get("cpu MHz", "")) / 1000
    except ValueError:
        return None
    flags = set(fields.get("flags", "").split())
    isa = next((flag for flag in CPU_FLOPS_PER_CYCLE if flag in flags), None)
    if isa is None or ghz <= 0:
        return None
    per_cycle = CPU_FLOPS_PER_CYCLE[isa]
    how = isa
    if isa == "avx512f" and (fields.get("vendor_id"), fields.get("cpu family")) in HALF_WIDTH_AVX512:
        per_cycle, how = CPU_FLOPS_PER_CYCLE["avx2"], "avx512f on 256-bit units"
    return threads * per_cycle * ghz * 1e9, f"{threads} cores x {per_cycle} fp32 FLOP/cycle ({how}) x {ghz:.2f} GHz"


def peak_flops(configured: float | None, device: torch.device,
               precision: str = "32-true") -> tuple[float, str] | None:
    """One device's peak FLOP/s for MFU, and where it came from; None when it is not known.

    The configured value (``perf.peak_flops``) wins; a GPU is looked up in ``PEAK_FLOPS`` by name and
    the format its matrix multiplies run in (an fp32 run on an H100 has 67 TFLOP/s, not bf16's 989);
    a CPU running in fp32 gets ``cpu_peak_flops`` for the threads torch uses. A CPU in bf16 or fp16
    gets none: AMX and AVX512-BF16 peaks are not modelled, and fp32's would make MFU read high.
    """
    if configured:
        return float(configured), "perf.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        fmt = matmul_format(precision)
        peak = peak_flops_of(name, precision)
        return (peak, f"{name}, {fmt}, in lmlab.flops.PEAK_FLOPS") if peak else None
    if device.type == "cpu" and str(precision_name(precision)).startswith("32"):
        return cpu_peak_flops(torch.get_num_threads())
    return None


def peak_flops_of(device_name: str, precision: str = "bf16-mixed") -> float | None:
    """The dense peak of a GPU (``torch.cuda.get_device_name``) for a run in ``precision``, or None
    when the device or its format is not in ``PEAK_FLOPS``."""
    fmt = matmul_format(precision)
    for key, peaks in PEAK_FLOPS.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", device_name):
            return peaks.get(fmt) if fmt else None
    return None
