"""Scored text for ``task=regression``: read, split, tokenize, pad.

Sources, first match wins: ``data.path`` (a CSV/TSV or JSON-lines file with a text and a numeric
score column, or a directory with ``train`` / ``validation`` / ``test`` files) or
``data.catalog=vader_lexicon``, the 7,506 words and emoticons of the VADER sentiment lexicon, each
with the mean valence (-4 .. +4) that ten human raters gave it. The lexicon ships in the
``vaderSentiment`` package and is read in place, so the default works offline.

Registered as the datamodule ``regression_csv``. Only lmlab's public helpers are used, the way any
third-party package would.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lmlab import fingerprint
from lmlab.data.catalog import package_dir
from lmlab.data.loaders import make_loader
from lmlab.data.sources import (SPLIT_STEMS, carve_validation, check_split_names, decode_file, json_records,
                                not_a_string, row_length_fix, split_seed, table_reader, text_key)
from lmlab.errors import LmlabError, config_error, file_error

PACKING = "regression"  # what TASK.packing asks for; any other packing is a wiring mistake
SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {**SPLIT_STEMS, "test": "test"}
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
# What ends a physical line in a file read with newline="": a quoted CSV field may hold any of them.
LINE_BREAK = re.compile(r"\r\n|\r|\n")
JSON_SUFFIXES = {".jsonl", ".json"}
VADER_PACKAGE, VADER_FILE = "vaderSentiment", "vader_lexicon.txt"


@dataclass
class ScoredSplit:
    """Texts, their scores and where each row came from ("FILE, line N"), for error messages."""

    texts: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    where: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str, score: float, where: str) -> None:
        self.texts.append(text)
        self.scores.append(score)
        self.where.append(where)

    def subset(self, index: list[int] | np.ndarray) -> ScoredSplit:
        idx = [int(i) for i in index]
        return ScoredSplit([self.texts[i] for i in idx], [self.scores[i] for i in idx], [self.where[i] for i in idx])


# -- settings --------------------------------------------------------------------------------------
def fraction(cfg: DictConfig, key: str, where: str) -> float:
    """``data.<key>`` (val_fraction, test_fraction) where a split must be cut out of ``where``: null is
    allowed by lmlab's config check (a named split leaves it unused), so it is said here, by name."""
    value = cfg.get(key)
    if value is None:
        raise config_error(f"data.{key}", f"is null, and {where} has no such split of its own, so one must be "
                           "cut out of its rows", f"Set data.{key} (e.g. 0.1), or give that split its own file "
                           "(validation.* / test.* beside train.*).")
    return float(value)


# -- reading ---------------------------------------------------------------------------------------
def parse_score(value: Any, path: Path, line: int, column: str) -> float:
    """A finite float, or an error naming the file, the line and the column."""
    try:
        # A JSON true/false would pass float() as 1.0/0.0: a flag in the wrong column, not a score.
        score = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise file_error(path, f"the score (column '{column}') is '{value}', not a finite number",
                         "Every row needs a numeric score; fix the row or set data.score_column.", line=line)
    return score


def _add_row(split: ScoredSplit, path: Path, line: int, text: Any, score: Any, cfg: DictConfig) -> None:
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise file_error(path, f"the text (column '{cfg.text_column}') is empty",
                         "Remove that row or fill in its text.", line=line)
    split.add(text, parse_score(score, path, line, str(cfg.score_column)), f"{path}, line {line}")


