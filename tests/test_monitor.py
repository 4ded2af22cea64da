"""The best checkpoint's metric: its direction, and a misspelt name caught before training."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from conftest import TINY, compose_cfg
from lmlab import registry, tracking
from lmlab.errors import LmlabError
from lmlab.train import metric_mode, monitored, run


@pytest.mark.parametrize("metric, mode", [
    ("val/loss", "min"), ("val/perplexity", "min"), ("train/loss", "min"), ("val/mae", "min"),
    ("val/rmse", "min"), ("test/error_rate", "min"), ("val/wer", "min"),
    ("val/accuracy", "max"), ("val/masked_accuracy", "max"), ("val/macro_f1", "max"), ("val/f1", "max"),
    ("val/bleu", "max"), ("test/rougeL", "max"), ("val/rouge1", "max"), ("val/auc", "max"),
    ("val/weird_thing", None), ("val/tamer", None),  # 'tamer' holds 'mae' and 'ter' but not as parts
])
def test_a_metric_name_tells_its_direction(metric: str, mode: str | None) -> None:
    assert metric_mode(metric) == mode


def test_a_monitored_metric_other_than_the_tasks_takes_its_direction_from_its_name() -> None:
    task = registry.get("task", "classification")
    # Before, every metric but the task's own was minimised: the worst F1 was kept and exported.
    assert monitored(compose_cfg(["task=classification", "checkpoint.monitor=val/macro_f1"]), task) == \
        ("val/macro_f1", "max")
    assert monitored(compose_cfg(["task=classification", "checkpoint.monitor=val/loss"]), task) == ("val/loss", "min")
    assert monitored(compose_cfg(["task=classification"]), task) == ("val/accuracy", "max")
    # checkpoint.mode, when given, wins over the name.
    assert monitored(compose_cfg(["task=classification", "checkpoint.monitor=val/loss", "checkpoint.mode=max"]),
                     task) == ("val/loss", "max")
    with pytest.raises(LmlabError, match=r"'checkpoint.mode'.*val/custom_score_2.*checkpoint.mode=max"):
        monitored(compose_cfg(["task=classification", "checkpoint.monitor=val/custom_score_2"]), task)


def test_a_misspelt_monitor_stops_the_run_at_the_sanity_check_before_any_step(wiki_file: Path,
                                                                              lmlab_home: Path) -> None:
    # The presets run no sanity check (num_sanity_val_steps: 0); a monitor of the user's naming gets one.
    cfg = compose_cfg([*TINY, f"data.path={wiki_file}", "checkpoint.monitor=val/los", "checkpoint.mode=min",
                       "trainer.max_steps=40", "trainer.val_check_interval=20", "trainer.log_every_n_steps=1"])
    with pytest.raises(LmlabError, match=r"'checkpoint.monitor': the run logs no 'val/los'.*val/loss, val/perplexity"):
        run(cfg)
    (found,) = mlflow.MlflowClient(tracking.tracking_uri(cfg)).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking.tracking_uri(cfg)).search_experiments()])
    assert found.info.status == "FAILED"
    assert "train/loss" not in found.data.metrics  # stopped before the first training step
    assert not list(lmlab_home.rglob("*.ckpt"))


def test_the_monitor_check_leaves_training_as_it_was(wiki_file: Path, lmlab_home: Path) -> None:
    # The one-batch check before training must not shift the random numbers training draws (dropout
    # on): a run monitoring val/perplexity trains exactly like one monitoring the task's val/loss.
    common = [*TINY, f"data.path={wiki_file}", "trainer.max_steps=6", "trainer.val_check_interval=3", "model.config.resid_pdrop=0.1",
              "trainer.log_every_n_steps=1", "export=false"]
    own = run(compose_cfg(common))
    other = run(compose_cfg([*common, "checkpoint.monitor=val/perplexity"]))
    client = mlflow.MlflowClient(own.tracking_uri)
    losses = [[m.value for m in client.get_metric_history(r.run_id, "train/loss")] for r in (own, other)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
