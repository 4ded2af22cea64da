#!/usr/bin/env bash
# The one command for a lent GPU machine (nvidia-h200): the issue-6 figures from benchmarks/gpu_mfu.py.
#
#   device run:  carry [".gpukit"], command "bash benchmarks/device/run.sh", timeout_s 560
#
# It installs the kit (.gpukit/, made here by make_kit.sh) into /tmp/site, prints the machine and
# the versions, checks that lmlab imports, then runs gpu_mfu.py in passes, most important first,
# each bounded by what is left of RUN_BUDGET_S (default 470 s), so it ends inside the device's
# 600 s limit even when a compile takes longer than planned. Every finished side is a line of
# $OUT/rows.jsonl at once; at the end, whatever happened, $OUT/table.md is made from those rows and
# the children's logs go to $OUT/logs.tar.gz. $OUT/log.txt holds everything it printed.
#
# Knobs (environment): RUN_BUDGET_S; RUN_PASSES=gpt2,bert,... (a subset of the PASSES names below,
# in that order: e.g. a second, warm call for the passes the first did not reach); RUN_STEPS /
# RUN_WARMUP. Rehearsal on a CPU (benchmarks/device/simulate_kit.sh --torch): RUN_SMOKE=1, PYTHON,
# KIT_SITE and KIT_SKIP_INSTALL=1 with the kit installed there beforehand.
set -uo pipefail  # no -e: a failed pass must still leave the table and the logs behind

cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpukit-out}
PY=${PYTHON:-python3}
SITE=${KIT_SITE:-/tmp/site}
WORK=${RUN_WORK:-/tmp/gpu-mfu-work}   # one subfolder per pass: runs, MLflow stores, child logs
CACHE=${RUN_CACHE:-/tmp/lmlab-cache}  # tokenizers and packed blocks, shared by the passes
RESERVE=25                            # seconds kept for the table and the logs at the end
mkdir -p "$OUT" "$WORK" "$CACHE"

if [[ ${RUN_SMOKE:-0} == 1 ]]; then
    # The plumbing on a CPU: tiny models, compiled sides left out by --smoke, a small corpus.
    BUDGET=${RUN_BUDGET_S:-1500}
    COMMON=(--smoke --steps "${RUN_STEPS:-14}" --warmup "${RUN_WARMUP:-4}" --log-every 2)
    head -n 300 .gpukit/data/corpus.txt >"$WORK/corpus-smoke.txt"
    DATA=$WORK/corpus-smoke.txt
else
    # 80 steps, the first 20 untimed: a compile happens in step 1 (and a recompile at most in step 2);
    # 60 timed steps of a 124M model are several seconds, well above the timer's noise. Both sides
    # log every 50 steps (trainer=gpu's default): one host sync inside the timed steps for each.
    BUDGET=${RUN_BUDGET_S:-470}
    COMMON=(--steps "${RUN_STEPS:-80}" --warmup "${RUN_WARMUP:-20}" --log-every 50)
    DATA=.gpukit/data/corpus.txt
fi

# name:seconds-left-needed-to-start-it:gpu_mfu.py arguments. Estimates on an H100/H200 (16 cores):
# a process start ~15 s; tokenizer training ~15 s (once: the cache is shared); a GPT-2 step
# ~110 ms eager in the Trainer, 35-50 ms compiled; a torch.compile warm-up 40-90 s per process.
# gpt2 ~260 s and bert ~170 s fill the budget; the later passes (gpu-tests ~20 s first) run when
# compiles are quick, or in a second call (RUN_PASSES=gpu-tests,gpt2-plainloss,bert-hf-compile)
# while the machine is still warm.
PASSES=(
    "gpt2:100:--only gpt2 --sides lmlab,hf,lmlab-compile,hf-compile"
    "bert:90:--only bert --sides lmlab,hf,lmlab-compile"
    "gpu-tests:40:"  # not gpu_mfu.py: the GPU-marked tests (run_gpu_tests), which no CPU session runs
    "gpt2-plainloss:120:--only gpt2 --sides lmlab-compile-plainloss,lmlab-plainloss,hf-stock"
    "bert-hf-compile:130:--only bert --sides hf-compile"
)

left() { echo $((BUDGET - SECONDS - RESERVE)); }

run_pass() {
    local name=$1 need=$2 args=$3 limit rc
    limit=$(left)
    if ((limit < need)); then
        echo "== pass $name: not started, ${limit} s left of the budget (it needs ~${need} s)"
        return 0
    fi
    echo "== pass $name ($(date -u +%H:%M:%S), limit ${limit} s): gpu_mfu.py $args ${COMMON[*]}"
    # timeout signals its whole process group, the lmlab and Trainer children too; rows already
    # written stay in rows.jsonl.
    # shellcheck disable=SC2086  # $args is a word list on purpose
    timeout -k 15 "$limit" "$PY" benchmarks/gpu_mfu.py $args "${COMMON[@]}" --data "$DATA" --keep-going \
        --cache "$CACHE" --work "$WORK/$name" --rows "$OUT/rows.jsonl"
    rc=$?
    case $rc in
        0) echo "== pass $name: done" ;;
        124 | 137) echo "== pass $name: stopped at its time limit (${limit} s); its finished sides are in rows.jsonl" ;;
        *) echo "== pass $name: exit $rc (failed sides are rows with an error)" ;;
    esac
    return 0
}

