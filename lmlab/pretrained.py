"""Find and load a pretrained backbone: a HF directory, an lmlab run, an MLflow run id or a hub name."""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lmlab import atomic, fingerprint
from lmlab.errors import LmlabError, config_error, file_error
from lmlab.models.build import REJECTED
from lmlab.paths import is_local_reference, writable_cache_dir
from lmlab.specs import ModelSpec

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[0-9a-f]{32}")
# The keys that name a model to load; both take the references ``resolve`` accepts.
REFERENCE_KEYS = ("model.pretrained", "distill.teacher")
# What the cache entry of a downloaded run model records (beside its model/ folder).
_SOURCE_FILE = "lmlab_source.json"


def reference(cfg: DictConfig, key: str) -> str | None:
    """The model reference at ``key`` (see REFERENCE_KEYS): None when unset or null, else its text.

    An empty value is an error, not "unset": ``model.pretrained=$(lookup)`` whose lookup printed
    nothing would otherwise train a random model, or drop the teacher, without a word.
    """
    value = OmegaConf.select(cfg, key, default=None)
    if value is None:
        return None
    if not str(value).strip():
        raise _empty(key)
    return str(value)


def _empty(key: str) -> LmlabError:
    return config_error(key, "it is empty", "Give a directory, an MLflow run id or a hub name, or leave it out "
                        f"({key}=null) to go without one.")


def resolve(ref: str, cfg: DictConfig, key: str = "model.pretrained") -> str:
    """A local directory holding config.json, or a hub name left for transformers to fetch.

    ``key`` is the config key errors name (``distill.teacher`` accepts the same references).
    An MLflow run id is resolved to its model downloaded into lmlab's cache (``paths.cache``).
    """
    if not ref.strip():
        raise _empty(key)
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
    if path.exists():  # a file: a model is a directory (a checkpoint file is for resume=)
        raise config_error(key, f"'{ref}' is a file, not a model directory",
                           "Point it at a Hugging Face model directory (with config.json) or an lmlab run "
                           "directory; a .ckpt checkpoint continues a run with resume=FILE instead.")
    if _RUN_ID.fullmatch(ref):
        return _download_run_model(ref, cfg, key)
    if is_local_reference(ref):
        raise config_error(key, f"'{ref}' does not exist (a relative path starts from {Path.cwd()})",
                           "Give an existing directory, an MLflow run id or a hub name.")
    return ref  # a hub name: only works online, and that is the user's choice


def recorded_name(ref: str, resolved: str) -> str:
    """What names a resolved model in MLflow params and logs.

    An MLflow run id stays the run id: its local copy is only a cache entry. Anything else is the
    directory (or hub name) ``resolve`` found.
    """
    return ref if _RUN_ID.fullmatch(ref) and not Path(ref).expanduser().is_dir() else resolved


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
    """The ``model/`` artifact of MLflow run ``run_id``, in lmlab's cache: downloaded once per store.

    A finished run's entry is reused (a BERT-base is not copied again for every run) while the store
    reports the status and end time the entry recorded: a resumed run exports a new model and ends
    again, later. A run that has not finished may still export, so it is downloaded each time into
    the same entry. When the store cannot answer, a finished run's entry is used unchecked (offline).
    """
    from lmlab.tracking import tracking_uri

    uri = tracking_uri(cfg)
    entry = run_model_entry(Path(str(cfg.paths.cache)), uri, run_id)
    cached = _entry_source(entry)
    try:
        current = _run_source(run_id, uri)
    except Exception as exc:
        if cached is not None and cached.get("status") == "FINISHED":
            log.warning("Using the model of MLflow run %s cached in %s unchecked: the store %s could not be asked "
                        "whether the run has ended again since (%s)", run_id, entry / "model", uri,
                        " ".join(str(exc).split())[:200])
            return str(entry / "model")
        raise config_error(key, f"no MLflow run '{run_id}' at {uri}",
                           "Check the run id in the MLflow UI, or set logger.tracking_uri to its store.") from exc
    if cached == current and current["status"] == "FINISHED":
        log.info("Using the model of MLflow run %s cached in %s", run_id, entry / "model")
        return str(entry / "model")
    if cached is not None and cached.get("status") == "FINISHED":
        log.info("The model of MLflow run %s cached in %s is stale (cached: %s; the run now: %s): downloading it "
                 "again", run_id, entry / "model", _describe(cached), _describe(current))
    _download_into(entry, current, key)
    log.info("Downloaded the model of MLflow run %s to %s", run_id, entry / "model")
    return str(entry / "model")


