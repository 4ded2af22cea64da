"""What makes a checkpoint safe to write, safe to read and enough to continue a run exactly.

* ``AtomicCheckpointIO`` writes ``name.tmp`` and renames it, so a kill mid-write leaves the
  previous checkpoint in place, and reads with ``weights_only=True``, so a file cannot run code.
* ``LastCheckpoint`` keeps ``checkpoints/last.ckpt`` at most ``checkpoint.every_n_steps`` behind,
  written after the validation of its step, if there is one, so that the best checkpoint it records
  is the one on disk.
* Lightning restores weights, optimizer, scheduler and loop counters but neither the random number
  generators nor the position inside an epoch. ``RngState`` and ``ResumableLoader`` add those.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import pickle
import random
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePath
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, Sampler

from lmlab.atomic import atomic_file
from lmlab.errors import config_error, file_error

log = logging.getLogger(__name__)


# -- config ---------------------------------------------------------------------------------------
def every_n_steps(cfg: DictConfig) -> int:
    """``checkpoint.every_n_steps``: a non-negative int (0: last.ckpt follows validation instead)."""
    value = cfg.get("checkpoint", {}).get("every_n_steps", 100)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise config_error("checkpoint.every_n_steps", f"'{value}' is not a whole number of steps >= 0",
                           "Use e.g. checkpoint.every_n_steps=100 (0 saves last.ckpt at each validation only).")
    return value


# -- safe files -----------------------------------------------------------------------------------
def plain(obj: Any) -> Any:
    """``obj`` with what ``torch.load(weights_only=True)`` refuses turned into plain data.

    OmegaConf containers (``save_hyperparameters`` on a DictConfig) become dicts and lists, paths
    become strings, numpy values become Python numbers or tensors, and class objects (Lightning's
    ``hparams_type``) are dropped. Containers are rebuilt only when something inside changed, so
    module state dicts keep their type and ``_metadata``.
    """
    if obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str, bytes)):
        return obj
    if OmegaConf.is_config(obj):
        return plain(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        items = {key: plain(value) for key, value in obj.items() if not isinstance(value, type)}
        if len(items) == len(obj) and all(items[key] is obj[key] for key in items):
            return obj
        return items
    if isinstance(obj, (list, tuple)):
        values = [plain(value) for value in obj]
        if all(new is old for new, old in zip(values, obj)):
            return obj
        return values if isinstance(obj, list) else tuple(values)
    return obj


_UNSUPPORTED = re.compile(r"Unsupported (?:global|operand)[^.\n]*")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save/torch.load plugin, made atomic on write and weights-only on read."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote stores: fsspec's own transaction
            super().save_checkpoint(plain(checkpoint), path, storage_options)
            return
        with atomic_file(Path(path)) as handle:
            torch.save(plain(checkpoint), handle)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is forced: the unpickler then builds tensors and plain containers only, so a
        # tampered file fails here instead of running its payload.
        return load_safely(path, map_location)


def load_safely(path: Any, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file and what is wrong."""
    if "://" in str(path):
        return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=True)
    path = Path(path)
    if not path.is_file():
        raise file_error(path, "checkpoint not found", "Give an existing .ckpt file or run directory")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSUPPORTED.search(str(exc))
        raise file_error(
            path, "refused to load this checkpoint: it holds Python objects other than tensors and plain "
            f"data ({found.group(0) if found else str(exc).splitlines()[0]}), which could run code when unpickled",
            "lmlab reads checkpoints with torch.load(weights_only=True). Use a checkpoint lmlab wrote; "
            "never load one from a source you do not trust",
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise file_error(path, f"is not a readable checkpoint ({str(exc).splitlines()[0]})",
                         "The file is truncated or corrupt: resume from another checkpoint or start a new run") from exc


# What torch raises when a checkpoint's optimizer or model state does not fit what this run built.
_MISMATCH = re.compile(r"loaded state dict contains a parameter group that doesn't match the size|"
                       r"loaded state dict has a different number of parameter groups|"
                       r"Error\(s\) in loading state_dict for")


@contextlib.contextmanager
def restoring(ckpt_path: Any) -> Iterator[None]:
    """Around ``trainer.fit(ckpt_path=...)``: a checkpoint whose weights or optimizer state do not fit
    this run's model is named, with what to do, instead of torch's bare ValueError or RuntimeError
    (a checkpoint of an older lmlab that grouped the weight-decay parameters otherwise, or one from
    outside an lmlab run with another architecture). Errors of training itself pass unchanged."""
    try:
        yield
    except (ValueError, RuntimeError) as exc:
        if ckpt_path is None or not _MISMATCH.search(str(exc)):
            raise
        what = "optimizer state" if "parameter group" in str(exc) else "weights"
        raise file_error(ckpt_path, f"holds {what} that the model and optimizer this run builds cannot take "
                         f"({str(exc).splitlines()[0][:300]})",
                         "Resume with the model config the checkpoint was written with, or start a new run from "
                         "its weights alone: model.pretrained=RUN_DIR (an lmlab run) or a Hugging Face directory") from exc


def check_readable(path: Path) -> None:
    """A cheap early check (no unpickling): torch checkpoints are zip archives, a truncated one is not."""
    if not path.is_file():
        raise file_error(path, "checkpoint not found", "Give an existing .ckpt file or run directory")
    if not zipfile.is_zipfile(path):
        raise file_error(path, "is not a readable checkpoint (not a complete torch zip archive)",
                         "The file is truncated or corrupt: resume from another checkpoint or start a new run")


def add_io_plugin(trainer_kwargs: dict[str, Any]) -> None:
    """Put ``AtomicCheckpointIO`` among ``trainer_kwargs['plugins']`` unless one already does checkpoint IO."""
    plugins = trainer_kwargs.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer_kwargs["plugins"] = plugins


# -- last.ckpt ------------------------------------------------------------------------------------
class LastCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt``: every ``every_n_steps`` optimizer steps, when training ends, on demand.

    Lightning's ``save_last`` only follows the monitored metric; this one always holds the newest
    state, which is what a resume needs.

    A checkpoint holds every callback's state, the best-checkpoint record included, and a step's
    validation may replace the best checkpoint (deleting the previous one). So a step that is
    validated gets its last.ckpt after that validation, as Lightning's monitored checkpoints do:
    deferred when Lightning is sure to validate, else written again once it has. A process killed
    during that validation resumes from the previous last.ckpt; one stopped by a signal there saves
    in ``Preemption.on_exception``.
    """

    def __init__(self, dirpath: Path, every_n_steps: int):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1,
                         enable_version_counter=False, every_n_train_steps=every_n_steps or None)
        self._after_validation = False  # this step's last.ckpt is owed once its validation ends

    @property
    def path(self) -> Path:
        return Path(self.dirpath) / f"last{self.FILE_EXTENSION}"

    @property
    def saved_step(self) -> int | None:
        """The global step of the newest last.ckpt this process wrote (None: none yet)."""
        return self._last_global_step_saved if self._last_checkpoint_saved else None

    def save_now(self, trainer: L.Trainer) -> None:
        if self._saved_at(trainer.global_step):
            return
        self._save_checkpoint(trainer, str(self.path))

    def save_after_this_validation(self) -> None:
        """Write last.ckpt in this ``on_validation_end``: after the best checkpoint has taken the
        validation in (checkpoint callbacks run last), so the file records it."""
        self._after_validation = True

    def _saved_at(self, step: int) -> bool:
        return bool(self._last_checkpoint_saved) and self._last_global_step_saved == step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._after_validation = False
        # A resumed run's best records come from the checkpoint it resumed from, which may name files
        # deleted since.
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and not isinstance(checkpoint, LastCheckpoint):
                mend_best_record(trainer, checkpoint)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        due = (self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
               and not self._should_skip_saving_checkpoint(trainer))
        if due and validation_follows(trainer):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Saved already at this step (on demand, or before Lightning had the validation loader that
        # tells whether it validates): that file's best record is about to go stale.
        if self._fitting(trainer) and self._saved_at(trainer.global_step):
            self._after_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and self._fitting(trainer):
            self._after_validation = False
            self._save_checkpoint(trainer, str(self.path))
            return
        super().on_validation_end(trainer, pl_module)

    @staticmethod
    def _fitting(trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # max_steps need not be a multiple of every_n_steps: the final weights are saved regardless.
        if not trainer.fast_dev_run and trainer.state.fn == TrainerFn.FITTING:
            self.save_now(trainer)


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the training batch whose hooks are running.

    It decides in ``_TrainingEpochLoop.on_advance_end``, after those hooks, with the same inputs (a
    validation due by time stays due). A validation loader not set up yet, or reloaded, may turn out
    empty, and Lightning then skips the loop and ``on_validation_end``: not sure, so False. With a
    Lightning whose loop internals differ: False too, and last.ckpt is written as before.
    """
    try:
        loop = trainer.fit_loop.epoch_loop
        val = loop.val_loop
        ready = val._combined_loader is not None and not val._should_reload_val_dl and not val.skip
        return bool(ready and not loop._skip_next_val and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):
        return False


def mend_best_record(trainer: L.Trainer, checkpoint: ModelCheckpoint) -> None:
    """Rebuild a restored best-checkpoint record that names files no longer on disk.

    A record names a missing file when last.ckpt was written before the validation of its step (as
    lmlab did up to this version) or when the process died between the two saves at the end of a
    validation. The newest checkpoint this callback wrote at or before the resumed step holds the
    record as it then was (later validations that did not save left it unchanged); checkpoints it
    wrote after that step will be written again as training repeats those steps. Without one, the
    record starts empty, and validations from now on pick the best.
    """
    dirpath = str(checkpoint.dirpath or "")
    named = [p for p in {*checkpoint.best_k_models, checkpoint.best_model_path} if p]
    if not named or "://" in dirpath:
        return
    record = None
    missing = [Path(p).name for p in named if not Path(p).is_file()]
    if trainer.is_global_zero and missing:
        record = _newest_record(checkpoint, trainer.global_step)
        log.warning("The checkpoint this run resumes from records best checkpoints that no longer exist (%s): "
                    "it was written before its step's validation (by an lmlab older than this one), or the run "
                    "was killed between two saves. Best checkpoints from now on: %s.", ", ".join(sorted(missing)),
                    ", ".join(Path(p).name for p in record) or "none yet, the next validation's")
    record = trainer.strategy.broadcast(record)  # every process keeps the same record, and decides alike
    if record is None:
        return
    checkpoint.best_k_models = record
    pick, worst = (min, max) if checkpoint.mode == "min" else (max, min)
    checkpoint.best_model_path = pick(record, key=record.get) if record else ""
    checkpoint.best_model_score = record.get(checkpoint.best_model_path)
    if len(record) == checkpoint.save_top_k:  # full: the next better one replaces the worst
        checkpoint.kth_best_model_path = worst(record, key=record.get)
        checkpoint.kth_value = record[checkpoint.kth_best_model_path]
    else:
        checkpoint.kth_best_model_path = ""
        checkpoint.kth_value = torch.tensor(torch.inf if checkpoint.mode == "min" else -torch.inf)


def _newest_record(checkpoint: ModelCheckpoint, step: int) -> dict[str, Any]:
    """``checkpoint``'s top-k record ({path: score}) as its newest file at or before ``step`` holds it."""
    dirpath = Path(checkpoint.dirpath)
    newest, record = -1, {}
    for path in dirpath.glob(f"*{checkpoint.FILE_EXTENSION}"):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            saved, own = int(state["global_step"]), state["callbacks"][checkpoint.state_key]["best_k_models"]
        except Exception:  # not one of its checkpoints, or not readable: not a source of the record
            continue
        # Every checkpoint holds the callback's record; one the callback wrote itself is in it.
        if path.name in {Path(p).name for p in own} and newest < saved <= step:
            newest, record = saved, own
    # The run directory may have moved since: the files are looked for by name in today's folder.
    # Scores are copied out of the memory-mapped file, which Lightning deletes once it is beaten.
    return {str(dirpath / Path(p).name): torch.as_tensor(score).clone() for p, score in record.items()
            if (dirpath / Path(p).name).is_file()}


# -- random number generators ---------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states, as types weights_only accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngState(L.Callback):
    """Saves the generators with every checkpoint and restores them when training resumes.

    Validation inside ``fit`` is made RNG-neutral (the state from the end of the training step is
    put back afterwards): creating the validation loader's iterator draws a seed, and a run resumed
    from a step-boundary checkpoint does not repeat that validation, so without this the two runs'
    dropout and masking would differ from then on. Under DDP the checkpoint holds rank 0's state
    and every rank restores it; the default generators draw the same numbers on every rank, so that
    is each rank's own. (MLM's training masks, which must differ between ranks, come from a
    generator of their own seeded per rank and step: ``lmlab.tasks.mlm``.)
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._after_step: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_rng()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied just before the first training step, after everything Lightning does on the way
        # there: resuming at a validation step, it fast-forwards that validation by setting up the
        # loader, whose iterator draws a seed from the global generator.
        self._to_restore = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._to_restore is not None:
            restore_rng(self._to_restore)
            self._to_restore = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._after_step = capture_rng()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._after_step is not None:
            restore_rng(self._after_step)


# -- the position inside an epoch -----------------------------------------------------------------
class _SkippableBatches(Sampler[list[int]]):
    """Wraps a batch sampler; its next pass may start ``skip`` batches in. Its length stays the
    epoch's, because Lightning counts the batches already done towards the epoch."""

    def __init__(self, batches: Any):
        self.batches = batches
        self.skip = 0

    @property
    def sampler(self) -> Any:  # Lightning's set_epoch looks for batch_sampler.sampler
        return getattr(self.batches, "sampler", None)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        # The skip is taken when the pass yields its first batch, not when iter() is called: a
        # DataLoader with workers calls iter() twice as it builds its iterator (in
        # _BaseDataLoaderIter.__init__, then in _reset) and reads only the second, so a skip taken by
        # the first was lost and the resumed epoch started over (num_workers=2: 5 batches repeated).
        return self._pass()

    def _pass(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from itertools.islice(iter(self.batches), skip, None)


# DataLoader arguments carried over when a loader is rebuilt as a ResumableLoader.
_CARRIED = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn", "multiprocessing_context",
            "prefetch_factor", "persistent_workers", "pin_memory_device", "in_order")


class ResumableLoader(DataLoader):
    """A DataLoader Lightning checkpoints (it has ``state_dict``/``load_state_dict``).

    The state is the sampler's epoch and how many batches of it were handed out; Lightning fetches
    one batch at a time from a sized loader, so that is how many were trained on. Loaded, the next
    pass skips that many batches by index, without reading them. This is exact when the batch order
    is a function of (seed, epoch), as with ``lmlab.data.loaders.ShardedSampler``. The loader draws
    its worker seeds from its own generator, seeded by (seed, epoch), never from the global one.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self._handed_out = 0

    @classmethod
    def like(cls, loader: Any) -> Any:
        """``loader`` rebuilt as a ResumableLoader; returned unchanged if it is one or cannot be one."""
        if (isinstance(loader, cls) or not isinstance(loader, DataLoader) or loader.batch_sampler is None
                or isinstance(loader.dataset, IterableDataset)):
            return loader
        kwargs = {name: getattr(loader, name) for name in _CARRIED if hasattr(loader, name)}
        return cls(loader.dataset, batch_sampler=_SkippableBatches(loader.batch_sampler), **kwargs)

    @property
    def _order(self) -> Any:
        return getattr(self.batch_sampler, "sampler", None)

    def __iter__(self) -> Iterator[Any]:
        # A generator: the pass starts at the first next(), after Lightning's set_epoch.
        sampler = self._order
        epoch = int(getattr(sampler, "epoch", 0))
        self.generator.manual_seed(int(getattr(sampler, "seed", 0)) * 1_000_003 + epoch)
        self._handed_out = getattr(self.batch_sampler, "skip", 0)
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": getattr(self._order, "epoch", None), "batches": self._handed_out}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        done = int(state_dict.get("batches", 0))
        sampler = self._order
        if state_dict.get("epoch") is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(int(state_dict["epoch"]))
        elif done:
            log.warning("The training loader's order is not a function of the epoch (%s has no set_epoch): "
                        "the resumed epoch skips %d batches of a different order.", type(sampler).__name__, done)
        # A finished epoch leaves nothing to skip: Lightning starts the next one.
        self.batch_sampler.skip = done if done < len(self.batch_sampler) else 0


class ResumableData(L.Callback):
    """Serves the datamodule's training loader as a ResumableLoader for the duration of a fit.

    Datamodules keep returning plain DataLoaders; this wraps ``train_dataloader`` on the instance.
    Not under DDP for a datamodule that leaves sharding to Lightning (no ``shards_itself``):
    Lightning injects its DistributedSampler into the loader as built, which it cannot do through
    the wrapper's batch sampler; such a loader resumes mid-epoch as Lightning does it.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lmlab.data.loaders import shards_itself

        dm = trainer.datamodule
        if stage != "fit" or dm is None or "train_dataloader" in vars(dm):
            return
        if trainer.world_size > 1 and not shards_itself(dm):
            return
        build: Callable[[], Any] = dm.train_dataloader

        @functools.wraps(build)
        def train_dataloader() -> Any:
            return ResumableLoader.like(build())

        dm.train_dataloader = train_dataloader

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.datamodule is not None:
            vars(trainer.datamodule).pop("train_dataloader", None)


def callbacks(cfg: DictConfig, last: LastCheckpoint) -> list[L.Callback]:
    """What every Trainer gets beyond the checkpoints: resume state, numerical faults, preemption."""
    from lmlab import faults

    guard = faults.NumericalGuard(faults.policy(cfg), last, faults.check_every(cfg))
    return [ResumableData(), RngState(), guard, faults.Preemption(last)]
