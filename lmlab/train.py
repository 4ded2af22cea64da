"""One run: composed config -> registry lookup -> DataModule + LightningModule -> Trainer -> MLflow."""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lmlab import atomic, checkpointing, checks, config_keys, data_lengths, distill, faults, optim, pretrained, \
    registry, resume, tracking
from lmlab.accumulation import WindowScaling
from lmlab.background_log import MetricsBeforeCheckpoints
from lmlab.data import labels as model_labels
from lmlab.data.loaders import distributed_sampler_wanted, shards_itself
from lmlab.callbacks import LastValidation, LearningRate, MonitorLogged, ProgressBar, StepValidation, \
    TokensPerSecond, ValidationCoverage
from lmlab.distributed import build_strategy, check_strategy, effective_batch, gathered_state_dict, is_rank_zero
from lmlab.errors import LmlabError, config_error
from lmlab.export import export_hf
from lmlab.run_log import RunLog
from lmlab.models.build import build_hf_config, build_model, check_data_owned, check_positions, config_overrides
from lmlab.clipping import sharded_clipping, use_clipping_mixed_precision
from lmlab.precision import MetricsInFloat32, precision_name
from lmlab.specs import ModelSpec, TaskSpec
from lmlab.tokenization import get_tokenizer, load_pretrained

log = logging.getLogger("lmlab")


@dataclass
class RunResult:
    run_id: str
    tracking_uri: str
    output_dir: Path
    metrics: dict[str, float]
    export_dir: Path | None
    seconds: float
    objective_metric: str = "val/loss"

    @property
    def objective(self) -> float:
        """What a sweeper optimises; NaN when the run never produced the metric."""
        return self.metrics.get(self.objective_metric, math.nan)


# Words in a metric's name that say which way it improves. Long words match anywhere in the name
# ("masked_accuracy", "rougeL"); short ones only as a whole part of it ("macro_f1", "val/mae").
FALLS_LONG, FALLS_SHORT = ("loss", "perplexity", "error"), {"mae", "mse", "rmse", "wer", "cer", "ter"}
RISES_LONG = ("accuracy", "precision", "recall", "bleu", "rouge", "pearson", "spearman", "exact_match", "correlation")
RISES_SHORT = {"f1", "auc", "r2", "mcc", "em", "acc"}


def metric_mode(metric: str) -> str | None:
    """"min" or "max": which way ``metric`` improves, read from its name; None when the name does not say."""
    name = metric.rsplit("/", 1)[-1].lower()
    parts = set(re.split(r"[^a-z0-9]+", name))
    falls = any(word in name for word in FALLS_LONG) or bool(parts & FALLS_SHORT)
    rises = any(word in name for word in RISES_LONG) or bool(parts & RISES_SHORT)
    return None if falls == rises else ("min" if falls else "max")


def monitored(cfg: DictConfig, task: TaskSpec) -> tuple[str, str]:
    """(metric, "min" | "max") for the best checkpoint: the config's, else the task's.

    A metric other than the task's gets its direction from checkpoint.mode, else from its name; a
    silent "min" would keep (and export) the worst checkpoint of an F1.
    """
    metric = str(cfg.checkpoint.get("monitor") or task.monitor)
    mode = cfg.checkpoint.get("mode") or (task.monitor_mode if metric == task.monitor else metric_mode(metric))
    if mode is None:
        raise config_error("checkpoint.mode", f"it is unset, and the name of checkpoint.monitor={metric} does not "
                           "say whether higher or lower is better",
                           "Set checkpoint.mode=max (an accuracy, a score) or checkpoint.mode=min (a loss, an error), "
                           f"or check the name (task={task.name} monitors {task.monitor} by default).")
    if str(mode) not in ("min", "max"):
        raise config_error("checkpoint.mode", f"'{mode}' is neither min nor max", "Use checkpoint.mode=min or max.")
    return metric, str(mode)


