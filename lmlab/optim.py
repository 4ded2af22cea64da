"""AdamW with linear warmup and cosine, linear or constant decay, stepped every optimizer step."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig

from lmlab.errors import LmlabError, config_error

SCHEDULES = ("cosine", "linear", "constant")
log = logging.getLogger("lmlab")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and norm weights are not decayed (as in GPT-2/BERT training code).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def steps_with_found_inf(optimizer: object) -> bool:
    """Whether ``optimizer`` (or a LightningOptimizer's) unscales and skips inside its own step.

    torch's fused Adam/AdamW take GradScaler's ``grad_scale`` and ``found_inf`` tensors and leave the
    parameters, moments and step count untouched when ``found_inf`` is non-zero, without the host
    looking. lmlab's optimizer is one of them (``build``), which both gradient clipping and the NaN
    guard have to know.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float):
    """The LR factor of 0-based step ``step`` of ``total``: ``warmup`` steps rising to the peak, reached
    on the last of them (no step at LR 0, unlike HF's schedule), then decaying from the next step so
    that the peak is trained with once and the last step trains at ``min_ratio``."""
    peak = max(0, warmup - 1)

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - peak) / max(1, total - 1 - peak))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def needs_length(sched_cfg: DictConfig) -> list[str]:
    """The schedule's settings that are shares of the run's length (cosine and linear decay, a warmup ratio)."""
    needs = []
    if sched_cfg.get("name") in ("cosine", "linear"):
        needs.append(f"scheduler.name={sched_cfg.name} decays over the run's steps")
    ratio = sched_cfg.get("warmup_ratio")
    if sched_cfg.get("warmup_steps") is None and ratio:
        needs.append(f"scheduler.warmup_ratio={ratio} is a share of them")
    return needs


def unbounded(trainer_cfg: DictConfig | dict) -> bool:
    """Whether training has no set end: Lightning's ``max_steps=-1`` with ``max_epochs=-1``.

    (``max_epochs`` unset with ``max_steps=-1`` is Lightning's 1,000 epochs: a known length.)
    """
    return trainer_cfg.get("max_steps") in (None, -1) and trainer_cfg.get("max_epochs") == -1


def unbounded_error(sched_cfg: DictConfig) -> LmlabError | None:
    """The error for a schedule that needs the run's length in training without end; None if it needs none."""
    needs = needs_length(sched_cfg)
    if not needs:
        return None
    return config_error(
        "trainer.max_steps", "it is -1 with trainer.max_epochs=-1 (training without a set end), but the learning-rate "
        f"schedule needs the run's length: {'; '.join(needs)}",
        "Set trainer.max_steps=N (or trainer.max_epochs=N), or train until stopped with scheduler=constant "
        "(scheduler.warmup_steps=N for a warmup).")


def check_length(cfg: DictConfig) -> None:
    """Before any data or MLflow work: a schedule that needs the run's length is given one."""
    if str(cfg.get("mode") or "fit") == "fit" and unbounded(cfg.get("trainer") or {}):
        error = unbounded_error(cfg.scheduler)
        if error is not None:
            raise error


def check_schedule_name(name: object) -> None:
    """``scheduler.name`` among SCHEDULES: checked up front (lmlab.checks) and where it is used."""
    if name not in SCHEDULES:
        raise config_error("scheduler.name", f"unknown schedule '{name}'",
                           f"Use scheduler=cosine, linear or constant (scheduler.name: one of {', '.join(SCHEDULES)}).")


def build(model: torch.nn.Module, opt_cfg: DictConfig, sched_cfg: DictConfig, total_steps: int) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns."""
    if opt_cfg.lr <= 0:
        raise config_error("optimizer.lr", f"{opt_cfg.lr} is not positive", "Use e.g. optimizer.lr=3e-4.")
    groups = _param_groups(model, float(opt_cfg.weight_decay))
    kwargs = dict(lr=float(opt_cfg.lr), betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps))
    # torch's fused AdamW updates every parameter in one kernel. On a CPU (torch >= 2.4) the default
    # per-parameter loop took 14 ms of a ~400 ms tiny-GPT-2 step and the fused kernel 2 ms.
    devices = {p.device.type for p in model.parameters()}
    try:
        optimizer = torch.optim.AdamW(groups, fused=True, **kwargs) if devices in ({"cuda"}, {"cpu"}) else None
    except RuntimeError:  # an older torch without the CPU kernel
        optimizer = None
    optimizer = optimizer or torch.optim.AdamW(groups, **kwargs)
    name = sched_cfg.name
    check_schedule_name(name)
    if not math.isfinite(total_steps):  # training without end (check_length names it up front)
        error = unbounded_error(sched_cfg)
        if error is not None:
            raise error
        total_steps = 1  # the schedule reads no length
    total = max(1, int(total_steps))
    warmup = sched_cfg.get("warmup_steps")
    if warmup is not None and sched_cfg.get("warmup_ratio"):
        # Every scheduler preset sets a ratio, so naming steps is the deliberate choice; said, not silent.
        log.info("LR warmup: scheduler.warmup_steps=%s (scheduler.warmup_ratio=%s is not used)", warmup,
                 sched_cfg.warmup_ratio)
    warmup = int(warmup) if warmup is not None else int(round(float(sched_cfg.warmup_ratio) * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(name, warmup, total, float(sched_cfg.get("min_lr_ratio", 0.0)))
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
