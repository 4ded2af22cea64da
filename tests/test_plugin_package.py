"""The example plugin plugins/lmlab-regression, as a third party's package meets lmlab.

Unit tests import the plugin's source directly (no entry points, so the registry is unchanged).
The install tests pip-install the real package into a venv that sees this environment's
site-packages (lmlab, torch ...), then drive ``lmlab`` in subprocesses: the plugin's task shows in
``--help``, trains on real data and reaches MLflow, and is gone after ``pip uninstall``. A venv,
rather than this environment itself, so that other test processes running meanwhile never see an
extra task. Real data: Rotten Tomatoes snippets from ../shared/data, scored 1.0 (fresh) / 0.0 (rotten).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from conftest import MLFLOW_VARIABLES, REPO, SHARED_DATA, TINY
from lmlab.errors import LmlabError

PLUGIN = REPO / "plugins" / "lmlab-regression"
ROTTEN = SHARED_DATA / "classification" / "rotten_tomatoes"
ROWS = {"train": 300, "validation": 40, "test": 40}


# -- data ------------------------------------------------------------------------------------------
def scored_rows(split: str, n: int) -> list[dict[str, object]]:
    """The first ``n`` snippets of a split with a numeric score: 1.0 for fresh, 0.0 for rotten."""
    if not ROTTEN.exists():
        pytest.skip(f"real test data missing: {ROTTEN}")
    with (ROTTEN / f"{split}.csv").open(encoding="utf-8", newline="") as f:
        rows = [row for _, row in zip(range(n), csv.DictReader(f))]
    return [{"text": r["text"], "score": 1.0 if r["label"] == "fresh" else 0.0} for r in rows]


def write_scored_dir(root: Path) -> Path:
    """train.csv, validation.jsonl and test.csv: both readers on one run."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in ROWS.items():
        rows = scored_rows(split, n)
        if split == "validation":
            (root / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            continue
        with (root / f"{split}.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "score"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def data_cfg(path: Path | None, **overrides: object) -> DictConfig:
    """The plugin's data/regression_csv.yaml as lmlab would compose it, with ``overrides``."""
    cfg = OmegaConf.load(PLUGIN / "src" / "lmlab_regression" / "conf" / "data" / "regression_csv.yaml")
    cfg.path = str(path) if path is not None else None
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ModuleType, ModuleType]]:
    """The plugin's modules, imported from its source tree."""
    monkeypatch.syspath_prepend(str(PLUGIN / "src"))
    from lmlab_regression import data, task

    yield data, task
    for name in [m for m in sys.modules if m == "lmlab_regression" or m.startswith("lmlab_regression.")]:
        del sys.modules[name]


# -- unit tests ------------------------------------------------------------------------------------
def test_datamodule_reads_splits_and_asks_for_one_output(plugin, tmp_path: Path) -> None:
    data, _ = plugin
    root = write_scored_dir(tmp_path / "scored")
    dm = data.RegressionDataModule(data_cfg(root), packing="regression")
    assert [len(dm.splits[s]) for s in ("train", "validation", "test")] == [300, 40, 40]
    assert dm.has_test and dm.origin == f"path:{root.resolve()}"
    assert set(dm.splits["train"].scores) == {0.0, 1.0}
    assert dm.splits["validation"].where[0] == f"{root / 'validation.jsonl'}, line 1"
    assert dm.model_config_updates() == {"num_labels": 1, "problem_type": "regression",
                                         "id2label": {0: "score"}, "label2id": {"score": 0}}
    # The same rows give the same fingerprint (lmlab's tokenizer cache key); a changed score does not.
    again = data.RegressionDataModule(data_cfg(root), packing="regression")
    assert again.fingerprint == dm.fingerprint
    again.splits["train"].scores[0] += 0.5
    assert again.fingerprint != dm.fingerprint

    capped = data.RegressionDataModule(data_cfg(root / "train.csv", max_documents=100), packing="regression")
    assert [len(capped.splits[s]) for s in ("train", "validation")] == [100, 10]  # validation carved from train
    assert not capped.has_test

    with pytest.raises(LmlabError, match="cannot serve packing 'single_label'"):
        data.RegressionDataModule(data_cfg(root), packing="single_label")


def test_batches_are_padded_with_float_targets(plugin, tmp_path: Path) -> None:
    from lmlab.tokenization import train_wordpiece

    data, _ = plugin
    dm = data.RegressionDataModule(data_cfg(write_scored_dir(tmp_path / "scored"), max_length=24), packing="regression")
    dm.set_tokenizer(train_wordpiece(dm.texts_for_tokenizer(), vocab_size=500, min_frequency=2, lowercase=True))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == dm.splits["validation"].scores
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 24
    assert dm.stats["train_examples"] == 300 and 0.0 < dm.stats["train_score_mean"] < 1.0


