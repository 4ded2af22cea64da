"""``mode=quantize`` and ``mode=prune``: score a trained model, make it smaller, score it again.

Both follow mode=test: ``model.pretrained`` is scored on the test split (validation when the data has
none), then transformed (lmlab.quantize / lmlab.prune) and scored on the same split. One MLflow run
(tag ``lmlab.mode``) holds both: the original's metrics as ``original/test/accuracy`` etc., the
smaller model's as ``test/accuracy`` (what mode=test would log for it), ``MODE/metric_delta`` for the
task's main metric (smaller minus original: negative accuracy, positive loss is the cost) and
``MODE/delta/KEY`` for every metric both have, plus what was saved (bytes, latency, sparsity).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab import faults, pretrained, prune, quantize, registry, resume, tracking
from lmlab.data.loaders import shards_itself
from lmlab.distributed import is_rank_zero
from lmlab.errors import config_error
from lmlab.export import export_hf
from lmlab.specs import ModelSpec, TaskSpec

log = logging.getLogger("lmlab")

MODES = ("quantize", "prune")


def check_config(cfg: DictConfig, mode: str) -> None:
    """The mode's own keys, before any data is read."""
    if cfg.get("resume"):
        raise config_error("resume", f"mode={mode} does not train a run that could be resumed",
                           "Remove resume= (prune.finetune_steps is short enough to repeat).")
    if mode == "quantize":
        quantize.check_config(cfg)
    else:
        prune.check_config(cfg)


