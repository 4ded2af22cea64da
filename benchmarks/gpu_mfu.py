"""MFU on one GPU: GPT-2 124M and BERT-base MLM through lmlab and through the Hugging Face Trainer.

    python benchmarks/gpu_mfu.py                         # both models, every side, ~15 min on an H100
    python benchmarks/gpu_mfu.py --only gpt2 --steps 200 --markdown /tmp/gpu.md

Models and settings (the issue's): GPT-2 124M (12 x 768) at sequence 1024, batch 16; BERT-base
(12 x 768) masked-LM at sequence 512, batch 64 (15% masking, 80/10/10); bf16 mixed precision, AdamW
(fused), one GPU. Sides, each in its own process:

* ``lmlab``: the ``lmlab`` command (``trainer=gpu``), as it ships, and with ``model.compile=true``;
  for GPT-2 also with ``model.fused_loss=false`` (the plain logits loss), eager and compiled (the
  compiled plain loss puts the model and its cross-entropy in one graph);
* ``HF Trainer``: ``GPT2LMHeadModel`` / ``BertForMaskedLM`` from the same config, fresh weights from the
  same seed, trained with ``Trainer`` (``bf16=True``, otherwise the defaults), and with
  ``torch_compile=True``. It reads the very blocks lmlab packed and lmlab's tokenizer; BERT's
  masking is ``DataCollatorForLanguageModeling(mlm_probability=0.15)``.

Both sides use lmlab's own tokenizers, trained on the corpus (a byte-level BPE of up to 50,257
tokens for GPT-2, so the model is GPT-2 124M's shape; a 30,522-token WordPiece for BERT); N in the
table is the parameter count of the model actually trained.

Reported per side: steady-state tokens/s (the steps after ``--warmup``, timed from the end of one
step to the end of another with the GPU synchronised at both ends), MFU = (6N + 12·L·H·Q·T) x
tokens/s / peak (peak: ``lmlab.flops.PEAK_FLOPS`` by GPU name, or ``--peak-flops``), the data-wait
share (host time between the end of one step and the start of the next, where the next batch is
fetched, over the timed wall time), peak GPU memory (``torch.cuda.max_memory_allocated``) and the
ratio to the HF Trainer with its defaults.

It needs a CUDA GPU for its figures. ``--smoke`` runs the same code on the CPU with tiny models, bf16
autocast and a few steps: its numbers mean nothing, but every side, the probes and the table are exercised
(tests/test_benchmarks.py does so), so a GPU session's device time is not spent on plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_vs_hf_trainer import lmlab_command, load, run_child, table  # noqa: E402  (one copy of the helpers)

REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "corpus" / "wiki_extracts_en.txt"


@dataclass(frozen=True)
class Workload:
    name: str
    task: str
    model: str
    seq: int
    batch: int
    vocab: int
    packing: str  # lmlab's cache directory prefix for these blocks


WORKLOADS = {
    "gpt2": Workload("GPT-2 124M", "clm", "gpt2", 1024, 16, 50257, "causal"),
    "bert": Workload("BERT-base MLM", "mlm", "bert", 512, 64, 30522, "masked"),
}


def smoke_workload(w: Workload) -> Workload:
    """The CPU stand-in for ``--smoke``: the same task and model family, tiny and short."""
    return dataclasses.replace(w, name=f"{w.name} (smoke: tiny, CPU)", seq=64, batch=8, vocab=2000)


# =================================================================================================
# Measuring inside the child processes
# =================================================================================================


def device_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> int:
    """Peak GPU memory allocated; under --smoke on the CPU, the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# The lmlab command with a probe callback added to its Trainer: it writes step times, the host gaps
# between steps and the peak GPU memory to LMLAB_BENCH_OUT when training ends.
LMLAB_STUB = """
import json, os, sys, time
import lightning as L
import torch
import lmlab.train as train
from lmlab import cli
sys.path.insert(0, os.environ["LMLAB_BENCH_DIR"])
from gpu_mfu import device_sync as sync, peak_memory

class Probe(L.Callback):
    def __init__(self):
        self.warmup = int(os.environ["LMLAB_BENCH_WARMUP"])
        self.ends, self.gaps, self.last_end, self.steps = [], [], None, 0
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.last_end is not None and self.steps >= self.warmup:
            self.gaps.append(time.perf_counter() - self.last_end)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        if self.steps == self.warmup or self.steps == trainer.max_steps:
            sync()
        self.last_end = time.perf_counter()
        if self.steps >= self.warmup:
            self.ends.append(self.last_end)
    def on_train_end(self, trainer, pl_module):
        sync()
        with open(os.environ["LMLAB_BENCH_OUT"], "w") as out:
            json.dump({"ends": self.ends, "gaps": self.gaps, "peak_mem": peak_memory()}, out)

_build = train.build_trainer
def build_trainer(*args, **kwargs):
    trainer, best, throughput = _build(*args, **kwargs)
    trainer.callbacks.append(Probe())
    return trainer, best, throughput
train.build_trainer = build_trainer
sys.argv = ["lmlab", *sys.argv[1:]]
cli.main()
"""


