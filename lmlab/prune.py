"""Pruning a trained model to a target sparsity (``mode=prune``).

Methods (``prune.method``; ``prune.sparsity`` is the fraction to remove, in the method's unit):

- ``magnitude``: global unstructured L1 pruning of the weights of every ``nn.Linear`` / ``Conv1D``
  inside the numbered transformer blocks (embeddings, pooler and task head are left alone). Exactly
  ``k = round(sparsity * n)`` of those ``n`` weights become zero.
- ``heads``: structured; the ``round(sparsity * heads)`` attention heads with the smallest weight
  norm (their query/key/value rows and output-projection columns), ranked across all layers, are
  zeroed so they contribute nothing. transformers 5 dropped ``prune_heads`` and its configs cannot
  describe layers with different head counts, so the tensors keep their shapes (the export still
  loads with ``from_pretrained``); the zeros are what a sparse runtime or a later rebuild removes.
- ``neurons``: structured; the same ``round(sparsity * d_ff)`` feed-forward neurons with the smallest
  weight norm are cut out of every layer: the matrices shrink and the config's FFN width with them,
  so the export is a smaller model that ``from_pretrained`` loads as it is.

Masks use ``torch.nn.utils.prune`` and stay as a reparametrisation (``weight = weight_orig * mask``)
while ``prune.finetune_steps`` of training run, so pruned weights stay zero; ``finalize`` bakes the
zeros in (``prune.remove``) before scoring and export.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lmlab.checks import Number
from lmlab.errors import config_error

log = logging.getLogger(__name__)

METHODS = ("magnitude", "heads", "neurons")
_IN_BLOCK = re.compile(r"\.\d+\.")  # a module inside a numbered block: encoder.layer.3.attention...


@dataclass
class Pruned:
    """What was removed: ``pruned`` of ``total`` units (weights, heads or FFN neurons)."""

    method: str
    target: float
    pruned: int
    total: int
    masked: list[tuple[nn.Module, str]] = field(default_factory=list)  # reparametrised until finalize()
    # magnitude: the zeros counted in the pruned weights once finalize() baked the masks in. More than
    # ``pruned`` where the model had zeros of its own (an export pruned before, to a higher sparsity).
    zeros: int | None = None

    @property
    def sparsity(self) -> float:
        """The share reached: zeros / weights for magnitude (measured), else pruned / total units."""
        done = self.pruned if self.zeros is None else self.zeros
        return done / self.total if self.total else 0.0


FINETUNE_STEPS = Number("prune.finetune_steps", True, "100 (0: no fine-tuning)", low=0)


def check_config(cfg: Any) -> None:
    """Reject a bad ``prune.*`` before any data is read."""
    pcfg = cfg.get("prune") or {}
    method = str(pcfg.get("method"))
    if method not in METHODS:
        raise config_error("prune.method", f"unknown method '{method}'", f"Use one of: {', '.join(METHODS)}.")
    sparsity = pcfg.get("sparsity")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise config_error("prune.sparsity", f"'{sparsity}' is not a fraction in [0, 1)",
                           "Use e.g. prune.sparsity=0.5 (the share of weights, heads or neurons to remove).")
    FINETUNE_STEPS.check(cfg)


def prune_model(model: nn.Module, method: str, sparsity: float) -> Pruned:
    """Prune ``model`` in place; magnitude and heads leave masks in place until ``finalize``."""
    if method == "magnitude":
        pruned = _magnitude(model, sparsity)
    elif method == "heads":
        pruned = _heads(model, sparsity)
    elif method == "neurons":
        pruned = _neurons(model, sparsity)
    else:
        raise config_error("prune.method", f"unknown method '{method}'", f"Use one of: {', '.join(METHODS)}.")
    if sparsity > 0 and pruned.pruned == 0:  # round(sparsity * units) is 0: 0.1 of 4 heads, say
        log.warning("prune.sparsity=%s removes none of the %d units prune.method=%s counts (the count rounds to "
                    "0): the model is unchanged. Use a larger prune.sparsity.", sparsity, pruned.total, method)
    return pruned


def finalize(pruned: Pruned) -> None:
    """Make the masks permanent: plain parameters with the zeros in them (what export needs).

    For magnitude pruning the zeros are then counted in the pruned weights: the sparsity reached
    is measured on what is exported, not taken from the masks.
    """
    for module, name in pruned.masked:
        if torch_prune.is_pruned(module) and hasattr(module, f"{name}_orig"):
            torch_prune.remove(module, name)
    if pruned.method == "magnitude":
        pruned.zeros = sum(int((getattr(module, name) == 0).sum()) for module, name in pruned.masked)
    pruned.masked = []


def nonzero_parameters(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))


# -- magnitude ------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights of the Linear / Conv1D layers inside the transformer blocks."""
    from transformers.pytorch_utils import Conv1D

    return [(m, "weight") for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and _IN_BLOCK.search(f".{name}.")]


