"""lmlab.optim: which parameters are decayed, the LR schedule against Hugging Face's, the schedule
across a resume, and AdamW's settings and their errors.

The run tests train the tiny debug model for a few steps on the real Wikipedia corpus and read the
rate each optimizer step trained with from the optimizer itself (``on_before_optimizer_step``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from transformers import (Trainer, TrainingArguments, get_cosine_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup)

from conftest import TINY, WIKI, compose_cfg
from lmlab import checkpointing, optim, registry
from lmlab.errors import LmlabError
from lmlab.models.build import build_model

ADAMW = {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.95], "eps": 1e-8}


def sched(name: str = "cosine", **settings: Any) -> Any:
    return OmegaConf.create({"name": name, "warmup_ratio": 0.0, "warmup_steps": None, "min_lr_ratio": 0.0,
                             **settings})


def tiny(name: str, head: str) -> torch.nn.Module:
    """The registry's tiny model of ``name`` with ``head``, as a run builds it (lmlab.models.build)."""
    spec = registry.get("model", name)
    kwargs: dict[str, Any] = {**spec.sizes["tiny"], "vocab_size": 1000}
    if "classification" in head:
        kwargs["num_labels"] = 3
    if name == "gpt2":  # its defaults (50256) lie past a 1,000-token vocabulary
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return build_model(spec, head, spec.config_class(**kwargs))


def group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list[str], list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, undecayed = ([names[id(p)] for p in g["params"]] for g in optimizer.param_groups)
    return decayed, undecayed


# -- parameter groups -----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "head"), [("bert", "masked_lm"), ("bert", "token_classification"),
                                            ("gpt2", "causal_lm"), ("gpt2", "sequence_classification"),
                                            ("bart", "seq2seq_lm"), ("t5", "seq2seq_lm")])
def test_decayed_parameters_are_the_hugging_face_trainers(name: str, head: str) -> None:
    model = tiny(name, head)
    optimizer = optim.build(model, OmegaConf.create(ADAMW), sched(), 10)["optimizer"]
    decayed, undecayed = group_names(model, optimizer)
    assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0
    # Every trainable parameter once: a tied weight (GPT-2's lm_head is wte, BART's and T5's shared
    # embedding) would otherwise get two updates a step.
    everything = [n for n, _ in model.named_parameters()]
    assert sorted(decayed + undecayed) == sorted(everything)
    # HF's list names a tied weight under each of its names; named_parameters() has the first.
    assert set(decayed) == set(Trainer.get_decay_parameter_names(None, model)) & set(everything)
    # The norms of each family, whatever they are called, and the biases are not decayed.
    norms = {"bert": "embeddings.LayerNorm.weight", "gpt2": "transformer.ln_f.weight",
             "bart": "model.encoder.layernorm_embedding.weight", "t5": "encoder.final_layer_norm.weight"}
    assert any(n.endswith(norms[name]) for n in undecayed)
    assert not any(n.endswith(".bias") for n in decayed)
    if name == "t5":  # an embedding table of additive attention biases: a bias, as for HF's Trainer
        assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in undecayed


class Block(torch.nn.Module):
    """A plugin's layer: a projection whose name holds 'norm', and a norm whose name does not."""

    def __init__(self) -> None:
        super().__init__()
        self.denorm_proj = torch.nn.Linear(8, 8)
        self.ln_1 = torch.nn.LayerNorm(8)
        self.scale = torch.nn.Parameter(torch.ones(8))


def test_norms_are_told_by_layer_type_not_by_name() -> None:
    model = Block()
    decayed, undecayed = group_names(model, optim.build(model, OmegaConf.create(ADAMW), sched(), 10)["optimizer"])
    assert decayed == ["denorm_proj.weight"]
    assert sorted(undecayed) == ["denorm_proj.bias", "ln_1.bias", "ln_1.weight", "scale"]


def test_frozen_parameters_are_not_optimized() -> None:
    model = tiny("gpt2", "causal_lm")
    model.transformer.wte.requires_grad_(False)  # lm_head.weight is the same tensor
    model.transformer.h[0].ln_1.requires_grad_(False)
    optimizer = optim.build(model, OmegaConf.create(ADAMW), sched(), 10)["optimizer"]
    listed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.lm_head.weight) not in listed and id(model.transformer.h[0].ln_1.weight) not in listed
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}


# -- the schedule against Hugging Face's ----------------------------------------------------------

