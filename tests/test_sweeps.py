"""Sweeps: one MLflow parent run per sweep with every job as its child; Optuna studies that resume.

The sweeps are real ``lmlab -m`` subprocesses on tiny models (two optimizer steps each); the
search-space, recovery and parent-run logic are also checked directly, without training.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from conftest import WIKI, lmlab_command
from lmlab import sweep, sweep_parent
from lmlab.cli import _free_form, register_experiments
from lmlab.errors import LmlabError
from lmlab.paths import config_dir

from hydra_plugins.lmlab_grid_sweeper.grid_sweeper import UseGridSweeper
from hydra_plugins.lmlab_optuna_sweeper import _impl, _space

TIMEOUT = 900
# Two optimizer steps of the tiny GPT-2, one validation batch, no export: a few seconds a job.
QUICK = [
    "+experiment=debug", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "export=false",
]


# -- helpers --------------------------------------------------------------------------------------

@dataclass
class Sweep:
    root: Path
    data: Path | None = None  # None: the module's wiki.txt

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.home.resolve() / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
        # The cache is shared by the module's sweeps: one tokenizer for the one corpus.
        env.update(LMLAB_HOME=str(self.home), LMLAB_CACHE_DIR=str(self.root.parent / "cache"), PYTHONUNBUFFERED="1")
        return env

    def args(self, *overrides: str) -> list[str]:
        return [*lmlab_command(), "-m", *QUICK, f"data.path={self.data or self.root.parent / 'wiki.txt'}", *overrides]

    def run(self, *overrides: str) -> subprocess.CompletedProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        return subprocess.run(self.args(*overrides), cwd=self.root, env=self.env(), capture_output=True, text=True,
                              timeout=TIMEOUT)

    def start(self, *overrides: str) -> subprocess.Popen:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "first.log", "w")
        return subprocess.Popen(self.args(*overrides), cwd=self.root, env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def runs(self) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
        """(the one parent run, its children); fails when the store holds anything else."""
        client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name("lmlab")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 1, [(r.info.run_name, r.data.tags) for r in parents]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        assert len(children) == len(runs) - 1, "every other run is a child of the parent"
        return parents[0], children


def describe(proc: subprocess.CompletedProcess) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"


def last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    root = tmp_path_factory.mktemp("sweeps")
    (root / "wiki.txt").write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n",
                                   encoding="utf-8")
    return root


def compose_hydra(overrides: list[str], sweep_dir: Path | None = None):
    """The full config (``hydra`` node included) that ``lmlab -m OVERRIDES`` would start from."""
    register_experiments()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=_free_form(overrides), return_hydra_config=True)
    if sweep_dir is not None:
        cfg.hydra.sweep.dir = str(sweep_dir)
    return cfg


# -- grid sweeps ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_grid_sweep_is_one_parent_run_with_four_children(sweeps: Path) -> None:
    s = Sweep(sweeps / "grid")
    proc = s.run("optimizer.lr=1e-4,3e-4", "seed=1,2")
    assert proc.returncode == 0, describe(proc)
    parent, children = s.runs()
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    swept = sorted((float(c.data.params["optimizer.lr"]), int(c.data.params["seed"])) for c in children)
    assert swept == [(1e-4, 1), (1e-4, 2), (3e-4, 1), (3e-4, 2)]
    for child in children:
        assert math.isfinite(child.data.metrics["val/loss"])
        params = child.data.params
        assert child.info.run_name == f"optimizer.lr={params['optimizer.lr']} seed={params['seed']}"
        assert child.info.experiment_id == parent.info.experiment_id
    # The parent carries the best objective (val/loss, the CLM task's monitored metric: lowest wins).
    best = min(children, key=lambda c: c.data.metrics["val/loss"])
    assert parent.data.metrics["best_objective"] == pytest.approx(best.data.metrics["val/loss"])
    assert parent.data.tags["lmlab.sweep.best_run_id"] == best.info.run_id
    assert parent.data.tags["lmlab.sweep.objective_metric"] == "val/loss"
    assert parent.data.metrics["sweep/jobs"] == 4 and parent.data.metrics["sweep/jobs_failed"] == 0
    assert "optimizer.lr=1e-4,3e-4" in parent.data.tags["lmlab.sweep.overrides"]
    # Each child says how to run it alone, and keeps Hydra's record of its overrides; the parent,
    # the sweep's own command.
    assert parent.data.tags["lmlab.command"].startswith("lmlab -m ")
    assert "optimizer.lr=1e-4,3e-4" in parent.data.tags["lmlab.command"]
    client = mlflow.MlflowClient(tracking_uri=s.uri)
    for child in children:
        command = child.data.tags["lmlab.command"]
        assert command.startswith("lmlab ") and " -m " not in command
        assert f"seed={child.data.params['seed']}" in command.split() and "optimizer.lr=1e-4,3e-4" not in command
        overrides = OmegaConf.load(client.download_artifacts(child.info.run_id, "config/hydra/overrides.yaml",
                                                             str(s.root)))
        assert command == "lmlab " + " ".join(str(o) for o in overrides)
        assert child.data.tags["lmlab.version"] and child.data.tags["mlflow.source.name"] == "lmlab"


@pytest.mark.slow
def test_a_failed_job_stops_the_grid_and_fails_the_parent(sweeps: Path) -> None:
    # Job 0 stops before training; job 1 would train (and open a child run) if it were launched.
    s = Sweep(sweeps / "failing")
    proc = s.run("optimizer.lr=abc,1e-3")
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("lmlab: error: config key 'optimizer.lr'") == 1, describe(proc)
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, describe(proc)
    assert last_line(proc.stderr).startswith(
        "lmlab: error: job 0 (optimizer.lr=abc) failed, so the sweep stopped after launching 1 of its 2 jobs"
    ), describe(proc)
    parent, children = s.runs()
    assert parent.info.status == "FAILED" and children == []
    assert parent.data.metrics["sweep/jobs_failed"] == 1
    records = sweep.job_records(Path(parent.data.tags["lmlab.sweep.dir"]))
    assert {n: r["status"] for n, r in records.items()} == {0: "FAILED"}
    assert "optimizer.lr" in records[0]["error"]


@pytest.mark.slow
def test_a_failed_batch_stops_a_parallel_grid(sweeps: Path) -> None:
    # Two jobs at a time: the first two run side by side and fail (the block does not fit the tiny
    # model's positions); the third is never launched.
    s = Sweep(sweeps / "failing_parallel")
    proc = s.run("hydra/launcher=parallel", "data.block_size=100000,99999,99998")
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("lmlab: error: config key 'data.block_size'") == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    assert last_line(proc.stderr).startswith(
        "lmlab: error: job 0 (data.block_size=100000) failed, with 1 more of its batch, so the sweep stopped after "
        "launching 2 of its 3 jobs"), describe(proc)
    parent, _ = s.runs()
    records = sweep.job_records(Path(parent.data.tags["lmlab.sweep.dir"]))
    assert {n: r["status"] for n, r in records.items()} == {0: "FAILED", 1: "FAILED"}


@pytest.mark.slow
def test_a_misspelt_objective_stops_the_later_jobs_before_they_train(sweeps: Path) -> None:
    s = Sweep(sweeps / "misspelt_objective")
    # One batch of three jobs (the default of one at a time would stop after job 0): the case of
    # jobs that start after an earlier one of their batch found the objective missing.
    # (objective.direction given: a name that does not say its direction is refused before training)
    proc = s.run("objective.metric=val/los", "objective.direction=min", "seed=1,2,3", "hydra.sweeper.max_batch_size=3")
    assert proc.returncode != 0, describe(proc)
    assert proc.stderr.count("lmlab: error: config key 'objective.metric'") == 3, describe(proc)
    assert "the run produced no 'val/los'" in proc.stderr and "Use one of its final metrics: val/loss" in proc.stderr
    assert proc.stderr.count("job 0 of this sweep, with the same task and data, produced no 'val/los'") == 2
    parent, children = s.runs()
    assert parent.info.status == "FAILED"
    assert [c.data.params["seed"] for c in children] == ["1"]  # only the first job trained
    records = sweep.job_records(Path(parent.data.tags["lmlab.sweep.dir"]))
    assert [r["status"] for r in records.values()] == ["FAILED"] * 3


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_other_processes(sweeps: Path) -> None:
    s = Sweep(sweeps / "joblib")
    proc = s.run("hydra/launcher=parallel", "seed=1,2")
    assert proc.returncode == 0, describe(proc)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    parent, children = s.runs()
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["1", "2"]
    assert all(math.isfinite(c.data.metrics["val/loss"]) for c in children)
    sweep_dir = Path(parent.data.tags["lmlab.sweep.dir"])
    pids = {r["pid"] for r in sweep.job_records(sweep_dir).values()}
    assert len(pids) == 2 and sweep.read_sweep(sweep_dir)["pid"] not in pids  # two workers, not the sweeper


# -- Optuna ---------------------------------------------------------------------------------------
OPTUNA = ["hparams_search=clm_optuna", "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2"]


def load_study(s: Sweep) -> optuna.Study:
    return optuna.load_study(study_name="clm_optuna", storage=f"sqlite:///{s.home / 'optuna.db'}")


def assert_children_match_trials(s: Sweep, study: optuna.Study) -> None:
    parent, children = s.runs()
    assert parent.info.status == "FINISHED", parent.info
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    for trial in complete:
        child = by_trial[trial.number]
        assert child.info.status == "FINISHED"
        assert child.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert child.data.metrics["val/loss"] == pytest.approx(trial.value)
        for name, value in trial.params.items():
            assert float(child.data.params[name]) == pytest.approx(value), name
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert parent.data.metrics["best_objective"] == pytest.approx(study.best_value)
    assert parent.data.tags["lmlab.sweep.best_run_id"] == study.best_trial.user_attrs["mlflow_run_id"]


@pytest.mark.slow
def test_optuna_sweep_runs_its_trials(sweeps: Path) -> None:
    s = Sweep(sweeps / "optuna")
    proc = s.run(*OPTUNA, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, describe(proc)
    study = load_study(s)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3
    assert set(study.trials[0].params) == {"optimizer.lr", "optimizer.weight_decay", "scheduler.warmup_ratio",
                                           "scheduler.min_lr_ratio"}
    assert_children_match_trials(s, study)
    assert len(s.runs()[1]) == 3
    results = OmegaConf.load(next(s.home.glob("multiruns/*/optimization_results.yaml")))
    assert results.best_value == pytest.approx(study.best_value) and results.n_complete == 3


@pytest.mark.slow
def test_optuna_sweep_killed_mid_trial_resumes_without_repeating(sweeps: Path) -> None:
    s = Sweep(sweeps / "optuna_resume")
    # Trials long enough (150 steps) that the kill surely lands inside the second one, however fast
    # the machine: it comes as soon as that trial's MLflow child run is open, not after a fixed sleep.
    args = [*OPTUNA, "hydra.sweeper.n_trials=3", "trainer.max_steps=150", "trainer.val_check_interval=150"]
    first = s.start(*args)
    storage = s.home / "optuna.db"
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and first.poll() is None:
            if storage.exists() and _has_study(storage):
                states = [t.state for t in load_study(s).trials]
                if states == [TrialState.COMPLETE, TrialState.RUNNING] and _child_running(s, trial=1):
                    break
            time.sleep(0.2)
        assert first.poll() is None, (s.root / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # no clean-up of any kind
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = load_study(s).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    interrupted = before[1]

    proc = s.run(*args)
    assert proc.returncode == 0, describe(proc)
    assert "1 of 3 trials finished, 2 to run" in proc.stdout + proc.stderr, describe(proc)
    study = load_study(s)
    states = [t.state for t in study.trials]
    # Trial 0 kept; trial 1 (interrupted) failed and asked again as trial 2 with its values; one new.
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[0].value == before[0].value
    assert study.trials[2].user_attrs[_impl.RETRY_OF] == 1
    assert study.trials[2].params == interrupted.params
    assert len(_impl.finished_trials(study)) == 3
    assert_children_match_trials(s, study)
    _, children = s.runs()  # one parent for both sweeps of the study
    assert sorted(c.info.status for c in children).count("FINISHED") == 3
    assert all(c.info.status == "KILLED" for c in children if c.data.tags["optuna.trial"] == "1")


@pytest.mark.slow
def test_a_study_refuses_a_sweep_with_other_fixed_overrides(sweeps: Path) -> None:
    s = Sweep(sweeps / "optuna_tied")
    first = s.run(*OPTUNA, "hydra.sweeper.n_trials=1")
    assert first.returncode == 0, describe(first)
    other = sweeps / "other_corpus"
    other.mkdir(exist_ok=True)
    (other / "part.txt").write_text((sweeps / "wiki.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")

    # Another corpus: the stored trial is no result of this search, so nothing is reused or run.
    proc = Sweep(s.root, data=other).run(*OPTUNA, "hydra.sweeper.n_trials=2")
    assert proc.returncode == 2, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)
    error = last_line(proc.stderr)
    assert error.startswith("lmlab: error: config key 'hydra.sweeper.study_name': study 'clm_optuna'"), describe(proc)
    assert f"data.path={sweeps / 'wiki.txt'} in the study, data.path={other} now" in error
    assert "hydra.sweeper.study_name=NEW_NAME" in error and f"data.path={sweeps / 'wiki.txt'}" in error
    assert [t.state for t in load_study(s).trials] == [TrialState.COMPLETE]
    parent, children = s.runs()
    assert parent.info.status == "FINISHED" and len(children) == 1  # as the first session left it

    # The same fixed overrides resume it, with more trials and another range for a searched key.
    proc = s.run(*OPTUNA, "hydra.sweeper.n_trials=2", "optimizer.lr=tag(log, interval(1e-4, 1e-3))")
    assert proc.returncode == 0, describe(proc)
    assert "1 of 2 trials finished, 1 to run" in proc.stdout + proc.stderr, describe(proc)
    study = load_study(s)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert study.trials[1].params["optimizer.lr"] <= 1e-3
    assert_children_match_trials(s, study)


@pytest.mark.slow
def test_a_failed_trial_stops_an_optuna_sweep_and_runs_again_once_fixed(sweeps: Path) -> None:
    s = Sweep(sweeps / "optuna_failing")
    # The block does not fit the tiny model's positions: a config error, not a result of the search.
    proc = s.run(*OPTUNA, "hydra.sweeper.n_trials=2", "data.block_size=100000")
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("lmlab: error: config key 'data.block_size'") == 1, describe(proc)
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, describe(proc)
    assert last_line(proc.stderr).startswith("lmlab: error: job 0 (trial 0: optimizer.lr="), describe(proc)
    assert "the sweep stopped at 0 of 2 finished trials (its error is above)" in proc.stderr, describe(proc)
    study = load_study(s)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert _impl.finished_trials(study) == []

    # Fixed, the command runs the queued trial: a study with no finished trial is tied to no overrides yet.
    proc = s.run(*OPTUNA, "hydra.sweeper.n_trials=1")
    assert proc.returncode == 0, describe(proc)
    assert "0 of 1 trials finished, 1 to run" in proc.stdout + proc.stderr, describe(proc)
    study = load_study(s)
    assert study.trials[1].state == TrialState.COMPLETE and study.trials[1].params == study.trials[0].params


@pytest.mark.slow
def test_sigterm_ends_an_optuna_sweep_with_a_line_on_how_to_resume(sweeps: Path) -> None:
    s = Sweep(sweeps / "optuna_sigterm")
    args = [*OPTUNA, "hydra.sweeper.n_trials=2", "trainer.max_steps=400", "trainer.val_check_interval=400",
            "checkpoint.every_n_steps=1"]
    proc = s.start(*args)
    try:
        deadline = time.time() + TIMEOUT
        # Once last.ckpt exists the first trial is training: SIGTERM lands in Lightning's fit.
        while time.time() < deadline and proc.poll() is None and not list(s.home.glob("multiruns/*/0/checkpoints/*")):
            time.sleep(0.2)
        assert proc.poll() is None, (s.root / "first.log").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)  # the sweep's process alone, as `timeout -s TERM` does
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = (s.root / "first.log").read_text()
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-5000:]
    # The job's run folder is no run to resume: neither line offers resume=.
    assert "lmlab: error: job 0 of the sweep was stopped by SIGTERM; the sweep stops." in out, out[-3000:]
    assert "resume=" not in out, out[-3000:]
    assert last_line(out) == ("lmlab: error: the sweep was stopped by SIGTERM. Run the same command again to resume: "
                              "study 'clm_optuna' keeps its finished trials and runs only the missing ones (an "
                              "interrupted trial again, from scratch)."), out[-3000:]
    assert [t.state for t in load_study(s).trials] == [TrialState.FAIL, TrialState.WAITING]  # queued again
    parent, children = s.runs()
    assert parent.info.status == "KILLED" and [c.info.status for c in children] == ["KILLED"]


def _child_running(s: Sweep, trial: int) -> bool:
    """Whether the MLflow child run of Optuna trial ``trial`` is open (the store may be mid-write)."""
    try:
        _, children = s.runs()
    except Exception:
        return False
    return any(c.data.tags.get("optuna.trial") == str(trial) and c.info.status == "RUNNING" for c in children)


def _has_study(storage: Path) -> bool:
    import sqlite3

    with sqlite3.connect(storage) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return "trials" in tables and con.execute("SELECT count(*) FROM studies").fetchone()[0] > 0


# -- without training -----------------------------------------------------------------------------
def test_search_space_from_hydra_sweep_syntax() -> None:
    space = _space.parse([
        "optimizer.lr=tag(log, interval(1e-5, 1e-3))", "data.batch_size=choice(16, 32)", "seed=range(1, 10, 2)",
        "optimizer.weight_decay=interval(0.0, 0.1)", "model.size=tiny,small", "scheduler.warmup_ratio=0.1",
        "data.batch_size=8",  # a plain value on the command line fixes a searched key
        "+foo=range(0.0, 0.3, 0.1)",
    ])
    d = space.distributions
    assert d["optimizer.lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert d["seed"] == IntDistribution(1, 9, step=2)
    assert d["optimizer.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert d["model.size"] == CategoricalDistribution(["tiny", "small"])
    assert (d["foo"].low, d["foo"].high, d["foo"].step) == (0.0, pytest.approx(0.2), 0.1)
    assert "data.batch_size" not in d
    values = {"optimizer.lr": 3e-4, "seed": 3, "optimizer.weight_decay": 0.05, "model.size": "small", "foo": 0.1}
    assert space.overrides(values) == [
        "scheduler.warmup_ratio=0.1", "data.batch_size=8", "optimizer.lr=0.0003", "seed=3",
        "optimizer.weight_decay=0.05", "model.size=small", "+foo=0.1",
    ]
    grid = _space.parse(["seed=range(1, 4)", "model.size=tiny,small"]).grid()
    assert grid == {"seed": [1, 2, 3], "model.size": ["tiny", "small"]}
    with pytest.raises(HydraException, match="grid needs a finite set"):
        _space.parse(["optimizer.lr=interval(1e-5, 1e-3)"]).grid()
    # An interval Optuna refuses names the override it came from, not only Optuna's words.
    for bad in ("optimizer.lr=tag(log, interval(0.0, 1e-3))", "optimizer.lr=interval(1e-3, 1e-5)"):
        with pytest.raises(HydraException, match=re.escape(bad.split("=", 1)[0])):
            _space.parse([bad])


def test_interrupted_trials_are_failed_requeued_and_not_counted(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    done = study.ask()
    done.suggest_float("x", 0, 1)
    study.tell(done, 0.5)
    dead = study.ask()
    x = dead.suggest_float("x", 0, 1)
    dead.set_user_attr(_impl.HEARTBEAT, time.time() - 100)  # its sweep stopped beating long ago
    alive = study.ask()
    alive.suggest_float("x", 0, 1)
    alive.set_user_attr(_impl.HEARTBEAT, time.time() + 3600)  # another sweep is on it right now

    recovered = _impl.recover_interrupted(study, grace_period=1)
    assert [t.number for t in recovered] == [dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.FAIL, 2: TrialState.RUNNING, 3: TrialState.WAITING}
    retry = study.ask()  # the queued re-run comes first, with the interrupted values
    assert retry.number == 3 and retry.suggest_float("x", 0, 1) == x
    study.tell(retry, 0.1)
    assert [t.number for t in _impl.finished_trials(study)] == [0, 3]  # trial 1 is not counted


def test_launcher_presets_compose() -> None:
    cfg = compose_hydra(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                         "hydra.launcher.tasks_per_node=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 2)
    assert launcher.nodes == 1 and launcher.timeout_min == 240 and launcher.mem_gb == 64
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    cfg = compose_hydra(["hydra/launcher=parallel"])
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == 2


def test_a_grid_launches_as_many_jobs_at_a_time_as_its_launcher_runs() -> None:
    def sweeper(*overrides: str):
        cfg = compose_hydra(list(overrides))
        UseGridSweeper().on_multirun_start(cfg)  # what the hydra.callbacks entry does before the sweep
        return cfg.hydra.sweeper

    assert sweeper()._target_ == "hydra_plugins.lmlab_grid_sweeper.grid_sweeper.GridSweeper"
    assert sweeper().max_batch_size == 1  # in-process: the first failed job is the last one
    assert sweeper("hydra/launcher=parallel", "hydra.launcher.n_jobs=3").max_batch_size == 3
    assert sweeper("hydra/launcher=slurm").max_batch_size == 16  # array_parallelism
    assert sweeper("hydra.sweeper.max_batch_size=5").max_batch_size == 5
    assert sweeper("hparams_search=clm_optuna")._target_.endswith("lmlab_optuna_sweeper.optuna_sweeper.OptunaSweeper")
    assert "grid_sweeper" in compose_hydra([]).hydra.callbacks


@pytest.mark.parametrize("preset", ["classification_optuna", "clm_optuna"])
def test_optuna_presets_compose_and_agree_with_their_objective(preset: str) -> None:
    cfg = compose_hydra([f"hparams_search={preset}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.lmlab_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.storage.startswith("sqlite:///") and sweeper.storage.endswith("/optuna.db")
    assert sweeper.study_name == preset and sweeper.params
    space = _space.parse([f"{k}={v}" for k, v in sweeper.params.items()])
    assert set(space.distributions) == set(sweeper.params)
    metric, mode, certain = sweep.objective_direction(cfg)
    assert certain and {"min": "minimize", "max": "maximize"}[mode] == sweeper.direction
    assert metric == cfg.objective.metric


def test_a_sweeper_pointed_the_wrong_way_stops_the_job(tmp_path: Path) -> None:
    def as_job(direction: str):
        cfg = compose_hydra(["hparams_search=classification_optuna", f"hydra.sweeper.direction={direction}"], tmp_path)
        with open_dict(cfg):
            cfg.hydra.mode = "MULTIRUN"
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)  # what Hydra does around a multirun job
        return cfg

    try:
        with pytest.raises(LmlabError, match="hydra.sweeper.direction=maximize"):
            sweep.check_direction(as_job("minimize"))
        sweep.check_direction(as_job("maximize"))
    finally:
        HydraConfig.instance().cfg = None


def test_a_wrong_direction_stops_the_sweep_before_its_study_exists(sweeps: Path) -> None:
    # A study stored with the wrong direction would refuse the corrected command line afterwards.
    s = Sweep(sweeps / "wrong_direction")
    proc = s.run("hparams_search=classification_optuna", "hydra.sweeper.n_trials=1",
                 "hydra.sweeper.direction=minimize")
    assert proc.returncode == 2, describe(proc)
    assert "lmlab: error: config key 'hydra.sweeper.direction'" in proc.stderr
    assert "hydra.sweeper.direction=maximize" in proc.stderr and "Traceback" not in proc.stderr
    storage = s.home / "optuna.db"
    assert not storage.exists() or not _has_study(storage)
    parent, children = s.runs()
    assert parent.info.status == "FAILED" and children == []  # no job started


def test_parent_run_status_comes_from_the_job_records(tmp_path: Path) -> None:
    cfg = compose_hydra([], tmp_path / "sweep")
    cfg.hydra.overrides.task = ["optimizer.lr=1e-4,3e-4", "seed=3"]  # what `lmlab -m` hands the callback
    info = sweep_parent.open_parent(cfg)
    client = mlflow.MlflowClient(tracking_uri=info["tracking_uri"])
    assert client.get_run(info["parent_run_id"]).info.status == "RUNNING"
    assert info["swept_keys"] == ["optimizer.lr"]
    sweep.record_job(tmp_path / "sweep", 0, status="COMPLETED", objective=2.0, direction="min", metric="val/loss")
    sweep.record_job(tmp_path / "sweep", 1, status="COMPLETED", objective=1.5, direction="min", metric="val/loss")
    assert sweep_parent.close_parent(tmp_path / "sweep", ended_normally=False) == "FAILED"  # died between jobs
    run = client.get_run(info["parent_run_id"])
    assert run.data.metrics["best_objective"] == 1.5 and run.data.tags["lmlab.sweep.best_job"] == "1"
    assert json.loads(Path(client.download_artifacts(info["parent_run_id"], "sweep/jobs.json", str(tmp_path)))
                      .read_text())["1"]["objective"] == 1.5

    again = sweep_parent.open_parent(cfg)  # the same sweep dir again: the same parent, running again
    assert again["parent_run_id"] == info["parent_run_id"]
    assert sweep_parent.close_parent(tmp_path / "sweep", ended_normally=True) == "FINISHED"
    sweep.record_job(tmp_path / "sweep", 2, status="FAILED", error="boom")
    sweep_parent.open_parent(cfg)
    assert sweep_parent.close_parent(tmp_path / "sweep", ended_normally=True) == "FAILED"


def test_a_sweep_whose_parent_run_cannot_be_opened_starts_no_job(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from hydra._internal.callbacks import Callbacks

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    # MLflow fails there with an OSError, no lmlab error; Hydra only warns about an Exception from a
    # callback, so before, every job ran without the parent (or under one left in the sweep directory).
    cfg = compose_hydra([f"logger.tracking_uri=sqlite:///{blocker}/mlflow.db"], tmp_path / "sweep")
    cfg.hydra.overrides.task = ["seed=1,2"]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            Callbacks(cfg).on_multirun_start(config=cfg)  # as Hydra calls the hydra.callbacks entries
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        sweep_parent._sweeper = None
    assert stopped.value.code == 2
    assert "lmlab: error: the sweep could not open its parent MLflow run (FileExistsError" in capsys.readouterr().err


def test_a_childs_run_name_fits_mlflows_name_column(tmp_path: Path) -> None:
    # runs.name holds 250 characters: PostgreSQL and MySQL refused a longer name at the job's start.
    keys = [f"model.config.option_number_{i}" for i in range(12)]
    ctx = sweep.JobContext(tmp_path, 0, ["seed=3", *(f"{k}=0.000123456789" for k in keys)], {"swept_keys": keys})
    name = sweep.child_run_name(ctx)
    assert name is not None and len(name) == 250
    assert name.startswith("model.config.option_number_0=0.0001235 model.config.option_number_1=0.0001235 ")


@pytest.mark.parametrize(("direction", "sweeper", "best"), [("min", None, 0), ("max", None, 1),
                                                             ("max", "maximize", 1), ("min", "minimize", 0)])
def test_the_parent_names_the_best_job_in_the_objectives_direction(tmp_path: Path, direction: str,
                                                                   sweeper: str | None, best: int) -> None:
    preset = [] if sweeper is None else ["hparams_search=classification_optuna", f"hydra.sweeper.direction={sweeper}"]
    cfg = compose_hydra(preset, tmp_path / "sweep")
    cfg.hydra.overrides.task = [*preset, "optimizer.lr=1e-4,3e-4"]  # what `lmlab -m` hands the callback
    info = sweep_parent.open_parent(cfg)
    jobs = [(0.5, ["optimizer.lr=1e-4"], "COMPLETED"), (0.9, ["optimizer.lr=3e-4"], "COMPLETED"),
            (math.nan, ["optimizer.lr=1"], "COMPLETED"),  # diverged: never the best
            (5.0, ["optimizer.lr=2"], "FAILED")]
    for num, (value, job_overrides, status) in enumerate(jobs):
        sweep.record_job(tmp_path / "sweep", num, status=status, objective=value, direction=direction,
                         metric="val/score", overrides=job_overrides, run_id=f"run{num}")
    assert sweep_parent.close_parent(tmp_path / "sweep", ended_normally=True) == "FAILED"  # job 3 failed
    run = mlflow.MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["parent_run_id"])
    assert run.data.metrics["best_objective"] == jobs[best][0]
    assert run.data.tags["lmlab.sweep.best_job"] == str(best)
    assert run.data.tags["lmlab.sweep.best_run_id"] == f"run{best}"
    assert run.data.tags["lmlab.sweep.best_overrides"] == jobs[best][1][0]
    assert run.data.metrics["sweep/jobs"] == 4 and run.data.metrics["sweep/jobs_failed"] == 1


def test_a_seeded_sampler_draws_the_same_trials_in_every_sweep() -> None:
    def draws(seed: int) -> list[list[str]]:
        sampler = OmegaConf.create({"_target_": "optuna.samplers.TPESampler", "seed": seed, "n_startup_trials": 2,
                                    "multivariate": False, "constant_liar": False})
        impl = _impl.OptunaSweeperImpl(sampler=sampler, direction="minimize", storage=None, study_name="s",
                                       n_trials=5, n_jobs=1, max_failure_rate=0.0, heartbeat_interval=10,
                                       grace_period=None, params={"optimizer.lr": "tag(log, interval(1e-5, 1e-3))",
                                                                  "data.batch_size": "choice(16, 32)"})
        space = _space.parse([f"{k}={v}" for k, v in impl.params.items()])
        study = impl._open_study(space)
        out = []
        for _ in range(5):  # past n_startup_trials: TPE's own draws too
            trial = study.ask()
            values = _space.suggest(trial, space)
            study.tell(trial, values["optimizer.lr"] * values["data.batch_size"])
            out.append(space.overrides(values))
        return out

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_the_objectives_direction_comes_from_the_monitor_objective_direction_or_the_name(tmp_path: Path) -> None:
    def direction(*overrides: str):
        return sweep.objective_direction(compose_hydra(["task=classification", *overrides]))

    assert direction() == ("val/accuracy", "max", True)  # the task's monitored metric
    # Before, a metric other than the monitored one was guessed "max" unless it held 'loss':
    # a grid sweep over val/mae reported its worst job as best.
    assert direction("objective.metric=val/mae") == ("val/mae", "min", True)
    assert direction("objective.metric=val/loss") == ("val/loss", "min", True)
    assert direction("objective.metric=val/custom") == ("val/custom", "max", False)  # a guess
    assert direction("objective.metric=val/custom", "objective.direction=min") == ("val/custom", "min", True)
    with pytest.raises(LmlabError, match="objective.direction"):
        direction("objective.direction=down")


def test_a_sweep_refuses_an_objective_whose_direction_it_cannot_know(tmp_path: Path) -> None:
    cfg = compose_hydra(["objective.metric=val/custom"], tmp_path)
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)  # what Hydra does around a multirun job
    try:
        with pytest.raises(LmlabError, match=r"'objective.direction'.*val/custom.*objective.direction=max"):
            sweep.check_objective_direction(cfg)
        with open_dict(cfg):
            cfg.objective.direction = "max"
        sweep.check_objective_direction(cfg)
        # The Optuna check knows val/loss falls, though it is not the monitored metric.
        with open_dict(cfg):
            cfg.objective = {"metric": "val/loss", "direction": None}
        with pytest.raises(LmlabError, match="hydra.sweeper.direction=minimize"):
            sweep.check_sweeper_direction(cfg, "maximize")
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_a_job_that_fails_after_its_run_ended_leaves_a_failed_child_run(sweeps: Path) -> None:
    # The run trains and ends well, then the job fails (its objective is missing): before, the
    # child run stayed FINISHED while the job record and the parent counted a failed job.
    s = Sweep(sweeps / "fails_after_run")
    proc = s.run("objective.metric=val/los", "objective.direction=min", "seed=1")
    assert proc.returncode == 2, describe(proc)
    assert "the run produced no 'val/los'" in proc.stderr, describe(proc)
    parent, children = s.runs()
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/jobs_failed"] == 1
    assert [c.info.status for c in children] == ["FAILED"]
    assert math.isfinite(children[0].data.metrics["val/loss"])  # the run itself is kept as it was


@pytest.mark.slow
def test_a_grid_run_again_in_its_directory_keeps_no_record_of_the_earlier_job(sweeps: Path) -> None:
    s = Sweep(sweeps / "same_dir")
    sweep_dir = s.root / "the_sweep"
    first = s.run(f"hydra.sweep.dir={sweep_dir}", "seed=1")
    assert first.returncode == 0, describe(first)
    earlier = sweep.job_records(sweep_dir)[0]
    assert earlier["status"] == "COMPLETED" and math.isfinite(earlier["objective"])

    # Job 0 again, failing before its run opens: its record held the earlier run and objective, and
    # the parent named that run the best job of a sweep whose only job failed.
    again = s.run(f"hydra.sweep.dir={sweep_dir}", "seed=1", "optimizer.lr=abc")
    assert again.returncode == 2, describe(again)
    record = sweep.job_records(sweep_dir)[0]
    assert record["status"] == "FAILED" and "optimizer.lr" in record["error"]
    assert "run_id" not in record and record.get("objective") is None
    parent, children = s.runs()
    assert parent.info.status == "FAILED"
    assert [c.info.status for c in children] == ["FINISHED"]  # the earlier session's run, untouched


def test_an_optuna_parent_records_the_best_trials_overrides_as_hydra_reads_them(tmp_path: Path) -> None:
    # Before, best_overrides was "name=value" of the searched parameters only: no fixed overrides
    # (another corpus when run again), no "+" of an appended key, and a value with a comma read
    # back as a sweep.
    cfg = compose_hydra(["hparams_search=clm_optuna"], tmp_path / "sweep")
    cfg.hydra.overrides.task = ["hparams_search=clm_optuna", "data.path=corpus.txt"]
    info = sweep_parent.open_parent(cfg)
    space = _space.parse(["hparams_search=clm_optuna", "data.path=corpus.txt", "+model.config.note=choice('a,b', c)",
                          "optimizer.lr=tag(log, interval(1e-4, 1e-3))"])
    study = optuna.create_study()
    for value, note in ((2.0, "c"), (1.0, "a,b")):
        study.add_trial(optuna.trial.create_trial(params={"model.config.note": note, "optimizer.lr": 5e-4},
                                                  distributions=space.distributions, value=value))
    impl = _impl.OptunaSweeperImpl(sampler=OmegaConf.create({"_target_": "optuna.samplers.RandomSampler"}),
                                   direction="minimize", storage=None, study_name="s", n_trials=2, n_jobs=1,
                                   max_failure_rate=0.0, params=None, heartbeat_interval=10, grace_period=None)
    impl._results(study, tmp_path / "sweep", space)
    assert sweep_parent.close_parent(tmp_path / "sweep", ended_normally=True) == "FINISHED"
    run = mlflow.MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["parent_run_id"])
    assert run.data.metrics["best_objective"] == 1.0
    best = run.data.tags["lmlab.sweep.best_overrides"]
    assert best == r"hparams_search=clm_optuna data.path=corpus.txt +model.config.note=a\,b optimizer.lr=0.0005"
    parsed = _space.parse(best.split(" "))
    assert not parsed.distributions and parsed.fixed["model.config.note"] == r"+model.config.note=a\,b"


def test_a_starting_job_drops_only_an_earlier_sessions_record(tmp_path: Path) -> None:
    earlier = sweep.JobContext(tmp_path, 0, ["seed=1"], {"parent_run_id": "p", "session": "one"})
    sweep.job_started(earlier, "run-of-session-one")
    sweep.record_job(tmp_path, 0, status="COMPLETED", objective=1.5)
    now = sweep.JobContext(tmp_path, 0, ["seed=1"], {"parent_run_id": "p", "session": "two"})
    sweep.record_job(tmp_path, 0, tags={"optuna.trial": 4})  # what the Optuna sweeper writes before the launch
    sweep.reset_job(now)
    assert sweep.job_records(tmp_path)[0] == {"num": 0, "tags": {"optuna.trial": 4}}
    # A requeued SLURM job of this session reopens its run without job_started: its run id stays.
    sweep.job_started(now, "run-of-session-two")
    sweep.reset_job(now)
    assert sweep.job_records(tmp_path)[0]["run_id"] == "run-of-session-two"


def test_a_searched_string_reaches_the_job_as_that_string() -> None:
    # Before, choice('16', 'true') handed the job the number 16 and the boolean true (the quotes were
    # dropped), and a quote inside a value made an override Hydra could not parse.
    space = _space.parse(["logger.run_name=choice('16', 'true', \"it's\", plain)"])
    for value in space.distributions["logger.run_name"].choices:
        cfg = compose_hydra(space.overrides({"logger.run_name": value}))
        assert cfg.logger.run_name == value and isinstance(cfg.logger.run_name, str), space.overrides(
            {"logger.run_name": value})
    assert space.overrides({"logger.run_name": "plain"}) == ["logger.run_name=plain"]  # no quotes where none are needed
