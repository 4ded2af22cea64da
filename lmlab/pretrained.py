"""Find and load a pretrained backbone: a HF directory, an lmlab run, an MLflow run id or a hub name."""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lmlab.errors import config_error, file_error
from lmlab.paths import is_local_reference
from lmlab.specs import ModelSpec

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[0-9a-f]{32}")


def resolve(ref: str, cfg: DictConfig, key: str = "model.pretrained") -> str:
    """A local directory holding config.json, or a hub name left for transformers to fetch.

    ``key`` is the config key errors name (``distill.teacher`` accepts the same references).
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "quantization.json").exists() or (path / "quantized" / "quantization.json").exists():
            # from_pretrained would load it without error, with every quantized layer at random.
            raise config_error(
                key, f"'{ref}' is a mode=quantize run: its quantized/ model loads with "
                "lmlab.quantize.load_quantized, not as a model to train or score here",
                "Point it at the run the quantized model was made from (its model.pretrained).",
            )
        for candidate in (path, path / "export"):
            if (candidate / "config.json").exists():
                _check_json(candidate / "config.json")
                return str(candidate)
        raise config_error(
            key, f"directory '{ref}' holds neither config.json nor export/config.json",
            "Point it at a Hugging Face model directory or an lmlab run directory.",
        )
    if _RUN_ID.fullmatch(ref):
        return _download_run_model(ref, cfg, key)
    if is_local_reference(ref):
        raise config_error(key, f"'{ref}' does not exist (a relative path starts from {Path.cwd()})",
                           "Give an existing directory, an MLflow run id or a hub name.")
    return ref  # a hub name: only works online, and that is the user's choice


def _check_json(path: Path) -> None:
    # transformers reports a broken config.json without naming the file or the line.
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise file_error(path, f"is not valid JSON ({getattr(exc, 'msg', exc)})",
                         "model.pretrained needs a model directory written by save_pretrained",
                         line=getattr(exc, "lineno", None)) from exc


def _auto_config(ref: str, trust_remote_code: bool, key: str = "model.pretrained") -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:  # ValueError also when remote code is not trusted
        nowhere = "" if is_local_reference(ref) else f"; nor is it a directory under {Path.cwd()}"
        raise config_error(
            key, f"cannot load the model config of '{ref}' ({' '.join(str(exc).split())[:400]}){nowhere}",
            "Point it at a model written by save_pretrained. A model that ships its own Python code needs "
            "model.trust_remote_code=true: set it only for code you have read and trust.",
        ) from exc


def _download_run_model(run_id: str, cfg: DictConfig, key: str = "model.pretrained") -> str:
    import mlflow

    from lmlab.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
    try:
        client.get_run(run_id)
    except Exception as exc:
        raise config_error(key, f"no MLflow run '{run_id}' at {tracking_uri(cfg)}",
                           "Check the run id in the MLflow UI, or set logger.tracking_uri to its store.") from exc
    target = Path(tempfile.mkdtemp(prefix=f"lmlab-{run_id[:8]}-"))
    local = Path(client.download_artifacts(run_id, "model", str(target)))
    if not (local / "config.json").exists():
        raise config_error(key, f"MLflow run '{run_id}' has no exported model artifact",
                           "Use a run that finished with export=true.")
    log.info("Downloaded the model of MLflow run %s to %s", run_id, local)
    return str(local)


def load_model(spec: ModelSpec, head: str, ref: str, updates: dict[str, Any], trust_remote_code: bool = False) -> Any:
    """The task's head on top of the pretrained weights; a missing head is freshly initialised."""
    config = _auto_config(ref, trust_remote_code)
    expected = getattr(spec.config_class, "model_type", None)
    if expected and config.model_type != expected:
        raise config_error(
            "model.pretrained", f"'{ref}' is a '{config.model_type}' model but model={spec.name} expects '{expected}'",
            f"Pick the model group that matches it (model={config.model_type} if registered).",
        )
    model_class = spec.heads[head]
    # A new head (or one with another label count) is initialised fresh; HF logs which weights.
    model = model_class.from_pretrained(ref, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code,
                                        **updates)
    return model.train()  # from_pretrained returns eval mode; fine-tuning wants dropout on


def check_trained_head(spec: ModelSpec, head: str, ref: str, task: str, labels: list[str] | None,
                       trust_remote_code: bool = False) -> None:
    """mode=test / mode=predict evaluate a model as it is: its head must exist and match the data.

    Without this check ``from_pretrained`` would silently give a freshly initialised head and the
    evaluation would score random weights.
    """
    config = _auto_config(ref, trust_remote_code)
    wanted = spec.heads[head].__name__
    have = list(getattr(config, "architectures", None) or [])
    if wanted not in have:
        raise config_error(
            "model.pretrained", f"'{ref}' is a {', '.join(have) or 'bare model'}, not a {wanted} fine-tuned for "
            f"task={task}, so there is no trained head to evaluate",
            f"Fine-tune it first (lmlab task={task} model.pretrained={ref}) and pass that run here.",
        )
    if labels is None:
        return
    id2label = getattr(config, "id2label", None) or {}
    trained = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    if trained != list(labels):
        raise config_error(
            "model.pretrained", f"'{ref}' was trained with the labels {trained} and the data has {list(labels)}",
            "Evaluate it on data with the same label set (the labels are read from the training split).",
        )
