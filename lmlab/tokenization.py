"""Tokenizers: trained from scratch on the run's training split, or loaded from a directory.

``tokenizer=wordpiece`` gives a BERT tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK]);
``tokenizer=bpe`` a byte-level GPT-2 style tokenizer with ``<|endoftext|>`` (with BERT's five special
tokens instead for ``model=bert``);
``tokenizer=auto`` picks the one the model family was designed for.

Normalisation (``tokenizer.lowercase``; null, the default, lowercases for WordPiece only), as BERT's
own tokenizers: WordPiece runs BertNormalizer (control characters dropped, every whitespace a space,
CJK ideographs split off as words of their own; with lowercase, also lowercased and accents stripped:
NFD, combining marks dropped, as bert-base-uncased) and BertPreTokenizer (words split at whitespace
and punctuation). Byte-level BPE keeps the text as it is (no Unicode normalisation, GPT-2's rule);
with lowercase it only lowercases. Both normalisers are saved in tokenizer.json, so text encoded later,
and by AutoTokenizer from an export, is normalised the same way.
Trained tokenizers are cached under ``<cache>/tokenizers/<fingerprint>`` so a second run on the
same corpus with the same settings reuses the first one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmlab import cache_lock, fingerprint
from lmlab.atomic import atomic_dir
from lmlab.errors import config_error
from lmlab.paths import is_local_reference, writable_cache_dir
from lmlab.specs import ModelSpec

log = logging.getLogger(__name__)

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
END_OF_TEXT = "<|endoftext|>"
TYPES = ("auto", "bpe", "wordpiece", "pretrained")


def resolve_type(tok_cfg: DictConfig, spec: ModelSpec) -> str:
    kind = tok_cfg.type
    if kind not in TYPES:
        raise config_error("tokenizer.type", f"unknown tokenizer type '{kind}'", f"Use one of: {', '.join(TYPES)}.")
    return spec.tokenizer if kind == "auto" else kind


def wordpiece_characters(texts: Sequence[str], normalizer: Any, pre_tokenizer: Any) -> tuple[list[str], list[str]]:
    """The characters of ``texts`` as WordPiece's trainer sees them, and ``##c`` for every one that
    can continue a word; both sorted.

    The trainer puts every character of the normalized, pre-tokenized text in the vocabulary (its
    alphabet), and ``##c`` for each one it meets inside a word. tokenizers' WordPiece trainer (0.22)
    numbers those pieces in the order it meets them in a hash map, which changes from process to
    process; merges with equal counts are then chosen by those numbers, so the same corpus gave other
    ids and, with a large vocabulary, other tokens on every fresh training (huggingface/tokenizers#1794,
    fix unreleased). Handed to the trainer up front, in sorted order, they get the same ids every time
    and training is deterministic.

    A character continues a word when the normalizer and pre-tokenizer leave it joined to the letter
    before it: not whitespace, not punctuation, and not a CJK ideograph, which BertNormalizer splits
    off as a word of its own. A ``##`` piece of one of those could never be produced: a Chinese corpus
    gave thousands of such dead entries, which took the room of the merges (``vocab_size`` exceeded
    without a word). Decided per distinct character, which is far cheaper than normalizing the corpus.
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    alphabet: set[str] = set()
    continuing: set[str] = set()
    for char in chars:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(char)):
            alphabet.update(word)
        # After a letter: what stays in the letter's word continues it.
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str("a" + char)):
            continuing.update(word[1:])
    return sorted(alphabet), sorted(f"##{c}" for c in continuing)


