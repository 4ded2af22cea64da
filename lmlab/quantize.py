"""Post-training quantization of a trained model, saved so that it reloads (``mode=quantize``).

Methods (``quantize.method``):

- ``dynamic_int8``: ``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``: int8 weights
  (one scale per tensor), activations quantized on the fly; CPU only (fbgemm / qnnpack kernels).
- ``int8_weight_only`` / ``int4_weight_only``: torchao's weight-only quantization (int8 per output
  channel; int4 in groups of ``quantize.group_size`` along the input). Needs ``pip install torchao``.
  On the CPU torchao keeps int4 values in int8 containers, so int4 saves what int8 saves on disk;
  what it changes is the quality.

GPT-2 builds its projections from transformers' ``Conv1D`` (``x @ W + b`` with ``W`` stored
transposed), which neither quantizer recognises; those layers are turned into ``nn.Linear`` first
(an exact rewrite) and the artifact records which ones, so ``load_quantized`` rebuilds the same.

The artifact is a directory: ``config.json`` (the Hugging Face config), the tokenizer,
``model.safetensors`` (only plain tensors: nothing is ever pickled) and ``quantization.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmlab.atomic import atomic_dir, write_json
from lmlab.checks import Number
from lmlab.errors import LmlabError, config_error
from lmlab.export import length_for_export, position_limit

log = logging.getLogger(__name__)

METHODS = ("dynamic_int8", "int8_weight_only", "int4_weight_only")
TORCHAO_METHODS = ("int8_weight_only", "int4_weight_only")
WEIGHTS = "model.safetensors"
MANIFEST = "quantization.json"
FORMAT_VERSION = 1


# -- configuration --------------------------------------------------------------------------------
NUMBERS = (
    Number("quantize.group_size", True, "32 (it must divide the layers' input width)", positive=True),
    Number("quantize.latency_batches", True, "5", low=1),
)


def check_config(cfg: Any) -> None:
    """Reject a bad ``quantize.*`` before any data is read (and a missing torchao with it)."""
    qcfg = cfg.get("quantize") or {}
    method = str(qcfg.get("method"))
    if method not in METHODS:
        raise config_error("quantize.method", f"unknown method '{method}'", f"Use one of: {', '.join(METHODS)}.")
    if method in TORCHAO_METHODS:
        _torchao(method)
    for number in NUMBERS:
        number.check(cfg)


def _torchao(method: str) -> Any:
    try:
        import torchao.quantization as tq
    except ImportError as exc:
        raise config_error("quantize.method", f"{method} is done by torchao, which is not installed",
                           "Run `pip install torchao` (or `pip install -e '.[quantize]'`), or use "
                           "quantize.method=dynamic_int8, which needs only torch.") from exc
    return tq


# -- the transformation ---------------------------------------------------------------------------
def linearize(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace transformers' ``Conv1D`` layers (GPT-2) by equal ``nn.Linear`` ones; returns their names.

    With ``names`` only those are replaced (what ``load_quantized`` does to match a saved artifact).
    """
    from transformers.pytorch_utils import Conv1D

    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D) or (names is not None and name not in names):
            continue
        nx, nf = module.weight.shape  # Conv1D stores the weight as (in, out)
        linear = nn.Linear(nx, nf, bias=module.bias is not None, dtype=module.weight.dtype,
                           device=module.weight.device)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        done.append(name)
    return done


def check_group_size(model: nn.Module, method: str, group_size: int) -> None:
    """int4 groups run along each layer's input: ``group_size`` must divide every input width.

    Checked before the original is scored, so a bad value costs nothing (torchao would stop with an
    assertion about block sizes only when it reaches the layer).
    """
    if method not in TORCHAO_METHODS or "int4" not in method:
        return
    from transformers.pytorch_utils import Conv1D

    widths = {name: m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]
              for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    misfits = {name: width for name, width in widths.items() if width % group_size}
    if misfits:
        name, width = next(iter(misfits.items()))
        common = math.gcd(*widths.values())
        raise config_error("quantize.group_size", f"{group_size} does not divide the input width {width} of "
                           f"layer '{name}' ({len(misfits)} of {len(widths)} layers)",
                           f"Use a divisor of {common}, the greatest common divisor of the layers' input widths.")


def quantize(model: nn.Module, method: str, group_size: int = 32) -> tuple[nn.Module, list[str]]:
    """A quantized copy of ``model`` (float32, CPU) and the Conv1D layers it turned into Linear."""
    model = copy.deepcopy(model).float().cpu().eval()
    linearized = linearize(model)
    if method == "dynamic_int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
    elif method in TORCHAO_METHODS:
        tq = _torchao(method)
        tq.quantize_(model, _torchao_config(tq, method, group_size))
    else:
        raise config_error("quantize.method", f"unknown method '{method}'", f"Use one of: {', '.join(METHODS)}.")
    return model.eval(), linearized


