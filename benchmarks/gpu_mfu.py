"""MFU on one GPU: GPT-2 124M and BERT-base MLM through lmlab and through the Hugging Face Trainer.

    python benchmarks/gpu_mfu.py                         # both models, every side, ~15 min on an H100
    python benchmarks/gpu_mfu.py --only gpt2 --sides lmlab,hf --steps 200 --markdown /tmp/gpu.md
    python benchmarks/gpu_mfu.py --from-rows rows.jsonl --markdown table.md   # the tables again, no GPU

Models and settings (the issue's): GPT-2 124M (12 x 768) at sequence 1024, batch 16; BERT-base
(12 x 768) masked-LM at sequence 512, batch 64 (15% masking, 80/10/10); bf16 mixed precision, AdamW
(fused), one GPU. Sides (``--sides``: a comma-separated list of these names, run in that order;
default: all, in this order), each in its own process:

* ``lmlab``: the ``lmlab`` command (``trainer=gpu``), as it ships; ``lmlab-compile``: with
  ``model.compile=true``; for GPT-2 also ``lmlab-plainloss`` (``model.fused_loss=false``, the plain
  logits loss) and ``lmlab-compile-plainloss`` (compiled: the model and its cross-entropy in one
  graph). Each is an entry of ``LMLAB_SIDES``: a table label and the overrides added to the command,
  so a new lmlab variant is one line there;
* ``hf`` / ``hf-compile``: ``GPT2LMHeadModel`` / ``BertForMaskedLM`` from the same config, fresh weights
  from the same seed, trained with ``Trainer`` (``bf16=True``, otherwise the defaults), and with
  ``torch_compile=True``. It reads the very blocks lmlab packed and lmlab's tokenizer (the export of
  the workload's first lmlab run: an HF side asked for before every lmlab side makes the first lmlab
  side run first, and with no lmlab side at all a 2-step untimed lmlab run makes them); BERT's
  masking is ``DataCollatorForLanguageModeling(mlm_probability=0.15)``.

Both sides use lmlab's own tokenizers, trained on the corpus (a byte-level BPE of up to 50,257
tokens for GPT-2, so the model is GPT-2 124M's shape; a 30,522-token WordPiece for BERT); N in the
table is the parameter count of the model actually trained.

Reported per side: steady-state tokens/s (the steps after ``--warmup``, timed from the end of one
step to the end of another with the GPU synchronised at both ends), MFU = (6N + 12·L·H·Q·T) x
tokens/s / peak (peak: ``lmlab.flops.PEAK_FLOPS`` by GPU name, or ``--peak-flops``), the data wait
(the GPU's idle time between the end of one step and the start of the next, where the next batch is
fetched and copied in, timed by CUDA events on the stream, over the timed wall time; ``DeviceGaps``
says why the host's clock cannot tell it), the host gap (the host's time between steps: the batch,
the logging, and the GPU's backlog at each sync), peak GPU memory (``torch.cuda.max_memory_allocated``)
and the ratio to the HF Trainer with its defaults. Under ``--smoke`` the data wait is the host gap.

Each finished side is one JSON object, printed and (``--rows PATH``) appended to PATH as one line at
once, so a run stopped part-way (a time limit on a lent GPU) keeps what it measured; ``--from-rows``
makes the tables from such a file. ``--keep-going`` records a failed side and goes on to the next.
``--cache DIR`` keeps the trained tokenizers and packed blocks between runs.

It needs a CUDA GPU for its figures. ``--smoke`` runs the same code on the CPU with tiny models, bf16
autocast and a few steps: its numbers mean nothing, but every side, the probes and the table are exercised
(tests/test_benchmarks.py does so), so a GPU session's device time is not spent on plumbing.
benchmarks/device/ carries it to a lent GPU that lacks lmlab's packages (see benchmarks/README.md).
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
from typing import Any, Callable, NamedTuple

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


class LmlabSide(NamedTuple):
    """The ``lmlab`` command with ``overrides`` added; ``label`` names its row in the table."""

    label: str
    overrides: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("clm", "mlm")  # the workloads (lmlab tasks) it applies to

    @property
    def compiled(self) -> bool:  # left out under --no-compile and --smoke
        return "model.compile=true" in self.overrides


class HfSide(NamedTuple):
    label: str
    torch_compile: bool
    # stock: the model as Hugging Face's config class defines it rather than lmlab's export: the
    # tokenizer's vocabulary unpadded (50,257, not lmlab's 50,304) and the class's default dropout
    # (0.1 for GPT-2, where lmlab pretrains without). What a run_clm user trains by default.
    stock: bool = False


# The named sides, in the default order. Names are stable: device scripts and result files use them.
LMLAB_SIDES: dict[str, LmlabSide] = {
    "lmlab": LmlabSide("lmlab"),
    "lmlab-compile": LmlabSide("lmlab (model.compile=true)", ("model.compile=true",)),
    # Which loss wins on a GPU is for this table to say: the chunked loss (eager) saves the logits'
    # memory, the compiled plain loss lets the compiler fuse the float32 log-softmax over them.
    "lmlab-plainloss": LmlabSide("lmlab (model.fused_loss=false)", ("model.fused_loss=false",), ("clm",)),
    "lmlab-compile-plainloss": LmlabSide("lmlab (compile, fused_loss=false)",
                                         ("model.compile=true", "model.fused_loss=false"), ("clm",)),
}
HF_SIDES: dict[str, HfSide] = {
    "hf": HfSide("HF Trainer", torch_compile=False),  # the baseline of the "vs HF Trainer" column
    "hf-compile": HfSide("HF Trainer (torch_compile)", torch_compile=True),
    "hf-stock": HfSide("HF Trainer (stock config: dropout, vocab unpadded)", torch_compile=False, stock=True),
}
SIDES = [*LMLAB_SIDES, *HF_SIDES]


# =================================================================================================
# Measuring inside the child processes
# =================================================================================================


def device_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class DeviceGaps:
    """The GPU's idle time between one step's end and the next one's start: the data wait.

    The host's clock cannot tell it. The host runs ahead of the GPU and catches up at every sync (a
    logging step's ``.item()``), so the host time between steps also holds the GPU's backlog at those
    syncs, and a host that waits for data while the GPU still works through earlier steps costs the
    GPU nothing. A CUDA event recorded at each step's end and one at the next step's start run on
    the GPU's stream: the time between them is time the GPU had nothing queued (or was copying the
    batch in), and recording them never syncs. Read after a ``device_sync``; None on a CPU.
    """

    def __init__(self) -> None:
        import torch

        self.events = torch.cuda if torch.cuda.is_available() else None
        self.pairs: list[tuple[Any, Any]] = []
        self.last_end: Any = None

    def step_start(self, timed: bool) -> None:
        if self.events is not None and self.last_end is not None and timed:
            start = self.events.Event(enable_timing=True)
            start.record()
            self.pairs.append((self.last_end, start))

    def step_end(self) -> None:
        if self.events is not None:
            self.last_end = self.events.Event(enable_timing=True)
            self.last_end.record()

    def seconds(self) -> list[float] | None:
        if self.events is None:
            return None
        return [end.elapsed_time(start) / 1000 for end, start in self.pairs]


def peak_memory() -> int:
    """Peak GPU memory allocated; under --smoke on the CPU, the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name() -> str:
    # Asked in the children, which hold a CUDA context anyway: the driver process never opens one.
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


