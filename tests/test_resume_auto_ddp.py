"""``resume=auto`` under DDP: every rank continues the run global rank 0 chose.

Rank 0 skips an unfinished run whose process is still alive (another job is training it) and then
claims the one it resumes (its run record takes rank 0's pid). The other ranks once searched on
their own: Lightning's rank 1, started after the claim, took the live run of the other job when it
was newer; torchrun's rank 1, searching beside rank 0, did the same. Each rank then loaded another
checkpoint: a silent divergence. Here the newer run is live (its record names a running ``sleep``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, wiki_head

COMMON = [*TINY, "trainer=ddp_cpu", "data.max_documents=80", "data.batch_size=4", "trainer.val_check_interval=2",
          "trainer.limit_val_batches=1", "checkpoint.every_n_steps=2", "export=false"]
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")


def lmlab(home: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> str:
    """Run the CLI (every rank's output: Hydra logs to stdout); its output on success."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
    env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(home.parent / "cache"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, *launcher, "-m", "lmlab", *COMMON, *overrides], env=env, cwd=home.parent,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def seed_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home holding one DDP run stopped at step 2 (its record says it finished; tests rewrite it)."""
    root = tmp_path_factory.mktemp("auto_ddp")
    home = root / "seed"
    lmlab(home, f"data.path={wiki_head(root)}", "trainer.max_steps=2")
    return home


@pytest.fixture
def two_unfinished(seed_home: Path, tmp_path: Path):
    """(home, older, newer): two unfinished runs at step 2; the newer one is live (a ``sleep`` runs it)."""
    home = seed_home.parent / tmp_path.name
    shutil.copytree(seed_home, home)
    (seed,) = (home / "runs").iterdir()
    older, newer = home / "runs" / "2000-01-01_older_clm_gpt2", home / "runs" / "2000-01-02_newer_clm_gpt2"
    seed.rename(older)
    shutil.copytree(older, newer)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        for run_dir, started, pid in ((older, "2000-01-01T00:00:00+00:00", None),
                                      (newer, "2000-01-02T00:00:00+00:00", sleeper.pid)):
            record = json.loads((run_dir / "lmlab_run.json").read_text())
            record.update(status="killed" if pid is None else "running", started=started, pid=pid,
                          host=socket.gethostname())
            (run_dir / "lmlab_run.json").write_text(json.dumps(record))
        yield home, older, newer
    finally:
        sleeper.kill()
        sleeper.wait()


def assert_every_rank_resumed(output: str, older: Path, newer: Path) -> None:
    """Both ranks logged the older run's checkpoint, none the newer run but to say it is not resumed."""
    resumed = [line.split("Resuming from ", 1)[1].strip() for line in output.splitlines() if "Resuming from " in line]
    assert resumed == [str(older / "checkpoints" / "last.ckpt")] * 2, output[-4000:]
    named = [line for line in output.splitlines() if str(newer) in line and "Not resuming" not in line]
    assert not named, output[-4000:]
    assert step(older) == 4 and step(newer) == 2
    record = json.loads((older / "lmlab_run.json").read_text())
    assert record["status"] == "finished" and len(record["resumes"]) == 1
    assert json.loads((newer / "lmlab_run.json").read_text())["status"] == "running"  # untouched


@pytest.mark.slow
def test_lightnings_second_process_resumes_the_run_rank_zero_chose(two_unfinished) -> None:
    home, older, newer = two_unfinished
    output = lmlab(home, f"data.path={home.parent / 'wiki.txt'}", "trainer.max_steps=4", "resume=auto")
    assert f"Not resuming {newer}" in output  # rank 0 skipped the live run
    assert_every_rank_resumed(output, older, newer)


@pytest.mark.slow
def test_torchrun_ranks_resume_the_run_rank_zero_chose(two_unfinished) -> None:
    home, older, newer = two_unfinished
    output = lmlab(home, f"data.path={home.parent / 'wiki.txt'}", "trainer.max_steps=4", "resume=auto",
                   f"hydra.run.dir={home / 'runs' / 'torchrun_launch'}", launcher=TORCHRUN)
    assert_every_rank_resumed(output, older, newer)
    assert f"resume=auto: global rank 0 chose {older}" in output  # rank 1 waited for rank 0's claim
    assert json.loads((older / "lmlab_run.json").read_text())["claim"]["launch"].startswith("torchrun:")


# The hand-over itself, in this process, with fake runs: which run each rank of each launcher takes.
RANK_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "TORCHELASTIC_RUN_ID",
             "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT", "SLURM_JOB_ID",
             "SLURM_STEP_ID", "SLURM_NTASKS", "SLURM_RESTART_COUNT")