def lmlab_rates(schedule: Any, total: int) -> list[float]:
    """The factor each of ``total`` steps trains with, stepping the built scheduler as Lightning does."""
    built = optim.build(torch.nn.Linear(2, 2), OmegaConf.create({**ADAMW, "lr": 1.0}), schedule, total)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def hf_rates(make: Any, warmup: int, total: int, **extra: Any) -> list[float]:
    """Hugging Face's factor at each step 0..total (its rate after the last of ``total`` steps too)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer, num_warmup_steps=warmup, num_training_steps=total, **extra)
    rates = []
    for _ in range(total + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup", [0, 1, 3])
@pytest.mark.parametrize(("name", "make", "min_ratio"), [
    ("cosine", get_cosine_schedule_with_warmup, 0.0),
    ("cosine", get_cosine_with_min_lr_schedule_with_warmup, 0.1),
    ("linear", get_linear_schedule_with_warmup, 0.0),
])
def test_schedule_is_hugging_faces_one_step_on(name: str, make: Any, min_ratio: float, warmup: int) -> None:
    # Hugging Face trains its first step at LR 0 and its last one step above the floor; lmlab's step k
    # trains at HF's rate of step k+1 (with a warmup of at least one step: a warmup of 1 already
    # reaches the peak on step 0): no step at 0, the peak once, the last step at min_lr_ratio.
    total = 12
    extra = {"min_lr_rate": min_ratio} if min_ratio else {}
    ours = lmlab_rates(sched(name, warmup_steps=warmup, min_lr_ratio=min_ratio), total)
    assert ours == pytest.approx(hf_rates(make, max(warmup, 1), total, **extra)[1:], abs=1e-12)
    assert ours[0] > 0 and ours.count(1.0) == 1 and ours[-1] == pytest.approx(min_ratio)


@pytest.mark.parametrize("total", [10, 30, 50, 70, 90])
def test_warmup_ratio_counts_steps_as_hugging_face_does(total: int, tmp_path: Path) -> None:
    # round() halves to even: 0.05 of 50 steps warmed up for 2 steps (HF: 3), 0.05 of 90 for 4 (HF: 5).
    hf_warmup = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.05).get_warmup_steps(total)
    assert optim.warmup_steps(sched(warmup_ratio=0.05), total) == hf_warmup
    ours = lmlab_rates(sched("linear", warmup_ratio=0.05), total)
    assert ours == pytest.approx(hf_rates(get_linear_schedule_with_warmup, max(hf_warmup, 1), total)[1:], abs=1e-12)


def test_warmup_ratio_is_not_pushed_up_by_float_noise() -> None:
    assert 0.07 * 100 > 7 and optim.warmup_steps(sched(warmup_ratio=0.07), 100) == 7


def test_constant_schedule_warms_up_then_holds() -> None:
    assert lmlab_rates(sched("constant", warmup_steps=4, min_lr_ratio=1.0), 7) == [0.25, 0.5, 0.75, 1, 1, 1, 1]


def test_null_settings_that_lmlab_checks_allows_build_a_schedule() -> None:
    # lmlab.checks lets optimizer.weight_decay, scheduler.warmup_ratio and scheduler.min_lr_ratio be
    # null; a run with any of them died in configure_optimizers on float(None).
    cfg = compose_cfg([*TINY, "optimizer.weight_decay=null", "scheduler.warmup_ratio=null",
                       "scheduler.min_lr_ratio=null"])
    built = optim.build(torch.nn.Linear(2, 2), cfg.optimizer, cfg.scheduler, 5)
    assert [g["weight_decay"] for g in built["optimizer"].param_groups] == [0.0, 0.0]
    assert lmlab_rates(cfg.scheduler, 5)[0] == 1.0 and lmlab_rates(cfg.scheduler, 5)[-1] == 0.0


# -- AdamW's settings -----------------------------------------------------------------------------

def test_adamw_takes_its_settings_from_the_config_and_the_fused_kernel() -> None:
    optimizer = optim.build(torch.nn.Linear(2, 2), OmegaConf.create(
        {"lr": 2e-3, "weight_decay": 0.05, "betas": [0.8, 0.99], "eps": 1e-6}), sched(), 10)["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True  # CPU and CUDA both have torch's fused kernel
    assert optimizer.defaults["betas"] == (0.8, 0.99) and optimizer.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert optimizer.param_groups[0]["lr"] == 2e-3 * 1.0  # no warmup: the first step at the peak
    # Parameters on a device without the fused kernel get the plain implementation.
    plain = optim.build(torch.nn.Linear(2, 2, device="meta"), OmegaConf.create(ADAMW), sched(), 10)["optimizer"]
    assert not plain.defaults["fused"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda() -> None:
    optimizer = optim.build(torch.nn.Linear(2, 2, device="cuda"), OmegaConf.create(ADAMW), sched(), 10)["optimizer"]
    assert optimizer.defaults["fused"] is True and optim.steps_with_found_inf(optimizer)


@pytest.mark.parametrize(("key", "value"), [
    ("lr", -1e-3), ("lr", 0.0), ("lr", float("nan")), ("lr", "fast"), ("betas", [1.0, 0.9]), ("betas", [0.9, -0.1]),
    ("betas", [0.9]), ("betas", 0.9), ("eps", -1e-8), ("weight_decay", -0.1), ("weight_decay", float("inf")),
])
def test_bad_adamw_settings_are_named(key: str, value: Any) -> None:
    with pytest.raises(LmlabError, match=f"optimizer.{key}"):
        optim.build(torch.nn.Linear(2, 2), OmegaConf.create({**ADAMW, key: value}), sched(), 10)


# -- real runs ------------------------------------------------------------------------------------

class Rates(L.Callback):
    """The LR each optimizer step trains with, by step, and how many micro-batches preceded it."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.by_step: dict[int, float] = {}
        self.micro_batches: list[int] = []
        self.seen = 0
        self.crash_at = crash_at

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.crash_at:
            raise RuntimeError("simulated crash")
        self.seen += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, module: Any, optimizer: Any) -> None:
        self.by_step[trainer.global_step] = optimizer.param_groups[0]["lr"]
        self.micro_batches.append(self.seen)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer and data cache for the module's runs."""
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    return tmp_path_factory.mktemp("optim_cache")