# The lmlab command with a probe callback added to its Trainer: it writes step times, the host gaps
# between steps, the peak GPU memory, the device and the training blocks' file to LMLAB_BENCH_OUT
# when training ends.
LMLAB_STUB = """
import json, os, sys, time
import lightning as L
sys.path.insert(0, os.environ["LMLAB_BENCH_DIR"])
from cpu_vs_hf_trainer import lmlab_main_with
from gpu_mfu import DeviceGaps, device_sync as sync, device_name, peak_memory

class Probe(L.Callback):
    def __init__(self):
        self.warmup = int(os.environ["LMLAB_BENCH_WARMUP"])
        self.ends, self.gaps, self.last_end, self.steps = [], [], None, 0
        self.device_gaps = DeviceGaps()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.device_gaps.step_start(self.steps >= self.warmup)
        if self.last_end is not None and self.steps >= self.warmup:
            self.gaps.append(time.perf_counter() - self.last_end)
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1
        self.device_gaps.step_end()
        if self.steps == self.warmup or self.steps == trainer.max_steps:
            sync()
        self.last_end = time.perf_counter()
        if self.steps >= self.warmup:
            self.ends.append(self.last_end)
    def on_train_end(self, trainer, pl_module):
        sync()
        # The file of the blocks this run trained on, which the HF sides then read. A persistent
        # cache may hold blocks of other corpora, so "the newest in the cache" could be wrong; None
        # (lmlab's datamodule built differently one day) makes the driver fall back to it anyway.
        splits = getattr(trainer.datamodule, "splits", None) or {}
        arrays = getattr(splits.get("train"), "arrays", None) or {}
        blocks = getattr(arrays.get("input_ids"), "filename", None)
        with open(os.environ["LMLAB_BENCH_OUT"], "w") as out:
            json.dump({"ends": self.ends, "gaps": self.gaps, "idle": self.device_gaps.seconds(),
                       "peak_mem": peak_memory(), "device": device_name(),
                       "blocks": None if blocks is None else str(blocks)}, out)

lmlab_main_with(Probe())
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
            self.device_gaps = DeviceGaps()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.device_gaps.step_start(state.global_step >= p["warmup"])
            if self.last_end is not None and state.global_step >= p["warmup"]:
                self.gaps.append(time.perf_counter() - self.last_end)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.device_gaps.step_end()
            if state.global_step in (p["warmup"], p["steps"]):
                device_sync()
            self.last_end = time.perf_counter()
            if state.global_step >= p["warmup"]:
                self.ends.append(self.last_end)

    tokenizer = AutoTokenizer.from_pretrained(p["export"])
    config = AutoConfig.from_pretrained(p["export"])
    if p.get("stock"):
        defaults = type(config)()
        config.vocab_size = len(tokenizer)
        for key in ("embd_pdrop", "resid_pdrop", "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(defaults, key):
                setattr(config, key, getattr(defaults, key))
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
    # The facts of the model trained here: hf-stock's differs from lmlab's export (vocabulary, N).
    Path(p["result"]).write_text(json.dumps({"ends": probe.ends, "gaps": probe.gaps, "idle": probe.device_gaps.seconds(),
                                               "peak_mem": peak_memory(),
                                               "device": device_name(), "facts": facts_of(model, blocks.shape[1])}))


# =================================================================================================
# Driver
# =================================================================================================


def summarise(record: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """A child's probe record -> the measured fields of a row."""
    ends = record["ends"]
    span = ends[-1] - ends[0]
    host_gap = sum(record["gaps"]) / span
    # On a GPU the data wait is the device's idle time between steps (DeviceGaps); on the CPU, where
    # nothing runs ahead, the host's time between steps.
    idle = record.get("idle")
    return {"tokens_per_sec": (len(ends) - 1) * tokens_per_step / span,
            "data_wait": host_gap if idle is None else sum(idle) / span, "host_gap": host_gap,
            "peak_mem_gb": record["peak_mem"] / 2**30, "device": record.get("device", "?"),
            "facts": record.get("facts") or {}}