def read_scored_file(path: Path, cfg: DictConfig) -> ScoredSplit:
    """Rows of one CSV/TSV or JSON-lines file with ``data.text_column`` and ``data.score_column``."""
    text_col, score_col = str(cfg.text_column), str(cfg.score_column)
    content = decode_file(path, str(cfg.encoding))
    out = ScoredSplit()
    if path.suffix.lower() in CSV_DELIMITERS:
        # lmlab's reader: CSV quoting as csv writers write it; TSV unquoted, so a text that opens with
        # a quotation mark is read as written instead of running on into the rows below.
        reader = table_reader(content, path.suffix)
        header = reader.fieldnames or []
        for column, key in ((text_col, "text_column"), (score_col, "score_column")):
            if column not in header:
                raise file_error(path, f"has no column '{column}' (columns: {', '.join(header) or 'none'})",
                                 f"Set data.{key} to the column that holds it.", line=1)
        for record in reader:
            # The line the record starts on: the reader has skipped any blank lines before it, so
            # "the line after the previous record" would point above it.
            fields = [v for v in record.values() if isinstance(v, str)] + list(record.get(None) or [])
            line = reader.line_num - sum(len(LINE_BREAK.findall(v)) for v in fields)
            if None in record or None in record.values():
                # An unquoted comma in a text shifts every field after it: its tail would be read as
                # the score (or the score as an extra field) without a word.
                width = len(header) + len(record.get(None) or []) - sum(v is None for v in record.values())
                fix = row_length_fix(path.suffix) if None in record else "Give the row a value for every column."
                raise file_error(path, f"has a row of {width} field(s) under a header of {len(header)} "
                                 f"({', '.join(header)})", fix, line=line)
            _add_row(out, path, line, record[text_col], record[score_col], cfg)
        return out
    for number, record in json_records(path, content):
        for column in (text_col, score_col):
            if column not in record:
                raise file_error(path, f"has no field '{column}' (fields: {', '.join(sorted(record))})",
                                 "Set data.text_column / data.score_column to its fields.", line=number)
        if record[text_col] is not None and not isinstance(record[text_col], str):
            # Not "empty": the row has a value, of the wrong type.
            raise not_a_string(path, number, text_col, record[text_col],
                               "Write the text as a JSON string, or set data.text_column to the field that holds it.")
        _add_row(out, path, number, record[text_col], record[score_col], cfg)
    return out


def read_scored_path(path: Path, cfg: DictConfig) -> dict[str, ScoredSplit]:
    """One file is the training split; a directory gives splits by file name (train.csv, dev.jsonl ...)."""
    suffixes = set(CSV_DELIMITERS) | JSON_SUFFIXES
    if not path.exists():
        raise config_error("data.path", f"'{path}' does not exist",
                           "Point data.path at a .csv/.tsv/.jsonl file or a directory of train/validation/test files.")
    if path.is_file():
        if path.suffix.lower() not in suffixes:
            raise config_error("data.path", f"'{path}' is not a .csv, .tsv, .jsonl or .json file",
                               "Regression data is a table with a text and a score column.")
        return {"train": read_scored_file(path, cfg)}
    named = {f: SPLIT_NAMES.get(f.stem.lower())
             for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)}
    # A file named for no split (training.csv, scores_2024.csv) beside train.csv would be dropped unread.
    check_split_names(path, named, "Name the files train.*, validation.* (or dev.*) and test.*, and move the "
                      f"others out of '{path}'.")
    splits: dict[str, ScoredSplit] = {}
    for f, name in named.items():
        if name is not None:
            rows = read_scored_file(f, cfg)
            merged = splits.setdefault(name, ScoredSplit())
            for text, score, where in zip(rows.texts, rows.scores, rows.where):
                merged.add(text, score, where)
    if "train" not in splits:
        raise config_error("data.path", f"directory '{path}' has no train.csv / train.tsv / train.jsonl",
                           "Name the files train.*, validation.* (or dev.*) and test.*.")
    return splits


