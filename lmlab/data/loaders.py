"""DataLoaders whose order does not depend on how many processes read them.

Lightning's default swaps in ``DistributedSampler`` under DDP. A datamodule whose loaders come from
:func:`make_loader` says so with ``shards_itself = True`` (every lmlab datamodule does); lmlab then
turns the swap off (``use_distributed_sampler``, see :func:`distributed_sampler_wanted`), because
:class:`ShardedSampler` does better, for two reasons:

* training: one seeded permutation per epoch, cut into this process's share exactly as
  ``DistributedSampler`` does, so one process with batch ``B`` and ``N`` processes with batch
  ``B / N`` see the same global batches (a single process's ``RandomSampler`` draws another order);
* evaluation: no padding. ``DistributedSampler`` repeats examples to even out the shards, and
  summed metrics (loss, entity counts) would count them twice. Uneven shards are safe because
  evaluation has no collective per batch (the DDP preset sets ``broadcast_buffers: false``).

A datamodule without the attribute (a plugin's plain ``DataLoader``) keeps Lightning's swap: each
process then reads its own part of the data, not a copy of every batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


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
            order += order[: total - len(order)]
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
    presets), whether the loaders leave sharding to Lightning."""
    return bool(configured) if configured is not None else not sharded


def make_loader(dataset: Dataset, *, batch_size: int, train: bool, seed: int = 0,
                collate_fn: Callable[[list[Any]], Any] | None = None, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader over :class:`ShardedSampler`: shuffled and even for training, exact for evaluation."""
    return DataLoader(
        dataset, batch_size=batch_size, sampler=ShardedSampler(len(dataset), shuffle=train, seed=seed),
        collate_fn=collate_fn, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0, drop_last=drop_last,
    )
