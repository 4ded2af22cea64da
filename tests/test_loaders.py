"""Training and evaluation loaders: every row once per epoch on some process, as many batches on every
process, a seeded order, and a run resumed inside an epoch that trains on the batches the
uninterrupted run trained on next.

Processes are simulated by setting ``lmlab.data.loaders.process_group`` per rank, as
tests/test_ddp.py does for evaluation; that file runs the real 2-process gloo job.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import wiki_head
from test_resume import Crash
from torch.utils.data import Dataset

from lmlab.checkpointing import LastCheckpoint, ResumableData, ResumableLoader, RngState
from lmlab.data import loaders

# The resumed run writes its checkpoints into the folder the crashed one left them in, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")


def shards(monkeypatch: pytest.MonkeyPatch, size: int, world: int, *, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    """Each simulated rank's training rows of an epoch, checked against the length it announces."""
    got = []
    for rank in range(world):
        monkeypatch.setattr(loaders, "process_group", lambda rank=rank: (rank, world))
        sampler = loaders.ShardedSampler(size, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        rows = list(sampler)
        assert len(rows) == len(sampler), (size, world, rank)
        got.append(rows)
    return got


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_every_training_row_is_read_once_an_epoch_and_every_rank_reads_as_many(
        monkeypatch: pytest.MonkeyPatch, world: int) -> None:
    """Before, with fewer than half as many rows as processes, the padding (one copy of the
    permutation's head) fell short: 3 rows on 8 processes left 2 of them with no row while len()
    said 1, and DDP's gradient all-reduce waited on them."""
    for size in range(1, 41):
        parts = shards(monkeypatch, size, world)
        assert {len(p) for p in parts} == {-(-size // world)}, (size, world)
        counts = Counter(row for part in parts for row in part)
        assert set(counts) == set(range(size)), (size, world)
        # Only the padding repeats a row: as many extra reads as the shards are longer than the data.
        assert sum(counts.values()) - size == -(-size // world) * world - size


@pytest.mark.parametrize("size, batch, world", [(3, 1, 8), (101, 4, 4), (10, 3, 3), (64, 8, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_training_loaders_give_every_rank_as_many_batches(monkeypatch: pytest.MonkeyPatch, size: int, batch: int,
                                                          world: int, drop_last: bool) -> None:
    counts = []
    for rank in range(world):
        monkeypatch.setattr(loaders, "process_group", lambda rank=rank: (rank, world))
        loader = loaders.make_loader(list(range(size)), batch_size=batch, train=True, seed=5, drop_last=drop_last)
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(len(batches))
    assert len(set(counts)) == 1, counts


def test_the_order_is_seeded_new_each_epoch_and_one_global_batch_whatever_the_processes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    size = 96
    (epoch0,) = shards(monkeypatch, size, 1, seed=3, epoch=0)
    assert shards(monkeypatch, size, 1, seed=3, epoch=0) == [epoch0]  # reproducible
    assert shards(monkeypatch, size, 1, seed=3, epoch=1) != [epoch0]  # reshuffled each epoch
    assert shards(monkeypatch, size, 1, seed=4, epoch=0) != [epoch0]  # and by the seed
    # 4 processes with batches of 2 read, between them, one process's batches of 8.
    parts = shards(monkeypatch, size, 4, seed=3, epoch=0)
    for b in range(size // 8):
        together = sorted(row for part in parts for row in part[2 * b:2 * b + 2])
        assert together == sorted(epoch0[8 * b:8 * b + 8])
    # Evaluation: file order, each row once.
    evaluated = []
    for rank in range(3):
        monkeypatch.setattr(loaders, "process_group", lambda rank=rank: (rank, 3))
        evaluated += [row for batch in loaders.make_loader(list(range(10)), batch_size=2, train=False) for row in batch]
    assert sorted(evaluated) == list(range(10))


# -- resuming inside an epoch ---------------------------------------------------------------------
class Paragraphs(Dataset):
    """Real Wikipedia paragraphs, served as (row index, length): the batches say which rows they hold."""

    def __init__(self, path: Path):
        self.texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(len(self.texts[i]))])


class Data(L.LightningDataModule):
    shards_itself = True

    def __init__(self, path: Path, workers: int):
        super().__init__()
        self.path, self.workers = path, workers

    def train_dataloader(self) -> Any:
        return loaders.make_loader(Paragraphs(self.path), batch_size=2, train=True, seed=7,
                                   num_workers=self.workers, drop_last=True)


class Recorder(L.LightningModule):
    """Records each micro-batch's rows and the dropout mask drawn for it."""

    def __init__(self, seen: list[tuple[int, list[int], list[float]]]):
        super().__init__()
        self.linear, self.dropout, self.seen = torch.nn.Linear(2, 1), torch.nn.Dropout(0.5), seen

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        mask = self.dropout(torch.ones(8))
        self.seen.append((self.global_step, batch[:, 0].long().tolist(), mask.tolist()))
        return self.linear(batch / 1000).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(root: Path, text: Path, seen: list, *, workers: int, accumulate: int, crash: int | None = None,
        ckpt: Path | None = None) -> Path:
    last = LastCheckpoint(root / "checkpoints", 1)
    L.seed_everything(3)
    trainer = L.Trainer(max_steps=14, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        default_root_dir=root, accelerator="cpu",
                        callbacks=[last, ResumableData(), RngState(), *([Crash(crash)] if crash is not None else [])])
    try:
        trainer.fit(Recorder(seen), datamodule=Data(text, workers), ckpt_path=ckpt)
    except RuntimeError as exc:
        assert "simulated crash" in str(exc)
    return last.path


@pytest.mark.parametrize("workers, accumulate, crash", [
    (0, 1, 5),   # mid-epoch
    (2, 1, 5),   # mid-epoch, with worker processes
    (2, 1, 12),  # the second epoch's second batch (an epoch is 11 batches), with workers
    (0, 2, 6),   # accumulating 2, after the epoch's last, partial accumulation
    (2, 2, 3),   # accumulating 2, with workers
])
def test_a_run_resumed_inside_an_epoch_trains_on_the_batches_the_uninterrupted_run_did(
        tmp_path: Path, workers: int, accumulate: int, crash: int) -> None:
    """Before, a loader with workers restarted the epoch on resume: DataLoader builds its worker
    iterator by calling iter() on the batch sampler twice, and the first call took the skip
    (num_workers=2, resumed at step 5: batches 0-4 trained again, the epoch's last 5 never)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    text = wiki_head(tmp_path, 22)
    want: list = []
    fit(tmp_path / "whole", text, want, workers=workers, accumulate=accumulate)
    got: list = []
    path = fit(tmp_path / "crashed", text, got, workers=workers, accumulate=accumulate, crash=crash)
    saved = torch.load(path, weights_only=True)["global_step"]
    assert saved == crash
    before = len(got)
    fit(tmp_path / "crashed", text, got, workers=workers, accumulate=accumulate, ckpt=path)
    resumed, expected = got[before:], [entry for entry in want if entry[0] >= saved]
    assert [rows for _, rows, _ in resumed] == [rows for _, rows, _ in expected]
    assert [mask for _, _, mask in resumed] == [mask for _, _, mask in expected]  # the generators too
    # Every row of the first epoch trained on once, interrupted or not.
    first_epoch = [row for _, rows, _ in want[:11] for row in rows]
    assert sorted(first_epoch) == list(range(22))


def test_a_loader_with_workers_skips_the_batches_its_checkpoint_counted(tmp_path: Path) -> None:
    dataset = Paragraphs(wiki_head(tmp_path, 30))

    def loader() -> ResumableLoader:
        return ResumableLoader.like(loaders.make_loader(dataset, batch_size=3, train=True, seed=1, num_workers=2,
                                                        drop_last=True))

    whole = [batch[:, 0].tolist() for batch in loader()]
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 4})
    assert [batch[:, 0].tolist() for batch in resumed] == whole[4:]
    assert resumed.state_dict() == {"epoch": 0, "batches": len(whole)}
    assert [batch[:, 0].tolist() for batch in resumed] == whole  # the skip is for one pass only
