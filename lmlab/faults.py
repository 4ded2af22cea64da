"""Runs that go wrong: a non-finite loss or gradient, and preemption by SIGTERM or SIGUSR1."""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lmlab.errors import LmlabError, config_error

if TYPE_CHECKING:
    from lmlab.checkpointing import LastCheckpoint

log = logging.getLogger(__name__)

POLICIES = ("stop", "skip")


class NonFiniteLoss(LmlabError):
    """The loss or the gradients became inf/NaN and ``faults.nonfinite=stop``."""


class Preempted(LmlabError):
    """A signal asked the run to stop; last.ckpt holds the state it stopped in."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def policy(cfg: DictConfig) -> str:
    value = str((cfg.get("faults") or {}).get("nonfinite", "stop"))
    if value not in POLICIES:
        raise config_error("faults.nonfinite", f"unknown policy '{value}'",
                           "Use faults.nonfinite=stop (end the run) or skip (drop that step's update).")
    return value


class NumericalGuard(L.Callback):
    """Logs ``train/grad_norm`` (before clipping) and stops or skips a step whose loss or gradient is not finite.

    The check runs after backward and before the optimizer step, so the weights are never updated
    with NaNs and last.ckpt (saved at step boundaries) is the last good state. With a GradScaler
    (fp16) an inf gradient is the scaler's business, so only the loss is checked.
    """

    def __init__(self, policy: str, last: LastCheckpoint):
        self.policy = policy
        self.last = last
        self.skipped = 0
        self._losses: list[torch.Tensor] = []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        pl_module.log("train/grad_norm", norm)
        checks = [torch.isfinite(loss).all() for loss in losses]
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            checks.append(torch.isfinite(norm))
        finite = bool(torch.stack(checks).all()) if checks else True  # one host sync per step
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            if self.skipped:  # every step, so whichever step the logger keeps carries the count
                pl_module.log("train/skipped_steps", float(self.skipped))
            return
        where = self._where(trainer, losses, norm)
        if self.policy == "stop":
            raise NonFiniteLoss(f"{where}; training stopped before applying it. {self._last_good()}. Lower "
                                "optimizer.lr or set trainer.gradient_clip_val, or set faults.nonfinite=skip to "
                                "drop such steps")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped))
        log.warning("%s; skipped its update (faults.nonfinite=skip, %d skipped so far)", where, self.skipped)

    @staticmethod
    def _where(trainer: L.Trainer, losses: list[torch.Tensor], norm: torch.Tensor) -> str:
        bad = [float(loss.float().mean()) for loss in losses if not torch.isfinite(loss).all()]
        what = f"the training loss is {bad[0]}" if bad else f"the gradient norm is {float(norm)}"
        return (f"{what} at step {trainer.global_step + 1} (epoch {trainer.current_epoch}, "
                f"batch {trainer.fit_loop.epoch_loop.batch_idx})")

    def _last_good(self) -> str:
        if self.last.saved_step is not None:
            return f"The last good checkpoint is {self.last.path} (after step {self.last.saved_step})"
        if self.last.path.is_file():
            return f"The last good checkpoint is {self.last.path}"
        return "No checkpoint was saved before it (checkpoint.every_n_steps sets how often)"


def _own_signals() -> tuple[int, ...]:
    # SIGTERM is Lightning's (Trainer.received_sigterm); SIGUSR1 is ours unless SLURM requeue took it.
    return (signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()


class Preemption(L.Callback):
    """SIGTERM or SIGUSR1: save last.ckpt at the next step boundary and stop training.

    Lightning notes SIGTERM itself and raises ``SIGTERMException`` once the step is over; this saves
    the checkpoint first. A signal that lands during validation reaches ``on_exception`` instead,
    which saves then. ``fit`` below turns either into ``Preempted``.
    """

    def __init__(self, last: LastCheckpoint):
        self.last = last
        self.signum: int | None = None
        self.stopped_after: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _own_signals():
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._previous[signum] = signal.signal(signum, self._note)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        asked = self.signum is not None or trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(asked, all=False):  # any rank's signal stops all
            self._stop(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        if self.signum is None:
            self.signum = signal.SIGTERM
        if trainer.state.fn == TrainerFn.FITTING:
            self.last.save_now(trainer)
        self.stopped_after = trainer.global_step
        trainer.should_stop = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: Any, ckpt_path: Any = None) -> None:
    """``trainer.fit`` that raises ``Preempted`` when a signal stopped training (last.ckpt is saved by then)."""
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as exc:
        raise _preempted(guard, signal.SIGTERM) from exc
    if guard is not None and guard.signum is not None:
        raise _preempted(guard, guard.signum)


def _preempted(guard: Preemption | None, signum: int) -> Preempted:
    name = signal.Signals(signum).name
    if guard is None or guard.stopped_after is None:
        return Preempted(f"stopped by {name} before a checkpoint could be saved", signum)
    run_dir = guard.last.path.parent.parent
    return Preempted(
        f"stopped by {name} after step {guard.stopped_after}; its state is saved in {guard.last.path}. "
        f"Continue with the same overrides plus resume={run_dir} (or resume=auto)", signum,
    )
