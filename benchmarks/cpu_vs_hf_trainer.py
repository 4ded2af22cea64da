"""Training throughput on the CPU: an lmlab run against the Hugging Face Trainer, side by side.

Both sides train the same GPT-2 (lmlab's ``model.size``, fresh weights from the same seed) on the same
packed blocks of ``--block-size`` tokens, with the same batch, fp32, AdamW (lr, betas, eps, weight
decay without biases and norms), linear warmup then cosine decay to 10% of the peak, gradient norm
clipped at 1.0, the same number of steps and the same torch thread count:

* lmlab, run as a user runs it: the ``lmlab`` command with Hydra overrides, in a temporary
  ``LMLAB_HOME`` / ``LMLAB_CACHE_DIR``. Its tokens/s is read back from the ``train/tokens_per_sec``
  windows it logs to MLflow (one window per ``--log-every`` steps);
* the Hugging Face ``Trainer`` (``run_clm``'s recipe: ``GPT2LMHeadModel`` with ``labels=input_ids``,
  ``default_data_collator``), given lmlab's tokenizer (from its export directory), its
  ``config.json`` and the very blocks lmlab packed (its tokenized-data cache). A ``TrainerCallback``
  takes the time at the end of every step.

Steady-state tokens/s covers the steps after ``--warmup`` to the last one, on both sides measured from
the end of one step to the end of another, so it includes loading the batch but not start-up,
validation or saving (lmlab validates only after the last step here and writes no periodic
checkpoint; the Trainer neither evaluates nor saves). "Between steps" is the share of that span the
host spends from the end of one step to the start of the next: fetching the batch (the data wait) and
the logging that follows a step, taken the same way on both sides. Each side runs in its own process;
with ``--repeats N`` they alternate N times and the table shows the median.

    python benchmarks/cpu_vs_hf_trainer.py                      # 150 steps per side, ~5 min on 2 cores
    python benchmarks/cpu_vs_hf_trainer.py --repeats 3 --markdown /tmp/cpu.md

Needs ``accelerate`` (the Trainer requires it). This is a benchmark, not a test: it prints a table
and never fails on the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "corpus" / "wiki_extracts_en.txt"
@dataclass
class Side:
    name: str
    tokens_per_sec: float
    peak_rss_mb: float
    wall_s: float
    final_loss: float
    # Host time between one step's end and the next one's start (fetching the batch, and the
    # logging that follows a step) over the timed span.
    data_wait: float


def between_steps_share(ends: list[float], gaps: list[float]) -> float:
    """The share of the span from the first to the last timed step end spent between steps."""
    return sum(gaps) / (ends[-1] - ends[0])


# =================================================================================================
# The lmlab side
# =================================================================================================


def lmlab_command() -> list[str]:
    beside = Path(sys.executable).with_name("lmlab")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "lmlab"]


def lmlab_overrides(args: argparse.Namespace, run_name: str) -> list[str]:
    return [
        f"data.path={args.data}", f"model.size={args.size}", f"data.block_size={args.block_size}",
        f"data.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
        # One validation, after the last step (outside the timed steps), a few batches of it.
        f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=2",
        f"trainer.log_every_n_steps={args.log_every}", "trainer.enable_progress_bar=false",
        "trainer.precision=32-true", "trainer.gradient_clip_val=1.0", "checkpoint.every_n_steps=0",
        f"optimizer.lr={args.lr}", "optimizer.weight_decay=0.01", "optimizer.betas=[0.9,0.95]", "optimizer.eps=1e-8",
        "scheduler=cosine", f"scheduler.warmup_steps={args.warmup_steps}", "scheduler.min_lr_ratio=0.1",
        f"seed={args.seed}", f"logger.run_name={run_name}", *args.lmlab_override,
    ]


def lmlab_rate(home: Path, run_name: str, args: argparse.Namespace) -> tuple[float, float]:
    """Steady tokens/s over the windows after the warm-up, and the last logged train/loss."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{run_name}'")
    history = sorted(client.get_metric_history(runs[0].info.run_id, "train/tokens_per_sec"), key=lambda m: m.step)
    # Window i covers steps (i-1)*every+1 .. i*every; keep those that start after the warm-up.
    windows = [m.value for i, m in enumerate(history, 1) if (i - 1) * args.log_every >= args.warmup]
    # Every window holds the same number of tokens, so the rate over all of them is the harmonic mean.
    rate = len(windows) / sum(1.0 / w for w in windows)
    losses = client.get_metric_history(runs[0].info.run_id, "train/loss")
    return rate, (max(losses, key=lambda m: m.step).value if losses else float("nan"))


