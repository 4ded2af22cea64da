"""lmlab's caches under sweeps, shared read-only caches and killed writers.

Tokenized blocks are shared by runs whose packing does not draw from ``seed``; a cache that cannot be
written is a named error before the work whose result it would keep, while its existing entries
are still read; staging folders left by killed writers are removed by the next writer of the entry,
never a live writer's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg
from omegaconf import DictConfig, OmegaConf

from lmlab import atomic
from lmlab.atomic import atomic_dir
from lmlab.data.text_datamodule import TextDataModule, _tokenizer_fingerprint
from lmlab.errors import LmlabError
from lmlab.models.bert import MODEL as BERT
from lmlab.models.gpt2 import MODEL as GPT2
from lmlab.tokenization import encode_texts, get_tokenizer, train_bpe, train_wordpiece

DOCS = [f"Paragraph {i} holds a few words about topic {i % 7}. It ends here! Then comes more text on {i % 5}."
        for i in range(240)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    return compose_cfg(["data=text", f"data.path={path}", "data.block_size=16"]).data


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    return {"causal": train_bpe(DOCS, vocab_size=300, min_frequency=2),
            "masked": train_wordpiece(DOCS, vocab_size=300, min_frequency=2, lowercase=True)}


def _setup(cfg: DictConfig, tokenizer: object, cache: Path, packing: str, seed: int) -> TextDataModule:
    dm = TextDataModule(cfg, packing=packing, cache_dir=cache, seed=seed)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def _rows(dm: TextDataModule) -> list[list[int]]:
    return [row.tolist() for row in dm.splits["train"].arrays["input_ids"]]


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "data").iterdir() if not p.name.startswith("."))


# -- 1. the seed keys only the packings that draw from it --------------------------------------
@pytest.mark.parametrize("packing", ["causal", "masked"])
def test_a_seed_sweep_shares_the_blocks_of_a_packing_that_ignores_the_seed(corpus, tokenizers, tmp_path, packing):
    tok = tokenizers[packing]
    first = _setup(corpus, tok, tmp_path / "cache", packing, seed=1)
    second = _setup(corpus, tok, tmp_path / "cache", packing, seed=2)
    assert first.cache_hit is False and second.cache_hit is True
    assert _rows(second) == _rows(first) and len(_entries(tmp_path / "cache")) == 1
    assert second.seed == 2  # the loaders still shuffle with the run's own seed


def test_sentence_pairs_are_drawn_from_the_seed_so_each_seed_has_its_blocks(corpus, tokenizers, tmp_path):
    tok = tokenizers["masked"]
    first = _setup(corpus, tok, tmp_path / "cache", "sentence_pairs", seed=1)
    second = _setup(corpus, tok, tmp_path / "cache", "sentence_pairs", seed=2)
    assert first.cache_hit is False and second.cache_hit is False
    assert len(_entries(tmp_path / "cache")) == 2
    assert _rows(second) != _rows(first)  # the pairs really differ: the key must tell them apart
    assert _setup(corpus, tok, tmp_path / "cache", "sentence_pairs", seed=1).cache_hit is True


@pytest.mark.parametrize(("packing", "changed"), [("causal", "eos_token"), ("masked", "sep_token")])
def test_blocks_are_keyed_by_the_special_tokens_the_tokenizer_config_names(corpus, tokenizers, tmp_path, packing,
                                                                           changed):
    # One tokenizer.json, two configs naming another separator (a chat model's eos beside its base
    # model's): the tokenizer fingerprint is the same, the blocks must not be.
    from transformers import AutoTokenizer

    saved = tmp_path / "tokenizer"
    tokenizers[packing].save_pretrained(saved)
    with_alt = AutoTokenizer.from_pretrained(saved)
    with_alt.add_special_tokens({"additional_special_tokens": ["<|alt|>"]})
    with_alt.save_pretrained(saved)
    base = AutoTokenizer.from_pretrained(saved)
    other = AutoTokenizer.from_pretrained(saved, **{changed: "<|alt|>"})
    assert _tokenizer_fingerprint(other) == _tokenizer_fingerprint(base)
    old_id, new_id = getattr(base, f"{changed}_id"), getattr(other, f"{changed}_id")
    assert old_id != new_id
    first = _setup(corpus, base, tmp_path / "cache", packing, seed=0)
    second = _setup(corpus, other, tmp_path / "cache", packing, seed=0)
    assert second.cache_hit is False and len(_entries(tmp_path / "cache")) == 2
    assert (np.array(_rows(second)) == new_id).any() and not (np.array(_rows(first)) == new_id).any()


def test_a_sentence_pairs_entry_missing_its_attention_mask_is_rebuilt(corpus, tokenizers, tmp_path, caplog):
    # A copy of the cache cut short: "done" and the ids are there, the padding mask is not.
    tok = tokenizers["masked"]
    first = _setup(corpus, tok, tmp_path / "cache", "sentence_pairs", seed=0)
    (entry,) = (tmp_path / "cache" / "data").iterdir()
    (entry / "train.attention_mask.npy").unlink()
    with caplog.at_level("WARNING", logger="lmlab.data.text_datamodule"):
        second = _setup(corpus, tok, tmp_path / "cache", "sentence_pairs", seed=0)
    assert second.cache_hit is False
    assert any("train.attention_mask.npy" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)
    assert sorted(second.splits["train"][0]) == sorted(first.splits["train"][0])
    assert _setup(corpus, tok, tmp_path / "cache", "sentence_pairs", seed=0).cache_hit is True


# -- 2. a cache that cannot be written ----------------------------------------------------------
@pytest.fixture
def permissions(tmp_path: Path) -> None:
    """Skips where file modes are not enforced: root (CAP_DAC_OVERRIDE) writes into a 0555 folder."""
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    try:
        (probe / "file").touch()
    except PermissionError:
        return
    finally:
        probe.chmod(0o755)
    pytest.skip("file permissions are not enforced for this user (root?)")


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """``root`` and everything under it made read-only, as a shared cache others filled."""
    paths = [root, *root.rglob("*")]
    modes = {p: p.stat().st_mode for p in paths}
    for p in paths:
        p.chmod(modes[p] & ~0o222)
    try:
        yield
    finally:
        for p in reversed(paths):  # writable again, so the test's folder can be deleted
            p.chmod(modes[p])


def _tok_cfg() -> DictConfig:
    return OmegaConf.create({"type": "auto", "vocab_size": 300, "min_frequency": 2, "lowercase": None})


def _assert_names_the_cache(exc: LmlabError, folder: Path) -> None:
    message = str(exc)
    assert message.startswith("config key 'paths.cache'"), message
    assert str(folder) in message and "LMLAB_CACHE_DIR" in message, message


def test_an_unwritable_cache_stops_before_the_tokenizer_is_trained(permissions, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o555)
    try:
        with pytest.raises(LmlabError) as caught:
            get_tokenizer(_tok_cfg(), GPT2, lambda: pytest.fail("trained a tokenizer it cannot keep"), "corpus", cache)
    finally:
        cache.chmod(0o755)
    _assert_names_the_cache(caught.value, cache / "tokenizers")


def test_a_cache_path_that_is_a_file_is_named(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("not a folder\n")
    with pytest.raises(LmlabError) as caught:
        get_tokenizer(_tok_cfg(), BERT, lambda: pytest.fail("trained a tokenizer it cannot keep"), "corpus", cache)
    _assert_names_the_cache(caught.value, cache / "tokenizers")
    assert f"{cache} is a file" in str(caught.value)


def test_a_read_only_cache_serves_its_entries_and_names_itself_for_a_missing_one(
        permissions, corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tok, info = get_tokenizer(_tok_cfg(), GPT2, lambda: DOCS, "corpus", cache)
    want = _rows(_setup(corpus, tok, cache, "causal", seed=1))
    with read_only(cache):
        again, info2 = get_tokenizer(_tok_cfg(), GPT2, lambda: pytest.fail("read the corpus"), "corpus", cache)
        assert info2["cached"] is True and again.get_vocab() == tok.get_vocab()
        dm = _setup(corpus, again, cache, "causal", seed=1)
        assert dm.cache_hit is True and _rows(dm) == want
        # A block size nobody cached: named before any text is tokenized.
        monkeypatch.setattr(TextDataModule, "_pack", lambda *a: pytest.fail("tokenized blocks it cannot keep"))
        other = OmegaConf.merge(corpus, {"block_size": 32})
        with pytest.raises(LmlabError) as caught:
            _setup(other, again, cache, "causal", seed=1)
    _assert_names_the_cache(caught.value, cache / "data")


# -- 3. what killed writers leave ---------------------------------------------------------------
WRITER = """
import os, signal, sys
from pathlib import Path
from lmlab.atomic import atomic_dir

final, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "between-renames":  # killed after moving the old entry aside, before the new one is in
    real = os.replace
    def replace(src, dst, _calls=[]):
        _calls.append(dst)
        if len(_calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
with atomic_dir(final) as tmp:
    (tmp / "who").write_text(str(os.getpid()))
    print(tmp, flush=True)
    if mode != "between-renames":
        sys.stdin.readline()  # holds the entry half-written until told to go on
"""


def _writer(final: Path, mode: str = "hold") -> tuple[subprocess.Popen, Path]:
    """A process writing ``final`` with atomic_dir, stopped inside the block; and its staging folder."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final), mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    staged = Path(proc.stdout.readline().strip())
    assert staged.parent == final.parent and (staged / "who").is_file(), staged
    return proc, staged


def _siblings(final: Path) -> list[Path]:
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(f".{final.name}."))


def test_the_next_writer_removes_what_a_killed_writer_left_and_keeps_a_live_writers(tmp_path):
    final = tmp_path / "cache" / "data" / "causal-16-abc"
    killed, left = _writer(final)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    live, staged = _writer(final)
    try:
        with atomic_dir(final) as tmp:
            (tmp / "who").write_text("test")
        assert not left.exists()
        assert staged.is_dir() and _siblings(final) == [staged]  # a concurrent writer is left alone
        assert (final / "who").read_text() == "test"
        live.communicate("go\n", timeout=30)  # it still publishes, replacing the entry with the same content
        assert live.returncode == 0 and (final / "who").read_text() == str(live.pid)
    finally:
        live.kill()
    assert _siblings(final) == []