def train_wordpiece(texts: Sequence[str], vocab_size: int, min_frequency: int, lowercase: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    alphabet, pieces = wordpiece_characters(texts, normalizer, pre_tokenizers.BertPreTokenizer())
    needed = len(WORDPIECE_SPECIALS) + len(alphabet) + len(pieces)
    if vocab_size < needed:
        # The trainer keeps every character whatever vocab_size says: it would return a larger
        # vocabulary of single characters, without a merge and without a word.
        raise config_error(
            "tokenizer.vocab_size", f"{vocab_size} is too small for this corpus: WordPiece needs {needed} entries "
            f"before its first merge (its {len(WORDPIECE_SPECIALS)} special tokens, the {len(alphabet)} characters "
            f"of the training text and {len(pieces)} '##' pieces of those that continue a word)",
            f"Use well above {needed} (the default is 8000).")
    trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    trained.normalizer = normalizer
    trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The continuing pieces go in as special tokens only to fix their ids (wordpiece_characters says why).
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=WORDPIECE_SPECIALS + pieces,
        continuing_subword_prefix="##", show_progress=False,
    )
    trained.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # The same vocabulary in a tokenizer whose only special tokens are BERT's five: as special tokens
    # the pieces would be matched in raw text and dropped from decoded output.
    tok = Tokenizer(models.WordPiece(trained.get_vocab(with_added_tokens=True), unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(WORDPIECE_SPECIALS)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", do_lower_case=lowercase,
        # The pair template above sets segment ids; without this the wrapper drops them.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int, lowercase: bool = False,
              bert_specials: bool = False) -> Any:
    """Byte-level BPE. ``bert_specials``: with BERT's [PAD] [UNK] [CLS] [SEP] [MASK] and its
    ``[CLS] A [SEP] B [SEP]`` layout instead of GPT-2's ``<|endoftext|>`` (for an encoder: a
    RoBERTa-like BERT, ``model=bert tokenizer=bpe``, whose masked LM needs [CLS], [SEP] and [MASK])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        # In the tokenizer, not applied to the texts: text encoded later is lowercased the same way.
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=WORDPIECE_SPECIALS if bert_specials else [END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if bert_specials:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                          special_tokens=[("[CLS]", cls), ("[SEP]", sep)]),
        ])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    # GPT-2 has one special token; it doubles as padding so batches of ragged prompts work.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT, model_input_names=["input_ids", "attention_mask"],
    )


def load_pretrained(path: str, trust_remote_code: bool = False, key: str = "tokenizer.path") -> Any:
    """A local tokenizer directory, or a hub name for users who are online.

    ``key`` is the config key errors name: the tokenizer of ``model.pretrained`` comes from there.
    """
    from transformers import AutoTokenizer

    def holds_tokenizer(folder: Path) -> bool:
        return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()

    local = Path(path).expanduser()
    looks_local = is_local_reference(path)
    if looks_local and not local.exists():
        raise config_error(key, f"'{path}' does not exist (a relative path starts from {Path.cwd()})",
                           "Point it at a directory written by save_pretrained, e.g. an lmlab run directory or its "
                           "export/, or at a hub name.")
    if looks_local and not holds_tokenizer(local) and holds_tokenizer(local / "export"):
        local = local / "export"  # an lmlab run directory, as model.pretrained and distill.teacher take
    if looks_local and not holds_tokenizer(local):
        raise config_error(
            key,
            f"'{path}' is not a tokenizer directory (no tokenizer.json or tokenizer_config.json there)",
            "Point it at a directory written by save_pretrained, e.g. an lmlab run directory or its export/.",
        )
    try:
        return AutoTokenizer.from_pretrained(str(local) if looks_local else path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: unreadable files, or remote code not trusted
        nowhere = "" if looks_local else f"; nor is it a directory under {Path.cwd()}"
        raise config_error(
            key, f"could not load tokenizer '{path}' ({' '.join(str(exc).split())[:400]}){nowhere}",
            "Use a directory written by save_pretrained, or a hub name with network access. Tokenizer code "
            f"shipped with it runs only with {key.split('.')[0]}.trust_remote_code=true: set it only for code "
            "you trust.",
        ) from exc


def _special_tokens_of(kind: str, bert_specials: bool) -> dict[str, str]:
    """The special tokens, by attribute, of the tokenizer ``train_wordpiece`` or ``train_bpe`` returns."""
    if kind == "wordpiece" or bert_specials:
        return {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]"}
    return {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT, "pad_token": END_OF_TEXT}


def _load_cached(where: Path, specials: dict[str, str]) -> Any | None:
    """The tokenizer cached in ``where``, or None (and a warning naming it) when it cannot be loaded.

    An entry cut short or overwritten (a full disk, a copy that stopped) is a miss: the tokenizer is
    trained again and replaces it, as if it had never been cached. So is one that loads without
    ``specials``: tokenizer.json alone (tokenizer_config.json lost) loads as a tokenizer with no
    special tokens, whose causal-LM blocks were packed with nothing between documents.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(where))
    except Exception as exc:  # the tokenizers library raises a plain Exception for a bad tokenizer.json
        log.warning("Cached tokenizer %s is unreadable (%s: %s); training it again and replacing the cache entry",
                    where, type(exc).__name__, " ".join(str(exc).split())[:300])
        return None
    wrong = {attr: getattr(tokenizer, attr, None) for attr, token in specials.items()
             if getattr(tokenizer, attr, None) != token}
    if wrong:
        log.warning("Cached tokenizer %s lacks its special tokens (%s; is %s/tokenizer_config.json missing or "
                    "damaged?); training it again and replacing the cache entry",
                    where, ", ".join(f"{attr} is {value!r}, not {specials[attr]!r}" for attr, value in wrong.items()),
                    where)
        return None
    return tokenizer


