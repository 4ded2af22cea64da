"""GPT-2 family (decoder-only) built from a Hugging Face config."""

from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2ForTokenClassification, GPT2LMHeadModel

from lmlab.specs import ModelSpec

# No dropout when training from scratch, as nanoGPT and LitGPT pretrain (GPT2Config's
# default is 0.1); model.config.resid_pdrop=0.1 etc. bring it back for small data. A
# pretrained GPT-2 keeps its own config's values.
NO_DROPOUT = dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)

MODEL = ModelSpec(
    name="gpt2",
    config_class=GPT2Config,
    sizes={
        # tiny: a CPU test model that still learns something in a minute.
        "tiny": dict(n_layer=2, n_head=2, n_embd=128, n_positions=256, **NO_DROPOUT),
        "small": dict(n_layer=6, n_head=8, n_embd=512, n_positions=1024, **NO_DROPOUT),
        # base: GPT-2 124M.
        "base": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, **NO_DROPOUT),
    },
    heads={
        "causal_lm": GPT2LMHeadModel,
        # Classifies from the last non-pad token (needs config.pad_token_id, which lmlab sets).
        "sequence_classification": GPT2ForSequenceClassification,
        "token_classification": GPT2ForTokenClassification,
    },
    tokenizer="bpe",
    positions_key="n_positions",
    description="GPT-2 decoder (tiny 2x128, small 6x512, base 124M)",
)