def _with(cfg: DictConfig, **groups: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with some keys of some groups replaced (the run's cfg stays as logged)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for group, values in groups.items():
        data.setdefault(group, {}).update(values)
    return OmegaConf.create(data)


def scoring_cfg(cfg: DictConfig, mode: str) -> DictConfig:
    """The config the smaller model's LightningModule is built from.

    A quantized model is scored through its own forward pass: ``model.fused_loss`` computes the
    causal-LM loss from the output projection's weight as a plain matrix, and torchao's weights are
    tensor subclasses that do not support it (GPT-2 under int8_weight_only / int4_weight_only stopped
    with NotImplementedError for aten.to / aten.t). The fused loss equals the plain one to rounding.
    """
    return _with(cfg, model={"fused_loss": False}) if mode == "quantize" else cfg


def score(trainer: Any, module: Any, dm: Any) -> dict[str, float]:
    """The test split's metrics, or validation's when the data has no test split (like mode=test)."""
    if getattr(dm, "has_test", False):
        out = trainer.test(module, datamodule=dm, verbose=False)[0]
    else:
        out = trainer.validate(module, datamodule=dm, verbose=False)[0]
    return {k: float(v) for k, v in out.items()}


def main_metric(task: TaskSpec, metrics: dict[str, float]) -> str:
    """The task's monitored metric on the split that was scored (test/accuracy, val/loss ...)."""
    name = task.monitor.split("/", 1)[-1]
    for split in ("test", "val"):
        if f"{split}/{name}" in metrics:
            return f"{split}/{name}"
    return next((k for k in ("test/loss", "val/loss") if k in metrics), sorted(metrics)[0] if metrics else "")


def _eval_batches(dm: Any, n: int) -> list[dict[str, Any]]:
    loader = dm.test_dataloader() if getattr(dm, "has_test", False) else dm.val_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def run(cfg: DictConfig, task: TaskSpec, spec: ModelSpec, mode: str, started: float) -> Any:
    from lmlab.train import RunResult, _tags, build_trainer, output_dir_for, prepare_model_and_tokenizer, \
        save_resolved_config

    # Resolved once: an MLflow run id is downloaded once, and its path measured for the size on disk.
    source = pretrained.resolve(str(cfg.model.pretrained), cfg)
    local = _with(cfg, model={"pretrained": source})
    finetune = mode == "prune" and int(cfg.prune.finetune_steps) > 0
    # Dynamic int8 kernels (fbgemm / qnnpack) exist only on the CPU, and CPU latency is the point.
    eval_cfg = local if mode == "prune" else _with(local, trainer={
        "accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"})

    datamodule_cls = registry.get("datamodule", cfg.data.datamodule)
    dm = datamodule_cls(cfg.data, packing=task.packing(cfg), cache_dir=cfg.paths.cache, seed=int(cfg.seed))
    tokenizer, model, tok_info = prepare_model_and_tokenizer(local, task, spec, dm)
    if mode == "quantize":  # before the data is tokenized and the original scored
        quantize.check_group_size(model, str(cfg.quantize.method), int(cfg.quantize.get("group_size", 32)))
    dm.setup("fit" if finetune else "test")

    output_dir = output_dir_for(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_path = save_resolved_config(cfg, output_dir)
    origin = str(getattr(dm, "origin", None) or getattr(getattr(dm, "corpus", None), "origin", ""))
    mlrun = resume.open_run(cfg, None, _tags(cfg, task, spec, mode, output_dir, origin), output_dir, is_rank_zero())
    with resume.ending(mlrun, output_dir, mode):  # scoring and saving: a SIGTERM ends the run KILLED
        mlrun.artifact(config_path, "config")
        mlrun.dict({"tokenizer": tok_info, "source": source, "data": {**getattr(dm, "stats", {}), "origin": origin}},
                   "run_info.json")
        quiet, _, _ = build_trainer(eval_cfg, task, output_dir, False, model, shards_itself(dm))
        original = score(quiet, task.build_module(cfg, model, tokenizer), dm)
        values: dict[str, float] = {"original/n_parameters": float(sum(p.numel() for p in model.parameters())),
                                    "original/nonzero_parameters": float(prune.nonzero_parameters(model))}
        original_bytes = quantize.source_weights_bytes(source)
        if original_bytes is not None:  # not logged as 0 where the source's files cannot be found
            values["original/size_bytes"] = float(original_bytes)
        if mode == "quantize":
            smaller, saved_dir, extra = _quantize(cfg, model, tokenizer, dm, output_dir)
            mlrun.artifacts(saved_dir, "quantized")
        else:
            smaller, saved_dir, extra = _prune(cfg, local, task, model, tokenizer, dm, output_dir, mlrun)
            if saved_dir is not None:
                mlrun.artifacts(saved_dir, "model")
        values.update(extra)
        trainer, _, _ = build_trainer(eval_cfg, task, output_dir, mlrun.metrics_logger(cfg), smaller,
                                      shards_itself(dm))
        module = task.build_module(scoring_cfg(cfg, mode), smaller, tokenizer)
        metrics = score(trainer, module, dm)
        if hasattr(module, "export_predictions") and getattr(dm, "has_test", False):
            for path in module.export_predictions(output_dir / "predictions"):
                mlrun.artifact(path, "predictions")
        key = main_metric(task, metrics)
        values.update({f"original/{k}": v for k, v in original.items()})
        values.update({f"{mode}/delta/{k}": metrics[k] - original[k] for k in metrics if k in original})
        if key in original and key in metrics:
            values[f"{mode}/metric_delta"] = metrics[key] - original[key]
        for name, value in values.items():
            mlrun.metric(name, value)
        mlrun.params({f"{mode}/metric": key})
        metrics.update(values)
    log.info("%s: %s %.4f -> %.4f; saved in %s", mode, key, original.get(key, float("nan")),
             metrics.get(key, float("nan")), saved_dir)
    return RunResult(mlrun.run_id, tracking.tracking_uri(cfg), output_dir, metrics, saved_dir,
                     time.perf_counter() - started, key)


def _quantize(cfg: DictConfig, model: Any, tokenizer: Any, dm: Any, output_dir: Path) -> tuple[Any, Path, dict]:
    """Quantize, save, reload: the reloaded artifact is what gets scored, so the numbers describe it."""
    qcfg = cfg.quantize
    method, group = str(qcfg.method), int(qcfg.get("group_size", 32))
    model = model.float().cpu().eval()
    batches = _eval_batches(dm, int(qcfg.get("latency_batches", 5)))
    quantized, linearized = quantize.quantize(model, method, group)
    saved = quantize.save_quantized(quantized, method, linearized, tokenizer, output_dir / "quantized", group)
    reloaded = quantize.load_quantized(saved)
    before, after = quantize.cpu_latency_ms(model, batches), quantize.cpu_latency_ms(reloaded, batches)
    size = float(quantize.weights_bytes(saved))
    return reloaded, saved, {
        "quantize/size_bytes": size, "original/latency_ms_per_batch": before,
        "quantize/latency_ms_per_batch": after, "quantize/latency_speedup": before / after if after else 0.0,
    }


def _prune(cfg: DictConfig, local: DictConfig, task: TaskSpec, model: Any, tokenizer: Any, dm: Any,
           output_dir: Path, mlrun: Any) -> tuple[Any, Path | None, dict]:
    from lmlab.train import build_trainer

    pcfg = cfg.prune
    pruned = prune.prune_model(model, str(pcfg.method), float(pcfg.sparsity))
    log.info("prune: %s removed %d of %d (%.4f)", pruned.method, pruned.pruned, pruned.total, pruned.sparsity)
    steps = int(pcfg.finetune_steps)
    if steps > 0:
        # A short fit on the training split; the masks stay a reparametrisation meanwhile, so the
        # pruned weights stay zero whatever the optimizer does. No validation: the score comes after.
        tune_cfg = _with(local, trainer={"max_steps": steps, "max_epochs": -1, "limit_val_batches": 0,
                                         "num_sanity_val_steps": 0, "val_check_interval": steps},
                         checkpoint={"save_top_k": 0})
        trainer, _, _ = build_trainer(tune_cfg, task, output_dir, mlrun.metrics_logger(cfg), model,
                                      shards_itself(dm))
        try:
            faults.fit(trainer, task.build_module(cfg, model, tokenizer), dm)
        except faults.Preempted as exc:
            # Its message said to continue with resume=, which mode=prune refuses (check_config):
            # a stopped fine-tuning is run again from the start.
            raise faults.preempted_outside_training("prune", output_dir, exc.signum, exc.requeue) from exc
        finally:
            # The fine-tuning's last.ckpt (weights with their masks, optimizer state; three times the
            # model) is nothing a prune run can continue from or load: it would only take the disk.
            if is_rank_zero():
                shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    prune.finalize(pruned)
    model = model.eval()
    # One writer, as a fit's export: under DDP every process holds the same pruned weights, and two
    # writers replacing one directory collide (or swap it away while rank 0 logs it to MLflow).
    export_dir = export_hf(model, tokenizer, output_dir / "export") if cfg.export and is_rank_zero() else None
    values = {
        "prune/sparsity": pruned.sparsity, "prune/target_sparsity": pruned.target,
        "prune/pruned_units": float(pruned.pruned), "prune/total_units": float(pruned.total),
        "prune/n_parameters": float(sum(p.numel() for p in model.parameters())),
        "prune/nonzero_parameters": float(prune.nonzero_parameters(model)),
    }
    if export_dir is not None:
        values["prune/size_bytes"] = float(quantize.weights_bytes(export_dir))
    return model, export_dir, values
