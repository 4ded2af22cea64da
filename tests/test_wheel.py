"""The built wheel is self-contained: configs inside, installs into a fresh venv, trains from there.

The venv sees the system site-packages (torch and friends need no download), where the editable
install of this checkout also lives; the test makes sure the venv's own copy is what runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NEEDED_IN_WHEEL = (
    "lmlab/__init__.py",
    "lmlab/conf/config.yaml",
    "lmlab/conf/task/clm.yaml",
    "lmlab/conf/task/mlm.yaml",
    "lmlab/conf/trainer/cpu.yaml",
    "lmlab/experiments/debug.yaml",
    "hydra_plugins/lmlab_searchpath/__init__.py",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "HYDRA_FULL_ERROR", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def sh(cmd: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(**env), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def build_wheel(outdir: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("hatchling") is not None and importlib.util.find_spec("build") is not None:
        sh([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", outdir, REPO], cwd=outdir)
    else:
        sh([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", outdir, REPO], cwd=outdir)
    wheels = sorted(outdir.glob("lmlab-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_trains(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for needed in NEEDED_IN_WHEEL:
            assert needed in names, (needed, sorted(names))
        assert not any(n.startswith(("tests/", "lmlab/tests/")) for n in names)
        entry_points = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert re.search(r"^lmlab = lmlab\.cli:main$", entry_points, re.M), entry_points
    for line in ("clm = lmlab.tasks.clm:TASK", "gpt2 = lmlab.models.gpt2:MODEL",
                 "text = lmlab.data.text_datamodule:TextDataModule"):
        assert line in entry_points

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    script = env_dir / "bin" / "lmlab"
    outside = tmp_path / "elsewhere"  # no checkout in the cwd, so nothing shadows the venv
    outside.mkdir()
    sh([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "-q", wheel], cwd=outside)
    assert script.exists()

    where = sh([python, "-c", "import lmlab, lmlab.paths; print(lmlab.__file__); print(lmlab.paths.config_dir())"],
               cwd=outside).stdout.split()
    site = env_dir.resolve()
    package_file, conf = Path(where[0]).resolve(), Path(where[1]).resolve()
    assert site in package_file.parents, f"lmlab imported from {package_file}, not the venv"
    assert REPO not in package_file.parents
    assert conf == package_file.parent / "conf"  # the configs the wheel carries, not the checkout's

    home, cache = tmp_path / "home", tmp_path / "cache"
    run = sh([script, "+experiment=debug", "trainer.enable_progress_bar=false"], cwd=outside,
             LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(cache))
    assert "MLflow run id:" in run.stdout, run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    (run_dir,) = sorted((home / "runs").iterdir())
    assert (run_dir / "export" / "model.safetensors").is_file()
    hydra = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
    main = next(s for s in hydra["runtime"]["config_sources"] if s["provider"] == "main")
    assert Path(main["path"]).resolve() == conf
    assert hydra["runtime"]["choices"]["data"] == "bbc_news"
    resolved = yaml.safe_load((run_dir / "config_resolved.yaml").read_text())
    assert resolved["data"]["catalog"] == "bbc_news" and resolved["data"]["path"] is None