def read_vader_lexicon(cfg: DictConfig) -> tuple[dict[str, ScoredSplit], str]:
    """VADER's lexicon (token, mean rating, std, ratings), split by ``data.split_seed``."""
    root = package_dir(VADER_PACKAGE)
    path = root / VADER_FILE if root is not None else None
    if path is None or not path.is_file():
        raise LmlabError(f"data.catalog=vader_lexicon needs the package '{VADER_PACKAGE}': pip install {VADER_PACKAGE} "
                         "(or give your own scored text with data.path=FILE_OR_DIR).")
    # 14 tokens (lol, ok, xd, d: ...) are listed twice with different ratings. The later line wins,
    # as in vaderSentiment's own reading of the file: one target per token, and no token in two splits.
    entries: dict[str, tuple[float, str]] = {}
    for number, line in enumerate(decode_file(path, str(cfg.encoding)).split("\n"), start=1):
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip():
            entries[parts[0].strip()] = (parse_score(parts[1], path, number, "mean rating"), f"{path}, line {number}")
    rows = ScoredSplit()
    for token, (score, where) in entries.items():
        rows.add(token, score, where)
    order = np.random.default_rng(split_seed(cfg)).permutation(len(rows))
    n_test = int(round(len(rows) * fraction(cfg, "test_fraction", "catalog:vader_lexicon")))
    n_val = int(round(len(rows) * fraction(cfg, "val_fraction", "catalog:vader_lexicon")))
    splits = {"test": rows.subset(order[:n_test]), "validation": rows.subset(order[n_test:n_test + n_val]),
              "train": rows.subset(order[n_test + n_val:])}
    return splits, f"catalog:vader_lexicon ({path})"


def load_scored(cfg: DictConfig) -> tuple[dict[str, ScoredSplit], str]:
    """Splits by name and a description of their origin (``data.path`` wins over ``data.catalog``)."""
    if cfg.get("path"):
        path = Path(str(cfg.path)).expanduser()
        return read_scored_path(path, cfg), f"path:{path.resolve()}"
    if cfg.get("catalog") == "vader_lexicon":
        return read_vader_lexicon(cfg)
    if cfg.get("catalog"):
        raise config_error("data.catalog", f"'{cfg.catalog}' is not a scored dataset",
                           "Use data=vader_lexicon, or data.path=FILE_OR_DIR with a text and a score column.")
    raise config_error("data.path", "no scored data is set",
                       "Set data.path=FILE_OR_DIR (CSV or JSON lines with text and score) or use data=vader_lexicon.")


# -- batches ---------------------------------------------------------------------------------------
class ScoredDataset(Dataset):
    """Token ids per row (ragged) and the float target."""

    def __init__(self, encoded: dict[str, list[list[int]]], scores: list[float]):
        self.encoded = encoded
        self.scores = torch.tensor(scores, dtype=torch.float)

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**{k: v[index] for k, v in self.encoded.items()}, "labels": self.scores[index]}