def missing_monitor(cfg: DictConfig, task: TaskSpec, logged: list[str]) -> LmlabError:
    """The error for a monitored metric that validation does not log (``logged``: what it does)."""
    metric, _ = monitored(cfg, task)
    names = ", ".join(logged) or "(none)"
    if cfg.checkpoint.get("monitor") is None:  # the task's own declaration: its author's to fix
        return LmlabError(
            f"task '{task.name}' declares monitor='{metric}' (its TaskSpec), but its validation logs no such "
            f"metric; it logs: {names}. Fix the task's TaskSpec.monitor, or set checkpoint.monitor=METRIC for this run.")
    return config_error("checkpoint.monitor", f"the run logs no '{metric}' at validation",
                        f"Use one of the metrics it logs there: {names} (or leave checkpoint.monitor unset for "
                        "the task's own).")


def objective_metric(cfg: DictConfig, task: TaskSpec) -> str:
    return str(cfg.get("objective", {}).get("metric") or monitored(cfg, task)[0])


def check_compatible(task: TaskSpec, spec: ModelSpec, cfg: DictConfig) -> None:
    head = task.head(cfg)
    if head in spec.heads:
        return
    working = [name for name, other in registry.available("model").items() if head in other.heads]
    raise LmlabError(
        f"task '{task.name}' needs a model with a '{head}' head and model '{spec.name}' has none "
        f"(it has: {', '.join(spec.heads)}). Models that work for task={task.name}: "
        f"{', '.join(working) or '(none registered)'}."
    )


def output_dir_for(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # called without Hydra (tests, notebooks)
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        return Path(str(cfg.paths.root)) / "runs" / f"{stamp}_{cfg.task.name}_{cfg.model.name}"


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> Path:
    """``config_resolved.yaml`` in the run directory, written by global rank 0 only: every process
    resolves the same config, and writers sharing one staging name race (torchrun starts every rank
    at once). Every process gets the path."""
    path = output_dir / "config_resolved.yaml"
    if is_rank_zero():
        atomic.write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def build_trainer(
    cfg: DictConfig, task: TaskSpec, output_dir: Path, logger: Any, model: Any = None, sharded: bool = True
) -> tuple[L.Trainer, ModelCheckpoint, TokensPerSecond]:
    """``sharded``: the data's loaders shard themselves (``lmlab.data.loaders``); a plugin datamodule
    that does not gets Lightning's DistributedSampler."""
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["use_distributed_sampler"] = distributed_sampler_wanted(
        trainer_kwargs.get("use_distributed_sampler"), sharded)
    # FSDP wraps the model's own blocks, so the strategy is built with the model in hand.
    trainer_kwargs["strategy"] = build_strategy(trainer_kwargs.get("strategy", "auto"), model)
    monitor, mode = monitored(cfg, task)
    if monitor != task.monitor and not trainer_kwargs.get("num_sanity_val_steps"):
        # A metric of the user's naming is checked against what validation logs before training
        # starts (MonitorLogged), not after val_check_interval steps: one validation batch.
        trainer_kwargs["num_sanity_val_steps"] = 1
    best = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best-{step}", monitor=monitor, mode=mode,
        save_top_k=int(cfg.checkpoint.save_top_k),
    )
    # Lightning's save_last only refreshes last.ckpt when the monitored metric improved, so a
    # second, unmonitored checkpoint keeps last.ckpt at the newest weights (what resume needs).
    last = checkpointing.LastCheckpoint(output_dir / "checkpoints", checkpointing.every_n_steps(cfg))
    checkpointing.add_io_plugin(trainer_kwargs)  # atomic writes, weights_only reads
    if "precision" in trainer_kwargs:  # Lightning's aliases (bf16, 16) as the names lmlab compares against
        trainer_kwargs["precision"] = precision_name(trainer_kwargs["precision"])
    use_clipping_mixed_precision(trainer_kwargs, trainer_kwargs["strategy"])
    clipping = sharded_clipping(trainer_kwargs, trainer_kwargs["strategy"])
    accumulate = int(trainer_kwargs.get("accumulate_grad_batches") or 1)
    interval = trainer_kwargs.get("val_check_interval")
    by_step: list[L.Callback] = []
    if isinstance(interval, int) and not isinstance(interval, bool):
        # lmlab's trainer.val_check_interval counts optimizer steps, like max_steps and the logging
        # interval; Lightning counts training batches, which accumulation multiplies.
        trainer_kwargs["val_check_interval"] = interval * accumulate
        if accumulate > 1 and interval > 0:
            # An epoch's partial last accumulation is a step too, and the product stops matching.
            # First in the list: callbacks that save in on_train_batch_end (Preemption, last.ckpt)
            # must see, and checkpoint, this batch's decision.
            by_step.append(StepValidation(interval))
    every = int(trainer_kwargs.get("log_every_n_steps") or 50)  # null: Lightning's own default, 50
    throughput = TokensPerSecond(every=every * accumulate, configured_peak=cfg.get("perf", {}).get("peak_flops"))
    bar = [ProgressBar(every)] if trainer_kwargs.get("enable_progress_bar", True) else []
    try:
        trainer = L.Trainer(
            **trainer_kwargs, logger=logger,
            # First: the step's gradient is the mean over its targets before the norm is logged or clipped.
            callbacks=[WindowScaling(), *by_step, best, last, throughput, LearningRate(), *bar, *checkpointing.callbacks(cfg, last),
                       *clipping, MetricsBeforeCheckpoints(), LastValidation(), ValidationCoverage(),
                       MonitorLogged(monitor, lambda logged: missing_monitor(cfg, task, logged)), MetricsInFloat32()],
            default_root_dir=str(output_dir),
        )
    except TypeError as exc:
        raise config_error("trainer", f"Lightning's Trainer rejected the options ({exc})",
                           "Check the trainer.* keys against lightning.Trainer's arguments.") from exc
    except Exception as exc:  # MisconfigurationException and friends carry a clear message
        # Some carry no message (trainer.devices=10**12 gave "config group 'trainer': " alone).
        detail = str(exc) or f"Lightning's Trainer raised {type(exc).__name__}; check the trainer.* values"
        raise LmlabError(f"config group 'trainer': {detail}") from exc
    return trainer, best, throughput