def get_tokenizer(
    tok_cfg: DictConfig, spec: ModelSpec, train_texts: Callable[[], Sequence[str]], corpus_fingerprint: str,
    cache_dir: Path,
) -> tuple[Any, dict[str, Any]]:
    """The run's tokenizer and a small record of where it came from (logged to MLflow).

    ``train_texts`` is called only when a tokenizer must be trained: a cached one needs just the
    corpus fingerprint, so a cached run need not read its corpus.
    """
    kind = resolve_type(tok_cfg, spec)
    if kind == "pretrained":
        if not tok_cfg.get("path"):
            raise config_error("tokenizer.path", "is empty", "Set tokenizer.path=DIR (a saved Hugging Face tokenizer).")
        return load_pretrained(str(tok_cfg.path), bool(tok_cfg.get("trust_remote_code", False))), {
            "type": "pretrained", "path": str(tok_cfg.path), "cached": False}

    vocab_size = int(tok_cfg.vocab_size)
    if vocab_size < 300:
        needs = ("WordPiece needs its 5 special tokens plus every character of the corpus, and the ## form "
                 "of each one that continues words" if kind == "wordpiece" else "Byte-level BPE alone needs "
                 "257 entries (256 bytes and <|endoftext|>)")
        raise config_error("tokenizer.vocab_size", f"{vocab_size} is too small", f"{needs}; use at least 300.")
    lowercase = bool(tok_cfg.lowercase) if tok_cfg.get("lowercase") is not None else kind == "wordpiece"
    params = dict(type=kind, vocab_size=vocab_size, min_frequency=int(tok_cfg.min_frequency), lowercase=lowercase)
    if kind == "bpe" and lowercase:
        # Before the Lowercase normalizer, lowercase=true trained a cased BPE tokenizer under this
        # key; the new entry keeps those cached ones from being reused.
        params["normalizer"] = "lowercase"
    bert_specials = kind == "bpe" and spec.tokenizer == "wordpiece"  # an encoder built for BERT's tokens
    if bert_specials:
        params["specials"] = "bert"
    if kind == "wordpiece":
        # Cached WordPiece tokenizers trained before the sorted pieces numbered them by chance, and
        # those trained before wordpiece_characters held dead '##' pieces of CJK ideographs: a new key
        # gives every machine the one deterministic tokenizer of the corpus.
        params["pieces"] = "sorted-continuing"
    key = f"{kind}-{vocab_size}-{fingerprint.of_params(corpus=corpus_fingerprint, **params)[:16]}"
    where = Path(cache_dir) / "tokenizers" / key
    info = {**params, "path": str(where), "fingerprint": key}
    cached = _reuse(where, kind, bert_specials)
    if cached is not None:
        return cached, {**info, "cached": True}

    writable_cache_dir(where.parent)  # before the training, whose tokenizer would have nowhere to go
    with cache_lock.filling(where):
        cached = _reuse(where, kind, bert_specials)  # trained by another process while this one waited
        if cached is not None:
            return cached, {**info, "cached": True}
        tokenizer = _train_into(where, params, bert_specials, train_texts())
    return tokenizer, {**info, "cached": False}