def _magnitude(model: nn.Module, sparsity: float) -> Pruned:
    params = prunable_weights(model)
    if not params:
        raise config_error("prune.method", "magnitude pruning found no Linear layers inside numbered blocks",
                           "Use a transformer from lmlab's model groups (bert, gpt2, bart, t5).")
    total = sum(getattr(m, n).numel() for m, n in params)
    k = round(sparsity * total)  # the count torch.nn.utils.prune takes for a float amount
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=float(sparsity))
    masked = sum(int((getattr(m, f"{n}_mask") == 0).sum()) for m, n in params)
    if masked != k:  # the promise of this method: exactly the target, never "about"
        raise RuntimeError(f"magnitude pruning masked {masked} weights, expected exactly {k} of {total}")
    return Pruned("magnitude", float(sparsity), masked, total, params)


# -- attention heads ------------------------------------------------------------------------------
@dataclass
class _Attention:
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    heads: int
    fused: bool = False  # GPT-2: one Conv1D makes q, k and v (columns [q | k | v])


def attentions(model: nn.Module) -> list[_Attention]:
    """Every attention block of a BERT, GPT-2, BART or T5 model (self- and cross-attention)."""
    found = []
    for _, m in model.named_modules():
        if hasattr(m, "self") and hasattr(m, "output") and hasattr(m.self, "query"):  # BERT
            s = m.self
            found.append(_Attention(s.query, s.key, s.value, m.output.dense, int(s.num_attention_heads)))
        elif hasattr(m, "c_attn") and hasattr(m, "c_proj") and not getattr(m, "is_cross_attention", False):  # GPT-2
            found.append(_Attention(m.c_attn, m.c_attn, m.c_attn, m.c_proj, int(m.num_heads), fused=True))
        elif all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj")):  # BART
            found.append(_Attention(m.q_proj, m.k_proj, m.v_proj, m.out_proj, int(m.num_heads)))
        elif all(isinstance(getattr(m, n, None), nn.Linear) for n in "qkvo") and hasattr(m, "n_heads"):  # T5
            found.append(_Attention(m.q, m.k, m.v, m.o, int(m.n_heads)))
    return found


def _head_parts(att: _Attention, head: int) -> list[tuple[nn.Module, str, int, torch.Tensor]]:
    """(module, parameter, dim, indices) of everything that belongs to one head."""
    o_weight = att.o.weight
    width = o_weight.shape[0] if att.fused else o_weight.shape[1]  # heads * head_dim
    size = width // att.heads
    idx = torch.arange(head * size, (head + 1) * size, device=o_weight.device)
    if att.fused:  # Conv1D weights are (in, out): q/k/v columns, c_proj rows
        cols = torch.cat([idx + part * width for part in range(3)])
        parts = [(att.q, "weight", 1, cols), (att.o, "weight", 0, idx)]
        if att.q.bias is not None:
            parts.append((att.q, "bias", 0, cols))
        return parts
    parts = []
    for proj in (att.q, att.k, att.v):
        parts.append((proj, "weight", 0, idx))
        if proj.bias is not None:
            parts.append((proj, "bias", 0, idx))
    parts.append((att.o, "weight", 1, idx))
    return parts


def _heads(model: nn.Module, sparsity: float) -> Pruned:
    found = attentions(model)
    if not found:
        raise config_error("prune.method", "found no attention blocks lmlab knows how to prune by head",
                           "Use prune.method=magnitude, or a bert, gpt2, bart or t5 model.")
    scored = []
    with torch.no_grad():
        for att in found:
            for head in range(att.heads):
                norm = sum(float(getattr(m, p).index_select(d, i).pow(2).sum()) for m, p, d, i in _head_parts(att, head))
                scored.append((norm, len(scored), att, head))
    total = len(scored)
    k = round(sparsity * total)
    masks: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}
    for _, _, att, head in sorted(scored, key=lambda s: (s[0], s[1]))[:k]:
        for module, param, dim, idx in _head_parts(att, head):
            key = (id(module), param)
            if key not in masks:
                masks[key] = (module, param, torch.ones_like(getattr(module, param)))
            masks[key][2].index_fill_(dim, idx, 0)
    for module, param, mask in masks.values():
        torch_prune.custom_from_mask(module, param, mask)
    masked = [(module, param) for module, param, _ in masks.values()]
    return Pruned("heads", float(sparsity), k, total, masked)


