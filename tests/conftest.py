"""Shared test set-up: every test gets its own lmlab home and cache, and tiny configs."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lmlab.cli import _free_form, register_experiments
from lmlab.paths import config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
WIKI = SHARED_DATA / "corpus" / "wiki_extracts_en.txt"

# MLflow's own variables are logger.tracking_uri's and logger.experiment_name's defaults: a
# developer's server must not receive the tests' runs (subprocesses inherit this too).
MLFLOW_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
for _name in MLFLOW_VARIABLES:
    os.environ.pop(_name, None)


def _cores() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist (``-n N``) each worker gets its share of the cores.

    torch, and every lmlab or benchmark subprocess a test starts, would otherwise run one thread
    per core in each of the N workers, and N×cores threads on the cores take longer than N
    workers' worth of threads do.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2:
        return
    share = str(max(1, _cores() // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, share)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


_share_the_cores_between_workers()


@pytest.hookimpl(optionalhook=True)  # pytest without pytest-xdist (-p no:xdist) knows no such hook
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than the cores, to fill the time tests spend waiting on
    subprocesses, servers and signals. Measured on 2 cores, clean clone, back to back: tests took
    1,588 s with 3 workers and 1,622 s with 2; ``--maxprocesses`` still caps the count."""
    return _cores() + 1


# A few steps of a 2-layer, 128-wide model with a small vocabulary: seconds on a CPU.
TINY = [
    "+experiment=debug",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def lmlab_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Runs, the embedded MLflow store and caches go under the test's tmp_path."""
    home = tmp_path / "lmlab_home"
    monkeypatch.setenv("LMLAB_HOME", str(home))
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))
    yield home
    # A bare Lightning MLFlowLogger (mlflow.set_tracking_uri) sets MLFLOW_TRACKING_URI to its store:
    # the next test's runs would go there.
    for name in MLFLOW_VARIABLES:
        os.environ.pop(name, None)


def wiki_head(folder: Path, paragraphs: int = 300) -> Path:
    """The first ``paragraphs`` of the real Wikipedia corpus in ../shared/data, as folder/wiki.txt."""
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    path = folder / "wiki.txt"
    path.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:paragraphs]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def wiki_file(tmp_path: Path) -> Path:
    """The first 600 paragraphs of the real Wikipedia corpus, as a text file."""
    return wiki_head(tmp_path, 600)


def compose_cfg(overrides: list[str]) -> DictConfig:
    """The config `lmlab OVERRIDES` would run, composed without starting a job."""
    register_experiments()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("config", overrides=_free_form(list(overrides)))


def run_in_home(root: Path, overrides: list[str]):
    """A real run (``lmlab.train.run``) with its home in ROOT/home and its cache in ROOT/cache.

    Module-scoped fixtures and tests share one MLflow store and cache this way; the config is
    resolved inside the environment so its paths stay pinned there. Returns (RunResult, config).
    """
    from omegaconf import OmegaConf

    from lmlab.train import run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_HOME", str(root / "home"))
        mp.setenv("LMLAB_CACHE_DIR", str(root / "cache"))
        cfg = compose_cfg(overrides)
        OmegaConf.resolve(cfg)
        return run(cfg), cfg


def in_process_starter(root: Path, overrides: list[str], cache: Path):
    """``start(name, *extra, callback=None)``: a real run (``lmlab.train.run``) in this process with
    its home in ROOT/NAME, the cache in CACHE and ``callback`` added to the Trainer's callbacks;
    ``start.want`` is the uninterrupted run's result (home ROOT/reference)."""
    import lightning as L

    from lmlab import checkpointing
    from lmlab.train import run

    def start(name: str, *extra: str, callback: L.Callback | None = None):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LMLAB_HOME", str(root / name))
            mp.setenv("LMLAB_CACHE_DIR", str(cache))
            if callback is not None:
                real = checkpointing.callbacks
                mp.setattr(checkpointing, "callbacks", lambda cfg, last: [*real(cfg, last), callback])
            return run(compose_cfg([*overrides, *extra]))

    start.root = root
    start.want = start("reference")
    return start


def lmlab_command() -> list[str]:
    """The installed console script next to this interpreter (or on PATH), else ``python -m lmlab``."""
    script = Path(sys.executable).parent / "lmlab"
    if script.exists():
        return [str(script)]
    found = shutil.which("lmlab")
    return [found] if found else [sys.executable, "-m", "lmlab"]


def free_port() -> int:
    """A local TCP port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