class PadToLongest:
    """Right-pads a batch to its longest row; a class, not a closure, so worker processes can pickle it."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in rows[0]:
                out = torch.full((len(rows), longest), fill, dtype=torch.long)
                for i, r in enumerate(rows):
                    out[i, : len(r[key])] = torch.as_tensor(r[key], dtype=torch.long)
                batch[key] = out
        batch["labels"] = torch.stack([r["labels"] for r in rows])
        return batch


# -- the datamodule --------------------------------------------------------------------------------
class RegressionDataModule(L.LightningDataModule):
    """Scored text (CSV/TSV/JSON lines, or the VADER lexicon) for task=regression."""

    shards_itself = True  # its loaders are lmlab.data.loaders.make_loader's

    def __init__(self, data_cfg: DictConfig, *, packing: str = PACKING, cache_dir: str | Path = ".", seed: int = 0):
        super().__init__()
        if packing != PACKING:
            raise config_error("data.datamodule", f"the regression_csv datamodule cannot serve packing '{packing}'",
                               "Use it with task=regression.")
        self.cfg = data_cfg
        self.seed = seed
        self.max_length = int(data_cfg.max_length)
        if self.max_length < 4:
            raise config_error("data.max_length", f"{self.max_length} is too short", "Use at least 4 tokens.")
        splits, self.origin = load_scored(data_cfg)
        self.splits = self._complete(splits)
        self.has_test = "test" in self.splits
        self.tokenizer: Any = None
        self.datasets: dict[str, ScoredDataset] = {}
        self.cache_hit: bool | None = None  # tokenizing a few thousand rows is not worth a cache
        self.stats: dict[str, Any] = {}

    def _complete(self, splits: dict[str, ScoredSplit]) -> dict[str, ScoredSplit]:
        train = splits.get("train")
        if train is None or len(train) < 2:
            raise config_error("data.path", f"{self.origin} has fewer than two training rows",
                               "Give a training file with scored rows.")
        if not splits.get("validation"):
            # carve_validation splits a list; carving row numbers keeps texts and scores together. Keyed by
            # the text, so a row and its copy are one row, never one on each side of the split.
            kept, carved = carve_validation(list(range(len(train))), fraction(self.cfg, "val_fraction", self.origin),
                                            split_seed(self.cfg), key=lambda i: text_key(train.texts[i]))
            splits["train"], splits["validation"] = train.subset(kept), train.subset(carved)
        cap = self.cfg.get("max_documents")
        if cap:
            # Quick runs: a seeded sample in file order; evaluation keeps two rows at least, the
            # fewest a correlation needs.
            rng = np.random.default_rng(split_seed(self.cfg))
            for name, rows in list(splits.items()):
                n = int(cap) if name == "train" else max(2, int(cap) // 10)
                if n < len(rows):
                    splits[name] = rows.subset(np.sort(rng.choice(len(rows), n, replace=False)))
        return {k: v for k, v in splits.items() if k in SPLITS and len(v)}

    # -- what lmlab.train.run calls -----------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Keys lmlab's tokenizer cache: the same rows give the same trained tokenizer."""
        parts: list[str] = []
        for name in SPLITS:
            rows = self.splits.get(name)
            if rows is not None:
                parts += [name, *rows.texts, *(repr(s) for s in rows.scores)]
        return fingerprint.of_texts(parts)

    def texts_for_tokenizer(self) -> list[str]:
        return list(self.splits["train"].texts)

    def set_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise config_error("tokenizer", "the tokenizer has neither a pad nor an end-of-text token",
                                   "Batches of different lengths need one: use a tokenizer with a pad token.")
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style: end-of-text doubles as padding
        self.tokenizer = tokenizer
        self.datasets = {}

    def model_config_updates(self) -> dict[str, Any]:
        """One output, trained as regression: Hugging Face's sequence-classification head with MSE."""
        column = str(self.cfg.score_column)
        updates: dict[str, Any] = {"num_labels": 1, "problem_type": "regression",
                                   "id2label": {0: column}, "label2id": {column: 0}}
        if self.tokenizer is not None:
            updates["pad_token_id"] = int(self.tokenizer.pad_token_id)
        return updates

    # -- Lightning hooks ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            raise RuntimeError("RegressionDataModule.set_tokenizer must be called before setup")
        for name, rows in self.splits.items():
            enc = self.tokenizer(rows.texts, truncation=True, max_length=self.max_length, padding=False)
            keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
            self.datasets[name] = ScoredDataset({k: list(enc[k]) for k in keep}, rows.scores)
        train = np.asarray(self.splits["train"].scores)
        self.stats = {**{f"{name}_examples": len(rows) for name, rows in self.splits.items()},
                      "train_score_mean": float(train.mean()), "train_score_std": float(train.std())}

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        # lmlab's sharded loader: under DDP every process reads its own part of one seeded order, and
        # evaluation shards repeat no row (Lightning's DistributedSampler would pad them).
        workers = int(self.cfg.get("num_workers") or 0)
        size = int(self.cfg.batch_size) if shuffle else int(self.cfg.get("eval_batch_size") or self.cfg.batch_size)
        return make_loader(self.datasets[name], batch_size=size, train=shuffle, seed=self.seed, num_workers=workers,
                           collate_fn=PadToLongest(int(self.tokenizer.pad_token_id)))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_test:
            raise LmlabError(f"{self.origin} has no test split")
        return self._loader("test", False)
