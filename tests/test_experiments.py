"""Every preset in experiments/ runs, shrunk by the debug preset: ``+experiment=[NAME,debug]``.

The flagship flow runs as a chain: ``bert_pretrain`` pretrains a BERT with masked LM, and
``ner_finetune`` fine-tunes that run's export on NER (its ``model.pretrained`` is required).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.paths import experiments_dir
from lmlab.train import run
from tests.conftest import compose_cfg

QUICK = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.max_steps=3",
         "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
         "trainer.num_sanity_val_steps=0", "data.max_documents=200"]
# Presets whose runs need a trained model of their own are run by the tests of that feature.
ELSEWHERE = {
    "debug": "every test here",
    "distill_classification": "tests/test_distill.py",
    "distill": "tests/test_distill.py",
    "quantize": "tests/test_compress.py",
    "prune": "tests/test_compress.py",
}


def lmlab(name: str, *overrides: str):
    return run(compose_cfg([f"+experiment=[{name},debug]", *QUICK, *overrides]))


def test_every_preset_is_run_somewhere() -> None:
    names = {p.stem for p in Path(experiments_dir()).glob("*.yaml")}
    assert {"debug", "bert_pretrain", "ner_finetune", "gpt2_small", "summarization"} <= names
    unrun = names - {"bert_pretrain", "ner_finetune", "gpt2_small", "summarization"} - set(ELSEWHERE)
    assert not unrun, f"presets no test runs: {sorted(unrun)}"


@pytest.mark.slow
def test_pretrain_a_bert_then_fine_tune_it_on_ner() -> None:
    pretrained = lmlab("bert_pretrain")
    cfg = compose_cfg(["+experiment=[bert_pretrain,debug]"])
    assert (cfg.task.name, cfg.model.name, cfg.task.whole_word_mask) == ("mlm", "bert", True)
    assert math.isfinite(pretrained.metrics["val/loss"]) and pretrained.export_dir is not None

    with pytest.raises(LmlabError, match="config key 'model.pretrained': is required"):
        lmlab("ner_finetune")
    tuned = lmlab("ner_finetune", f"model.pretrained={pretrained.output_dir}")
    assert "test/f1" in tuned.metrics and math.isfinite(tuned.metrics["val/loss"])
    assert compose_cfg(["+experiment=ner_finetune", "model.pretrained=x"]).optimizer.lr == 5e-5


@pytest.mark.slow
@pytest.mark.parametrize("name, task, model", [("gpt2_small", "clm", "gpt2"),
                                               ("summarization", "summarization", "bart")])
def test_preset_runs(name: str, task: str, model: str) -> None:
    result = lmlab(name)
    cfg = compose_cfg([f"+experiment=[{name},debug]"])
    assert (cfg.task.name, cfg.model.name) == (task, model)
    assert math.isfinite(result.metrics["val/loss"])
    if task == "summarization":
        assert "test/rougeL" in result.metrics and cfg.task.generation.num_beams == 4
