"""The GPU benchmark scripts, run on the CPU in their smoke mode.

benchmarks/gpu_mfu.py gives its figures only on a GPU, and device time is scarce: a script that
breaks there wastes it. ``--smoke`` takes every path the GPU run takes (lmlab's command with the
probe, the Hugging Face Trainer worker, bf16 autocast, the MFU table) with tiny models on the CPU.
The fast tests below check the driver's own logic (side order, streamed rows, failed sides) in
process, with the children replaced.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WIKI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_mfu  # noqa: E402

# The Hugging Face Trainer sides need accelerate: it is in the dev extra, so these run in CI.


def run_script(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/SCRIPT --smoke on the first 300 paragraphs of the shared corpus; it must succeed."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--data", str(corpus), *args],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def table_rows(table: str) -> list[str]:
    return [line for line in table.splitlines() if line.startswith(("| lmlab", "| HF Trainer"))]


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_gpu_mfu_smoke_runs_every_side_streams_its_rows_and_prints_the_tables(tmp_path: Path) -> None:
    # Every side that runs without a compiler, HF sides asked for first: they need an lmlab run's
    # export and blocks, so the first lmlab side that applies to the workload moves ahead of them.
    rows_file = tmp_path / "rows.jsonl"
    cache = tmp_path / "kept-cache"
    done = run_script(tmp_path, "gpu_mfu.py", "--only", "gpt2,bert", "--sides", "hf,hf-stock,lmlab-plainloss,lmlab",
                      "--steps", "12", "--warmup", "2", "--log-every", "2", "--rows", str(rows_file),
                      "--cache", str(cache), "--markdown", str(tmp_path / "table.md"))
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["workload"], r["side"]) for r in rows] == [
        ("gpt2", "lmlab-plainloss"), ("gpt2", "hf"), ("gpt2", "hf-stock"), ("gpt2", "lmlab"),
        ("bert", "lmlab"), ("bert", "hf"), ("bert", "hf-stock")]
    for row in rows:
        assert row["tokens_per_sec"] > 0 and row["n_params"] > 0 and row["mfu"] is None  # no peak on a CPU
    # hf-stock's row describes the model it trained: the tokenizer's vocabulary, not lmlab's padded one.
    by_side = {(r["workload"], r["side"]): r for r in rows}
    for workload in ("gpt2", "bert"):
        stock, same = by_side[(workload, "hf-stock")], by_side[(workload, "hf")]
        assert stock["vocab"] < same["vocab"] and stock["n_params"] < same["n_params"]
        assert same["vocab"] == by_side[(workload, "lmlab")]["vocab"] and same["vocab"] % 64 == 0
    assert "lmlab-plainloss left out (only for task clm)" in done.stdout
    assert done.stdout.count("\nrow {") == 7  # each row printed as it came
    table = (tmp_path / "table.md").read_text()
    assert len(table_rows(table)) == 7
    assert len(re.findall(r"^\| lmlab \|", table, flags=re.M)) == 2
    assert len(re.findall(r"^\| lmlab \(model.fused_loss=false\)", table, flags=re.M)) == 1
    assert len(re.findall(r"^\| HF Trainer \|", table, flags=re.M)) == 2
    assert len(re.findall(r"^\| HF Trainer \(stock config", table, flags=re.M)) == 2
    assert "GPT-2 124M (smoke" in table and "BERT-base MLM (smoke" in table
    # --cache keeps the tokenizers and packed blocks; --from-rows makes the same tables again.
    assert list(cache.glob("data/causal-64-*/train.input_ids.npy")) and list(cache.glob("data/masked-64-*/"))
    again = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_mfu.py"), "--from-rows", str(rows_file),
                            "--markdown", str(tmp_path / "again.md")], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert table_rows((tmp_path / "again.md").read_text()) == table_rows(table)


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_multi_gpu_smoke_reads_both_strategies_back_from_mlflow(tmp_path: Path) -> None:
    done = run_script(tmp_path, "multi_gpu.py", "--steps", "10", "--seq", "64", "--batch", "4")
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["gpu"], ["ddp"])}
    assert rows["gpu"][1:3] == ["1", "4"] and rows["ddp"][1:3] == ["2", "8"]  # devices, global batch
    for row in rows.values():
        assert float(row[3].replace(",", "")) > 0 and 0 < float(row[5]) < 10  # tokens/s, val loss


@pytest.mark.slow
@pytest.mark.skipif(not WIKI.exists(), reason="needs ../shared/data")
def test_cpu_vs_hf_trainer_times_both_sides_and_both_pipelines(tmp_path: Path) -> None:
    # The CPU benchmark has no smoke mode: a short real run, one thread, small blocks.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(WIKI.read_text(encoding="utf-8").splitlines()[:300]) + "\n", encoding="utf-8")
    markdown = tmp_path / "cpu.md"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_vs_hf_trainer.py"), "--data", str(corpus),
                           "--steps", "30", "--warmup", "10", "--log-every", "5", "--block-size", "32",
                           "--batch-size", "4", "--threads", "1", "--pipeline", "--num-proc", "1",
                           "--pipeline-copies", "2", "--markdown", str(markdown)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = markdown.read_text()
    rows = {cells[0]: cells for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in table_rows(text))}
    assert set(rows) == {"lmlab", "HF Trainer"}
    header = [c.strip() for c in next(line for line in text.splitlines() if line.startswith("| side")).strip("|").split("|")]
    lmlab, hf = (dict(zip(header, rows[name])) for name in ("lmlab", "HF Trainer"))
    rates = {name: float(side["tokens/s"].replace(",", "")) for name, side in (("lmlab", lmlab), ("hf", hf))}
    assert rates["lmlab"] > 0 and rates["hf"] > 0
    # The ratio comes from the unrounded rates; the table prints whole tokens/s, so the ratio of
    # the printed figures may differ from it in the last digit.
    assert lmlab["vs HF Trainer"].endswith("x") and hf["vs HF Trainer"] == "1.00x"
    assert float(lmlab["vs HF Trainer"][:-1]) == pytest.approx(rates["lmlab"] / rates["hf"], abs=0.011)
    for side in (lmlab, hf):
        assert 0.0 <= float(side["between steps"].rstrip("%")) < 100.0
        assert 0.0 < float(side["MFU"].rstrip("%")) < 200.0 or side["MFU"] == "—"  # — off x86
    assert re.search(r"from starting the command to its first training step with empty caches", text)
    # The input pipeline: both sides twice, lmlab's second run served by its stamp without reading the text.
    pipeline = [line.split() for line in text.splitlines() if line.startswith(("lmlab ", "HF datasets.map "))]
    assert len(pipeline) == 2 and pipeline[0][0] == "lmlab" and pipeline[0][-2:] == ["no", "(stamp)"]
    # Both sides packed the same text, every copy of it (lmlab's separators and its validation carve
    # make the counts differ a little, never by a copy).
    blocks = {row[0]: int(row[-3 if row[0] == "lmlab" else -2].replace(",", "")) for row in pipeline}
    assert blocks["lmlab"] == pytest.approx(blocks["HF"], rel=0.15), blocks


# ------------------------------------------------------------------------------------------------
# The driver's logic, in process (seconds)
# ------------------------------------------------------------------------------------------------


def test_sides_are_named_and_an_hf_side_never_runs_before_its_inputs_exist() -> None:
    assert gpu_mfu.parse_args([]).sides == gpu_mfu.SIDES  # the default: every side, as before
    assert gpu_mfu.parse_args(["--sides", "hf, lmlab,hf"]).sides == ["hf", "lmlab"]
    with pytest.raises(SystemExit):
        gpu_mfu.parse_args(["--sides", "lmlab,nope"])
    assert gpu_mfu.plan(["lmlab", "hf"]) == ["lmlab", "hf"]
    assert gpu_mfu.plan(["hf-compile", "hf", "lmlab-compile", "lmlab"]) == ["lmlab-compile", "hf-compile", "hf", "lmlab"]
    assert gpu_mfu.plan(["hf"]) == ["hf"]  # measure() prepares the inputs with a short lmlab run
    assert gpu_mfu.plan(["lmlab-plainloss"]) == ["lmlab-plainloss"]
    args = gpu_mfu.parse_args(["--smoke"])
    bert = gpu_mfu.WORKLOADS["bert"]
    assert gpu_mfu.applies("lmlab-plainloss", bert, args) and gpu_mfu.applies("lmlab-compile", bert, args)
    assert gpu_mfu.applies("lmlab", bert, args) is None
    assert gpu_mfu.LMLAB_SIDES["lmlab-compile-plainloss"].compiled and not gpu_mfu.LMLAB_SIDES["lmlab"].compiled


def test_a_failed_side_becomes_a_row_and_the_tables_come_back_from_the_rows_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The children replaced: the first lmlab side fails, the second provides the HF side's inputs.
    calls = []

    def run_lmlab(w, args, work, env, data, name, export):
        calls.append((name, export))
        if name == "lmlab":
            raise SystemExit("lmlab ... failed (exit 1)\nCUDA out of memory")
        return {"tokens_per_sec": 2000.0, "data_wait": 0.01, "peak_mem_gb": 3.0, "device": "NVIDIA H200"}, None

    def run_hf(w, args, work, env, export, blocks, name):
        assert export == tmp_path / "export" and blocks == tmp_path / "blocks.npy"
        return {"tokens_per_sec": 1000.0, "data_wait": 0.02, "peak_mem_gb": 4.0, "device": "NVIDIA H200"}

    monkeypatch.setattr(gpu_mfu, "run_lmlab", run_lmlab)
    monkeypatch.setattr(gpu_mfu, "run_hf", run_hf)
    monkeypatch.setattr(gpu_mfu, "prepare", lambda w, args, work, env, data: calls.append(("prepare", True)))
    monkeypatch.setattr(gpu_mfu, "newest", lambda home, pattern: tmp_path / (
        "export/config.json" if "export" in pattern else "blocks.npy"))
    monkeypatch.setattr(gpu_mfu, "model_facts", lambda w, export: {"n_params": 124_000_000, "vocab": 50257,
                                                                    "flop_per_token": 1e9})
    args = gpu_mfu.parse_args(["--sides", "hf,lmlab,lmlab-compile", "--keep-going", "--steps", "60", "--warmup", "20"])
    env = {"LMLAB_HOME": str(tmp_path / "home"), "LMLAB_CACHE_DIR": str(tmp_path / "cache")}
    rows_file = tmp_path / "rows.jsonl"
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        with rows_file.open("a") as out:
            out.write(json.dumps(row) + "\n")

    gpu_mfu.measure("gpt2", gpu_mfu.WORKLOADS["gpt2"], args, tmp_path, env, [], emit)
    # lmlab moved ahead of hf and failed; a preparation run then made hf's inputs, so lmlab-compile
    # need not export.
    assert calls == [("lmlab", True), ("prepare", True), ("lmlab-compile", False)]
    assert [(r["side"], "error" in r) for r in rows] == [("lmlab", True), ("hf", False), ("lmlab-compile", False)]
    assert rows[2]["mfu"] == pytest.approx(1e9 * 2000 / 989e12)  # the H200's peak, from the child's device name
    rows_file.write_text(rows_file.read_text() + '{"workload": "gpt2", "side": "hf-co')  # a write cut by a kill
    markdown = tmp_path / "table.md"
    assert gpu_mfu.main(["--from-rows", str(rows_file), "--markdown", str(markdown)]) == 0
    table = markdown.read_text()
    assert "| lmlab | failed |" in table and "| lmlab (model.compile=true) | 2,000 | 0.2% |" in table
    assert "| HF Trainer | 1,000 |" in table and "2.00x" in table and "1.00x" in table
    assert "lmlab failed: lmlab ... failed (exit 1)" in table and "peak 989 TFLOP/s (NVIDIA H200)" in table


def test_the_data_wait_is_the_devices_idle_time_where_there_is_a_device() -> None:
    import torch

    # Four timed steps over 2 s; the host spent 0.3 s between steps, the GPU idled 0.02 s of it.
    record = {"ends": [10.0, 10.5, 11.0, 11.5, 12.0], "gaps": [0.1, 0.1, 0.05, 0.05], "peak_mem": 2**30}
    on_cpu = gpu_mfu.summarise({**record, "idle": None}, tokens_per_step=1000)
    on_gpu = gpu_mfu.summarise({**record, "idle": [0.01, 0.0, 0.01, 0.0]}, tokens_per_step=1000)
    assert on_cpu["tokens_per_sec"] == on_gpu["tokens_per_sec"] == 2000.0
    assert on_cpu["data_wait"] == on_cpu["host_gap"] == on_gpu["host_gap"] == pytest.approx(0.15)
    assert on_gpu["data_wait"] == pytest.approx(0.01)
    if not torch.cuda.is_available():  # nothing is recorded on a CPU: the host's gaps stand in
        gaps = gpu_mfu.DeviceGaps()
        gaps.step_end()
        gaps.step_start(True)
        assert gaps.seconds() is None and gaps.pairs == []


@pytest.mark.gpu
def test_device_gaps_count_the_gpus_idle_time_not_the_hosts() -> None:
    import time

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    gaps = gpu_mfu.DeviceGaps()

    def busy_step() -> None:  # a step the GPU takes a while over, queued at once
        for _ in range(30):
            x.matmul(x)

    gaps.step_start(True)
    busy_step()
    gaps.step_end()
    time.sleep(0.005)  # the host waits while the GPU still works through the step: no idle time
    gaps.step_start(True)
    busy_step()
    gaps.step_end()
    torch.cuda.synchronize()
    time.sleep(0.05)  # now the GPU has nothing queued: idle
    gaps.step_start(True)
    torch.cuda.synchronize()
    busy, idle = gaps.seconds()
    assert busy < 0.002 and 0.04 < idle < 0.2


def test_gpu_mfu_measures_are_streamed_by_main(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # main() appends each row to --rows as it comes (the file is what a killed run leaves behind).
    seen_in_file = []

    def measure(key, w, args, work, env, data, emit):
        for side in args.sides:
            emit({"workload": key, "model": w.name, "side": side, "label": side, "error": "x"})
            seen_in_file.append(len(args.rows.read_text().splitlines()))

    monkeypatch.setattr(gpu_mfu, "measure", measure)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text('{"workload": "bert", "model": "earlier", "side": "hf", "label": "hf", "error": "y"}\n')
    code = gpu_mfu.main(["--smoke", "--only", "gpt2", "--sides", "lmlab,hf", "--rows", str(rows_file),
                         "--work", str(tmp_path / "work"), "--data", str(tmp_path / "none.txt")])
    assert code == 1  # failed sides make the exit status non-zero
    assert seen_in_file == [2, 3]  # appended, one line per row, at once


# ------------------------------------------------------------------------------------------------
# benchmarks/device/check_kit.py: the closure check of the wheels a lent GPU gets (no network)
# ------------------------------------------------------------------------------------------------


def fake_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> None:
    """A wheel holding only its METADATA: all check_kit reads."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    meta = "\n".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}",
                      *(f"Requires-Dist: {r}" for r in requires)]) + "\n"
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-{tag}.whl", "w") as whl:
        whl.writestr(f"{stem}.dist-info/METADATA", meta)


