"""Causal language modelling (GPT-style): next-token loss, perplexity over all validation tokens."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import SumMetric

from lmlab import optim
from lmlab.specs import TaskSpec


class CausalLMModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: DictConfig, scheduler: DictConfig):
        super().__init__()
        self.model = model
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        # Sums, not means: perplexity is exp(total loss / total tokens) over the whole split,
        # and SumMetric adds them up across processes under DDP.
        self.val_loss_sum = SumMetric()
        self.val_tokens = SumMetric()

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy and the number of predicted tokens."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        logits = self.model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        targets = ids[:, 1:]
        if mask is not None:
            targets = targets.masked_fill(mask[:, 1:] == 0, -100)
        loss_sum = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        return loss_sum, (targets != -100).sum()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count = self.token_losses(batch)
        loss = loss_sum / count.clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, count = self.token_losses(batch)
        self.val_loss_sum.update(loss_sum)
        self.val_tokens.update(count)

    def on_validation_epoch_end(self) -> None:
        mean = self.val_loss_sum.compute() / self.val_tokens.compute().clamp(min=1)
        self.log_dict({"val/loss": mean, "val/perplexity": torch.exp(mean)}, prog_bar=True)
        self.val_loss_sum.reset()
        self.val_tokens.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> CausalLMModule:
    return CausalLMModule(model, cfg.optimizer, cfg.scheduler)


TASK = TaskSpec(
    name="clm",
    head=lambda cfg: "causal_lm",
    build_module=build_module,
    packing=lambda cfg: "causal",
    export_class="AutoModelForCausalLM",
    description="causal LM pretraining (next-token loss, perplexity)",
)
