#!/usr/bin/env bash
# Rehearses the lent GPU machine's use of .gpukit/ here, on the CPU, before device time is spent.
#
#   bash benchmarks/device/simulate_kit.sh           # Python 3.12: the device's install, no torch
#   bash benchmarks/device/simulate_kit.sh --torch   # also: run.sh end to end on a CPU torch
#
# Part 1, as on the device: a Python 3.12 venv holds the image's packages that the kit's wheels
# need (check_kit.py --device-deps, at the image's versions where known) except the torch stack
# (torch, lightning, transformers, torchmetrics: gigabytes for 3.12); the kit goes into /tmp/devsim-site
# with the device's very pip command; then, with only PYTHONPATH pointing there: the imports, an
# MLflow sqlite store written through lmlab.tracking and MlflowClient, Hydra composing every config
# gpu_mfu.py will run (`python -m lmlab --cfg job`, through the wheel's entry points and conf/).
#
# Part 2 (--torch), as close to a whole device run as a CPU gets: a Python 3.11 venv (the CPU torch
# on this machine's disk is a cp311 build) with the image's versions of transformers, tokenizers,
# huggingface_hub, lightning, torchmetrics and accelerate, the kit's wheels (its cp312 builds swapped
# for cp311 builds of the same versions) and nothing else; then run.sh itself with RUN_SMOKE=1:
# every pass of gpu_mfu.py with tiny models, the rows, the table and the logs it leaves in $OUT.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PY312=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
PY311=${PY311:-/root/.pyenv/versions/3.11.7/bin/python}
VENV=${SIM_VENV:-/tmp/devsim}
SITE=${SIM_SITE:-/tmp/devsim-site}
[[ -d .gpukit/whl ]] || { echo "simulate_kit: no .gpukit/whl: run benchmarks/device/make_kit.sh first" >&2; exit 1; }
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }  # this machine's pip config

# None of the kit's own packages may come from PyPI in a simulation venv: they would hide a gap in the kit.
no_kit_packages_from_pypi() {
    "$1" - .gpukit/whl <<'EOF'
import importlib.metadata as md, sys
from pathlib import Path
from packaging.utils import canonicalize_name, parse_wheel_filename
kit = {canonicalize_name(parse_wheel_filename(p.name)[0]) for p in Path(sys.argv[1]).glob("*.whl")}
leaked = sorted(kit & {canonicalize_name(d.metadata["Name"]) for d in md.distributions()})
if leaked:
    sys.exit(f"simulate_kit: {sys.prefix} got kit packages from PyPI ({', '.join(leaked)}): remove it and rerun")
EOF
}

# The torch stack is what the image has and this venv cannot: everything else the kit leans on is here.
TORCH_STACK='^(torch|lightning|pytorch-lightning|transformers|torchmetrics)(==.*)?$'
mapfile -t device_deps < <(python3 benchmarks/device/check_kit.py --device-deps | grep -vE "$TORCH_STACK")

echo "== part 1: Python 3.12 venv $VENV with the image's packages the kit needs: ${device_deps[*]}"
[[ -x $VENV/bin/python ]] || "$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${device_deps[@]}" 2>&1 | quiet
no_kit_packages_from_pypi "$VENV/bin/python"

