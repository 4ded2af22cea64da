"""What an export directory holds for its readers: a tokenizer length limit, decoding settings, modes."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import compose_cfg, wiki_head

from lmlab import quantize, registry
from lmlab.export import UNSET_LENGTH, export_hf, export_length, position_limit
from lmlab.models.build import build_hf_config, build_model
from lmlab.tokenization import train_bpe, train_wordpiece

LONG = "good film " * 400  # ~800 tokens: past every tiny model's position table
HEADS = {"bert": "sequence_classification", "gpt2": "causal_lm", "bart": "seq2seq_lm"}


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return wiki_head(tmp_path_factory.mktemp("wiki"), 300).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def tokenizers(texts: list[str]) -> dict[str, Any]:
    """lmlab's from-scratch tokenizers: WordPiece (bert) and byte-level BPE (gpt2, bart, t5)."""
    return {"wordpiece": train_wordpiece(texts, 400, 2, True), "bpe": train_bpe(texts, 400, 2)}


def tokenizer_for(tokenizers: dict[str, Any], model: str) -> Any:
    return tokenizers[registry.get("model", model).tokenizer]


def tiny_model(model: str, tokenizer: Any, head: str | None = None) -> Any:
    cfg = compose_cfg([f"model={model}", "model.size=tiny"])
    spec = registry.get("model", model)
    return build_model(spec, head or HEADS[model], build_hf_config(spec, cfg.model, tokenizer, 64)).eval()


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


