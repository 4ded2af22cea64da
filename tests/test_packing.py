"""Block layouts for causal LM, masked LM and next-sentence prediction."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.packing import pack_causal, pack_masked, pack_sentence_pairs

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
EOS = 5


def _random_docs(n: int, seed: int, low: int = 10, high: int = 400) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=int(rng.integers(1, 120))).tolist() for _ in range(n)]


@pytest.mark.parametrize("block_size", [8, 64, 100])
def test_pack_causal(block_size):
    docs = _random_docs(200, seed=block_size)
    rows = pack_causal(docs, block_size, EOS, vocab_size=400)
    assert rows.ndim == 2 and rows.shape[1] == block_size
    stream = [t for d in docs for t in (*d, EOS)]
    assert rows.shape[0] == len(stream) // block_size > 0
    # No padding anywhere: every id comes from the documents or is the end-of-text token.
    assert not np.isin(rows, [PAD]).any()
    # Rows laid end to end are exactly the prefix of the documents joined by EOS.
    assert rows.reshape(-1).tolist() == stream[: rows.size]


def test_pack_causal_large_vocab_keeps_ids():
    docs = [[70_000, 100_000, 5], [99_999]]
    rows = pack_causal(docs, 3, 200_000, vocab_size=200_001)
    assert rows.reshape(-1).tolist() == [70_000, 100_000, 5, 200_000, 99_999, 200_000]


def test_pack_masked():
    block_size = 32
    docs = _random_docs(150, seed=3)
    rows = pack_masked(docs, block_size, CLS, SEP, vocab_size=400)
    assert rows.shape[1] == block_size and rows.shape[0] > 50
    assert (rows[:, 0] == CLS).all()
    assert (rows[:, -1] == SEP).all()
    assert not (rows == PAD).any()
    # The bodies laid end to end are the documents joined by [SEP].
    stream = [t for d in docs for t in (*d, SEP)]
    body = rows[:, 1:-1].reshape(-1).tolist()
    assert body == stream[: len(body)]
    assert rows.shape[0] == len(stream) // (block_size - 2)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@pytest.fixture
def real_sentence_docs(wiki_file: Path) -> list[list[list[int]]]:
    """Wikipedia paragraphs as lists of sentences, each sentence as a list of word ids."""
    vocab: dict[str, int] = {}
    docs = []
    for paragraph in wiki_file.read_text(encoding="utf-8").splitlines()[:300]:
        sentences = [s for s in SENTENCE_END.split(paragraph.strip()) if s]
        docs.append([[vocab.setdefault(w, len(vocab) + 10) for w in s.split()] for s in sentences])
    return docs


def _check_rows(out, block_size):
    ids, types, mask, labels = out["input_ids"], out["token_type_ids"], out["attention_mask"], out["next_sentence_label"]
    n = len(labels)
    assert ids.shape == types.shape == mask.shape == (n, block_size)
    pairs = []
    for r in range(n):
        length = int(mask[r].sum())
        assert 5 <= length <= block_size
        # attention_mask covers exactly the leading real tokens, the rest is padding.
        assert (mask[r, :length] == 1).all() and (mask[r, length:] == 0).all()
        assert (ids[r, length:] == PAD).all()
        row = ids[r, :length].tolist()
        assert PAD not in row
        assert row[0] == CLS and row[-1] == SEP and row.count(SEP) == 2 and row.count(CLS) == 1
        sep = row.index(SEP)
        a, b = row[1:sep], row[sep + 1 : -1]
        assert a and b
        # Segment A (with [CLS] and its [SEP]) is type 0; B and the final [SEP] are type 1.
        assert (types[r, : sep + 1] == 0).all()
        assert (types[r, sep + 1 : length] == 1).all()
        assert (types[r, length:] == 0).all()
        pairs.append((a, b, int(labels[r])))
    return pairs


@pytest.mark.parametrize("block_size", [32, 128])
def test_sentence_pairs_on_real_sentences(real_sentence_docs, block_size):
    assert max(t for d in real_sentence_docs for s in d for t in s) < 60_000
    out = pack_sentence_pairs(real_sentence_docs, block_size, CLS, SEP, PAD, vocab_size=60_000, seed=0)
    pairs = _check_rows(out, block_size)
    assert len(pairs) >= 300
    labels = out["next_sentence_label"]
    assert set(np.unique(labels).tolist()) == {0, 1}
    share = float(labels.mean())
    assert 0.4 <= share <= 0.6, share


def test_sentence_pairs_seeded():
    docs = [[[10 + d * 100 + s * 10 + t for t in range(5)] for s in range(6)] for d in range(40)]
    one = pack_sentence_pairs(docs, 24, CLS, SEP, PAD, 5000, seed=1)
    two = pack_sentence_pairs(docs, 24, CLS, SEP, PAD, 5000, seed=1)
    for key in one:
        assert np.array_equal(one[key], two[key])


def test_true_pairs_really_follow_in_the_source():
    """Token id = 100 + doc * 10_000 + position in the doc, so each id names its doc and place."""
    rng = np.random.default_rng(5)
    docs = []
    for d in range(150):
        sentences, pos = [], 0
        for _ in range(int(rng.integers(1, 9))):
            length = int(rng.integers(1, 25))
            sentences.append([100 + d * 10_000 + pos + k for k in range(length)])
            pos += length
        docs.append(sentences)
    block_size = 40
    out = pack_sentence_pairs(docs, block_size, CLS, SEP, PAD, vocab_size=2_000_000, seed=3)
    pairs = _check_rows(out, block_size)

    def where(token):
        return (token - 100) // 10_000, (token - 100) % 10_000

    n_true = n_random = 0
    for a, b, label in pairs:
        a_at, b_at = [where(t) for t in a], [where(t) for t in b]
        # Each segment is one contiguous run of one document (truncation trims only the ends).
        for seg in (a_at, b_at):
            assert len({d for d, _ in seg}) == 1
            assert [p for _, p in seg] == list(range(seg[0][1], seg[0][1] + len(seg)))
        if label == 0:
            n_true += 1
            assert a_at[0][0] == b_at[0][0], "a true continuation must come from the same document"
            assert b_at[0][1] > a_at[-1][1], "B must come after A"
            # With no trimming between them, B starts right where A ends.
            if len(a) + len(b) < block_size - 3:
                assert b_at[0][1] == a_at[-1][1] + 1
        else:
            n_random += 1
            assert a_at[0][0] != b_at[0][0], "a random B must come from another document"
    assert n_true > 20 and n_random > 20


def test_next_sentence_pairs_from_a_single_document_are_refused_for_training(caplog) -> None:
    """Every pair of a one-document split is a true continuation: NSP trained on all-IsNext labels."""
    from lmlab.data.text_datamodule import _check_nsp_documents
    from lmlab.errors import LmlabError

    one = [[[11, 12, 13], [14, 15]], [[], []]]  # the second document holds no token
    assert set(pack_sentence_pairs(one, 16, CLS, SEP, PAD, 100, seed=0)["next_sentence_label"].tolist()) == {0}
    with pytest.raises(LmlabError, match=r"'task.nsp': is true, and the train split has 1 non-empty document, .*"
                                         r"set task.nsp=false"):
        _check_nsp_documents(one, "train")
    _check_nsp_documents(one, "validation")
    assert "the validation split has 1 non-empty document" in caplog.text
    _check_nsp_documents([*one, [[16, 17]]], "train")


@pytest.mark.parametrize("packing", ["causal", "masked"])
def test_real_corpus_blocks_hold_every_token_once_and_splits_share_no_document(wiki_file: Path, tmp_path: Path,
                                                                                packing: str) -> None:
    # group_texts semantics end to end: each split is packed on its own, its documents joined by the
    # separator, and only the tail shorter than one block is left out.
    from conftest import compose_cfg

    from lmlab.data.text_datamodule import TextDataModule
    from lmlab.tokenization import encode_texts, train_bpe, train_wordpiece

    texts = [line for line in wiki_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if packing == "causal":
        tok = train_bpe(texts, vocab_size=800, min_frequency=2)
    else:
        tok = train_wordpiece(texts, vocab_size=1500, min_frequency=2, lowercase=True)
    cfg = compose_cfg(["data=text", f"data.path={wiki_file}", "data.block_size=64", "data.val_fraction=0.1"]).data
    dm = TextDataModule(cfg, packing=packing, cache_dir=tmp_path / "cache", seed=0)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    assert not set(dm.corpus.train) & set(dm.corpus.validation)
    assert len(dm.corpus.train) + len(dm.corpus.validation) == len(set(texts))
    separator = tok.eos_token_id if packing == "causal" else tok.sep_token_id
    for split, docs in (("train", dm.corpus.train), ("validation", dm.corpus.validation)):
        stream = [t for ids in encode_texts(tok, docs) for t in (*ids, separator)]
        rows = dm.splits[split].arrays["input_ids"]
        body = rows if packing == "causal" else rows[:, 1:-1]
        dropped = len(stream) - body.size
        assert 0 <= dropped < body.shape[1], split
        assert body.reshape(-1).tolist() == stream[: body.size], split
