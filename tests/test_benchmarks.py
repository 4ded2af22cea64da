"""The GPU benchmark scripts, run on the CPU in their smoke mode.

benchmarks/gpu_mfu.py gives its figures only on a GPU, and device time is scarce: a script that
breaks there wastes it. ``--smoke`` takes every path the GPU run takes (lmlab's command with the
probe, the Hugging Face Trainer worker, bf16 autocast, the MFU table) with tiny models on the CPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WIKI

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_gpu_mfu_smoke_runs_every_side_and_prints_the_tables(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "--smoke", "--steps", "16", "--warmup", "4",
         "--log-every", "2", "--data", str(corpus), "--markdown", str(tmp_path / "table.md")],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| lmlab") or line.startswith("| HF Trainer")}
    # GPT-2: lmlab, lmlab without the fused loss, HF Trainer; BERT: lmlab, HF Trainer.
    assert len(re.findall(r"^\| lmlab \|", table, flags=re.M)) == 2
    assert len(re.findall(r"^\| lmlab \(model.fused_loss=false\)", table, flags=re.M)) == 1
    assert len(re.findall(r"^\| HF Trainer \|", table, flags=re.M)) == 2
    for side, line in rows.items():
        tokens_per_sec = float(line.split("|")[2].replace(",", ""))
        assert tokens_per_sec > 0, side
    assert "GPT-2 124M (smoke" in table and "BERT-base MLM (smoke" in table


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_multi_gpu_smoke_reads_both_strategies_back_from_mlflow(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--smoke", "--steps", "10", "--seq", "64",
         "--batch", "4", "--data", str(corpus)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["gpu"], ["ddp"])}
    assert rows["gpu"][1:3] == ["1", "4"] and rows["ddp"][1:3] == ["2", "8"]  # devices, global batch
    for row in rows.values():
        assert float(row[3].replace(",", "")) > 0 and 0 < float(row[5]) < 10  # tokens/s, val loss