def test_the_previous_entry_moved_aside_by_a_killed_replace_is_removed(tmp_path):
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "who").write_text("first")
    killed, _ = _writer(final, "between-renames")
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert not final.exists() and len(_siblings(final)) == 2  # the new content and the old, both aside
    with atomic_dir(final) as tmp:
        (tmp / "who").write_text("third")
    assert (final / "who").read_text() == "third" and _siblings(final) == []


class Interrupted(BaseException):
    """What a signal handler raises (Lightning's SIGTERMException is a SystemExit)."""


@pytest.mark.parametrize("writer", ["atomic_dir", "staging_dir"])
def test_a_signal_right_after_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch, writer):
    # A handler's exception lands at the first bytecode after the mkdir returns: the moment
    # test_signals once caught, when mkdtemp had made the folder and the try had not begun.
    final = tmp_path / "export"
    real = os.mkdir

    def mkdir_then_signal(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if Path(path).name.startswith(f".{final.name}.tmp-"):
            raise Interrupted

    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    with pytest.raises(Interrupted), getattr(atomic, writer)(final):
        pytest.fail("the block must not run")
    assert not final.exists() and _siblings(final) == []


def test_a_signal_between_the_two_renames_puts_the_previous_entry_back(tmp_path, monkeypatch):
    final = tmp_path / "export"
    with atomic_dir(final) as tmp:
        (tmp / "who").write_text("first")
    real, calls = os.replace, []

    def replace_then_signal(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the previous entry is aside, the new one not yet in
            raise Interrupted
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(Interrupted), atomic_dir(final) as tmp:
        (tmp / "who").write_text("second")
    assert (final / "who").read_text() == "first" and _siblings(final) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_are_judged_by_their_owner(tmp_path):
    final = tmp_path / "tokenizers" / "bpe-300-abc"
    final.parent.mkdir(parents=True)
    day = 24 * 3600

    def leftover(kind: str, age: float = 0.0, **owner: object) -> Path:
        path = final.parent / atomic.staging_name(final, kind, **owner)
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "blocks.npy").write_bytes(b"x" * 100)
        stamp = time.time() - age
        for p in (path / "sub" / "blocks.npy", path / "sub", path):
            os.utime(p, (stamp, stamp))
        return path

    dead = leftover("tmp", pid=_dead_pid())
    dead_old = leftover("old", pid=_dead_pid())
    mine = leftover("tmp", pid=os.getpid())
    elsewhere_fresh = leftover("tmp", host="node-7_0a1b2c3d", pid=os.getpid(), age=day - 3600)
    elsewhere_stale = leftover("tmp", host="node-7_0a1b2c3d", pid=os.getpid(), age=day + 3600)
    legacy_stale = final.parent / f".{final.name}.k2j_x9q0"  # tempfile.mkdtemp's name, before owners were named
    legacy_stale.mkdir()
    os.utime(legacy_stale, (time.time() - 2 * day,) * 2)
    legacy_fresh = final.parent / f".{final.name}.old.{os.getpid()}"
    legacy_fresh.mkdir()
    other_entry = final.parent / atomic.staging_name(final.with_name("bpe-300-abd"), "tmp", pid=_dead_pid())
    other_entry.mkdir()  # another entry's: left to that entry's writers

    removed = atomic.remove_stale(final)
    assert sorted(removed) == sorted([dead, dead_old, elsewhere_stale, legacy_stale])
    assert all(not p.exists() for p in removed)
    assert all(p.is_dir() for p in (mine, elsewhere_fresh, legacy_fresh, other_entry))


def test_concurrent_writers_of_one_entry_all_succeed(tmp_path):
    final = tmp_path / "cache" / "entry"
    writers = [_writer(final) for _ in range(3)]
    for proc, _ in writers:
        proc.communicate("go\n", timeout=30)
        assert proc.returncode == 0
    assert (final / "who").read_text() == str(writers[-1][0].pid) and _siblings(final) == []


# -- models of MLflow runs, downloaded into the cache ----------------------------------------------
def test_a_download_killed_midway_is_removed_by_the_next_download(lmlab_home, tmp_path, monkeypatch):
    from test_pretrained_refs import CountDownloads, _run_with_model

    from lmlab import pretrained
    from lmlab.tracking import tracking_uri

    run_id = _run_with_model(lmlab_home, tmp_path)
    cfg = compose_cfg([])
    entry = pretrained.run_model_entry(Path(str(cfg.paths.cache)), tracking_uri(cfg), run_id)
    killed = entry.parent / atomic.staging_name(entry, pid=_dead_pid())
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model.safetensors").write_bytes(b"half a model")
    downloads = CountDownloads(monkeypatch)
    assert Path(pretrained.resolve(run_id, cfg)) == entry / "model" and downloads.calls == 1
    assert not killed.exists() and _siblings(entry) == []


def test_a_read_only_cache_serves_a_downloaded_model_and_names_itself_for_a_new_one(
        permissions, lmlab_home, tmp_path, monkeypatch):
    from test_pretrained_refs import CountDownloads, _run_with_model

    from lmlab import pretrained

    first, second = _run_with_model(lmlab_home, tmp_path), _run_with_model(lmlab_home, tmp_path)
    cfg = compose_cfg([])
    cache = Path(str(cfg.paths.cache))
    downloads = CountDownloads(monkeypatch)
    model = pretrained.resolve(first, cfg)
    with read_only(cache):
        assert pretrained.resolve(first, cfg) == model and downloads.calls == 1
        with pytest.raises(LmlabError) as caught:
            pretrained.resolve(second, cfg)
        assert downloads.calls == 1  # stopped before the download
    _assert_names_the_cache(caught.value, Path(model).parents[1])


@pytest.mark.parametrize("race", ["published", "moved_aside"])
def test_another_writer_finishing_between_the_check_and_the_rename_is_no_error(tmp_path, monkeypatch, race):
    # DDP ranks tokenize one corpus at the same pace and publish the same entry within microseconds.
    final = tmp_path / "data" / "causal-16-abc"
    if race == "moved_aside":
        with atomic_dir(final) as tmp:
            (tmp / "who").write_text("first")
    real, raced = os.replace, []

    def replace(src: Path, dst: Path) -> None:
        if not raced:  # the publish's first rename: the other writer's steps come just before it
            raced.append(dst)
            if race == "moved_aside":  # the other writer's first rename: our check saw final, now it is gone
                real(final, final.parent / "other_writer_old")
            else:
                other = final.parent / "other_writer"
                (other / "who").parent.mkdir()
                (other / "who").write_text("other")
                real(other, final)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_dir(final) as tmp:
        (tmp / "who").write_text("this")
    assert raced and (final / "who").read_text() == "this"


# -- tokenized data keyed by what changes the blocks ---------------------------------------------
@pytest.fixture
def wiki_corpus(tmp_path: Path) -> Path:
    from conftest import wiki_head

    path = wiki_head(tmp_path, 120)
    # Older than the stamps' racy window, so runs after the first take the corpus fingerprint from the
    # stamp, as a real second run does.
    old = time.time() - 10
    os.utime(path, (old, old))
    return path


def _wiki_setup(wiki: Path, tokenizer: object, cache: Path, overrides: list[str] = ()) -> TextDataModule:
    cfg = compose_cfg(["data=text", f"data.path={wiki}", "data.block_size=32", *overrides]).data
    return _setup(cfg, tokenizer, cache, "causal", seed=0)


def test_every_setting_that_changes_the_blocks_gets_its_own_entry(wiki_corpus, tmp_path):
    texts = [line for line in wiki_corpus.read_text(encoding="utf-8").splitlines() if line]
    tok = train_bpe(texts, vocab_size=400, min_frequency=2)
    cache = tmp_path / "cache"
    base = _wiki_setup(wiki_corpus, tok, cache)
    assert base.cache_hit is False and _wiki_setup(wiki_corpus, tok, cache).cache_hit is True
    changes = [["data.block_size=48"], ["data.val_fraction=0.2"], ["data.split_seed=1"], ["data.max_documents=60"]]
    for change in changes:
        dm = _wiki_setup(wiki_corpus, tok, cache, change)
        assert dm.cache_hit is False, change
        assert dm.corpus.train != base.corpus.train or dm.block_size != base.block_size, change
    assert len(_entries(cache)) == 1 + len(changes)

    # A tokenizer retrained into the same folder: same path, other ids, so other blocks.
    saved = tmp_path / "tokenizer"
    tok.save_pretrained(saved)
    from transformers import AutoTokenizer

    first = _wiki_setup(wiki_corpus, AutoTokenizer.from_pretrained(saved), cache)
    train_bpe(texts, vocab_size=500, min_frequency=2).save_pretrained(saved)
    retrained = AutoTokenizer.from_pretrained(saved)
    second = _wiki_setup(wiki_corpus, retrained, cache)
    assert first.cache_hit is True and second.cache_hit is False
    assert _rows(second)[0] == [t for d in encode_texts(retrained, second.corpus.train) for t in (*d, 0)][:32]


def test_a_python_tokenizer_edited_in_place_gets_new_blocks(wiki_corpus, tmp_path):
    # transformers' Python tokenizers (ProphetNet's here; remote code) have no Rust backend to hash.
    # Keyed by their path and vocabulary size, a vocabulary rewritten in place was served the blocks
    # of the old one.
    from transformers import AutoTokenizer, ProphetNetTokenizer

    texts = [line for line in wiki_corpus.read_text(encoding="utf-8").splitlines() if line]
    vocab = sorted(train_wordpiece(texts, vocab_size=900, min_frequency=2, lowercase=True).get_vocab().items(),
                   key=lambda item: item[1])
    words = [w for w, _ in vocab]
    folder = tmp_path / "prophetnet"
    folder.mkdir()
    (folder / "prophetnet.tokenizer").write_text("\n".join(words) + "\n", encoding="utf-8")
    ProphetNetTokenizer(str(folder / "prophetnet.tokenizer")).save_pretrained(folder)
    cache = tmp_path / "cache"
    old = AutoTokenizer.from_pretrained(folder)
    assert getattr(old, "backend_tokenizer", None) is None
    first = _wiki_setup(wiki_corpus, old, cache)
    # The same words numbered the other way round after the special tokens: a retrained vocabulary.
    (folder / "prophetnet.tokenizer").write_text("\n".join(words[:5] + words[:4:-1]) + "\n", encoding="utf-8")
    new = AutoTokenizer.from_pretrained(folder)
    assert len(new) == len(old) and new("the")["input_ids"] != old("the")["input_ids"]
    second = _wiki_setup(wiki_corpus, new, cache)
    assert first.cache_hit is False and second.cache_hit is False
    expected = [t for d in encode_texts(new, second.corpus.train) for t in (*d, new.sep_token_id)][:32]
    assert _rows(second)[0] == expected != _rows(first)[0]
    assert _wiki_setup(wiki_corpus, AutoTokenizer.from_pretrained(folder), cache).cache_hit is True


def test_a_writer_reading_its_entry_while_another_writer_replaces_it_serves_its_blocks(
        wiki_corpus, tmp_path, monkeypatch, caplog):
    # Two DDP ranks publish the same entry within microseconds. The other rank's publish moves this
    # rank's copy aside and renames its own in: between the two renames the entry is missing, and
    # this rank, reading what it had just written, stopped with "cached tokenized data is unreadable"
    # (3 of 1,200 setups of two processes in step). The step is replayed here at that moment.
    from lmlab.data import text_datamodule

    texts = [line for line in wiki_corpus.read_text(encoding="utf-8").splitlines() if line]
    tok = train_bpe(texts, vocab_size=400, min_frequency=2)
    clean = _wiki_setup(wiki_corpus, tok, tmp_path / "clean")
    real = text_datamodule.atomic_dir

    @contextlib.contextmanager
    def other_writer_replacing(final: Path) -> Iterator[Path]:
        with real(final) as tmp:
            yield tmp
        os.replace(final, final.with_name(atomic.staging_name(final, "old")))

    monkeypatch.setattr(text_datamodule, "atomic_dir", other_writer_replacing)
    with caplog.at_level("INFO", logger="lmlab.data.text_datamodule"):
        raced = _wiki_setup(wiki_corpus, tok, tmp_path / "cache")
    assert raced.cache_hit is False and _rows(raced) == _rows(clean)
    assert [r.tolist() for r in raced.splits["validation"].arrays["input_ids"]] == \
        [r.tolist() for r in clean.splits["validation"].arrays["input_ids"]]
    assert any("another process" in r.getMessage() for r in caplog.records)



# -- one filler per entry: the others wait and read what it wrote ---------------------------------
def _fill_twice_at_once(monkeypatch: pytest.MonkeyPatch, fill) -> tuple[object, object]:
    """``fill(hold)`` twice, as two DDP ranks on a cold cache would: the first in a thread, held
    inside its work (where it calls ``hold``) until the second is blocked on the entry's lock.
    Returns both results; the second may not do the work again."""
    import threading

    from lmlab import cache_lock

    waiting, inside = threading.Event(), threading.Event()
    real_wait = cache_lock._wait

    def wait(fd: int, path: Path) -> None:
        waiting.set()
        real_wait(fd, path)

    def hold() -> None:
        inside.set()
        assert waiting.wait(60), "the second filler never waited for the first"

    def second_hold() -> None:
        raise AssertionError("the second filler did the work again")

    monkeypatch.setattr(cache_lock, "_wait", wait)
    results: dict[str, object] = {}
    first = threading.Thread(target=lambda: results.__setitem__("first", fill(hold)))
    first.start()
    assert inside.wait(60), "the first filler never started its work"
    second = fill(second_hold)
    first.join(60)
    assert "first" in results, "the first filler failed (its error is in the captured output)"
    return results["first"], second


def test_a_tokenizer_wanted_by_two_processes_at_once_is_trained_once(tmp_path, monkeypatch):
    def fill(hold):
        return get_tokenizer(_tok_cfg(), GPT2, lambda: (hold(), DOCS)[1], "corpus", tmp_path / "cache")

    (tok1, info1), (tok2, info2) = _fill_twice_at_once(monkeypatch, fill)
    assert info1["cached"] is False and info2["cached"] is True
    assert tok2.get_vocab() == tok1.get_vocab()


def test_blocks_wanted_by_two_processes_at_once_are_packed_once(corpus, tokenizers, tmp_path, monkeypatch):
    def fill(hold):
        dm = TextDataModule(corpus, packing="causal", cache_dir=tmp_path / "cache", seed=0)
        dm.set_tokenizer(tokenizers["causal"])
        real = dm._fill
        dm._fill = lambda where: (hold(), real(where))[1]
        dm.setup("fit")
        return dm

    first, second = _fill_twice_at_once(monkeypatch, fill)
    assert first.cache_hit is False and second.cache_hit is True
    assert _rows(second) == _rows(first) and len(_entries(tmp_path / "cache")) == 1
