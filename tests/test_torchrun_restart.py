"""torchrun ``--max-restarts``: when a worker dies, torchrun starts every worker again, and the run
continues from its ``last.ckpt`` in the same directory and MLflow run (it once started a new run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from omegaconf import OmegaConf

from conftest import TINY, wiki_head

COMMON = [*TINY, "trainer=ddp_cpu", "data.max_documents=80", "data.batch_size=4", "trainer.max_steps=12",
          "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "checkpoint.every_n_steps=2", "export=false",
          # No dropout: the resumed run computes what the uninterrupted one does.
          "model.config.resid_pdrop=0.0", "model.config.embd_pdrop=0.0", "model.config.attn_pdrop=0.0"]
TORCHELASTIC = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                "TORCHELASTIC_USE_AGENT_STORE", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK")


def _children(pid: int) -> dict[int, int]:
    """{global rank: pid} of the worker processes torchrun (``pid``) runs now."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) != pid:
                continue
            env = dict(item.split(b"=", 1) for item in (stat.parent / "environ").read_bytes().split(b"\0") if b"=" in item)
            workers[int(env[b"RANK"])] = int(stat.parent.name)
        except (OSError, ValueError, IndexError, KeyError):  # gone meanwhile, or not a worker yet
            continue
    return workers


def _torchrun(home: Path, text: Path, kill_rank_one: bool) -> tuple[str, bool]:
    """Run the job under torchrun with one restart allowed; with ``kill_rank_one``, SIGKILL rank 1 as
    soon as the first ``last.ckpt`` is on disk. Returns the output and whether the kill happened."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH", *TORCHELASTIC)}
    # pytorch issue #135712: with the store torchrun shares by default, the restarted gloo workers
    # read the failed attempt's addresses and never connect. The README gives the same advice.
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(home.parent / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
               "-m", "lmlab", *COMMON, f"data.path={text}"]
    log = home.parent / f"{home.name}.log"
    with open(log, "w") as out:
        job = subprocess.Popen(command, env=env, cwd=home.parent, stdout=out, stderr=subprocess.STDOUT)
        killed = False
        deadline = time.monotonic() + 600
        while job.poll() is None and time.monotonic() < deadline:
            if kill_rank_one and not killed and list(home.glob("runs/*/checkpoints/last.ckpt")):
                worker = _children(job.pid).get(1)
                if worker is not None:
                    os.kill(worker, signal.SIGKILL)
                    killed = True
            time.sleep(0.05)
        if job.poll() is None:
            job.kill()
        job.wait()
    output = log.read_text()
    assert job.returncode == 0, output[-4000:]
    return output, killed


def _only_run(home: Path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one job"
    return client, runs[0]


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_restarted_by_torchrun_and_the_run_continues(tmp_path: Path) -> None:
    text = wiki_head(tmp_path)
    _torchrun(tmp_path / "whole", text, kill_rank_one=False)
    output, killed = _torchrun(tmp_path / "restarted", text, kill_rank_one=True)
    assert killed, "the run finished before rank 1 could be killed"

    (run_dir,) = (tmp_path / "restarted" / "runs").iterdir()  # the restart wrote into the same directory
    record = json.loads((run_dir / "lmlab_run.json").read_text())
    assert record["status"] == "finished" and len(record["resumes"]) == 1
    assert "torchrun started the workers again (restart 1): continuing the run in" in output
    assert output.count(f"Resuming from {run_dir / 'checkpoints' / 'last.ckpt'}") == 2  # both ranks
    client, run = _only_run(tmp_path / "restarted")
    assert run.info.status == "FINISHED" and run.info.run_id == record["mlflow_run_id"]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 11  # each step logged once, to the last

    _, whole = _only_run(tmp_path / "whole")
    assert run.data.metrics["val/loss"] == pytest.approx(whole.data.metrics["val/loss"], rel=1e-6)


# Which run a restart continues, in this process with a fake run record.
@pytest.fixture
def restart_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(cfg, run_dir): a run of launch 'r1' left unfinished with a last.ckpt; this process is a
    worker of its first restart on one machine."""
    for key in TORCHELASTIC:
        monkeypatch.delenv(key, raising=False)
    for key, value in {"TORCHELASTIC_RUN_ID": "r1", "TORCHELASTIC_RESTART_COUNT": "1", "WORLD_SIZE": "2",
                       "LOCAL_WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "runs" / "2000_clm_gpt2"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (run_dir / "lmlab_run.json").write_text(json.dumps({"mlflow_run_id": "abc", "status": "failed",
                                                         "torchrun_run_id": "r1"}))
    return OmegaConf.create({"mode": "fit"}), run_dir


def test_a_restart_continues_only_its_own_launchs_unfinished_run(restart_env, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.resume import LAST, restarted

    cfg, run_dir = restart_env
    found = restarted(cfg, run_dir)
    assert found is not None and found.run_dir == run_dir and found.run_id == "abc"
    assert found.checkpoint == run_dir / LAST

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # the first attempt is a new run
    assert restarted(cfg, run_dir) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert restarted(OmegaConf.create({"mode": "test"}), run_dir) is None  # nothing to train on
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r2")  # another launch's run in a reused directory
    assert restarted(cfg, run_dir) is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "r1")
    (run_dir / LAST).unlink()  # the failed attempt stopped before its first checkpoint: a new run
    assert restarted(cfg, run_dir) is None


def test_a_finished_run_or_a_restart_on_several_machines_is_not_continued(
        restart_env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from lmlab.resume import restarted

    cfg, run_dir = restart_env
    record = json.loads((run_dir / "lmlab_run.json").read_text())
    (run_dir / "lmlab_run.json").write_text(json.dumps({**record, "status": "finished"}))
    assert restarted(cfg, run_dir) is None
    (run_dir / "lmlab_run.json").write_text(json.dumps(record))
    monkeypatch.setenv("WORLD_SIZE", "4")  # two machines of two workers: each agent names its own directory
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level("WARNING", logger="lmlab.resume"):
        assert restarted(cfg, run_dir) is None
    assert "on several machines: this is a new run; resume=DIR continues" in caplog.text


def test_a_restart_on_one_machine_names_the_first_attempts_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab import distributed

    for key in TORCHELASTIC:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_process_started", lambda pid: distributed.dt.datetime(2030, 1, 2, 3, 4, 5))
    for key, value in {"TORCHELASTIC_RUN_ID": "r1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    names = {}
    for restart in ("0", "1"):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restart)
        names[restart] = distributed.launch_time()
    assert names["0"] == names["1"] == "2030-01-02_03-04-05-000000"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one of two machines: the restart is a new run, elsewhere
    assert distributed.launch_time() == "2030-01-02_03-04-05-000001"


def test_the_shared_rendezvous_store_is_named_before_a_restart_needs_it(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from lmlab import resume

    for key in TORCHELASTIC:
        monkeypatch.delenv(key, raising=False)
    cfg = OmegaConf.create({"mode": "fit", "resume": None, "checkpoint": {}, "faults": {}})
    for restarts, shared, warned in (("0", "True", False), ("3", "False", False), ("3", "True", True)):
        monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
        monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", shared)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lmlab.resume"):
            assert resume.prepare(cfg) is None
        assert ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text) == warned, (restarts, shared)
