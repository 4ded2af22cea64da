"""mode=test scores a trained run as it is; mode=predict labels a file with it.

The check that matters: a run's own test-split predictions (written by mode=fit with the final
weights) equal what mode=predict writes for the same file, and mode=test reproduces the fit's test
metrics from the export alone.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from lmlab.errors import LmlabError
from lmlab.train import run
from tests.conftest import SHARED_DATA, TINY, compose_cfg

ROTTEN = SHARED_DATA / "classification" / "rotten_tomatoes"
WNUT = SHARED_DATA / "ner" / "wnut16"
NEWS = SHARED_DATA / "summarization" / "news_titles"
# Final weights everywhere: no best checkpoint (save_top_k=0), so fit's test split and the export agree.
FINAL = [*TINY, "data.max_documents=null", "checkpoint.save_top_k=0", "trainer.num_sanity_val_steps=0"]


def lmlab(*overrides: str):
    cfg = compose_cfg([*FINAL, *overrides])
    OmegaConf.resolve(cfg)
    return run(cfg)


def head_lines(src: Path, dst: Path, n: int, blank_separated: bool = False) -> None:
    """The first n records (lines, or blank-line separated sentences) of a real data file."""
    text = src.read_text(encoding="utf-8")
    if blank_separated:
        dst.write_text("\n\n".join(text.strip().split("\n\n")[:n]) + "\n\n", encoding="utf-8")
    else:
        dst.write_text("\n".join(text.splitlines()[:n]) + "\n", encoding="utf-8")


def artifacts(result, path: str) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    return [a.path for a in client.list_artifacts(result.run_id, path)]


def tag(result, key: str) -> str:
    return mlflow.MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).data.tags[key]


def wnut_head(folder: Path, lines: dict[str, int]) -> Path:
    """``folder`` with the first sentences of WNUT-16's splits (up to ``lines[split]`` lines each)."""
    if not WNUT.exists():
        pytest.skip(f"real test data missing: {WNUT}")
    folder.mkdir()
    for split, n in lines.items():
        head_lines(WNUT / f"{split}.conll", folder / f"{split}.conll", n, blank_separated=True)
    return folder


@pytest.fixture
def rotten_small(tmp_path: Path) -> Path:
    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    folder = tmp_path / "rotten"
    folder.mkdir()
    for split, n in (("train", 301), ("validation", 41), ("test", 31)):  # header + rows
        head_lines(ROTTEN / f"{split}.csv", folder / f"{split}.csv", n)
    return folder


