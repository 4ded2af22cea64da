"""Early type and range checks of the numbers runs read (seed, sizes, steps, learning rate, vocabulary),
and of the true/false switches (model.compile, export, ...).

These keys are consumed deep inside datamodules, the DataLoader, Lightning and the optimizer, where
a string or a negative value surfaces as a TypeError or ValueError far from its cause. Checked
before any data is read, the error names the key. Task-specific keys are the task's ``validate``.
"""

from __future__ import annotations

import codecs
import math
import typing
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from lmlab.errors import config_error
from lmlab.optim import check_schedule_name
from lmlab.precision import precision_name
from lmlab.pretrained import REFERENCE_KEYS, reference
from lmlab.resolvers import REQUIRED

_ABSENT = object()


@dataclass(frozen=True)
class Number:
    key: str
    whole: bool  # an int; otherwise any real number
    example: str
    low: float | None = None
    high: float | None = None
    positive: bool = False  # strictly above zero
    nullable: bool = False
    required: bool = False  # every config has it: a plugin's own data file may not leave it out

    def check(self, cfg: DictConfig) -> None:
        value = OmegaConf.select(cfg, self.key, default=_ABSENT)
        if value is _ABSENT and self.required:
            leaf = self.key.rpartition(".")[2]
            raise config_error(self.key, "is not set, and every run reads it",
                               f"Add '{leaf}: {self.example}' to the config file that sets the rest of "
                               f"'{self.key.rpartition('.')[0]}', or +{self.key}={self.example} to the command line.")
        if value is _ABSENT or (value is None and self.nullable):
            return
        kinds = (int,) if self.whole else (int, float)
        if value is None:  # "'None' is not a number" would read as if the text None had been typed
            problem = "it is null, and nothing stands in for it"
        elif isinstance(value, bool) or not isinstance(value, kinds):
            problem = f"'{value}' is not {'a whole number' if self.whole else 'a number'}"
        elif not math.isfinite(value):  # nan passes every range check below: no comparison with it holds
            problem = f"'{value}' is not a finite number"
        elif self.positive and value <= 0:
            problem = f"{value} is not positive"
        elif self.low is not None and value < self.low:
            problem = f"{value} is below {_bound(self.low)}"
        elif self.high is not None and value > self.high:
            problem = f"{value} is above {_bound(self.high)}"
        else:
            return
        raise config_error(self.key, problem, f"Use e.g. {self.key}={self.example}.")


def _bound(limit: float) -> str:
    # :g would print the seed's 4294967295 as 4.29497e+09, a bound nobody can type back
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