@pytest.fixture
def fake_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(cfg, older, newer): two unfinished clm/gpt2 runs; the newer one's process (a ``sleep``) is alive."""
    from lmlab import resume

    for key in (*RANK_KEYS, resume.CHOICE_ENV):
        monkeypatch.delenv(key, raising=False)
    sleeper = subprocess.Popen(["sleep", "600"])
    runs = {}
    for name, started, pid in (("older", "2000-01-01T00:00:00+00:00", None),
                               ("newer", "2000-01-02T00:00:00+00:00", sleeper.pid)):
        run_dir = tmp_path / "runs" / f"2000_{name}_clm_gpt2"
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
        (run_dir / "lmlab_run.json").write_text(json.dumps(
            {"task": "clm", "model": "gpt2", "status": "running", "started": started, "pid": pid,
             "host": socket.gethostname(), "mlflow_run_id": name}))
        runs[name] = run_dir
    cfg = OmegaConf.create({"paths": {"root": str(tmp_path)}, "task": {"name": "clm"}, "model": {"name": "gpt2"}})
    try:
        yield cfg, runs["older"], runs["newer"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lightnings_processes_take_the_choice_rank_zero_left_in_their_environment(
        fake_runs, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from lmlab import resume

    cfg, older, newer = fake_runs
    chosen = resume._auto(cfg)  # rank 0 (one process, or before Lightning starts the others)
    assert chosen.run_dir == older and chosen.run_id == "older"
    resume._hand_on(chosen.run_dir)
    assert os.environ[resume.CHOICE_ENV] == f"{os.getpid()} {older}"
    assert "claim" not in json.loads((older / "lmlab_run.json").read_text())  # no launch id: nothing written

    monkeypatch.setenv("LOCAL_RANK", "1")  # a process Lightning started from this one
    rank_zero = os.getpid()
    monkeypatch.setattr(os, "getppid", lambda: rank_zero)
    assert resume._auto(cfg).run_dir == older
    # A value another process left in the environment is not this launch's: an unknown launcher
    # searches as before (the newer run, whose process it cannot tell from rank 0's), with a warning.
    monkeypatch.setenv(resume.CHOICE_ENV, f"1 {older}")
    with caplog.at_level("WARNING", logger="lmlab.resume"):
        assert resume._auto(cfg).run_dir == newer
    assert "resume=DIR" in caplog.text


def test_torchrun_ranks_wait_for_rank_zeros_claim_of_their_own_launch(
        fake_runs, monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab import resume
    from lmlab.errors import LmlabError

    cfg, older, newer = fake_runs
    launch = {"TORCHELASTIC_RUN_ID": "r1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
              "TORCHELASTIC_RESTART_COUNT": "0"}
    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(resume, "CLAIM_WAIT_S", 0.2)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(LmlabError, match="global rank 0 named no run for resume=auto within 0 s"):
        resume._auto(cfg)  # rank 0 has not claimed yet: rank 1 never searches itself

    monkeypatch.setenv("RANK", "0")
    resume._hand_on(resume._auto(cfg).run_dir)
    claim = json.loads((older / "lmlab_run.json").read_text())["claim"]
    assert claim["launch"] == "torchrun:r1:h:29500:0"
    monkeypatch.setenv("RANK", "1")
    assert resume._auto(cfg).run_dir == older

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted launch waits for its own claim
    with pytest.raises(LmlabError, match="no run for resume=auto"):
        resume._auto(cfg)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    record = json.loads((older / "lmlab_run.json").read_text())
    record["claim"]["at"] = "2000-01-01T00:00:00+00:00"  # an old launch's claim under a reused id
    (older / "lmlab_run.json").write_text(json.dumps(record))
    with pytest.raises(LmlabError, match="no run for resume=auto"):
        resume._auto(cfg)


def test_launch_ids_of_the_launchers_that_start_every_rank_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmlab.distributed import launch_id

    for key in RANK_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert launch_id() is None  # one process
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert launch_id() is None  # an interactive shell: Lightning starts the ranks itself
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert launch_id() == "srun:7:0:0"
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert launch_id() == "srun:7:0:2"  # a requeued job's ranks wait for its new claim
    for key, value in (("TORCHELASTIC_RUN_ID", "u"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    assert launch_id() == "torchrun:u:h:1:0"


def test_torchrun_ranks_stop_when_rank_zero_finds_no_run(fake_runs, monkeypatch: pytest.MonkeyPatch) -> None:
    """srun without --kill-on-bad-exit leaves the other ranks running when rank 0 fails: they read
    why, instead of waiting CLAIM_WAIT_S for a claim never made."""
    from conftest import compose_cfg

    from lmlab import resume
    from lmlab.errors import LmlabError

    _, older, _ = fake_runs
    cfg = compose_cfg(["task=mlm", "resume=auto", f"paths.root={older.parent.parent}"])  # no mlm run there
    for key, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(LmlabError, match="found no unfinished task=mlm"):
        resume.prepare(cfg)
    monkeypatch.setenv("SLURM_PROCID", "1")
    with pytest.raises(LmlabError, match=r"global rank 0 of launch srun:7:0:0 stopped resume=auto: "
                                         r".*found no unfinished task=mlm"):
        resume.prepare(cfg)  # at once, not after CLAIM_WAIT_S
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued step is another launch: it waits again
    monkeypatch.setattr(resume, "CLAIM_WAIT_S", 0.2)
    with pytest.raises(LmlabError, match="named no run for resume=auto within 0 s"):
        resume.prepare(cfg)
