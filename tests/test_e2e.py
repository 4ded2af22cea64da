"""End to end: composed config -> lmlab.train.run -> Lightning -> MLflow -> Hugging Face export.

Real components throughout: a tokenizer trained on real Wikipedia text, tiny GPT-2/BERT models
trained for a few steps on a CPU, the embedded MLflow store read back through MlflowClient.
Runs that several tests look at are made once per module in a shared lmlab home.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from conftest import TINY, WIKI, compose_cfg
from lmlab import registry
from lmlab.flops import cpu_peak_flops
from lmlab.models.build import build_hf_config, build_model
from lmlab.optim import lr_lambda, warmup_steps
from lmlab.tokenization import get_tokenizer
from lmlab.train import RunResult, run

SAMPLE = "The river flows through the old town, past the cathedral and the university library."


# -- helpers --------------------------------------------------------------------------------------
@dataclass
class Workspace:
    """An lmlab home and cache shared by the runs of this module."""

    root: Path
    wiki: Path
    runs: dict[str, tuple[RunResult, DictConfig]] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def run(self, *overrides: str, data: str | None = None) -> tuple[RunResult, DictConfig]:
        source = data if data is not None else f"data.path={self.wiki}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LMLAB_HOME", str(self.home))
            mp.setenv("LMLAB_CACHE_DIR", str(self.cache))
            cfg = compose_cfg([*TINY, source, *overrides])
            OmegaConf.resolve(cfg)  # pin paths to this workspace, whatever the env says later
            return run(cfg), cfg

    def cached(self, name: str, *overrides: str) -> tuple[RunResult, DictConfig]:
        if name not in self.runs:
            self.runs[name] = self.run(*overrides)
        return self.runs[name]


def write_wiki(path: Path, n: int = 600) -> Path:
    lines = WIKI.read_text(encoding="utf-8").splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def client_for(result: RunResult):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=result.tracking_uri)


def run_info(result: RunResult, tmp: Path) -> dict:
    dst = tmp / f"run_info_{result.run_id}"
    dst.mkdir(parents=True, exist_ok=True)
    path = client_for(result).download_artifacts(result.run_id, "run_info.json", str(dst))
    return json.loads(Path(path).read_text())


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    """Every file below ``path`` in the run's artifacts, recursively."""
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        if info.is_dir:
            out |= artifact_paths(client, run_id, info.path)
        else:
            out.add(info.path)
    return out


def build_like_train(cfg: DictConfig):
    """The LightningModule and DataModule exactly as lmlab.train.run assembles them."""
    task = registry.get("task", cfg.task.name)
    spec = registry.get("model", cfg.model.name)
    dm = registry.get("datamodule", cfg.data.datamodule)(
        cfg.data, packing=task.packing(cfg), cache_dir=cfg.paths.cache, seed=int(cfg.seed)
    )
    tokenizer, _ = get_tokenizer(cfg.tokenizer, spec, dm.texts_for_tokenizer, dm.fingerprint, Path(cfg.paths.cache))
    dm.set_tokenizer(tokenizer)
    hf_config = build_hf_config(spec, cfg.model, tokenizer, int(cfg.data.block_size))
    dm.setup("fit")
    model = build_model(spec, task.head(cfg), hf_config)
    return task.build_module(cfg, model, tokenizer), dm, tokenizer


