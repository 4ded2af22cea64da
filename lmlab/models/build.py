"""Turn ``cfg.model`` plus a tokenizer into a Hugging Face model for a task's head."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab.errors import LmlabError, config_error
from lmlab.specs import ModelSpec

try:  # huggingface_hub >= 0.32 checks a config's field types when it is built
    from huggingface_hub.errors import StrictDataclassError
except ImportError:
    StrictDataclassError = ValueError  # type: ignore[misc,assignment]

# What Hugging Face raises for model.config values that do not fit: a field of the wrong type, a width
# not divisible by the heads, n_head=0, an unknown activation name. Anything else (out of memory, a
# bug) keeps its own traceback.
REJECTED = (StrictDataclassError, ValueError, TypeError, ArithmeticError, KeyError)


def build_hf_config(
    spec: ModelSpec, model_cfg: DictConfig, tokenizer: Any, length: int, updates: dict[str, Any] | None = None,
    length_key: str = "data.block_size",
) -> Any:
    """The HF config for ``model.size`` with ``model.config.*`` overrides applied and checked, its
    positions checked against ``length`` tokens (set by config key ``length_key``)."""
    if model_cfg.size not in spec.sizes:
        raise config_error(
            "model.size",
            f"'{model_cfg.size}' is not a size of model '{spec.name}'",
            f"Use one of: {', '.join(spec.sizes)}.",
        )
    overrides = config_overrides(spec, model_cfg, len(tokenizer))
    check_data_owned(overrides, updates or {})
    defaults = spec.config_class().to_dict()
    kwargs = {**spec.sizes[model_cfg.size], **overrides, **(updates or {})}
    kwargs["vocab_size"] = padded_vocab_size(len(tokenizer), int(model_cfg.get("vocab_multiple") or 1))
    for attr, value in special_token_ids(tokenizer).items():
        if value is None and _is_token(defaults.get(attr), len(tokenizer)):
            continue  # the class's default names a token the tokenizer has (BERT's pad 0)
        # None rather than a default past the vocabulary (GPT-2's 50256 with a 5,000-token WordPiece);
        # model.config.* overrides still win.
        kwargs.setdefault(attr, value)
    try:
        config = spec.config_class(**kwargs)
    except REJECTED as exc:
        raise _rejected(exc, spec.config_class.__name__, overrides) from exc
    check_positions(spec, config, length_key, length, model_cfg.size)
    return config


def config_overrides(spec: ModelSpec, model_cfg: DictConfig, tokens: int) -> dict[str, Any]:
    """``model.config.*`` as a dict, each key checked to be a field of the model's HF config class and
    each special-token id one of the ``tokens`` ids of the tokenizer."""
    node = model_cfg.get("config")
    overrides = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    # attribute_map holds HF's aliases (GPT-2 accepts hidden_size for n_embd, and so on).
    # num_labels is an argument of every config but stored as id2label, so to_dict() lacks it.
    known = set(spec.config_class().to_dict()) | set(getattr(spec.config_class, "attribute_map", {})) | {"num_labels"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        # HF configs swallow unknown kwargs silently; a typo must not train the wrong model.
        raise config_error(
            f"model.config.{unknown[0]}",
            f"not a field of {spec.config_class.__name__}",
            "Check the spelling against the Hugging Face config documentation for this model.",
        )
    check_special_ids(overrides, tokens)
    return overrides


SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def check_data_owned(overrides: dict[str, Any], updates: dict[str, Any]) -> None:
    """Refuse a ``model.config.*`` field the datamodule sets from the data (``updates``: the label
    count and names, the tokenizer's pad id) to another value: the data's value is the one the
    model is built with, so the override would be silently dropped."""
    for key, value in overrides.items():
        if key in updates and value != updates[key]:
            hint = (" Regression (one real-valued score per text) is no built-in task: see the example plugin "
                    "in plugins/lmlab-regression." if key in ("num_labels", "problem_type") else "")
            raise config_error(f"model.config.{key}", f"'{value}' differs from {updates[key]!r}, which the data "
                               "sets (from its labels or its tokenizer) and which the model is built with",
                               f"Remove model.config.{key}.{hint}")


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The config's pad/bos/eos ids as the tokenizer has them; None where it has no such token.

    A tokenizer without an end-of-text token (WordPiece, BERT's) ends documents with its separator:
    the causal-LM data is packed with eos, else sep, between documents (lmlab/data/text_datamodule.py)
    and summaries end the same way. That id is what generation must stop at, and what a new text
    follows, so it becomes eos and, lacking a bos token, bos.
    """
    end = _first_id(tokenizer, "eos_token_id", "sep_token_id")
    bos = _first_id(tokenizer, "bos_token_id")
    return {"pad_token_id": _first_id(tokenizer, "pad_token_id"), "bos_token_id": end if bos is None else bos,
            "eos_token_id": end}


def _first_id(tokenizer: Any, *attrs: str) -> int | None:
    values = [getattr(tokenizer, attr, None) for attr in attrs]
    return next((int(v) for v in values if v is not None), None)


def _is_token(value: Any, tokens: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < tokens


def check_special_ids(overrides: dict[str, Any], tokens: int) -> None:
    """model.config.{pad,bos,eos}_token_id set by the user must name one of the tokenizer's ids."""
    for attr in SPECIAL_IDS:
        value = overrides.get(attr)
        if value is not None and not _is_token(value, tokens):
            raise config_error(f"model.config.{attr}",
                               f"{value} is not a token id of the tokenizer (0 to {tokens - 1})",
                               f"Leave it out (lmlab takes the tokenizer's own) or give an id below {tokens}.")


def padded_vocab_size(tokens: int, multiple: int) -> int:
    """``tokens`` rounded up to a multiple of ``multiple`` (model.vocab_multiple).

    The embedding and the output projection get that many rows; the ids past the tokenizer's are
    never inputs nor targets. GPU matrix kernels want dimensions divisible by 8-128: an odd vocabulary
    like GPT-2's 50,257 leaves the (tokens x vocabulary) products, the largest of a small model's step,
    on slower unaligned kernels (nanoGPT and Megatron pad it, to 50,304 and a multiple of 128).
    """
    return -(-tokens // multiple) * multiple


def padding_ids(config: Any, tokens: int) -> list[int]:
    """The ids of the output rows past a ``tokens``-id tokenizer's: ``padded_vocab_size``'s padding.

    No text encodes to them and they decode to nothing, yet the output layer still gives them some
    probability (their rows are only ever pushed down, as wrong answers), so sampling or an early
    greedy step can pick them: generation must suppress them.
    """
    rows = getattr(config, "vocab_size", None)
    if not isinstance(rows, int) or isinstance(rows, bool):
        return []
    return list(range(tokens, rows))


def check_positions(spec: ModelSpec, config: Any, length_key: str, length: int, size: str = "pretrained") -> None:
    """``length`` tokens (set by config key ``length_key``) must fit the model's positions."""
    # A pretrained T5 saved with the stock config (google/t5-v1_1-*, mT5) has no n_positions: its
    # relative position buckets put no bound on the length, so there is nothing to check.
    positions = getattr(config, spec.positions_key, None)
    if positions is None:
        return
    if length > positions:
        raise config_error(
            length_key,
            f"{length} is longer than model '{spec.name}' (size {size}) can attend "
            f"to ({spec.positions_key}={positions})",
            f"Lower {length_key} to at most {positions} or raise "
            f"model.config.{spec.positions_key}.",
        )


def build_model(spec: ModelSpec, head: str, config: Any) -> Any:
    """A freshly initialised model with the task's head; SDPA attention where the model has it."""
    model_class = spec.heads[head]
    try:
        return model_class._from_config(config, attn_implementation="sdpa")
    except (ValueError, ImportError):
        pass  # no SDPA for this model, or values it refuses: the second try says which
    try:
        return model_class._from_config(config)
    except REJECTED as exc:
        raise _rejected(exc, model_class.__name__) from exc


def _rejected(exc: Exception, by: str, overrides: dict[str, Any] | None = None) -> LmlabError:
    """The error for model.config values that Hugging Face's config or model class ``by`` refused.

    It names the field when the message quotes one the user set (the type checks do), else model.config.
    """
    # One paragraph: HF's messages span lines.
    message = " ".join(f"{type(exc).__name__}: {exc}".split()).rstrip(".")
    field = next((name for name in overrides or {} if f"'{name}'" in message), None)
    if field is not None:
        return config_error(f"model.config.{field}", f"{by} refused it ({message})",
                            "Fix the value, or leave it out for model.size's own.")
    return config_error("model.config", f"{by} refused it ({message})",
                        "Fix the model.config.* value this is about (sizes must fit together: e.g. the width a "
                        "multiple of the number of heads), or leave it out for model.size's own.")
