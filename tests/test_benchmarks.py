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


def run_script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/SCRIPT --smoke on the first 300 paragraphs of the shared corpus; it must succeed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--data", str(corpus), *args],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_gpu_mfu_smoke_runs_every_side_and_prints_the_tables(tmp_path: Path) -> None:
    run_script(tmp_path, "gpu_mfu.py", "--steps", "16", "--warmup", "4", "--log-every", "2",
               "--markdown", str(tmp_path / "table.md"))
    table = (tmp_path / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| lmlab", "| HF Trainer"))]
    # GPT-2: lmlab, lmlab without the fused loss, HF Trainer; BERT: lmlab, HF Trainer.
    assert len(re.findall(r"^\| lmlab \|", table, flags=re.M)) == 2
    assert len(re.findall(r"^\| lmlab \(model.fused_loss=false\)", table, flags=re.M)) == 1
    assert len(re.findall(r"^\| HF Trainer \|", table, flags=re.M)) == 2
    assert len(rows) == 5
    for line in rows:
        assert float(line.split("|")[2].replace(",", "")) > 0, line  # tokens/s
    assert "GPT-2 124M (smoke" in table and "BERT-base MLM (smoke" in table


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_multi_gpu_smoke_reads_both_strategies_back_from_mlflow(tmp_path: Path) -> None:
    done = run_script(tmp_path, "multi_gpu.py", "--steps", "10", "--seq", "64", "--batch", "4")
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["gpu"], ["ddp"])}
    assert rows["gpu"][1:3] == ["1", "4"] and rows["ddp"][1:3] == ["2", "8"]  # devices, global batch
    for row in rows.values():
        assert float(row[3].replace(",", "")) > 0 and 0 < float(row[5]) < 10  # tokens/s, val loss