TASKS = {
    "clm": ["task=clm"],
    "mlm": ["task=mlm"],
    "nsp": ["task=mlm", "task.nsp=true", "task.whole_word_mask=true"],
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    root = tmp_path_factory.mktemp("e2e")
    return Workspace(root=root, wiki=write_wiki(root / "wiki.txt"))


def task_run(ws: Workspace, name: str) -> tuple[RunResult, DictConfig]:
    return ws.cached(name, *TASKS[name])


# -- training end to end --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_task_trains_end_to_end(ws: Workspace, name: str) -> None:
    result, cfg = task_run(ws, name)
    m = result.metrics
    loss = m["val/loss"]
    assert math.isfinite(loss) and loss > 0
    assert m["val/perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert result.objective == loss
    # Ten steps beat a uniform guess over the vocabulary: the model learned something.
    vocab = json.loads((result.export_dir / "config.json").read_text())["vocab_size"]
    assert loss < math.log(vocab)
    if name == "clm":
        assert "val/masked_accuracy" not in m and "val/nsp_accuracy" not in m
    else:
        assert 0.0 <= m["val/masked_accuracy"] <= 1.0
        assert 0.0 < m["val/masked_accuracy"]  # at least the most common tokens come back
    if name == "nsp":
        assert 0.0 <= m["val/nsp_accuracy"] <= 1.0
    else:
        assert "val/nsp_accuracy" not in m
    assert cfg.task.name == ("clm" if name == "clm" else "mlm")
    assert cfg.model.name == ("gpt2" if name == "clm" else "bert")


@pytest.mark.parametrize("name", ["clm", "mlm", "nsp"])
def test_loss_falls_on_a_repeated_batch(wiki_file: Path, name: str) -> None:
    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", *TASKS[name]])
    torch.manual_seed(0)
    module, dm, _ = build_like_train(cfg)
    batch = next(iter(dm.train_dataloader()))
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if name == "clm":
            loss_sum, count = module.token_losses(batch)
            return loss_sum / count
        # The same masks every step: the model can memorise exactly these positions.
        r = module._forward(batch, torch.Generator().manual_seed(7))
        loss = r["mlm_sum"] / r["count"]
        return loss + r["nsp_loss"] if name == "nsp" else loss

    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


# -- MLflow ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clm", "nsp"])
def test_mlflow_run_is_recorded(ws: Workspace, name: str, tmp_path: Path) -> None:
    result, cfg = task_run(ws, name)
    client = client_for(result)
    assert result.tracking_uri.startswith("sqlite:///") and result.tracking_uri.endswith("mlflow.db")
    assert (ws.home / "mlflow.db").exists()
    r = client.get_run(result.run_id)
    assert r.info.status == "FINISHED"

    params = r.data.params
    assert params["task.name"] == cfg.task.name
    assert params["model.name"] == cfg.model.name
    assert params["model.size"] == "tiny"
    assert float(params["optimizer.lr"]) == pytest.approx(float(cfg.optimizer.lr))
    assert params["trainer.max_steps"] == "10"
    assert params["data.block_size"] == "64"
    assert int(params["n_parameters"]) > 0
    if name == "nsp":
        assert params["task.nsp"] == "True" and params["task.whole_word_mask"] == "True"

    metrics = r.data.metrics
    for key in ("train/loss", "val/loss", "val/perplexity", "train/lr", "train/tokens_per_sec"):
        assert key in metrics, key
        assert math.isfinite(metrics[key]), key
    assert metrics["train/tokens_per_sec"] > 0
    assert metrics["train/total_tokens"] > 0
    if cpu_peak_flops(1) is not None:  # an x86 CPU with AVX2 or AVX-512: MFU against lmlab's estimate
        assert 0 < metrics["train/mfu"] < 1.5, metrics["train/mfu"]  # turbo may lift it past the nominal peak
    assert 0 < metrics["train/lr"] <= float(cfg.optimizer.lr)
    # Each train/lr point is the rate its step trained with: step s (0-based) ran with the schedule
    # at s. Read after the step, it would be the next step's rate (the first one never shown).
    total = int(cfg.trainer.max_steps)
    warmup = warmup_steps(cfg.scheduler, total)
    factor = lr_lambda(str(cfg.scheduler.name), warmup, total, float(cfg.scheduler.get("min_lr_ratio", 0.0)))
    # The run's total, logged once training ended, sits at its last step (MLflow's default is 0).
    assert [m.step for m in client.get_metric_history(result.run_id, "train/total_tokens")] == [total - 1]
    lrs = client.get_metric_history(result.run_id, "train/lr")
    assert len(lrs) >= 3
    assert [m.value for m in lrs] == pytest.approx([float(cfg.optimizer.lr) * factor(m.step) for m in lrs])
    # The last validation logged is the final one, whose numbers run() returned.
    assert metrics["val/loss"] == pytest.approx(result.metrics["val/loss"], rel=1e-5)
    history = client.get_metric_history(result.run_id, "train/loss")
    assert len(history) >= 3  # logged every 2 of 10 steps
    # Validated after steps 5 and 10 (val_check_interval=5), which Lightning logs 0-based like the
    # training metrics (train/loss of the 10th step is at 9). Fit's last validation is the final
    # one: no second point for the same weights.
    assert [m.step for m in client.get_metric_history(result.run_id, "val/loss")] == [4, 9]
    if name == "nsp":
        assert "val/nsp_accuracy" in metrics and "val/masked_accuracy" in metrics

    tags = r.data.tags
    assert tags["lmlab.task"] == cfg.task.name
    assert tags["lmlab.model"] == cfg.model.name
    assert tags["lmlab.output_dir"] == str(result.output_dir.resolve())

    files = artifact_paths(client, result.run_id)
    assert "config/config_resolved.yaml" in files
    assert "run_info.json" in files
    for name_ in ("model.safetensors", "config.json", "tokenizer.json"):
        assert f"model/{name_}" in files, sorted(files)

    resolved = result.output_dir / "config_resolved.yaml"
    assert resolved.is_file()
    on_disk = yaml.safe_load(resolved.read_text())
    assert on_disk["task"]["name"] == cfg.task.name and on_disk["model"]["name"] == cfg.model.name
    assert on_disk["paths"]["root"] == str(ws.home)  # resolved, no ${...} left
    dst = tmp_path / "dl"
    dst.mkdir()
    logged = client.download_artifacts(result.run_id, "config/config_resolved.yaml", str(dst))
    assert yaml.safe_load(Path(logged).read_text()) == on_disk


# -- the Hugging Face export ----------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TASKS))
def test_export_round_trip_matches_final_checkpoint(ws: Workspace, name: str) -> None:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    result, cfg = task_run(ws, name)
    export = result.export_dir
    assert export is not None and export == result.output_dir / "export"
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (export / f).is_file(), f

    tokenizer = AutoTokenizer.from_pretrained(str(export))
    auto = AutoModelForCausalLM if name == "clm" else AutoModelForMaskedLM
    exported = auto.from_pretrained(str(export)).eval()

    # The final weights, from Lightning's last checkpoint, in a freshly built model.
    task = registry.get("task", cfg.task.name)
    spec = registry.get("model", cfg.model.name)
    hf_config = build_hf_config(spec, cfg.model, tokenizer, int(cfg.data.block_size))
    ckpt = torch.load(result.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == int(cfg.trainer.max_steps)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    torch.manual_seed(123)
    fresh = build_model(spec, task.head(cfg), hf_config).eval()
    torch.manual_seed(123)
    untrained = build_model(spec, task.head(cfg), hf_config).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "position_ids" not in k], missing

    inputs = tokenizer(SAMPLE, return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 5
    with torch.no_grad():
        got = exported(**inputs).logits
        out = fresh(**inputs)
        want = out.logits if name != "nsp" else out.prediction_logits
        out0 = untrained(**inputs)
        random_init = out0.logits if name != "nsp" else out0.prediction_logits
    # One logit per row of the output layer: the tokenizer's ids, rounded up to model.vocab_multiple.
    assert 0 <= hf_config.vocab_size - len(tokenizer) < int(cfg.model.vocab_multiple)
    assert got.shape == want.shape == (1, inputs["input_ids"].shape[1], hf_config.vocab_size)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # ...and the export is trained weights, not a fresh initialisation.
    assert not torch.allclose(got, random_init, atol=1e-3)


def test_final_metrics_score_the_final_weights(ws: Workspace, tmp_path: Path) -> None:
    """Reused from fit's last validation, or a validation of its own when fit ended between two."""
    import lightning as L

    reused, cfg = task_run(ws, "clm")  # validations at 5 and 10 of 10 steps
    module, dm, _ = build_like_train(cfg)
    ckpt = torch.load(reused.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module.load_state_dict(ckpt["state_dict"])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=int(cfg.trainer.limit_val_batches), default_root_dir=str(tmp_path))
    scored = trainer.validate(module, datamodule=dm, verbose=False)[0]
    assert set(reused.metrics) == set(scored) == {"val/loss", "val/perplexity"}
    assert reused.metrics["val/loss"] == pytest.approx(float(scored["val/loss"]), rel=1e-6)

    # After steps 4 and 8, then the final weights (not the best of 4 and 8: load_best_at_end=false).
    between, _ = ws.run("trainer.val_check_interval=4", "checkpoint.load_best_at_end=false")
    history = client_for(between).get_metric_history(between.run_id, "val/loss")
    assert [m.step for m in history] == [3, 7, 10]
    assert history[-1].value == pytest.approx(between.metrics["val/loss"], rel=1e-6)
    assert history[-1].value != pytest.approx(history[-2].value, rel=1e-6)


@pytest.mark.parametrize("load_best", [True, False])
def test_the_run_ends_on_the_best_checkpoint_unless_told_otherwise(ws: Workspace, load_best: bool) -> None:
    # Monitoring val/loss for its *maximum* makes the first validation (step 5 of 10) the best, so
    # the best and the last weights differ.
    from safetensors.torch import load_file

    result, cfg = ws.run("checkpoint.mode=max", f"checkpoint.load_best_at_end={str(load_best).lower()}")
    (best,) = (result.output_dir / "checkpoints").glob("best-*.ckpt")
    assert best.name == "best-step=5.ckpt"
    chosen = best if load_best else result.output_dir / "checkpoints" / "last.ckpt"
    state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(result.export_dir / "model.safetensors")
    for name, tensor in exported.items():
        assert torch.equal(tensor, state[f"model.{name}"]), name
    history = client_for(result).get_metric_history(result.run_id, "val/loss")
    at_5, at_10 = history[0].value, history[1].value
    assert at_5 > at_10  # the premise: training lowered the loss
    assert result.metrics["val/loss"] == pytest.approx(at_5 if load_best else at_10, rel=1e-6)


def test_a_capped_validation_says_so(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lmlab"):
        ws.run("task=clm", "trainer.limit_val_batches=1", "trainer.max_steps=5")  # the split has more
        ws.run("task=clm", "trainer.limit_val_batches=null", "trainer.max_steps=5")
    warnings = [r.getMessage() for r in caplog.records if "trainer.limit_val_batches" in r.getMessage()]
    assert len(warnings) == 1, warnings  # the capped run, once; the whole split: none
    assert warnings[0].startswith("Validation scores 1 of its ") and "(trainer.limit_val_batches=1)" in warnings[0]


def test_n_layer_override_reaches_the_export(ws: Workspace) -> None:
    result, cfg = ws.run("model.config.n_layer=3")
    assert cfg.model.config.n_layer == 3
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["n_layer"] == 3
    assert config["n_embd"] == 128  # everything else is still the tiny size
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(result.export_dir))
    assert len(model.transformer.h) == 3
    assert client_for(result).get_run(result.run_id).data.params["model.config.n_layer"] == "3"


# -- caches and data sources ----------------------------------------------------------------------
def test_second_run_reuses_tokenizer_and_tokenized_data(wiki_file: Path, lmlab_home: Path, tmp_path: Path) -> None:
    import os

    cache = Path(os.environ["LMLAB_CACHE_DIR"])
    overrides = [*TINY, f"data.path={wiki_file}"]
    then = time.time() - 3600  # written an hour ago: old enough for its stat to be trusted
    os.utime(wiki_file, (then, then))

    first = run(compose_cfg(overrides))
    tokenizers = sorted(p.name for p in (cache / "tokenizers").iterdir() if not p.name.startswith("."))
    datasets = sorted(p.name for p in (cache / "data").iterdir() if not p.name.startswith("."))
    assert len(tokenizers) == 1 and len(datasets) == 1
    info1 = run_info(first, tmp_path)
    assert info1["tokenizer"]["cached"] is False
    assert info1["data"]["tokenized_cache_hit"] is False
    assert info1["data"]["corpus_read"] is True

    second = run(compose_cfg(overrides))
    assert second.run_id != first.run_id
    info2 = run_info(second, tmp_path)
    assert info2["tokenizer"]["cached"] is True
    assert info2["tokenizer"]["fingerprint"] == info1["tokenizer"]["fingerprint"]
    assert info2["data"]["tokenized_cache_hit"] is True
    assert info2["data"]["corpus_read"] is False  # both caches found by the corpus stamp alone
    assert info2["data"]["train_blocks"] == info1["data"]["train_blocks"]
    assert sorted(p.name for p in (cache / "tokenizers").iterdir() if not p.name.startswith(".")) == tokenizers
    assert sorted(p.name for p in (cache / "data").iterdir() if not p.name.startswith(".")) == datasets
    # Same seed, same tokenizer, same blocks: the second run trains to the same numbers.
    assert second.metrics["val/loss"] == pytest.approx(first.metrics["val/loss"], rel=1e-3)
    # The reused tokenizer is the one the first run exported.
    assert (first.export_dir / "tokenizer.json").read_text() == (second.export_dir / "tokenizer.json").read_text()


def test_pretrained_tokenizer_from_a_previous_export(ws: Workspace, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source, _ = task_run(ws, "clm")
    before = sorted((ws.cache / "tokenizers").iterdir())
    result, cfg = ws.run("tokenizer=pretrained", f"tokenizer.path={source.export_dir}")
    assert cfg.tokenizer.type == "pretrained"
    assert math.isfinite(result.metrics["val/loss"])
    info = run_info(result, tmp_path)
    assert info["tokenizer"]["type"] == "pretrained"
    assert info["tokenizer"]["path"] == str(source.export_dir)
    assert sorted((ws.cache / "tokenizers").iterdir()) == before  # nothing trained
    src_tok = AutoTokenizer.from_pretrained(str(source.export_dir))
    new_tok = AutoTokenizer.from_pretrained(str(result.export_dir))
    assert new_tok.get_vocab() == src_tok.get_vocab()
    assert new_tok(SAMPLE)["input_ids"] == src_tok(SAMPLE)["input_ids"]
    config = json.loads((result.export_dir / "config.json").read_text())
    assert config["vocab_size"] == -(-len(src_tok) // int(cfg.model.vocab_multiple)) * int(cfg.model.vocab_multiple)


def test_hf_dataset_directory(ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    # Keep the datasets library's Arrow cache inside the test's tmp dir.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    lines = [line for line in WIKI.read_text(encoding="utf-8").splitlines()[:600] if line.strip()]
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for line in lines[:540]:
            f.write(json.dumps({"text": line, "id": len(line)}) + "\n")
    with (folder / "validation.jsonl").open("w", encoding="utf-8") as f:
        for line in lines[540:]:
            f.write(json.dumps({"text": line, "id": len(line)}) + "\n")

    result, cfg = ws.run(data=f"data.name={folder}")
    assert cfg.data.path is None and cfg.data.name == str(folder)
    assert math.isfinite(result.metrics["val/loss"])
    info = run_info(result, tmp_path)
    assert info["data"]["origin"] == f"hf:{folder}"
    assert info["data"]["train_blocks"] > 0 and info["data"]["validation_blocks"] > 0
    assert client_for(result).get_run(result.run_id).data.tags["lmlab.data"] == f"hf:{folder}"


def test_with_gradient_accumulation_validation_follows_optimizer_steps(wiki_file: Path, tmp_path: Path) -> None:
    # trainer.val_check_interval counts optimizer steps, as max_steps does; Lightning counts batches.
    import mlflow

    from conftest import run_in_home

    result, _ = run_in_home(tmp_path, [*TINY, f"data.path={wiki_file}", "trainer.max_steps=10",
                                       "trainer.val_check_interval=5", "trainer.limit_val_batches=1",
                                       "trainer.log_every_n_steps=1", "trainer.accumulate_grad_batches=2"])
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    assert [m.step for m in client.get_metric_history(result.run_id, "val/loss")] == [4, 9]
    # The throughput window is a logging interval of optimizer steps too: a value on every step.
    assert [m.step for m in client.get_metric_history(result.run_id, "train/tokens_per_sec")] == list(range(10))


def schedule_factors(built: dict, steps: int) -> list[float]:
    """The learning rate of each of the first ``steps`` optimizer steps, as a share of optimizer.lr (1e-3)."""
    scheduler, factors = built["lr_scheduler"]["scheduler"], []
    for _ in range(steps):
        factors.append(scheduler.get_last_lr()[0] / 1e-3)
        built["optimizer"].step()
        scheduler.step()
    return factors



@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_schedule_peaks_once_and_ends_at_the_floor(schedule: str, warmup: int) -> None:
    factor = lr_lambda(schedule, warmup, 10, 0.1)
    factors = [factor(step) for step in range(10)]
    assert factors.count(1.0) == 1 and factors[max(0, warmup - 1)] == 1.0
    assert factors[-1] == pytest.approx(0.1)  # the last step trains at min_lr_ratio, not above it
    assert all(a > b for a, b in zip(factors[warmup:], factors[warmup + 1:]))
    assert factors[0] > 0  # no step at LR 0


def test_warmup_steps_win_over_the_ratio_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    from lmlab import optim

    model = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.INFO, logger="lmlab"):
        built = optim.build(model, compose_cfg([]).optimizer, OmegaConf.create(
            {"name": "linear", "warmup_ratio": 0.5, "warmup_steps": 2, "min_lr_ratio": 0.0}), total_steps=10)
    factors = schedule_factors(built, 4)
    assert factors == pytest.approx([0.5, 1.0, 1.0 - 1 / 8, 1.0 - 2 / 8])  # 2 warmup steps, not 5 (the ratio's)
    assert any("scheduler.warmup_steps=2 (scheduler.warmup_ratio=0.5 is not used)" in r.getMessage()
               for r in caplog.records)


# -- training without a set end (trainer.max_steps=-1, trainer.max_epochs=-1) ---------------------
UNBOUNDED = ["trainer.max_steps=-1", "trainer.max_epochs=-1"]


@pytest.mark.parametrize(("overrides", "words"), [
    (["scheduler=cosine"], ["scheduler.name=cosine decays", "scheduler.warmup_ratio=0.05"]),
    (["scheduler=linear", "scheduler.warmup_steps=10"], ["scheduler.name=linear decays"]),
    (["scheduler=constant", "scheduler.warmup_ratio=0.1"], ["scheduler.warmup_ratio=0.1 is a share"]),
])
def test_training_without_end_and_a_schedule_that_needs_its_length_stop_up_front(
        overrides: list[str], words: list[str], wiki_file: Path, lmlab_home: Path) -> None:
    from lmlab.errors import LmlabError

    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", *UNBOUNDED, *overrides])
    with pytest.raises(LmlabError) as caught:
        run(cfg)
    message = str(caught.value)
    for word in ["config key 'trainer.max_steps'", "trainer.max_epochs=-1", "trainer.max_steps=N",
                 "scheduler=constant", "scheduler.warmup_steps=N", *words]:
        assert word in message, (word, message)
    assert not (lmlab_home / "mlflow.db").exists()  # before the MLflow run is opened (no FAILED run)


def test_a_constant_schedule_builds_for_training_without_end() -> None:
    from lmlab import optim
    from lmlab.errors import LmlabError

    model = torch.nn.Linear(4, 4)
    built = optim.build(model, compose_cfg([]).optimizer, OmegaConf.create(
        {"name": "constant", "warmup_ratio": 0.0, "warmup_steps": 2, "min_lr_ratio": 1.0}), total_steps=math.inf)
    factors = schedule_factors(built, 4)
    assert factors == pytest.approx([0.5, 1.0, 1.0, 1.0])
    with pytest.raises(LmlabError, match="scheduler.name=cosine"):  # what a plugin's path to build would get
        optim.build(model, compose_cfg([]).optimizer, compose_cfg([]).scheduler, total_steps=math.inf)


def test_training_without_end_runs_until_stopped_with_a_constant_schedule(ws: Workspace,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning as L

    from lmlab import train

    class StopAfter6(L.Callback):  # what an interruption would do; the run would otherwise train on and on
        def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
            trainer.should_stop = trainer.should_stop or trainer.global_step >= 6

    def build_trainer(*args: object, **kwargs: object):
        trainer, best, throughput = build(*args, **kwargs)
        trainer.callbacks.append(StopAfter6())
        return trainer, best, throughput

    build = train.build_trainer
    monkeypatch.setattr(train, "build_trainer", build_trainer)
    result, cfg = ws.run(*UNBOUNDED, "scheduler=constant", "scheduler.warmup_steps=3")
    assert math.isfinite(result.metrics["val/loss"]) and result.export_dir is not None
    client = client_for(result)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    lr = float(cfg.optimizer.lr)
    history = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "train/lr"))
    # Warmup over 3 steps, then the rate itself (logged every 2nd step).
    assert history == [(1, pytest.approx(lr * 2 / 3)), (3, pytest.approx(lr)), (5, pytest.approx(lr))]
