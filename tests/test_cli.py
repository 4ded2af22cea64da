"""The ``lmlab`` command, run as a real subprocess: help, one tiny run, and clean errors.

Each case gets its own LMLAB_HOME / LMLAB_CACHE_DIR. Starting Python with torch, Lightning and
transformers takes most of a case's time, so the cases this session selected are started
together (a few at a time) when the module begins and each test waits for its own.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import WIKI, free_port, lmlab_command

TIMEOUT = 600
PARALLEL = 3


@dataclass
class Outcome:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    home: Path
    cache: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return f"lmlab {' '.join(self.args)} -> {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


def run_lmlab(args: list[str], root: Path) -> Outcome:
    home, cache, cwd = root / "home", root / "cache", root / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    proc = subprocess.run([*lmlab_command(), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    return Outcome(args, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - started, home, cache)


# -- the cases ------------------------------------------------------------------------------------
DEBUG = ["+experiment=debug", "trainer.enable_progress_bar=false"]


def _wiki(root: Path) -> str:
    path = root / "wiki.txt"
    path.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:600]) + "\n", encoding="utf-8")
    return str(path)


def _empty(root: Path) -> str:
    path = root / "empty.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    return str(path)


def _jsonl_without_text(root: Path) -> str:
    path = root / "docs.jsonl"
    path.write_text('{"text": "A first document."}\n{"text": "A second one."}\n{"body": "no text field here"}\n',
                    encoding="utf-8")
    return str(path)


# name -> builds the arguments in the case's own directory
CASES: dict[str, Callable[[Path], list[str]]] = {
    "help": lambda root: ["--help"],
    "run": lambda root: [*DEBUG, f"data.path={_wiki(root)}"],
    "missing_path": lambda root: [*DEBUG, "data=text"],
    "empty_file": lambda root: [*DEBUG, f"data.path={_empty(root)}"],
    "jsonl_without_text": lambda root: [*DEBUG, f"data.path={_jsonl_without_text(root)}"],
    "unknown_task": lambda root: [*DEBUG, "task=nope"],
    "bad_masking": lambda root: [*DEBUG, f"data.path={_wiki(root)}", "task=mlm", "task.mask_replace_prob=0.9",
                                 "task.random_replace_prob=0.2"],
    "block_too_long": lambda root: [*DEBUG, f"data.path={_wiki(root)}", "data.block_size=100000"],
    "unreachable_server": lambda root: [*DEBUG, f"data.path={_wiki(root)}",
                                        f"logger.tracking_uri=http://127.0.0.1:{free_port()}"],
    "unknown_key": lambda root: [*DEBUG, f"data.path={_wiki(root)}", "trainer.bogus=1"],
    "trainer_rejects": lambda root: [*DEBUG, f"data.path={_wiki(root)}", "+trainer.bogus=1"],
}


class Launcher:
    def __init__(self, root: Path, needed: set[str]):
        self.pool = ThreadPoolExecutor(max_workers=PARALLEL)
        self.futures: dict[str, Future[Outcome]] = {}
        # The slow successful run first, so it overlaps with the quick failures.
        for name in sorted(needed, key=lambda n: n != "run"):
            case_root = root / name
            case_root.mkdir(parents=True)
            self.futures[name] = self.pool.submit(run_lmlab, CASES[name](case_root), case_root)

    def __call__(self, name: str) -> Outcome:
        return self.futures[name].result(timeout=TIMEOUT * 2)


@pytest.fixture(scope="module")
def lmlab_cli(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    needed = {
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
    }
    launcher = Launcher(tmp_path_factory.mktemp("cli"), needed)
    yield launcher
    launcher.pool.shutdown(wait=True, cancel_futures=True)


# -- checks shared by the error cases -------------------------------------------------------------
def mlflow_statuses(home: Path) -> list[str]:
    db = home / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" not in tables:
            return []
        return [row[0] for row in con.execute("SELECT status FROM runs")]


def exports(home: Path) -> list[Path]:
    return sorted(home.rglob("export")) if home.exists() else []


def assert_left_clean(out: Outcome) -> None:
    assert "RUNNING" not in mlflow_statuses(out.home), out.describe()
    assert exports(out.home) == [], out.describe()


def assert_clean_error(out: Outcome, *names: str) -> str:
    """Exit 2, one 'lmlab: error:' paragraph that names each of ``names``, no traceback."""
    assert out.returncode == 2, out.describe()
    assert "Traceback" not in out.output, out.describe()
    assert out.stderr.count("lmlab: error:") == 1, out.describe()
    message = out.stderr[out.stderr.index("lmlab: error:"):].strip()
    assert "\n\n" not in message, message  # one paragraph, nothing after it
    for name in names:
        assert name in message, (name, message)
    assert_left_clean(out)
    return message


# -- help -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["help"])
def test_help_lists_groups_and_registered_plugins(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    assert out.returncode == 0, out.describe()
    text = out.stdout
    groups_part = text.split("Config groups", 1)[1].split("Registered", 1)[0]
    listed = {line.split()[0]: line for line in groups_part.splitlines()[1:] if line.strip()}
    for group in ("task", "model", "data", "tokenizer", "trainer", "optimizer", "scheduler", "logger"):
        assert group in listed, (group, groups_part)
    assert "clm*" in listed["task"] and "mlm" in listed["task"]
    assert "gpt2*" in listed["model"] and "bert" in listed["model"]
    assert "debug" in listed.get("experiment", "")

    def registered(kind: str) -> set[str]:
        section = text.split(f"Registered {kind}", 1)[1].split("\n\n", 1)[0]
        return {line.split()[0] for line in section.splitlines()[1:] if line.strip()}

    assert {"clm", "mlm"} <= registered("tasks")
    assert {"gpt2", "bert"} <= registered("models")
    assert "text" in registered("datamodules")
    assert not out.home.exists()  # --help starts no run


def test_help_gives_the_default_runs_real_length() -> None:
    from lmlab.cli import help_text

    # 45 s measured on 2 CPU cores; README.md says the same.
    (line,) = [line for line in help_text().splitlines() if line.split()[:2] == ["lmlab", "tiny"]]
    assert line.rstrip().endswith("under a minute"), line


# -- one real run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["run"])
def test_tiny_run_from_the_command_line(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    assert out.returncode == 0, out.describe()
    assert "Traceback" not in out.output
    assert "MLflow run id:" in out.stdout
    assert "val/perplexity" in out.stdout
    assert "mlflow ui --backend-store-uri" in out.stdout
    run_id = re.search(r"MLflow run id:\s+([0-9a-f]{32})", out.stdout).group(1)
    loss = float(re.search(r"val/loss:\s+([0-9.]+)", out.stdout).group(1))
    ppl = float(re.search(r"val/perplexity:\s+([0-9.]+)", out.stdout).group(1))
    assert 0 < loss and ppl == pytest.approx(2.718281828 ** loss, rel=1e-2)
    assert f"sqlite:///{(out.home / 'mlflow.db').resolve()}" in out.stdout

    with sqlite3.connect(out.home / "mlflow.db") as con:
        rows = con.execute("SELECT run_uuid, status FROM runs").fetchall()
    assert rows == [(run_id, "FINISHED")]
    run_dirs = sorted((out.home / "runs").iterdir())
    assert len(run_dirs) == 1 and run_dirs[0].name.endswith("_clm_gpt2")
    assert (run_dirs[0] / "export" / "model.safetensors").is_file()
    assert (run_dirs[0] / "config_resolved.yaml").is_file()
    assert (out.cache / "tokenizers").is_dir()


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing_path"])
def test_missing_data_path(lmlab_cli: Launcher, case: str) -> None:
    assert_clean_error(lmlab_cli(case), "data.path")


@pytest.mark.parametrize("case", ["empty_file"])
def test_empty_data_file(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    assert_clean_error(out, "data.path", str(out.home.parent / "empty.txt"))


@pytest.mark.parametrize("case", ["jsonl_without_text"])
def test_jsonl_without_the_text_field(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    message = assert_clean_error(out, str(out.home.parent / "docs.jsonl"), "line 3", "'text'", "data.text_field")
    assert "body" in message  # it says which fields the record does have


@pytest.mark.parametrize("case", ["unknown_task"])
def test_unknown_task(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    assert out.returncode != 0, out.describe()
    assert "nope" in out.output
    assert "Traceback" not in out.output
    assert_left_clean(out)


@pytest.mark.parametrize("case", ["bad_masking"])
def test_masking_probabilities_that_do_not_add_up(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    assert_clean_error(out, "task.mask_replace_prob", "task.random_replace_prob")
    assert not (out.cache / "tokenizers").exists()  # rejected before any data was read


@pytest.mark.parametrize("case", ["block_too_long"])
def test_block_size_longer_than_the_model_positions(lmlab_cli: Launcher, case: str) -> None:
    message = assert_clean_error(lmlab_cli(case), "data.block_size", "100000", "n_positions")
    assert "256" in message  # the limit of the tiny GPT-2


@pytest.mark.parametrize("case", ["unreachable_server"])
def test_unreachable_tracking_server_fails_before_training(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    message = assert_clean_error(out, "logger.tracking_uri", "http://127.0.0.1:")
    assert "unreachable" in message or "HTTP" in message
    # Before training: no tokenizer trained, no data tokenized, no checkpoint written.
    assert not (out.cache / "tokenizers").exists() and not (out.cache / "data").exists()
    assert not out.home.exists() or not list(out.home.rglob("*.ckpt"))
    assert out.seconds < 180, out.seconds  # no minutes of retries against a dead server


@pytest.mark.parametrize("case", ["unknown_key"])
def test_unknown_trainer_key(lmlab_cli: Launcher, case: str) -> None:
    out = lmlab_cli(case)
    assert out.returncode != 0, out.describe()
    assert "bogus" in out.output
    assert "Traceback" not in out.output
    assert_left_clean(out)


@pytest.mark.parametrize("case", ["trainer_rejects"])
def test_trainer_option_lightning_rejects_marks_the_run_failed(lmlab_cli: Launcher, case: str) -> None:
    # Appended with '+', the key gets past Hydra; Lightning's Trainer refuses it after the MLflow
    # run was opened, and that run must end FAILED (assert_clean_error checks it is not RUNNING).
    out = lmlab_cli(case)
    message = assert_clean_error(out, "'trainer'", "bogus")
    assert mlflow_statuses(out.home) == ["FAILED"], message


def test_help_lists_the_options_of_the_config_dir(tmp_path: Path) -> None:
    from lmlab.cli import help_text

    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "my_corpus.yaml").write_text("defaults:\n  - text\n  - _self_\n")
    data_line = next(line for line in help_text(tmp_path / "my_conf").splitlines() if line.startswith("  data "))
    assert "my_corpus" in data_line and "bbc_news*" in data_line
    assert "my_corpus" not in help_text()


def test_a_data_config_of_the_users_own_with_config_dir(tmp_path: Path) -> None:
    # The brief's `lmlab task=mlm model=bert data=my_corpus`: my_corpus.yaml lives in the user's own
    # folder, which Hydra's --config-dir (-cd) adds to the search path beside lmlab's conf/.
    corpus = _wiki(tmp_path)
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "my_corpus.yaml").write_text(
        f"defaults:\n  - text\n  - _self_\n\npath: {corpus}\nval_fraction: 0.2\n", encoding="utf-8")
    out = run_lmlab(["-cd", str(tmp_path / "my_conf"), "task=mlm", "model=bert", "data=my_corpus", *DEBUG,
                     "trainer.max_steps=2", "trainer.val_check_interval=2"], tmp_path)
    assert out.returncode == 0, out.describe()
    (run_dir,) = (out.home / "runs").iterdir()
    data = OmegaConf.load(run_dir / "config_resolved.yaml").data
    assert data.path == corpus and data.val_fraction == 0.2 and data.datamodule == "text"
    with sqlite3.connect(out.home / "mlflow.db") as con:
        tags = dict(con.execute("SELECT key, value FROM tags WHERE key LIKE 'lmlab.%'").fetchall())
    assert tags["lmlab.task"] == "mlm" and tags["lmlab.data"] == f"path:{corpus}"

    # The same file with a misspelt key: Hydra merges it as written, lmlab refuses it.
    (tmp_path / "my_conf" / "data" / "my_corpus.yaml").write_text(
        f"defaults:\n  - text\n  - _self_\n\npath: {corpus}\nval_fracton: 0.2\n", encoding="utf-8")
    second = tmp_path / "second"  # a home of its own: nothing left behind is this run's
    second.mkdir()
    out = run_lmlab(["-cd", str(tmp_path / "my_conf"), "task=mlm", "model=bert", "data=my_corpus", *DEBUG], second)
    assert_clean_error(out, "config key 'data.val_fracton'", "Did you mean data.val_fraction?")


def test_a_misspelt_key_on_the_command_line_gets_the_nearest_real_one(monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture,
                                                                        tmp_path: Path) -> None:
    # Hydra refuses it ("Key 'whole_word_masking' is not in struct") and names no real key.
    from lmlab import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lmlab", "task=mlm", "model=bert", "task.whole_word_masking=true",
                                      "optimizer.lrr=0.1", "data.val_fraction=0.1", "+task.own_key=1"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    hints = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lmlab: ")]
    assert hints == ["lmlab: task.whole_word_masking is no config key: did you mean task.whole_word_mask?",
                     "lmlab: optimizer.lrr is no config key: did you mean optimizer.lr?"]
    assert not list(tmp_path.iterdir())  # refused before any run directory
