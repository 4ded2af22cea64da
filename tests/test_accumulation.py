"""An epoch that ends on a short accumulation steps with the mean gradient of its micro-batches.

Lightning divides each micro-batch's loss by accumulate_grad_batches even in an epoch's last,
shorter window (its issue #19987): 3 of 4 micro-batches gave 3/4 of their mean gradient.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import compose_cfg
from lmlab.accumulation import window_length


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
    from lmlab import registry
    from lmlab.train import build_trainer

    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(7, 3, generator=gen), torch.randn(7, 1, generator=gen)
    cfg = compose_cfg(["trainer.enable_progress_bar=false", "trainer.accumulate_grad_batches=4",
                       "trainer.max_epochs=2", "trainer.max_steps=-1", "trainer.val_check_interval=null",
                       "trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
                       "trainer.gradient_clip_val=null"])
    trainer, _, _ = build_trainer(cfg, registry.get("task", "clm"), tmp_path, False)
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
