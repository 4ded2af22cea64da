"""``python -m lmlab.pending``'s replay: what it could not send stays in the file, and a failure while
rewriting that file never costs a record. No tracking server: a stand-in client refuses one call."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.entities import Metric, Param

from lmlab import pending

resource = pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only


class ServerGone(ConnectionError):  # what is_outage reads as the server being away
    pass


class StandIn:
    """The tracking server as replay sees it: it records the calls, and refuses the one numbered
    ``refuse`` (0-based), calling ``on_refuse`` first."""

    def __init__(self) -> None:
        self.received: list[tuple[str, tuple, dict]] = []
        self.refuse: int | None = None
        self.on_refuse = lambda: None

    def client(self, tracking_uri: str) -> object:
        server = self

        class Client:
            def __getattr__(self, name: str):
                def call(*args, **kwargs):
                    if len(server.received) == server.refuse:
                        server.on_refuse()
                        raise ServerGone("the tracking server went away")
                    server.received.append((name, args, kwargs))
                return call

        return Client()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    stand_in = StandIn()
    monkeypatch.setattr(mlflow, "MlflowClient", stand_in.client)
    return stand_in


def pending_file(run_dir: Path) -> Path:
    """A run's pending log as ResilientClient writes it: a few params, then a metric batch per step."""
    records = [pending._encode("log_param", ("run", Param(f"model.{k}", f"{v} – ü")), {})
               for k, v in (("size", "tiny"), ("name", "bert"))]
    records += [pending._encode("log_batch", ("run",), {"metrics": [Metric("train/loss", 2.5 - step / 10,
                                                                           1_700_000_000_000 + step, step)]})
                for step in range(6)]
    path = run_dir / pending.PENDING
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_replay_cut_short_keeps_exactly_the_unsent_records(tmp_path: Path, server: StandIn) -> None:
    path = pending_file(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    server.refuse = 3
    with pytest.raises(ServerGone):
        pending.replay(tmp_path, "http://tracking.invalid")
    assert len(server.received) == 3
    assert path.read_bytes() == "".join(lines[3:]).encode("utf-8")
    assert [p.name for p in tmp_path.iterdir()] == [pending.PENDING]  # no .tmp beside it

    server.refuse = None
    assert pending.replay(tmp_path, "http://tracking.invalid") == len(lines) - 3
    assert not path.exists() and len(server.received) == len(lines)


@pytest.mark.skipif(sys.platform != "linux", reason="EFBIG from RLIMIT_FSIZE, with SIGXFSZ ignored, is Linux's")
def test_a_rewrite_that_fails_keeps_every_pending_record(tmp_path: Path, server: StandIn) -> None:
    """The rewrite used to truncate the file first: a full disk (here: a file size limit) lost the records."""
    path = pending_file(tmp_path)
    before = path.read_bytes()
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Ignored, a write past the limit fails with EFBIG instead of killing the process (CPython's default).
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # The limit holds only from the refused call to the end of replay: nothing else writes meanwhile.
    server.on_refuse = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64, limit[1]))
    server.refuse = 3
    try:
        with pytest.raises(OSError) as info:
            pending.replay(tmp_path, "http://tracking.invalid")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.errno == errno.EFBIG  # the rewrite itself failed, not only the server
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [pending.PENDING]

    # Nothing is lost: the next replay sends everything, the three calls that went through included.
    server.refuse = None
    assert pending.replay(tmp_path, "http://tracking.invalid") == len(before.splitlines())
    assert not path.exists()


class Flaky:
    """A client whose server answers ``calls_left`` more calls (None: all of them), then is gone."""

    def __init__(self, client: mlflow.MlflowClient) -> None:
        self.client = client
        self.calls_left: int | None = None

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            if self.calls_left is not None:
                if self.calls_left == 0:
                    raise requests.ConnectionError("Connection refused")
                self.calls_left -= 1
            return getattr(self.client, name)(*args, **kwargs)
        return call


