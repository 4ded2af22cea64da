"""Metric writes go through a worker thread, in order with everything else, and their errors surface."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param

from lmlab.background_log import BackgroundWriter, MetricsBeforeCheckpoints
from lmlab.run_log import RunLog


class Recorder:
    """A client that records which thread made each call; ``gate`` holds metric writes back."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on = fail_on

    def _record(self, name: str, what: str) -> None:
        self.calls.append((name, threading.current_thread().name))
        if self.fail_on == what:
            raise ValueError(f"the store refused {what}")

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self.gate.wait(10)
        self._record("log_batch", ",".join(m.key for m in metrics) or ",".join(p.key for p in params))

    def log_param(self, run_id: str, key: str, value: str) -> None:
        self._record("log_param", key)

    def set_terminated(self, run_id: str, status: str) -> None:
        self._record(f"set_terminated:{status}", status)


def metric(key: str, step: int = 0) -> list[Metric]:
    return [Metric(key, 1.0, 0, step)]


def test_metrics_are_written_by_the_worker_and_other_calls_wait_for_them() -> None:
    inner = Recorder()
    inner.gate.clear()  # the worker is stuck in the first metric write
    writer = BackgroundWriter(inner)
    started = time.perf_counter()
    writer.log_batch(run_id="r", metrics=metric("train/loss"))
    writer.log_batch("r", metric("train/lr"))
    assert time.perf_counter() - started < 1.0 and inner.calls == []  # the caller did not wait

    done = threading.Event()
    threading.Thread(target=lambda: (writer.log_param("r", "lr", "0.1"), done.set())).start()
    assert not done.wait(0.3)  # the param waits behind the metrics
    inner.gate.set()
    assert done.wait(10)
    assert [c[0] for c in inner.calls] == ["log_batch", "log_batch", "log_param"]
    assert {c[1] for c in inner.calls[:2]} == {"lmlab-mlflow-writer"}
    assert inner.calls[2][1] != "lmlab-mlflow-writer"
    assert writer.close() is None


def test_params_and_tags_in_a_batch_are_written_in_the_callers_thread() -> None:
    inner = Recorder()
    writer = BackgroundWriter(inner)
    writer.log_batch("r", [], [Param("a", "1")])
    assert inner.calls == [("log_batch", threading.current_thread().name)]
    writer.close()


def test_a_failed_metric_write_is_raised_at_the_next_call_and_returned_by_close() -> None:
    inner = Recorder(fail_on="train/loss")
    writer = BackgroundWriter(inner)
    writer.log_batch("r", metric("train/loss"))
    with pytest.raises(ValueError, match="refused train/loss"):
        writer.wait()
    writer.log_batch("r", metric("train/loss", 1))
    assert isinstance(writer.close(), ValueError)
    writer.log_batch("r", metric("train/lr"))  # after close: straight through, in this thread
    assert inner.calls[-1] == ("log_batch", threading.current_thread().name)


def test_a_run_whose_metrics_failed_is_marked_failed_and_the_error_raised() -> None:
    inner = Recorder(fail_on="train/loss")
    mlrun = RunLog(BackgroundWriter(inner), "r")
    mlrun.client.log_batch("r", metric("train/loss"))
    with pytest.raises(ValueError, match="refused train/loss"):
        mlrun.terminate("FINISHED")
    assert inner.calls[-1][0] == "set_terminated:FAILED"

    # A run that is failing anyway keeps its own error: terminate marks it and does not raise.
    inner = Recorder(fail_on="train/loss")
    mlrun = RunLog(BackgroundWriter(inner), "r")
    mlrun.client.log_batch("r", metric("train/loss"))
    mlrun.terminate("KILLED")
    assert inner.calls[-1][0] == "set_terminated:FAILED"


def test_the_embedded_store_receives_every_metric_before_the_run_ends(tmp_path: Path) -> None:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("background")).info.run_id
    mlrun = RunLog(client, run_id)
    mlrun.set_up_writes("sqlite:///x", tmp_path)
    assert isinstance(mlrun.client, BackgroundWriter)
    for step in range(40):
        mlrun.client.log_batch(run_id=run_id, metrics=[Metric("train/loss", float(step), 0, step)])
    mlrun.metric("train/total_tokens", 123.0)
    mlrun.terminate("FINISHED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/total_tokens"] == 123.0
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(40))


def test_a_writer_pickles_with_its_client_after_sending_what_it_holds(tmp_path: Path) -> None:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("pickled")).info.run_id
    writer = BackgroundWriter(client)
    writer.log_batch(run_id, metrics=[Metric("train/loss", 2.0, 0, 0)])
    copy = pickle.loads(pickle.dumps(writer))
    assert [m.value for m in client.get_metric_history(run_id, "train/loss")] == [2.0]  # sent before pickling
    copy.log_batch(run_id, metrics=[Metric("train/loss", 1.0, 0, 1)])
    assert copy.close() is None and writer.close() is None
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [0, 1]


def test_a_checkpoint_waits_for_the_metrics_logged_before_it(tmp_path: Path) -> None:
    # A run killed right after a checkpoint resumes from it and does not redo the steps before it:
    # their metrics must be in the store by the time the checkpoint exists.
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("ckpt")).info.run_id
    inner = Recorder()
    writer = BackgroundWriter(inner)
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", run_id=run_id)
    logger._mlflow_client = writer

    class Step(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            writer.log_batch(run_id, metrics=metric("train/loss", batch_idx))
            if batch_idx == 2:
                inner.gate.clear()  # the store stalls: the write of step 3 waits
            return self.layer(batch).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_steps=4, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, callbacks=[MetricsBeforeCheckpoints()])
    trainer.fit(Step(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2))
    before = len(inner.calls)
    threading.Timer(0.3, inner.gate.set).start()
    started = time.perf_counter()
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert time.perf_counter() - started >= 0.25  # it waited for the stalled write
    assert len(inner.calls) > before and (tmp_path / "last.ckpt").is_file()
    assert [c for c in inner.calls if c[0] == "log_batch"] == [("log_batch", "lmlab-mlflow-writer")] * 4
    # The checkpointed step's own metrics, logged after the save, are written at once, in this thread;
    # the ones after them go back to the worker.
    writer.log_batch(run_id, metrics=metric("train/loss", 4))
    assert inner.calls[-1] == ("log_batch", threading.current_thread().name)
    writer.log_batch(run_id, metrics=metric("train/loss", 5))
    writer.wait()
    assert inner.calls[-1] == ("log_batch", "lmlab-mlflow-writer")
    writer.close()
