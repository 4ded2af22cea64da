"""DataLoaders whose order does not depend on how many processes read them.

Lightning's default swaps in ``DistributedSampler`` under DDP. A datamodule whose loaders come from
:func:`make_loader` says so with ``shards_itself = True`` (every lmlab datamodule does); lmlab then
turns the swap off (``use_distributed_sampler``, see :func:`distributed_sampler_wanted`), because
:class:`ShardedSampler` does better, for two reasons:

* training: one seeded permutation per epoch, cut into this process's share exactly as
  ``DistributedSampler`` does, so one process with batch ``B`` and ``N`` processes with batch
  ``B / N`` see the same global batches (a single process's ``RandomSampler`` draws another order);
* evaluation: no padding. ``DistributedSampler`` repeats examples to even out the shards, and
  summed metrics (loss, entity counts) would count them twice. The shards differ by one row at
  most, and every process still gets as many batches (:class:`EvalBatches`): FSDP and DeepSpeed
  ZeRO-3 gather parameters inside every forward, a collective that a process with one batch fewer
  would leave the others waiting in. (DDP's evaluation has none: its preset sets
  ``broadcast_buffers: false``.)

A datamodule without the attribute (a plugin's plain ``DataLoader``) keeps Lightning's swap: each
process then reads its own part of the data, not a copy of every batch.

``mode=predict`` shares its file the same way (:func:`predict_in_shares`), in whole batches, and
global rank 0 gathers the predictions to write them.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lmlab.errors import config_error

log = logging.getLogger(__name__)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the running job; (0, 1) outside torch.distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedSampler(Sampler[int]):
    """This process's indices of a dataset: a seeded per-epoch permutation (train) or file order (eval)."""

    def __init__(self, size: int, *, shuffle: bool, seed: int = 0, pad: bool | None = None):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.pad = shuffle if pad is None else pad  # training shards are even, evaluation shards exact
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        rank, world = process_group()
        order = self._order()
        if self.pad and world > 1:
            total = math.ceil(self.size / world) * world
            # Repeated whole as often as needed, as DistributedSampler does: one copy of the head fell
            # short when the data had fewer than half as many rows as processes (3 rows, 8
            # processes: 2 of them got none while len() promised one, and DDP waited on them).
            order = (order * math.ceil(total / len(order)))[:total] if order else order
        return iter(order[rank::world])

    def __len__(self) -> int:
        rank, world = process_group()
        if self.pad:
            return math.ceil(self.size / world)
        return len(range(rank, self.size, world))


def shards_itself(datamodule: Any) -> bool:
    """Whether a datamodule's loaders are :func:`make_loader`'s: it says so with ``shards_itself = True``."""
    return bool(getattr(datamodule, "shards_itself", False))


def distributed_sampler_wanted(configured: Any, sharded: bool) -> bool:
    """``trainer.use_distributed_sampler``: what the config says, or when it says nothing (null, the
    presets), whether the loaders leave sharding to Lightning. True for loaders that shard themselves
    is refused: Lightning's sampler would replace theirs and repeat evaluation rows to even the
    shards out, which the summed metrics count twice (and it cannot rebuild :class:`EvalBatches`)."""
    if configured and sharded:
        raise config_error("trainer.use_distributed_sampler", "is true, but this data's loaders shard "
                           "themselves: Lightning's DistributedSampler would repeat evaluation rows, which "
                           "the summed metrics would count twice", "Leave it unset (null).")
    return bool(configured) if configured is not None else not sharded