def lmlab_overrides(w: Workload, args: argparse.Namespace, data: list[str], extra: list[str] | tuple[str, ...],
                    steps: int | None = None, export: bool = True) -> list[str]:
    device = ["model.size=tiny", "trainer=cpu"] if args.smoke else ["model.size=base", "trainer=gpu", "trainer.devices=1"]
    steps = steps or args.steps
    warmup_steps = args.warmup_steps if args.warmup_steps < steps else 0  # a 2-step preparation run
    return [
        f"task={w.task}", f"model={w.model}", *device, "trainer.precision=bf16-mixed", *data,
        f"data.block_size={w.seq}", f"data.batch_size={w.batch}",
        f"tokenizer.vocab_size={w.vocab}", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
        f"trainer.log_every_n_steps={args.log_every}", "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=0", f"export={str(export).lower()}", f"optimizer.lr={args.lr}",
        f"optimizer.betas=[0.9,{args.beta2}]", "optimizer.weight_decay=0.01", "scheduler=cosine",
        f"scheduler.warmup_steps={warmup_steps}", "scheduler.min_lr_ratio=0.1", f"seed={args.seed}", *extra,
    ]


def run_lmlab(w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], data: list[str],
              name: str, export: bool) -> tuple[dict[str, Any], str | None]:
    """One lmlab side: (its measured fields, the file of the blocks it trained on, when known)."""
    out = work / f"{w.model}-{name}.json"
    child_env = {**env, "LMLAB_BENCH_OUT": str(out), "LMLAB_BENCH_WARMUP": str(args.warmup),
                 "LMLAB_BENCH_DIR": str(HERE)}
    overrides = lmlab_overrides(w, args, data, LMLAB_SIDES[name].overrides, export=export)
    run_child([sys.executable, "-c", LMLAB_STUB, *overrides], child_env, work / f"{w.model}-{name}.log")
    record = json.loads(out.read_text())
    return summarise(record, w.seq * w.batch), record.get("blocks")


