"""Tokenizers trained on real text, the tokenizer cache and saved tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHARED_DATA
from omegaconf import OmegaConf

from lmlab.errors import LmlabError
from lmlab.models.bert import MODEL as BERT
from lmlab.models.gpt2 import MODEL as GPT2
from lmlab.tokenization import (
    END_OF_TEXT,
    WORDPIECE_SPECIALS,
    encode_texts,
    end_with_token,
    get_tokenizer,
    train_bpe,
    train_wordpiece,
)

UNICODE_TEXT = "Zoë's café — naïve Œuvre, 東京 and Привет! 🚀 costs £5 ≈ €6.\n\tTabs  and  spaces."


@pytest.fixture
def texts(wiki_file: Path) -> list[str]:
    return [line for line in wiki_file.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_train_wordpiece(texts):
    tok = train_wordpiece(texts, vocab_size=1200, min_frequency=2, lowercase=True)
    vocab = tok.get_vocab()
    assert [vocab[s] for s in WORDPIECE_SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert 1000 <= len(tok) <= 1200
    assert any(t.startswith("##") for t in vocab)

    ids = tok("The insects are known as stick insects.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.cls_token_id not in ids[1:-1] and tok.sep_token_id not in ids[1:-1]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the insects are known as stick insects."

    pair = tok("first part", "second part")
    assert pair["input_ids"].count(tok.sep_token_id) == 2
    assert pair["token_type_ids"][0] == 0 and pair["token_type_ids"][-1] == 1


TRAIN_AND_PRINT = """
import json, sys
from lmlab.tokenization import train_bpe, train_wordpiece
texts = [line for line in open(sys.argv[1], encoding="utf-8").read().splitlines() if line.strip()]
train = train_wordpiece if sys.argv[2] == "wordpiece" else train_bpe
print(json.dumps(train(texts, int(sys.argv[3]), 2, True).backend_tokenizer.to_str()))
"""


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_training_in_fresh_processes_gives_the_same_tokenizer(wiki_file: Path, kind: str) -> None:
    """Reproducible runs need the same ids from the same corpus in every process: tokenizers' trainer
    iterates hash maps seeded per process (lmlab.tokenization.wordpiece_characters)."""
    import subprocess
    import sys

    def train() -> str:
        done = subprocess.run([sys.executable, "-c", TRAIN_AND_PRINT, str(wiki_file), kind, "4000"],
                              capture_output=True, text=True, timeout=300, check=True)
        return done.stdout

    first, second, third = train(), train(), train()
    assert first == second == third and '"##' in first if kind == "wordpiece" else first == second == third


def test_wordpiece_pieces_are_not_special_in_text(texts):
    tok = train_wordpiece(texts, vocab_size=1200, min_frequency=2, lowercase=True)
    assert sorted(tok.all_special_tokens) == sorted(WORDPIECE_SPECIALS)
    assert sorted(tok.backend_tokenizer.get_added_tokens_decoder()) == [0, 1, 2, 3, 4]
    assert "##b" in tok.get_vocab()  # a continuing piece, handed to the trainer as a special token
    tokens = tok.convert_ids_to_tokens(tok("a ##b the")["input_ids"])
    # "##b" in raw text is punctuation and a word, as in BERT: not matched whole as a special token.
    assert "##b" not in tokens and tokens[-3:] == ["b", "the", "[SEP]"]



def _chinese_sentences(count: int) -> list[str]:
    """The first ``count`` sentences of the MSRA Chinese NER corpus in ../shared/data, as text."""
    path = SHARED_DATA / "ner" / "msra_zh" / "train.conll"
    if not path.exists():
        pytest.skip(f"real test data missing: {path}")
    sentences, chars = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            chars.append(line.split("\t")[0])
        elif chars:
            sentences.append("".join(chars))
            chars = []
            if len(sentences) == count:
                break
    return sentences


def _is_cjk_ideograph(char: str) -> bool:
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def test_wordpiece_holds_no_continuing_pieces_that_no_word_can_produce(texts):
    # BertNormalizer splits every CJK ideograph off as a word of its own, so '##中' can never be
    # produced. Handed to the trainer all the same, such pieces filled a Chinese vocabulary (4,215
    # '##' entries of 8,464 for vocab_size=8000 on 20,000 MSRA sentences, 40 of them ever used), and
    # the whole English Wikipedia corpus of ../shared/data got 115 of them (from its names in Chinese).
    mixed = _chinese_sentences(1500) + texts
    tok = train_wordpiece(mixed, vocab_size=4000, min_frequency=2, lowercase=True)
    vocab = tok.get_vocab()
    assert len(tok) <= 4000
    dead = [t for t in vocab if t.startswith("##") and _is_cjk_ideograph(t[2])]
    assert dead == []
    assert {"##1", "##e", "##s"} <= vocab.keys()  # letters and digits continue words
    assert any(_is_cjk_ideograph(t) for t in vocab)  # ideographs are in, as words of their own
    ids = tok("北京是中国的首都 in 2008")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "北京是中国的首都in2008"


def test_vocab_size_below_the_corpus_alphabet_is_an_error_naming_the_key(tmp_path):
    # The trainer keeps every character whatever vocab_size says: 1,000 asked for 1,500 Chinese
    # sentences gave 5,327 entries (2,649 of them dead '##' pieces), without a single merge.
    chinese = _chinese_sentences(1500)
    too_small = r"config key 'tokenizer.vocab_size': 1000 is too small for this corpus"
    with pytest.raises(LmlabError, match=too_small) as caught:
        get_tokenizer(_cfg(kind="wordpiece", vocab_size=1000), BERT, lambda: chinese, "zh", tmp_path)
    needed = int(str(caught.value).split("WordPiece needs ")[1].split()[0])
    assert 1000 < needed < 4000
    tok, _ = get_tokenizer(_cfg(kind="wordpiece", vocab_size=needed), BERT, lambda: chinese, "zh", tmp_path)
    assert len(tok) == needed  # the least that works: every character, no merge

def test_train_bpe_round_trip(texts):
    tok = train_bpe(texts, vocab_size=800, min_frequency=2)
    vocab = tok.get_vocab()
    assert END_OF_TEXT in vocab
    assert tok.eos_token_id == vocab[END_OF_TEXT] == tok.pad_token_id
    assert 700 <= len(tok) <= 800
    for text in (UNICODE_TEXT, texts[0], " leading space and trailing  "):
        ids = tok(text)["input_ids"]
        assert tok.eos_token_id not in ids
        assert tok.decode(ids) == text
    # Byte-level: nothing is ever unknown, and a rare character costs several byte pieces.
    assert len(tok("🚀")["input_ids"]) >= 2


def test_end_with_token_is_saved_with_the_tokenizer_and_added_once(texts, tmp_path):
    from transformers import AutoTokenizer

    tok = train_bpe(texts, vocab_size=800, min_frequency=2)
    eos = tok.eos_token_id
    plain = tok(texts[0], add_special_tokens=False)["input_ids"]
    assert end_with_token(tok, eos)
    assert tok(texts[0])["input_ids"] == [*plain, eos]
    assert tok(texts[0], return_offsets_mapping=True)["offset_mapping"][-1] == (0, 0)  # offsets still byte-level
    assert encode_texts(tok, [texts[0]]) == [plain]  # the LM data reads no special tokens
    tok.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert reloaded(texts[0])["input_ids"] == [*plain, eos]
    assert end_with_token(reloaded, eos) and reloaded(texts[0])["input_ids"] == [*plain, eos]  # not twice
    assert reloaded.decode(reloaded(texts[0])["input_ids"], skip_special_tokens=True) == texts[0]
    assert reloaded(texts[0], truncation=True, max_length=5)["input_ids"] == [*plain[:4], eos]

    # A tokenizer that already ends texts with it ([CLS] ... [SEP]) is left as it is.
    wordpiece = train_wordpiece(texts, vocab_size=1200, min_frequency=2, lowercase=True)
    before = wordpiece("stick insects")["input_ids"]
    assert end_with_token(wordpiece, wordpiece.sep_token_id)
    assert wordpiece("stick insects")["input_ids"] == before and before.count(wordpiece.sep_token_id) == 1


def _cfg(kind: str = "auto", vocab_size: int = 600, **extra):
    return OmegaConf.create({"type": kind, "vocab_size": vocab_size, "min_frequency": 2, "lowercase": None, **extra})


def test_get_tokenizer_caches(texts, tmp_path):
    cache = tmp_path / "cache"
    first, info1 = get_tokenizer(_cfg(), GPT2, lambda: texts, "corpus-a", cache)
    assert info1["cached"] is False and info1["type"] == "bpe"
    assert (Path(info1["path"]) / "tokenizer.json").exists()

    # The cached copy is found by the fingerprint alone: the corpus is not read.
    second, info2 = get_tokenizer(_cfg(), GPT2, lambda: pytest.fail("read the corpus"), "corpus-a", cache)
    assert info2["cached"] is True
    assert info2["path"] == info1["path"]
    assert second.get_vocab() == first.get_vocab()
    assert second(UNICODE_TEXT)["input_ids"] == first(UNICODE_TEXT)["input_ids"]
    assert second.eos_token == END_OF_TEXT

    other_corpus, info3 = get_tokenizer(_cfg(), GPT2, lambda: texts, "corpus-b", cache)
    assert info3["cached"] is False and info3["path"] != info1["path"]

    other_size, info4 = get_tokenizer(_cfg(vocab_size=700), GPT2, lambda: texts, "corpus-a", cache)
    assert info4["cached"] is False and info4["path"] != info1["path"]
    assert len(other_size) > len(first)

    # tokenizer=auto gives BERT a WordPiece tokenizer, cached separately.
    wp, info5 = get_tokenizer(_cfg(), BERT, lambda: texts, "corpus-a", cache)
    assert info5["type"] == "wordpiece" and info5["cached"] is False and info5["lowercase"] is True
    assert wp.mask_token_id == 4
    again, info6 = get_tokenizer(_cfg(), BERT, lambda: texts, "corpus-a", cache)
    assert info6["cached"] is True and again.mask_token_id == 4 and again.get_vocab() == wp.get_vocab()
    assert again("Stick insects")["input_ids"] == wp("Stick insects")["input_ids"]
    # The reloaded BERT tokenizer still hands out segment ids for sentence pairs.
    assert again("stick insects", "leaf insects")["token_type_ids"][-1] == 1


def test_pretrained_loads_a_saved_directory(texts, tmp_path):
    tok = train_wordpiece(texts, vocab_size=600, min_frequency=2, lowercase=True)
    saved = tmp_path / "saved_tok"
    tok.save_pretrained(str(saved))
    loaded, info = get_tokenizer(OmegaConf.create({"type": "pretrained", "path": str(saved)}), GPT2, lambda: [], "x", tmp_path)
    assert info["type"] == "pretrained" and info["cached"] is False
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded("Stick insects")["input_ids"] == tok("Stick insects")["input_ids"]


def test_pretrained_path_that_is_not_a_tokenizer(tmp_path):
    not_a_tokenizer = tmp_path / "just_a_dir"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "notes.txt").write_text("hello\n")
    cfg = OmegaConf.create({"type": "pretrained", "path": str(not_a_tokenizer)})
    with pytest.raises(LmlabError, match="tokenizer.path") as info:
        get_tokenizer(cfg, GPT2, lambda: [], "x", tmp_path)
    assert str(not_a_tokenizer) in str(info.value)

    with pytest.raises(LmlabError, match="tokenizer.path"):
        get_tokenizer(OmegaConf.create({"type": "pretrained", "path": None}), GPT2, lambda: [], "x", tmp_path)


def test_vocab_size_too_small(texts, tmp_path):
    with pytest.raises(LmlabError, match="tokenizer.vocab_size"):
        get_tokenizer(_cfg(vocab_size=100), GPT2, lambda: texts, "x", tmp_path)


def test_vocab_size_too_small_says_what_each_kind_needs(texts, tmp_path):
    with pytest.raises(LmlabError, match="WordPiece needs its 5 special tokens") as caught:
        get_tokenizer(_cfg(kind="wordpiece", vocab_size=100), GPT2, lambda: texts, "x", tmp_path)
    assert "Byte-level" not in str(caught.value)
    with pytest.raises(LmlabError, match="Byte-level BPE alone needs 257"):
        get_tokenizer(_cfg(kind="bpe", vocab_size=100), GPT2, lambda: texts, "x", tmp_path)


def test_lowercase_bpe_folds_case_and_is_cached_apart(texts, tmp_path):
    cache = tmp_path / "cache"
    cased, cased_info = get_tokenizer(_cfg(kind="bpe"), GPT2, lambda: texts, "corpus-a", cache)
    lower, lower_info = get_tokenizer(_cfg(kind="bpe", lowercase=True), GPT2, lambda: texts, "corpus-a", cache)
    assert lower_info["lowercase"] is True and lower_info["cached"] is False
    assert lower_info["path"] != cased_info["path"]

    assert lower("THE")["input_ids"] == lower("the")["input_ids"]
    assert lower("Stick Insects")["input_ids"] == lower("stick insects")["input_ids"]
    assert cased("THE")["input_ids"] != cased("the")["input_ids"]
    # Trained on lowercased text, it merges no capital letters (single bytes are all there, A-Z too).
    capitals = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert not [p for p in lower.get_vocab() if len(p) > 1 and p != END_OF_TEXT and capitals & set(p)]
    assert [p for p in cased.get_vocab() if len(p) > 1 and capitals & set(p)]

    # The cached copy keeps the normalizer.
    again, again_info = get_tokenizer(_cfg(kind="bpe", lowercase=True), GPT2, lambda: pytest.fail("read the corpus"),
                                      "corpus-a", cache)
    assert again_info["cached"] is True and again_info["path"] == lower_info["path"]
    assert again("THE")["input_ids"] == again("the")["input_ids"] == lower("the")["input_ids"]


def test_bpe_for_bert_has_berts_special_tokens(texts, tmp_path):
    """model=bert tokenizer=bpe (a RoBERTa-like BERT) trained a GPT-2 tokenizer: masked LM stopped with
    'the tokenizer has no CLS token'."""
    cache = tmp_path / "cache"
    gpt2, gpt2_info = get_tokenizer(_cfg(kind="bpe"), GPT2, lambda: texts, "corpus-a", cache)
    bert, bert_info = get_tokenizer(_cfg(kind="bpe"), BERT, lambda: texts, "corpus-a", cache)
    assert bert_info["path"] != gpt2_info["path"] and bert_info["specials"] == "bert"
    assert gpt2.cls_token is None and END_OF_TEXT not in bert.get_vocab()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [bert.pad_token, bert.unk_token, bert.cls_token, bert.sep_token, bert.mask_token] == specials
    assert bert.convert_tokens_to_ids(specials) == [0, 1, 2, 3, 4]
    pair = bert(" stick insects", " leaf insects")
    assert pair["input_ids"][0] == bert.cls_token_id and pair["input_ids"].count(bert.sep_token_id) == 2
    assert pair["token_type_ids"][-1] == 1 and pair["token_type_ids"][0] == 0
    assert bert.decode(bert(UNICODE_TEXT, add_special_tokens=False)["input_ids"]) == UNICODE_TEXT  # byte-level
    again, again_info = get_tokenizer(_cfg(kind="bpe"), BERT, lambda: pytest.fail("read the corpus"), "corpus-a", cache)
    assert again_info["cached"] is True and again.mask_token_id == 4
    assert again(" stick insects")["input_ids"] == bert(" stick insects")["input_ids"]


def test_unknown_tokenizer_type(tmp_path):
    with pytest.raises(LmlabError, match="tokenizer.type"):
        get_tokenizer(_cfg(kind="sentencepiece"), GPT2, lambda: [], "x", tmp_path)


def test_a_pretrained_tokenizer_path_may_be_an_lmlab_run_directory(tmp_path: Path) -> None:
    # model.pretrained and distill.teacher take a run directory; tokenizer.path takes it too (its export/).
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmlab.tokenization import load_pretrained

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(tmp_path / "run" / "export")
    loaded = load_pretrained(str(tmp_path / "run"))
    assert loaded("hello world")["input_ids"] == [1, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match=r"tokenizer\.path.*run directory or its export/"):
        load_pretrained(str(tmp_path / "empty"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty_config"])
def test_a_corrupt_cached_tokenizer_is_trained_again(texts, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    first, info1 = get_tokenizer(_cfg(), GPT2, lambda: texts, "corpus-a", cache)
    where = Path(info1["path"])
    if damage == "truncated":  # a copy or a disk that ran out part way
        data = (where / "tokenizer.json").read_bytes()
        (where / "tokenizer.json").write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        (where / "tokenizer.json").write_bytes(b"\x00\x01 not json at all")
    else:
        (where / "tokenizer_config.json").write_text("{", encoding="utf-8")
    with caplog.at_level("WARNING", logger="lmlab.tokenization"):
        again, info2 = get_tokenizer(_cfg(), GPT2, lambda: texts, "corpus-a", cache)
    assert info2["cached"] is False and info2["path"] == info1["path"]
    assert any(str(where) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert again.get_vocab() == first.get_vocab()
    # The entry was replaced: the next run reuses it.
    third, info3 = get_tokenizer(_cfg(), GPT2, lambda: pytest.fail("read the corpus"), "corpus-a", cache)
    assert info3["cached"] is True and third(UNICODE_TEXT)["input_ids"] == first(UNICODE_TEXT)["input_ids"]


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
@pytest.mark.parametrize("damage", ["config_lost", "config_emptied"])
def test_a_cached_tokenizer_that_lost_its_special_tokens_is_trained_again(texts, tmp_path, caplog, kind, damage):
    # tokenizer.json alone (a copy of the cache that stopped before tokenizer_config.json) loads
    # without error as a tokenizer with no special tokens at all: it was reused, and causal-LM blocks
    # were packed with nothing between documents (no eos, no sep), masked LM refused for lack of [CLS].
    spec = BERT if kind == "wordpiece" else GPT2
    cache = tmp_path / "cache"
    first, info1 = get_tokenizer(_cfg(kind), spec, lambda: texts, "corpus-a", cache)
    config = Path(info1["path"]) / "tokenizer_config.json"
    if damage == "config_lost":
        config.unlink()
    else:
        config.write_text("{}", encoding="utf-8")
    with caplog.at_level("WARNING", logger="lmlab.tokenization"):
        again, info2 = get_tokenizer(_cfg(kind), spec, lambda: texts, "corpus-a", cache)
    assert info2["cached"] is False
    assert any(info1["path"] in r.getMessage() and "lacks its special tokens" in r.getMessage()
               for r in caplog.records)
    for attr in ("eos_token_id", "sep_token_id", "cls_token_id", "pad_token_id", "mask_token_id"):
        assert getattr(again, attr) == getattr(first, attr), attr
    third, info3 = get_tokenizer(_cfg(kind), spec, lambda: pytest.fail("read the corpus"), "corpus-a", cache)
    assert info3["cached"] is True and third.pad_token_id == first.pad_token_id is not None
    if kind == "wordpiece":
        assert third("stick insects", "leaf insects")["token_type_ids"][-1] == 1


def test_encoding_ignores_the_truncation_and_padding_a_tokenizer_file_stores(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2's tokenizer.json stores truncation and padding at 128: read through the Rust
    backend directly, "hello world" came out as 2 ids and 126 [PAD]s, and every line was cut at 128,
    so a language-modelling corpus was packed with padding."""
    from lmlab.data.text_datamodule import _tokenizer_fingerprint
    from lmlab.tokenization import _encode_shard, load_pretrained

    from tokenizers import Tokenizer

    tok = train_wordpiece(["hello world, a line of words to read"] * 20, 300, 1, True)
    tok.save_pretrained(tmp_path / "stored")
    stored = Tokenizer.from_file(str(tmp_path / "stored" / "tokenizer.json"))  # as MiniLM's file has them
    stored.enable_truncation(8)
    stored.enable_padding(length=8, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
    stored.save(str(tmp_path / "stored" / "tokenizer.json"))
    loaded = load_pretrained(str(tmp_path / "stored"))
    assert loaded.backend_tokenizer.truncation is not None and loaded.backend_tokenizer.padding is not None
    texts = ["hello world", " ".join(["words"] * 20)]
    key = _tokenizer_fingerprint(loaded)
    encoded = encode_texts(loaded, texts)
    in_processes = _encode_shard((loaded.backend_tokenizer.to_str(), texts))  # data.num_proc's workers
    assert loaded.backend_tokenizer.truncation is not None  # the tokenizer itself is left as it was
    # tokenizer(...) sets truncation and padding per call (and clears the stored ones).
    expected = [loaded(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert [len(ids) for ids in expected] == [2, 20]
    assert encoded == in_processes == expected
    assert _tokenizer_fingerprint(loaded) == key  # the blocks' cache key does not move when they are cleared
