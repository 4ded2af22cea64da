"""A run keeps training when its MLflow tracking server goes away mid-run; nothing it logs is lost.

``ResilientClient`` stands in for the ``MlflowClient`` of one run (lmlab's own calls and Lightning's
MLFlowLogger both go through it). A write that fails because the server cannot be reached is queued
in memory and appended to ``<run dir>/mlflow_pending.jsonl`` (flushed per record, so even a killed
process keeps it, all but a metric write still in lmlab.background_log's queue), and the user is
told once. Later writes first send the queue, in order, at most every ``retry_seconds`` (a quick
TCP probe first, so a dead server costs no HTTP retries). The run's
end tries once more; what is still unsent stays in the file and ``python -m lmlab.pending RUN_DIR``
sends it when the server is back. Errors that are not about reaching the server (a bad value)
propagate as before: queueing them would only hide them. A queued call the server refuses once it is
back (a param that changed, a value past its limits) is set aside in ``mlflow_refused.jsonl`` with
the server's answer, and the calls after it are sent: left at the head of the queue it blocked every
later write, and raised from whichever logging call came next.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmlab.atomic import atomic_text

log = logging.getLogger(__name__)

PENDING = "mlflow_pending.jsonl"
REFUSED = "mlflow_refused.jsonl"
# The writes that are queued during an outage; reads (get_run, search) still raise.
_QUEUED = ("log_batch", "log_metric", "log_param", "set_tag", "log_artifact", "log_artifacts", "log_dict",
           "set_terminated")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the server could not be reached (as opposed to refusing a request)."""
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - mlflow depends on requests
        pass
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout)):
        return True
    # MLflow wraps transport errors as MlflowException("API request to ... failed with exception ...").
    text = str(exc)
    return type(exc).__name__ == "MlflowException" and "failed with exception" in text


def is_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is the tracking store's answer refusing a request (an MlflowException that is no outage)."""
    from mlflow.exceptions import MlflowException  # RestException (a server's answer) is one

    return isinstance(exc, MlflowException) and not is_outage(exc)