NUMBERS = (
    # seed_everything hands it to numpy, which takes 0 to 2**32 - 1 only (a ValueError traceback otherwise).
    Number("seed", True, "42", low=0, high=2**32 - 1),
    Number("data.batch_size", True, "16", positive=True, required=True),
    Number("data.eval_batch_size", True, "32", positive=True, nullable=True),
    Number("data.block_size", True, "128", positive=True, nullable=True),
    Number("data.max_length", True, "128", positive=True, nullable=True),
    Number("data.max_documents", True, "1000", positive=True, nullable=True),
    # PyTorch only warns past the cores, and 10**12 hung the run. 1024 is far past any node's
    # loader needs and still refuses such a slip.
    Number("data.num_workers", True, "2", low=0, nullable=True, high=1024),
    Number("data.num_proc", True, "4", positive=True, nullable=True),
    Number("data.split_seed", True, "0", low=0, nullable=True),  # numpy's SeedSequence: non-negative
    Number("data.val_fraction", False, "0.05", low=0, high=1, nullable=True),
    Number("data.test_fraction", False, "0.1", low=0, high=1, nullable=True),
    # summarization's lengths have no default: null is an int(None) TypeError once the data is read
    Number("data.max_source_length", True, "512", positive=True),
    Number("data.max_target_length", True, "48", positive=True),
    # CoNLL columns have no default: null is an int(None) TypeError at the first file read
    Number("data.token_column", True, "0 (negative: from the end)"),
    Number("data.tag_column", True, "-1 (negative: from the end)"),
    # Packed blocks store ids as int32 past 65,536 tokens; the tokenizers trainer aborts the process
    # (no Python exception) on a size past its own integers, as 10**12 did.
    Number("tokenizer.vocab_size", True, "8000", positive=True, high=2**31 - 1),
    Number("tokenizer.min_frequency", True, "2", low=0),
    Number("checkpoint.save_top_k", True, "1 (-1: keep all)", low=-1),
    Number("task.generate_val_batches", True, "2 (0: loss only)", low=0),
    Number("trainer.max_steps", True, "1000 (-1: no limit)", low=-1),  # Lightning has no null for it
    Number("trainer.max_epochs", True, "3 (-1: no limit)", low=-1, nullable=True),
    Number("trainer.accumulate_grad_batches", True, "4", positive=True),  # Lightning has no null for it
    # Lightning clips only above 0, so a negative value would quietly mean "no clipping".
    Number("trainer.gradient_clip_val", False, "1.0 (0 or null: no clipping)", low=0, nullable=True),
    # 0 is not "every step": Lightning then logs no train/* metric at all, without a word.
    Number("trainer.log_every_n_steps", True, "10", positive=True, nullable=True),
    Number("optimizer.lr", False, "3e-4", positive=True),
    Number("optimizer.weight_decay", False, "0.01", low=0, nullable=True),
    Number("scheduler.warmup_ratio", False, "0.05", low=0, high=1, nullable=True),
    Number("scheduler.warmup_steps", True, "100", low=0, nullable=True),
    Number("scheduler.min_lr_ratio", False, "0.1", low=0, high=1, nullable=True),
    Number("faults.check_every_n_steps", True, "10", positive=True, nullable=True),
    # Rows past the vocabulary only cost memory: the matrix-multiply speed-up needs 64 to 128 at most,
    # while 10**9 asked for gigabytes of embedding rows and died out of memory.
    Number("model.vocab_multiple", True, "64", positive=True, nullable=True, high=4096),
    Number("optimizer.eps", False, "1e-8", low=0),
    Number("trainer.num_nodes", True, "2", positive=True, nullable=True),
    # 0 is a modulo by zero inside Lightning's loop, after the data work; a string a TypeError there.
    Number("trainer.check_val_every_n_epoch", True, "1", positive=True, nullable=True),
    Number("trainer.num_sanity_val_steps", True, "0 (-1: the whole validation split)", low=-1, nullable=True),
    Number("perf.peak_flops", False, "989e12 (FLOP/s of one device)", positive=True, nullable=True),
)


@dataclass(frozen=True)
class Switch:
    """A true/false key. lmlab reads switches by their truth, so ``model.compile=maybe`` would be true."""

    key: str
    nullable: bool = False  # null: lmlab (or Lightning) decides
    words: tuple[str, ...] = ()  # other values the key takes (trainer.deterministic=warn)

    def check(self, cfg: DictConfig) -> None:
        value = OmegaConf.select(cfg, self.key, default=_ABSENT)
        if value is _ABSENT or isinstance(value, bool) or (value is None and self.nullable) or value in self.words:
            return
        others = [*self.words, *(["null"] if self.nullable else [])]
        raise config_error(self.key, f"'{value}' is not true or false{''.join(f' or {w}' for w in others)}",
                           f"Use {self.key}=true or {self.key}=false.")