@pytest.mark.parametrize(("row", "problem"), [
    ('"Well, it does go on forever.",n/a', "column 'score') is 'n/a', not a finite number"),
    ('"Well, it does go on forever.",nan', "is 'nan', not a finite number"),
    (",0.5", "the text (column 'text') is empty"),
])
def test_bad_rows_name_file_line_and_column(plugin, tmp_path: Path, row: str, problem: str) -> None:
    data, _ = plugin
    path = tmp_path / "train.csv"
    path.write_text(f"text,score\nA visceral film.,1.0\n{row}\n", encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        data.read_scored_file(path, data_cfg(path))
    assert f"{path}, line 3" in str(info.value) and problem in str(info.value)


def test_a_row_whose_fields_do_not_line_up_is_an_error(plugin, tmp_path: Path) -> None:
    """An unquoted comma in a text moved the rest of the row: "Ok, 3" and its score 1.0 became the text
    "Ok" scored 3.0, without a word."""
    data, _ = plugin
    path = tmp_path / "train.csv"
    path.write_text("text,score\nA visceral film.,1.0\nOk, 3,1.0\n", encoding="utf-8")
    with pytest.raises(LmlabError) as info:
        data.read_scored_file(path, data_cfg(path))
    assert f"{path}, line 3" in str(info.value) and "a row of 3 field(s) under a header of 2" in str(info.value)
    assert "Quote a field" in str(info.value)
    path.write_text("text,score\nA visceral film.,1.0\nno score here\n", encoding="utf-8")
    with pytest.raises(LmlabError, match=r"line 3: has a row of 1 field\(s\) under a header of 2"):
        data.read_scored_file(path, data_cfg(path))


def test_errors_name_the_line_a_row_starts_on(plugin, tmp_path: Path) -> None:
    """Blank lines between rows (the reader skips them) and line breaks inside quoted texts."""
    data, _ = plugin
    path = tmp_path / "train.csv"
    path.write_text('text,score\n"Two\nlines.",1.0\n\n\nA visceral film.,0.5\n"Well,\r\nno.",n/a\n',
                    encoding="utf-8", newline="")
    with pytest.raises(LmlabError) as info:
        data.read_scored_file(path, data_cfg(path))
    assert f"{path}, line 7:" in str(info.value) and "is 'n/a'" in str(info.value)
    path.write_text('text,score\n"Two\nlines.",1.0\n\n\nA visceral film.,0.5\n', encoding="utf-8")
    rows = data.read_scored_file(path, data_cfg(path))
    assert rows.where == [f"{path}, line 2", f"{path}, line 6"] and rows.texts[0] == "Two\nlines."


def test_tsv_texts_keep_their_quotation_marks(plugin, tmp_path: Path) -> None:
    """TSV has no quoting: csv's rules took the quotes off a text that opens with one."""
    data, _ = plugin
    path = tmp_path / "train.tsv"
    path.write_text('text\tscore\n"Great," he said.\t1.5\nShe said "meh".\t-0.5\n', encoding="utf-8")
    rows = data.read_scored_file(path, data_cfg(path))
    assert rows.texts == ['"Great," he said.', 'She said "meh".'] and rows.scores == [1.5, -0.5]


def test_json_values_of_the_wrong_type_are_named(plugin, tmp_path: Path) -> None:
    data, _ = plugin
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "A visceral film.", "score": 1}\n{"text": "Flat.", "score": true}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"line 2: the score \(column 'score'\) is 'True', not a finite number"):
        data.read_scored_file(path, data_cfg(path))
    path.write_text('{"text": 42, "score": 1}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match=r"line 1: field 'text' holds a JSON number \(42\), not a string"):
        data.read_scored_file(path, data_cfg(path))


def test_a_directory_file_named_for_no_split_is_an_error(plugin, tmp_path: Path) -> None:
    """training.csv beside train.csv was dropped unread."""
    data, _ = plugin
    root = write_scored_dir(tmp_path / "scored")
    shutil.copy(root / "train.csv", root / "training.csv")
    with pytest.raises(LmlabError) as info:
        data.read_scored_path(root, data_cfg(root))
    assert "data.path" in str(info.value) and "fit no split and would be read by none: training.csv" in str(info.value)


def test_a_carved_validation_holds_no_copy_of_a_training_text(plugin, tmp_path: Path) -> None:
    """Rotten Tomatoes' training split repeats 39 snippets: carved by row number, a few fell on both sides."""
    data, _ = plugin
    path = tmp_path / "train.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "score"])
        writer.writeheader()
        writer.writerows(scored_rows("train", 20_000))
    dm = data.RegressionDataModule(data_cfg(path), packing="regression")
    key = lambda text: " ".join(text.split())  # noqa: E731 (lmlab's duplicate key: whitespace aside)
    train = {key(t) for t in dm.splits["train"].texts}
    assert len(dm.splits["validation"]) > 1000
    assert [t for t in dm.splits["validation"].texts if key(t) in train] == []


def test_null_split_settings(plugin, tmp_path: Path) -> None:
    """lmlab's config check lets data.val_fraction / split_seed / test_fraction be null: a TypeError before."""
    data, _ = plugin
    path = write_scored_dir(tmp_path / "scored") / "train.csv"
    seeded = data.RegressionDataModule(data_cfg(path, split_seed=0), packing="regression")
    unseeded = data.RegressionDataModule(data_cfg(path, split_seed=None), packing="regression")
    assert unseeded.splits["validation"].texts == seeded.splits["validation"].texts  # null is seed 0
    with pytest.raises(LmlabError, match=r"data.val_fraction.*is null, and path:.*train.csv has no such split"):
        data.RegressionDataModule(data_cfg(path, val_fraction=None), packing="regression")
    data.RegressionDataModule(data_cfg(path.parent, val_fraction=None), packing="regression")  # validation.jsonl
    from lmlab.data.catalog import package_dir

    if package_dir(data.VADER_PACKAGE) is None:
        pytest.skip("the default data needs vaderSentiment (a dependency of the plugin): pip install vaderSentiment")
    with pytest.raises(LmlabError, match="data.test_fraction.*is null, and catalog:vader_lexicon"):
        data.read_vader_lexicon(data_cfg(None, catalog="vader_lexicon", test_fraction=None))


def test_missing_column_and_missing_data(plugin, tmp_path: Path) -> None:
    data, _ = plugin
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "A visceral film.", "rating": 1}\n', encoding="utf-8")
    with pytest.raises(LmlabError, match="has no field 'score'.*data.score_column"):
        data.read_scored_file(path, data_cfg(path))
    with pytest.raises(LmlabError, match="data.path.*no scored data is set"):
        data.load_scored(data_cfg(None))


