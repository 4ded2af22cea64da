"""An optimizer step's gradient is the mean over the targets of its micro-batches and processes.

Lightning divides each micro-batch's loss by accumulate_grad_batches even in an epoch's last,
shorter window (its issue #19987): 3 of 4 micro-batches gave 3/4 of their mean gradient. And it
(with DDP) averages per-micro-batch means, so a micro-batch with fewer targets weighed more per
target. A module that hands its counts to ``weigh_by_tokens`` gets the mean over every target of
the window; one that does not gets the mean over its micro-batches, short window included.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from conftest import compose_cfg
from lmlab.accumulation import WindowScaling, weigh_by_tokens, window_length


class Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.constant_(self.layer.weight, 0.5)
        self.seen: list[torch.Tensor] = []  # the weights each training batch read

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch["input_ids"], batch["y"]
        self.seen.append(self.layer.weight.detach().clone())
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y = batch["input_ids"], batch["y"]
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lmlab_trainer(tmp_path, *overrides: str) -> L.Trainer:
    """The Trainer of an lmlab run (its callbacks: WindowScaling first), a few steps, no clipping."""
    from lmlab import registry
    from lmlab.train import build_trainer

    cfg = compose_cfg(["trainer.enable_progress_bar=false", "trainer.max_steps=-1", "trainer.val_check_interval=null",
                       "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.gradient_clip_val=null",
                       *overrides])
    trainer, _, _ = build_trainer(cfg, registry.get("task", "clm"), tmp_path, False)
    return trainer


def _expected(xs: torch.Tensor, ys: torch.Tensor, windows: list[range]) -> torch.Tensor:
    """Plain SGD on the mean gradient of each window's micro-batches (one sample each)."""
    w = torch.full((1, 3), 0.5)
    for window in windows:
        grads = []
        for i in window:
            v = w.clone().requires_grad_(True)
            torch.nn.functional.mse_loss(xs[i:i + 1] @ v.T, ys[i:i + 1]).backward()
            grads.append(v.grad)
        w = w - 0.1 * torch.stack(grads).mean(0)
    return w


