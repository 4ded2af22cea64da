"""Lay token ids out in fixed-size blocks for the two pretraining objectives.

``pack_causal``: documents joined by the end-of-text token and cut into full blocks (no padding),
as HF's ``group_texts``. ``pack_masked``: documents joined by [SEP] and cut into blocks of
``[CLS] ... [SEP]`` (no padding). ``pack_sentence_pairs``: BERT's next-sentence-prediction
examples ``[CLS] A [SEP] B [SEP]`` with B the true continuation or, half the time, text from
another document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PACKINGS = ("causal", "masked", "sentence_pairs")
# The arrays each packing returns, one row per block: a cache entry lacking one is incomplete.
ARRAYS = {"causal": ("input_ids",), "masked": ("input_ids",),
          "sentence_pairs": ("input_ids", "token_type_ids", "attention_mask", "next_sentence_label")}


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _concat(docs: Sequence[Sequence[int]], separator: int | None, dtype: np.dtype) -> np.ndarray:
    sep = [] if separator is None else [separator]
    total = sum(len(d) for d in docs) + len(sep) * len(docs)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for doc in docs:
        out[pos : pos + len(doc)] = doc
        pos += len(doc)
        if sep:
            out[pos] = separator
            pos += 1
    return out


def pack_causal(docs: Sequence[Sequence[int]], block_size: int, eos_id: int | None, vocab_size: int) -> np.ndarray:
    """(N, block_size) token ids; the tail shorter than a block is dropped, as HF does."""
    stream = _concat(docs, eos_id, _dtype_for(vocab_size))
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size)


def pack_masked(docs: Sequence[Sequence[int]], block_size: int, cls_id: int, sep_id: int, vocab_size: int) -> np.ndarray:
    """(N, block_size) rows of [CLS] + block_size-2 tokens + [SEP]; the tail shorter than block_size-2
    tokens is dropped, as in pack_causal."""
    body = block_size - 2
    stream = _concat(docs, sep_id, _dtype_for(vocab_size))
    n = len(stream) // body
    out = np.empty((n, block_size), dtype=stream.dtype)
    out[:, 0] = cls_id
    out[:, 1:-1] = stream[: n * body].reshape(n, body)
    out[:, -1] = sep_id
    return out


def pack_sentence_pairs(
    docs: Sequence[Sequence[Sequence[int]]], block_size: int, cls_id: int, sep_id: int, pad_id: int,
    vocab_size: int, seed: int,
) -> dict[str, np.ndarray]:
    """Next-sentence-prediction examples from documents given as lists of tokenized sentences.

    Label 0: B follows A in the same document; label 1: B is from another document (the
    convention of ``BertForPreTraining``). The coin is fair, so about half of the pairs are random.
    """
    rng = np.random.default_rng(seed)
    target = block_size - 3
    rows: list[tuple[list[int], list[int], int]] = []
    nonempty = [i for i, d in enumerate(docs) if any(len(s) for s in d)]
    for doc_index in nonempty:
        doc = [list(s) for s in docs[doc_index] if len(s)]
        i, chunk, length = 0, [], 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                random_next = rng.random() < 0.5 and len(nonempty) > 1
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = [t for s in chunk[:a_end] for t in s]
                if random_next:
                    other = doc_index
                    while other == doc_index:
                        other = nonempty[int(rng.integers(len(nonempty)))]
                    other_doc = [s for s in docs[other] if len(s)]
                    start = int(rng.integers(len(other_doc)))
                    b: list[int] = []
                    for s in other_doc[start:]:
                        b.extend(s)
                        if len(a) + len(b) >= target:
                            break
                    # The unused sentences of this chunk go back to be read again, as in BERT.
                    i -= len(chunk) - a_end
                elif len(chunk) >= 2:
                    b = [t for s in chunk[a_end:] for t in s]
                else:
                    # One long sentence: its two halves are still a true continuation.
                    half = max(1, len(a) // 2)
                    a, b = a[:half], a[half:]
                if a and b:
                    rows.append((*_truncate_pair(a, b, target, rng), int(random_next)))
                chunk, length = [], 0
            i += 1
    n = len(rows)
    ids = np.full((n, block_size), pad_id, dtype=_dtype_for(vocab_size))
    types = np.zeros((n, block_size), dtype=np.uint8)
    mask = np.zeros((n, block_size), dtype=np.uint8)
    labels = np.zeros(n, dtype=np.int64)
    for r, (a, b, label) in enumerate(rows):
        seq = [cls_id, *a, sep_id, *b, sep_id]
        ids[r, : len(seq)] = seq
        types[r, len(a) + 2 : len(seq)] = 1
        mask[r, : len(seq)] = 1
        labels[r] = label
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask, "next_sentence_label": labels}


def _truncate_pair(a: list[int], b: list[int], target: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    # BERT trims the longer segment, from the front or the back at random, until the pair fits.
    a, b = list(a), list(b)
    while len(a) + len(b) > target:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b
