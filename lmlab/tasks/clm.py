"""Causal language modelling (GPT-style): next-token loss, perplexity over all validation tokens."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import SumMetric

from lmlab import optim
from lmlab.accumulation import weigh_by_tokens
from lmlab.compiling import compile_function, compile_in_place
from lmlab.fastpath import fuse_activations, lean_body, modules_callable_one_by_one
from lmlab.losses import linear_cross_entropy, split_lm_head
from lmlab.reduced_logging import log_reduced, per_token
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step


class CausalLMModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: DictConfig, scheduler: DictConfig,
                 fused_loss: bool = True):
        super().__init__()
        self.model = model
        # The loss can skip the (B, T, V) logits tensor (lmlab.losses) when the model's head is a
        # plain projection of the body's output; model.fused_loss=false turns it off.
        split = split_lm_head(model)
        self.fused_loss = fused_loss and split is not None
        # Unpadded blocks go through lmlab.fastpath's lean loop over the body's own modules when
        # the model has one (GPT-2); build_module may swap in a compiled version.
        self.lean = lean_body(split[0]) if split is not None else None
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        # Sums, not means: perplexity is exp(total loss / total tokens) over the whole split,
        # and SumMetric adds them up across processes under DDP.
        self.val_loss_sum = SumMetric()
        self.val_tokens = SumMetric()
        self.teacher: Any = None  # lmlab.distill.Teacher when distilling; not a submodule

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy and the number of predicted tokens."""
        loss_sum, count, _, _ = self._token_losses(batch)
        return loss_sum, count

    def _token_losses(self, batch: dict[str, torch.Tensor], keep_logits: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """token_losses, plus (when ``keep_logits``) the logits of the predicted positions and their mask."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        # Targets are shifted left and padded with -100 instead of cutting the last position off the
        # logits: a (B, T-1, V) slice of the logits is not contiguous, and flattening it copies the
        # largest tensor of the step (and zero-fills its gradient in backward).
        # A datamodule's own labels (a plugin's, in Hugging Face's convention: the ids, with -100 where
        # no loss is wanted, a prompt say) take the place of the ids; they were silently ignored.
        labels = batch.get("labels")
        targets = F.pad((ids if labels is None else labels)[:, 1:], (0, 1), value=-100)  # (B, T)
        if mask is not None:
            targets = targets.masked_fill(F.pad(mask[:, 1:], (0, 1), value=0) == 0, -100)
        counted = targets != -100
        picked = None
        piecewise = modules_callable_one_by_one(self)
        lean = self.lean is not None and mask is None and piecewise
        if self.fused_loss and piecewise:
            body, weight = split_lm_head(self.model)  # looked up per step: strategies may swap parameters
            # use_cache=False: in eval mode a decoder otherwise keeps every layer's keys and values, for
            # a generation that never comes (the config's default stays on, for the export's users).
            hidden = self.lean(body, ids) if lean else body(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            loss_sum = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())
            if keep_logits:  # distillation compares whole distributions: (M, V) logits it must have
                picked = hidden[counted] @ weight.t()
        else:
            loss_sum, logits = self.plain_loss(ids, mask, targets, lean)
            picked = logits[counted] if keep_logits else None
        return loss_sum, counted.sum(), picked, counted

    def plain_loss(self, ids: torch.Tensor, mask: torch.Tensor | None, targets: torch.Tensor, lean: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy through the (B, T, V) logits, and the logits; one graph for torch.compile.

        ``lean``: the body is computed by ``self.lean`` (decided by the caller, outside the graph).
        """
        if lean:
            body, weight = split_lm_head(self.model)
            logits = F.linear(self.lean(body, ids), weight)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        return loss_sum, logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss_sum, count, picked, counted = self._token_losses(batch, keep_logits=self.teacher is not None)
        loss = loss_sum / count.clamp(min=1)
        if self.teacher is not None:  # knowledge distillation on the predicted positions
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
            loss = self.teacher.loss(self, loss, picked, inputs, counted)
        log_step(self, "train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        return weigh_by_tokens(self, loss, count)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss_sum, count = self.token_losses(batch)
        self.val_loss_sum.update(loss_sum)
        self.val_tokens.update(count)

    def on_validation_epoch_end(self) -> None:
        mean = per_token(self.val_loss_sum.compute(), self.val_tokens.compute(), "val/loss and val/perplexity")
        log_reduced(self, {"val/loss": mean, "val/perplexity": torch.exp(mean)}, prog_bar=True)
        self.val_loss_sum.reset()
        self.val_tokens.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> CausalLMModule:
    fuse_activations(model)
    module = CausalLMModule(model, cfg.optimizer, cfg.scheduler, fused_loss=bool(cfg.model.get("fused_loss", True)))
    # Compile what the training step runs: with the fused loss the body (the chunked loss stays
    # eager); without it the model and the cross-entropy together, so the compiler can fuse the
    # float32 upcast and log-softmax of the (B, T, V) logits instead of writing them out.
    compiled = bool(cfg.model.get("compile", False))
    if module.fused_loss:
        compile_in_place(split_lm_head(model)[0], compiled)  # for batches the lean loop does not take
        if compiled and module.lean is not None:
            module.lean = compile_function(module.lean)
    elif compiled:
        module.plain_loss = compile_function(module.plain_loss)
    return module


TASK = TaskSpec(
    name="clm",
    head=lambda cfg: "causal_lm",
    build_module=build_module,
    packing=lambda cfg: "causal",
    export_class="AutoModelForCausalLM",
    description="causal LM pretraining (next-token loss, perplexity)",
)