SWITCHES = (
    Switch("export"),
    Switch("checkpoint.load_best_at_end"),
    Switch("model.compile"),
    Switch("model.fused_loss"),
    Switch("model.trust_remote_code"),
    Switch("data.trust_remote_code"),
    Switch("tokenizer.trust_remote_code"),
    Switch("tokenizer.lowercase", nullable=True),
    Switch("task.nsp"),
    Switch("task.whole_word_mask"),
    Switch("task.multi_label"),
    Switch("task.label_all_subwords"),
    Switch("task.strict"),
    Switch("trainer.enable_progress_bar"),
    Switch("trainer.enable_model_summary"),
    Switch("trainer.use_distributed_sampler", nullable=True),
    Switch("trainer.deterministic", nullable=True, words=("warn",)),
)


def unset_required(node: object, prefix: str = "") -> list[tuple[str, str]]:
    """(key, what it needs) of every ``${lmlab.required:...}`` still in the unresolved config."""
    if isinstance(node, dict):
        return [hit for k, v in node.items() for hit in unset_required(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [hit for i, v in enumerate(node) for hit in unset_required(v, f"{prefix}{i}.")]
    if isinstance(node, str) and node.startswith("${" + REQUIRED + ":"):
        return [(prefix[:-1], node[len(REQUIRED) + 3 : -1].strip().strip("'\""))]
    return []


def check_required(cfg: DictConfig) -> None:
    """Keys a preset marks as required (``${lmlab.required:...}``, or a surviving ``???``) are set.

    Checked before anything reads them: ``cfg.get`` on an unset ``model.pretrained`` would
    otherwise quietly mean "train from scratch".
    """
    # Required markers first: missing_keys resolves interpolations, and with them the markers.
    unset = unset_required(OmegaConf.to_container(cfg, resolve=False)) or [(k, "") for k in sorted(OmegaConf.missing_keys(cfg))]
    if unset:
        key, what = unset[0]
        raise config_error(key, f"is required here and not set{f' ({what})' if what else ''}",
                           f"Add {key}=... to the command line.")


def check_references(cfg: DictConfig) -> None:
    """model.pretrained / distill.teacher name a model or are unset (null), never empty.

    Everything downstream reads them with a truth test, so ``model.pretrained=`` (a shell
    ``$(...)`` that printed nothing) would silently mean "from scratch" or "no teacher"; so would
    ``model.pretrained=0``, which Hydra reads as the number 0, not the folder '0'.
    """
    for key in REFERENCE_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, str):
            kind = "true/false" if isinstance(value, bool) else "a number" if _real(value) else "not text"
            raise config_error(key, f"'{value}' is {kind} (as Hydra read it), not a directory, an MLflow run id or "
                               "a hub name", f"Give one of those, or leave it out ({key}=null). A folder named "
                               f"{value} is given quoted: \"{key}='{value}'\".")
        reference(cfg, key)


# Keys whose null means "not set" and which are read with a truth test, so an empty value (a shell
# ``$(...)`` that printed nothing) would quietly mean the same as null: the preset's catalog data, a
# fresh run. The value is what to do instead.
NOT_EMPTY = {
    "data.path": "Give the file or folder to read, or leave it out (data.path=null) to read the preset's data.",
    "data.name": "Give a Hugging Face dataset name, or leave it out (data.name=null).",
    "resume": "Give auto, a run directory or a .ckpt file, or leave it out (resume=null) to start a new run.",
}


# Names whose null means "the task's own" (or "none") and which are read as ``value or default``: an empty value
# or a number (``checkpoint.mode=0``) would quietly become the default metric or direction.
NAMES_OR_NULL = {
    "checkpoint.monitor": "Give a logged metric, e.g. checkpoint.monitor=val/loss, or null (the task's own).",
    "checkpoint.mode": "Use checkpoint.mode=min or max, or null (the metric's own direction).",
    "objective.metric": "Give a final val/ or test/ metric, e.g. objective.metric=val/loss, or null (the "
                        "checkpoint's metric).",
    "objective.direction": "Use objective.direction=min or max, or null (the metric's own direction).",
    # classification reads it as `pair_column or None`: a second text column dropped without a word
    "data.text_pair_column": "Give the column of the second text, e.g. data.text_pair_column=hypothesis (a "
                             "column named by a number is quoted: \"data.text_pair_column='2'\"), or null (single texts).",
}


# MLflow's names: a list or an empty experiment name surface as an MlflowException traceback (a
# SQL binding error for the run name) once the run is being opened, after all the data work.
MLFLOW_NAMES = {
    "logger.experiment_name": "Give a name, e.g. logger.experiment_name=lmlab, or leave it out (the "
                              "MLFLOW_EXPERIMENT_NAME variable, else 'lmlab').",
    "logger.run_name": "Give a name, e.g. logger.run_name=baseline, or null (MLflow picks one).",
}


def check_not_empty(cfg: DictConfig) -> None:
    """data.path, data.name and resume are unset (null) or say something, never empty; so are the
    metric names and directions of NAMES_OR_NULL, which are words besides."""
    for key, fix in NOT_EMPTY.items():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and not value.strip():
            raise config_error(key, "it is empty", fix)
    # NAMES_OR_NULL's words are then checked against the metrics the checkpoint / sweep code knows;
    # a number is a fine MLflow name (MLflow gets its text).
    for names, numbers_are_names in ((NAMES_OR_NULL, False), (MLFLOW_NAMES, True)):
        for key, fix in names.items():
            value = OmegaConf.select(cfg, key, default=None)
            if value is None or (numbers_are_names and _real(value)) or (isinstance(value, str) and value.strip()):
                continue
            raise config_error(key, "it is empty" if value == "" else f"'{value}' is not a name", fix)


def check_numbers(cfg: DictConfig) -> None:
    check_required(cfg)
    check_references(cfg)  # before the lr resolver (lmlab.if_pretrained) or anything else reads them
    check_not_empty(cfg)
    for number in NUMBERS:
        number.check(cfg)
    for switch in SWITCHES:
        switch.check(cfg)
    check_mode_value(cfg)
    check_text_block_size(cfg)
    check_validation_cadence(cfg)
    check_betas(cfg)
    check_devices(cfg)
    check_schedule(cfg)
    check_encodings(cfg)


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_mode_value(cfg: DictConfig) -> None:
    """``mode`` is a word: lmlab reads it as ``mode or "fit"``, so ``mode=`` (an unset shell
    variable), ``mode=0`` or ``mode=null`` would train a model where a test or export was asked for."""
    value = OmegaConf.select(cfg, "mode", default=_ABSENT)
    if value is _ABSENT or (isinstance(value, str) and value.strip()):
        return  # an unknown word is lmlab.train.check_mode's, which lists the modes
    said = "it is empty" if value == "" else "it is null" if value is None else f"'{value}' is not a mode"
    raise config_error("mode", said,
                       "Use one of mode=fit, test, predict, quantize or prune.")


def check_text_block_size(cfg: DictConfig) -> None:
    """The text datamodule (clm, mlm) packs blocks of ``data.block_size`` tokens and has no default
    for it: a null there is a TypeError once the corpus is read. Other datamodules fall back to
    their own lengths (max_length, max_source_length) when it is null."""
    if OmegaConf.select(cfg, "data.datamodule", default=None) != "text":
        return
    if OmegaConf.select(cfg, "data.block_size", default=_ABSENT) in (None, _ABSENT):
        raise config_error("data.block_size", "is not set, and the text datamodule packs its blocks to that length",
                           "Use e.g. data.block_size=128 (at most the model's positions).")


def check_validation_cadence(cfg: DictConfig) -> None:
    """``trainer.val_check_interval`` and ``trainer.limit_val_batches`` that would skip validation.

    Lightning divides by val_check_interval (0: a ZeroDivisionError mid-fit), and 0 validation
    batches leave lmlab's final validation, checkpoint choice and export without a metric (an
    IndexError after training). Its own string forms ("DD:HH:MM:SS") are left to Lightning.
    """
    interval = OmegaConf.select(cfg, "trainer.val_check_interval", default=None)
    if _real(interval) and interval <= 0:
        raise config_error("trainer.val_check_interval", f"{interval} is not positive",
                           "Use a number of optimizer steps, e.g. trainer.val_check_interval=100, a share of an "
                           "epoch such as 0.5, or null (once per epoch).")
    limit = OmegaConf.select(cfg, "trainer.limit_val_batches", default=None)
    fit = OmegaConf.select(cfg, "mode", default="fit") in ("fit", None)  # test, predict, ... need no validation
    if fit and _real(limit) and limit == 0:
        raise config_error("trainer.limit_val_batches", "it is 0, so there would be no validation, and lmlab picks "
                           "the checkpoint, exports and reports the run by its validation metrics",
                           "Use a number of batches, e.g. trainer.limit_val_batches=2, a share such as 0.1, or "
                           "null (the whole validation split).")


def check_betas(cfg: DictConfig) -> None:
    """``optimizer.betas``: two numbers in [0, 1), read by AdamW only once the data is ready."""
    value = OmegaConf.select(cfg, "optimizer.betas", default=_ABSENT)
    if value is _ABSENT:
        return
    betas = list(value) if OmegaConf.is_list(value) else None
    if betas is None or len(betas) != 2 or not all(_real(b) and 0 <= b < 1 for b in betas):
        raise config_error("optimizer.betas", f"'{value}' is not two numbers from 0 up to (not including) 1",
                           "Use e.g. optimizer.betas=[0.9,0.95].")


def check_devices(cfg: DictConfig) -> None:
    """``trainer.devices`` in one of Lightning's forms: a count, -1 or "auto", or device indices."""
    value = OmegaConf.select(cfg, "trainer.devices", default=_ABSENT)
    if value is _ABSENT or value == "auto":
        return
    if OmegaConf.is_list(value):
        ok = len(value) > 0 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if "," in value:  # Lightning's "0,1" (and "0,"): device indices
            ok = bool(parts) and all(p.isdigit() for p in parts)
        else:
            ok = value.strip().lstrip("-").isdigit() and int(value) >= -1 and int(value) != 0
    else:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= -1 and value != 0
    if not ok:
        raise config_error("trainer.devices", f"'{value}' is not a number of devices or a list of device indices",
                           "Use e.g. trainer.devices=2 (processes on this machine), -1 or auto (every GPU), "
                           "or trainer.devices=[0,2] for those GPU indices.")


def check_encodings(cfg: DictConfig) -> None:
    """``data.encoding`` / ``data.encoding_fallback``: names Python's codecs know.

    An unknown name surfaces as a LookupError traceback from the first file read, and the fallback's
    only when some file is not in the main encoding.
    """
    for key in ("data.encoding", "data.encoding_fallback"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key == "data.encoding" and OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            # every file is decoded with it: null is a TypeError at the first read (only the fallback may be off)
            raise config_error(key, "is null, and every data file is decoded with it",
                               "Use e.g. data.encoding=utf-8 (data.encoding_fallback=null is how to go without a "
                               "second encoding).")
        if value is None:
            continue
        try:
            codecs.lookup(str(value))
        except LookupError:
            raise config_error(key, f"'{value}' is not an encoding Python knows",
                               f"Use e.g. {key}=utf-8, latin-1 or cp1252 (the codecs module's names).") from None


def check_schedule(cfg: DictConfig) -> None:
    name = OmegaConf.select(cfg, "scheduler.name", default=_ABSENT)
    if name is not _ABSENT:
        check_schedule_name(name)


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU preset (trainer=gpu/ddp/fsdp/deepspeed) on a machine without a CUDA GPU, named up front.

    Lightning would say so too, but only when the Trainer is built: after the data is read and an
    MLflow run is opened (and left FAILED), and in words that vary by version. The advice depends
    on the preset: each strategy has its own way (or none) of running on CPU processes.
    """
    trainer = cfg.get("trainer") or {}
    accelerator = str(trainer.get("accelerator", "auto"))
    strategy = strategy_kind(trainer.get("strategy"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise config_error("trainer.accelerator", f"it is '{accelerator}' (the trainer preset's), but this "
                           "machine has no CUDA GPU", NO_GPU_ADVICE[strategy])
    # Lightning's FSDP and DeepSpeed strategies refuse any accelerator but CUDA ('auto' without a GPU is the CPU).
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and strategy in ("deepspeed", "fsdp"):
        name = {"deepspeed": "DeepSpeed", "fsdp": "FSDP"}[strategy]
        said = "it is 'cpu'" if accelerator == "cpu" else "it is 'auto', and this machine has no CUDA GPU"
        raise config_error("trainer.accelerator", f"{said}, and {name} runs on CUDA GPUs only",
                           CPU_INSTEAD[0].upper() + CPU_INSTEAD[1:] + ".")
    if accelerator == "cpu" and str(trainer.get("devices")) == "-1":
        raise config_error("trainer.devices", "it is -1 (every GPU, the preset's), which means nothing with "
                           "trainer.accelerator=cpu", "Give the number of CPU processes, e.g. trainer.devices=2, or use "
                           "trainer=ddp_cpu.")


# What to do instead, by the preset's strategy (strategy_kind).
CPU_INSTEAD = "use trainer=cpu, or trainer=ddp_cpu to try several processes on CPU"
NO_GPU_ADVICE = {
    "single": "Use trainer=cpu, or add trainer.accelerator=cpu.",
    "ddp": "Use trainer=ddp_cpu: DDP over 2 CPU processes with gloo, with trainer=cpu's fp32 and run length.",
    "fsdp": f"FSDP needs GPUs: {CPU_INSTEAD}.",
    "deepspeed": f"DeepSpeed needs GPUs: {CPU_INSTEAD}.",
}


def check_precision(cfg: DictConfig) -> None:
    """``trainer.precision`` among the values Lightning accepts, named before any data or MLflow work.

    Lightning checks it only when the Trainer is built, after the data is read and an MLflow run is
    opened (and left FAILED), and its message names no config key.
    """
    value = (cfg.get("trainer") or {}).get("precision")
    try:  # Lightning's own list, which has no public name; without it Lightning's check stands alone
        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR
    except ImportError:
        return
    accepted = typing.get_args(_PRECISION_INPUT_STR)
    if value is None or not accepted:
        return
    if isinstance(value, bool) or precision_name(value) not in accepted:
        raise config_error("trainer.precision", f"'{value}' is not a precision Lightning knows",
                           f"Use one of {', '.join(accepted)} (or the short forms bf16, 16, 32, 64), "
                           "e.g. trainer.precision=bf16-mixed.")


def check_strategy_name(cfg: DictConfig) -> None:
    """A ``trainer.strategy`` name Lightning has registered, named before any data or MLflow work."""
    value = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if not isinstance(value, str) or value == "auto":
        return  # None, or a _target_ node, which lmlab.distributed.build_strategy imports and names
    from lightning.pytorch.strategies import StrategyRegistry

    known = StrategyRegistry.available_strategies()
    if value not in known:
        raise config_error("trainer.strategy", f"'{value}' is not a strategy Lightning knows",
                           "Use a preset (trainer=ddp, trainer=fsdp, trainer=deepspeed, trainer=ddp_cpu), "
                           f"or one of Lightning's names: auto, {', '.join(known)}.")


def strategy_kind(strategy: object) -> str:
    """``trainer.strategy`` (a name, or a ``_target_`` node) as one of NO_GPU_ADVICE's keys."""
    name = str(strategy.get("_target_", "")) if isinstance(strategy, (dict, DictConfig)) else str(strategy or "")
    return next((kind for kind in ("deepspeed", "fsdp", "ddp") if kind in name.lower()), "single")