def test_vader_lexicon_default(plugin) -> None:
    data, _ = plugin
    from lmlab.data.catalog import package_dir

    if package_dir(data.VADER_PACKAGE) is None:
        pytest.skip("the default data needs vaderSentiment (a dependency of the plugin): pip install vaderSentiment")
    splits, origin = data.load_scored(data_cfg(None, catalog="vader_lexicon"))
    assert origin.startswith("catalog:vader_lexicon")
    assert {k: len(v) for k, v in splits.items()} == {"train": 6004, "validation": 751, "test": 751}
    scores = {t: s for split in splits.values() for t, s in zip(split.texts, split.scores)}
    assert scores["foolproof"] == 1.6 and scores["foolishly"] == -1.8  # the lexicon's mean ratings
    # 14 tokens are listed twice with different ratings: each is read once, with its later line's
    # rating (lines 305 and 4406 rate "lol" 2.9 and 1.8), so no token is in two splits.
    assert scores["lol"] == 1.8 and scores["ok"] == 1.2
    assert len(scores) == sum(len(split) for split in splits.values())
    assert min(scores.values()) >= -4 and max(scores.values()) <= 4


def test_metrics_agree_with_numpy(plugin) -> None:
    _, task = plugin
    gold = torch.tensor([1.6, -1.8, 0.3, 2.4, -0.7, 0.0])
    predicted = torch.tensor([1.1, -1.2, 0.5, 1.9, 0.2, -0.4])
    metrics = task.regression_metrics()
    metrics.update(predicted[:3], gold[:3])  # two batches, as in an evaluation loop
    metrics.update(predicted[3:], gold[3:])
    got = {k: float(v) for k, v in metrics.compute().items()}
    g, p = gold.numpy().astype(np.float64), predicted.numpy().astype(np.float64)
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731 (no ties in these numbers)
    assert got["mse"] == pytest.approx(np.mean((p - g) ** 2), rel=1e-5)
    assert got["mae"] == pytest.approx(np.mean(np.abs(p - g)), rel=1e-5)
    assert got["pearson"] == pytest.approx(np.corrcoef(p, g)[0, 1], rel=1e-5)
    assert got["spearman"] == pytest.approx(np.corrcoef(ranks(p), ranks(g))[0, 1], rel=1e-5)


