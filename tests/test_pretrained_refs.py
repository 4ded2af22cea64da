"""model.pretrained / distill.teacher references: an empty value is an error, and an MLflow run id is
downloaded once into lmlab's cache (keyed by store and run), atomically, then reused while it is the
run's current model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
from conftest import TINY, compose_cfg, free_port

from lmlab import pretrained
from lmlab.checks import check_numbers
from lmlab.errors import LmlabError
from lmlab.tracking import default_tracking_uri
from lmlab.train import run


# -- empty references ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", pretrained.REFERENCE_KEYS)
@pytest.mark.parametrize("value", ["", "' '"])
def test_an_empty_reference_is_an_error_naming_the_key(key: str, value: str, lmlab_home: Path) -> None:
    # model.pretrained=$(lookup) with a lookup that printed nothing must not train from scratch.
    cfg = compose_cfg([*TINY, "task=classification", f"{key}={value}"])
    with pytest.raises(LmlabError) as caught:
        run(cfg)
    message = str(caught.value)
    assert message.startswith(f"config key '{key}': it is empty"), message
    assert "MLflow run id" in message and f"{key}=null" in message
    assert not (lmlab_home / "mlflow.db").exists()  # stopped before any MLflow run was opened
    with pytest.raises(LmlabError, match=f"'{key}': it is empty"):
        pretrained.resolve(" ", cfg, key=key)


def test_null_or_unset_references_stay_unset() -> None:
    cfg = compose_cfg([*TINY, "model.pretrained=null"])
    check_numbers(cfg)  # no error
    assert pretrained.reference(cfg, "model.pretrained") is None
    assert pretrained.reference(cfg, "distill.teacher") is None
    cfg = compose_cfg([*TINY, "model.pretrained=some/dir"])
    assert pretrained.reference(cfg, "model.pretrained") == "some/dir"


# -- MLflow run ids --------------------------------------------------------------------------------
def _tiny_model(folder: Path) -> Path:
    """A tiny GPT-2 saved in ``folder``: each call draws other weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16)).save_pretrained(folder)
    return folder


def _run_with_model(home: Path, tmp_path: Path, finished: bool = True, with_model: bool = True) -> str:
    """A run in the embedded store lmlab uses under ``home``, holding a tiny model/ artifact."""
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(home))
    name = f"refs-{len(list(tmp_path.iterdir()))}"
    experiment = client.create_experiment(name, artifact_location=(tmp_path / "artifacts" / name).as_uri())
    run_id = client.create_run(experiment).info.run_id
    model = _tiny_model(tmp_path / "model_src" / name)
    client.log_artifacts(run_id, str(model), "model" if with_model else "other")
    if finished:
        client.set_terminated(run_id, "FINISHED")
    return run_id


class CountDownloads:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.calls = 0
        real = mlflow.MlflowClient.download_artifacts

        def counting(client, *args, **kwargs):
            self.calls += 1
            return real(client, *args, **kwargs)

        monkeypatch.setattr(mlflow.MlflowClient, "download_artifacts", counting)