def _encode(name: str, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag

    def plain(value: Any) -> Any:
        if isinstance(value, Metric):
            return {"metric": [value.key, value.value, value.timestamp, value.step]}
        if isinstance(value, Param):
            return {"param": [value.key, value.value]}
        if isinstance(value, RunTag):
            return {"tag": [value.key, value.value]}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {"call": name, "args": plain(list(args)), "kwargs": {k: plain(v) for k, v in kwargs.items()}}


def _decode(record: dict[str, Any]) -> tuple[str, list, dict[str, Any]]:
    from mlflow.entities import Metric, Param, RunTag

    def entity(value: Any) -> Any:
        if isinstance(value, dict) and len(value) == 1:
            (kind, fields), = value.items()
            if kind == "metric":
                return Metric(*fields)
            if kind == "param":
                return Param(*fields)
            if kind == "tag":
                return RunTag(*fields)
        if isinstance(value, list):
            return [entity(v) for v in value]
        return value

    return record["call"], entity(record["args"]), {k: entity(v) for k, v in record["kwargs"].items()}


class ResilientClient:
    """An ``MlflowClient`` whose writes survive a tracking-server outage (see the module docstring)."""

    def __init__(self, client: Any, uri: str, run_dir: Path, retry_seconds: float = 30.0):
        self._client = client
        self._uri = uri
        self._file = Path(run_dir) / PENDING
        self._queue = self._left_over()
        self._retry_seconds = retry_seconds
        self._next_try = 0.0
        self._warned = False

    def _left_over(self) -> list[dict[str, Any]]:
        """The calls an earlier part of a resumed run left in its directory: they go first. Left
        behind, the next outage's end deleted the file with them unsent."""
        if not self._file.is_file():
            return []
        lines = [line for line in self._file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # the line a kill cut short: that call never completed
                continue
            # That part's end is not this one's: sent now, it would mark the reopened run KILLED or FINISHED.
            if record["call"] != "set_terminated":
                kept.append(record)
        if not kept:
            self._file.unlink()
            return []
        if len(kept) < len(lines):
            self._rewrite(kept)
        log.warning("%d logging calls of an earlier part of this run were never sent to %s (%s): they are sent "
                    "before this part's.", len(kept), self._uri, self._file)
        return kept

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in _QUEUED:
            return attr
        return lambda *args, **kwargs: self._write(name, args, kwargs)

    def get_run(self, run_id: str) -> Any:
        # Whoever asks for the run during an outage (MLflow's logger, a status check) gets "no run"
        # at once instead of MLflow's retries; lmlab's own set_terminated is queued meanwhile.
        if self._queue and not self._reachable():  # still down: a refused connect, not MLflow's retries
            return None
        try:
            return self._client.get_run(run_id)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._tell(exc)
            return None

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _write(self, name: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._queue and not self.flush():
            return self._enqueue(name, args, kwargs)  # keep the order: nothing overtakes what waits
        try:
            return getattr(self._client, name)(*args, **kwargs)
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._tell(exc)
            return self._enqueue(name, args, kwargs)

    def _enqueue(self, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        record = _encode(name, args, kwargs)  # only when queued: the healthy path stays a plain call
        self._queue.append(record)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        with open(self._file, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
            out.flush()
        return None

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        with atomic_text(self._file) as out:  # staged and renamed: a crash leaves the previous file whole
            out.write("".join(json.dumps(r) + "\n" for r in records))

    def _tell(self, exc: BaseException) -> None:
        self._next_try = time.monotonic() + self._retry_seconds
        if not self._warned:
            self._warned = True
            log.warning("MLflow tracking server %s cannot be reached (%s). Training goes on; what the run logs "
                        "is kept in %s and sent when the server is back.", self._uri,
                        " ".join(str(exc).split())[:200], self._file)

    def _reachable(self) -> bool:
        parsed = urlparse(self._uri)
        if parsed.scheme not in ("http", "https"):
            return True
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname, port), timeout=2):
                return True
        except OSError:
            return False

    def flush(self, force: bool = False) -> bool:
        """Send the queue in order; True when it is empty afterwards."""
        if not self._queue:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        if not self._reachable():
            self._next_try = time.monotonic() + self._retry_seconds
            return False
        sent = 0
        try:
            while self._queue:
                name, args, kwargs = _decode(self._queue[0])
                try:
                    getattr(self._client, name)(*args, **kwargs)
                except Exception as exc:
                    if is_refusal(exc):
                        set_aside(self._file.parent, self._queue[0], exc, self._uri)
                    elif is_outage(exc):
                        self._next_try = time.monotonic() + self._retry_seconds
                        return False
                    else:
                        raise
                self._queue.pop(0)
                sent += 1
        finally:
            if self._queue and sent:
                # What went out leaves the file too: a replay would send it again, and a log_metric
                # (its timestamp taken when sent) would be a second point.
                self._rewrite(self._queue)
        self._file.unlink(missing_ok=True)
        log.warning("MLflow tracking server %s is back: everything the run logged meanwhile was sent.", self._uri)
        return True

    def close(self) -> None:
        """Last try at the run's end; says what is left and how to send it."""
        if self._queue and not self.flush(force=True):
            log.warning("MLflow tracking server %s is still unreachable: %d logging calls of this run are in %s. "
                        "Send them once it is back: python -m lmlab.pending %s", self._uri, len(self._queue),
                        self._file, self._file.parent)


def set_aside(run_dir: Path, record: dict[str, Any], exc: BaseException, uri: str) -> None:
    """Keep a queued call the server refused, with its answer, in ``<run dir>/mlflow_refused.jsonl``."""
    answer = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    with open(Path(run_dir) / REFUSED, "a", encoding="utf-8") as out:
        out.write(json.dumps({**record, "refused": answer}) + "\n")
    log.warning("MLflow tracking server %s refused a logging call kept from its outage (%s): %s. The call is kept "
                "in %s and the calls after it are sent.", uri, record["call"], answer, Path(run_dir) / REFUSED)


def replay(run_dir: str | Path, tracking_uri: str | None = None) -> int:
    """Send a run's ``mlflow_pending.jsonl`` to its server; returns how many calls were sent.

    Calls the server refuses are set aside in ``mlflow_refused.jsonl`` (see ``set_aside``).
    """
    import mlflow

    run_dir = Path(run_dir)
    path = run_dir / PENDING
    if not path.exists():
        return 0
    if tracking_uri is None:
        record = json.loads((run_dir / "lmlab_run.json").read_text(encoding="utf-8"))
        tracking_uri = record["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    sent = 0
    for done, record in enumerate(lines):
        name, args, kwargs = _decode(record)
        try:
            getattr(client, name)(*args, **kwargs)
            sent += 1
        except Exception as exc:
            if is_refusal(exc):
                set_aside(run_dir, record, exc, tracking_uri)
                continue
            # Keep what is left, so a second replay sends only that; staged and renamed, so a crash
            # mid-rewrite leaves the whole previous file (what was sent goes again) rather than a torn one.
            with atomic_text(path) as out:  # newline=None, as the file was appended
                out.write("".join(json.dumps(r) + "\n" for r in lines[done:]))
            raise
    path.unlink()
    return sent


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        print("usage: python -m lmlab.pending RUN_DIR [TRACKING_URI]", file=sys.stderr)
        return 2
    run_dir = Path(args[0])
    if not (run_dir / PENDING).exists():
        if not (run_dir / "lmlab_run.json").is_file():
            print(f"lmlab.pending: error: '{run_dir}' is not an lmlab run directory (no lmlab_run.json or "
                  f"{PENDING} there). Give the run's output directory, the one the run's warning named.",
                  file=sys.stderr)
            return 2
        print(f"nothing pending in {run_dir}: everything was sent (by the run, or by an earlier replay)")
        return 0
    calls = sum(1 for line in (run_dir / PENDING).read_text(encoding="utf-8").splitlines() if line.strip())
    sent = replay(*args)
    print(f"sent {sent} logging calls from {run_dir / PENDING}")
    if sent < calls:
        print(f"lmlab.pending: error: the tracking server refused {calls - sent} of them (its answers are above); "
              f"they are kept in {run_dir / REFUSED} with those answers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