def run_model_entry(cache: Path, uri: str, run_id: str) -> Path:
    """Where the model of ``run_id`` in the store ``uri`` is cached: run ids are unique per store only."""
    return Path(cache) / "mlflow_models" / fingerprint.of_params(tracking_uri=uri)[:16] / run_id


def _entry_source(entry: Path) -> dict[str, Any] | None:
    """What a complete cache entry says it was downloaded from; None when there is no usable entry."""
    try:
        source = json.loads((entry / _SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return source if isinstance(source, dict) and (entry / "model" / "config.json").is_file() else None


def _run_source(run_id: str, uri: str) -> dict[str, Any]:
    """The run as the store reports it now, in the form a cache entry records it."""
    import mlflow

    from lmlab.tracking import quiet_env

    quiet_env()  # a dead server must not hold up the fallback to the cache with minutes of retries
    info = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info
    # end_time changes each time a resumed run ends again, with the model it exported then.
    return {"run_id": run_id, "tracking_uri": uri, "status": str(info.status), "end_time": info.end_time}


def _describe(source: dict[str, Any]) -> str:
    end = source.get("end_time")
    if not isinstance(end, int):  # entries written before lmlab recorded it, or a run that never ended
        return f"{source.get('status')}, no end time recorded"
    return f"{source.get('status')}, ended {datetime.fromtimestamp(end / 1000, timezone.utc):%Y-%m-%d %H:%M:%S.%f} UTC"


def _download_into(entry: Path, source: dict[str, Any], key: str) -> None:
    """Download into a folder beside ``entry``, then rename it there: never a half-written entry."""
    run_id, uri = source["run_id"], source["tracking_uri"]
    writable_cache_dir(entry.parent)  # a model that could not be kept is not downloaded
    with atomic.staging_dir(entry) as staging:  # also removes what downloads killed midway left there
        local = _download_model_artifact(run_id, uri, staging)
        if local is None or not (local / "config.json").exists():
            raise config_error(key, f"MLflow run '{run_id}' has no exported model artifact",
                               "Use a run that finished with export=true.")
        atomic.write_json(staging / _SOURCE_FILE, source)
        atomic.plain_permissions(staging)  # the staging folder's 0700 would keep other users of a shared cache out
        _publish(staging, entry, source)


def _download_model_artifact(run_id: str, uri: str, where: Path) -> Path | None:
    """The run's ``model/`` artifact downloaded under ``where``; None when the run has none."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    if not any(a.path == "model" for a in client.list_artifacts(run_id)):
        return None
    return Path(client.download_artifacts(run_id, "model", str(where)))


def _publish(staging: Path, entry: Path, source: dict[str, Any]) -> None:
    """``staging`` becomes ``entry``, unless another process has published the same download meanwhile."""
    if entry.exists() and not (source["status"] == "FINISHED" and _entry_source(entry) == source):
        # An unfinished run's earlier download, or a stale one: replaced.
        old = entry.with_name(atomic.staging_name(entry, "old"))
        try:
            os.replace(entry, old)
        except FileNotFoundError:
            pass  # another process moved it away first
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(staging, entry)  # fails on an existing, non-empty entry: the first writer wins
    except OSError:
        if not (entry / "model" / "config.json").is_file():
            raise
        # Another process (a DDP rank, a parallel sweep job) published the same download first and
        # may be reading it already: keep that one.
        shutil.rmtree(staging, ignore_errors=True)


def load_model(spec: ModelSpec, head: str, ref: str, updates: dict[str, Any], trust_remote_code: bool = False,
               overrides: dict[str, Any] | None = None) -> Any:
    """The task's head on top of the pretrained weights; a missing head is freshly initialised.

    ``overrides`` (``model.config.*``) change the loaded config, as ``from_pretrained``'s keyword
    arguments do; each must keep every weight's shape (see ``check_weights_kept``).
    """
    config = _auto_config(ref, trust_remote_code)
    expected = getattr(spec.config_class, "model_type", None)
    if expected and config.model_type != expected:
        raise config_error(
            "model.pretrained", f"'{ref}' is a '{config.model_type}' model but model={spec.name} expects '{expected}'",
            f"Pick the model group that matches it (model={config.model_type} if registered).",
        )
    model_class = spec.heads[head]
    if overrides:
        check_weights_kept(model_class, config, ref, overrides, updates)
    from safetensors import SafetensorError

    try:
        # A new head (or one with another label count) is initialised fresh; HF logs which weights.
        model = model_class.from_pretrained(ref, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code,
                                            **{**(overrides or {}), **updates})
    except (OSError, SafetensorError) as exc:
        # A weights file cut short (a copy that stopped, a full disk) gives safetensors' bare "incomplete
        # metadata" traceback, which names no file; a missing one, a traceback from deep in transformers.
        raise config_error(
            "model.pretrained", f"cannot load the weights of '{ref}' ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:400]})",
            "Point it at a complete model directory written by save_pretrained (an lmlab export is written "
            "whole; a copy of one may not be).",
        ) from exc
    if _fresh_head_wanted(config, model_class, updates):
        reinitialise_head(model)
    return model.train()  # from_pretrained returns eval mode; fine-tuning wants dropout on


def _fresh_head_wanted(config: Any, model_class: Any, updates: dict[str, Any]) -> bool:
    """Whether the data wants another head than the one saved: other label names, or another kind of head.

    ``ignore_mismatched_sizes`` starts a head fresh only when its shape changes: a trained head for 3
    other labels (or a sequence classifier loaded as a token classifier) kept its weights, and its old
    label 0 started out as the data's label 0.
    """
    labels = updates.get("id2label")
    if labels is None:
        return False
    saved = getattr(config, "id2label", None) or {}
    kinds = getattr(config, "architectures", None) or []  # none recorded: judged by the labels alone
    same_kind = not kinds or model_class.__name__ in kinds
    return not same_kind or [saved[i] for i in sorted(saved)] != [labels[i] for i in sorted(labels)]


def reinitialise_head(model: Any) -> None:
    """Every module beside the backbone (``base_model_prefix``) initialised as the model class does."""
    for name, child in model.named_children():
        if name != model.base_model_prefix:
            for tensor in (*child.parameters(), *child.buffers()):
                # transformers' init functions skip a tensor from_pretrained marked as loaded.
                tensor._is_hf_initialized = False
            child.apply(model._init_weights)


def check_weights_kept(model_class: Any, config: Any, ref: str, overrides: dict[str, Any],
                       updates: dict[str, Any]) -> None:
    """Each ``model.config.*`` set on a pretrained model must leave every weight's name and shape.

    ``from_pretrained`` runs with ``ignore_mismatched_sizes`` (a task's new head may have another label
    count), so a width or a layer count changed there would load without error and silently start those
    weights at random. The two models are built on the meta device: shapes only, no memory, no init.
    """
    base = _weight_shapes(model_class, config, updates)
    for key, value in overrides.items():
        try:
            changed = _weight_shapes(model_class, config, {**updates, key: value})
        except REJECTED as exc:
            raise config_error(f"model.config.{key}", f"{type(config).__name__} of '{ref}' refused {value!r} "
                               f"({' '.join(str(exc).split())[:300]})", "Fix the value or leave it out.") from exc
        difference = _first_difference(base, changed)
        if difference:
            raise config_error(
                f"model.config.{key}", f"{value!r} changes the weights of '{ref}' ({difference}), so the pretrained "
                "ones would not load into them",
                "Leave it out to fine-tune the model as it was trained (only fields that keep every weight's shape, "
                "such as dropout, can be changed), or drop model.pretrained to train that architecture from scratch.",
            )


def _weight_shapes(model_class: Any, config: Any, changes: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch

    config = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(config, key, value)
    with torch.device("meta"):
        model = model_class(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _first_difference(base: dict[str, tuple[int, ...]], changed: dict[str, tuple[int, ...]]) -> str:
    for name, shape in base.items():
        if name not in changed:
            return f"{name} would be left out"
        if changed[name] != shape:
            return f"{name} would be {list(changed[name])} instead of {list(shape)}"
    extra = next((name for name in changed if name not in base), None)
    return f"{extra} would be new" if extra else ""


def check_vocabulary(model: Any, tokenizer: Any, key: str = "model.pretrained") -> None:
    """The tokenizer's ids must all be rows of the model's input embeddings.

    A tokenizer with more tokens than the model's ``vocab_size`` (a model directory holding another
    model's tokenizer, say) would otherwise fail at the first batch with torch's bare
    ``IndexError: index out of range in self`` (on a GPU, a device-side assert).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    tokens = len(tokenizer)
    if tokens > rows:
        raise config_error(
            key, f"the tokenizer has {tokens} tokens but the model's embeddings have {rows} rows "
            f"(config.vocab_size={getattr(model.config, 'vocab_size', '?')}): its ids {rows}..{tokens - 1} "
            "have no embedding, so tokenizer and model do not belong together",
            "Use a model directory whose tokenizer is the one the model was trained with "
            "(an lmlab export keeps them together).",
        )


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