def export_dir(home: Path, run_name: str) -> Path:
    found = sorted(home.glob("runs/*/export/config.json"))
    if not found:
        raise SystemExit(f"lmlab run {run_name} left no export under {home}/runs")
    return found[-1].parent


def train_blocks(cache: Path, block_size: int) -> Path:
    found = sorted(cache.glob(f"data/causal-{block_size}-*/train.input_ids.npy"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no packed training blocks in {cache}/data")
    return found[-1]


# =================================================================================================
# The Hugging Face side (runs in a child process: --hf-worker PARAMS.json)
# =================================================================================================


def hf_worker(params_path: str) -> None:
    p = json.loads(Path(params_path).read_text())
    import numpy as np
    import torch
    from transformers import (AutoTokenizer, GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    torch.set_num_threads(p["threads"])
    blocks = np.load(p["blocks"], mmap_mode="r")

    class Blocks(torch.utils.data.Dataset):
        # run_clm's group_texts output: input_ids and labels are the same block; the model shifts.
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks[i].astype(np.int64))
            return {"input_ids": ids, "labels": ids}

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.gaps: list[float] = []  # after the warm-up, as lmlab's probe takes them
            self.losses: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # The Trainer fetches the batch before this hook and logs after on_step_end.
            if self.ends and state.global_step >= p["warmup"]:
                self.gaps.append(time.perf_counter() - self.ends[-1])

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    tokenizer = AutoTokenizer.from_pretrained(p["export"])
    config = GPT2Config.from_pretrained(p["export"])
    torch.manual_seed(p["seed"])
    model = GPT2LMHeadModel(config)  # fresh weights, not lmlab's trained ones
    clock = StepClock()
    args = TrainingArguments(
        output_dir=p["output_dir"], use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
        max_steps=p["steps"], per_device_train_batch_size=p["batch_size"], learning_rate=p["lr"],
        weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=p["warmup_steps"], logging_steps=p["log_every"], seed=p["seed"], data_seed=p["seed"],
        dataloader_num_workers=0, disable_tqdm=True, torch_compile=p["torch_compile"],
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator,
                      processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    timed = clock.ends[max(p["warmup"], 1) - 1:]  # from the end of the last warm-up step (or the first)
    rate = (len(timed) - 1) * p["batch_size"] * p["block_size"] / (timed[-1] - timed[0])
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    fused = "fused" if optimizer.defaults.get("fused") else "foreach" if optimizer.defaults.get("foreach") else "for-loop"
    Path(p["result"]).write_text(json.dumps({
        "tokens_per_sec": rate, "final_loss": clock.losses[-1] if clock.losses else float("nan"),
        "data_wait": between_steps_share(timed, clock.gaps),
        "threads": torch.get_num_threads(), "optimizer": f"{type(optimizer).__name__} ({fused}, optim={getattr(args.optim, 'value', args.optim)})",
        "attn": model.config._attn_implementation,
    }))


# =================================================================================================
# Input pipeline (--pipeline): tokenize + pack the corpus, lmlab's datamodule vs run_clm's datasets.map
# =================================================================================================


def lmlab_pipeline_worker(p: dict[str, Any]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from lmlab.data.text_datamodule import TextDataModule
    from lmlab.paths import config_dir

    tokenizer = AutoTokenizer.from_pretrained(p["export"])
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"data.path={p['data']}", f"data.block_size={p['block_size']}",
                                           f"data.num_proc={p['num_proc']}"])
    started = time.perf_counter()  # imports and config are left out, on both sides
    dm = TextDataModule(cfg.data, packing="causal", cache_dir=p["cache"], seed=0)
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    blocks = len(dm.splits["train"]) + len(dm.splits["validation"])
    return {"seconds": time.perf_counter() - started, "blocks": blocks, "cache_hit": dm.cache_hit,
            "corpus_read": dm.corpus.is_read}


def hf_pipeline_worker(p: dict[str, Any]) -> dict[str, Any]:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(p["export"])
    block_size = p["block_size"]

    def tokenize_function(examples: dict[str, list]) -> dict[str, list]:
        return tokenizer(examples["text"])

    def group_texts(examples: dict[str, list]) -> dict[str, list]:
        # run_clm's: concatenate the batch, drop the remainder, cut into blocks; labels = input_ids.
        joined = {k: sum(examples[k], []) for k in examples}
        total = (len(joined["input_ids"]) // block_size) * block_size
        result = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    started = time.perf_counter()
    raw = load_dataset("text", data_files={"train": p["data"]}, cache_dir=p["cache"])
    tokenized = raw.map(tokenize_function, batched=True, num_proc=p["num_proc"], remove_columns=["text"])
    grouped = tokenized.map(group_texts, batched=True, num_proc=p["num_proc"])
    return {"seconds": time.perf_counter() - started, "blocks": len(grouped["train"]), "cache_hit": None}


def pipeline_worker(params_path: str) -> None:
    p = json.loads(Path(params_path).read_text())
    worker = lmlab_pipeline_worker if p["side"] == "lmlab" else hf_pipeline_worker
    Path(p["result"]).write_text(json.dumps(worker(p)))


def run_pipeline(args: argparse.Namespace, work: Path, env: dict[str, str], export: Path) -> str:
    data = Path(args.data)
    if args.pipeline_copies > 1:  # a bigger corpus: the file repeated (lmlab's cache key is its content)
        data = work / f"corpus_x{args.pipeline_copies}.txt"
        lines = Path(args.data).read_text(encoding="utf-8").splitlines()
        with data.open("w", encoding="utf-8") as out:
            # Each copy's lines numbered: lmlab drops repeated documents before carving out validation,
            # so plain copies would leave it one copy to tokenize while datasets.map tokenizes all.
            for copy in range(args.pipeline_copies):
                out.writelines(f"{copy} {line}\n" if line.strip() else "\n" for line in lines)
    size_mb = data.stat().st_size / 2**20
    rows = []
    for side in ("lmlab", "HF datasets.map"):
        cache = work / f"pipeline-cache-{side.split()[0]}"
        times = []
        for attempt in ("cold", "cached"):
            params = {"side": side.split()[0], "export": str(export), "data": str(data), "cache": str(cache),
                      "block_size": args.block_size, "num_proc": args.num_proc,
                      "result": str(work / f"pipeline-{side.split()[0]}-{attempt}.json")}
            path = work / f"pipeline-params-{side.split()[0]}-{attempt}.json"
            path.write_text(json.dumps(params))
            run_child([sys.executable, __file__, "--pipeline-worker", str(path)], env,
                      work / f"pipeline-{side.split()[0]}-{attempt}.log")
            times.append(json.loads(Path(params["result"]).read_text()))
        read = times[1].get("corpus_read")
        rows.append([side, f"{times[0]['seconds']:.1f}", f"{times[1]['seconds']:.2f}", f"{times[0]['blocks']:,}",
                     "—" if read is None else "yes" if read else "no (stamp)"])
    header = ["side", "first run (s)", "second run (s)", f"blocks of {args.block_size}", "second run read the text"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"input pipeline: {data.name} ({size_mb:.1f} MB), num_proc={args.num_proc}, lmlab's tokenizer "
             f"(vocab {len(json.loads((export / 'tokenizer.json').read_text())['model']['vocab']):,})",
             fmt.format(*header), *(fmt.format(*r) for r in rows)]
    return "\n".join(lines)


# =================================================================================================
# Driver
# =================================================================================================


def run_child(command: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Runs a process to its end; (wall seconds, its own peak RSS in MB)."""
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{' '.join(command[:3])} ... failed (exit {child.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # Linux reports KiB


def lmlab_main_with(callback: Any) -> None:
    """The ``lmlab`` command, given this process's arguments, with ``callback`` added to its Trainer.

    For the probes of the benchmarks' child processes (``LMLAB_STUB`` here and in gpu_mfu.py).
    """
    import lmlab.train as train
    from lmlab import cli

    build = train.build_trainer

    def build_trainer(*args: Any, **kwargs: Any) -> Any:
        trainer, best, throughput = build(*args, **kwargs)
        trainer.callbacks.append(callback)
        return trainer, best, throughput

    train.build_trainer = build_trainer
    sys.argv = ["lmlab", *sys.argv[1:]]
    cli.main()


# The lmlab command with a probe added to its Trainer: it writes the wall-clock time of the first
# training batch (for the time from starting the process to its first step) and, for the steps after
# the warm-up, the step ends and the host gaps between one step's end and the next one's start.
LMLAB_STUB = """
import json, os, sys, time
import lightning as L
sys.path.insert(0, os.environ["LMLAB_BENCH_DIR"])
from cpu_vs_hf_trainer import lmlab_main_with

class Probe(L.Callback):
    def __init__(self):
        self.warmup = int(os.environ["LMLAB_BENCH_WARMUP"])
        self.first, self.ends, self.gaps, self.last_end, self.steps = None, [], [], None, 0
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = time.time()
        if self.last_end is not None and self.steps >= self.warmup:
            self.gaps.append(time.perf_counter() - self.last_end)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.last_end = time.perf_counter()
        if self.steps >= self.warmup:
            self.ends.append(self.last_end)
    def on_train_end(self, trainer, pl_module):
        with open(os.environ["LMLAB_BENCH_OUT"], "w") as out:
            json.dump({"first_step": self.first, "ends": self.ends, "gaps": self.gaps}, out)

lmlab_main_with(Probe())
"""


def run_lmlab(args: argparse.Namespace, work: Path, env: dict[str, str], name: str,
              steps: int | None = None) -> tuple[Side | None, float]:
    """One lmlab run; its throughput (None for a run too short to time) and seconds to its first step."""
    overrides = lmlab_overrides(args, name)
    if steps is not None:
        overrides += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    probe_out = work / f"{name}.probe.json"
    started = time.time()
    wall, rss = run_child([sys.executable, "-c", LMLAB_STUB, *overrides],
                          {**env, "LMLAB_BENCH_OUT": str(probe_out), "LMLAB_BENCH_WARMUP": str(args.warmup),
                           "LMLAB_BENCH_DIR": str(Path(__file__).resolve().parent)},
                          work / f"{name}.log")
    probe = json.loads(probe_out.read_text())
    first_step = probe["first_step"] - started
    if steps is not None:
        return None, first_step
    rate, loss = lmlab_rate(Path(env["LMLAB_HOME"]), name, args)
    return Side("lmlab", rate, rss, wall, loss, between_steps_share(probe["ends"], probe["gaps"])), first_step


def run_hf(args: argparse.Namespace, work: Path, env: dict[str, str], index: int, export: Path, blocks: Path,
           compiled: bool) -> tuple[Side, dict]:
    tag = f"{index}{'-compile' if compiled else ''}"
    params = {"export": str(export), "blocks": str(blocks), "steps": args.steps, "batch_size": args.batch_size,
              "block_size": args.block_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
              "warmup": args.warmup, "log_every": args.log_every, "seed": args.seed, "threads": args.threads,
              "torch_compile": compiled, "output_dir": str(work / f"hf-out-{tag}"),
              "result": str(work / f"hf-{tag}.json")}
    path = work / f"hf-params-{tag}.json"
    path.write_text(json.dumps(params))
    wall, rss = run_child([sys.executable, __file__, "--hf-worker", str(path)], env, work / f"hf-{tag}.log")
    result = json.loads(Path(params["result"]).read_text())
    label = "HF Trainer" + (" (torch_compile)" if compiled else "")
    return Side(label, result["tokens_per_sec"], rss, wall, result["final_loss"], result["data_wait"]), result


def child_env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The same thread pools for both sides; no network; a fresh lmlab home for this benchmark.
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "LMLAB_HOME": str(work / "home"), "LMLAB_CACHE_DIR": str(work / "cache"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "true", "PYTHONUNBUFFERED": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])


def training_table(args: argparse.Namespace, sides: dict[str, list[Side]], export: Path, blocks: Path,
                   markdown: bool) -> str:
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.flops import cpu_peak_flops, flops_per_token

    config = GPT2Config.from_pretrained(export)
    per_token = flops_per_token(GPT2LMHeadModel(config), args.block_size) or 0.0
    # Else lmlab's own estimate, the one a CPU run's train/mfu uses: AVX2 or AVX-512 FMA x clock x threads.
    peak, peak_note = ((args.peak_flops, "given with --peak-flops") if args.peak_flops
                       else cpu_peak_flops(args.threads) or (None, "no AVX2/AVX-512 in /proc/cpuinfo: set --peak-flops"))
    hf_rate = statistics.median(s.tokens_per_sec for s in sides["HF Trainer"])
    rows = []
    for name, runs in sides.items():
        rate = statistics.median(s.tokens_per_sec for s in runs)
        rows.append([name, f"{rate:,.0f}", f"{per_token * rate / peak:.1%}" if peak else "—",
                     f"{statistics.median(s.data_wait for s in runs):.1%}",
                     f"{statistics.median(s.peak_rss_mb for s in runs):,.0f}",
                     f"{statistics.median(s.wall_s for s in runs):.0f}",
                     f"{statistics.median(s.final_loss for s in runs):.3f}", f"{rate / hf_rate:.2f}x"])
    header = ["side", "tokens/s", "MFU", "between steps", "peak RSS (MB)", "process wall (s)", "last train loss",
              "vs HF Trainer"]
    settings = (f"GPT-2 {args.size} ({config.n_layer} layers x {config.n_embd}, vocab {config.vocab_size}), "
                f"{len(np.load(blocks, mmap_mode='r')):,} training blocks of {args.block_size} tokens, batch "
                f"{args.batch_size}, fp32, {args.steps} steps (first {args.warmup} not timed), AdamW lr {args.lr} "
                f"betas 0.9/0.95 wd 0.01, warmup {args.warmup_steps} then cosine to 10%, clip 1.0, "
                f"{args.threads} torch threads, seed {args.seed}, {args.repeats} alternation(s), medians")
    mfu = (f"MFU = {per_token / 1e6:.1f} MFLOP/token (6N + 12*L*H*Q*T) x tokens/s / "
           f"{f'{peak / 1e9:.0f} GFLOP/s' if peak else 'the peak'} ({peak_note})")
    return "\n".join([settings + ("." if markdown else ""), *([""] if markdown else []),
                      mfu + ("." if markdown else ""), "", table(header, rows, markdown)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a .txt corpus (one document per line)")
    parser.add_argument("--size", default="tiny", help="lmlab model.size of GPT-2")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the timing (a multiple of --log-every)")
    parser.add_argument("--log-every", type=int, default=10, help="lmlab's throughput window and both sides' logging")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=10, help="learning-rate warmup")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, both sides")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times; medians")
    parser.add_argument("--hf-compile", action="store_true", help="also run the Trainer with torch_compile=True")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: an AVX2 or AVX-512 estimate from /proc/cpuinfo)")
    parser.add_argument("--lmlab-override", action="append", default=[], help="extra lmlab override (repeatable)")
    parser.add_argument("--pipeline", action="store_true", help="also compare tokenizing + packing the corpus")
    parser.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                        help="the training comparison (--no-training: the input pipeline only)")
    parser.add_argument("--num-proc", type=int, default=2, help="--pipeline: processes on both sides")
    parser.add_argument("--pipeline-copies", type=int, default=1,
                        help="--pipeline: the corpus repeated this many times (20 x 4.7 MB ~ the issue's 100 MB)")
    parser.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, runs)")
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup % args.log_every:
        parser.error("--warmup must be a multiple of --log-every")
    if args.steps - args.warmup < 2 * args.log_every:
        parser.error("--steps must leave at least two --log-every windows after --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return 0
    if args.pipeline_worker:
        pipeline_worker(args.pipeline_worker)
        return 0
    work = Path(tempfile.mkdtemp(prefix="lmlab-cpu-bench-"))
    env = child_env(args, work)
    print(f"work directory {work}; load average at start {load()}", flush=True)
    sections, first_steps = [], []
    try:
        # A short first run trains the tokenizer and packs the data (lmlab's caches) and exports the
        # tokenizer and config the Trainer side uses; it is not timed for throughput.
        _, cold = run_lmlab(args, work, env, "prepare", steps=2)
        home = Path(env["LMLAB_HOME"])
        export, blocks = export_dir(home, "prepare"), train_blocks(Path(env["LMLAB_CACHE_DIR"]), args.block_size)
        print(f"  prepared: tokenizer, packed blocks, export ({cold:.1f} s to the first step, empty caches)", flush=True)
        sides: dict[str, list[Side]] = {}
        for i in range(args.repeats if args.training else 0):
            side, warm = run_lmlab(args, work, env, f"bench-{i}")
            first_steps.append(warm)
            runs = [side]
            print(f"  lmlab      {side.tokens_per_sec:9.0f} tokens/s, first step after {warm:.1f} s (load {load()})",
                  flush=True)
            hf, info = run_hf(args, work, env, i, export, blocks, False)
            runs.append(hf)
            print(f"  HF Trainer {hf.tokens_per_sec:9.0f} tokens/s (load {load()}; {info['threads']} threads, "
                  f"{info['optimizer']}, attention {info['attn']})", flush=True)
            if args.hf_compile:
                hfc, _ = run_hf(args, work, env, i, export, blocks, True)
                runs.append(hfc)
                print(f"  HF Trainer (torch_compile) {hfc.tokens_per_sec:9.0f} tokens/s (load {load()})", flush=True)
            for r in runs:
                sides.setdefault(r.name, []).append(r)
        if sides:
            sections.append(("training", sides))
            hf_note = (f"HF side: {info['optimizer']}, attention {info['attn']}, {info['threads']} torch threads. "
                       f"lmlab: {cold:.1f} s from starting the command to its first training step with empty caches, "
                       f"{statistics.median(first_steps):.1f} s with them filled (median)")
        if args.pipeline:
            sections.append(("pipeline", run_pipeline(args, work, env, export)))
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        out_text, out_md = [f"\n{stamp}, load average at end {load()}"], []
        for kind, value in sections:
            if kind == "training":
                out_text += [training_table(args, value, export, blocks, markdown=False), hf_note, ""]
                out_md += [training_table(args, value, export, blocks, markdown=True), "", hf_note + ".", ""]
            else:
                out_text += [value, ""]
                out_md += ["```", value, "```", ""]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(out_text))
    if args.markdown:
        args.markdown.write_text("\n".join(out_md))
        print(f"markdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