def prepare(w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], data: list[str]) -> None:
    """An untimed 2-step lmlab run: the tokenizer, the packed blocks and the export the HF sides read."""
    print(f"  {w.name}: a 2-step lmlab run prepares the HF sides' data", flush=True)
    run_child([*lmlab_command(), *lmlab_overrides(w, args, data, [], steps=2)],
              env, work / f"{w.model}-prepare.log")


def run_hf(w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], export: Path, blocks: Path,
           name: str) -> dict[str, Any]:
    tag = f"{w.model}-{name}"
    params = {"task": w.task, "export": str(export), "blocks": str(blocks), "steps": args.steps, "batch": w.batch,
              "lr": args.lr, "beta2": args.beta2, "warmup_steps": args.warmup_steps, "warmup": args.warmup,
              "log_every": args.log_every, "seed": args.seed, "torch_compile": HF_SIDES[name].torch_compile,
              "stock": HF_SIDES[name].stock,
              "output_dir": str(work / f"{tag}-out"), "result": str(work / f"{tag}.json")}
    path = work / f"{tag}-params.json"
    path.write_text(json.dumps(params))
    run_child([sys.executable, __file__, "--hf-worker", str(path)], env, work / f"{tag}.log")
    return summarise(json.loads(Path(params["result"]).read_text()), w.seq * w.batch)