def train(home: Path, cache: Path, rates: Rates, *extra: str) -> Any:
    from lmlab.train import run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_HOME", str(home))
        mp.setenv("LMLAB_CACHE_DIR", str(cache))
        real = checkpointing.callbacks
        mp.setattr(checkpointing, "callbacks", lambda cfg, last: [*real(cfg, last), rates])
        return run(compose_cfg([*TINY, f"data.path={WIKI}", "data.max_documents=40", "optimizer.lr=1.0",
                                "trainer.limit_val_batches=1", "export=false", "checkpoint.load_best_at_end=false",
                                *extra]))


def expected(total: int, warmup: int, min_ratio: float, steps: range, name: str = "cosine") -> dict[int, float]:
    factor = optim.lr_lambda(name, warmup, total, min_ratio)
    return {step: factor(step) for step in steps}


def test_epoch_run_with_accumulation_steps_the_schedule_once_per_optimizer_step(tmp_path: Path,
                                                                                cache: Path) -> None:
    # 40 documents make 6 training batches an epoch; 4 a step is 2 steps an epoch (the second one
    # short), so 2 epochs are 4 steps: trainer.estimated_stepping_batches, not max_steps, sets the total.
    rates = Rates()
    train(tmp_path, cache, rates, "trainer.max_steps=-1", "trainer.max_epochs=2",
          "trainer.accumulate_grad_batches=4", "scheduler.warmup_steps=2", "scheduler.min_lr_ratio=0.1",
          "trainer.val_check_interval=null")
    assert rates.micro_batches == [4, 6, 10, 12]
    assert rates.by_step == pytest.approx(expected(4, 2, 0.1, range(4)))
    assert rates.by_step[1] == 1.0 and rates.by_step[3] == pytest.approx(0.1)


def test_a_run_trained_longer_on_resume_follows_the_schedule_for_the_new_total(tmp_path: Path,
                                                                               cache: Path) -> None:
    # The finished run's optimizer holds the old schedule's next rate (its floor); step 3 of the
    # 6-step schedule trained at that floor (0.1) instead of 0.55 before the scheduler caught up.
    first, longer = Rates(), Rates()
    result = train(tmp_path, cache, first, "trainer.max_steps=3", "scheduler.warmup_steps=2",
                   "scheduler.min_lr_ratio=0.1")
    assert first.by_step == pytest.approx(expected(3, 2, 0.1, range(3)))
    train(tmp_path, cache, longer, f"resume={result.output_dir}", "trainer.max_steps=6", "scheduler.warmup_steps=2",
          "scheduler.min_lr_ratio=0.1")
    assert longer.by_step == pytest.approx(expected(6, 2, 0.1, range(3, 6)))


def test_an_interrupted_run_resumes_with_the_rates_it_would_have_had(tmp_path: Path, cache: Path) -> None:
    crashed, resumed = Rates(crash_at=3), Rates()
    args = ["trainer.max_steps=5", "checkpoint.every_n_steps=2", "scheduler.warmup_steps=2",
            "scheduler.min_lr_ratio=0.1"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path, cache, crashed, *args)
    train(tmp_path, cache, resumed, "resume=auto", *args)
    uninterrupted = expected(5, 2, 0.1, range(5))
    assert crashed.by_step == pytest.approx({k: uninterrupted[k] for k in range(3)})
    assert resumed.by_step == pytest.approx({k: uninterrupted[k] for k in range(2, 5)})  # from last.ckpt at 2
    assert math.isclose(resumed.by_step[4], 0.1)