def _reuse(where: Path, kind: str, bert_specials: bool) -> Any | None:
    if not (where / "tokenizer.json").exists():
        return None
    cached = _load_cached(where, _special_tokens_of(kind, bert_specials))
    if cached is not None:
        log.info("Reusing cached %s tokenizer %s", kind, where)
    return cached


def _train_into(where: Path, params: dict[str, Any], bert_specials: bool, texts: Sequence[str]) -> Any:
    """A tokenizer trained on ``texts`` as ``params`` (the cache key's settings) say, saved as cache
    entry ``where``."""
    kind, vocab_size, lowercase = params["type"], params["vocab_size"], params["lowercase"]
    log.info("Training a %s tokenizer (vocab %d) on %d training texts", kind, vocab_size, len(texts))
    if kind == "wordpiece":
        tokenizer = train_wordpiece(texts, vocab_size, params["min_frequency"], lowercase)
    else:
        tokenizer = train_bpe(texts, vocab_size, params["min_frequency"], lowercase, bert_specials)
    with atomic_dir(where) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer


def end_with_token(tokenizer: Any, token_id: int) -> bool:
    """Make ``tokenizer(text)`` end with ``token_id`` (when it adds special tokens, as by default).

    The template goes into the Rust tokenizer's post-processor, which ``save_pretrained`` writes to
    tokenizer.json: a tokenizer reloaded from an export encodes the same way. A tokenizer that already
    ends texts with it (BART's ``<s> ... </s>``, BERT's ``[CLS] ... [SEP]``) is left as it is. Returns
    whether the tokenizer now ends texts with it; False for one without a Rust backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    probe = backend.encode("a", add_special_tokens=True).ids
    if probe and probe[-1] == token_id:
        return True
    from tokenizers import processors

    token = tokenizer.convert_ids_to_tokens(token_id)
    template = processors.TemplateProcessing(single=f"$A {token}", pair=f"$A {token} $B:1 {token}:1",
                                             special_tokens=[(token, token_id)])
    current = backend.post_processor
    # After the existing one: byte-level BPE's fixes offsets, a pretrained template adds BOS first.
    backend.post_processor = template if current is None else processors.Sequence([current, template])
    return True


def encode_texts(tokenizer: Any, texts: Sequence[str], num_proc: int | None = None) -> list[list[int]]:
    """Token ids of each text without special tokens, using the Rust tokenizer when present."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if num_proc and num_proc > 1 and len(texts) > 10_000:
        return _encode_in_processes(tokenizer, texts, num_proc)
    return [enc.ids for enc in unbounded_backend(backend).encode_batch(list(texts), add_special_tokens=False)]


def unbounded_backend(backend: Any) -> Any:
    """The Rust tokenizer without the truncation and padding a pretrained tokenizer.json may store.

    ``tokenizer(...)`` sets both for each call, but the backend called directly keeps the file's: for
    all-MiniLM-L6-v2 (128 and 128) every text came out as 128 ids, "hello world" as 2 words and 126
    [PAD]s, and a language-modelling corpus was packed with padding and cut at 128 tokens a line.
    """
    if backend.truncation is None and backend.padding is None:
        return backend
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())  # a copy: the caller's tokenizer keeps its settings
    plain.no_truncation()
    plain.no_padding()
    return plain


def _encode_shard(args: tuple[str, list[str]]) -> list[list[int]]:
    from tokenizers import Tokenizer

    serialized, texts = args
    tok = unbounded_backend(Tokenizer.from_str(serialized))
    return [enc.ids for enc in tok.encode_batch(texts, add_special_tokens=False)]


def _encode_in_processes(tokenizer: Any, texts: Sequence[str], num_proc: int) -> list[list[int]]:
    # data.num_proc splits the corpus across processes, as datasets.map(num_proc=...) does,
    # for machines where one process's Rust thread pool is not the bottleneck.
    import multiprocessing as mp

    serialized = tokenizer.backend_tokenizer.to_str()
    step = (len(texts) + num_proc - 1) // num_proc
    shards = [(serialized, list(texts[i : i + step])) for i in range(0, len(texts), step)]
    with mp.get_context("spawn").Pool(num_proc) as pool:
        parts = pool.map(_encode_shard, shards)
    return [ids for part in parts for ids in part]
