"""Masked language modelling (BERT-style), with optional whole-word masking and NSP."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torchmetrics import SumMetric

from lmlab import masking, optim, padding_masks
from lmlab.accumulation import weigh_by_tokens
from lmlab.compiling import compile_function, compile_in_place
from lmlab.fastpath import lean_body, modules_callable_one_by_one
from lmlab.checks import Number
from lmlab.errors import config_error
from lmlab.reduced_logging import log_reduced, per_token
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step

# Validation masks are seeded by each row's tokens (masking.row_seeded_draws), so val loss is
# comparable between evaluations, runs, eval batch sizes and process counts.
VAL_MASK_SEED = 1234


# How subword vocabularies mark word boundaries: WordPiece marks the pieces that continue a word
# ('##ing'); SentencePiece's Metaspace ('▁the': T5, ALBERT, XLM-R, Llama) and byte-level BPE
# ('Ġthe': GPT-2, RoBERTa) mark the pieces that start one.
MARKS_CONTINUATION = {"##": True, "▁": False, "Ġ": False}
# A marker on fewer of the ordinary pieces than this is stray text, not the vocabulary's convention:
# GPT-2's byte-level vocabulary holds '##' and '###' from Markdown headings.
MIN_MARKER_SHARE = 0.05


def word_marker(tokens: Collection[str]) -> str | None:
    """The word-boundary marker (a key of MARKS_CONTINUATION) most of ``tokens`` start with, or None
    when none of them is common enough to be the vocabulary's convention."""
    counts = {marker: sum(token.startswith(marker) for token in tokens) for marker in MARKS_CONTINUATION}
    marker = max(counts, key=counts.__getitem__)
    return marker if tokens and counts[marker] >= MIN_MARKER_SHARE * len(tokens) else None


def declared_marker(tokenizer: Any) -> str | None:
    """The marker a WordPiece model declares (its ``continuing_subword_prefix``), or None.

    The declared convention holds whatever share of the pieces carries it: a Chinese WordPiece
    vocabulary, whose ideographs are words of their own, has ## on 2% of its pieces.
    """
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    prefix = getattr(model, "continuing_subword_prefix", None) if type(model).__name__ == "WordPiece" else None
    return prefix if prefix in MARKS_CONTINUATION else None


def continuation_table(tokenizer: Any) -> torch.Tensor:
    """Bool per vocabulary id: True for pieces that continue a word, False for pieces that start
    one and for special tokens. Raises a config error when the vocabulary marks no word boundaries.
    """
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    ordinary = {token: index for token, index in vocab.items() if token not in special}
    marker = declared_marker(tokenizer) or word_marker(ordinary.keys())
    if marker is None:
        # Without a convention every piece would count as a continuation, so a row would hold a few
        # "words" and be masked whole or not at all; that must not pass for whole-word masking.
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise config_error(
            "task.whole_word_mask", f"the tokenizer ({name}) marks no word boundaries: fewer than "
            f"{MIN_MARKER_SHARE:.0%} of its pieces start with '##' (WordPiece), '▁' (SentencePiece) or 'Ġ' "
            "(byte-level BPE), so its words cannot be told apart",
            "Set task.whole_word_mask=false (token masking; the same thing for a tokenizer whose tokens are "
            "whole words), or use a tokenizer with one of these conventions (tokenizer=wordpiece).")
    table = torch.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=torch.bool)
    for token, index in ordinary.items():
        marked = token.startswith(marker)
        table[index] = marked if MARKS_CONTINUATION[marker] else not marked
    return table


class MaskedLMModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, tokenizer: Any, task: DictConfig, optimizer: DictConfig,
                 scheduler: DictConfig, seed: int = 0):
        super().__init__()
        self.model = model
        self.task_cfg, self.optimizer_cfg, self.scheduler_cfg = task, optimizer, scheduler
        self.nsp = bool(task.nsp)
        # BERT's heads can be run on the masked positions alone (see _logits); other models as they are.
        self.sparse_head = (getattr(getattr(model, "config", None), "model_type", None) == "bert"
                            and hasattr(model, "bert") and hasattr(model, "cls"))
        # Packed blocks (no attention mask, one segment) go through lmlab.fastpath's lean loop over
        # the encoder's own modules; build_module may swap in a compiled version.
        self.lean = lean_body(model.bert) if self.sparse_head else None
        self.mask_token_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.register_buffer("special_ids", torch.tensor(sorted(set(tokenizer.all_special_ids))), persistent=False)
        # What a random replacement is drawn from: every id but the special ones (masking.mask_tokens).
        ordinary = torch.ones(self.vocab_size, dtype=torch.bool)
        ordinary[self.special_ids[self.special_ids < self.vocab_size]] = False
        self.register_buffer("replacement_ids", ordinary.nonzero().flatten(), persistent=False)
        # Training masks: a generator seeded per process and step (_training_generator), not torch's
        # default one, which every DDP process seeds alike.
        self.mask_seed = int(seed)
        self._mask_generator: torch.Generator | None = None
        # Only whole-word masking reads word boundaries, so only it refuses a tokenizer without them.
        self.register_buffer("continuation", continuation_table(tokenizer) if task.whole_word_mask else None,
                             persistent=False)
        self.val_sums = torch.nn.ModuleDict({k: SumMetric() for k in ("loss", "tokens", "correct", "nsp_correct", "pairs")})
        self.teacher: Any = None  # lmlab.distill.Teacher when distilling; not a submodule

    def _fixed_rows(self, ids: torch.Tensor) -> int | None:
        """How many rows the head reads (masking.chosen_rows), or None for exactly the chosen ones."""
        if self.teacher is not None:  # the teacher's logits are picked by the mask (lmlab.distill)
            return None
        wanted = self.task_cfg.get("fixed_size_gather", "auto")
        if wanted == "auto":
            wanted = ids.device.type != "cpu"  # a CPU does not wait on itself, and padding rows cost it
        if not wanted:
            return None
        return masking.fixed_row_count(ids.numel(), float(self.task_cfg.mlm_probability),
                                       bool(self.task_cfg.whole_word_mask))

    def _mask(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None,
              max_chosen: int | None = None, draws: masking.Draws | None = None):
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special_ids)
        if "attention_mask" in batch:
            special |= batch["attention_mask"] == 0
        starts = masking.word_starts(ids, self.continuation, special) if self.task_cfg.whole_word_mask else None
        return masking.mask_tokens(
            ids, special, mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
            mlm_probability=float(self.task_cfg.mlm_probability),
            mask_replace_prob=float(self.task_cfg.mask_replace_prob),
            random_replace_prob=float(self.task_cfg.random_replace_prob), starts=starts, generator=generator,
            max_chosen=max_chosen, draws=draws, replacement_ids=self.replacement_ids,
        )

    def _training_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator of this training step's masks, seeded by (seed, global rank, micro-batch
        index) (masking.step_seed): every DDP process masks its rows with draws of its own, and a
        resumed run (Lightning restores the batch count) draws the masks the interrupted one would
        have. None outside a Trainer: torch's default generator then."""
        trainer = self._trainer
        if trainer is None:
            return None
        if self._mask_generator is None or self._mask_generator.device != torch.device(device):
            self._mask_generator = torch.Generator(device=device)
        step = trainer.fit_loop.epoch_loop.total_batch_idx  # micro-batches so far, over all epochs
        # On a GPU manual_seed sets the Philox seed and offset on the host: no kernel, no sync.
        self._mask_generator.manual_seed(masking.step_seed(self.mask_seed, trainer.global_rank, step))
        return self._mask_generator

    def _forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                 draws: masking.Draws | None = None):
        rows = self._fixed_rows(batch["input_ids"])
        inputs, labels = self._mask(batch, generator, rows, draws)
        chosen = labels != masking.IGNORE_INDEX
        if rows is None:
            def pick(x: torch.Tensor) -> torch.Tensor:
                return x[chosen]
        else:
            index = masking.chosen_rows(chosen, rows)

            def pick(x: torch.Tensor) -> torch.Tensor:  # index_select: its backward is an index_add
                return x.flatten(0, 1).index_select(0, index)
        picked, nsp_logits = self._logits(inputs, batch, pick)
        picked = picked.float()  # (M, V): the loss is only over masked positions
        gold = pick(labels)  # IGNORE_INDEX on chosen_rows' padding rows: the loss and accuracy skip them
        mlm_sum = F.cross_entropy(picked, gold, reduction="sum", ignore_index=masking.IGNORE_INDEX)
        result = {"mlm_sum": mlm_sum, "count": chosen.sum(), "correct": (picked.argmax(-1) == gold).sum(),
                  "picked": picked, "inputs": inputs, "chosen": chosen}  # the last three for distillation
        if self.nsp:
            nsp_logits = nsp_logits.float()
            nsp_gold = batch["next_sentence_label"]
            result["nsp_loss"] = F.cross_entropy(nsp_logits, nsp_gold)
            result["nsp_correct"] = (nsp_logits.argmax(-1) == nsp_gold).sum()
            # Filled on the device: torch.tensor(n, device=...) copies from the host, which waits for the GPU.
            result["pairs"] = torch.full((), len(nsp_gold), device=nsp_gold.device)
        return result

    def _logits(self, inputs: torch.Tensor, batch: dict[str, torch.Tensor],
                pick: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vocabulary logits at the rows ``pick`` takes from (B, T, ...) (M, V), and the NSP logits (B, 2) or None."""
        kwargs = {"input_ids": inputs, "attention_mask": padding_masks.for_model(self.model, batch.get("attention_mask")),
                  "token_type_ids": batch.get("token_type_ids")}
        if self.sparse_head:
            # The prediction head works position by position, so it only needs the ~15% chosen
            # positions: the (B, T, V) logits and most of the vocabulary projection are skipped.
            if (self.lean is not None and not self.nsp and kwargs["attention_mask"] is None
                    and kwargs["token_type_ids"] is None and modules_callable_one_by_one(self)):
                return self.model.cls(pick(self.lean(self.model.bert, inputs))), None
            body = self.model.bert(**kwargs)
            picked = pick(body.last_hidden_state)  # (M, D)
            if self.nsp:
                return self.model.cls.predictions(picked), self.model.cls.seq_relationship(body.pooler_output)
            return self.model.cls(picked), None
        out = self.model(**kwargs)
        if self.nsp:
            return pick(out.prediction_logits), out.seq_relationship_logits
        return pick(out.logits), None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r = self._forward(batch, self._training_generator(batch["input_ids"].device))
        loss = r["mlm_sum"] / r["count"].clamp(min=1)
        log_step(self, "train/mlm_loss", loss, sync_dist=True)  # over processes, as train/loss
        if self.teacher is not None:  # knowledge distillation on the masked positions (NSP keeps its labels)
            inputs = {**batch, "input_ids": r["inputs"]}  # the teacher reads what the student read
            loss = self.teacher.loss(self, loss, r["picked"], inputs, r["chosen"])
        if self.nsp:
            log_step(self, "train/nsp_loss", r["nsp_loss"], sync_dist=True)
            loss = loss + r["nsp_loss"]
        log_step(self, "train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over processes
        # With NSP the two terms count different things (masked tokens, pairs): each micro-batch's
        # sum of the two means weighs the same (lmlab.accumulation).
        return loss if self.nsp else weigh_by_tokens(self, loss, r["count"])

    def validation_draws(self, ids: torch.Tensor) -> masking.Draws:
        """Validation's masks for ``ids`` (B, T), seeded by each row's tokens; the token draws index
        ``replacement_ids``, as mask_tokens reads them."""
        return masking.row_seeded_draws(ids, len(self.replacement_ids), VAL_MASK_SEED)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r = self._forward(batch, draws=self.validation_draws(batch["input_ids"]))
        self.val_sums["loss"].update(r["mlm_sum"])
        self.val_sums["tokens"].update(r["count"])
        self.val_sums["correct"].update(r["correct"])
        if self.nsp:
            self.val_sums["nsp_correct"].update(r["nsp_correct"])
            self.val_sums["pairs"].update(r["pairs"])

    def on_validation_epoch_end(self) -> None:
        tokens = self.val_sums["tokens"].compute()
        mean = per_token(self.val_sums["loss"].compute(), tokens, "val/loss, val/perplexity and val/masked_accuracy")
        metrics = {"val/loss": mean, "val/perplexity": torch.exp(mean),
                   "val/masked_accuracy": per_token(self.val_sums["correct"].compute(), tokens, None)}
        if self.nsp:
            metrics["val/nsp_accuracy"] = self.val_sums["nsp_correct"].compute() / self.val_sums["pairs"].compute().clamp(min=1)
        log_reduced(self, metrics, prog_bar=True)
        for metric in self.val_sums.values():
            metric.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        return optim.build(self.model, self.optimizer_cfg, self.scheduler_cfg, self.trainer.estimated_stepping_batches)


# Types only: masking.check_probabilities judges the values, alone and together.
PROBABILITIES = (
    Number("task.mlm_probability", False, "0.15"),
    Number("task.mask_replace_prob", False, "0.8"),
    Number("task.random_replace_prob", False, "0.1"),
)


def validate(cfg: DictConfig) -> None:
    for number in PROBABILITIES:  # a word where a number belongs: float() would raise a ValueError
        number.check(cfg)
    fault = masking.check_probabilities(
        float(cfg.task.mlm_probability), float(cfg.task.mask_replace_prob), float(cfg.task.random_replace_prob)
    )
    if fault:
        key, problem = fault
        raise config_error(key, problem, "Fix the value on the command line or in conf/task/mlm.yaml.")
    gather = cfg.task.get("fixed_size_gather", "auto")
    if gather not in ("auto", True, False):
        raise config_error("task.fixed_size_gather", f"{gather!r} must be auto, true or false (see conf/task/mlm.yaml)",
                           "Fix the value on the command line.")


def build_module(cfg: DictConfig, model: torch.nn.Module, tokenizer: Any) -> MaskedLMModule:
    if tokenizer.mask_token_id is None:
        if cfg.model.get("pretrained"):
            raise config_error("model.pretrained", f"the tokenizer of {cfg.model.pretrained} has no [MASK] token, "
                               "which task=mlm needs", "Start from a model whose tokenizer has one (a BERT), "
                               "or train one from scratch with tokenizer=wordpiece.")
        raise config_error("tokenizer", "the tokenizer has no [MASK] token, which task=mlm needs",
                           "Use tokenizer=wordpiece.")
    module = MaskedLMModule(model, tokenizer, cfg.task, cfg.optimizer, cfg.scheduler, seed=int(cfg.get("seed", 0)))
    compiled = bool(cfg.model.get("compile", False))
    if module.sparse_head:
        # The step calls the encoder and the head, never the model's own forward: compile those.
        # The gather of the chosen positions stays eager between them (on a GPU its size is fixed:
        # masking.chosen_rows).
        compile_in_place(model.bert, compiled)
        compile_in_place(model.cls, compiled)
        if compiled and module.lean is not None:
            module.lean = compile_function(module.lean)
    else:
        compile_in_place(model, compiled)
    return module


TASK = TaskSpec(
    name="mlm",
    head=lambda cfg: "pretraining" if cfg.task.nsp else "masked_lm",
    build_module=build_module,
    packing=lambda cfg: "sentence_pairs" if cfg.task.nsp else "masked",
    validate=validate,
    export_class="AutoModelForMaskedLM",
    description="masked LM pretraining (15% dynamic masking 80/10/10, whole-word, NSP)",
)
