"""``task=regression``: one real-valued score per text, with MSE, MAE, Pearson and Spearman.

The model is any registered family with a ``sequence_classification`` head (bert, gpt2 ...): the
datamodule asks for ``num_labels=1`` and ``problem_type="regression"``, so the exported model
reloads with ``AutoModelForSequenceClassification`` and predicts the score directly.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from lmlab import optim
from lmlab.accumulation import weigh_by_tokens
from lmlab.errors import config_error
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step

LOSSES = ("mse", "huber")
STAGES = ("val", "test")


def regression_metrics() -> MetricCollection:
    """Error and agreement of predicted vs gold scores; torchmetrics syncs them across processes."""
    with warnings.catch_warnings():
        # Spearman keeps the split's predictions to rank them, and says so on every run; evaluation
        # splits are small enough for that.
        warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
        spearman = SpearmanCorrCoef()
    return MetricCollection({
        "mse": MeanSquaredError(),
        "mae": MeanAbsoluteError(),
        "pearson": PearsonCorrCoef(),
        "spearman": spearman,
    })


def row_losses(kind: str, predicted: torch.Tensor, gold: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """The training loss of every row: squared error, or Huber's (quadratic within ``delta``, then linear)."""
    if kind == "huber":
        return F.huber_loss(predicted, gold, reduction="none", delta=delta)
    return F.mse_loss(predicted, gold, reduction="none")


class RegressionModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, *, optimizer: DictConfig, scheduler: DictConfig, loss: str = "mse",
                 huber_delta: float = 1.0):
        super().__init__()
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        self.loss_kind, self.huber_delta = loss, huber_delta
        # One metric object per stage, so a test run never mixes with validation state.
        self.scores = torch.nn.ModuleDict({stage: regression_metrics() for stage in STAGES})
        self.mean_loss = torch.nn.ModuleDict({stage: MeanMetric() for stage in STAGES})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted scores, shape (batch,), in float32 whatever the training precision."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return self.model(**inputs).logits.squeeze(-1).float()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        predicted = self(batch)
        loss = row_losses(self.loss_kind, predicted, batch["labels"].float(), self.huber_delta).mean()
        log_step(self, "train/loss", loss, prog_bar=True, batch_size=len(predicted))  # on the written steps only
        return weigh_by_tokens(self, loss, len(predicted))  # every row of a step alike, shorter batches too

    def _eval_step(self, batch: dict[str, torch.Tensor], stage: str) -> None:
        predicted, gold = self(batch), batch["labels"].float()
        self.mean_loss[stage].update(row_losses(self.loss_kind, predicted, gold, self.huber_delta))
        self.scores[stage].update(predicted, gold)

    def _eval_end(self, stage: str) -> None:
        values = {f"{stage}/{name}": value for name, value in self.scores[stage].compute().items()}
        # The mean over all rows of the split, not a mean of batch means.
        values[f"{stage}/loss"] = self.mean_loss[stage].compute()
        self.log_dict(values, prog_bar=stage == "val")
        self.scores[stage].reset()
        self.mean_loss[stage].reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def configure_optimizers(self) -> dict[str, Any]:
        # lmlab's optimizer/scheduler groups apply unchanged: optimizer.lr=, scheduler=linear ...
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> RegressionModule:
    model.train()  # from_pretrained returns eval mode; dropout belongs in training
    return RegressionModule(model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, loss=str(cfg.task.loss),
                            huber_delta=float(cfg.task.huber_delta))


def validate(cfg: DictConfig) -> None:
    """Wrong settings fail here, before any data is read or tokenizer trained."""
    if cfg.task.get("loss") not in LOSSES:
        raise config_error("task.loss", f"'{cfg.task.get('loss')}' is not a regression loss",
                           f"Use one of: {', '.join(LOSSES)}.")
    delta = cfg.task.get("huber_delta")
    if not isinstance(delta, (int, float)) or delta <= 0:
        raise config_error("task.huber_delta", f"'{delta}' is not a positive number", "Use e.g. task.huber_delta=1.0.")
    if cfg.data.get("score_column") is None:
        raise config_error("data", f"task=regression needs scored text and the data preset "
                           f"(datamodule '{cfg.data.get('datamodule')}') has no score column",
                           "Use data=vader_lexicon (the default) or data=regression_csv data.path=FILE.")
    if cfg.data.get("max_length") is None:
        raise config_error("data.max_length", "is not set", "Set data.max_length (tokens per text), e.g. 128.")


TASK = TaskSpec(
    name="regression",
    head=lambda cfg: "sequence_classification",
    build_module=build_module,
    packing=lambda cfg: "regression",
    validate=validate,
    export_class="AutoModelForSequenceClassification",
    monitor="val/loss",
    monitor_mode="min",
    description="text regression, one score per text (MSE, MAE, Pearson, Spearman) [lmlab-regression]",
)
