"""T5 family (encoder-decoder with relative position buckets) built from a Hugging Face config."""

from __future__ import annotations

from typing import Any

import transformers
from transformers import T5ForConditionalGeneration

from lmlab.specs import ModelSpec


class T5Config(transformers.T5Config):
    """``transformers.T5Config`` whose decoder starts from the pad token, with a nominal length.

    The stock config leaves ``decoder_start_token_id`` unset (t5-base's config.json sets it to
    pad = 0); lmlab's tokenizer decides the pad id, so the start token follows it. An explicit
    value (model.config.decoder_start_token_id, a loaded config.json) still wins.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("decoder_start_token_id", kwargs.get("pad_token_id", 0))
        # T5 has no position table (relative attention buckets), so nothing hard-bounds the length;
        # n_positions is the nominal limit t5-base's config.json records, and the field lmlab
        # checks data.block_size against (model.config.n_positions=1024 raises it).
        kwargs.setdefault("n_positions", 512)
        super().__init__(**kwargs)


MODEL = ModelSpec(
    name="t5",
    config_class=T5Config,
    sizes={
        "tiny": dict(num_layers=2, num_decoder_layers=2, d_model=128, d_kv=64, d_ff=512, num_heads=2),
        "small": dict(num_layers=6, num_decoder_layers=6, d_model=512, d_kv=64, d_ff=2048, num_heads=8),
        # base: the shape of t5-base (220M).
        "base": dict(num_layers=12, num_decoder_layers=12, d_model=768, d_kv=64, d_ff=3072, num_heads=12),
    },
    heads={"seq2seq_lm": T5ForConditionalGeneration},
    tokenizer="bpe",
    positions_key="n_positions",
    description="T5 encoder-decoder (tiny 2+2x128, small 6+6x512, base 220M)",
)