echo "== the device's install command, into $SITE"
rm -rf "$SITE"
start=$SECONDS
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .gpukit/whl/*.whl
echo "installed $(ls .gpukit/whl/*.whl | wc -l) wheels in $((SECONDS - start)) s; $(du -sm "$SITE" | cut -f1) MiB"

echo "== checks with PYTHONPATH=$SITE (no torch)"
(cd /tmp && PYTHONPATH=$SITE GIT_PYTHON_REFRESH=quiet MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 \
    "$VENV/bin/python" - "$REPO" "$SITE" <<'EOF'
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

repo, site = Path(sys.argv[1]), Path(sys.argv[2]).resolve()
sys.path.insert(0, str(repo / "benchmarks"))


def under_site(module) -> str:
    where = Path(module.__file__).resolve()
    assert site in where.parents, f"{module.__name__} imported from {where}, not from the kit"
    return str(where.relative_to(site))


import alembic, hydra, mlflow, omegaconf, sqlalchemy  # noqa: E401
from mlflow import MlflowClient

for module in (mlflow, hydra, omegaconf, sqlalchemy, alembic):
    print(f"import {module.__name__:<10} ok  {getattr(module, '__version__', '?'):<8} {under_site(module)}")
for name in ("datasets", "optuna"):  # left out on purpose (check_kit.py LMLAB_NOT_CARRIED)
    print(f"import {name:<10} {'PRESENT' if importlib.util.find_spec(name) else 'absent: not carried, not needed'}")

# An MLflow sqlite store, as lmlab's embedded default: a new database (alembic's migrations run), an
# experiment with a file artifact root, a run with params, metrics, an artifact, ended.
tmp = Path(tempfile.mkdtemp(prefix="devsim-mlflow-"))
uri = f"sqlite:///{tmp / 'mlflow.db'}"
client = MlflowClient(tracking_uri=uri)
exp = client.create_experiment("devsim", artifact_location=(tmp / "mlartifacts").as_uri())
run = client.create_run(exp, run_name="devsim", tags={"lmlab.task": "clm"})
client.log_param(run.info.run_id, "model.size", "base")
for step in range(1, 4):
    client.log_metric(run.info.run_id, "train/loss", 10.0 / step, step=step)
(tmp / "note.txt").write_text("kit\n")
client.log_artifact(run.info.run_id, str(tmp / "note.txt"), "config")
client.set_terminated(run.info.run_id)
back = client.get_run(run.info.run_id)
history = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
assert back.info.status == "FINISHED" and history == [10.0, 5.0, 10.0 / 3], (back.info.status, history)
assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == ["config/note.txt"]
print(f"mlflow sqlite store ok: run {back.info.run_id[:8]} FINISHED, train/loss {len(history)} steps, artifact back")

# lmlab's wheel alone: its entry points (the registry) and the conf/ it carries.
import lmlab
from lmlab import registry
from lmlab.paths import config_dir

under_site(lmlab)
entry = sorted(ep.name for ep in md.entry_points(group="lmlab.tasks"))
assert {"clm", "mlm"} <= set(entry), entry
assert config_dir().resolve() == site / "lmlab" / "conf", config_dir()
print(f"lmlab entry points ok: tasks {', '.join(registry.names('task'))}; models {', '.join(registry.names('model'))}")

# lmlab's own MLflow code on the embedded store: lmlab.tracking.start_run with a composed config.
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lmlab.cli import _free_form, register_experiments

register_experiments()
GlobalHydra.instance().clear()
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    cfg = compose("config", overrides=_free_form(["task=clm", "trainer=gpu", f"paths.root={tmp / 'home'}"]))
from lmlab import tracking
client, run_id, _ = tracking.start_run(cfg, {"lmlab.task": "clm"})
client.log_metric(run_id, "val/loss", 6.9, step=1)
client.set_terminated(run_id)
params = client.get_run(run_id).data.params
assert params["trainer.accelerator"] == "gpu" and params["task.name"] == "clm", sorted(params)[:5]
print(f"lmlab.tracking.start_run ok: {len(params)} params in {tracking.tracking_uri(cfg)} (conf {config_dir()})")

# Plugins Hydra found on the path: lmlab's search path (plugins' configs) and its Optuna sweeper,
# whose module must import without optuna.
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.plugins.sweeper import Sweeper

found = [p.__module__ for p in Plugins.instance().discover(SearchPathPlugin)] + \
        [p.__module__ for p in Plugins.instance().discover(Sweeper)]
assert any("lmlab_searchpath" in m for m in found) and any("lmlab_optuna" in m for m in found), found
print(f"hydra plugins ok: {', '.join(m for m in found if 'lmlab' in m)}")

# Every command line gpu_mfu.py will give lmlab on the GPU composes (unknown keys would fail there),
# through the command itself with run.sh's path: the tree's code and conf/ first, then the kit.
import gpu_mfu

args = gpu_mfu.parse_args([])
env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{site}", "LMLAB_HOME": str(tmp / "home")}
composed = 0
for key, workload in gpu_mfu.WORKLOADS.items():
    for name, side in gpu_mfu.LMLAB_SIDES.items():
        if workload.task not in side.tasks:
            continue
        for export in (True, False):
            overrides = gpu_mfu.lmlab_overrides(workload, args, ["data.path=/tmp/corpus.txt"], side.overrides,
                                                export=export)
            done = subprocess.run([sys.executable, "-m", "lmlab", "--cfg", "job", *overrides], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{key} {name}: {done.stderr[-2000:]}"
            assert f"max_steps: {args.steps}" in done.stdout and "accelerator: gpu" in done.stdout
            composed += 1
    prep = gpu_mfu.lmlab_overrides(workload, args, ["data.path=/tmp/corpus.txt"], [], steps=2)
    done = subprocess.run([sys.executable, "-m", "lmlab", "--cfg", "job", *prep], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "warmup_steps: 0" in done.stdout, done.stderr[-2000:]
    composed += 1
print(f"hydra: `python -m lmlab --cfg job` composed all {composed} configs gpu_mfu.py runs on a GPU")
if "Error importing" in done.stderr or "Plugin is incompatible" in done.stderr:
    sys.exit(f"a Hydra plugin failed to import:\n{done.stderr[-2000:]}")
print("part 1: all checks passed")
EOF
)

[[ ${1:-} == --torch ]] || exit 0

# ----------------------------------------------------------------------------------------------
VENV311=${SIM_VENV311:-/tmp/devsim311}
SITE311=${SIM_SITE311:-/tmp/devsim311-site}
WHL311=${SIM_WHL311:-/tmp/devsim311-whl}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-*-cp311-*.whl 2>/dev/null | head -1)}
[[ -f $TORCH_WHEEL ]] || { echo "simulate_kit --torch: no cp311 CPU torch wheel found (TORCH_WHEEL)" >&2; exit 1; }
# The image's versions (KINDS.md via check_kit.py); numpy 2.5 needs Python 3.12, so 3.11 gets 2.4.
# typer (transformers and huggingface_hub need it) requires pydantic from 0.29 on; the image has
# typer and annotated-doc but no pydantic, so its typer is one of 0.24-0.28.
STACK=(transformers==5.17.0 huggingface_hub==1.33.0 tokenizers==0.23.2 safetensors==0.8.0 torchmetrics==1.9.0
       lightning==2.6.6 accelerate==1.15.0 "numpy<2.5" "typer>=0.24,<0.29" pytest)  # pytest: the gpu-tests pass
echo "== part 2: Python 3.11 venv $VENV311: $(basename "$TORCH_WHEEL"), ${STACK[*]}, ${device_deps[*]}"
[[ -x $VENV311/bin/python ]] || "$PY311" -m venv "$VENV311"
mapfile -t device_deps311 < <(printf '%s\n' "${device_deps[@]}" | grep -v '^numpy==')
"$VENV311/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_WHEEL" "${STACK[@]}" \
    "${device_deps311[@]}" 2>&1 | quiet
no_kit_packages_from_pypi "$VENV311/bin/python"

# The kit for 3.11: its wheels as they are, except the cp312-only builds, for which the cp311 builds
# of the same versions stand in.
rm -rf "$WHL311" "$SITE311"
mkdir -p "$WHL311"
swap=()
for whl in .gpukit/whl/*.whl; do
    if [[ $(basename "$whl") == *-cp312-cp312-* ]]; then
        swap+=("$(basename "$whl" | cut -d- -f1)==$(basename "$whl" | cut -d- -f2)")
    else
        cp "$whl" "$WHL311/"
    fi
done
echo "cp311 builds for: ${swap[*]}"
"$VENV311/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHL311" "${swap[@]}" 2>&1 | quiet
"$VENV311/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE311" "$WHL311"/*.whl

echo "== run.sh, rehearsed on the CPU (RUN_SMOKE=1)"
OUT311=${SIM_OUT:-/tmp/devsim-out}
rm -rf "$OUT311" /tmp/devsim-work /tmp/devsim-cache
OUT=$OUT311 PYTHON=$VENV311/bin/python KIT_SITE=$SITE311 KIT_SKIP_INSTALL=1 RUN_SMOKE=1 \
    RUN_WORK=/tmp/devsim-work RUN_CACHE=/tmp/devsim-cache bash benchmarks/device/run.sh || true
echo "== what run.sh left in $OUT311:"
ls -la "$OUT311"
python3 - "$OUT311" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
sides = [(r["workload"], r["side"]) for r in rows]
failed = [r for r in rows if "error" in r]
print(f"rows: {sides}")
assert not failed, failed
assert {("gpt2", "lmlab"), ("gpt2", "hf"), ("bert", "lmlab"), ("bert", "hf"), ("gpt2", "lmlab-plainloss")} <= set(sides)
assert (out / "table.md").read_text().count("| HF Trainer |") == 2
log = (out / "log.txt").read_text()
# The gpu-tests pass ran pytest, whose GPU tests skip here (a failure to collect them would not).
assert "== pass gpu-tests: exit 0" in log and "skipped" in log.split("== pass gpu-tests (")[1], log[-3000:]
print("part 2: run.sh rehearsal passed")
EOF
