"""The pad/bos/eos ids a model built from scratch gets are its tokenizer's, never GPT2Config's 50256.

A tokenizer without an end-of-text token (WordPiece, BERT's) separates documents with [SEP] in the
causal-LM data, so that is where generation must stop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import WIKI, compose_cfg

from lmlab.errors import LmlabError
from lmlab.export import export_hf
from lmlab.models.bert import MODEL as BERT
from lmlab.models.build import build_hf_config, build_model
from lmlab.models.gpt2 import MODEL as GPT2
from lmlab.tokenization import train_bpe, train_wordpiece


def _texts() -> list[str]:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    return WIKI.read_text(encoding="utf-8").splitlines()[:300]


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(_texts(), vocab_size=2000, min_frequency=2, lowercase=True)


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """What tokenizer=pretrained with a BERT directory gives: [SEP], no end-of-text token."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("bert_vocab")
    words = sorted({w for line in _texts()[:50] for w in line.lower().split() if w.isalpha()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


@pytest.mark.parametrize("name", ["wordpiece", "bert_tokenizer"])
def test_a_causal_lm_without_end_of_text_stops_at_the_separator(name: str, request: pytest.FixtureRequest,
                                                                tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    tokenizer = request.getfixturevalue(name)
    assert tokenizer.eos_token_id is None and tokenizer.sep_token_id is not None
    cfg = compose_cfg(["task=clm", f"tokenizer={'wordpiece' if name == 'wordpiece' else 'pretrained'}"])
    capfd.readouterr()
    config = build_hf_config(GPT2, cfg.model, tokenizer, 64)
    export = export_hf(build_model(GPT2, "causal_lm", config), tokenizer, tmp_path / "export")
    # transformers' own check: "eos_token_id must be `None` or an integer within the vocabulary"
    assert "within the vocabulary" not in capfd.readouterr().err
    assert config.eos_token_id == config.bos_token_id == tokenizer.sep_token_id
    assert config.pad_token_id == tokenizer.pad_token_id
    for file in ("config.json", "generation_config.json"):
        saved = json.loads((export / file).read_text())
        assert saved["eos_token_id"] == saved["bos_token_id"] == tokenizer.sep_token_id, file
        ids = [saved.get(k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")]
        assert all(i is None or 0 <= i < len(tokenizer) for i in ids), (file, ids)


def test_tokenizers_with_their_own_ids_and_explicit_overrides(wordpiece) -> None:
    bpe = train_bpe(_texts()[:100], vocab_size=400, min_frequency=2)
    config = build_hf_config(GPT2, compose_cfg(["task=clm"]).model, bpe, 64)
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == bpe.eos_token_id
    # BERT keeps its pad id, which the tokenizer also has; no id past the vocabulary anywhere.
    bert = build_hf_config(BERT, compose_cfg(["task=mlm"]).model, wordpiece, 64)
    assert bert.pad_token_id == wordpiece.pad_token_id and bert.eos_token_id == wordpiece.sep_token_id
    # model.config.* still wins, and must name a token the tokenizer has.
    cfg = compose_cfg(["task=clm", f"+model.config.eos_token_id={wordpiece.cls_token_id}"])
    assert build_hf_config(GPT2, cfg.model, wordpiece, 64).eos_token_id == wordpiece.cls_token_id
    cfg = compose_cfg(["task=clm", "+model.config.eos_token_id=50256"])
    with pytest.raises(LmlabError, match=r"config key 'model.config.eos_token_id': 50256 is not a token id"):
        build_hf_config(GPT2, cfg.model, wordpiece, 64)
