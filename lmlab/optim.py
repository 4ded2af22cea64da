"""AdamW with linear warmup and cosine, linear or constant decay, stepped every optimizer step."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from lmlab.errors import LmlabError, config_error

SCHEDULES = ("cosine", "linear", "constant")
log = logging.getLogger("lmlab")


# Normalisation layers by type: torch's own, and model code's that subclass nn.Module directly
# (T5LayerNorm, LlamaRMSNorm, ...), which only their class name tells apart.
NORM_TYPES: tuple[type, ...] = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.LocalResponseNorm,
                                torch.nn.modules.batchnorm._NormBase)
if hasattr(torch.nn, "RMSNorm"):  # torch >= 2.4
    NORM_TYPES += (torch.nn.RMSNorm,)


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Biases and norm weights are not decayed (as in GPT-2/BERT training code), told apart by the layer
    # holding them rather than by name: a projection whose name happens to hold "norm" is still decayed.
    # T5's relative_attention_bias is an embedding table of additive attention biases: a bias, as the
    # Hugging Face Trainer also counts it. A weight shared by two layers (GPT-2's lm_head and wte) is
    # listed once, in the group of the layer seen first (torch refuses a parameter in two groups).
    decay, no_decay, seen = [], [], set()
    for module_name, module in model.named_modules():
        is_bias_table = module_name.rsplit(".", 1)[-1].endswith("bias")
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            undecayed = param.ndim < 2 or name == "bias" or is_bias_table or _is_norm(module)
            (no_decay if undecayed else decay).append(param)
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


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose restored step trains at this schedule's rate.

    A checkpoint's optimizer carries the rate its own schedule set for the next step. A resume that
    changes the run's length (``trainer.max_steps``, or a finished run trained longer) builds this
    schedule for the new total, so that step must take this schedule's rate, not the old one's: a
    finished cosine run extended from 6 to 10 steps trained step 6 at the old floor (0.1 x lr) instead
    of 0.38 x lr. Lightning loads the optimizer's state before the scheduler's, so setting it here wins.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group, base, factor in zip(self.optimizer.param_groups, self.base_lrs, self.lr_lambdas):
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _number(cfg: DictConfig, key: str, default: float | None = None) -> float:
    """``cfg[key]`` as a finite float (null: ``default``), else an error naming ``optimizer.key``."""
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise config_error(f"optimizer.{key}", f"'{value}' is not a finite number",
                           f"Use e.g. optimizer.{key}={EXAMPLES[key]}.")
    return float(value)


EXAMPLES = {"lr": "3e-4", "eps": "1e-8", "weight_decay": "0.01"}


def adamw_arguments(opt_cfg: DictConfig) -> dict[str, Any]:
    """AdamW's lr, betas, eps and weight_decay from ``optimizer.*``, each checked and named when wrong.

    ``lmlab.checks`` refuses these before a run starts; a plugin's module calling ``build`` directly
    gets the same named errors here instead of torch's "Invalid beta parameter at index 0: 1.0".
    ``optimizer.weight_decay: null`` (which lmlab.checks allows) is no decay.
    """
    lr = _number(opt_cfg, "lr")
    if lr <= 0:
        raise config_error("optimizer.lr", f"{lr} is not positive", "Use e.g. optimizer.lr=3e-4.")
    eps = _number(opt_cfg, "eps")
    weight_decay = _number(opt_cfg, "weight_decay", default=0.0)
    for key, value in (("eps", eps), ("weight_decay", weight_decay)):
        if value < 0:
            raise config_error(f"optimizer.{key}", f"{value} is negative", f"Use e.g. optimizer.{key}={EXAMPLES[key]}.")
    betas = opt_cfg.get("betas")
    values = list(betas) if isinstance(betas, (list, tuple, ListConfig)) else None
    if values is None or len(values) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in values):
        raise config_error("optimizer.betas", f"'{betas}' is not two numbers from 0 up to (not including) 1",
                           "Use e.g. optimizer.betas=[0.9,0.95].")
    return dict(lr=lr, betas=(float(values[0]), float(values[1])), eps=eps, weight_decay=weight_decay)


def warmup_steps(sched_cfg: DictConfig, total: int) -> int:
    """``scheduler.warmup_steps``, else ``warmup_ratio`` of ``total`` rounded up, as the Hugging Face
    Trainer counts it (``math.ceil``): Python's round() halves to even, so 0.05 of 50 steps warmed up
    for 2 steps but 0.05 of 70 for 4. Rounded to 9 decimals first, so 0.07 x 100 (7.000000000000001) is 7, not 8."""
    steps = sched_cfg.get("warmup_steps")
    if steps is not None:
        return int(steps)
    return math.ceil(round(float(sched_cfg.get("warmup_ratio") or 0.0) * total, 9))


def build(model: torch.nn.Module, opt_cfg: DictConfig, sched_cfg: DictConfig, total_steps: int) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns."""
    kwargs = adamw_arguments(opt_cfg)
    groups = _param_groups(model, kwargs.pop("weight_decay"))
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
    if sched_cfg.get("warmup_steps") is not None and sched_cfg.get("warmup_ratio"):
        # Every scheduler preset sets a ratio, so naming steps is the deliberate choice; said, not silent.
        log.info("LR warmup: scheduler.warmup_steps=%s (scheduler.warmup_ratio=%s is not used)",
                 sched_cfg.warmup_steps, sched_cfg.warmup_ratio)
    # min_lr_ratio: null (allowed by lmlab.checks) decays to 0, as a config without the key does.
    min_ratio = float(sched_cfg.get("min_lr_ratio") or 0.0)
    scheduler = Schedule(optimizer, lr_lambda(name, warmup_steps(sched_cfg, total), total, min_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