def hf_worker(params_path: str) -> None:
    p = json.loads(Path(params_path).read_text())
    import numpy as np
    import torch
    from transformers import (AutoConfig, AutoTokenizer, BertForMaskedLM, DataCollatorForLanguageModeling,
                              GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, default_data_collator)

    blocks = np.load(p["blocks"], mmap_mode="r")
    causal = p["task"] == "clm"
    cuda = torch.cuda.is_available()

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.from_numpy(blocks[i].astype(np.int64))
            # run_clm: labels are the inputs (the model shifts); run_mlm: the collator masks and labels.
            return {"input_ids": ids, "labels": ids} if causal else {"input_ids": ids}

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.gaps: list[float] = []
            self.last_end: float | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.last_end is not None and state.global_step >= p["warmup"]:
                self.gaps.append(time.perf_counter() - self.last_end)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (p["warmup"], p["steps"]):
                device_sync()
            self.last_end = time.perf_counter()
            if state.global_step >= p["warmup"]:
                self.ends.append(self.last_end)

    tokenizer = AutoTokenizer.from_pretrained(p["export"])
    config = AutoConfig.from_pretrained(p["export"])
    torch.manual_seed(p["seed"])
    model = (GPT2LMHeadModel if causal else BertForMaskedLM)(config)
    collator = default_data_collator if causal else DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    probe = Probe()
    args = TrainingArguments(
        output_dir=p["output_dir"], report_to=[], save_strategy="no", eval_strategy="no", bf16=True, use_cpu=not cuda,
        max_steps=p["steps"], per_device_train_batch_size=p["batch"], learning_rate=p["lr"], weight_decay=0.01,
        adam_beta1=0.9, adam_beta2=p["beta2"], max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=p["warmup_steps"], logging_steps=p["log_every"],
        seed=p["seed"], data_seed=p["seed"], disable_tqdm=True, torch_compile=p["torch_compile"],
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=collator,
                      processing_class=tokenizer, callbacks=[probe])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    device_sync()
    Path(p["result"]).write_text(json.dumps({"ends": probe.ends, "gaps": probe.gaps, "peak_mem": peak_memory()}))


# =================================================================================================
# Driver
# =================================================================================================


@dataclass
class Row:
    side: str
    tokens_per_sec: float
    data_wait: float
    peak_mem_gb: float


def summarise(side: str, record: dict[str, Any], tokens_per_step: int) -> Row:
    ends = record["ends"]
    span = ends[-1] - ends[0]
    rate = (len(ends) - 1) * tokens_per_step / span
    return Row(side, rate, sum(record["gaps"]) / span, record["peak_mem"] / 2**30)


def lmlab_overrides(w: Workload, args: argparse.Namespace, data: list[str], extra: list[str]) -> list[str]:
    device = ["model.size=tiny", "trainer=cpu"] if args.smoke else ["model.size=base", "trainer=gpu", "trainer.devices=1"]
    return [
        f"task={w.task}", f"model={w.model}", *device, "trainer.precision=bf16-mixed", *data,
        f"data.block_size={w.seq}", f"data.batch_size={w.batch}",
        f"tokenizer.vocab_size={w.vocab}", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}", "trainer.limit_val_batches=2",
        f"trainer.log_every_n_steps={args.log_every}", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=0", "export=true", f"optimizer.lr={args.lr}", f"optimizer.betas=[0.9,{args.beta2}]",
        "optimizer.weight_decay=0.01", "scheduler=cosine", f"scheduler.warmup_steps={args.warmup_steps}",
        "scheduler.min_lr_ratio=0.1", f"seed={args.seed}", *extra,
    ]


def run_lmlab(w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], data: list[str],
              label: str, extra: list[str]) -> Row:
    out = work / f"{w.model}-{label.replace(' ', '_')}.json"
    child_env = {**env, "LMLAB_BENCH_OUT": str(out), "LMLAB_BENCH_WARMUP": str(args.warmup),
                 "LMLAB_BENCH_DIR": str(HERE)}
    run_child([sys.executable, "-c", LMLAB_STUB, *lmlab_overrides(w, args, data, extra)], child_env,
              work / f"{w.model}-{label.replace(' ', '_')}.log")
    return summarise(label, json.loads(out.read_text()), w.seq * w.batch)


def run_hf(w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], export: Path, blocks: Path,
           compiled: bool) -> Row:
    tag = f"{w.model}-hf{'-compile' if compiled else ''}"
    params = {"task": w.task, "export": str(export), "blocks": str(blocks), "steps": args.steps, "batch": w.batch,
              "lr": args.lr, "beta2": args.beta2, "warmup_steps": args.warmup_steps, "warmup": args.warmup,
              "log_every": args.log_every, "seed": args.seed, "torch_compile": compiled,
              "output_dir": str(work / f"{tag}-out"), "result": str(work / f"{tag}.json")}
    path = work / f"{tag}-params.json"
    path.write_text(json.dumps(params))
    run_child([sys.executable, __file__, "--hf-worker", str(path)], env, work / f"{tag}.log")
    label = "HF Trainer" + (" (torch_compile)" if compiled else "")
    return summarise(label, json.loads(Path(params["result"]).read_text()), w.seq * w.batch)


