"""BART family (encoder-decoder) built from a Hugging Face config."""

from __future__ import annotations

from typing import Any

import transformers
from transformers import BartForConditionalGeneration

from lmlab.specs import ModelSpec


class BartConfig(transformers.BartConfig):
    """``transformers.BartConfig`` whose decoder start and forced EOS follow ``eos_token_id``.

    BART starts decoding from its EOS token (``</s>``) and forces EOS at the last step, but the
    stock config hard-codes facebook/bart's id 2 for both. lmlab sets pad/bos/eos from the run's
    tokenizer (a from-scratch byte-level BPE has a single ``<|endoftext|>`` = pad = bos = eos), so
    these two must follow. An explicit value (model.config.*, a loaded config.json) still wins;
    the saved config says ``model_type: bart`` and reloads with the stock class.
    """

    def __init__(self, **kwargs: Any) -> None:
        eos = kwargs.get("eos_token_id", 2)
        kwargs.setdefault("decoder_start_token_id", eos)
        kwargs.setdefault("forced_eos_token_id", eos)
        super().__init__(**kwargs)


def _size(layers: int, d_model: int, heads: int, ffn: int, positions: int) -> dict[str, Any]:
    return dict(encoder_layers=layers, decoder_layers=layers, d_model=d_model, encoder_attention_heads=heads,
                decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
                max_position_embeddings=positions)


MODEL = ModelSpec(
    name="bart",
    config_class=BartConfig,
    sizes={
        # tiny: 2 encoder + 2 decoder layers x 128, a CPU test model.
        "tiny": _size(2, 128, 2, 512, 512),
        "small": _size(6, 512, 8, 2048, 1024),
        # base: the shape of facebook/bart-base (140M).
        "base": _size(6, 768, 12, 3072, 1024),
    },
    heads={"seq2seq_lm": BartForConditionalGeneration},
    tokenizer="bpe",
    positions_key="max_position_embeddings",
    description="BART encoder-decoder (tiny 2+2x128, small 6+6x512, base 140M)",
)
