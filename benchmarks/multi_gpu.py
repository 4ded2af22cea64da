"""DDP and FSDP on the GPUs of one machine: a few steps of GPT-2 124M each, tokens/s side by side.

    python benchmarks/multi_gpu.py                      # every visible GPU, 30 steps per strategy
    python benchmarks/multi_gpu.py --steps 50 --strategies gpu,ddp,fsdp --devices 2

Each strategy is a real ``lmlab`` run (its own MLflow run under a temporary LMLAB_HOME); the table
reads the logged throughput and final losses back from MLflow. Data: the Wikipedia extracts in
../shared/data/corpus (or --data FILE).

``--smoke`` checks the script on a CPU: a tiny GPT-2, ``gpu`` as one CPU process and ``ddp`` as two
gloo processes, both in bf16 autocast like the GPU presets (FSDP needs GPUs and is left out).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "corpus" / "wiki_extracts_en.txt"
PRESETS = {"gpu": ["trainer=gpu", "trainer.devices=1"], "ddp": ["trainer=ddp"], "fsdp": ["trainer=fsdp"],
           "deepspeed": ["trainer=deepspeed"]}


def run_one(name: str, devices: int, args: argparse.Namespace, home: Path) -> dict[str, float | str]:
    size = ["model.size=tiny", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
            "tokenizer.vocab_size=2000"] if args.smoke else ["model.size=base"]
    overrides = [
        *PRESETS[name], "model=gpt2", *size, f"data.path={args.data}", f"data.block_size={args.seq}",
        f"data.batch_size={args.batch}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.limit_val_batches=5", "trainer.log_every_n_steps=5", "trainer.enable_progress_bar=false",
        "export=false",
    ]
    if name != "gpu":
        overrides.append(f"trainer.devices={devices}")
    env = {**os.environ, "LMLAB_HOME": str(home / name), "LMLAB_CACHE_DIR": str(home / "cache")}
    done = subprocess.run([sys.executable, "-m", "lmlab", *overrides], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"strategy": name, "error": done.stderr.strip().splitlines()[-1][:200] if done.stderr else "failed"}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / name / 'mlflow.db'}")
    run = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])][0]
    rates = [m.value for m in client.get_metric_history(run.info.run_id, "train/tokens_per_sec")]
    steady = rates[len(rates) // 2:] or rates  # skip compilation / warm-up windows
    return {"strategy": name, "devices": run.data.params.get("world_size", "?"),
            "global_batch": run.data.params.get("effective_batch_size", "?"),
            "tokens_per_sec": sum(steady) / max(len(steady), 1),
            "train_loss": run.data.metrics.get("train/loss", float("nan")),
            "val_loss": run.data.metrics.get("val/loss", float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="gpu,ddp,fsdp")
    parser.add_argument("--devices", type=int, default=0, help="GPUs for ddp/fsdp (0: all visible)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--smoke", action="store_true", help="check the script on the CPU (tiny model, gpu and ddp)")
    args = parser.parse_args()
    import torch

    if args.smoke:
        args.strategies = ",".join(s for s in args.strategies.split(",") if s in ("gpu", "ddp"))
        devices = args.devices or 2
    elif not torch.cuda.is_available():
        sys.exit("multi_gpu.py needs CUDA GPUs; on the CPU see tests/test_ddp.py (gloo), or --smoke.")
    else:
        devices = args.devices or torch.cuda.device_count()
    with tempfile.TemporaryDirectory(prefix="lmlab-multigpu-") as tmp:
        rows = [run_one(name, devices, args, Path(tmp)) for name in args.strategies.split(",")]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else "CPU (smoke)"
    model = "GPT-2 tiny" if args.smoke else "GPT-2 124M"
    print(f"\n{model}, sequence {args.seq}, per-device batch {args.batch}, {args.steps} steps, {device}")
    print(f"{'strategy':<10} {'devices':>7} {'global batch':>12} {'tokens/s':>12} {'train loss':>10} {'val loss':>9}")
    failed = False
    for row in rows:
        if "error" in row:
            print(f"{row['strategy']:<10} failed: {row['error']}")
            failed = True
            continue
        print(f"{row['strategy']:<10} {row['devices']:>7} {row['global_batch']:>12} {row['tokens_per_sec']:>12,.0f} "
              f"{row['train_loss']:>10.4f} {row['val_loss']:>9.4f}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
