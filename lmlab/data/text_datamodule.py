"""The datamodule for pretraining on raw text: read, tokenize, pack, cache, serve batches.

Registered as ``text`` in the ``lmlab.datamodules`` entry-point group. Tokenized and packed
blocks are cached as ``.npy`` files keyed by corpus, tokenizer and packing, so a second run
skips tokenizing entirely; the cache is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lmlab import cache_lock, fingerprint
from lmlab.atomic import atomic_dir
from lmlab.data import packing as layout
from lmlab.data.loaders import make_loader
from lmlab.data.sources import Corpus, load_corpus
from lmlab.errors import LmlabError, config_error
from lmlab.models.build import special_token_ids
from lmlab.paths import writable_cache_dir
from lmlab.tokenization import encode_texts, unbounded_backend

log = logging.getLogger(__name__)

# The packings whose blocks are drawn from the seed (layout.pack_sentence_pairs): only their cache key holds it.
_SEEDED_PACKINGS = ("sentence_pairs",)
# Sentence boundaries for next-sentence prediction: end punctuation followed by space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class BlockDataset(Dataset):
    """Rows of equally long arrays; every item is a dict of tensors."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.length = len(next(iter(arrays.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v[index].astype(np.int64)) for k, v in self.arrays.items()}


class UnreadableCache(LmlabError):
    """A file of a tokenized-data cache entry cannot be read back as the blocks it should hold."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cached tokenized data is unreadable ({reason}). Delete the file's folder, "
                         "or point LMLAB_CACHE_DIR at a disk with room, and run again.")
        self.path, self.reason = path, reason


def _load_blocks(where: Path, block_size: int, names: tuple[str, ...]) -> dict[str, dict[str, np.ndarray]]:
    """Each split's arrays of a cache entry, memory-mapped; UnreadableCache names a file of ``names``
    that is missing or not a whole .npy array of ``block_size`` columns (``input_ids``) with one row
    per block."""
    splits: dict[str, dict[str, np.ndarray]] = {}
    for split in ("train", "validation"):
        arrays: dict[str, np.ndarray] = {}
        for path in sorted(where.glob(f"{split}.*.npy")):
            try:
                arrays[path.name.split(".")[1]] = np.load(path, mmap_mode="r")
            except (OSError, ValueError, EOFError) as exc:  # truncated or not an .npy file
                raise UnreadableCache(path, f"{type(exc).__name__}: {exc}") from exc
        # A copy cut short can hold ``done`` and input_ids but not the attention mask or segment ids,
        # without which the blocks would be served with their padding attended to.
        for name in names:
            if name not in arrays:
                raise UnreadableCache(where / f"{split}.{name}.npy", "missing")
        ids = arrays["input_ids"]
        if ids.ndim != 2 or ids.shape[1] != block_size:
            raise UnreadableCache(where / f"{split}.input_ids.npy",
                                  f"shape {tuple(ids.shape)}, not (blocks, {block_size})")
        for name, array in arrays.items():
            if len(array) != len(ids):
                raise UnreadableCache(where / f"{split}.{name}.npy", f"{len(array)} rows where input_ids has {len(ids)}")
        splits[split] = arrays
    return splits


def _layout_ids(tokenizer: Any, packing: str) -> dict[str, int | None]:
    """The special token ids that ``packing`` writes into the blocks.

    They come from the tokenizer's config (tokenizer_config.json), not from tokenizer.json, which
    the tokenizer fingerprint hashes: one tokenizer.json loaded with another eos token (a chat
    model's tokenizer beside its base model's) would otherwise be served the other's blocks.
    """
    if packing == "causal":
        return {"eos": special_token_ids(tokenizer)["eos_token_id"]}
    ids = {"cls": getattr(tokenizer, "cls_token_id", None), "sep": getattr(tokenizer, "sep_token_id", None)}
    if packing == "sentence_pairs":
        ids["pad"] = getattr(tokenizer, "pad_token_id", None)
    return ids


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without a pretrained file's stored truncation and padding, which encoding ignores and
        # tokenizer(...) clears: with them the key would depend on whether anything called it first.
        return fingerprint.of_params(tokenizer=unbounded_backend(backend).to_str())[:16]
    # A tokenizer without a Rust backend (transformers' Python ones, e.g. ProphetNet's, or remote code)
    # is keyed by the files it saves: keyed by its path and size, a vocabulary edited in place kept the
    # blocks encoded with the old one. The vocabulary too: save_vocabulary writes nothing for a
    # tokenizer that keeps it in no attribute transformers knows.
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    with tempfile.TemporaryDirectory() as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except NotImplementedError:  # remote code without save_vocabulary: its vocabulary keys it alone
            return digest.hexdigest()[:16]
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                digest.update(f"\x00{path.relative_to(tmp).as_posix()}\x00".encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class TextDataModule(L.LightningDataModule):
    """Raw text (file, directory, catalog or HF dataset) packed for causal or masked LM."""

    shards_itself = True  # its loaders are lmlab.data.loaders.make_loader's

    def __init__(self, data_cfg: DictConfig, *, packing: str, cache_dir: str | Path, seed: int = 0):
        super().__init__()
        if packing not in layout.PACKINGS:
            # A task whose plugin brings its own datamodule, run with the default text data config.
            from lmlab import registry

            others = ", ".join(n for n in registry.names("datamodule") if n != "text") or "(none)"
            raise config_error(
                "data.datamodule", f"the text datamodule cannot serve packing '{packing}' (it packs raw text for "
                f"language modelling: {', '.join(layout.PACKINGS)})",
                "Use the data config that comes with the task (data=NAME, e.g. the one its plugin ships) or "
                f"data.datamodule=NAME with a datamodule that serves it (registered: {others}).",
            )
        self.cfg = data_cfg
        self.packing_mode = packing
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self.block_size = int(data_cfg.block_size)
        if self.block_size < 8:
            raise config_error("data.block_size", f"{self.block_size} is too short", "Use at least 8 tokens.")
        self.corpus: Corpus = load_corpus(data_cfg, stamp_dir=self.cache_dir / "corpora")
        self.tokenizer: Any = None
        self.splits: dict[str, BlockDataset] = {}
        self.cache_hit: bool | None = None

    # -- the two steps a training script drives ------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.corpus.fingerprint

    def texts_for_tokenizer(self) -> list[str]:
        return self.corpus.train

    def set_tokenizer(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    # -- Lightning hooks -------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            raise RuntimeError("TextDataModule.set_tokenizer must be called before setup")
        where = self._cache_entry()
        loaded = self._load_cached(where)
        self.cache_hit = loaded is not None
        if loaded is None:
            writable_cache_dir(where.parent)  # before the tokenizing, whose blocks would have nowhere to go
            with cache_lock.filling(where):
                loaded = self._load_cached(where)  # packed by another process while this one waited
                self.cache_hit = loaded is not None
                if loaded is None:
                    loaded = self._fill(where)
        for split, arrays in loaded.items():
            self.splits[split] = BlockDataset(arrays)
        n_train = len(self.splits["train"])
        if n_train == 0 or len(self.splits["validation"]) == 0:
            empty = "training" if n_train == 0 else "validation"
            raise LmlabError(
                f"the {empty} split of {self.corpus.origin} is shorter than one block of "
                f"data.block_size={self.block_size} tokens. Add text or lower data.block_size."
            )
        self.stats = {
            "train_blocks": n_train,
            "validation_blocks": len(self.splits["validation"]),
            "train_tokens": int(n_train * self.block_size),
            # False when the tokenizer and blocks were cached and the corpus stamp matched: no text read.
            "corpus_read": self.corpus.is_read,
        }

    def _fill(self, where: Path) -> dict[str, dict[str, np.ndarray]]:
        """Tokenize and pack the corpus into cache entry ``where``; its blocks."""
        log.info("Tokenizing and packing %d + %d documents", len(self.corpus.train), len(self.corpus.validation))
        packed = {split: self._pack(docs, split)
                  for split, docs in (("train", self.corpus.train), ("validation", self.corpus.validation))}
        with atomic_dir(where) as tmp:
            for split, arrays in packed.items():
                for name, array in arrays.items():
                    np.save(tmp / f"{split}.{name}.npy", array)
            (tmp / "done").write_text("ok\n")
        try:
            return _load_blocks(where, self.block_size, layout.ARRAYS[self.packing_mode])
        except UnreadableCache as exc:
            # Another process filling the same entry where flock is not supported swaps its copy in
            # with two renames, between which the entry is missing: read then, it crashed a few of
            # every thousand concurrent writes. Its copy holds these same blocks.
            log.info("Tokenized-data cache entry %s was being replaced by another process as it was read "
                     "(%s); using the blocks packed here", where, exc.reason)
            return packed

    def _cache_entry(self) -> Path:
        """Where this data's blocks are cached.

        Only sentence pairs are drawn from the seed; the other packings' entries are shared by a sweep
        over seeds. Entries keyed before the special ids joined the key (those that held the seed
        among them) are not read: nothing in them tells which separator they were packed with.
        """
        params = dict(corpus=self.corpus.fingerprint, tokenizer=_tokenizer_fingerprint(self.tokenizer),
                      packing=self.packing_mode, block=self.block_size, version=1,
                      specials=_layout_ids(self.tokenizer, self.packing_mode))
        if self.packing_mode in _SEEDED_PACKINGS:
            params["seed"] = self.seed
        return self.cache_dir / "data" / f"{self.packing_mode}-{self.block_size}-{fingerprint.of_params(**params)[:20]}"

    def _load_cached(self, where: Path) -> dict[str, dict[str, np.ndarray]] | None:
        """The blocks of the entry when it is complete and readable; None otherwise."""
        if not (where / "done").exists():
            return None
        try:
            loaded = _load_blocks(where, self.block_size, layout.ARRAYS[self.packing_mode])
        except UnreadableCache as exc:
            # A truncated or overwritten file (a full disk, a copy cut short): the entry is rebuilt
            # from the text, as if it had never been written.
            log.warning("Tokenized-data cache file %s is unreadable (%s); tokenizing again and replacing "
                        "the cache entry", exc.path, exc.reason)
            return None
        log.info("Reusing tokenized data %s", where)
        return loaded

    def _pack(self, docs: list[str], split: str) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        num_proc = self.cfg.get("num_proc")
        vocab = len(tok)
        if self.packing_mode == "causal":
            ids = encode_texts(tok, docs, num_proc)
            eos = special_token_ids(tok)["eos_token_id"]
            return {"input_ids": layout.pack_causal(ids, self.block_size, eos, vocab)}
        for attr in ("cls_token_id", "sep_token_id"):
            if getattr(tok, attr, None) is None:
                raise config_error("tokenizer", f"the tokenizer has no {attr.split('_')[0].upper()} token, "
                                   "which masked-LM packing needs", "Use tokenizer=wordpiece or a BERT tokenizer.")
        if self.packing_mode == "masked":
            ids = encode_texts(tok, docs, num_proc)
            return {"input_ids": layout.pack_masked(ids, self.block_size, tok.cls_token_id, tok.sep_token_id, vocab)}
        if tok.pad_token_id is None:  # pairs are shorter than a block: the rest is padding
            raise config_error("tokenizer", "the tokenizer has no PAD token, which next-sentence pairs (task.nsp=true) "
                               "are padded with", "Use tokenizer=wordpiece or a BERT tokenizer.")
        sentences = [_SENTENCE_END.split(doc) for doc in docs]
        flat = encode_texts(tok, [s for doc in sentences for s in doc], num_proc)
        grouped, pos = [], 0
        for doc in sentences:
            grouped.append(flat[pos : pos + len(doc)])
            pos += len(doc)
        _check_nsp_documents(grouped, split)
        seed = self.seed + (0 if split == "train" else 1)
        return layout.pack_sentence_pairs(grouped, self.block_size, tok.cls_token_id, tok.sep_token_id,
                                           tok.pad_token_id, vocab, seed)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        workers = int(self.cfg.get("num_workers") or 0)
        return make_loader(self.splits[split], batch_size=batch_size, train=shuffle, seed=self.seed,
                           num_workers=workers, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, int(self.cfg.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, int(self.cfg.get("eval_batch_size") or self.cfg.batch_size))


def _check_nsp_documents(grouped: list[list[list[int]]], split: str) -> None:
    """Next-sentence prediction needs two documents: its random second segments come from another one.

    With a single document every pair is a true continuation (label IsNext), which the NSP head
    learns to answer without reading anything.
    """
    documents = sum(1 for doc in grouped if any(len(sentence) for sentence in doc))
    if documents >= 2:
        return
    what = f"the {split} split has {documents} non-empty document{'s' if documents != 1 else ''}"
    if split == "train":
        raise config_error("task.nsp", f"is true, and {what}, so no pair could get a second segment from another "
                           "document", "Give it several documents (each non-blank line of the corpus is one), or set "
                           "task.nsp=false.")
    log.warning("task.nsp: %s, so every next-sentence pair there is a true continuation: its NSP accuracy says "
                "nothing. Give the %s split more documents.", what, split)