def _torchao_config(tq: Any, method: str, group_size: int) -> Any:
    if method == "int8_weight_only":
        return tq.Int8WeightOnlyConfig()
    # Int4WeightOnlyConfig's packed layouts need CUDA (or bfloat16 + tinygemm); the Intx config runs
    # anywhere, float32 included, with the same int4 values and per-group scales.
    from torchao.quantization.granularity import PerGroup

    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


# -- saving and reloading -------------------------------------------------------------------------
def _dynamic_modules(model: nn.Module) -> dict[str, nn.Module]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicLinear)}


def _dedupe(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Drop tied copies (safetensors refuses two names for one storage); returns (state, alias -> kept)."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, tensor in state.items():
        plain = type(tensor) is torch.Tensor or isinstance(tensor, nn.Parameter)
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if plain else (id(tensor),)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor
    return kept, aliases


def _dynamic_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Packed int8 weights as plain tensors: int8 values, scale and zero point (+ float bias)."""
    quantized = _dynamic_modules(model)
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, Any] = {}
    for name, module in quantized.items():
        weight, bias = module._weight_bias()
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
            tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
            schemes[name] = {"per_channel_axis": None}
        else:
            tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().contiguous()
            tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().contiguous()
            schemes[name] = {"per_channel_axis": int(weight.q_per_channel_axis())}
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    prefixes = tuple(f"{name}." for name in quantized)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes) and isinstance(value, torch.Tensor):
            tensors[key] = value
    return tensors, schemes


def save_quantized(model: nn.Module, method: str, linearized: list[str], tokenizer: Any, destination: Path,
                   group_size: int = 32) -> Path:
    """Write the quantized model as a reloadable directory (atomically); see ``load_quantized``."""
    from safetensors.torch import save_file

    destination = Path(destination)
    metadata: dict[str, str] = {}
    schemes: dict[str, Any] = {}
    tied: dict[str, str] = {}
    if method == "dynamic_int8":
        tensors, schemes = _dynamic_tensors(model)
    else:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        state, tied = _dedupe(model.state_dict())
        tensors, metadata = flatten_tensor_state_dict(state)
    tensors, aliases = _dedupe(tensors)
    aliases.update(tied)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_dir(destination) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata or None)
        _config_naming(model).save_pretrained(str(tmp))
        if tokenizer is not None:
            with length_for_export(tokenizer, position_limit(model.config)):
                tokenizer.save_pretrained(str(tmp))
        write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION, "method": method, "group_size": group_size,
            "linearized": linearized, "aliases": aliases, "dynamic_schemes": schemes,
            "torch": torch.__version__,
        })
    return destination


def _config_naming(model: nn.Module) -> Any:
    """The model's config with ``architectures`` naming the model's own class, which ``load_quantized``
    rebuilds.

    A config keeps the architectures of the file it was read from: none for a model built from a
    config in code, the checkpoint's head for a model loaded into another head. Hugging Face's
    ``save_pretrained`` corrects it on writing; ``config.save_pretrained`` alone does not, and the
    artifact then named no class (``load_quantized`` refused it) or another one. The model's own config
    is left as it was.
    """
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    return config


def load_quantized(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save_quantized``: the float architecture from its config, the same
    Conv1D -> Linear rewrite and quantization layout, then the stored int8 / int4 weights (safetensors).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, PreTrainedModel

    import transformers

    directory = Path(directory).expanduser()
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise LmlabError(f"{directory}: no {MANIFEST}, so it is not a quantized lmlab model. "
                         "Point at the 'quantized' directory of a mode=quantize run.")
    if not (directory / WEIGHTS).is_file():  # a copy that left it behind: safetensors' error names no file
        raise LmlabError(f"{directory}: {MANIFEST} is there but {WEIGHTS} is not, so the copy is incomplete. "
                         "Copy the whole 'quantized' directory of the mode=quantize run.")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    method = manifest["method"]
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    names = list(getattr(config, "architectures", None) or [])
    model_class = getattr(transformers, names[0], None) if names else None
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise LmlabError(f"{directory}/config.json names no transformers model class ({names}).")
    model = model_class._from_config(config).float().eval()
    linearize(model, list(manifest["linearized"]))
    with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    aliases: dict[str, str] = manifest.get("aliases", {})
    if method == "dynamic_int8":
        model = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=False)
        _load_dynamic(model, tensors, aliases, manifest.get("dynamic_schemes", {}))
    else:
        _torchao(method)
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        # torchao rebuilds the quantized tensors; the plain ones come back as its leftovers, as stored.
        state, plain = unflatten_tensor_state_dict(tensors, _quantized_entries(metadata))
        state.update(plain)
        state.update({alias: state[kept] for alias, kept in aliases.items() if kept in state})
        _load_checked(model, state, assign=True)
    return model.eval()


def _quantized_entries(metadata: dict[str, str]) -> dict[str, str]:
    """torchao's safetensors metadata with only the tensor subclasses listed in ``tensor_names``.

    ``unflatten_tensor_state_dict`` splits every listed name at its last dot, so a plain tensor at
    the model's top level (BART's ``final_logits_bias`` buffer) stopped the reload with "not enough
    values to unpack". Plain tensors need no rebuilding: left unlisted, they are returned as stored.
    Artifacts written before this change list them too, so it is done on reading.
    """
    names = json.loads(metadata.get("tensor_names", "[]"))
    quantized = [n for n in names if json.loads(metadata.get(n, "{}")).get("_type") != torch.Tensor.__name__]
    return {**metadata, "tensor_names": json.dumps(quantized)}


def _load_dynamic(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                  schemes: dict[str, Any]) -> None:
    tensors = {**tensors, **{alias: tensors[kept] for alias, kept in aliases.items() if kept in tensors}}
    quantized = _dynamic_modules(model)
    for name, module in quantized.items():
        values = tensors.pop(f"{name}.weight_int8")
        scale, zero = tensors.pop(f"{name}.weight_scale"), tensors.pop(f"{name}.weight_zero_point")
        axis = schemes.get(name, {}).get("per_channel_axis")
        if axis is None:
            weight = torch._make_per_tensor_quantized_tensor(values, float(scale.item()), int(zero.item()))
        else:
            weight = torch._make_per_channel_quantized_tensor(values, scale, zero, int(axis))
        module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    # The packed modules take no state_dict entries of that form, so the plain tensors are copied in
    # one by one; the names must match exactly, or the artifact and the rebuilt model disagree.
    prefixes = tuple(f"{name}." for name in quantized)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes) and isinstance(v, torch.Tensor)}
    _check_names(set(own), set(tensors))
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(tensors[key])


def _check_names(expected: set[str], stored: set[str]) -> None:
    if expected != stored:
        raise LmlabError(f"the quantized weights do not fit the model rebuilt from config.json "
                         f"(missing {sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}).")


def _load_checked(model: nn.Module, state: dict[str, Any], assign: bool) -> None:
    result = model.load_state_dict(state, strict=False, assign=assign)
    if result.missing_keys or result.unexpected_keys:
        raise LmlabError(f"the quantized weights do not fit the model rebuilt from config.json "
                         f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}).")


# -- measurements ---------------------------------------------------------------------------------
def weights_bytes(directory: str | Path) -> int:
    """Bytes of the weight files of a model directory (safetensors, else PyTorch .bin)."""
    directory = Path(directory)
    files = list(directory.glob("*.safetensors")) or list(directory.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def source_weights_bytes(source: str) -> int | None:
    """Bytes of the weight files of ``model.pretrained`` as resolved: a local directory, or a hub
    name's files in the Hugging Face cache (``from_pretrained`` put them there); None when unknown.

    A hub name is no directory here: measuring it as one gave 0 bytes, and a "size" the quantized
    model could only exceed.
    """
    directory = Path(source).expanduser()
    if not directory.is_dir():
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not a hub name, or not cached: nothing to measure
            return None
    size = weights_bytes(directory)
    return size or None


def model_inputs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a task's batch that are model inputs (labels only where an encoder-decoder needs them)."""
    import inspect

    accepted = set(inspect.signature(model.forward).parameters)
    config = getattr(model, "config", None)
    needs_labels = bool(getattr(config, "is_encoder_decoder", False)) and "decoder_input_ids" not in batch
    return {k: v for k, v in batch.items()
            if k in accepted and isinstance(v, torch.Tensor) and (k != "labels" or needs_labels)}


def cpu_latency_ms(model: nn.Module, batches: list[dict[str, Any]]) -> float:
    """Median milliseconds of one forward pass per batch on the CPU (after one warm-up pass)."""
    import statistics
    import time

    model = model.cpu().eval()
    times = []
    with torch.inference_mode():
        model(**model_inputs(model, batches[0]))
        for batch in batches:
            inputs = model_inputs(model, batch)
            start = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(times))