class EvalBatches(Sampler[list[int]]):
    """This process's evaluation batches: its rows of :class:`ShardedSampler` (every world-size-th, in
    file order), in as many batches as every other process has.

    A process one row short whose rows would fill a batch fewer (9 rows, 2 processes, batches of 4:
    5 and 4 rows) splits its last batch instead (4+1 and 3+1). Batches shrink only at the end, so
    batch ``b`` starts at this process's row ``b x`` its size or later (the summarization task reads
    that). Where the rows cannot fill the batches (batches of one row, or fewer rows than processes)
    the counts stay uneven: DDP evaluates that fine; FSDP and DeepSpeed would wait.
    """

    def __init__(self, size: int, batch_size: int):
        self.size, self.batch_size = size, max(1, batch_size)

    def _batches(self) -> list[list[int]]:
        rank, world = process_group()
        rows = list(range(rank, self.size, world))
        count = math.ceil(math.ceil(self.size / world) / self.batch_size)  # global rank 0's, the most
        sizes = [self.batch_size] * count
        excess = len(sizes) * self.batch_size - len(rows)
        for i in reversed(range(len(sizes))):  # shrink from the end, keeping a row in each batch
            taken = min(excess, sizes[i] - 1)
            sizes[i] -= taken
            excess -= taken
        if excess > 0:  # too few rows for a row per batch
            sizes = [self.batch_size] * math.ceil(len(rows) / self.batch_size)
        # Running starts, not a sum per batch: that was quadratic in the batches, and Lightning asks
        # the length several times an epoch.
        starts = itertools.accumulate(sizes[:-1], initial=0)
        return [rows[start:start + n] for start, n in zip(starts, sizes) if rows[start:start + n]]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0,
                collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader over :class:`ShardedSampler`: shuffled and even for training, exact for evaluation
    (:class:`EvalBatches`)."""
    common = dict(collate_fn=collate_fn, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=num_workers > 0)
    if train or drop_last:
        return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last,
                          sampler=ShardedSampler(len(dataset), shuffle=train, seed=seed), **common)
    return DataLoader(dataset, batch_sampler=EvalBatches(len(dataset), batch_size), **common)


class PredictSampler(Sampler[int]):
    """This process's rows of a mode=predict file: every world-size-th batch of ``batch_size`` rows,
    in file order (``shared=False``: every row).

    Cut into whole batches, not rows: each batch holds the rows, and so the padding, that it holds in
    one process, so its predictions are one process's bit for bit. Nothing is repeated to even the
    shares out; the processes differ by one batch at most.
    """

    def __init__(self, size: int, batch_size: int, *, shared: bool):
        self.size, self.batch_size, self.shared = size, batch_size, shared

    def splits(self) -> bool:
        """Whether the rows are shared out: asked while predicting, when the process group is up.

        Only when every process gets a batch: DDP with ``broadcast_buffers`` syncs the buffers in a
        process's first forward, which would wait forever on a process without one.
        """
        _, world = process_group()
        return self.shared and world > 1 and math.ceil(self.size / self.batch_size) >= world

    def _rows(self) -> range | list[int]:
        if not self.splits():
            return range(self.size)
        rank, world = process_group()
        starts = range(rank * self.batch_size, self.size, world * self.batch_size)
        return [i for start in starts for i in range(start, min(start + self.batch_size, self.size))]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())


def replicates_model(trainer: Any) -> bool:
    """Whether every process holds the whole model and runs its forward alone (DDP), so that the
    processes can predict different rows. FSDP and DeepSpeed (a DDPStrategy too) run collectives
    inside the forward (and generate()): there every process predicts every row, in step."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    strategy = getattr(trainer, "strategy", None)
    return isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)


def forward_is_collective(trainer: Any) -> bool:
    """Whether the processes' forward passes meet in collectives (FSDP, DeepSpeed, over several
    processes): each process must then run as many forwards, in step, as every other."""
    return int(getattr(trainer, "world_size", 1) or 1) > 1 and not replicates_model(trainer)


def predict_in_shares(trainer: Any, module: Any, dataset: Dataset, *, batch_size: int,
                      collate_fn: Callable[[list[Any]], Any],
                      pairs: Callable[[Any], Iterable[tuple[int, Any]]]) -> dict[int, Any]:
    """``trainer.predict`` over ``dataset``, each process on its share (:class:`PredictSampler`):
    every row's prediction by row index on global rank 0, ``{}`` on the other processes.

    ``pairs`` turns what ``predict_step`` returned for a batch into (row index, prediction) pairs of
    plain objects: they travel to rank 0 with ``torch.distributed.gather_object``.
    """
    sampler = PredictSampler(len(dataset), batch_size, shared=replicates_model(trainer))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn)
    local = [pair for out in (trainer.predict(module, dataloaders=loader) or []) for pair in pairs(out)]
    if sampler.splits():
        rank, world = process_group()
        log.info("Process %d of %d predicted %d of %d rows", rank, world, len(local), len(dataset))
        parts: list[Any] | None = [None] * world if rank == 0 else None
        torch.distributed.gather_object(local, parts, dst=0)
        local = [pair for part in parts or [] for pair in part]
    if not trainer.is_global_zero:
        return {}
    predicted = dict(local)
    # Lightning's DistributedSampler took a share of the share: check_mode refuses that config up front,
    # this catches a caller (a plugin task) that builds its own trainer.
    if len(predicted) != len(dataset):
        raise config_error("trainer.use_distributed_sampler", f"is true, and the processes predicted "
                           f"{len(predicted)} of {len(dataset)} rows", "Leave it unset (null): mode=predict "
                           "shares the rows out itself.")
    return predicted
