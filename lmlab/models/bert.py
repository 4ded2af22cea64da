"""BERT family (encoder-only) built from a Hugging Face config."""

from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from lmlab.specs import ModelSpec

MODEL = ModelSpec(
    name="bert",
    config_class=BertConfig,
    sizes={
        # Sizes follow Google's compact BERTs (Turc et al. 2019) and BERT-base.
        "tiny": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=128, intermediate_size=512),
        "small": dict(num_hidden_layers=4, num_attention_heads=8, hidden_size=512, intermediate_size=2048),
        "base": dict(num_hidden_layers=12, num_attention_heads=12, hidden_size=768, intermediate_size=3072),
    },
    heads={
        "masked_lm": BertForMaskedLM,
        "pretraining": BertForPreTraining,
        "sequence_classification": BertForSequenceClassification,
        "token_classification": BertForTokenClassification,
    },
    tokenizer="wordpiece",
    positions_key="max_position_embeddings",
    description="BERT encoder (tiny 2x128, small 4x512, base 110M)",
)