@pytest.mark.slow
def test_classification_test_and_predict_reproduce_the_fit(rotten_small: Path, tmp_path: Path) -> None:
    # The worst validation loss picks the checkpoint, so the run ends on weights that are not the
    # last step's: what it exports, tests and predicts must still be the same model.
    fit = lmlab("task=classification", f"data.path={rotten_small}", "checkpoint.save_top_k=1",
                "checkpoint.monitor=val/loss", "checkpoint.mode=max")
    assert [p.name for p in (fit.output_dir / "checkpoints").glob("best-*")] == ["best-step=5.ckpt"]
    with open(fit.output_dir / "predictions" / "test_predictions.csv", encoding="utf-8", newline="") as f:
        expected = list(csv.DictReader(f))

    scored = lmlab("task=classification", f"data.path={rotten_small}", "mode=test", f"model.pretrained={fit.output_dir}")
    for key in ("test/accuracy", "test/macro_f1", "test/loss"):
        assert scored.metrics[key] == pytest.approx(fit.metrics[key], abs=1e-5), key
    assert tag(scored, "lmlab.mode") == "test" and scored.export_dir is None
    assert not any(k.startswith("train/") for k in scored.metrics)

    # Predict from the MLflow run id this time (the other way to name a run).
    predicted = lmlab("task=classification", f"data.path={rotten_small / 'test.csv'}", "mode=predict",
                      f"model.pretrained={fit.run_id}")
    assert artifacts(predicted, "predictions") == ["predictions/predictions.csv"]
    assert tag(predicted, "lmlab.mode") == "predict" and predicted.metrics["predict/examples"] == 30
    with open(predicted.output_dir / "predictions" / "predictions.csv", encoding="utf-8", newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["predicted"] for r in got] == [r["predicted"] for r in expected]
    assert [r["gold"] for r in got] == [r["gold"] for r in expected]
    assert [float(r["probability"]) for r in got] == pytest.approx([float(r["probability"]) for r in expected], abs=1e-4)

    # A file with text only (no label column) is enough to predict.
    plain = tmp_path / "reviews.txt"
    plain.write_text("a warm , funny , moving film\n\nthe plot is a mess and the acting is worse\n", encoding="utf-8")
    result = lmlab("task=classification", f"data.path={plain}", "mode=predict", f"model.pretrained={fit.output_dir}")
    with open(result.output_dir / "predictions" / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and set(rows[0]) == {"text", "predicted", "probability"}
    assert {r["predicted"] for r in rows} <= {"fresh", "rotten"}


@pytest.mark.slow
def test_ner_test_and_predict_reproduce_the_fit(tmp_path: Path) -> None:
    folder = wnut_head(tmp_path / "wnut", {"train": 300, "validation": 30, "test": 25})
    fit = lmlab("task=ner", f"data.path={folder}")
    expected = (fit.output_dir / "predictions" / "test_predictions.conll").read_text(encoding="utf-8")

    scored = lmlab("task=ner", f"data.path={folder}", "mode=test", f"model.pretrained={fit.export_dir}")
    for key in ("test/f1", "test/token_accuracy", "test/loss"):
        assert scored.metrics[key] == pytest.approx(fit.metrics[key], abs=1e-5), key

    predicted = lmlab("task=ner", f"data.path={folder / 'test.conll'}", "mode=predict",
                      f"model.pretrained={fit.output_dir}")
    got = (predicted.output_dir / "predictions" / "predictions.conll").read_text(encoding="utf-8")
    assert got.split("\n\n") == expected.split("\n\n")  # token, gold, predicted per line; same sentences
    assert predicted.metrics["predict/examples"] == 25

    # Plain text, one sentence per line: one CoNLL block per sentence, a tag per word.
    plain = tmp_path / "tweets.txt"
    plain.write_text("Watching the Yankees in New York tonight\nno entities here at all\n", encoding="utf-8")
    result = lmlab("task=ner", f"data.path={plain}", "mode=predict", f"model.pretrained={fit.output_dir}")
    blocks = (result.output_dir / "predictions" / "predictions.conll").read_text(encoding="utf-8").strip().split("\n\n")
    labels = set(json.loads((fit.export_dir / "config.json").read_text())["id2label"].values())
    assert [len(b.splitlines()) for b in blocks] == [7, 5]
    assert all(line.split("\t")[1] in labels for b in blocks for line in b.splitlines())


@pytest.mark.slow
def test_summarization_predict_generates_what_the_fit_generated(tmp_path: Path) -> None:
    if not NEWS.exists():
        pytest.skip(f"real test data missing: {NEWS}")
    folder = tmp_path / "news"
    folder.mkdir()
    for split, n in (("train", 200), ("validation", 16), ("test", 12)):
        head_lines(NEWS / f"{split}.jsonl", folder / f"{split}.jsonl", n)
    common = ["task=summarization", "task.generation.max_new_tokens=8"]
    fit = lmlab(*common, f"data.path={folder}")
    expected = [json.loads(line) for line in
                (fit.output_dir / "predictions" / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    predicted = lmlab(*common, f"data.path={folder / 'test.jsonl'}", "mode=predict", f"model.pretrained={fit.output_dir}")
    rows = [json.loads(line) for line in
            (predicted.output_dir / "predictions" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"document", "summary", "reference"}
    assert [r["summary"] for r in rows] == [e["generated"] for e in expected]


def test_mode_errors_come_before_any_data(tmp_path: Path, lmlab_home: Path) -> None:
    bare = tmp_path / "bare"
    with pytest.raises(LmlabError, match="mode=test needs a trained model"):
        lmlab("task=ner", "mode=test")
    with pytest.raises(LmlabError, match="task 'mlm' has no predict mode"):
        lmlab("task=mlm", "mode=predict", f"model.pretrained={bare}")
    with pytest.raises(LmlabError, match="mode=predict needs the file"):
        lmlab("task=ner", "mode=predict", f"model.pretrained={bare}")
    with pytest.raises(LmlabError, match="config key 'data.path': '.*nothere.txt' does not exist"):
        lmlab("task=ner", "mode=predict", f"model.pretrained={bare}", f"data.path={tmp_path / 'nothere.txt'}")
    here = tmp_path / "here.txt"
    here.write_text("a line\n", encoding="utf-8")
    with pytest.raises(LmlabError, match="use_distributed_sampler': is true, and mode=predict shares the rows"):
        lmlab("task=ner", "mode=predict", f"model.pretrained={bare}", f"data.path={here}",
              "trainer.use_distributed_sampler=true")
    assert not (lmlab_home / "mlflow.db").exists()  # no run was opened
    with pytest.raises(LmlabError, match="unknown mode 'train'"):
        lmlab("mode=train")


def test_mode_test_refuses_a_model_without_a_trained_head(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 is a bare encoder: scoring it for NER would score a random head."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path / "bare"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a"]) + "\n", encoding="utf-8")
    BertModel(BertConfig(vocab_size=7, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    text = tmp_path / "s.txt"
    text.write_text("the a\n", encoding="utf-8")
    with pytest.raises(LmlabError, match="no trained head to evaluate") as info:
        lmlab("task=ner", "mode=predict", f"data.path={text}", f"model.pretrained={folder}")
    assert "BertModel" in str(info.value) and "BertForTokenClassification" in str(info.value)


# -- data with some of the model's labels -----------------------------------------------------------
def conll_sentences(path: Path) -> list[list[tuple[str, str]]]:
    blocks = path.read_text(encoding="utf-8").strip().split("\n\n")
    return [[tuple(line.split("\t")[:2]) for line in block.splitlines()] for block in blocks]  # type: ignore[misc]


def write_conll(path: Path, sentences: list[list[tuple[str, ...]]]) -> None:
    path.write_text("\n\n".join("\n".join("\t".join(t) for t in s) for s in sentences) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_ner_mode_test_scores_data_with_some_of_the_models_tags(tmp_path: Path) -> None:
    from seqeval.metrics import f1_score

    full = wnut_head(tmp_path / "full", {"train": 300, "validation": 30})
    # Two steps at a learning rate that barely moves the weights: the head stays as initialised, so
    # it predicts many different tags and a wrong id mapping would show in every metric (at the
    # default rate two steps already teach it the majority tag O).
    fit = lmlab("task=ner", f"data.path={full}", "trainer.max_steps=2", "optimizer.lr=1e-7")
    model_tags = list(json.loads((fit.export_dir / "config.json").read_text())["id2label"].values())
    few = {"O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"}
    assert few < set(model_tags)
    chosen = [s for s in conll_sentences(WNUT / "test.conll") if {t for _, t in s} <= few][:40]
    assert any(t != "O" for s in chosen for _, t in s)

    # The same sentences scored twice: as the test split of data whose training file has all the
    # model's tags (labels equal, as before), and as a directory that has only five of them.
    write_conll(full / "test.conll", chosen)
    subset = tmp_path / "subset"
    subset.mkdir()
    for split in ("train", "validation", "test"):
        write_conll(subset / f"{split}.conll", chosen)
    model = f"model.pretrained={fit.output_dir}"
    as_full = lmlab("task=ner", f"data.path={full}", "mode=test", model)
    as_subset = lmlab("task=ner", f"data.path={subset}", "mode=test", model)
    for key in ("test/f1", "test/precision", "test/recall", "test/token_accuracy", "test/loss", "test/f1_person"):
        assert math.isfinite(as_subset.metrics[key]), key
        assert as_subset.metrics[key] == pytest.approx(as_full.metrics[key], abs=1e-6), key

    # And by hand: seqeval on the predictions file the run wrote (token, gold, predicted).
    written = (as_subset.output_dir / "predictions" / "test_predictions.conll").read_text(encoding="utf-8")
    rows = [[line.split("\t") for line in block.splitlines()] for block in written.strip().split("\n\n")]
    gold, predicted = [[r[1] for r in s] for s in rows], [[r[2] for r in s] for s in rows]
    assert gold == [[t for _, t in s] for s in chosen]
    assert {t for s in predicted for t in s} - few, "the near-random head should predict tags outside the five"
    assert as_subset.metrics["test/f1"] == pytest.approx(f1_score(gold, predicted), abs=1e-6)

    # A tag the model does not have cannot be scored: refused, naming the tag, file and line.
    write_conll(subset / "test.conll", [*chosen[:3], [("Mars", "B-planet"), ("is", "O"), ("red", "O")]])
    with pytest.raises(LmlabError) as info:
        lmlab("task=ner", f"data.path={subset}", "mode=test", model)
    message = str(info.value)
    lines = sum(len(s) + 1 for s in chosen[:3]) + 1
    assert f"{subset / 'test.conll'}, line {lines}" in message and "'B-planet'" in message
    assert "model.pretrained" in message and "training split" not in message


@pytest.mark.slow
def test_classification_on_data_with_one_of_the_models_two_labels(rotten_small: Path, tmp_path: Path) -> None:
    fit = lmlab("task=classification", f"data.path={rotten_small}")
    model = f"model.pretrained={fit.output_dir}"

    def rows(split: str) -> list[dict[str, str]]:
        with open(rotten_small / f"{split}.csv", encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))

    def write(path: Path, records: list[dict[str, str]]) -> None:
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records)

    fresh = {split: [r for r in rows(split) if r["label"] == "fresh"] for split in ("train", "validation", "test")}
    assert len(fresh["test"]) >= 5 and len(fresh["test"]) < len(rows("test"))
    # The fresh test rows inside data with both labels, and alone in data that has only "fresh".
    full = tmp_path / "full"
    full.mkdir()
    for split in ("train", "validation"):
        write(full / f"{split}.csv", rows(split))
    write(full / "test.csv", fresh["test"])
    subset = tmp_path / "subset"
    subset.mkdir()
    for split, records in fresh.items():
        write(subset / f"{split}.csv", records)
    as_full = lmlab("task=classification", f"data.path={full}", "mode=test", model)
    as_subset = lmlab("task=classification", f"data.path={subset}", "mode=test", model)
    for key in ("test/accuracy", "test/macro_f1", "test/loss"):
        assert math.isfinite(as_subset.metrics[key]), key
        assert as_subset.metrics[key] == pytest.approx(as_full.metrics[key], abs=1e-6), key
    with open(as_subset.output_dir / "predictions" / "test_predictions.csv", encoding="utf-8", newline="") as f:
        predicted = list(csv.DictReader(f))
    assert as_subset.metrics["test/accuracy"] == pytest.approx(
        sum(p["predicted"] == p["gold"] for p in predicted) / len(predicted), abs=1e-6)

    # Fine-tuning the trained head on rows of one label keeps its two labels and their ids.
    tuned = lmlab("task=classification", f"data.path={subset}", model, "trainer.max_steps=2")
    assert json.loads((tuned.export_dir / "config.json").read_text())["id2label"] == {"0": "fresh", "1": "rotten"}

    # A label the model does not have is refused, naming it and the file.
    write(subset / "test.csv", [*fresh["test"][:3], {"text": "a film about films", "label": "meh"}])
    with pytest.raises(LmlabError) as info:
        lmlab("task=classification", f"data.path={subset}", "mode=test", model)
    message = str(info.value)
    assert f"{subset / 'test.csv'}, line 5" in message and "'meh'" in message
    assert "fresh, rotten" in message and "training split" not in message


def _as_command_line(overrides: list[str], tmp_path: Path):
    """``lmlab OVERRIDES`` composed, with Hydra's record of the command line set as a real run has it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from lmlab.cli import _free_form
    from lmlab.paths import config_dir

    cfg = compose_cfg(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        full = compose("config", overrides=_free_form(overrides), return_hydra_config=True)
    full.hydra.runtime.output_dir = str(tmp_path / f"run{len(list(tmp_path.glob('run*')))}")
    HydraConfig.instance().set_config(full)
    return cfg


def test_scoring_a_trained_model_reads_the_data_at_its_training_lengths(rotten_small: Path, tmp_path: Path) -> None:
    """A classifier trained on 16-token texts is scored on 16-token texts (not the preset's 128),
    so mode=test prints its run's numbers; a length on the command line is the user's choice."""
    from hydra.core.hydra_config import HydraConfig

    fit = lmlab("task=classification", f"data.path={rotten_small}", "data.max_length=16")
    config = json.loads((fit.export_dir / "config.json").read_text(encoding="utf-8"))
    assert config["lmlab_data_lengths"]["max_length"] == 16
    common = [*FINAL, "task=classification", f"data.path={rotten_small}", "mode=test", f"model.pretrained={fit.export_dir}"]
    try:
        cfg = _as_command_line(common, tmp_path)
        scored = run(cfg)
        assert cfg.data.max_length == 16
        for key in ("test/accuracy", "test/loss"):
            assert scored.metrics[key] == pytest.approx(fit.metrics[key], abs=1e-5), key
        cfg = _as_command_line([*common, "data.max_length=24"], tmp_path)
        run(cfg)
        assert cfg.data.max_length == 24  # given: kept, with a warning
    finally:
        HydraConfig.instance().cfg = None
