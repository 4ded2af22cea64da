"""A catalogue of bad inputs: config keys and values, data files, model/tokenizer/checkpoint paths
and plugin failures. Each must end in one clear error that names the key or the file (and line),
leave no half-written file behind and no MLflow run RUNNING.

Most cases compose the config as ``lmlab OVERRIDES`` would and call ``lmlab.train.run``; mistakes
Hydra itself rejects are checked at composition; a handful go through the real ``lmlab`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import TINY, WIKI, compose_cfg, lmlab_command
from lmlab import registry
from lmlab.errors import LmlabError
from lmlab.paths import is_local_reference
from lmlab.train import run


# -- the files the cases point at -----------------------------------------------------------------
def _conll(sentences: list[list[tuple[str, str]]]) -> str:
    return "\n\n".join("\n".join(f"{tok}\t{tag}" for tok, tag in s) for s in sentences) + "\n"


GOOD_NER = [[("Alice", "B-PER"), ("lives", "O"), ("in", "O"), ("Paris", "B-LOC"), (".", "O")],
            [("Bob", "B-PER"), ("Smith", "I-PER"), ("visited", "O"), ("Rome", "B-LOC")],
            [("Nothing", "O"), ("here", "O"), ("at", "O"), ("all", "O")]] * 12
# A model folder whose config asks for its own Python classes (trust_remote_code).
REMOTE = {"AutoConfig": "custom.Config", "AutoTokenizer": ["custom.Tokenizer", None]}
GOOD_ROWS = [("a fine and moving film", "pos"), ("dull, long and pointless", "neg"),
             ("the best thing this year", "pos"), ("I want my money back", "neg")] * 15


def _csv(rows: list[tuple[str, str]], header: str = "text,label") -> str:
    return header + "\n" + "".join(f'"{text}",{label}\n' for text, label in rows)


def make_files(d: Path) -> None:
    """Every file and folder the cases refer to, written once per module under ``d``."""
    wiki = WIKI.read_text(encoding="utf-8").splitlines()[:300]
    files: dict[str, bytes] = {
        "wiki.txt": ("\n".join(wiki) + "\n").encode(),
        "empty.txt": b"\n   \n\n",
        "latin1.txt": ("\n".join(wiki[:50]) + "\nun caf\u00e9 cr\u00e8me\n").encode("latin-1", "replace"),
        "broken.jsonl": b'{"text": "A first document."}\n{"text": "unterminated}\n',
        "no_text.jsonl": b'{"text": "A first document."}\n{"text": "A second."}\n{"body": "no text here"}\n',
        "array.jsonl": b'["a list, not an object"]\n',
        "number_text.jsonl": b'{"text": "A first document."}\n{"text": 5}\n',
        "notes.xml": b"<notes/>\n",
        "ner_columns/train.conll": _conll(GOOD_NER).encode() + b"Lonely\n",
        "ner_tag/train.conll": _conll(GOOD_NER[:4]).replace("B-LOC", "BLOC", 1).encode(),
        "ner_unknown/train.conll": _conll(GOOD_NER).encode(),
        "ner_unknown/validation.conll": _conll([[("Mars", "B-PLANET"), ("is", "O"), ("red", "O")]]).encode(),
        "ner_lengths.jsonl": (json.dumps({"tokens": ["a", "b"], "tags": ["O", "O"]}) + "\n"
                              + json.dumps({"tokens": ["a", "b", "c"], "tags": ["O"]}) + "\n").encode(),
        "ner_empty_dir/readme.md": b"no train file here\n",
        "ner_fields.jsonl": (json.dumps({"words": ["a", "b"], "labels": ["O", "O"]}) + "\n").encode(),
        "cls_column/train.csv": _csv(GOOD_ROWS, header="text,category").encode(),
        "cls_unknown/train.csv": _csv(GOOD_ROWS).encode(),
        "cls_unknown/validation.csv": _csv([("a film about films", "meh")] + GOOD_ROWS[:4]).encode(),
        "cls_empty_text/train.csv": _csv(GOOD_ROWS[:5] + [("", "pos")] + GOOD_ROWS).encode(),
        "no_config_model/weights.bin": b"not a model",
        "bad_config_model/config.json": b'{"model_type": "gpt2", "n_layer": ',
        "bert_model/config.json": json.dumps({"model_type": "bert"}).encode(),
        "custom_code_model/config.json": json.dumps({"model_type": "custom", "auto_map": REMOTE}).encode(),
        "custom_code_model/tokenizer_config.json": json.dumps({"auto_map": REMOTE}).encode(),
        "not_a_run/notes.txt": b"just a folder\n",
        "garbage.ckpt": b"this is not a checkpoint at all\n" * 10,
        "no_text_files/readme.md": b"nothing to read\n",
    }
    for rel, content in files.items():
        path = d / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    _real_bert(d / "real_bert")
    # A torch checkpoint cut off mid-write (what a kill without atomic writes would leave).
    whole = d / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "global_step": 3}, whole)
    (d / "truncated.ckpt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    # A run directory whose run finished at step 3.
    finished = d / "finished_run"
    (finished / "checkpoints").mkdir(parents=True)
    shutil.copy(whole, finished / "checkpoints" / "last.ckpt")
    (finished / "lmlab_run.json").write_text(json.dumps({"status": "finished", "task": "clm", "model": "gpt2"}))


def _real_bert(where: Path) -> None:
    """A tiny but complete BERT model directory (config, weights, tokenizer)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    where.mkdir(parents=True)
    vocab = where / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "film"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(where))
    config = BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    BertForMaskedLM(config).save_pretrained(str(where))