def newest(home: Path, pattern: str) -> Path:
    found = sorted(home.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {home}/{pattern}")
    return found[-1]


def model_facts(w: Workload, export: Path) -> dict[str, Any]:
    """N, the vocabulary and the training FLOPs per token of the model the export describes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(export)
    return facts_of((AutoModelForCausalLM if w.task == "clm" else AutoModelForMaskedLM).from_config(config), w.seq)


def facts_of(model: Any, seq: int) -> dict[str, Any]:
    """N, the vocabulary and the training FLOPs per token of MODEL at sequence SEQ."""
    from lmlab.flops import flops_per_token

    return {"n_params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size,
            "flop_per_token": flops_per_token(model, seq) or 0.0}


def peak_for(device: str, args: argparse.Namespace) -> float | None:
    """--peak-flops, else lmlab.flops.PEAK_FLOPS by GPU name; None on the CPU (--smoke: MFU n/a)."""
    from lmlab.flops import peak_flops_of

    return args.peak_flops or peak_flops_of(device, "bf16-mixed")  # every side trains in bf16 autocast


def applies(name: str, w: Workload, args: argparse.Namespace) -> str | None:
    """Why side NAME is left out for W, or None when it runs."""
    if name in LMLAB_SIDES:
        side = LMLAB_SIDES[name]
        if w.task not in side.tasks:
            return f"only for task {'/'.join(side.tasks)}"
        compiled = side.compiled
    else:
        compiled = HF_SIDES[name].torch_compile
    if compiled and not args.compile:
        return "compiled sides are off (--no-compile or --smoke)"
    return None


def plan(names: list[str]) -> list[str]:
    """The order to run NAMES in.

    An HF side reads the export (tokenizer, config.json) and the packed blocks of an lmlab run of the
    same workload. When an HF side comes before every lmlab side, the first lmlab side moves to the
    front (no extra run); when no lmlab side is asked for, measure() has prepare() make them.
    """
    first_hf = next((i for i, n in enumerate(names) if n in HF_SIDES), None)
    first_lmlab = next((i for i, n in enumerate(names) if n in LMLAB_SIDES), None)
    if first_hf is None or first_lmlab is None or first_lmlab < first_hf:
        return names
    return [names[first_lmlab], *names[:first_lmlab], *names[first_lmlab + 1:]]


def measure(key: str, w: Workload, args: argparse.Namespace, work: Path, env: dict[str, str], data: list[str],
            emit: Callable[[dict[str, Any]], None]) -> None:
    """Runs the workload's sides one by one; emit() receives each row as soon as its side ends."""
    names = []
    for name in args.sides:
        why = applies(name, w, args)
        if why:
            print(f"  {w.name}: {name} left out ({why})", flush=True)
        else:
            names.append(name)
    order = plan(names)
    if order != names:
        print(f"  {w.name}: {order[0]} runs first: the HF sides read its export and blocks", flush=True)
    home, cache = Path(env["LMLAB_HOME"]), Path(env["LMLAB_CACHE_DIR"])
    inputs: dict[str, Any] = {}  # export, blocks and model facts, from the first lmlab run that finishes

    def take_inputs(blocks: str | None) -> None:
        export = newest(home, f"runs/*_{w.task}_{w.model}/export/config.json").parent
        inputs.update(export=export, facts=model_facts(w, export),
                      blocks=Path(blocks) if blocks else newest(cache, f"data/{w.packing}-{w.seq}-*/train.input_ids.npy"))

    for name in order:
        started = time.perf_counter()
        label = LMLAB_SIDES[name].label if name in LMLAB_SIDES else HF_SIDES[name].label
        row: dict[str, Any] = {"workload": key, "model": w.name, "side": name, "label": label, "seq": w.seq,
                               "batch": w.batch, "steps": args.steps, "warmup": args.warmup}
        try:
            if name in LMLAB_SIDES:
                # Only the run that provides the HF sides' inputs exports (~0.5 GB for GPT-2 124M).
                provider = "facts" not in inputs
                measured, blocks = run_lmlab(w, args, work, env, data, name, export=provider)
                if provider:
                    take_inputs(blocks)
            else:
                if "export" not in inputs and not inputs.get("prepared"):
                    # No lmlab side was asked for, or the one meant to make the inputs failed
                    # (--keep-going): the plain command makes them, tried once per workload.
                    inputs["prepared"] = True
                    prepare(w, args, work, env, data)
                    take_inputs(None)
                if "export" not in inputs:
                    raise SystemExit("no lmlab export to read: the lmlab runs that make it failed")
                measured = run_hf(w, args, work, env, inputs["export"], inputs["blocks"], name)
            peak = peak_for(measured["device"], args)
            facts = {**inputs.get("facts", {}), **measured.pop("facts", {})}  # the side's own model, where it says
            mfu = facts["flop_per_token"] * measured["tokens_per_sec"] / peak if peak and facts else None
            row.update(**facts, **measured, peak_flops=peak, mfu=mfu)
            mfu_text = "n/a" if mfu is None else f"{mfu:.1%}"
            print(f"  {w.name}: {label} {measured['tokens_per_sec']:,.0f} tokens/s, MFU {mfu_text} "
                  f"(load {load()})", flush=True)
        except (SystemExit, Exception) as exc:  # SystemExit: run_child's report, with the log's tail
            if not args.keep_going:
                raise
            text = str(exc) if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            print(f"  {w.name}: {label} FAILED (--keep-going: on to the next side)\n{text}", flush=True)
            row.update(**inputs.get("facts", {}), error=text[-2000:])
        row.update(wall_s=round(time.perf_counter() - started, 1), time=dt.datetime.now().isoformat(timespec="seconds"))
        emit(row)


def tables(rows: list[dict[str, Any]], markdown: bool) -> str:
    """One table per workload, in the order the rows came; also for rows read back with --from-rows."""
    sections = []
    for key in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == key]
        done = [r for r in group if "error" not in r]
        base = next((r["tokens_per_sec"] for r in done if r["side"] == "hf"), None)
        header = ["side", "tokens/s", "MFU", "data wait", "host gap", "peak memory (GiB)", "vs HF Trainer"]
        body = []
        for r in group:
            if "error" in r:
                body.append([r["label"], "failed", "", "", "", "", ""])
                continue
            body.append([r["label"], f"{r['tokens_per_sec']:,.0f}", "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}",
                         f"{r['data_wait']:.1%}", f"{r['host_gap']:.1%}" if "host_gap" in r else "n/a",
                         f"{r['peak_mem_gb']:.1f}",
                         f"{r['tokens_per_sec'] / base:.2f}x" if base else "n/a"])
        first = next((r for r in done if "n_params" in r), group[0])
        if "n_params" in first:
            peak = first.get("peak_flops")
            peak_text = f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known: MFU n/a"
            title = (f"{first['model']}: N = {first['n_params'] / 1e6:.1f}M (vocab {first['vocab']}), sequence "
                     f"{first['seq']}, batch {first['batch']}, bf16 mixed, {first['steps']} steps (first "
                     f"{first['warmup']} not timed); {first['flop_per_token'] / 1e9:.3f} GFLOP/token; {peak_text} "
                     f"({first.get('device', '?')})")
        else:
            title = f"{first['model']}: no side finished"
        notes = [f"{r['label']} failed: {r['error'].strip().splitlines()[0]}" for r in group if "error" in r]
        parts = [title, table(header, body, markdown)]
        if notes:
            parts.append("\n".join(notes))
        sections.append("\n\n".join(parts))
    return "\n\n".join(sections)


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short when a time limit killed the writer
            print(f"{path}:{number}: not a JSON row, skipped", file=sys.stderr)
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"\n{stamp}\n\n" + tables(rows, markdown=False))
    if args.markdown:
        args.markdown.write_text(f"{stamp}\n\n" + tables(rows, markdown=True) + "\n")
        print(f"\nmarkdown written to {args.markdown}")


