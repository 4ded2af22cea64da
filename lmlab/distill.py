"""Knowledge distillation: a student learns from a trained teacher's logits as well as the labels.

``distill.teacher=RUN`` (an lmlab run directory, its MLflow run id, or a Hugging Face model
directory, as for ``model.pretrained``) turns it on for classification, NER, CLM and MLM. The
student is built from ``model.*`` as usual; without ``model.pretrained`` it takes the teacher's
tokenizer, because both read the same token ids. Every training step the loss becomes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * hard loss

averaged over the positions that count: every example for classification, the labelled subwords
for NER, the predicted tokens for CLM, the masked tokens for MLM (Hinton et al., 2015; the T^2
keeps the soft term's gradients on the hard term's scale whatever T is). Validation and test score
the student alone, with the task's usual loss and metrics; after the test the teacher is scored
on the same split once, so MLflow shows what the smaller model costs (``teacher/test/...``).

The teacher is frozen, in eval mode, and held by a plain object rather than registered as a
submodule: its weights never reach the optimizer, the checkpoints or the export (nor DDP's wrapper,
so nothing of it is all-reduced). It follows the student's device at the first step, and it is held
in float32 whatever dtype its files were saved in (transformers 5 loads a model in its saved dtype,
4.x in float32), so mixed precision autocasts it like the student; a ``bf16-true`` / ``16-true`` /
``64-true`` run holds it in that dtype instead, as Lightning holds the student.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from lmlab import pretrained
from lmlab.checks import Number
from lmlab.errors import config_error
from lmlab.losses import split_lm_head
from lmlab.precision import precision_name
from lmlab.specs import TaskSpec
from lmlab.step_logging import log_step
from lmlab.tokenization import load_pretrained

log = logging.getLogger("lmlab")

KEY = "distill.teacher"
ALPHA = Number("distill.alpha", False, "0.5 (the teacher's weight; the labels get 1 - alpha)", low=0, high=1)
# The Hugging Face classes (by name ending) whose logits each task can learn from.
TEACHER_HEADS = {
    "classification": ("ForSequenceClassification",),
    "ner": ("ForTokenClassification",),
    "clm": ("ForCausalLM", "LMHeadModel"),
    "mlm": ("ForMaskedLM", "ForPreTraining"),
}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Tasks whose logits are over labels; the others' are over the tokenizer's vocabulary.
LABEL_TASKS = ("classification", "ner")
# What a language-modelling task's teacher must be: a model that scores every vocabulary token.
VOCABULARY_TEACHERS = {
    "clm": "a causal language model (*ForCausalLM / *LMHeadModel), e.g. an lmlab task=clm run",
    "mlm": "a masked language model (*ForMaskedLM, or BertForPreTraining; of ELECTRA, the generator "
           "ElectraForMaskedLM, not the discriminator), e.g. an lmlab task=mlm run",
}
# trainer.precision values that hold the whole model in another dtype (Lightning converts the student).
TRUE_PRECISION_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), summed over classes, averaged over rows.

    ``student`` and ``teacher`` are (N, C) logits of the N positions that count; zero for N = 0.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if student.shape[0] == 0:
        return student.sum() * 0.0  # keeps the graph (and the dtype) of an empty batch
    t = float(temperature)
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="sum", log_target=True)
    return kl / student.shape[0] * t * t


def combine(hard: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """The training loss: alpha on the distillation term, 1 - alpha on the labels."""
    return alpha * kd + (1.0 - alpha) * hard


def logits_at(model: torch.nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor | None) -> torch.Tensor:
    """Logits of ``model`` at the True entries of ``positions`` (B, T), or of every row when None.

    LM heads are applied to the chosen positions only, where the model allows it, so the
    (batch x tokens x vocabulary) tensor is not built just to pick a few rows out of it.
    """
    if positions is not None:
        parts = split_lm_head(model)
        if parts is not None:  # GPT-2: body, then a bias-free projection
            body, weight = parts
            return body(**inputs)[0][positions] @ weight.t()
        head = getattr(getattr(model, "cls", None), "predictions", None)
        if head is not None and getattr(model.config, "model_type", None) == "bert":  # BERT's MLM heads
            return head(model.bert(**inputs).last_hidden_state[positions])
    out = model(**inputs)
    logits = out.logits if "logits" in out else out.prediction_logits
    return logits if positions is None else logits[positions]


class Teacher:
    """A frozen teacher and the distillation settings; a LightningModule holds it as ``.teacher``.

    A plain object, not an ``nn.Module``: assigning it to a LightningModule registers nothing, so
    the teacher stays out of ``state_dict()``, ``parameters()``, checkpoints and exports. Lightning
    does not move it either: ``logits`` follows the student's device.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, source: str, temperature: float, alpha: float,
                 directory: str = ""):
        self.model = model.eval().requires_grad_(False)
        # A decoder in eval mode keeps every layer's keys and values for a generation that never
        # comes: a 12-layer, 768-wide GPT-2 teacher peaked 1.2 GB higher on a 16 x 1024 batch (CPU).
        if getattr(model.config, "use_cache", False):
            model.config.use_cache = False
        # source names the teacher in params and logs: its directory, or the MLflow run id given.
        self.tokenizer, self.source = tokenizer, source
        self.directory = directory  # where it was loaded from (a local directory, or a hub name)
        self.temperature, self.alpha = float(temperature), float(alpha)
        # LM tasks: the token ids both models read (attach sets it); None compares every class.
        self.vocabulary: int | None = None
        # Label tasks: the teacher's column of each of the student's labels, when the teacher orders
        # the same labels otherwise (check_compatible sets it); None: the same order.
        self.label_order: list[int] | None = None

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def logits(self, inputs: dict[str, Any], positions: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS and v is not None}
        device = kwargs["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        self.model.eval()  # Lightning's test of the teacher (score) may leave it in train mode
        logits = logits_at(self.model, kwargs, positions)
        if self.label_order is not None:
            logits = logits[..., torch.tensor(self.label_order, device=logits.device)]
        return logits

    def loss(self, module: Any, hard: torch.Tensor, student: torch.Tensor, inputs: dict[str, Any],
             positions: torch.Tensor | None = None) -> torch.Tensor:
        """The distillation training loss for ``module``'s step; logs its two parts.

        ``student`` holds the student's logits at ``positions`` (or of every row), ``inputs`` what
        the student read (after masking, for MLM), ``hard`` the task's own loss on the labels.
        """
        teacher = self.logits(inputs, positions)
        if self.vocabulary is not None:
            # Output rows past the tokenizer's ids (model.vocab_multiple's padding, or a teacher saved
            # with a rounded-up vocabulary) are never inputs nor targets: the two distributions are
            # compared over the real tokens, whatever padding each model has.
            student, teacher = student[:, :self.vocabulary], teacher[:, :self.vocabulary]
        kd = kd_loss(student, teacher, self.temperature)
        # Logged as train/loss is (lmlab.step_logging): on the written steps only, as the mean over an
        # optimizer step's micro-batches, so alpha * kd + (1 - alpha) * hard is the logged train/loss
        # under gradient accumulation too, and DDP all-reduces them only when they are written.
        log_step(module, "train/kd_loss", kd, sync_dist=True)
        log_step(module, "train/hard_loss", hard, sync_dist=True)
        return combine(hard, kd, self.alpha)


# -- set-up, from the config --------------------------------------------------------------------------
def prepare(cfg: DictConfig, task: TaskSpec, mode: str = "fit") -> Teacher | None:
    """The teacher of ``distill.teacher`` (None when unset or not training), loaded before any data.

    Checks what can be checked without the data: the settings, the task, that the teacher has a
    trained head for it and reaches as far as the data's sequences.
    """
    settings = cfg.get("distill") or {}
    ref = pretrained.reference(cfg, KEY)  # an empty distill.teacher= is an error, not "no teacher"
    if ref is None or mode != "fit":
        return None
    temperature, alpha = settings.get("temperature", 2.0), settings.get("alpha", 0.5)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not (
            math.isfinite(temperature) and temperature > 0):
        raise config_error("distill.temperature", f"'{temperature}' is not a positive number",
                           "Use a temperature above 0, e.g. distill.temperature=2.")
    ALPHA.check(cfg)
    if task.name not in TEACHER_HEADS:
        raise config_error(KEY, f"distillation is not supported for task={task.name}",
                           f"It works for task={', '.join(TEACHER_HEADS)}; unset distill.teacher for this task.")
    if task.name == "classification" and cfg.task.get("multi_label"):
        raise config_error(KEY, "distillation is not supported with task.multi_label=true",
                           "Distil a single-label classifier, or unset distill.teacher.")
    source = pretrained.resolve(ref, cfg, key=KEY)
    model = load_teacher(source, task.name).to(teacher_dtype(cfg))
    positions = next((getattr(model.config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(model.config, k, None), int)), None)
    needed = max(int(cfg.data.get("block_size") or 0), int(cfg.data.get("max_length") or 0))
    if positions is not None and needed > positions:
        raise config_error(KEY, f"the teacher attends to {positions} positions and the data feeds {needed}",
                           f"Lower data.block_size / data.max_length to at most {positions}.")
    tokenizer = load_pretrained(source, key=KEY)
    teacher = Teacher(model, tokenizer, pretrained.recorded_name(ref, source), float(temperature), float(alpha),
                      directory=source)
    where = source if teacher.source == source else f"{teacher.source}, read from {source}"
    log.info("Distilling from %s (%s, %.2fM parameters), T=%g, alpha=%g", where, type(model).__name__,
             teacher.n_parameters / 1e6, teacher.temperature, teacher.alpha)
    return teacher


def teacher_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype the teacher is held in: the run's for the ``*-true`` precisions, else float32.

    Mixed precision autocasts the teacher's forward as it does the student's, from float32 weights.
    """
    precision = precision_name((cfg.get("trainer") or {}).get("precision"))
    return TRUE_PRECISION_DTYPES.get(str(precision), torch.float32)


def load_teacher(source: str, task_name: str) -> torch.nn.Module:
    """The teacher with the head it was trained with; an error unless that head suits the task."""
    import transformers

    config = pretrained._auto_config(source, False, key=KEY)
    wanted = TEACHER_HEADS[task_name]
    trained = [a for a in (getattr(config, "architectures", None) or []) if a.endswith(wanted)]
    model_class = getattr(transformers, trained[0], None) if trained else None
    if model_class is None:
        have = ", ".join(getattr(config, "architectures", None) or []) or "a bare model"
        raise config_error(KEY, f"'{source}' is {have}, with no trained *{'/*'.join(wanted)} head for "
                           f"task={task_name} to learn from",
                           f"Train the teacher on this task first (lmlab task={task_name} ...) and pass that run.")
    try:
        model = model_class.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise config_error(KEY, f"cannot load the teacher '{source}' ({' '.join(str(exc).split())[:300]})",
                           "Point it at a model written by save_pretrained (an lmlab run's export/).") from exc
    if task_name in VOCABULARY_TEACHERS:
        check_vocabulary_logits(model, source, task_name)
    return model


def check_vocabulary_logits(model: torch.nn.Module, source: str, task_name: str) -> None:
    """The teacher of a language-modelling task scores every token of its vocabulary at each position.

    Its class name does not tell: ``*ForPreTraining`` is BERT's masked-LM heads, and also ELECTRA's
    replaced-token detector, whose logits are one score per position (original or replaced), which
    fails only at the first training step, on a shape. So the teacher reads a two-token input on the
    CPU, through the code that reads its logits in training, and its logits must be
    (1, 2, config.vocab_size).
    """
    vocabulary = int(model.config.vocab_size)
    ids = torch.zeros((1, 2), dtype=torch.long, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            logits = logits_at(model.eval(), {"input_ids": ids}, None)
    except Exception as exc:  # whatever breaks here would break the first training step
        raise config_error(KEY, f"the teacher '{source}' ({type(model).__name__}) fails on a two-token input "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})",
                           f"For task={task_name} pass {VOCABULARY_TEACHERS[task_name]}.") from exc
    if logits.dim() != 3 or logits.shape[-1] != vocabulary:
        raise config_error(KEY, f"the teacher '{source}' is {type(model).__name__}, whose logits for a two-token "
                           f"input have shape {tuple(logits.shape)}, not (1, 2, {vocabulary}): one score per token "
                           f"of its {vocabulary}-token vocabulary at each position, which task={task_name}'s student "
                           "learns from",
                           f"Pass {VOCABULARY_TEACHERS[task_name]}.")


def check_compatible(teacher: Teacher, student: torch.nn.Module, tokenizer: Any, task_name: str) -> None:
    """Same token ids, and the same labels or rows for every token: otherwise the logits cannot be compared."""
    if tokenizer is not teacher.tokenizer and tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise config_error(KEY, f"the teacher's tokenizer ({len(teacher.tokenizer)} tokens) differs from the "
                           f"student's ({len(tokenizer)} tokens), so they read different token ids",
                           "Leave model.pretrained and tokenizer.path unset (the student then takes the teacher's "
                           "tokenizer) or pick a teacher trained with the student's tokenizer.")
    t_cfg, s_cfg = teacher.model.config, student.config
    if task_name in LABEL_TASKS:
        t_labels, s_labels = _labels(t_cfg), _labels(s_cfg)
        if sorted(t_labels) != sorted(s_labels) or len(set(t_labels)) != len(t_labels):
            raise config_error(KEY, f"the teacher predicts the labels {t_labels} and the data has {s_labels}",
                               "Distil on data with the teacher's label set (labels come from the training split).")
        if t_labels != s_labels:  # a student with its own label ids (model.pretrained): the teacher's follow them
            teacher.label_order = [t_labels.index(label) for label in s_labels]
            log.info("The teacher orders the labels %s, the student %s: the teacher's logits are reordered to "
                     "the student's", t_labels, s_labels)
    else:
        # Same tokenizer, so the first len(tokenizer) output rows of both models mean the same tokens;
        # rows past those (padding) are left out of the comparison (Teacher.loss). Requiring equal
        # vocab_size refused every teacher whose vocabulary is not a multiple of the student's
        # model.vocab_multiple (GPT-2's 50,257, BERT's 30,522). Slicing, rather than building the
        # student with the teacher's vocab_size, keeps the student's rows aligned for the GPU and
        # also takes a teacher padded to another multiple.
        for who, rows in (("teacher", t_cfg.vocab_size), ("student", s_cfg.vocab_size)):
            if rows < len(tokenizer):
                raise config_error(KEY, f"the {who}'s output layer has {rows} rows (config.vocab_size), fewer than "
                                   f"the {len(tokenizer)} tokens of the tokenizer both read",
                                   "Use a model whose config.vocab_size covers its tokenizer "
                                   "(resize_token_embeddings, then save_pretrained).")


def _labels(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(int(config.num_labels))]


def attach(teacher: Teacher | None, module: Any, tokenizer: Any, task_name: str) -> None:
    """Makes ``module``'s training step distil from ``teacher`` (nothing when it is None)."""
    if teacher is None:
        return
    check_compatible(teacher, module.model, tokenizer, task_name)
    if task_name == "classification":
        pad_like_the_student(teacher.model, tokenizer)
    teacher.vocabulary = None if task_name in LABEL_TASKS else len(tokenizer)
    module.teacher = teacher


def pad_like_the_student(model: torch.nn.Module, tokenizer: Any) -> None:
    """Makes a sequence-classification teacher recognise the padding the student's batches carry.

    A decoder classifier (GPT-2) pools the last token that is not ``config.pad_token_id``. A teacher
    saved without one (Hugging Face's GPT-2 ships none) refused every batch of more than one row at
    the first training step; one saved with another id than the tokenizer pads with pooled a
    padding position of every shorter row, and the student learnt from those logits.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    current = getattr(model.config, "pad_token_id", None)
    if pad is None or current == pad:
        return
    if current is not None:
        log.warning("The teacher's config.pad_token_id is %s, but the batches are padded with %s (the tokenizer's "
                    "pad token): the teacher reads %s as padding instead", current, pad, pad)
    model.config.pad_token_id = int(pad)


def params(module: Any) -> dict[str, Any]:
    """MLflow params of a distillation run: where the teacher came from and both sizes."""
    teacher = getattr(module, "teacher", None)
    if teacher is None:
        return {}
    return {"distill/teacher_source": teacher.source, "distill/teacher_params": teacher.n_parameters,
            "distill/student_params": sum(p.numel() for p in module.model.parameters())}


def score_teacher(cfg: DictConfig, task: TaskSpec, module: Any, trainer: Any, dm: Any) -> dict[str, float]:
    """The teacher's metrics on the split the student was last scored on, as ``teacher/<metric>``.

    Test split when the data has one, validation otherwise. Runs with the run's own trainer, its
    loggers detached so the teacher's numbers do not land on the student's metric names.
    """
    teacher = getattr(module, "teacher", None)
    if teacher is None:
        return {}
    scoring_cfg, model = scoring_view(cfg, task.name, teacher.model)
    if teacher.label_order is not None:
        model = LabelOrderView(model, teacher.label_order, module.model.config)
    scored = task.build_module(scoring_cfg, model, teacher.tokenizer)
    loggers = trainer.loggers
    trainer.loggers = []
    try:
        if getattr(dm, "has_test", False):
            out = trainer.test(scored, datamodule=dm, verbose=False)[0]
        else:
            out = trainer.validate(scored, datamodule=dm, verbose=False)[0]
    finally:
        trainer.loggers = loggers
        teacher.model.eval().requires_grad_(False)
    metrics = {f"teacher/{k}": float(v) for k, v in out.items()}
    metrics["distill/teacher_params"] = float(teacher.n_parameters)
    metrics["distill/student_params"] = float(sum(p.numel() for p in module.model.parameters()))
    return metrics


class MaskedLMView(torch.nn.Module):
    """A ``*ForPreTraining`` teacher as a masked LM: its forward returns the vocabulary logits as ``.logits``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # what MaskedLMModule and padding_masks read the model type from

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import MaskedLMOutput

        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return MaskedLMOutput(logits=logits_at(self.model, {k: v for k, v in inputs.items() if v is not None}, None))


class LabelOrderView(torch.nn.Module):
    """A classification or NER teacher whose logits and label names follow the student's label ids,
    so that the task's module scores it against the data's labels as it scores the student."""

    def __init__(self, model: torch.nn.Module, order: list[int], student_config: Any):
        super().__init__()
        self.model = model
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.config = copy.deepcopy(model.config)
        self.config.id2label = dict(student_config.id2label)
        self.config.label2id = dict(student_config.label2id)

    def forward(self, **inputs: Any) -> Any:
        out = self.model(**inputs)
        out.logits = out.logits[..., self.order.to(out.logits.device)]
        return out


def scoring_view(cfg: DictConfig, task_name: str, model: torch.nn.Module) -> tuple[DictConfig, torch.nn.Module]:
    """The config and model with which the task's own module scores the teacher on the student's data.

    Only MLM needs one: its module takes its head from ``task.nsp``, which describes the student. A
    teacher without BERT's next-sentence head is scored without NSP (it had no ``cls.seq_relationship``
    to call), and a ``*ForPreTraining`` teacher scored without NSP goes through MaskedLMView (BERT's
    pre-training head also wants the pooled output, and its logits are ``prediction_logits``). Both
    raised after the student had been trained and exported, failing the run.
    """
    if task_name != "mlm":
        return cfg, model
    wanted = bool(cfg.task.get("nsp"))
    nsp = wanted and hasattr(getattr(model, "cls", None), "seq_relationship")
    if nsp != wanted:
        cfg = OmegaConf.merge(cfg, {"task": {"nsp": False}})
    if not nsp and type(model).__name__.endswith("ForPreTraining"):
        model = MaskedLMView(model)
    return cfg, model