# -- the catalogue --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bad:
    """Overrides and the words the error must contain; ``{d}`` is the files' folder."""

    overrides: list[str]
    names: list[str]
    stage: str = "run"  # "compose": Hydra rejects it while composing the config
    data: str = "data.path={d}/wiki.txt"  # replaced when the case names its own data
    setup: Callable[[Path], None] | None = None
    extra: list[str] = field(default_factory=list)


NER = ["task=ner", "model=bert", "tokenizer.vocab_size=400"]
CLS = ["task=classification", "model=bert", "tokenizer.vocab_size=400"]

CASES: dict[str, Bad] = {
    # config: groups and keys Hydra refuses
    "unknown_task_option": Bad(["task=nope"], ["task/nope"], "compose"),
    "unknown_model_option": Bad(["model=nope"], ["model/nope"], "compose"),
    "unknown_trainer_option": Bad(["trainer=tpu9"], ["trainer/tpu9"], "compose"),
    "unknown_trainer_key": Bad(["trainer.bogus=1"], ["trainer.bogus"], "compose"),
    "misspelt_optimizer_key": Bad(["optimizer.lrr=0.1"], ["optimizer.lrr"], "compose"),
    "unknown_top_level_key": Bad(["bogus_setting=1"], ["bogus_setting"], "compose"),
    # config: values
    "negative_lr": Bad(["optimizer.lr=-1"], ["optimizer.lr", "-1"]),
    "zero_lr": Bad(["optimizer.lr=0"], ["optimizer.lr", "not positive"]),
    "lr_not_a_number": Bad(["optimizer.lr=fast"], ["optimizer.lr", "fast"]),
    "block_beyond_positions": Bad(["data.block_size=100000"], ["data.block_size", "100000", "n_positions"]),
    "block_too_short": Bad(["data.block_size=4"], ["data.block_size", "4"]),
    "block_not_a_number": Bad(["data.block_size=big"], ["data.block_size", "big"]),
    "zero_batch": Bad(["data.batch_size=0"], ["data.batch_size", "0"]),
    "negative_batch": Bad(["data.batch_size=-3"], ["data.batch_size", "-3"]),
    # a plugin's data file without it: a KeyError once the MLflow run was open (left FAILED)
    "no_batch_size": Bad(["~data.batch_size"], ["data.batch_size", "is not set", "batch_size: 16"]),
    "bad_mode": Bad(["mode=train"], ["mode", "train"]),
    # what a config file of the user's own can bring in (Hydra refuses these only on the command line)
    "file_misspelt_data_key": Bad(["+data.val_fracton=0.02"], ["data.val_fracton", "data.val_fraction"]),
    "file_misspelt_task_key": Bad(["task=mlm", "+task.mlm_probabilty=0.3"],
                                  ["task.mlm_probabilty", "task.mlm_probability"]),
    "file_misspelt_model_key": Bad(["+model.sise=small"], ["model.sise", "model.size"]),
    "file_unknown_optimizer_key": Bad(["+optimizer.learning_rate=0.5"], ["optimizer.learning_rate", "betas, eps, lr"]),
    "test_without_model": Bad(["mode=test"], ["model.pretrained", "mode=test"]),
    "unknown_schedule": Bad(["scheduler.name=zigzag"], ["scheduler.name", "zigzag"]),
    "negative_warmup": Bad(["scheduler.warmup_ratio=-0.5"], ["scheduler.warmup_ratio", "-0.5"]),
    "zero_log_interval": Bad(["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps", "0 is not positive"]),
    "bad_checkpoint_mode": Bad(["checkpoint.mode=sideways"], ["checkpoint.mode", "sideways"]),
    "misspelt_checkpoint_monitor": Bad(["checkpoint.monitor=val/los", "checkpoint.mode=min"],
                                       ["checkpoint.monitor", "val/los", "val/loss"]),
    "monitor_without_direction": Bad(["checkpoint.monitor=val/custom"], ["checkpoint.mode", "val/custom", "val/loss"]),
    "negative_checkpoint_interval": Bad(["checkpoint.every_n_steps=-1"], ["checkpoint.every_n_steps", "-1"]),
    "checkpoint_interval_not_a_number": Bad(["checkpoint.every_n_steps=often"], ["checkpoint.every_n_steps", "often"]),
    "unknown_nonfinite_policy": Bad(["faults.nonfinite=ignore"], ["faults.nonfinite", "ignore"]),
    "zero_check_interval": Bad(["faults.check_every_n_steps=0"], ["faults.check_every_n_steps", "not positive"]),
    "bad_precision": Bad(["trainer.precision=banana"], ["trainer", "banana"]),
    "max_steps_not_a_number": Bad(["trainer.max_steps=many"], ["trainer.max_steps", "many"]),
    # read deep inside (effective batch, the throughput callback, AdamW): a ValueError/IndexError there
    "devices_not_a_number": Bad(["trainer.devices=two"], ["trainer.devices", "'two'", "trainer.devices=2"]),
    "devices_zero": Bad(["trainer.devices=0"], ["trainer.devices", "'0'"]),
    "peak_flops_not_a_number": Bad(["perf.peak_flops=lots"], ["perf.peak_flops", "lots"]),
    "betas_one_value": Bad(["optimizer.betas=[0.9]"], ["optimizer.betas", "[0.9]", "optimizer.betas=[0.9,0.95]"]),
    "beta_of_one": Bad(["optimizer.betas=[0.9,1.0]"], ["optimizer.betas", "up to (not including) 1"]),
    "negative_eps": Bad(["optimizer.eps=-1e-8"], ["optimizer.eps", "below 0"]),
    # a LookupError traceback from the first file read; the fallback's only once a file needs it
    "unknown_encoding": Bad(["data.encoding=utf-9"], ["data.encoding", "'utf-9'", "data.encoding=utf-8"]),
    "unknown_fallback_encoding": Bad(["data.encoding_fallback=win-1252"],
                                     ["data.encoding_fallback", "'win-1252'", "cp1252"]),
    "mlm_probability_not_a_number": Bad(["task=mlm", "task.mlm_probability=most"],
                                        ["task.mlm_probability", "'most' is not a number", "0.15"]),
    # read only by the test's sample table and generate(), after the training they would cost
    "log_samples_not_a_number": Bad(["task=summarization", "task.log_samples=many"], ["task.log_samples", "many"],
                                    data="data.path={d}/no_such_summaries.jsonl"),
    "num_beams_zero": Bad(["task=summarization", "task.generation.num_beams=0"],
                          ["task.generation.num_beams", "0 is below 1"], data="data.path={d}/no_such_summaries.jsonl"),
    "unknown_strategy_name": Bad(["trainer.strategy=bogus"], ["trainer.strategy", "'bogus'", "trainer=ddp",
                                                              "ddp_spawn"]),
    # Lightning clips only above 0: a negative limit would quietly mean no clipping at all
    "negative_gradient_clip": Bad(["trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val", "-1", "below 0"]),
    "gradient_clip_not_a_number": Bad(["trainer.gradient_clip_val=high"], ["trainer.gradient_clip_val", "high"]),
    # switches are read by their truth: 'maybe' (or 'no') would quietly mean true
    "switch_not_a_boolean": Bad(["model.compile=maybe"], ["model.compile", "'maybe' is not true or false",
                                                          "model.compile=true or model.compile=false"]),
    "export_not_a_boolean": Bad(["export=no"], ["'export'", "'no' is not true or false"]),
    "task_switch_not_a_boolean": Bad(["task=mlm", "task.nsp=sometimes"], ["task.nsp", "sometimes"]),
    "trainer_switch_not_a_boolean": Bad(["trainer.enable_progress_bar=1"], ["trainer.enable_progress_bar", "'1'"]),
    "deterministic_not_a_boolean": Bad(["trainer.deterministic=always"],
                                       ["trainer.deterministic", "'always' is not true or false or warn or null"]),
    # training without a set end, and a schedule that decays over the run's length
    "unbounded_training_with_a_decay": Bad(["trainer.max_steps=-1", "trainer.max_epochs=-1"],
                                           ["trainer.max_steps", "trainer.max_epochs=-1", "scheduler.name=cosine",
                                            "scheduler=constant"]),
    "seed_not_a_number": Bad(["seed=lucky"], ["seed", "lucky"]),
    "tiny_vocabulary": Bad(["tokenizer.vocab_size=3"], ["tokenizer.vocab_size", "3"]),
    "tiny_wordpiece_vocabulary": Bad(["tokenizer=wordpiece", "tokenizer.vocab_size=100"],
                                     ["tokenizer.vocab_size", "100", "WordPiece needs"]),
    "vocab_size_not_a_number": Bad(["task=mlm", "tokenizer.vocab_size=abc"], ["tokenizer.vocab_size", "abc"]),
    "min_frequency_not_a_number": Bad(["tokenizer.min_frequency=often"], ["tokenizer.min_frequency", "often"]),
    "split_seed_not_a_number": Bad(["data.split_seed=fixed"], ["data.split_seed", "fixed"]),
    "save_top_k_not_a_number": Bad(["checkpoint.save_top_k=best"], ["checkpoint.save_top_k", "best"]),
    "unknown_tokenizer_type": Bad(["tokenizer.type=sentencepiece"], ["tokenizer.type", "sentencepiece"]),
    "pretrained_tokenizer_without_path": Bad(["tokenizer=pretrained"], ["tokenizer.path"]),
    "pretrained_tokenizer_missing_dir": Bad(["tokenizer=pretrained", "tokenizer.path={d}/no_such_tokenizer"],
                                            ["tokenizer.path", "no_such_tokenizer"]),
    "unknown_model_size": Bad(["model.size=huge"], ["model.size", "huge"]),
    "unknown_hf_config_field": Bad(["model.config.n_layerz=3"], ["n_layerz"]),
    # values Hugging Face's config or model refuses: its message, under the key, not a traceback
    "hf_config_field_not_a_number": Bad(["model.config.n_layer=abc"], ["model.config.n_layer", "GPT2Config", "'abc'"]),
    "hf_model_width_not_divisible": Bad(["model.config.n_embd=129"],
                                        ["'model.config'", "GPT2LMHeadModel", "129", "divisible by num_heads"]),
    "masking_over_one": Bad(["task=mlm", "task.mask_replace_prob=0.9", "task.random_replace_prob=0.2"],
                            ["task.mask_replace_prob", "task.random_replace_prob"]),
    "tracking_uri_without_scheme": Bad(["logger.tracking_uri=127.0.0.1:5999"],
                                       ["logger.tracking_uri", "no scheme", "http://127.0.0.1:5999"]),
    "tracking_uri_a_folder": Bad(["logger.tracking_uri=file://{d}/mlruns"],
                                 ["logger.tracking_uri", "file://{d}/mlruns", "sqlite:///", "http://HOST:PORT"]),
    "deleted_experiment": Bad(["logger.experiment_name=gone"],
                              ["logger.experiment_name", "'gone'", "deleted",
                               "mlflow experiments restore --experiment-id"],
                              setup=lambda site: _deleted_experiment(site, "gone")),
    "unknown_gather": Bad(["task=mlm", "task.fixed_size_gather=sometimes"], ["task.fixed_size_gather", "sometimes"]),
    "task_without_head": Bad(["task=summarization", "model=bert"], ["summarization", "bert"]),
    "val_fraction_above_one": Bad(["data.val_fraction=1.5"], ["data.val_fraction", "1.5"]),
    # nan passes every range check (no comparison with it holds): a nan lr trained to nan losses.
    "nan_learning_rate": Bad(["optimizer.lr=nan"], ["optimizer.lr", "'nan' is not a finite number"]),
    "infinite_val_fraction": Bad(["data.val_fraction=inf"], ["data.val_fraction", "'inf' is not a finite number"]),
    "resume_outside_fit": Bad(["mode=test", "model.pretrained={d}/bert_model", "resume=auto"], ["resume", "mode=test"]),
    # an empty value (a shell $(...) that printed nothing) is not "unset": no silent random model
    "empty_pretrained": Bad([*CLS, "model.pretrained="], ["model.pretrained", "it is empty", "model.pretrained=null"]),
    "empty_pretrained_in_test_mode": Bad([*CLS, "mode=test", "model.pretrained="], ["model.pretrained", "it is empty"]),
    "empty_teacher": Bad(["distill.teacher="], ["distill.teacher", "it is empty"]),
    "empty_pretrained_with_resume": Bad(["model.pretrained=", "resume=auto"], ["model.pretrained", "it is empty"]),
    # ... nor the preset's own data, nor a fresh run
    "empty_data_path": Bad([], ["data.path", "it is empty", "data.path=null"], data="data.path="),
    "empty_data_name": Bad(["data.name="], ["data.name", "it is empty", "data.name=null"]),
    "empty_resume": Bad(["resume="], ["resume", "it is empty", "resume=null"]),
    # data files
    "missing_data_file": Bad([], ["data.path", "no_such_corpus.txt"], data="data.path={d}/no_such_corpus.txt"),
    "empty_data_file": Bad([], ["empty.txt"], data="data.path={d}/empty.txt"),
    "wrong_encoding": Bad([], ["latin1.txt", "utf-8", "data.encoding"], data="data.path={d}/latin1.txt"),
    "malformed_json_line": Bad([], ["broken.jsonl", "line 2", "JSON"], data="data.path={d}/broken.jsonl"),
    "json_line_without_text": Bad([], ["no_text.jsonl", "line 3", "'text'", "data.text_field"],
                                  data="data.path={d}/no_text.jsonl"),
    "json_line_not_an_object": Bad([], ["array.jsonl", "line 1", "list"], data="data.path={d}/array.jsonl"),
    "json_text_not_a_string": Bad([], ["number_text.jsonl", "line 2", "'text'", "number", "not a string"],
                                  data="data.path={d}/number_text.jsonl"),
    "folder_without_text": Bad([], ["data.path", "no_text_files"], data="data.path={d}/no_text_files"),
    "conll_wrong_column_count": Bad(NER, ["train.conll", "line 192", "column"],
                                    data="data.path={d}/ner_columns/train.conll"),
    "conll_bio_breaking_tag": Bad(NER, ["train.conll", "line 4", "BLOC"], data="data.path={d}/ner_tag/train.conll"),
    "ner_unknown_label_in_validation": Bad(NER, ["validation.conll", "line 1", "B-PLANET"],
                                           data="data.path={d}/ner_unknown"),
    "ner_jsonl_other_fields": Bad(NER, ["ner_fields.jsonl", "line 1", "'tokens' and 'tags'", "data.tokens_field"],
                                  data="data.path={d}/ner_fields.jsonl"),
    "ner_jsonl_tag_count": Bad(NER, ["ner_lengths.jsonl", "line 2", "3 tokens but 1 tags"],
                               data="data.path={d}/ner_lengths.jsonl"),
    "ner_folder_without_train": Bad(NER, ["data.path", "train"], data="data.path={d}/ner_empty_dir"),
    "csv_missing_label_column": Bad(CLS, ["train.csv", "'label'", "category"], data="data.path={d}/cls_column"),
    "csv_unknown_label_in_validation": Bad(CLS, ["validation.csv", "meh"], data="data.path={d}/cls_unknown"),
    "csv_empty_text": Bad(CLS, ["train.csv", "line 7", "empty"], data="data.path={d}/cls_empty_text"),
    "classification_wrong_file_type": Bad(CLS, ["data.path", "notes.xml"], data="data.path={d}/notes.xml"),
    # model, tokenizer and checkpoint paths
    "pretrained_missing_dir": Bad(["model.pretrained={d}/no_such_model"], ["model.pretrained", "no_such_model"]),
    "pretrained_is_a_file": Bad(["model.pretrained={d}/wiki.txt"], ["model.pretrained", "wiki.txt", "is a file"]),
    "pretrained_dir_without_config": Bad(["model.pretrained={d}/no_config_model"], ["model.pretrained", "config.json"]),
    "pretrained_broken_config": Bad(["model.pretrained={d}/bad_config_model"],
                                    ["bad_config_model/config.json", "line 1", "JSON", "model.pretrained"]),
    "pretrained_dir_without_tokenizer": Bad(["model.pretrained={d}/bert_model"],
                                            ["model.pretrained", "tokenizer.json"]),
    "pretrained_other_family": Bad(["model.pretrained={d}/real_bert"], ["model.pretrained", "'bert'", "model=gpt2"]),
    "pretrained_needs_remote_code": Bad(["model.pretrained={d}/custom_code_model"],
                                        ["model.pretrained", "trust_remote_code"]),
    "resume_missing_path": Bad(["resume={d}/no_such_run"], ["resume", "no_such_run"]),
    "resume_folder_not_a_run": Bad(["resume={d}/not_a_run"], ["resume", "lmlab_run.json"]),
    "resume_garbage_checkpoint": Bad(["resume={d}/garbage.ckpt"], ["garbage.ckpt", "not a readable checkpoint"]),
    "resume_truncated_checkpoint": Bad(["resume={d}/truncated.ckpt"], ["truncated.ckpt", "not a readable checkpoint"]),
    "resume_auto_without_runs": Bad(["resume=auto"], ["resume=auto", "no unfinished"]),
    # Finished at step 3: resumable only with trainer.max_steps past 3 (to train longer).
    "resume_finished_run": Bad(["resume={d}/finished_run", "trainer.max_steps=3"],
                               ["resume", "finished at step 3", "trainer.max_steps above 3"]),
    # plugins
    "unknown_registered_task": Bad(["task.name=nope"], ["unknown task 'nope'", "clm"]),
    "unknown_datamodule": Bad(["data.datamodule=nope"], ["unknown datamodule 'nope'", "text",
                                                         "e.g. data.datamodule="]),
    "plugin_that_fails_to_import": Bad(["task.name=broken"], ["task 'broken'", "failed to import"],
                                       setup=lambda site: _broken_plugin(site)),
    "plugin_task_not_a_taskspec": Bad(["task.name=dicttask"], ["task 'dicttask'", "lmlab_dicttask_plugin:TASK", "dict",
                                                               "TaskSpec"],
                                      setup=lambda site: _plugin(site, "dicttask", "TASK = {'name': 'dicttask'}\n")),
    "plugin_task_monitor_typo": Bad(["task.name=typoclm"], ["task 'typoclm' declares monitor='val/los'",
                                                            "TaskSpec.monitor", "val/loss"],
                                    setup=lambda site: _plugin(site, "typoclm", TYPO_MONITOR_TASK)),
    "plugin_task_without_its_data": Bad(["task.name=binclf"], ["data.datamodule", "text datamodule",
                                                               "packing 'binary'", "data="],
                                        setup=lambda site: _plugin(site, "binclf", BINARY_TASK)),
    # raw text for the LM objectives: what the text datamodule must not read, or cannot split
    "text_data_given_a_csv": Bad([], ["data.path", "train.csv", "CSV", "task=classification", ".txt"],
                                 data="data.path={d}/cls_column/train.csv"),
    "one_document_corpus": Bad([], ["data.path", "notes.txt", "the training split got no documents",
                                    "1 document(s)", "data.val_fraction=0.05"],
                               data="data.path={d}/not_a_run/notes.txt"),
    "path_and_name_both_set": Bad(["data.name=wikitext"], ["data.path", "wiki.txt", "data.name='wikitext'"]),
    "catalog_given_a_text_pair_column": Bad([*CLS, "data.text_pair_column=hypothesis"],
                                            ["data.text_pair_column", "'hypothesis'", "bbc_topics", "no second text"],
                                            data="data.catalog=bbc_topics"),
    "classification_path_and_name_both_set": Bad([*CLS, "data.name=imdb"], ["data.path", "data.name='imdb'"],
                                                 data="data.path={d}/cls_unknown"),
}

