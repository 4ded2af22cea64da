"""Runs that go wrong: a non-finite loss or gradient, and preemption by SIGTERM, SIGUSR1 or Ctrl-C."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lmlab.errors import LmlabError, config_error
from lmlab.optim import steps_with_found_inf
from lmlab.step_logging import log_step

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


def check_every(cfg: DictConfig) -> int | None:
    """``faults.check_every_n_steps``: how often the host reads the verdict; None picks by device."""
    value = (cfg.get("faults") or {}).get("check_every_n_steps")
    return None if value is None else int(value)


class NumericalGuard(L.Callback):
    """Logs ``train/grad_norm`` (before clipping) and stops or skips a step whose loss or gradient is not finite.

    The check runs after backward and before the optimizer step, so the weights are never updated
    with NaNs and last.ckpt (saved at step boundaries) is the last good state. With a GradScaler
    (fp16) an inf gradient is the scaler's business, so only the loss is checked.

    Reading the verdict on the host every step would stall a GPU once per step: the host waits for
    backward to finish before it queues anything more, and the device idles through the loop's
    Python until the next forward arrives. So on accelerators (or with ``check_every`` > 1) the
    verdict is handed to a fused optimizer as its ``found_inf`` tensor, which skips the update on
    the device, and the host reads the count of bad steps every ``check_every`` steps (default:
    the logging interval, when Lightning syncs anyway) and at the end of training. A bad update is
    still never applied; ``stop`` ends the run at that check and names the first bad step. On the
    CPU, where a read costs nothing, the host decides every step.
    """

    def __init__(self, policy: str, last: LastCheckpoint, check_every: int | None = None):
        self.policy = policy
        self.last = last
        self.configured_every = check_every
        self.check_every = check_every or 1
        self.skipped = 0
        self._losses: list[torch.Tensor] = []
        self._pending: dict[str, torch.Tensor] | None = None  # device-side record of deferred verdicts

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.configured_every
        if every is None:
            every = 1 if pl_module.device.type == "cpu" else max(1, int(trainer.log_every_n_steps))
        self.check_every = every
        self._pending = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        losses, self._losses = self._losses, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        log_step(pl_module, "train/grad_norm", norm)
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        checks = [torch.isfinite(loss).all() for loss in losses]
        if not scaled:
            checks.append(torch.isfinite(norm))
        if self.check_every > 1 and not scaled and checks and steps_with_found_inf(optimizer):
            self._defer(trainer, optimizer, torch.stack(checks).all(), losses, norm)
            if self.skipped:
                log_step(pl_module, "train/skipped_steps", float(self.skipped))
            if (trainer.global_step + 1) % self.check_every == 0:
                self._read_pending(trainer, pl_module)
            return
        finite = bool(torch.stack(checks).all()) if checks else True  # one host sync per step
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            if self.skipped:  # on every written step, so the logged count stays current
                log_step(pl_module, "train/skipped_steps", float(self.skipped))
            return
        where = self._where(trainer, losses, norm)
        if self.policy == "stop":
            raise NonFiniteLoss(f"{where}; training stopped before applying it. {self._last_good()}. "
                                f"{self._advice()}")
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped))
        log.warning("%s; skipped its update (faults.nonfinite=skip, %d skipped so far)", where, self.skipped)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for optimizer in trainer.optimizers:  # the verdict belongs to one step only
            vars(getattr(optimizer, "optimizer", optimizer)).pop("found_inf", None)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._read_pending(trainer, pl_module, at_end=True)  # bad steps after the last periodic check

    def _defer(self, trainer: L.Trainer, optimizer: Any, finite: torch.Tensor, losses: list[torch.Tensor],
               norm: torch.Tensor) -> None:
        # Any process's bad step is every process's: summed on the device, no host round trip.
        bad = trainer.strategy.reduce((~finite).float(), reduce_op="sum")
        found = (bad > 0).float()  # a 0-d float tensor, as GradScaler hands it over
        getattr(optimizer, "optimizer", optimizer).found_inf = found
        loss = torch.stack([x.float().mean() for x in losses]).sum() if losses else torch.zeros_like(norm)
        step = torch.tensor(float(trainer.global_step + 1), device=found.device)
        if self._pending is None:
            nan = torch.full((), math.nan, device=found.device)
            self._pending = {"count": torch.zeros((), device=found.device), "first_step": nan,
                             "first_loss": nan, "first_norm": nan}
        pending = self._pending
        first = pending["first_step"].isnan() & (found > 0)
        pending["first_step"] = torch.where(first, step, pending["first_step"])
        pending["first_loss"] = torch.where(first, loss.to(found.dtype), pending["first_loss"])
        pending["first_norm"] = torch.where(first, norm.to(found.dtype), pending["first_norm"])
        pending["count"] = pending["count"] + found

    def _read_pending(self, trainer: L.Trainer, pl_module: L.LightningModule, at_end: bool = False) -> None:
        if self._pending is None:
            return
        count = int(self._pending["count"])  # the host sync, once per check
        if count == self.skipped:
            return
        first_step = int(self._pending["first_step"])
        loss, norm = float(self._pending["first_loss"]), float(self._pending["first_norm"])
        what = f"the training loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {norm}"
        found = f"found at the check after step {trainer.global_step + (0 if at_end else 1)}"
        if self.policy == "stop":
            raise NonFiniteLoss(f"{what} at step {first_step} (epoch {trainer.current_epoch}; {found}, "
                                f"faults.check_every_n_steps={self.check_every}); training stopped, and no "
                                f"non-finite update was applied. {self._last_good()}. {self._advice()}")
        new, self.skipped = count - self.skipped, count
        if at_end:  # Lightning allows no self.log here; the logger itself still takes the count
            if trainer.logger is not None:
                trainer.logger.log_metrics({"train/skipped_steps": float(self.skipped)}, step=trainer.global_step)
        else:
            pl_module.log("train/skipped_steps", float(self.skipped))
        log.warning("%d more step(s) with a non-finite loss or gradient, %s (the first of the run at step %d: %s); "
                    "their updates were skipped (faults.nonfinite=skip, %d skipped so far)",
                    new, found, first_step, what, self.skipped)

    @staticmethod
    def _advice() -> str:
        return "Lower optimizer.lr or set trainer.gradient_clip_val, or set faults.nonfinite=skip to drop such steps"

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
    """SIGTERM, SIGUSR1 or a first Ctrl-C: save last.ckpt at the next step boundary and stop training.

    Lightning notes SIGTERM itself and raises ``SIGTERMException`` once the step is over (after its
    validation, if one is due then); this saves the checkpoint first. For the other signals this
    raises the same exception before the next step or epoch starts. A signal that lands during
    validation reaches ``on_exception`` instead, which saves then. ``fit`` below turns either into
    ``Preempted``.

    Not ``trainer.should_stop``: Lightning validates before it honours that (its early-stopping
    rule), so every stop would add a validation nobody scheduled, and with it a best-step
    checkpoint, a val/* point the uninterrupted run does not have and, on a large validation set,
    a stop later than a preemption's grace period.
    """

    def __init__(self, last: LastCheckpoint):
        self.last = last
        self.signum: int | None = None
        self.stopped_after: int | None = None
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def _interrupt(self, signum: int, frame: Any) -> None:
        # Ctrl-C: Lightning's own handling stops mid-step, saving nothing and ending the run FAILED.
        # The first one stops like SIGTERM, at the step boundary with last.ckpt saved; a second
        # one stops at once.
        if self.signum is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum
        print("\nlmlab: stopping after this step to save a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _own_signals():
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._previous[signum] = signal.signal(signum, self._note)
        # Only Python's default: a sweep or an embedding program that handles Ctrl-C keeps doing so.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal that came during the last validation: training ended anyway, and LastCheckpoint
        # (called before this callback) has saved its final state.
        if self.signum is not None and self.stopped_after is None:
            self.stopped_after = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        asked = self.signum is not None or trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(asked, all=False):  # any rank's signal stops all
            self._stop(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._raise_if_stopped()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_stopped()  # before the new epoch's loader starts its workers

    def _raise_if_stopped(self) -> None:
        # Not in on_train_batch_end, where the step was saved: Lightning logs the step's metrics
        # after that hook, and runs the validation due at that step after it too; the resumed run
        # does neither again.
        if self.stopped_after is not None:
            raise SIGTERMException

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        if self.signum is None:
            self.signum = signal.SIGTERM
        if trainer.state.fn == TrainerFn.FITTING:
            self.last.save_now(trainer)
        self.stopped_after = trainer.global_step

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: Any, ckpt_path: Any = None) -> None:
    """``trainer.fit`` that raises ``Preempted`` when a signal stopped training (last.ckpt is saved by then)."""
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as exc:  # Lightning's own for SIGTERM, Preemption's for the others
        signum = guard.signum if guard is not None and guard.signum is not None else signal.SIGTERM
        raise _preempted(guard, signum) from exc
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


class SigtermOutsideTraining:
    """SIGTERM after training (final validation, export, test, MLflow uploads) or in a mode that
    does not train: ``SIGTERMException`` at once, which the run turns into ``preempted_outside_training``.

    Lightning installs its SIGTERM handler only for the length of each trainer call; between them
    Python's default would end the process on the spot, with no message, the run record "running"
    and MLflow's run left as it was. Inside a trainer call Lightning's handler calls this one after
    its own, so the stop comes at once there too (Lightning's own would let a signal in the last
    batch pass). Not during ``fit``: there ``Preemption`` stops at a step boundary with last.ckpt
    saved. A handler someone else installed (a sweep's) is left in place.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._closing = False

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous = signal.signal(signal.SIGTERM, self._raise)

    def stop(self) -> None:
        """Hands SIGTERM back (to Lightning's handler during fit); ``start`` takes it again."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _raise(self, signum: int, frame: Any) -> None:
        if self._closing:
            return
        self._closing = True  # a second SIGTERM must not cut short the clean-up the first one started
        raise SIGTERMException

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """For ending the run (MLflow's status, the run record): a SIGTERM then is ignored, so they
        are written whole; the previous handler is back afterwards."""
        self._closing = True
        try:
            yield
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)
                self._previous = None


def preempted_outside_training(mode: str, output_dir: Any) -> Preempted:
    """SIGTERM while scoring, exporting or predicting: Lightning's ``SIGTERMException`` is a
    ``SystemExit`` without a code, which would end the process with status 0 as if it had succeeded.
    Nothing is saved then (training, if any, was over), so the message says how to finish."""
    if mode == "fit-not-started":
        return Preempted("stopped by SIGTERM before training started; nothing was trained or saved. Run the same "
                         "command again", signal.SIGTERM)
    if mode == "fit":
        return Preempted(
            "stopped by SIGTERM after training had finished, before the final validation, export and test were "
            f"done; the trained state is in {output_dir}/checkpoints/last.ckpt. Finish them with the same "
            f"overrides plus resume={output_dir} (or resume=auto)", signal.SIGTERM)
    return Preempted(f"stopped by SIGTERM before mode={mode} had finished; nothing was written to keep. "
                     "Run the same command again", signal.SIGTERM)