def test_a_flush_cut_short_leaves_only_the_unsent_calls_for_replay(tmp_path: Path) -> None:
    """What a flush sent before the server went away again left the file with it: the replay sent it
    again, and a log_metric, whose timestamp is taken when it is sent, became a second point."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(uri)
    run_id = store.create_run(store.create_experiment("outage")).info.run_id
    server = Flaky(store)
    client = pending.ResilientClient(server, uri, tmp_path, retry_seconds=0)
    server.calls_left = 0
    client.log_metric(run_id, "train/total_tokens", 10240.0)
    client.log_param(run_id, "n_parameters", "5")
    client.set_terminated(run_id, "FINISHED")
    server.calls_left = 1  # back for one call, then gone until the run has ended
    client.close()
    assert client.pending == 2
    assert pending.replay(tmp_path, uri) == 2
    assert len(store.get_metric_history(run_id, "train/total_tokens")) == 1
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"n_parameters": "5"}


def test_metrics_logged_first_while_the_server_is_away_are_kept(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's logger reads the run at its first write; during an outage it got "no run" and
    failed the training step (AttributeError: 'NoneType' object has no attribute 'info')."""
    from omegaconf import OmegaConf

    from lmlab.background_log import BackgroundWriter
    from lmlab.run_log import RunLog

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(uri)
    run_id = store.create_run(store.create_experiment("outage")).info.run_id
    server = Flaky(store)
    mlrun = RunLog(BackgroundWriter(pending.ResilientClient(server, uri, tmp_path, retry_seconds=0)), run_id)
    logger = mlrun.metrics_logger(OmegaConf.create({"logger": {"experiment_name": "outage", "tracking_uri": uri},
                                                    "paths": {"root": str(tmp_path)}}))
    server.calls_left = 0  # gone before the first metrics
    logger.log_metrics({"train/loss": 2.5}, step=0)
    server.calls_left = None
    logger.log_metrics({"train/loss": 2.0}, step=1)
    mlrun.terminate("FINISHED")
    assert [m.step for m in store.get_metric_history(run_id, "train/loss")] == [0, 1]
    assert store.get_run(run_id).info.status == "FINISHED"
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_resumed_run_sends_what_its_earlier_part_left_pending(tmp_path: Path) -> None:
    """A run that ended during an outage and was resumed in its directory before a replay: the
    resumed part's first outage, once over, deleted the file with the earlier part's calls unsent."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(uri)
    run_id = store.create_run(store.create_experiment("resumed")).info.run_id
    server = Flaky(store)
    server.calls_left = 0
    earlier = pending.ResilientClient(server, uri, tmp_path, retry_seconds=0)
    for step in range(2):
        earlier.log_batch(run_id, metrics=[Metric("train/loss", 2.0 - step / 10, 1_700_000_000_000 + step, step)])
    earlier.set_terminated(run_id, "KILLED")
    earlier.close()

    store.update_run(run_id, status="RUNNING")  # resume reopens it, then logs through a new client
    resumed = pending.ResilientClient(server, uri, tmp_path, retry_seconds=0)
    resumed.log_batch(run_id, metrics=[Metric("train/loss", 1.8, 1_700_000_000_002, 2)])
    server.calls_left = None
    resumed.log_batch(run_id, metrics=[Metric("train/loss", 1.7, 1_700_000_000_003, 3)])
    assert [m.step for m in store.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3]
    assert store.get_run(run_id).info.status == "RUNNING"  # the earlier part's end is not this run's
    assert not (tmp_path / pending.PENDING).exists()


def test_a_line_cut_short_by_a_kill_does_not_stop_the_resumed_run(tmp_path: Path) -> None:
    path = pending_file(tmp_path)
    whole = path.read_text(encoding="utf-8")
    path.write_text(whole + '{"call": "log_batch", "args": ["ru', encoding="utf-8")
    client = pending.ResilientClient(object(), "http://tracking.invalid", tmp_path)
    assert client.pending == len(whole.splitlines())
    assert path.read_text(encoding="utf-8") == whole


def test_a_call_the_server_refuses_once_back_is_set_aside_and_the_rest_is_sent(tmp_path: Path, capsys) -> None:
    """A refused call stayed at the head of the queue: every later logging call of the run raised
    MLflow's refusal (failing training for a logging call), and nothing after it was ever sent."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = mlflow.MlflowClient(uri)
    run_id = store.create_run(store.create_experiment("refused")).info.run_id
    store.log_param(run_id, "optimizer.lr", "0.001")
    server = Flaky(store)
    client = pending.ResilientClient(server, uri, tmp_path, retry_seconds=0)
    server.calls_left = 0
    client.log_metric(run_id, "train/loss", 2.5, step=0)
    client.log_param(run_id, "optimizer.lr", "0.002")  # MLflow never changes a logged param
    client.log_metric(run_id, "train/loss", 2.0, step=1)
    server.calls_left = None
    client.log_metric(run_id, "train/loss", 1.5, step=2)
    assert client.pending == 0 and not (tmp_path / pending.PENDING).exists()
    assert [m.step for m in store.get_metric_history(run_id, "train/loss")] == [0, 1, 2]
    assert store.get_run(run_id).data.params == {"optimizer.lr": "0.001"}
    (refused,) = [json.loads(line) for line in (tmp_path / pending.REFUSED).read_text(encoding="utf-8").splitlines()]
    assert refused["call"] == "log_param" and "0.002" in json.dumps(refused["args"]) and refused["refused"]

    # python -m lmlab.pending does the same, and says so in its exit status.
    (tmp_path / pending.REFUSED).unlink()
    server.calls_left = 0
    client.log_param(run_id, "model.size", "tiny")
    client.log_metric(run_id, "train/loss", 1.0, step=3)
    client.close()
    store.log_param(run_id, "model.size", "small")  # logged meanwhile, by another part of the run say
    assert pending.main([str(tmp_path), uri]) == 1
    assert "the tracking server refused 1 of them" in capsys.readouterr().err
    assert [m.step for m in store.get_metric_history(run_id, "train/loss")] == [0, 1, 2, 3]
    assert not (tmp_path / pending.PENDING).exists()
    assert '"tiny"' in (tmp_path / pending.REFUSED).read_text(encoding="utf-8")