# The tests marked gpu (pytest is in the image): the device's own checks of what the CPU suite can
# only approximate, e.g. that the MLM step runs under torch.cuda.set_sync_debug_mode("error").
run_gpu_tests() {
    local need=$1 limit rc
    limit=$(left)
    if ((limit < need)); then
        echo "== pass gpu-tests: not started, ${limit} s left of the budget (it needs ~${need} s)"
        return 0
    fi
    ((limit > 120)) && limit=120
    echo "== pass gpu-tests ($(date -u +%H:%M:%S), limit ${limit} s): pytest -m gpu"
    timeout -k 10 "$limit" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_host_syncs.py \
        tests/test_benchmarks.py 2>&1 | tail -n 25
    rc=${PIPESTATUS[0]}
    echo "== pass gpu-tests: exit $rc"
    return 0
}

main() {
    echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') $(uname -srm), $(nproc) cores, budget ${BUDGET} s"
    timeout 20 nvidia-smi || echo "(nvidia-smi failed or is missing)"
    free -g | head -2
    df -h /tmp | tail -1

    # The kit, as the device README installs wheels: nothing from a registry, no dependencies resolved
    # (check_kit.py made sure they are all there). A warm machine that has this kit already skips it.
    if [[ ${KIT_SKIP_INSTALL:-0} == 1 ]] || cmp -s .gpukit/MANIFEST.tsv "$SITE/.kit-manifest.tsv"; then
        echo "== kit already installed in $SITE"
    else
        echo "== installing $(ls .gpukit/whl/*.whl | wc -l) wheels into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .gpukit/whl/*.whl || { echo "== the kit's install failed"; return 3; }
        cp .gpukit/MANIFEST.tsv "$SITE/.kit-manifest.tsv"
    fi
    # The tree first, so the code that runs is this checkout's (an editable install, in effect); the
    # kit's lmlab wheel then supplies only the entry points (lmlab's registry) and the metadata.
    export PYTHONPATH=$PWD:$SITE
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
        TOKENIZERS_PARALLELISM=true MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 \
        GIT_PYTHON_REFRESH=quiet  # no network there; GitPython must not fail its import without git

    echo "== versions"
    "$PY" - <<'EOF' || { echo "== lmlab does not import with the kit: stopping before any GPU work"; return 4; }
import importlib.metadata as md
import sys

import torch

import lmlab.train  # noqa: F401  (torch, lightning, transformers, mlflow, hydra: what every run imports)
from lmlab import registry

print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "lightning", "transformers", "tokenizers", "accelerate", "mlflow-skinny", "hydra-core",
             "omegaconf", "sqlalchemy", "numpy", "lmlab"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} (not installed)")
print("  cuda", torch.version.cuda, "available:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("  lmlab tasks:", ", ".join(sorted(registry.names("task"))), "| models:", ", ".join(sorted(registry.names("model"))))
for kind, name in (("task", "clm"), ("task", "mlm"), ("model", "gpt2"), ("model", "bert")):
    registry.get(kind, name)  # imports them: a broken one stops here, not in the first timed side
EOF
    # Every version now readable: the requirements check_kit.py could only name here (informative).
    "$PY" benchmarks/device/check_kit.py --installed || echo "== (check_kit --installed: see above; going on)"

    local wanted=${RUN_PASSES:-}
    for pass in "${PASSES[@]}"; do
        IFS=: read -r name need args <<<"$pass"
        if [[ -n $wanted && ",$wanted," != *",$name,"* ]]; then
            continue
        elif [[ $name == gpu-tests ]]; then
            run_gpu_tests "$need"
        else
            run_pass "$name" "$need" "$args"
        fi
    done
}

finish() {
    echo "== tables from $OUT/rows.jsonl"
    if [[ -s $OUT/rows.jsonl ]]; then
        timeout 60 "$PY" benchmarks/gpu_mfu.py --from-rows "$OUT/rows.jsonl" --markdown "$OUT/table.md"
    else
        echo "(no side finished)"
    fi
    # The children's logs, probe records and resolved configs (small); not the exports (a 50k-token
    # tokenizer.json alone is ~3.5 MB) nor their MLflow copies, models, blocks or stores.
    (cd "$WORK" && find . \( -name export -o -name mlartifacts \) -prune -o \
        \( -name '*.log' -o -name '*.json' -o -name 'config_resolved.yaml' \) -size -4M -print0 |
        tar -czf "$OUT/logs.tar.gz" --null -T -) && echo "logs: $OUT/logs.tar.gz ($(du -k "$OUT/logs.tar.gz" | cut -f1) KiB)"
    echo "== ended after ${SECONDS} s; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
}

{
    main
    status=$?
    finish
    exit $status
} 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