def _staging_left(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*")] if root.exists() else []


def test_a_run_id_is_downloaded_once_into_the_cache_and_reused(lmlab_home: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "system_tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR: nothing may land there
    run_id = _run_with_model(lmlab_home, tmp_path)
    downloads = CountDownloads(monkeypatch)
    cfg = compose_cfg(TINY)
    cache = Path(str(cfg.paths.cache))

    first = Path(pretrained.resolve(run_id, cfg))
    assert downloads.calls == 1
    assert first.is_relative_to(cache / "mlflow_models") and (first / "config.json").is_file()
    assert run_id in first.parts
    source = json.loads((first.parent / "lmlab_source.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(lmlab_home))
    assert source == {"run_id": run_id, "status": "FINISHED", "tracking_uri": default_tracking_uri(lmlab_home),
                      "end_time": client.get_run(run_id).info.end_time}

    second = Path(pretrained.resolve(run_id, cfg, key="distill.teacher"))
    assert second == first and downloads.calls == 1  # reused, not downloaded again
    assert list(scratch.iterdir()) == [] and _staging_left(cache) == []
    # The same run id in another store is another model.
    other = pretrained.run_model_entry(cache, "http://elsewhere:5000", run_id)
    assert other != first.parent and other.name == run_id
    assert pretrained.recorded_name(run_id, str(first)) == run_id
    assert pretrained.recorded_name(str(tmp_path), str(tmp_path / "export")) == str(tmp_path / "export")


def test_an_unfinished_run_is_downloaded_again(lmlab_home: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A run that has not finished may export again (resumed): its cache entry is not trusted.
    run_id = _run_with_model(lmlab_home, tmp_path, finished=False)
    downloads = CountDownloads(monkeypatch)
    cfg = compose_cfg(TINY)
    first = pretrained.resolve(run_id, cfg)
    assert pretrained.resolve(run_id, cfg) == first and downloads.calls == 2
    assert (Path(first) / "config.json").is_file()
    assert _staging_left(Path(str(cfg.paths.cache))) == []


def test_a_run_without_a_model_leaves_nothing_in_the_cache(lmlab_home: Path, tmp_path: Path) -> None:
    run_id = _run_with_model(lmlab_home, tmp_path, with_model=False)
    cfg = compose_cfg(TINY)
    with pytest.raises(LmlabError, match=f"'distill.teacher': MLflow run '{run_id}' has no exported model"):
        pretrained.resolve(run_id, cfg, key="distill.teacher")
    with pytest.raises(LmlabError, match=f"'model.pretrained': no MLflow run '{'0' * 32}'"):
        pretrained.resolve("0" * 32, cfg)
    store = pretrained.run_model_entry(Path(str(cfg.paths.cache)), default_tracking_uri(lmlab_home), run_id).parent
    assert list(store.iterdir()) == []  # neither an entry nor a staging folder


def _weights(model: Path | str) -> bytes:
    return (Path(model) / "model.safetensors").read_bytes()


def test_a_resumed_run_that_finished_again_is_downloaded_again(lmlab_home: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # `resume=` reopens the same MLflow run, exports a new model/ and ends it again: fine-tuning from
    # that run id must start from the new weights, not from the download cached before the resume.
    run_id = _run_with_model(lmlab_home, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(lmlab_home))
    downloads = CountDownloads(monkeypatch)
    cfg = compose_cfg(TINY)
    first = pretrained.resolve(run_id, cfg)
    old = _weights(first)

    client.update_run(run_id, status="RUNNING")  # what lmlab.resume does to the run
    longer = _tiny_model(tmp_path / "model_src" / "longer")
    client.log_artifacts(run_id, str(longer), "model")
    ended = client.get_run(run_id).info.end_time
    client.set_terminated(run_id, "FINISHED", end_time=ended + 5000)

    caplog.set_level("INFO", logger="lmlab.pretrained")
    resumed = pretrained.resolve(run_id, cfg, key="distill.teacher")
    assert _weights(resumed) == _weights(longer) != old
    assert resumed == first and downloads.calls == 2
    assert "is stale" in caplog.text
    assert pretrained.resolve(run_id, cfg) == first and downloads.calls == 2  # the new download is reused
    # Resumed once more: while it runs, its cached model is not trusted.
    client.update_run(run_id, status="RUNNING")
    assert pretrained.resolve(run_id, cfg) == first and downloads.calls == 3
    assert _staging_left(Path(str(cfg.paths.cache))) == []


def test_a_cache_entry_without_the_end_time_is_downloaded_again_once(lmlab_home: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Entries written before the end time was recorded cannot tell whether the run ended again since.
    run_id = _run_with_model(lmlab_home, tmp_path)
    downloads = CountDownloads(monkeypatch)
    cfg = compose_cfg(TINY)
    model = Path(pretrained.resolve(run_id, cfg))
    source_file = model.parent / "lmlab_source.json"
    source = json.loads(source_file.read_text())
    source_file.write_text(json.dumps({k: v for k, v in source.items() if k != "end_time"}))
    assert pretrained.resolve(run_id, cfg) == str(model) and downloads.calls == 2
    assert json.loads(source_file.read_text()) == source
    assert pretrained.resolve(run_id, cfg) == str(model) and downloads.calls == 2


def test_a_finished_run_cached_is_used_unchecked_when_its_store_does_not_answer(
        lmlab_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    run_id = _run_with_model(lmlab_home, tmp_path)
    unfinished = _run_with_model(lmlab_home, tmp_path, finished=False)
    cfg = compose_cfg(TINY)
    cache = Path(str(cfg.paths.cache))
    # The entries a server, now down, served earlier: the same files under that store's folder.
    dead = f"http://127.0.0.1:{free_port()}"
    for ref in (run_id, unfinished):
        downloaded = Path(pretrained.resolve(ref, cfg)).parent
        entry = pretrained.run_model_entry(cache, dead, ref)
        entry.parent.mkdir(parents=True, exist_ok=True)
        downloaded.rename(entry)
    offline = compose_cfg([*TINY, f"logger.tracking_uri={dead}"])

    caplog.set_level("INFO", logger="lmlab.pretrained")
    model = pretrained.resolve(run_id, offline)
    assert model == str(pretrained.run_model_entry(cache, dead, run_id) / "model")
    assert "unchecked" in caplog.text and dead in caplog.text
    # An unfinished run's model may have changed since, and nothing else is there to use.
    for ref in (unfinished, "0" * 32):
        with pytest.raises(LmlabError, match=f"no MLflow run '{ref}' at {dead}"):
            pretrained.resolve(ref, offline)


# -- loading ---------------------------------------------------------------------------------------
def test_a_pretrained_t5_without_n_positions_has_no_length_to_check() -> None:
    # google/t5-v1_1-* and mT5 configs, and any T5 saved with the stock config, lack n_positions:
    # fine-tuning one stopped with AttributeError before the first step.
    from transformers import T5Config

    from lmlab.models.build import check_positions
    from lmlab.models.t5 import MODEL as T5
    from lmlab.models.t5 import T5Config as LmlabT5Config

    assert not hasattr(T5Config(), "n_positions")
    check_positions(T5, T5Config(), "data.block_size", 4096)
    # lmlab's own T5 records a nominal limit, and data.block_size is still checked against it.
    with pytest.raises(LmlabError, match=r"'data.block_size': 4096 is longer .* \(n_positions=512\)"):
        check_positions(T5, LmlabT5Config(), "data.block_size", 4096)


@pytest.mark.parametrize("damage", ["cut_short", "missing"])
def test_a_model_directory_with_broken_weights_is_an_error_naming_it(tmp_path: Path, damage: str) -> None:
    from lmlab.models.gpt2 import MODEL as GPT2

    folder = _tiny_model(tmp_path / "copied_export")
    weights = folder / "model.safetensors"
    if damage == "cut_short":  # a copy that stopped midway: safetensors' own error names no file
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    with pytest.raises(LmlabError, match=rf"'model.pretrained': cannot load the weights of '{re.escape(str(folder))}'"):
        pretrained.load_model(GPT2, "causal_lm", str(folder), {})


def test_model_config_fields_apply_to_a_pretrained_model_only_when_they_keep_its_weights(tmp_path: Path) -> None:
    # model.config.* used to be ignored with model.pretrained: a fine-tuning run asked for dropout 0.3
    # trained with the saved 0.1, and nothing said so.
    import torch
    from transformers import GPT2LMHeadModel

    from lmlab.models.gpt2 import MODEL as GPT2

    folder = _tiny_model(tmp_path / "gpt2")
    saved = GPT2LMHeadModel.from_pretrained(folder)
    model = pretrained.load_model(GPT2, "causal_lm", str(folder), {}, overrides={"resid_pdrop": 0.3, "attn_pdrop": 0.0})
    assert (model.config.resid_pdrop, model.config.attn_pdrop, model.config.embd_pdrop) == (0.3, 0.0, 0.1)
    assert model.transformer.h[0].mlp.dropout.p == 0.3
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values()))
    # A field that changes a weight's shape or the set of weights would load with those weights at
    # random (from_pretrained runs with ignore_mismatched_sizes for new heads): refused, naming it.
    where = re.escape(str(folder))
    with pytest.raises(LmlabError, match=rf"'model.config.hidden_size': 16 changes the weights of '{where}' "
                                         r"\(transformer.wte.weight would be \[16, 16\] instead of \[16, 8\]\)"):
        pretrained.load_model(GPT2, "causal_lm", str(folder), {}, overrides={"resid_pdrop": 0.2, "hidden_size": 16})
    with pytest.raises(LmlabError, match=r"'model.config.n_layer': 2 changes .* \(transformer.h.1.ln_1.weight would be new\)"):
        pretrained.load_model(GPT2, "causal_lm", str(folder), {}, overrides={"n_layer": 2})
    with pytest.raises(LmlabError, match=r"'model.config.n_head': GPT2Config of .* refused 3"):
        pretrained.load_model(GPT2, "causal_lm", str(folder), {}, overrides={"n_head": 3})


class _Data:
    """What prepare_model_and_tokenizer asks of a causal-LM datamodule: to be handed the tokenizer."""

    def set_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer


def test_a_run_from_a_pretrained_model_applies_and_checks_model_config(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmlab.models.gpt2 import MODEL as GPT2
    from lmlab.registry import get
    from lmlab.train import prepare_model_and_tokenizer

    folder = _tiny_model(tmp_path / "gpt2")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(15)} | {"<eos>": 15}, unk_token="<eos>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>").save_pretrained(folder)
    common = [*TINY, "task=clm", "model=gpt2", f"model.pretrained={folder}", "data.block_size=16"]
    task = get("task", "clm")
    _, model, _ = prepare_model_and_tokenizer(compose_cfg([*common, "model.config.attn_pdrop=0.25"]), task, GPT2, _Data())
    assert (model.config.attn_pdrop, model.config.resid_pdrop) == (0.25, 0.1)  # the rest as saved
    for extra, error in [("model.config.resid_drop=0.2", "'model.config.resid_drop': not a field of GPT2Config"),
                         ("model.config.pad_token_id=40", "'model.config.pad_token_id': 40 is not a token id"),
                         ("model.config.n_embd=16", "'model.config.n_embd': 16 changes the weights")]:
        with pytest.raises(LmlabError, match=re.escape(error)):
            prepare_model_and_tokenizer(compose_cfg([*common, extra]), task, GPT2, _Data())


def test_a_trained_head_for_other_labels_starts_fresh_even_when_its_shape_fits(tmp_path: Path) -> None:
    """from_pretrained(ignore_mismatched_sizes=True) starts a head fresh only when its shape changes: a
    token classifier trained on 3 other tags (or a sequence classifier with as many labels) kept its
    weights, so its old label 0 began as the data's label 0. The data's own labels keep the head."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    from lmlab.models.bert import MODEL as BERT
    from lmlab.pretrained import load_model

    config = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, id2label={0: "O", 1: "B-geo", 2: "I-geo"})
    for model_class in (BertForTokenClassification, BertForSequenceClassification):
        trained = model_class(config)
        torch.nn.init.constant_(trained.classifier.weight, 1.0)
        trained.save_pretrained(tmp_path / model_class.__name__)
    saved = tmp_path / "BertForTokenClassification"

    def head(updates: dict, source: Path = saved) -> torch.Tensor:
        return load_model(BERT, "token_classification", str(source), updates).classifier.weight.detach()

    same = {"id2label": {0: "O", 1: "B-geo", 2: "I-geo"}, "label2id": {"O": 0, "B-geo": 1, "I-geo": 2}}
    other = {"id2label": {0: "O", 1: "B-PER", 2: "I-PER"}, "label2id": {"O": 0, "B-PER": 1, "I-PER": 2}}
    assert torch.equal(head(same), torch.ones(3, 32))  # fine-tuning on the head's own tags keeps it
    fresh = head(other)
    assert not torch.any(fresh == 1.0) and 0.01 < float(fresh.std()) < 0.03  # BERT's initializer_range 0.02
    fresh = head(same, tmp_path / "BertForSequenceClassification")  # a sentence head is no token head
    assert not torch.any(fresh == 1.0)
    bare = load_model(BERT, "token_classification", str(saved), {})  # a task without labels: as saved
    assert torch.equal(bare.classifier.weight.detach(), torch.ones(3, 32))
