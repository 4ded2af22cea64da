"""``trainer.val_check_interval`` counts optimizer steps across epochs, with gradient accumulation too.

Lightning steps the optimizer on an epoch's last, partial accumulation, so once an epoch's batches
are not a multiple of ``accumulate_grad_batches`` its count of training batches is no longer
``accumulate`` times the count of optimizer steps: validation must still follow step k·interval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY, run_in_home
from lmlab.callbacks import StepValidation


class ValidationSteps(L.Callback):
    """Records, for each validation inside ``fit``, the optimizer step it follows and how many
    training batches ran since that step (0: right after it, not in the middle of an accumulation)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.epoch_batches: int | float | None = None
        self._step, self._since = 0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_batches = trainer.num_training_batches
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stepped = trainer.global_step != self._step
        self._step, self._since = trainer.global_step, 0 if stepped else self._since + 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.seen.append((trainer.global_step, self._since))


def run_recorded(root: Path, overrides: list[str]) -> tuple[Any, ValidationSteps]:
    from lmlab import checkpointing

    recorder = ValidationSteps()
    with pytest.MonkeyPatch.context() as mp:
        real = checkpointing.callbacks
        mp.setattr(checkpointing, "callbacks", lambda cfg, last: [*real(cfg, last), recorder])
        result, _ = run_in_home(root, overrides)
    return result, recorder


# 40 BBC documents in 64-token batches of 16: 5 training batches an epoch. Accumulating 4, the
# optimizer steps after batches 4, 5 | 9, 10; counting 2 steps as 8 batches, Lightning would
# validate after batch 8, in the middle of step 3, and not after step 4 (batch 10).
DRIFTING = [*TINY, "data.max_documents=40", "trainer.accumulate_grad_batches=4", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
            "checkpoint.save_top_k=-1", "checkpoint.load_best_at_end=false", "export=false"]


@pytest.mark.slow
def test_validation_follows_every_interval_of_optimizer_steps_across_partial_accumulations(tmp_path: Path) -> None:
    import mlflow

    result, recorder = run_recorded(tmp_path, DRIFTING)
    assert recorder.epoch_batches == 5  # the premise: an epoch is not a whole number of accumulations
    # Right after steps 2 and 4, never between two optimizer steps.
    assert recorder.seen == [(2, 0), (4, 0)]
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    # Logged 0-based, as the training metrics: the validation after step k at k - 1; fit's last
    # validation scores the final weights, so no second point for them.
    assert [m.step for m in client.get_metric_history(result.run_id, "val/loss")] == [1, 3]
    names = sorted(p.name for p in (result.output_dir / "checkpoints").glob("best-*.ckpt"))
    assert names == ["best-step=2.ckpt", "best-step=4.ckpt"]


# -- the mechanism, on a bare Lightning Trainer: a linear model, one example a batch ----------------
class Linear(L.LightningModule):
    def __init__(self, batches: int):
        super().__init__()
        self.layer, self.batches = torch.nn.Linear(2, 1), batches

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(self.batches, 2)), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(1, 2)), batch_size=1)


def fit(root: Path, batches: int, accumulate: int, interval: int, max_steps: int, *callbacks: L.Callback,
        ckpt_path: Path | None = None) -> ValidationSteps:
    """Validations of a fit configured as ``build_trainer`` configures one: the interval in batches."""
    recorder = ValidationSteps()
    trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, val_check_interval=interval * accumulate,
                        check_val_every_n_epoch=None, accumulate_grad_batches=accumulate, logger=False,
                        callbacks=[*callbacks, recorder, ModelCheckpoint(dirpath=root, save_last=True)],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root)
    trainer.fit(Linear(batches), ckpt_path=ckpt_path)
    return recorder


def after_steps(interval: int, max_steps: int, start: int = 0) -> list[tuple[int, int]]:
    return [(step, 0) for step in range(interval, max_steps + 1, interval) if step > start]


@pytest.mark.parametrize(("batches", "accumulate", "interval"), [(10, 4, 2), (5, 2, 3), (7, 3, 1), (5, 4, 3)])
def test_partial_accumulations_validate_after_the_optimizer_step(tmp_path: Path, batches: int, accumulate: int,
                                                                 interval: int) -> None:
    steps = 4 * interval + 1
    lightning_alone = fit(tmp_path / "plain", batches, accumulate, interval, steps)
    assert lightning_alone.seen != after_steps(interval, steps)  # the premise: its batch count drifts
    got = fit(tmp_path / "fixed", batches, accumulate, interval, steps, StepValidation(interval))
    assert got.seen == after_steps(interval, steps)


@pytest.mark.parametrize(("batches", "accumulate"), [(8, 4), (6, 1)])
def test_whole_accumulations_are_left_to_lightning(tmp_path: Path, batches: int, accumulate: int) -> None:
    callback = StepValidation(2)
    got = fit(tmp_path, batches, accumulate, 2, 9, callback)
    assert not callback.active
    assert got.seen == after_steps(2, 9)


@pytest.mark.parametrize("stop", [4, 5, 7])
def test_a_resumed_fit_validates_where_the_uninterrupted_one_does(tmp_path: Path, stop: int) -> None:
    # 5 batches an epoch, accumulating 2: steps after batches 2, 4, 5 | 7, 9, 10 | ... Stopping at
    # 4 (validated), 5 (not) or 7 (not, mid-epoch) and going on to 11.
    first = fit(tmp_path, 5, 2, 2, stop, StepValidation(2))
    assert first.seen == after_steps(2, stop)
    resumed = fit(tmp_path, 5, 2, 2, 11, StepValidation(2), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.seen == after_steps(2, 11, start=stop)  # none repeated, none skipped


@pytest.mark.parametrize("accumulate", [1, 4])
def test_build_trainer_steers_validation_only_when_accumulating(tmp_path: Path, accumulate: int) -> None:
    from conftest import compose_cfg
    from lmlab import registry
    from lmlab.faults import Preemption
    from lmlab.train import build_trainer

    cfg = compose_cfg([*TINY, f"trainer.accumulate_grad_batches={accumulate}", "trainer.val_check_interval=5"])
    trainer, _, _ = build_trainer(cfg, registry.get("task", "clm"), tmp_path, None)
    assert trainer.val_check_interval == 5 * accumulate  # Lightning's batches
    kinds = [type(c) for c in trainer.callbacks]
    if accumulate == 1:  # nothing added: such runs validate exactly as before
        assert StepValidation not in kinds
    else:  # decides before any callback that checkpoints after a batch
        (steering,) = [c for c in trainer.callbacks if isinstance(c, StepValidation)]
        assert steering.every == 5 and kinds.index(StepValidation) < kinds.index(Preemption)