def newest(home: Path, pattern: str) -> Path:
    found = sorted(home.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {home}/{pattern}")
    return found[-1]


def measure(w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], data: list[str]) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from lmlab.flops import flops_per_token, peak_flops

    rows = [run_lmlab(w, args, work, env, data, "lmlab", [])]  # also fills the caches the HF side reads
    print(f"  {w.name}: lmlab {rows[-1].tokens_per_sec:,.0f} tokens/s (load {load()})", flush=True)
    home = Path(env["LMLAB_HOME"])
    export = newest(home, f"runs/*_{w.task}_{w.model}/export/config.json").parent
    blocks = newest(Path(env["LMLAB_CACHE_DIR"]), f"data/{w.packing}-{w.seq}-*/train.input_ids.npy")
    variants = [("lmlab (model.compile=true)", ["model.compile=true"])] if args.compile else []
    if w.task == "clm":
        # Which loss wins on a GPU is for this table to say: the chunked loss (eager) saves the logits'
        # memory, the compiled plain loss lets the compiler fuse the float32 log-softmax over them.
        variants.append(("lmlab (model.fused_loss=false)", ["model.fused_loss=false"]))
        if args.compile:
            variants.append(("lmlab (compile, fused_loss=false)", ["model.compile=true", "model.fused_loss=false"]))
    for label, extra in variants:
        rows.append(run_lmlab(w, args, work, env, data, label, extra))
        print(f"  {w.name}: {label} {rows[-1].tokens_per_sec:,.0f} tokens/s", flush=True)
    for compiled in (False, True) if args.compile else (False,):
        rows.append(run_hf(w, args, work, env, export, blocks, compiled))
        print(f"  {w.name}: {rows[-1].side} {rows[-1].tokens_per_sec:,.0f} tokens/s", flush=True)

    config = AutoConfig.from_pretrained(export)
    model = (AutoModelForCausalLM if w.task == "clm" else AutoModelForMaskedLM).from_config(config)
    per_token = flops_per_token(model, w.seq) or 0.0
    n_params = sum(p.numel() for p in model.parameters())
    peak = args.peak_flops or peak_flops(None) or float("nan")  # nan on the CPU (--smoke): MFU n/a
    base = next(r.tokens_per_sec for r in rows if r.side == "HF Trainer")
    header = ["side", "tokens/s", "MFU", "data wait", "peak memory (GiB)", "vs HF Trainer"]
    body = [[r.side, f"{r.tokens_per_sec:,.0f}", f"{per_token * r.tokens_per_sec / peak:.1%}", f"{r.data_wait:.1%}",
             f"{r.peak_mem_gb:.1f}", f"{r.tokens_per_sec / base:.2f}x"] for r in rows]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    title = (f"{w.name}: N = {n_params / 1e6:.1f}M (vocab {config.vocab_size}), sequence {w.seq}, batch {w.batch}, "
             f"bf16 mixed, {args.steps} steps (first {args.warmup} not timed); "
             f"{per_token / 1e9:.3f} GFLOP/token; peak {peak / 1e12:.0f} TFLOP/s ({device})")
    return title + "\n\n" + table(header, body, args.markdown is not None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", default="gpt2,bert", help="comma-separated subset of gpt2,bert")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="a .txt corpus; when it is missing, lmlab's offline default (data=bbc_news)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=40, help="steps left out of the timing (compilation)")
    parser.add_argument("--log-every", type=int, default=50, help="both sides; 50 is trainer=gpu's default")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--beta2", type=float, default=0.95)
    parser.add_argument("--warmup-steps", type=int, default=20, help="learning-rate warmup")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled sides")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s (default: lmlab.flops.PEAK_FLOPS by GPU name)")
    parser.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, runs)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the plumbing on the CPU: tiny models, no compiled sides; figures meaningless")
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.compile = False  # inductor on a CPU takes minutes and says nothing about the GPU
    if args.steps - args.warmup < 10:
        parser.error("--steps must leave at least 10 timed steps after --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_worker)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_mfu.py needs a CUDA GPU; none is visible here (--smoke checks the script on the CPU).",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lmlab-gpu-mfu-"))
    env = {**os.environ, "LMLAB_HOME": str(work / "home"), "LMLAB_CACHE_DIR": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
           "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    env.pop("MLFLOW_TRACKING_URI", None)
    data = [f"data.path={args.data}"] if args.data.exists() else ["data=bbc_news"]
    print(f"work directory {work}; data {data[0]}; lmlab command {' '.join(lmlab_command())}", flush=True)
    sections = []
    try:
        for key in [k.strip() for k in args.only.split(",") if k.strip()]:
            if key not in WORKLOADS:
                raise SystemExit(f"--only: unknown '{key}' (use gpt2, bert)")
            workload = smoke_workload(WORKLOADS[key]) if args.smoke else WORKLOADS[key]
            sections.append(measure(workload, args, work, env, data))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"{stamp}\n\n" + "\n\n".join(sections)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
        print(f"\nmarkdown written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