TYPO_MONITOR_TASK = """
import dataclasses

from lmlab.tasks.clm import TASK as CLM

TASK = dataclasses.replace(CLM, name="typoclm", monitor="val/los")
"""

BINARY_TASK = """
from lmlab.specs import TaskSpec

TASK = TaskSpec(name="binclf", head=lambda cfg: "causal_lm", build_module=lambda cfg, model, tok: None,
                packing=lambda cfg: "binary")
"""


def _plugin(site: Path, task: str, source: str) -> None:
    """An installed plugin registering ``task = lmlab_<task>_plugin:TASK``, with SOURCE as that module."""
    module = f"lmlab_{task}_plugin"
    info = site / f"{module}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[lmlab.tasks]\n{task} = {module}:TASK\n")
    (site / f"{module}.py").write_text(source)


def _deleted_experiment(site: Path, name: str) -> None:
    """An experiment ``name`` deleted (not purged) in the embedded store the case's run uses."""
    import mlflow

    from lmlab.tracking import default_tracking_uri

    home = Path(os.environ["LMLAB_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(home))
    client.delete_experiment(client.create_experiment(name))


def _broken_plugin(site: Path) -> None:
    info = site / "lmlab_broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lmlab-broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[lmlab.tasks]\nbroken = lmlab_broken_plugin:TASK\n")
    (site / "lmlab_broken_plugin.py").write_text("import lmlab_dependency_that_is_not_installed\nTASK = None\n")


# -- checks ---------------------------------------------------------------------------------------
def run_statuses(home: Path) -> list[str]:
    db = home / "mlflow.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        if not con.execute("SELECT name FROM sqlite_master WHERE name='runs'").fetchall():
            return []
        return [row[0] for row in con.execute("SELECT status FROM runs")]


def leftovers(*roots: Path) -> list[Path]:
    """Half-written files: staged ``*.tmp`` files, staging folders (``.name.xxxx``), exports."""
    found = []
    for root in roots:
        if root.exists():
            found += [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name == "export"
                      or (p.is_dir() and p.name.startswith(".") and p.name != ".hydra")]
    return found


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not WIKI.exists():
        pytest.skip(f"real test data missing: {WIKI}")
    d = tmp_path_factory.mktemp("bad_inputs")
    make_files(d)
    return d


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Tokenizers and tokenized data are reused across the cases: only the failure differs.
    return tmp_path_factory.mktemp("cache")


def _fill(items: list[str], d: Path) -> list[str]:
    return [item.replace("{d}", str(d)) for item in items]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_a_clear_error(name: str, files: Path, shared_cache: Path, lmlab_home: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = CASES[name]
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(shared_cache))
    if case.setup is not None:
        site = tmp_path / "site"
        case.setup(site)
        monkeypatch.syspath_prepend(str(site))
        registry.clear_cache()
    overrides = [*TINY, *_fill([case.data], files), *_fill(case.overrides, files)]
    names = _fill(case.names, files)
    try:
        if case.stage == "compose":
            with pytest.raises(Exception) as caught:
                compose_cfg(overrides)
            assert not isinstance(caught.value, LmlabError)
        else:
            cfg = compose_cfg(overrides)
            with pytest.raises(LmlabError) as caught:
                run(cfg)
    finally:
        if case.setup is not None:
            registry.clear_cache()
    message = str(caught.value)
    for word in names:
        assert word in message, f"{word!r} not in: {message}"
    assert "Traceback" not in message
    assert "RUNNING" not in run_statuses(lmlab_home), message
    assert leftovers(lmlab_home, shared_cache) == [], message


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_only_what_model_config_values_cause_becomes_a_config_error() -> None:
    from dataclasses import replace

    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.models.build import build_model

    spec = registry.get("model", "gpt2")
    with pytest.raises(LmlabError, match="'model.config'") as caught:
        build_model(spec, "causal_lm", GPT2Config(n_layer=1, n_head=2, n_embd=129, vocab_size=64))
    assert isinstance(caught.value.__cause__, ValueError)  # chained: HF's own traceback is kept

    class Buggy(GPT2LMHeadModel):
        def __init__(self, config: GPT2Config) -> None:
            raise RuntimeError("a bug, whatever the values")

    with pytest.raises(RuntimeError, match="a bug"):
        build_model(replace(spec, heads={"causal_lm": Buggy}), "causal_lm",
                    GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=64))