def test_huber_loss_is_linear_beyond_delta(plugin) -> None:
    _, task = plugin
    gold = torch.zeros(3)
    predicted = torch.tensor([0.5, 2.0, -3.0])
    assert task.row_losses("mse", predicted, gold).tolist() == [0.25, 4.0, 9.0]
    assert task.row_losses("huber", predicted, gold, delta=1.0).tolist() == [0.125, 1.5, 2.5]


def test_module_trains_a_regression_head(plugin) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    _, task = plugin
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, problem_type="regression")
    cfg = OmegaConf.create({"task": {"loss": "mse", "huber_delta": 1.0},
                            "optimizer": {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8},
                            "scheduler": {"name": "constant", "warmup_steps": 0}})
    torch.manual_seed(0)
    module = task.build_module(cfg, BertForSequenceClassification(config), tokenizer=None)
    batch = {"input_ids": torch.randint(5, 50, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
             "labels": torch.linspace(-2, 2, 8)}
    assert module(batch).shape == (8,)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = task.row_losses("mse", module(batch), batch["labels"]).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses


def test_validate_rejects_bad_settings_before_any_data(plugin) -> None:
    _, task = plugin
    good = {"task": {"loss": "mse", "huber_delta": 1.0}, "data": {"datamodule": "regression_csv",
                                                                "score_column": "score", "max_length": 128}}
    task.TASK.validate(OmegaConf.create(good))
    bad_loss = OmegaConf.merge(good, {"task": {"loss": "mae"}})
    with pytest.raises(LmlabError, match="task.loss.*'mae'.*mse, huber"):
        task.TASK.validate(bad_loss)
    with pytest.raises(LmlabError, match="task.huber_delta"):
        task.TASK.validate(OmegaConf.merge(good, {"task": {"huber_delta": 0}}))
    text_data = OmegaConf.merge(good, {"data": {"datamodule": "text", "score_column": None}})
    with pytest.raises(LmlabError, match="needs scored text.*datamodule 'text'.*data=vader_lexicon"):
        task.TASK.validate(text_data)
    assert task.TASK.head(None) == "sequence_classification" and task.TASK.packing(None) == "regression"


# -- the installed package -------------------------------------------------------------------------
@pytest.fixture
def not_installed_here() -> None:
    """The venv below sees this environment's packages: a plugin installed here would outlive the uninstall."""
    try:
        where = importlib.metadata.distribution("lmlab-regression").locate_file("")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.skip(f"lmlab-regression is installed in this environment ({where}); "
                "`pip uninstall lmlab-regression` to test the example plugin (and lmlab's registry) cleanly")


class Env:
    """A venv over this environment's site-packages, with pip driven from outside it."""

    def __init__(self, root: Path):
        venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
        self.python = root / "bin" / "python"
        # Not system_site_packages: run from a venv, that is the base interpreter's site-packages, not
        # this environment's (where lmlab and torch are). addsitedir also reads those folders' .pth
        # files, lmlab's editable install among them; the venv's own site-packages stays first.
        own = subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
        lines = "".join(f"import site; site.addsitedir({folder!r})\n" for folder in site.getsitepackages())
        (Path(own) / "_outer_environment.pth").write_text(lines, encoding="utf-8")
        self.cwd = root.parent  # outside the checkout, as a user's project would be

    def start(self, *args: object) -> subprocess.Popen:
        """``python -m lmlab ARGS`` in the venv, started and left running."""
        # MLflow's variables too: a value another test's in-process run left would send this run's
        # metrics to that store instead of LMLAB_HOME's (conftest clears them only between tests).
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HYDRA_FULL_ERROR", "PYTHONSAFEPATH",
                            *MLFLOW_VARIABLES)}
        return subprocess.Popen([str(self.python), "-m", "lmlab", *map(str, args)], cwd=self.cwd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def lmlab(self, *args: object) -> subprocess.CompletedProcess:
        return finish(self.start(*args))

    def pip(self, *args: object) -> None:
        # `pip --python` (pip >= 22.3) installs into the venv without a pip of its own; offline, and
        # the build backend (hatchling) comes from this environment.
        proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(self.python), *map(str, args)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"pip {args} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    def install(self, package: Path) -> None:
        self.pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--force-reinstall", "-q", package)

    def uninstall(self) -> None:
        self.pip("uninstall", "-y", "-q", "lmlab-regression")


def finish(proc: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def group_options(help_text: str, group: str) -> list[str]:
    line = next(line for line in help_text.splitlines() if line.startswith(f"  {group} "))
    return [option.strip(" *") for option in line.split(None, 1)[1].split(",")]


@pytest.mark.slow
@pytest.mark.usefixtures("not_installed_here")
def test_pip_install_run_and_uninstall(tmp_path: Path, lmlab_home: Path) -> None:
    data = write_scored_dir(tmp_path / "scored")
    env = Env(tmp_path / "venv")
    training = None
    try:
        env.install(PLUGIN)
        # Each lmlab start imports torch & co. for seconds: the two independent commands run side by side.
        training = env.start("task=regression", *TINY, f"data.path={data}")
        shown = ok(env.lmlab("--help"))
        assert "regression" in group_options(shown, "task")
        assert {"regression_csv", "vader_lexicon"} <= set(group_options(shown, "data"))
        assert re.search(r"^  regression +text regression", shown, re.M), shown
        assert re.search(r"^  regression_csv +Scored text", shown, re.M), shown

        out = ok(finish(training))
        run_id = re.search(r"MLflow run id: +([0-9a-f]{32})", out).group(1)
        store = re.search(r"--backend-store-uri (\S+)", out).group(1)
        assert store == f"sqlite:///{lmlab_home / 'mlflow.db'}", out[-2000:]
        (run_dir,) = (lmlab_home / "runs").iterdir()
        exported = json.loads((run_dir / "export" / "config.json").read_text())
        assert exported["problem_type"] == "regression" and exported["id2label"] == {"0": "score"}
        assert exported["architectures"] == ["BertForSequenceClassification"]
    finally:
        if training is not None and training.poll() is None:  # a failed check above left it running
            training.kill()
            training.wait()
        env.uninstall()

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{lmlab_home / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmlab.task"] == "regression" and run.data.tags["lmlab.data"] == f"path:{data.resolve()}"
    assert run.data.params["data.datamodule"] == "regression_csv" and run.data.params["task.loss"] == "mse"
    for key in ("val/loss", "val/mse", "val/mae", "val/pearson", "val/spearman", "test/mse", "test/pearson"):
        assert math.isfinite(run.data.metrics[key]), (key, run.data.metrics)
    assert -1.0 <= run.data.metrics["test/pearson"] <= 1.0
    assert len(client.get_metric_history(run_id, "val/pearson")) >= 2  # every val_check_interval, and the final one
    assert "model/config.json" in [a.path for a in client.list_artifacts(run_id, "model")]

    # Uninstalled: the task, its configs and its datamodule are gone, and asking for it says so.
    asked = env.start("task=regression", *TINY)
    shown = ok(env.lmlab("--help"))
    assert "regression" not in group_options(shown, "task") and "regression" not in shown
    gone = finish(asked)
    assert gone.returncode != 0
    assert "Could not find 'task/regression'" in gone.stderr and "Traceback" not in gone.stderr, gone.stderr


def modified_copy(tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(PLUGIN, copy, ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info"))
    return copy


@pytest.mark.slow
@pytest.mark.usefixtures("not_installed_here")
def test_a_copy_that_claims_a_builtin_name_or_file_is_refused(tmp_path: Path) -> None:
    """The real package, changed the two ways a plugin could take over a built-in, both refused."""
    clash = modified_copy(tmp_path, "clash")
    pyproject = clash / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('\nregression = "lmlab_regression.task:TASK"',
                                                       '\nclassification = "lmlab_regression.task:TASK"'))
    shadow = modified_copy(tmp_path, "shadow")
    shutil.copy(shadow / "src" / "lmlab_regression" / "conf" / "task" / "regression.yaml",
                shadow / "src" / "lmlab_regression" / "conf" / "task" / "clm.yaml")
    env = Env(tmp_path / "venv")
    try:
        env.install(clash)
        refused = env.lmlab("task=classification", *TINY)
        assert refused.returncode == 2, refused.stderr
        assert ("lmlab: error: two packages register 'classification' in the entry-point group 'lmlab.tasks': "
                "'lmlab_regression.task:TASK' from lmlab-regression 0.1.0") in refused.stderr
        assert "Traceback" not in refused.stderr
        helped = env.lmlab("--help")  # --help says it too, in the same words
        assert helped.returncode == 2 and "lmlab: error: two packages register 'classification'" in helped.stderr
        assert "Traceback" not in helped.stderr

        env.install(shadow)  # replaces the clashing copy (same distribution name)
        for args in (["task=regression", *TINY], ["--help"]):
            refused = env.lmlab(*args)
            assert refused.returncode == 2, refused.stderr
            assert ("lmlab: error: plugin 'regression' (lmlab_regression.conf) ships 'task/clm.yaml', which would "
                    "shadow lmlab's own conf/task/clm.yaml") in refused.stderr
    finally:
        env.uninstall()