def test_check_kit_names_every_requirement_neither_the_kit_nor_the_image_meets(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks" / "device"))
    import check_kit

    whl = tmp_path / "kit" / "whl"
    fake_wheel(whl, "hydra-core", "1.3.8", ["omegaconf<2.4,>=2.2", "antlr4-python3-runtime==4.9.*", "packaging",
                                            'importlib-resources; python_version < "3.9"'])  # not for 3.12
    fake_wheel(whl, "omegaconf", "2.3.1", ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"])
    fake_wheel(whl, "mlflow-skinny", "3.17.2", ["transformers<5", "gunicorn; extra == 'server'"])  # image: 5.17.0
    fake_wheel(whl, "sqlalchemy", "2.1.9", [], tag="cp311-cp311-manylinux_2_17_x86_64")  # not for CPython 3.12
    fake_wheel(whl, "lmlab", "0.1.0", ["torch>=2.2", "mlflow>=2.16", "optuna>=4.0", "hydra-core>=1.3.2"])
    problems, notes, needed = check_kit.check(tmp_path / "kit", installed=False)
    assert sorted(problems) == sorted([
        "hydra-core 1.3.8 requires antlr4-python3-runtime==4.9.*: neither in the kit nor on the image",
        "omegaconf 2.3.1 requires antlr4-python3-runtime==4.9.*: neither in the kit nor on the image",
        "mlflow-skinny 3.17.2 requires transformers<5: the image has 5.17.0",
        "sqlalchemy-2.1.9-cp311-cp311-manylinux_2_17_x86_64.whl does not install on CPython 3.12 / manylinux x86_64",
    ])
    assert any(n.startswith("not carried: optuna") for n in notes)  # lmlab's allow-list
    assert "mlflow>=2.16 is met by mlflow-skinny (the same import package)" in notes
    assert {"packaging", "pyyaml", "torch", "transformers"} <= needed
    fake_wheel(whl, "antlr4-python3-runtime", "4.9.3", [])
    fake_wheel(whl, "pyyaml", "6.0.3", [])  # the image has it: carried only with a reason
    problems, _, _ = check_kit.check(tmp_path / "kit", installed=False)
    assert not any("antlr4" in p for p in problems)
    assert "pyyaml is on the image already: carry it only for another version (then say why in REPLACES_DEVICE)" in problems