# -- through the real command: exit 2, one "lmlab: error:" paragraph, no traceback -----------------
CLI_CASES = {
    "resume_missing_path": (["resume={d}/no_such_run"], ["resume", "no_such_run"]),
    "unknown_nonfinite_policy": (["faults.nonfinite=ignore"], ["faults.nonfinite", "ignore"]),
    "negative_checkpoint_interval": (["checkpoint.every_n_steps=-1"], ["checkpoint.every_n_steps"]),
    "bad_mode": (["mode=train"], ["mode", "train"]),
    "resume_garbage_checkpoint": (["resume={d}/garbage.ckpt"], ["garbage.ckpt", "not a readable checkpoint"]),
    "missing_data_file": (["data.path={d}/no_such_corpus.txt"], ["data.path", "no_such_corpus.txt"]),
    "vocab_size_not_a_number": (["task=mlm", "tokenizer.vocab_size=abc"], ["tokenizer.vocab_size", "abc"]),
    "switch_not_a_boolean": (["model.compile=maybe"], ["model.compile", "maybe"]),
    # README's MiniLM example when its $(python -c ...) lookup prints nothing
    "empty_pretrained": (["task=classification", "model.pretrained="], ["model.pretrained", "it is empty"]),
}


@pytest.fixture(scope="module")
def cli_outcomes(files: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    root = tmp_path_factory.mktemp("cli")

    def one(name: str) -> tuple[int, str, Path]:
        args, _ = CLI_CASES[name]
        home = root / name
        env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONPATH")}
        env.update(LMLAB_HOME=str(home), LMLAB_CACHE_DIR=str(root / "cache"), OMP_NUM_THREADS="1")
        proc = subprocess.run([*lmlab_command(), *TINY, *_fill(args, files)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr, home

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(CLI_CASES, pool.map(one, CLI_CASES)))


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_bad_input_on_the_command_line(name: str, files: Path, cli_outcomes: dict) -> None:
    rc, stderr, home = cli_outcomes[name]
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.count("lmlab: error:") == 1, stderr
    message = stderr[stderr.index("lmlab: error:"):].strip()
    assert "\n" not in message, message  # one paragraph, the last thing printed
    for word in _fill(CLI_CASES[name][1], files):
        assert word in message, (word, message)
    assert "RUNNING" not in run_statuses(home)
    assert leftovers(home) == []



# The advice must fit the preset: following it must not lead to another dead end.
NO_GPU_ADVICE = {
    "gpu": ["Use trainer=cpu, or add trainer.accelerator=cpu."],
    "ddp": ["trainer=ddp_cpu", "DDP", "gloo"],
    "fsdp": ["FSDP needs GPUs", "trainer=ddp_cpu"],
    "deepspeed": ["DeepSpeed needs GPUs", "trainer=ddp_cpu"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("preset", list(NO_GPU_ADVICE))
def test_a_gpu_preset_without_a_gpu_stops_before_any_data_or_mlflow_work(preset: str, wiki_file: Path,
                                                                       lmlab_home: Path) -> None:
    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", f"trainer={preset}"])
    with pytest.raises(LmlabError) as caught:
        run(cfg)
    message = str(caught.value)
    assert "'trainer.accelerator'" in message and "no CUDA GPU" in message
    for words in NO_GPU_ADVICE[preset]:
        assert words in message, (words, message)
    if preset != "ddp":
        assert "gloo" not in message and "DDP" not in message, message  # no DDP involved
    assert not (lmlab_home / "mlflow.db").exists()  # no FAILED run left behind


@pytest.mark.parametrize(("overrides", "words"), [
    # DeepSpeed has no CPU accelerator: not "install deepspeed (needs a CUDA toolkit)" after the data work.
    (["trainer=deepspeed", "trainer.accelerator=cpu"],
     ["'trainer.accelerator'", "DeepSpeed runs on CUDA GPUs only", "trainer=ddp_cpu"]),
    # Nor has Lightning's FSDP, which said so only after the data work, with an MLflow run left FAILED.
    (["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
     ["'trainer.accelerator'", "FSDP runs on CUDA GPUs only", "trainer=ddp_cpu"]),
    (["trainer.strategy=fsdp"], ["'trainer.accelerator'", "FSDP runs on CUDA GPUs only"]),
    # The GPU presets' devices=-1 ("every GPU") is refused by Lightning's CPU accelerator.
    (["trainer=ddp", "trainer.accelerator=cpu"], ["'trainer.devices'", "-1", "trainer.devices=2"]),
    # Lightning refuses these only when the Trainer is built, in words that name no config key.
    (["trainer.precision=fp17"], ["'trainer.precision'", "bf16-mixed"]),
    (["trainer.precision=true"], ["'trainer.precision'", "'True'"]),
    (["trainer.precision=17"], ["'trainer.precision'", "'17'"]),
    (["trainer.strategy=bogus"], ["'trainer.strategy'", "'bogus'"]),
])
def test_trainer_options_are_checked_up_front(overrides: list[str], words: list[str], wiki_file: Path,
                                              lmlab_home: Path) -> None:
    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", *overrides])
    with pytest.raises(LmlabError) as caught:
        run(cfg)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert "Install" not in str(caught.value)
    assert not (lmlab_home / "mlflow.db").exists()  # no FAILED run left behind


def test_lightnings_short_precision_names_pass_the_early_check() -> None:
    from lmlab.checks import check_precision
    for value in ("bf16", "16", "32", "64", "bf16-mixed", "32-true"):
        check_precision(compose_cfg([*TINY, f"trainer.precision={value}"]))


# -- a relative path with a typo is a path, not a hub name ------------------------------------------
def test_hub_names_and_paths_are_told_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for hub in ("bert-base-uncased", "google/electra-small-discriminator", "prajjwal1/bert-tiny"):
        assert not is_local_reference(hub), hub
    for path in ("models/bert-mni", "./bert", "../bert", "/abs/bert", "~/bert", "runs/x/export", "models"):
        assert is_local_reference(path), path


@pytest.mark.parametrize("key", ["model.pretrained", "tokenizer.path"])
def test_a_misspelt_relative_path_is_named_before_any_hub_request(key: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Sent to the hub, "models/bert-mni" would cost a minute of retries offline and then an error
    # about the network; its folder exists here, so it is a path with a typo.
    (tmp_path / "models" / "bert-mini").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    extra = ["task=classification", "model=bert"] if key == "model.pretrained" else ["tokenizer=pretrained"]
    cfg = compose_cfg([*TINY, *extra, f"{key}=models/bert-mni"])
    started = time.perf_counter()
    with pytest.raises(LmlabError) as caught:
        run(cfg)
    message = str(caught.value)
    assert f"config key '{key}': 'models/bert-mni' does not exist" in message, message
    assert str(tmp_path) in message  # where a relative path starts from
    assert time.perf_counter() - started < 30  # no hub retries


# -- values found by a pass of wrong values over every key: each a traceback or a silently wrong run
# before, now refused by lmlab.checks before any data or MLflow work -----------------------------
REFUSED_UP_FRONT = {  # overrides (space-separated) -> words of the error
    # numpy takes seeds in [0, 2**32 - 1]: a ValueError from seed_everything / SeedSequence
    "seed=-1": ["'seed'", "-1 is below 0"],
    "seed=1000000000000": ["'seed'", "is above 4294967295"],
    "data.split_seed=-1": ["'data.split_seed'", "-1 is below 0"],
    # a TypeError once the corpus was read / inside Lightning's loop / in lmlab's process count
    "data.block_size=null": ["'data.block_size'", "is not set", "data.block_size=128"],
    "data.encoding=null": ["'data.encoding'", "is null", "data.encoding=utf-8"],
    "trainer.accumulate_grad_batches=null": ["'trainer.accumulate_grad_batches'", "it is null"],
    "trainer.devices=null": ["'trainer.devices'", "'None'", "auto"],
    "trainer.num_sanity_val_steps=abc": ["'trainer.num_sanity_val_steps'", "'abc' is not a whole number"],
    "trainer.num_sanity_val_steps=''": ["'trainer.num_sanity_val_steps'", "'' is not a whole number"],
    # taken by Lightning without a word (a sanity check of 1.5 batches)
    "trainer.num_sanity_val_steps=1.5": ["'trainer.num_sanity_val_steps'", "'1.5' is not a whole number"],
    # Lightning's "'<' not supported between 'NoneType' and 'int'", under the key 'trainer'
    "trainer.max_steps=null": ["'trainer.max_steps'", "it is null"],
    # a ZeroDivisionError mid-fit
    "trainer.val_check_interval=0": ["'trainer.val_check_interval'", "0 is not positive"],
    "trainer.check_val_every_n_epoch=0": ["'trainer.check_val_every_n_epoch'", "0 is not positive"],
    # an IndexError after training: the final validation had nothing to report
    "trainer.limit_val_batches=0": ["'trainer.limit_val_batches'", "no validation"],
    # read as `mode or "fit"`: trained a model where something else was asked for
    "mode=''": ["'mode'", "it is empty", "mode=fit"],
    "mode=0": ["'mode'", "'0' is not a mode"],
    "mode=null": ["'mode'", "it is null"],
    # the number 0 is falsy: a model trained from scratch, not model.pretrained's folder '0'
    "model.pretrained=0": ["'model.pretrained'", "'0' is a number", "model.pretrained='0'"],
    # read as `value or the task's own`: checkpointed on val/loss (min) whatever was given
    "checkpoint.monitor=''": ["'checkpoint.monitor'", "it is empty", "checkpoint.monitor=val/loss"],
    "checkpoint.monitor=0": ["'checkpoint.monitor'", "'0' is not a name"],
    "checkpoint.mode=''": ["'checkpoint.mode'", "it is empty", "checkpoint.mode=min or max"],
    "checkpoint.mode=0": ["'checkpoint.mode'", "'0' is not a name"],
    "objective.metric=''": ["'objective.metric'", "it is empty"],
    "objective.direction=0": ["'objective.direction'", "'0' is not a name"],
    # CoNLL columns and summarization's lengths have no default: an int(None) TypeError once the data is read
    "task=ner data.token_column=null": ["'data.token_column'", "it is null"],
    "task=ner data.tag_column=null": ["'data.tag_column'", "it is null"],
    "task=summarization data.max_source_length=null": ["'data.max_source_length'", "it is null"],
    "task=summarization data.max_target_length=null": ["'data.max_target_length'", "it is null"],
    # read as `column or None`: trained on single texts, the pair column dropped
    "task=classification data.text_pair_column=''": ["'data.text_pair_column'", "it is empty", "or null (single texts)"],
    "task=classification data.text_pair_column=0": ["'data.text_pair_column'", "'0' is not a name"],
    # an MlflowException traceback once the run was being opened, after the data work
    "logger.experiment_name=''": ["'logger.experiment_name'", "it is empty"],
    "logger.run_name=[1,2]": ["'logger.run_name'", "'[1, 2]' is not a name"],
    # the tokenizers trainer aborted the whole process (no exception to catch); a padded vocabulary
    # of 10**9 rows ran out of memory
    "tokenizer.vocab_size=1000000000000": ["'tokenizer.vocab_size'", "is above 2147483647"],
    "model.vocab_multiple=1000000000": ["'model.vocab_multiple'", "is above 4096"],
    # hung the run (PyTorch only warns past the cores)
    "data.num_workers=1000000000000": ["'data.num_workers'", "is above 1024"],
}


@pytest.mark.parametrize("override", list(REFUSED_UP_FRONT))
def test_wrong_values_are_refused_before_any_work(override: str) -> None:
    from lmlab.checks import check_numbers

    cfg = compose_cfg([*TINY, *override.split(" ")])
    with pytest.raises(LmlabError) as caught:
        check_numbers(cfg)
    for word in REFUSED_UP_FRONT[override]:
        assert word in str(caught.value), (word, str(caught.value))


@pytest.mark.parametrize("overrides", [
    ["seed=0"], ["seed=4294967295"], ["data.split_seed=0"], ["trainer.val_check_interval=0.5"],
    ["trainer.val_check_interval=00:00:10:00"], ["trainer.num_sanity_val_steps=-1"], ["trainer.devices=auto"],
    ["trainer.check_val_every_n_epoch=null"], ["mode=test", "trainer.limit_val_batches=0"],
    ["task=summarization", "data.block_size=null"], ["data.encoding_fallback=null"], ["model.pretrained=null"],
    ["checkpoint.monitor=val/perplexity", "checkpoint.mode=min"], ["objective.metric=val/loss", "objective.direction=min"],
    ["logger.run_name=7", "logger.experiment_name=mine"], ["tokenizer.vocab_size=2147483647"],
    ["model.vocab_multiple=4096"], ["data.num_workers=1024"],
])
def test_the_values_next_to_them_still_pass(overrides: list[str]) -> None:
    from lmlab.checks import check_numbers

    check_numbers(compose_cfg([*TINY, *overrides]))


def test_a_trainer_error_without_a_message_still_says_what_failed(tmp_path) -> None:
    # Lightning's Trainer raised a bare MemoryError for trainer.devices=10**12: the error read
    # "config group 'trainer': " and nothing more.
    from lmlab import registry
    from lmlab.train import build_trainer

    cfg = compose_cfg(["trainer.enable_progress_bar=false", "trainer.devices=1000000000000"])
    with pytest.raises(LmlabError, match=r"config group 'trainer': Lightning's Trainer raised \w+Error; check"):
        build_trainer(cfg, registry.get("task", "clm"), tmp_path, False)