# -- 1. model_max_length --------------------------------------------------------------------------------
@pytest.mark.parametrize("model, positions", [("bert", 512), ("gpt2", 256), ("bart", 512)])
def test_a_trained_tokenizer_is_exported_with_the_models_length(tokenizers: dict, tmp_path: Path, model: str,
                                                                positions: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = tokenizer_for(tokenizers, model)
    assert tokenizer.model_max_length >= UNSET_LENGTH  # the defect's starting point
    net = tiny_model(model, tokenizer)
    assert position_limit(net.config) == positions
    out = export_hf(net, tokenizer, tmp_path / "export")
    reloaded = AutoTokenizer.from_pretrained(str(out))
    assert reloaded.model_max_length == positions
    assert tokenizer.model_max_length >= UNSET_LENGTH  # the run's own tokenizer is left as it was
    batch = reloaded(LONG, truncation=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] == positions
    with torch.inference_mode():
        assert net(**batch).logits.isfinite().all()


def test_a_long_text_goes_through_the_exported_pipeline(tokenizers: dict, tmp_path: Path) -> None:
    from transformers import pipeline

    out = export_hf(tiny_model("bert", tokenizers["wordpiece"]), tokenizers["wordpiece"], tmp_path / "export")
    (prediction,) = pipeline("text-classification", model=str(out), device="cpu")(LONG, truncation=True)
    assert prediction["label"] in {"LABEL_0", "LABEL_1"} and 0 <= prediction["score"] <= 1


@pytest.mark.parametrize("given, expected", [(128, 128), (4096, 256)])
def test_a_pretrained_tokenizers_own_limit_is_kept_unless_past_the_positions(
        tokenizers: dict, tmp_path: Path, given: int, expected: int) -> None:
    from transformers import AutoTokenizer

    tokenizers["bpe"].save_pretrained(str(tmp_path / "pretrained"))
    pretrained = AutoTokenizer.from_pretrained(str(tmp_path / "pretrained"), model_max_length=given)
    out = export_hf(tiny_model("gpt2", pretrained), pretrained, tmp_path / "export")  # 256 positions
    assert AutoTokenizer.from_pretrained(str(out)).model_max_length == expected
    assert pretrained.model_max_length == given


def test_a_model_without_a_position_table_keeps_the_tokenizers_value() -> None:
    from transformers import T5Config

    assert position_limit(T5Config()) is None  # relative position buckets: nothing bounds the length
    assert export_length(int(1e30), None) == int(1e30)
    assert export_length(None, 512) is None  # a tokenizer without the attribute


# -- 2. generation settings ----------------------------------------------------------------------------
GENERATION = {"num_beams": 4, "no_repeat_ngram_size": 3, "max_new_tokens": 17, "length_penalty": 0.8}


@pytest.mark.parametrize("model", ["bart", "gpt2"])
def test_the_summarization_export_decodes_with_the_task_settings(tokenizers: dict, tmp_path: Path,
                                                                 model: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = compose_cfg(["task=summarization", f"model={model}", "model.size=tiny",
                       *(f"task.generation.{k}={v}" for k, v in GENERATION.items())])
    task = registry.get("task", "summarization")
    tokenizer = tokenizer_for(tokenizers, model)
    net = tiny_model(model, tokenizer, task.head(cfg))
    module = task.build_module(cfg, net, tokenizer)
    out = export_hf(module.model, tokenizer, tmp_path / "export")

    saved = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert {k: saved.get(k) for k in GENERATION} == GENERATION
    assert saved["early_stopping"] is True and not saved.get("do_sample")
    auto = AutoModelForSeq2SeqLM if model == "bart" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(str(out)).eval()
    enc = AutoTokenizer.from_pretrained(str(out))(["Shares in the bank rose after record profits."],
                                                  return_tensors="pt")
    with torch.inference_mode():
        generated = reloaded.generate(**enc)  # no arguments: the export's own defaults
    new_tokens = generated.shape[1] - (enc["input_ids"].shape[1] if model == "gpt2" else 0)
    assert new_tokens <= GENERATION["max_new_tokens"] + 1  # + BART's decoder start token


def test_a_pretrained_models_sampling_defaults_do_not_block_the_export(tokenizers: dict, tmp_path: Path) -> None:
    """A model that came with sampling and beam settings, fine-tuned to decode greedily, still saves."""
    from transformers import GenerationConfig

    cfg = compose_cfg(["task=summarization", "model=gpt2", "model.size=tiny", "task.generation.num_beams=1"])
    task = registry.get("task", "summarization")
    net = tiny_model("gpt2", tokenizers["bpe"], task.head(cfg))
    net.generation_config.update(do_sample=True, temperature=0.7, top_p=0.9, num_beams=4, length_penalty=2.0,
                                 early_stopping=True)
    module = task.build_module(cfg, net, tokenizers["bpe"])
    out = export_hf(module.model, tokenizers["bpe"], tmp_path / "export")
    saved = GenerationConfig.from_pretrained(str(out))
    assert (saved.num_beams, saved.do_sample, saved.temperature, saved.length_penalty) == (1, False, None, None)


# -- 3. padded vocabulary ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gpt2", "bart"])
def test_the_export_never_generates_a_padded_id(tokenizers: dict, tmp_path: Path, model: str) -> None:
    """model.vocab_multiple's extra output rows decode to nothing: no decoding of the export may pick one."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, pipeline

    tokenizer = tokenizer_for(tokenizers, model)
    cfg = compose_cfg([f"model={model}", "model.size=tiny", "++model.vocab_multiple=64"])
    spec = registry.get("model", model)
    torch.manual_seed(0)
    net = build_model(spec, HEADS[model], build_hf_config(spec, cfg.model, tokenizer, 64)).eval()
    padding = list(range(len(tokenizer), net.config.vocab_size))
    assert len(tokenizer) == 400 and net.config.vocab_size == 448  # 48 padding rows

    out = export_hf(net, tokenizer, tmp_path / "export")
    saved = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    assert saved["suppress_tokens"] == padding
    assert net.generation_config.suppress_tokens is None  # the run's own model is left as it was

    auto = AutoModelForSeq2SeqLM if model == "bart" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(str(out)).eval()
    prompt = AutoTokenizer.from_pretrained(str(out))(["The city of"] * 10, return_tensors="pt")
    torch.manual_seed(0)
    with torch.inference_mode():
        generated = reloaded.generate(**prompt, do_sample=True, temperature=1.5, top_k=0, max_new_tokens=200,
                                      min_new_tokens=200)
    sampled = generated[:, 1:] if model == "bart" else generated[:, prompt["input_ids"].shape[1]:]
    assert sampled.numel() == 2000
    assert int((sampled >= len(tokenizer)).sum()) == 0  # untrained, about 1 in 9 would be padding

    if model == "gpt2":  # transformers 5 has no pipeline for encoder-decoders (text2text-generation is gone)
        torch.manual_seed(0)
        (row,) = pipeline("text-generation", model=str(out), device="cpu")(
            "The city of", do_sample=True, temperature=3.0, top_k=0, max_new_tokens=100, return_tensors=True)
        assert max(row["generated_token_ids"]) < len(tokenizer)


# -- 4. file modes ------------------------------------------------------------------------------------
def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_exports_are_readable_by_others_under_umask_022(umask_022: None, tokenizers: dict, tmp_path: Path) -> None:
    net = tiny_model("gpt2", tokenizers["bpe"])
    exported = export_hf(net, tokenizers["bpe"], tmp_path / "run" / "export")
    quantized, linearized = quantize.quantize(net, "dynamic_int8")
    saved = quantize.save_quantized(quantized, "dynamic_int8", linearized, tokenizers["bpe"],
                                    tmp_path / "run" / "quantized")
    for root in (exported, saved):
        found = modes(root)
        assert "model.safetensors" in found and "tokenizer_config.json" in found
        assert found == {name: 0o755 if (root / name).is_dir() else 0o644 for name in found}
    assert json.loads((saved / "tokenizer_config.json").read_text())["model_max_length"] == 256


def test_a_replaced_export_follows_the_current_umask(tokenizers: dict, tmp_path: Path) -> None:
    net = tiny_model("gpt2", tokenizers["bpe"])
    previous = os.umask(0o077)
    try:
        private = modes(export_hf(net, tokenizers["bpe"], tmp_path / "export"))
        os.umask(0o002)
        shared = modes(export_hf(net, tokenizers["bpe"], tmp_path / "export"))
    finally:
        os.umask(previous)
    assert set(private.values()) == {0o700, 0o600}
    assert shared["."] == 0o775 and shared["model.safetensors"] == 0o664