def test_lmlabs_trainer_steps_a_short_last_window_with_its_mean_gradient(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(7, 3, generator=gen), torch.randn(7, 1, generator=gen)
    trainer = _lmlab_trainer(tmp_path, "trainer.accumulate_grad_batches=4", "trainer.max_epochs=2",
                             "trainer.limit_val_batches=1")
    module = Regression()
    rows = [{"input_ids": x, "y": y} for x, y in zip(xs, ys)]  # dicts, as lmlab's throughput log reads them
    trainer.fit(module, DataLoader(rows, batch_size=1, shuffle=False), DataLoader(rows[:1], batch_size=1))
    assert trainer.global_step == 4  # windows of 4 and 3 micro-batches in each of 2 epochs
    windows = [range(0, 4), range(4, 7)] * 2
    torch.testing.assert_close(module.layer.weight.detach(), _expected(xs, ys, windows))
    # The second epoch starts from the mean-gradient step of the first epoch's short window.
    torch.testing.assert_close(module.seen[7], _expected(xs, ys, windows[:2]))


@pytest.mark.parametrize(("ready", "accumulate", "length"), [(4, 4, 4), (7, 4, 3), (8, 4, 4), (5, 4, 1), (3, 1, 1)])
def test_window_length_counts_the_micro_batches_behind_a_step(ready: int, accumulate: int, length: int) -> None:
    assert window_length(ready, accumulate) == length


# -- per-target weighting -------------------------------------------------------------------------
IGNORE = -100
# Targets in each of 8 micro-batches of 5 rows (the rest are IGNORE): uneven on purpose.
COUNTS = [5, 1, 3, 2, 4, 1, 2, 5]


def _token_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    batches = []
    for count in COUNTS:
        labels = torch.randint(0, 4, (5,), generator=gen)
        labels[count:] = IGNORE
        batches.append({"input_ids": torch.randn(5, 3, generator=gen), "labels": labels})
    return batches


def _start() -> torch.Tensor:
    return torch.linspace(-1, 1, 12).view(4, 3)


class Tagger(L.LightningModule):
    """One linear layer over rows, a cross-entropy over the rows that have a target."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(_start())
        self.unchanged: list[bool] = []  # per training step: weigh_by_tokens handed back the mean as it was

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        labels = batch["labels"]
        count = (labels != IGNORE).sum()
        mean = F.cross_entropy(self.layer(batch["input_ids"]), labels, ignore_index=IGNORE,
                               reduction="sum") / count.clamp(min=1)
        weighed = weigh_by_tokens(self, mean, count)
        self.unchanged.append(weighed is mean)
        return weighed

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _sgd(batches: list[dict[str, torch.Tensor]], windows: list[list[int]], per_target: bool) -> torch.Tensor:
    """Plain SGD, each window's gradient the mean over its targets (or over its micro-batches)."""
    w = _start()
    for window in windows:
        v = w.clone().requires_grad_(True)
        sums = [F.cross_entropy(batches[i]["input_ids"] @ v.T, batches[i]["labels"], ignore_index=IGNORE,
                                reduction="sum") for i in window]
        counts = [COUNTS[i] for i in window]
        loss = sum(sums) / sum(counts) if per_target else sum(s / c for s, c in zip(sums, counts)) / len(window)
        loss.backward()
        w = w - 0.5 * v.grad
    return w


def test_a_step_weighs_every_target_of_its_window_alike_short_window_included(tmp_path) -> None:
    batches = _token_batches()[:7]
    trainer = _lmlab_trainer(tmp_path, "trainer.accumulate_grad_batches=4", "trainer.max_epochs=2",
                             "trainer.limit_val_batches=0")
    module = Tagger()
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    assert trainer.global_step == 4
    windows = [[0, 1, 2, 3], [4, 5, 6]] * 2
    got = module.layer.weight.detach()
    torch.testing.assert_close(got, _sgd(batches, windows, per_target=True))
    # The premise: with these counts the mean of micro-batch means is another step.
    assert not torch.allclose(got, _sgd(batches, windows, per_target=False), rtol=1e-3, atol=1e-4)


class ShardedTagger(Tagger):
    """Rank r reads micro-batches r, r+2, ... of ``_token_batches`` in order."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_token_batches()[self.global_rank::2], batch_size=None)


@pytest.mark.slow
def test_two_ddp_processes_weigh_their_targets_as_one_process_would(tmp_path) -> None:
    """Real DDP (gloo, 2 spawned processes), 2 micro-batches accumulated on each: a step holds
    micro-batches 4s..4s+3, and the two processes' counts differ."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", accumulate_grad_batches=2,
                        max_epochs=1, callbacks=[WindowScaling()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir=tmp_path)
    module = ShardedTagger()
    trainer.fit(module)
    batches, windows = _token_batches(), [[0, 1, 2, 3], [4, 5, 6, 7]]
    got = module.layer.weight.detach()  # rank 0's weights, handed back by Lightning's launcher
    torch.testing.assert_close(got, _sgd(batches, windows, per_target=True))
    assert not torch.allclose(got, _sgd(batches, windows, per_target=False), rtol=1e-3, atol=1e-4)


def test_outside_a_fit_the_mean_loss_is_returned_as_it_is() -> None:
    loss = torch.tensor(2.5)
    assert weigh_by_tokens(Tagger(), loss, torch.tensor(3)) is loss


def test_a_trainer_without_window_scaling_trains_on_the_mean_of_micro_batch_means(tmp_path) -> None:
    # Without the callback nothing would divide the sums by the window's count: weigh_by_tokens
    # must leave the loss as it is, and Lightning's own mean of means is what trains.
    batches = _token_batches()
    trainer = L.Trainer(accelerator="cpu", devices=1, accumulate_grad_batches=4, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    module = Tagger()
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    windows = [[0, 1, 2, 3], [4, 5, 6, 7]]
    torch.testing.assert_close(module.layer.weight.detach(), _sgd(batches, windows, per_target=False))


def test_one_process_without_accumulation_trains_on_the_plain_mean(tmp_path) -> None:
    # Each micro-batch is its own step there: its mean is the step's, and no scale is needed.
    trainer = _lmlab_trainer(tmp_path, "trainer.max_epochs=1", "trainer.limit_val_batches=0")
    module = Tagger()
    batches = _token_batches()[:3]
    trainer.fit(module, DataLoader(batches, batch_size=None, shuffle=False))
    assert module.unchanged == [True, True, True]
    torch.testing.assert_close(module.layer.weight.detach(), _sgd(batches, [[0], [1], [2]], per_target=True))
