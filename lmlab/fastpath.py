"""Faster, numerically equivalent pieces swapped into a Hugging Face model before training.

The model's config (and so its export) is left as it is: these change how a function is computed,
not which function it is. tests/test_perf_models.py checks each against the Hugging Face forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers.activations import GELUTanh, NewGELUActivation

if TYPE_CHECKING:
    import lightning as L


def fuse_activations(model: torch.nn.Module) -> int:
    """Replaces ``gelu_new`` modules (GPT-2's MLP activation) with torch's one-kernel tanh GELU.

    ``NewGELUActivation`` spells the tanh approximation out in eight elementwise operations, each a
    pass over the (tokens x 4·width) activations forward and again backward; on a CPU that was 12% of
    a tiny GPT-2's training step. ``F.gelu(x, approximate="tanh")`` is the same formula in one pass
    (equal to float rounding). Returns the number of modules replaced.
    """
    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is NewGELUActivation]
    for parent, name in targets:
        setattr(parent, name, GELUTanh())
    return len(targets)


# -------------------------------------------------------------------------------------------------
# Lean bodies: the pretraining objectives feed full, unpadded blocks (lmlab/data/packing.py), so the
# body's output is a short loop over the model's own modules and one SDPA call per layer. Hugging
# Face's generic forward builds the attention mask for every case it supports, and on torch < 2.14
# under torch.compile it materialises a (B, 1, T, T) mask even for an unpadded causal block
# (transformers.masking_utils._ignore_causal_mask_sdpa), which rules out the flash-attention kernel;
# eagerly, with a config that has a pad token, it also reads the batch on the host every step
# (warn_if_padding_and_no_attention_mask). Here SDPA always gets ``is_causal`` and no mask. The
# parameters are the model's own modules, called in the same order: checkpoints, exports and
# ``from_pretrained`` are untouched.
# -------------------------------------------------------------------------------------------------


def gpt2_hidden_states(body: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``GPT2Model(input_ids).last_hidden_state`` for an unpadded batch, with causal SDPA."""
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    hidden = body.drop(body.wte(input_ids) + body.wpe(positions))
    for block in body.h:
        attn = block.attn
        heads = (batch, length, attn.num_heads, attn.head_dim)
        q, k, v = attn.c_attn(block.ln_1(hidden)).split(attn.split_size, dim=2)
        q, k, v = q.view(heads).transpose(1, 2), k.view(heads).transpose(1, 2), v.view(heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_dropout.p if attn.training else 0.0,
                                           is_causal=True, scale=attn.scaling)
        hidden = hidden + attn.resid_dropout(attn.c_proj(y.transpose(1, 2).reshape(batch, length, -1)))
        mlp = block.mlp
        hidden = hidden + mlp.dropout(mlp.c_proj(mlp.act(mlp.c_fc(block.ln_2(hidden)))))
    return body.ln_f(hidden)


def bert_hidden_states(bert: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``BertModel(input_ids).last_hidden_state`` for an unpadded batch of one segment each
    (token type 0, absolute positions), with bidirectional SDPA."""
    emb = bert.embeddings
    batch, length = input_ids.shape
    # Token type 0 everywhere and positions 0..T-1: rows of the tables, added in HF's order.
    hidden = emb.word_embeddings(input_ids) + emb.token_type_embeddings.weight[0]
    hidden = emb.dropout(emb.LayerNorm(hidden + emb.position_embeddings.weight[:length]))
    for layer in bert.encoder.layer:
        attn = layer.attention.self
        heads = (batch, length, attn.num_attention_heads, attn.attention_head_size)
        q = attn.query(hidden).view(heads).transpose(1, 2)
        k = attn.key(hidden).view(heads).transpose(1, 2)
        v = attn.value(hidden).view(heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout.p if attn.training else 0.0,
                                           scale=attn.scaling)
        out = layer.attention.output
        hidden = out.LayerNorm(out.dropout(out.dense(y.transpose(1, 2).reshape(batch, length, -1))) + hidden)
        ffn_in, ffn_out = layer.intermediate, layer.output
        inner = ffn_in.intermediate_act_fn(ffn_in.dense(hidden))
        hidden = ffn_out.LayerNorm(ffn_out.dropout(ffn_out.dense(inner)) + hidden)
    return hidden


def lean_body(body: torch.nn.Module) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None:
    """The lean function for this body (a ``GPT2Model`` or ``BertModel``), or None where its config
    asks for something the lean loop does not do (cross-attention, a decoder BERT, relative
    positions); the caller then keeps the model's own forward."""
    config = getattr(body, "config", None)
    kind = getattr(config, "model_type", None)
    if getattr(config, "add_cross_attention", False):
        return None
    # The attributes the loops read, as transformers 5.x names them: another release that renamed
    # one keeps the model's own forward instead of failing mid-step.
    if kind == "gpt2" and _layers_have(getattr(body, "h", ()), "attn", ("scaling", "split_size", "num_heads", "head_dim")):
        return gpt2_hidden_states
    if (kind == "bert" and not config.is_decoder
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and _layers_have([layer.attention for layer in getattr(getattr(body, "encoder", None), "layer", ())], "self",
                             ("scaling", "num_attention_heads", "attention_head_size"))):
        return bert_hidden_states
    return None


def _layers_have(layers, child: str, names: tuple[str, ...]) -> bool:
    layers = list(layers)
    return bool(layers) and all(hasattr(getattr(layer, child, None), name) for layer in layers for name in names)


def modules_callable_one_by_one(module: "L.LightningModule") -> bool:
    """Whether a training step may call a model's submodules directly (the lean loops) and read its
    output weight (the chunked loss): on one device and under DDP, not under FSDP or DeepSpeed,
    which gather a parameter only inside the forward of the module that owns it."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    return strategy is None or isinstance(strategy, SingleDeviceStrategy) or (
        isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy))