def names_list(parser: argparse.ArgumentParser, option: str, text: str, known: list[str]) -> list[str]:
    """A comma-separated option -> its names, in order, once each; unknown names are an error."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"{option}: unknown or empty {','.join(unknown)!r} (choose from {','.join(known)})")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", default="gpt2,bert", help="comma-separated subset of gpt2,bert")
    parser.add_argument("--sides", default=",".join(SIDES),
                        help="comma-separated sides, run in this order (sides that do not apply to a model, "
                             "e.g. the fused_loss ones to BERT, or compiled ones under --no-compile, are left out)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="a .txt corpus; when it is missing, lmlab's offline default (data=bbc_news)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=40, help="steps left out of the timing (compilation)")
    parser.add_argument("--log-every", type=int, default=50, help="both sides; 50 is trainer=gpu's default")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--beta2", type=float, default=0.95)
    parser.add_argument("--warmup-steps", type=int, default=20, help="learning-rate warmup")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="the compiled sides (--no-compile skips them)")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s (default: lmlab.flops.PEAK_FLOPS by GPU name)")
    parser.add_argument("--markdown", type=Path, help="also write the tables as markdown to this file")
    parser.add_argument("--rows", type=Path, help="append each finished side's row to this file, one JSON per line")
    parser.add_argument("--from-rows", type=Path, help="only print (and --markdown) the tables of a --rows file")
    parser.add_argument("--keep-going", action="store_true", help="a failed side becomes a 'failed' row, not the end")
    parser.add_argument("--cache", type=Path, help="LMLAB_CACHE_DIR (tokenizers, packed blocks), kept; "
                                                    "default: inside the work directory")
    parser.add_argument("--work", type=Path, help="work directory (runs, logs), kept; default: a temporary one")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, runs)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the plumbing on the CPU: tiny models, no compiled sides; figures meaningless")
    parser.add_argument("--hf-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = names_list(parser, "--only", args.only, list(WORKLOADS))
    args.sides = names_list(parser, "--sides", args.sides, SIDES)
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
    if args.from_rows:
        rows = read_rows(args.from_rows)
        if not rows:
            print(f"{args.from_rows}: no rows", file=sys.stderr)
            return 1
        report(rows, args)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_mfu.py needs a CUDA GPU; none is visible here (--smoke checks the script on the CPU).",
              file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="lmlab-gpu-mfu-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or work / "cache"
    env = {**os.environ, "LMLAB_HOME": str(work / "home"), "LMLAB_CACHE_DIR": str(cache),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true",
           "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    env.pop("MLFLOW_TRACKING_URI", None)
    data = [f"data.path={args.data}"] if args.data.exists() else ["data=bbc_news"]
    print(f"work directory {work}; cache {cache}; data {data[0]}; sides {','.join(args.sides)}; "
          f"lmlab command {' '.join(lmlab_command())}", flush=True)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        line = json.dumps(row)
        print(f"row {line}", flush=True)
        if args.rows:  # appended and closed at once: a later kill cannot take this row with it
            with args.rows.open("a") as out:
                out.write(line + "\n")

    try:
        for key in args.only:
            workload = smoke_workload(WORKLOADS[key]) if args.smoke else WORKLOADS[key]
            measure(key, workload, args, work, env, data, emit)
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)
    if rows:
        report(rows, args)
    else:
        print("\nno side ran (every side asked for was left out)")
    failed = [r["label"] for r in rows if "error" in r]
    if failed:
        print(f"\n{len(failed)} side(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