def final_validation(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule,
                     checkpoint: ModelCheckpoint) -> dict[str, float]:
    """Validation metrics of the weights the run ends with: what it exports and tests.

    With ``checkpoint.load_best_at_end`` (the default, as Hugging Face's ``load_best_model_at_end``)
    those are the best checkpoint's, which ``trainer.validate(ckpt_path=...)`` loads into the module
    for good under every strategy; otherwise the last step's. When they are the weights fit's own
    last validation scored, its metrics are reused. Every process decides alike (by checkpoint path
    and step), so under DDP either all of them validate again or none does.
    """
    best = checkpoint.best_model_path
    if bool(cfg.checkpoint.get("load_best_at_end", True)) and best and checkpoint_step(best) != trainer.global_step:
        return {k: float(v) for k, v in trainer.validate(module, datamodule=dm, ckpt_path=best, verbose=False)[0].items()}
    last = next((c for c in trainer.callbacks if isinstance(c, LastValidation)), None)
    reused = last.metrics_at(trainer.global_step) if last is not None else None
    if reused is not None:
        return reused
    return {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step in a ``best-step=N.ckpt`` name (``filename="best-{step}"`` above)."""
    found = re.search(r"step=(\d+)", Path(path).name)
    return int(found.group(1)) if found else None


def longest_sequence(data_cfg: DictConfig) -> tuple[str, int]:
    """(the config key that sets it, the longest sequence the data will feed the model):
    data.block_size for the language models, data.max_length for the task heads."""
    return max(((f"data.{key}", int(data_cfg.get(key) or 0)) for key in ("block_size", "max_length")),
               key=lambda key_and_length: key_and_length[1])


def prepare_model_and_tokenizer(cfg: DictConfig, task: TaskSpec, spec: ModelSpec, dm: Any,
                                teacher: distill.Teacher | None = None) -> tuple[Any, Any, dict]:
    """Tokenizer and model: both from ``model.pretrained``, or a trained tokenizer and a fresh model.

    A distillation student without ``model.pretrained`` takes the teacher's tokenizer instead.
    """
    head = task.head(cfg)
    ref = cfg.model.get("pretrained")
    trust = bool(cfg.model.get("trust_remote_code", False))
    source = pretrained.resolve(str(ref), cfg) if ref else ""
    if hasattr(dm, "start_from"):  # a task head's labels: the model's own when they cover the data's
        mode = str(cfg.get("mode") or "fit")
        if ref:
            dm.start_from(model_labels.StartingModel(source, mode, trust))
        elif teacher is not None and teacher.directory:
            # A fresh student takes the teacher's label ids when they cover the data's: the two heads'
            # logits are compared row by row, and the data's own order (sorted) may not be the
            # teacher's (a Hugging Face NER model's, say), which distillation would then refuse.
            dm.start_from(model_labels.StartingModel(teacher.directory, mode))
        else:
            dm.start_from(None)
    if ref:
        tokenizer = load_pretrained(source, trust, key="model.pretrained")
        tok_info: dict[str, Any] = {"type": "pretrained", "path": source}
    elif teacher is not None and cfg.tokenizer.type != "pretrained":  # the student reads the teacher's ids
        tokenizer, tok_info = teacher.tokenizer, {"type": "pretrained", "path": teacher.source, "from": "distill.teacher"}
    else:
        tokenizer, tok_info = get_tokenizer(cfg.tokenizer, spec, dm.texts_for_tokenizer, dm.fingerprint,
                                            Path(str(cfg.paths.cache)))
    dm.set_tokenizer(tokenizer)
    updates = dm.model_config_updates() if hasattr(dm, "model_config_updates") else {}
    length_key, length = longest_sequence(cfg.data)
    if ref:
        if str(cfg.get("mode") or "fit") in ("test", "quantize", "prune"):  # scored as they are
            labels = updates.get("id2label")
            pretrained.check_trained_head(spec, head, source, task.name,
                                          [labels[i] for i in range(len(labels))] if labels else None, trust)
        overrides = config_overrides(spec, cfg.model, len(tokenizer))  # applied if they keep the weights
        check_data_owned(overrides, updates)
        model = pretrained.load_model(spec, head, source, updates, trust, overrides)
        pretrained.check_vocabulary(model, tokenizer)
        check_positions(spec, model.config, length_key, length)
        log.info("Loaded pretrained %s backbone from %s", spec.name, source)
    else:
        config = build_hf_config(spec, cfg.model, tokenizer, length, updates, length_key=length_key)
        model = build_model(spec, head, config)
        log.info("No model.pretrained: randomly initialised %s (%s)", spec.name, cfg.model.size)
    if str(cfg.get("mode") or "fit") == "fit":
        data_lengths.record(model, cfg.data)  # exported with the model: see lmlab.data_lengths
    log.info("%s: %.2fM parameters", spec.name, sum(p.numel() for p in model.parameters()) / 1e6)
    return tokenizer, model, tok_info


MODES = ("fit", "test", "predict", "quantize", "prune")


def check_mode(cfg: DictConfig, task: TaskSpec) -> str:
    """``fit`` trains; ``test`` and ``predict`` use ``model.pretrained`` as it is, before any data is read."""
    mode = str(cfg.get("mode") or "fit")
    if mode not in MODES:
        raise config_error("mode", f"unknown mode '{mode}'", f"Use one of: {', '.join(MODES)}.")
    if mode != "fit" and not cfg.model.get("pretrained"):
        raise config_error("model.pretrained", f"mode={mode} needs a trained model and none is given",
                           "Set model.pretrained to an lmlab run directory, its MLflow run id or a model directory.")
    if mode == "predict":
        if task.predict is None:
            raise config_error("mode", f"task '{task.name}' has no predict mode",
                               "Use mode=test to score it, or a task that predicts (classification, ner, summarization).")
        if not cfg.data.get("path"):
            raise config_error("data.path", "mode=predict needs the file to predict on",
                               "Set data.path=FILE (one example per line or record; labels are not needed).")
        if not Path(str(cfg.data.path)).expanduser().exists():  # before the model is loaded or a run opened
            raise config_error("data.path", f"'{cfg.data.path}' does not exist (a relative path starts from "
                               f"{Path.cwd()})", "Set data.path to the file to predict on.")
        if cfg.trainer.get("use_distributed_sampler"):  # before the model loads, not after predicting
            raise config_error("trainer.use_distributed_sampler", "is true, and mode=predict shares the rows "
                               "out itself: Lightning's sampler would take a share of each process's share "
                               "and drop rows", "Leave it unset (null).")
    if mode in ("quantize", "prune"):
        from lmlab import compress

        compress.check_config(cfg, mode)
    return mode


def _tags(cfg: DictConfig, task: TaskSpec, spec: ModelSpec, mode: str, output_dir: Path, origin: str) -> dict[str, str]:
    # model.size only shapes a model built from scratch: a pretrained one has its own config.
    size = "pretrained" if cfg.model.get("pretrained") else str(cfg.model.size)
    return {"lmlab.task": task.name, "lmlab.model": spec.name, "lmlab.model_size": size,
            "lmlab.data": origin, "lmlab.output_dir": str(output_dir.resolve()), "lmlab.mode": mode,
            "lmlab.pretrained": str(cfg.model.get("pretrained") or "")}


def run(cfg: DictConfig) -> RunResult:
    """Train, validate (and test) one model, export it; returns the MLflow run and its final metrics.

    With ``mode=test`` the pretrained model is only scored on the test split (validation when the
    data has none); with ``mode=predict`` it labels ``data.path`` and writes the predictions.
    """
    started = time.perf_counter()
    task: TaskSpec = registry.get("task", cfg.task.name)
    spec: ModelSpec = registry.get("model", cfg.model.name)
    check_compatible(task, spec, cfg)
    config_keys.check_known_keys(cfg)  # a typo in a config file of the user's own, which Hydra lets through
    checks.check_numbers(cfg)  # seed, sizes, steps, lr, switches: named errors instead of TypeErrors deep inside
    checks.check_accelerator(cfg)  # a GPU preset on a machine without one: before any data or MLflow work
    checks.check_precision(cfg)
    checks.check_strategy_name(cfg)
    check_strategy(OmegaConf.to_container(cfg.trainer, resolve=True))  # importable, installed, launched as asked
    optim.check_length(cfg)  # training without end and a schedule that needs its length
    task.validate(cfg)
    monitored(cfg, task)  # an unknown direction of checkpoint.monitor, before any data work
    mode = check_mode(cfg, task)
    teacher = distill.prepare(cfg, task, mode)  # distill.teacher: loaded and checked before any data work
    # A bad resume= fails here, before any data work; a requeued submitit job finds its run here.
    resuming = resume.prepare(cfg, output_dir_for(cfg))
    if resuming is None and mode != "predict" and is_rank_zero():  # the other ranks see rank 0's record
        resume.check_new_run_dir(output_dir_for(cfg))
    data_lengths.adopt_for_mode(cfg, mode)  # a trained model is scored on data cut as it was trained on
    tracking.quiet_env()
    tracking.check_reachable(tracking.tracking_uri(cfg))
    tracking.check_experiment(cfg)  # a deleted logger.experiment_name, named before any data work
    L.seed_everything(int(cfg.seed), workers=True)
    if mode == "predict":
        return _predict(cfg, task, spec, started)
    if mode in ("quantize", "prune"):  # score, make smaller, score again: lmlab/compress.py
        from lmlab import compress

        return compress.run(cfg, task, spec, mode, started)

    datamodule_cls = registry.get("datamodule", cfg.data.datamodule)
    dm = datamodule_cls(cfg.data, packing=task.packing(cfg), cache_dir=cfg.paths.cache, seed=int(cfg.seed))
    tokenizer, model, tok_info = prepare_model_and_tokenizer(cfg, task, spec, dm, teacher)
    dm.setup("fit" if mode == "fit" else "test")
    module = task.build_module(cfg, model, tokenizer)
    distill.attach(teacher, module, tokenizer, task.name)

    output_dir = resume.run_dir(resuming) or output_dir_for(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    rank_zero = is_rank_zero()
    config_path = save_resolved_config(cfg, output_dir)
    origin = str(getattr(dm, "origin", None) or getattr(getattr(dm, "corpus", None), "origin", ""))
    mlrun = resume.open_run(cfg, resuming, _tags(cfg, task, spec, mode, output_dir, origin), output_dir, rank_zero)
    with resume.ending(mlrun, output_dir, "fit-not-started" if mode == "fit" else mode) as end:
        mlrun.artifact(config_path, "config")
        mlrun.dict({"tokenizer": tok_info, "data": {**getattr(dm, "stats", {}), "origin": origin,
                    "tokenized_cache_hit": getattr(dm, "cache_hit", None)}}, "run_info.json")
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        mlrun.params({"n_parameters": sum(p.numel() for p in model.parameters()), **distill.params(module),
                      **effective_batch(trainer_cfg, int(cfg.data.batch_size))})
        trainer, checkpoint, throughput = build_trainer(cfg, task, output_dir, mlrun.metrics_logger(cfg), model,
                                                        shards_itself(dm))
        export_dir = None
        if mode == "fit":
            end.sigterm.stop()  # during fit, Preemption stops at a step boundary with last.ckpt saved
            try:
                faults.fit(trainer, module, dm, ckpt_path=resume.checkpoint(resuming))
                end.stage = "fit"  # trained: a SIGTERM from here on says how to finish with resume=
            except MisconfigurationException as exc:
                if "could not find the monitored key" not in str(exc):
                    raise
                raise missing_monitor(cfg, task, sorted(k for k in trainer.callback_metrics
                                                        if k.startswith("val/"))) from exc
            end.sigterm.start()
            metrics = final_validation(cfg, trainer, module, dm, checkpoint)
            if cfg.export:
                # Under FSDP/DeepSpeed the weights are sharded: every process takes part in gathering them.
                state = gathered_state_dict(trainer.strategy)
                if trainer.is_global_zero:
                    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
                    export_dir = export_hf(module.model, tokenizer, output_dir / "export", state_dict=weights or None)
                    mlrun.artifacts(export_dir, "model")
        else:
            metrics = {}
        has_test = getattr(dm, "has_test", False)
        if has_test and trainer.limit_test_batches == 0:  # switched off: Lightning would return no results
            log.info("trainer.limit_test_batches=0: no test")
        elif has_test:
            # The module holds the weights final_validation chose: the test scores what is exported.
            tested = trainer.test(module, datamodule=dm, verbose=False)[0]
            metrics.update({k: float(v) for k, v in tested.items()})
            if hasattr(module, "export_predictions") and trainer.is_global_zero:
                for path in module.export_predictions(output_dir / "predictions"):
                    mlrun.artifact(path, "predictions")
        elif mode == "test":  # LM corpora and carved data may have no test split: score validation
            final = trainer.validate(module, datamodule=dm, verbose=False)[0]
            metrics.update({k: float(v) for k, v in final.items()})
        if mode == "fit":
            last_step = max(int(trainer.global_step) - 1, 0)  # 0-based, as Lightning logs the training steps
            mlrun.metric("train/total_tokens", throughput.total_tokens, step=last_step)
            for key, value in distill.score_teacher(cfg, task, module, trainer, dm).items():  # what the student costs
                mlrun.metric(key, value, step=last_step)
                metrics[key] = value
    return RunResult(mlrun.run_id, tracking.tracking_uri(cfg), output_dir, metrics, export_dir,
                     time.perf_counter() - started, objective_metric(cfg, task))


def _predict(cfg: DictConfig, task: TaskSpec, spec: ModelSpec, started: float) -> RunResult:
    """Label ``data.path`` with ``model.pretrained``; the task writes the predictions file."""
    source = pretrained.resolve(str(cfg.model.pretrained), cfg)
    trust = bool(cfg.model.get("trust_remote_code", False))
    head = task.head(cfg)
    pretrained.check_trained_head(spec, head, source, task.name, None, trust)
    tokenizer = load_pretrained(source, trust, key="model.pretrained")
    model = pretrained.load_model(spec, head, source, {}, trust).eval()
    pretrained.check_vocabulary(model, tokenizer)
    check_positions(spec, model.config, *longest_sequence(cfg.data))
    module = task.build_module(cfg, model, tokenizer)

    output_dir = output_dir_for(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_resolved_config(cfg, output_dir)
    mlrun = RunLog.open(cfg, _tags(cfg, task, spec, "predict", output_dir, str(cfg.data.path)), is_rank_zero())
    with resume.ending(mlrun, output_dir, "predict", record=False):
        mlrun.artifact(config_path, "config")
        trainer, _, _ = build_trainer(cfg, task, output_dir, mlrun.metrics_logger(cfg), model)
        written = task.predict(cfg, module, tokenizer, trainer, output_dir / "predictions")
        for path in written:
            mlrun.artifact(path, "predictions")
        metrics = {"predict/examples": float(getattr(module, "predicted_examples", 0))}
        mlrun.metric("predict/examples", metrics["predict/examples"])
    if written:  # global rank 0 writes them; the other ranks have nothing to say
        log.info("Predictions: %s", ", ".join(str(p) for p in written))
    return RunResult(mlrun.run_id, tracking.tracking_uri(cfg), output_dir, metrics, None,
                     time.perf_counter() - started, "predict/examples")


# Final metrics that count things: printed as whole numbers.
COUNTS = ("_params", "parameters", "_units", "_bytes", "_heads", "_neurons", "examples")


def summary(result: RunResult) -> str:
    if not result.run_id:  # not global rank 0: rank 0 prints the summary of the job
        return ""
    lines = ["", f"lmlab run finished in {result.seconds:.0f} s", f"  MLflow run id:     {result.run_id}"]
    # Loss and perplexity first (the LM objectives), then every other final metric.
    order = sorted(result.metrics, key=lambda k: (k not in ("val/loss", "val/perplexity"), k))
    for key in order:
        if key.startswith(("val/", "test/", "teacher/", "distill/", "original/", "quantize/", "prune/")):
            value = result.metrics[key]
            counted = key.endswith(COUNTS) and float(value).is_integer()
            text = f"{value:.2f}" if key.endswith("perplexity") else f"{value:,.0f}" if counted else f"{value:.4f}"
            lines.append(f"  {key + ':':<18} {text}")
    lines.append(f"  output directory:  {result.output_dir}")
    from lmlab.quantize import MANIFEST

    if result.export_dir is not None and (result.export_dir / MANIFEST).exists():
        # Not loadable by from_pretrained: transformers would fill the quantized layers at random.
        lines.append(f"  quantized model:   {result.export_dir} (load with lmlab.quantize.load_quantized)")
    elif result.export_dir is not None:
        lines.append(f"  Hugging Face model: {result.export_dir}")
    lines.append(f"  open the MLflow UI: {tracking.ui_command(result.tracking_uri)}")
    return "\n".join(lines)
