"""Per-step scalars are logged on the written steps only, and the loggers receive the same values."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lmlab.step_logging import log_step, written_this_step


class Regression(L.LightningModule):
    """A real, tiny training job whose per-step loss is logged every step or through ``log_step``."""

    def __init__(self, gated: bool):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(3, 1)
        self.gated = gated
        self.calls = 0
        self.losses: list[tuple[int, float]] = []  # (optimizer step, loss) of every training step

    def log(self, name, value, *args, **kwargs):  # counts Lightning's real calls
        self.calls += 1
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = (self.layer(batch[:, :3]) - batch[:, 3:]).pow(2).mean()
        self.losses.append((self._trainer.global_step if self._trainer else -1, loss.item()))
        if self.gated:
            log_step(self, "train/loss", loss, prog_bar=True, sync_dist=True)
        else:
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(data, batch_size=4)


def train(tmp_path: Path, gated: bool, steps: int = 23, accumulate: int = 1) -> tuple[Regression, list[dict]]:
    module = Regression(gated)
    logger = CSVLogger(tmp_path / ("gated" if gated else "every"), name="", version="")
    L.Trainer(max_steps=steps, logger=logger, log_every_n_steps=5, accumulate_grad_batches=accumulate,
              enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False).fit(module)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as rows:
        return module, [r for r in csv.DictReader(rows) if r.get("train/loss")]


def test_the_loss_is_logged_on_written_steps_only_and_the_logger_gets_the_same_rows(tmp_path: Path) -> None:
    every, every_rows = train(tmp_path, gated=False)
    gated, gated_rows = train(tmp_path, gated=True)
    assert every.calls == 23
    assert gated.calls == 4  # steps 5, 10, 15, 20 of 23
    assert [r["step"] for r in gated_rows] == ["4", "9", "14", "19"]
    assert gated_rows == every_rows  # the same steps and values as logging every step


def test_with_gradient_accumulation_the_written_loss_is_the_mean_over_the_micro_batches(tmp_path: Path) -> None:
    every, every_rows = train(tmp_path, gated=False, steps=11, accumulate=3)
    gated, gated_rows = train(tmp_path, gated=True, steps=11, accumulate=3)
    assert gated.losses == every.losses  # the same training
    assert [r["step"] for r in gated_rows] == [r["step"] for r in every_rows] == ["4", "9"]
    assert gated.calls == 6 < every.calls  # the three micro-batches of optimizer steps 5 and 10
    for row in gated_rows:
        micro = [loss for step, loss in gated.losses if step == int(row["step"])]
        assert len(micro) == 3 and len(set(micro)) == 3
        # As the Hugging Face Trainer reports it; Lightning alone writes the last micro-batch's loss.
        assert float(row["train/loss"]) == pytest.approx(sum(micro) / 3, rel=1e-6)
        assert float(next(r for r in every_rows if r["step"] == row["step"])["train/loss"]) == \
            pytest.approx(micro[-1], rel=1e-6)


def test_a_value_logged_once_per_optimizer_step_or_not_averaged_is_written_as_it_is(tmp_path: Path) -> None:
    class Once(Regression):
        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            log_step(self, "train/batch", float(batch_idx), mean=False)  # the last micro-batch's
            return loss

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            log_step(self, "train/step_value", float(self.trainer.global_step))  # once per optimizer step

    module = Once(gated=True)
    logger = CSVLogger(tmp_path, name="", version="")
    L.Trainer(max_steps=11, logger=logger, log_every_n_steps=5, accumulate_grad_batches=3, enable_progress_bar=False,
              enable_checkpointing=False, enable_model_summary=False).fit(module)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    # Optimizer step 5 is batches 12, 13 and 14; step 10 is 27, 28 and 29.
    assert [(r["step"], float(r["train/batch"]), float(r["train/step_value"])) for r in rows] == \
        [("4", 14.0, 4.0), ("9", 29.0, 9.0)]


def test_outside_a_trainer_nothing_is_written() -> None:
    module = Regression(gated=True)
    assert not written_this_step(module)
    module.training_step(torch.randn(4, 4), 0)
    assert module.calls == 0


def test_fast_dev_run_writes_every_step(tmp_path: Path) -> None:
    module = Regression(gated=True)
    L.Trainer(fast_dev_run=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)
    assert module.calls == 3
