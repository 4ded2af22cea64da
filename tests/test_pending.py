"""``python -m lmlab.pending``'s replay: what it could not send stays in the file, and a failure while
rewriting that file never costs a record. No tracking server: a stand-in client refuses one call."""

from __future__ import annotations

import errno
import json
import signal
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Metric, Param

from lmlab import pending

resource = pytest.importorskip("resource")  # RLIMIT_FSIZE: POSIX only


class ServerGone(RuntimeError):
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
