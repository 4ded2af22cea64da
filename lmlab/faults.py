"""Runs that go wrong: a non-finite loss or gradient, and preemption by SIGTERM, SIGUSR1, Ctrl-C or,
in a submitit job (``hydra/launcher=slurm``), submitit's signal before the time limit."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lmlab.checkpointing import restoring
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
    """A signal asked the run to stop; last.ckpt holds the state it stopped in.

    ``requeue``: the signal was submitit's preemption signal, which ``requeue`` hands on to submitit
    once the run is closed; ``stopped``: what happened, for the line said then.
    """

    def __init__(self, message: str, signum: int, requeue: bool = False, stopped: str = ""):
        super().__init__(message)
        self.signum = signum
        self.requeue = requeue
        self.stopped = stopped or message


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
        # Skipped before this fit started (a resumed run's), which the device-side count leaves out.
        self._offset = 0
        self._losses: list[torch.Tensor] = []
        self._pending: dict[str, torch.Tensor] | None = None  # device-side record of deferred verdicts
        self._restored: dict[str, Any] | None = None  # the checkpoint's count, for a resumed fit

    def state_dict(self) -> dict[str, Any]:
        # The deferred count stays a device tensor: reading it here would stop a GPU's host at every
        # checkpoint. It is the same on every process (the verdicts are summed over them).
        pending = None if self._pending is None else self._pending["count"]
        return {"skipped": self.skipped, "offset": self._offset, "pending": pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Taken up only by a fit that continues (on_train_start), as TokensPerSecond does: Lightning
        # also restores callbacks from the best checkpoint that the final validation scores.
        self._restored = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        every = self.configured_every
        if every is None:
            every = 1 if pl_module.device.type == "cpu" else max(1, int(trainer.log_every_n_steps))
        self.check_every = every
        self._pending = None
        if self._restored is not None:
            pending = self._restored.get("pending")
            self._offset = int(self._restored.get("skipped", 0)) if pending is None else (
                int(self._restored.get("offset", 0)) + int(pending))
            self.skipped = self._offset
            self._restored = None

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
        count = self._offset + int(self._pending["count"])  # the host sync, once per check
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


def submitit_preemption() -> tuple[int, Callable[..., Any]] | None:
    """(signal, handler) of submitit's preemption handler, when this process is a submitit job that has it.

    submitit installs it before the job's function runs (``JobEnvironment._handle_signals``), for
    ``SIGUSR2`` or what ``SUBMITIT_PREEMPT_SIGNAL`` names; SLURM sends that signal
    ``signal_delay_s`` before the time limit (sbatch ``--signal``), and submitit's LocalExecutor as
    well. Left alone, the handler would requeue the job and exit in the middle of a training step.
    Found by the handler itself, so a process that merely inherited submitit's environment (a
    program a job starts) is not taken for one.
    """
    if not os.environ.get("SUBMITIT_EXECUTOR") or threading.current_thread() is not threading.main_thread():
        return None
    job_environment = sys.modules.get("submitit.core.job_environment")  # imported by submitit's job runner
    if job_environment is None:
        return None
    try:
        signum = job_environment.JobEnvironment._usr_sig()
    except Exception:  # an unknown SUBMITIT_PREEMPT_SIGNAL: submitit could not have installed it either
        return None
    handler = signal.getsignal(signum)
    if isinstance(getattr(handler, "__self__", None), job_environment.SignalHandler):
        return signum, handler
    return None


def requeue(exc: Preempted) -> None:
    """Hand a stop by submitit's preemption signal on to submitit's own handler, once the run is closed.

    By then last.ckpt holds the step training stopped after, the MLflow run is KILLED and the run
    record says ``killed``. submitit's handler (on global rank 0) has the launcher resubmit the same
    call, requeues the job and exits; the job's next start finds its run and continues it
    (``resume.requeued``). Returns only when there is nothing to hand on or submitit does not
    requeue (``max_num_timeout`` time limits reached, say): the caller then reports the stop as usual.
    """
    found = submitit_preemption() if exc.requeue else None
    if found is None or found[0] != exc.signum:
        return
    print(f"\nlmlab: {exc.stopped}. {signal.Signals(exc.signum).name} is submitit's signal for a job near "
          "its time limit or preempted: submitit requeues the job, and the job continues this run when it "
          "starts again", file=sys.stderr, flush=True)
    try:
        found[1](exc.signum, None)
    except Exception as err:  # submitit's UncompletedJobError, or a failed `scontrol requeue`
        print(f"lmlab: submitit did not requeue the job ({type(err).__name__}: {err})", file=sys.stderr, flush=True)
        return
    # submitit requeues from global rank 0 only, and exits there; the other ranks end alike.
    raise SystemExit(-1)


def _own_signals() -> tuple[int, ...]:
    # SIGTERM is Lightning's (Trainer.received_sigterm); SIGUSR1 is ours unless SLURM requeue took it.
    return (signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()


class Preemption(L.Callback):
    """SIGTERM, SIGUSR1, a first Ctrl-C or submitit's preemption signal: save last.ckpt at the next
    step boundary and stop training.

    A step is an optimizer step: with ``trainer.accumulate_grad_batches`` above 1, a signal that
    lands on a micro-batch waits for the rest of its accumulation (``_ends_step``). Stopping in
    between would save the loader's position past micro-batches whose gradients are in no weight
    and in no checkpoint: the resumed run would skip them, and its first step would use fewer.

    Lightning notes SIGTERM itself and raises ``SIGTERMException`` once the batch is over (after its
    validation, if one is due then) and, under DDP, at the start of every batch; mid-accumulation
    this holds that note back until the step boundary (``_hold_sigterm``), where it saves the
    checkpoint first and hands the note back. For the other signals this raises the same exception
    before the next step or epoch starts. A signal that lands during validation reaches
    ``on_exception`` instead, which saves then. ``fit`` below turns either into ``Preempted``.

    Not ``trainer.should_stop``: Lightning validates before it honours that (its early-stopping
    rule), so every stop would add a validation nobody scheduled, and with it a best-step
    checkpoint, a val/* point the uninterrupted run does not have and, on a large validation set,
    a stop later than a preemption's grace period.

    Under DDP (more than one process) SIGTERM is only noted, never acted on by one process alone:
    Lightning's handler broadcasts from rank 0 inside the handler, a collective that pairs up only
    when every rank takes the signal at a moment no other collective is under way. A rank that got
    it while its peer waited in a barrier (saving a checkpoint) or in a gradient all-reduce hung for
    good, and a rank that got it twice (``timeout``'s group signal plus Lightning's forwarding)
    broadcast twice. ``_note_sigterm`` keeps Lightning's forwarding to the processes its launcher
    started; the ranks agree at the step boundary (``on_train_batch_end``), after a validation
    (``on_validation_end``) and when training ends (``on_train_end``), each a reduction every rank
    makes at the same point.

    In a submitit job its preemption signal (``submitit_preemption``) is taken over from submitit's
    handler for the length of ``fit`` and stops training the same way; ``requeue`` hands the stop on
    to submitit once the run is closed. Any process's submitit signal makes every process's stop one
    (the decision is reduced like the stop itself), so under DDP every rank stops after the same step
    and hands on.
    """

    def __init__(self, last: LastCheckpoint):
        self.last = last
        self.signum: int | None = None
        self.stopped_after: int | None = None
        self.requeue_signum: int | None = None  # submitit's preemption signal, in a submitit job
        self._previous: dict[int, Any] = {}
        self._trainer: L.Trainer | None = None
        self._step = 0  # the global step after the previous training batch
        self._holding = False  # between a batch that did not end a step and the next batch's start
        self._sigterm_held = False  # Lightning's note of a SIGTERM, taken back until the step boundary
        self._lightning_sigterm: Any = None  # Lightning's SIGTERM handler, while ``_on_sigterm`` wraps it
        self._note_only = False  # several processes: a signal is noted, and the ranks decide together
        self._forwarded = False  # SIGTERM passed on to the processes Lightning's launcher started

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

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the checkpoint is restored and the first step: submitit's handler would exit mid-way.
        found = submitit_preemption() if stage == TrainerFn.FITTING else None
        if found is not None:
            self.requeue_signum = found[0]
            self._previous[found[0]] = signal.signal(found[0], self._note)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, self._step = trainer, trainer.global_step
        self._holding = self._sigterm_held = self._forwarded = False
        self._note_only = trainer.world_size > 1
        if threading.current_thread() is not threading.main_thread():
            return
        self._wrap_lightning_sigterm()
        for signum in _own_signals():
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                self._previous[signum] = signal.signal(signum, self._note)
        # Only Python's default: a sweep or an embedding program that handles Ctrl-C keeps doing so.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal that came during the last validation: training ended anyway, and LastCheckpoint
        # (called before this callback) has saved its final state.
        self._holding = False
        if self._note_only and trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            self._agree_on_signal(trainer)  # every rank reports the stop, not only those that got the signal
        if self._sigterm_held and self.signum is None:  # never lost, though training ended first
            self.signum = signal.SIGTERM
        if self.signum is not None and self.stopped_after is None:
            self.stopped_after = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._ends_step(trainer):
            # Before Lightning's note is read: a SIGTERM from here to the next batch is held too.
            self._holding = True
            self._hold_sigterm(trainer)
            return  # the same on every rank, so the reductions below stay paired
        asked = self.signum is not None or self._sigterm_held or trainer.received_sigterm
        if trainer.strategy.reduce_boolean_decision(asked, all=False):  # any rank's signal stops all
            self._agree_on_signal(trainer)
            self._stop(trainer)
            self._release_sigterm(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning raises on its SIGTERM note after any validation batch but the last: the
        # validation's metrics, its say on the best checkpoint and the generators it was to hand
        # back (RngState) would be lost, and the resumed run, which does not repeat it, would differ.
        # So a signal here is held until the validation is over.
        if self._validating_in_fit(trainer):
            self._holding = True
            self._hold_sigterm(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._validating_in_fit(trainer):
            return
        self._holding = False
        asked = self.signum is not None or self._sigterm_held
        if trainer.strategy.reduce_boolean_decision(asked, all=False):  # every rank runs this validation
            self._agree_on_signal(trainer)
            # last.ckpt is written by LastCheckpoint after this hook and the best checkpoint's, with
            # the generators RngState has put back: the state of the step and its validation.
            self.last.save_after_this_validation()
            self.stopped_after = trainer.global_step
            self._release_sigterm(trainer)  # one process: Lightning raises once the validation is over

    def _validating_in_fit(self, trainer: L.Trainer) -> bool:
        return (self._trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
                and self.stopped_after is None)

    def _agree_on_signal(self, trainer: L.Trainer) -> None:
        """After the ranks found that some rank got a signal: the same signal on every rank."""
        submitit = self.requeue_signum is not None and self.signum == self.requeue_signum
        if trainer.strategy.reduce_boolean_decision(submitit, all=False) and self.requeue_signum is not None:
            self.signum = self.requeue_signum  # any rank's submitit signal: every rank hands on
        elif self.signum is None:
            self.signum = signal.SIGTERM  # a rank that got none stops as the others did

    def _ends_step(self, trainer: L.Trainer) -> bool:
        """Whether the training batch whose hooks run ended an optimizer step: the global step moved
        on it, or it was its epoch's last (Lightning steps on a partial accumulation there). Every
        DDP rank steps together, so every rank answers alike."""
        stepped = trainer.global_step != self._step
        self._step = trainer.global_step
        if int(getattr(trainer, "accumulate_grad_batches", 1)) <= 1:
            return True  # every batch is a step
        return stepped or _last_batch_of_epoch(trainer)

    def _hold_sigterm(self, trainer: L.Trainer) -> None:
        # Lightning would raise on its note before the step is over: after this batch in its epoch
        # loop, and under DDP at the next batch's start, from rank 0's note.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and getattr(connector, "received_sigterm", False):
            connector.received_sigterm = False
            self._sigterm_held = True

    def _release_sigterm(self, trainer: L.Trainer) -> None:
        # Stopping at the boundary: Lightning raises on its note as it would have had the signal
        # come during this batch, so a held SIGTERM ends training exactly like one that was not.
        connector = getattr(trainer, "_signal_connector", None)
        if self._sigterm_held and connector is not None:
            connector.received_sigterm = True
        self._sigterm_held = False

    def _wrap_lightning_sigterm(self) -> None:
        """Put ``_on_sigterm`` in front of the SIGTERM handler Lightning installed for this fit.

        In one process: clearing Lightning's note in a hook alone leaves a gap: a SIGTERM after
        ``on_train_batch_end`` and before the next batch (the module's hook, the loggers' writes, the
        next loader fetch) would be noted, and acted on, mid-accumulation; one after a validation
        batch's hooks, mid-validation. Lightning's handler still runs first. Under DDP it does not
        run at all (``_note_sigterm``).
        """
        handler = signal.getsignal(signal.SIGTERM)
        if callable(handler) and handler != self._on_sigterm:
            self._lightning_sigterm = handler
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._note_only:
            self._note_sigterm(signum)
            return
        if self._lightning_sigterm is not None:
            self._lightning_sigterm(signum, frame)
        if self._holding and self._trainer is not None:
            self._hold_sigterm(self._trainer)

    def _note_sigterm(self, signum: int) -> None:
        """Lightning's SIGTERM handler without its broadcast: the signal is forwarded and noted."""
        trainer = self._trainer
        log.info("[rank %s] Received SIGTERM: %d", getattr(trainer, "global_rank", "?"), signum)
        if not self._forwarded and trainer is not None:
            self._forwarded = True
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        if self.signum is None:
            self.signum = signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._raise_if_stopped()
        self._holding = False  # Lightning reads its note again only once this batch is over

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
        self.restore_signals()

    def restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        # Lightning puts back the handler of before the fit when its trainer call ends; only where
        # it has not yet is its own back in place.
        if self._lightning_sigterm is not None and signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, self._lightning_sigterm)
        self._lightning_sigterm = None
        self._trainer = None
        self._holding = self._note_only = False


def _last_batch_of_epoch(trainer: L.Trainer) -> bool:
    try:
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
    except AttributeError:  # a Lightning without it: the global step alone tells
        return False


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: Any, ckpt_path: Any = None) -> None:
    """``trainer.fit`` that raises ``Preempted`` when a signal stopped training (last.ckpt is saved by then)."""
    guard = next((cb for cb in trainer.callbacks if isinstance(cb, Preemption)), None)
    try:
        with restoring(ckpt_path):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException as exc:  # Lightning's own for SIGTERM, Preemption's for the others
        signum = guard.signum if guard is not None and guard.signum is not None else signal.SIGTERM
        raise _preempted(guard, signum) from exc
    finally:
        # A fit that raised skips the callbacks' teardown, and Lightning's own puts back the handlers
        # of when training started, Preemption's for submitit's signal among them.
        if guard is not None:
            guard.restore_signals()
    if guard is not None and guard.signum is not None:
        raise _preempted(guard, guard.signum)


def _preempted(guard: Preemption | None, signum: int) -> Preempted:
    name = signal.Signals(signum).name
    requeue = guard is not None and signum == guard.requeue_signum
    if guard is None or guard.stopped_after is None:
        return Preempted(f"stopped by {name} before a checkpoint could be saved", signum, requeue)
    run_dir = guard.last.path.parent.parent
    stopped = f"stopped by {name} after step {guard.stopped_after}; its state is saved in {guard.last.path}"
    return Preempted(f"{stopped}. Continue with the same overrides plus resume={run_dir} (or resume=auto)", signum,
                     requeue, stopped)


class SigtermOutsideTraining:
    """SIGTERM after training (final validation, export, test, MLflow uploads) or in a mode that
    does not train: ``SIGTERMException`` at once, which the run turns into ``preempted_outside_training``.

    Lightning installs its SIGTERM handler only for the length of each trainer call; between them
    Python's default would end the process on the spot, with no message, the run record "running"
    and MLflow's run left as it was. Inside a trainer call Lightning's handler calls this one after
    its own, so the stop comes at once there too (Lightning's own would let a signal in the last
    batch pass). Not during ``fit``: there ``Preemption`` stops at a step boundary with last.ckpt
    saved. A handler someone else installed (a sweep's) is left in place.

    In a submitit job, submitit's preemption signal is taken from submitit's handler the same way
    (``signum`` says which signal came), so the run is closed KILLED before ``requeue`` hands the
    signal on to submitit; submitit's handler alone would exit at once and leave the run FAILED.
    """

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._closing = False
        self.signum: int = signal.SIGTERM  # the signal that came
        self.submitit_signum: int | None = None  # submitit's preemption signal, once taken from its handler

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.SIGTERM not in self._previous:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._raise)
        found = submitit_preemption()
        if found is not None and found[0] not in self._previous:
            self.submitit_signum = found[0]
            self._previous[found[0]] = signal.signal(found[0], self._raise)

    def stop(self) -> None:
        """Hands the signals back (SIGTERM to Lightning's handler during fit); ``start`` takes them again."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _raise(self, signum: int, frame: Any) -> None:
        if self._closing:
            return
        self._closing = True  # a second SIGTERM must not cut short the clean-up the first one started
        self.signum = signum
        raise SIGTERMException

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """For ending the run (MLflow's status, the run record): a SIGTERM then is ignored, so they
        are written whole; the previous handler is back afterwards."""
        self._closing = True
        try:
            yield
        finally:
            self.stop()


def preempted_outside_training(mode: str, output_dir: Any, signum: int = signal.SIGTERM,
                               requeue: bool = False) -> Preempted:
    """SIGTERM while scoring, exporting or predicting: Lightning's ``SIGTERMException`` is a
    ``SystemExit`` without a code, which would end the process with status 0 as if it had succeeded.
    Nothing is saved then (training, if any, was over), so the message says how to finish.
    ``signum``: the signal that came; ``requeue``: it was submitit's preemption signal, for ``requeue``."""
    name = signal.Signals(signum).name
    if mode == "fit-not-started":
        stopped = f"stopped by {name} before training started"
        return Preempted(f"{stopped}; nothing was trained or saved. Run the same command again", signum, requeue,
                         stopped)
    if mode == "fit":
        stopped = (f"stopped by {name} after training had finished, before the final validation, export and test "
                   f"were done; the trained state is in {Path(output_dir) / 'checkpoints' / 'last.ckpt'}")
        return Preempted(f"{stopped}. Finish them with the same overrides plus resume={output_dir} (or resume=auto)",
                         signum, requeue, stopped)
    stopped = f"stopped by {name} before mode={mode} had finished"
    return Preempted(f"{stopped}; nothing was written to keep. Run the same command again", signum, requeue, stopped)