# -- feed-forward neurons -------------------------------------------------------------------------
@dataclass
class _FeedForward:
    inputs: list[nn.Module]  # make the d_ff features (two for a gated T5 FFN)
    output: nn.Module  # reads them
    config_key: str


def feed_forwards(model: nn.Module) -> list[_FeedForward]:
    found = []
    for name, m in model.named_modules():
        if hasattr(m, "intermediate") and hasattr(m, "output") and hasattr(m.intermediate, "dense"):  # BERT
            found.append(_FeedForward([m.intermediate.dense], m.output.dense, "intermediate_size"))
        elif hasattr(m, "c_fc") and hasattr(m, "c_proj"):  # GPT-2
            found.append(_FeedForward([m.c_fc], m.c_proj, "n_inner"))
        elif hasattr(m, "fc1") and hasattr(m, "fc2"):  # BART
            found.append(_FeedForward([m.fc1], m.fc2, "decoder_ffn_dim" if ".decoder." in f".{name}." else "encoder_ffn_dim"))
        elif hasattr(m, "wo") and (hasattr(m, "wi") or hasattr(m, "wi_0")):  # T5 (plain or gated)
            found.append(_FeedForward([m.wi] if hasattr(m, "wi") else [m.wi_0, m.wi_1], m.wo, "d_ff"))
    return found


def _out_dim(module: nn.Module) -> int:
    return 0 if isinstance(module, nn.Linear) else 1  # Conv1D stores (in, out)


def _select(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    tensor = getattr(module, name)
    setattr(module, name, nn.Parameter(tensor.detach().index_select(dim, keep).clone(), requires_grad=tensor.requires_grad))


def _neurons(model: nn.Module, sparsity: float) -> Pruned:
    found = feed_forwards(model)
    if not found:
        raise config_error("prune.method", "found no feed-forward blocks lmlab knows how to prune by neuron",
                           "Use prune.method=magnitude, or a bert, gpt2, bart or t5 model.")
    widths: dict[str, int] = {}
    for ffn in found:
        width = ffn.inputs[0].weight.shape[_out_dim(ffn.inputs[0])]
        if widths.setdefault(ffn.config_key, width) != width:
            raise config_error("prune.method", "the feed-forward layers have different widths",
                               "Use prune.method=magnitude for this model.")
    drop = {key: round(sparsity * width) for key, width in widths.items()}
    for key, width in widths.items():
        if drop[key] >= width:  # a block without its feed-forward layer: no model anyone asked for
            raise config_error("prune.sparsity", f"{sparsity} of the {width} feed-forward neurons ({key}) "
                               "removes every one of them", "Use a smaller prune.sparsity.")
    pruned = total = 0
    with torch.no_grad():
        for ffn in found:
            width, k = widths[ffn.config_key], drop[ffn.config_key]
            out_in_dim = 1 - _out_dim(ffn.output)
            norm = ffn.output.weight.pow(2).sum(dim=1 - out_in_dim)
            for module in ffn.inputs:
                norm = norm + module.weight.pow(2).sum(dim=1 - _out_dim(module))
                if module.bias is not None:
                    norm = norm + module.bias.pow(2)
            keep = torch.sort(torch.topk(norm, width - k, largest=True, sorted=False).indices).values
            for module in ffn.inputs:
                _select(module, "weight", _out_dim(module), keep)
                if module.bias is not None:
                    _select(module, "bias", 0, keep)
                _set_width(module, width - k, output=True)
            _select(ffn.output, "weight", out_in_dim, keep)
            _set_width(ffn.output, width - k, output=False)
            pruned, total = pruned + k, total + width
    for key, width in widths.items():
        setattr(model.config, key, width - drop[key])
    return Pruned("neurons", float(sparsity), pruned, total)


def _set_width(module: nn.Module, width: int, output: bool) -> None:
    # The layer objects keep their sizes in attributes that forward() reads (Conv1D.nf) or that
    # repr / reloads show; they must follow the new shapes.
    if isinstance(module, nn.Linear):
        setattr(module, "out_features" if output else "in_features", width)
    else:
        setattr(module, "nf" if output else "nx", width)
