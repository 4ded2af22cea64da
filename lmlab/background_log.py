"""MLflow metric writes leave the training thread; every other call waits for them first.

Lightning's MLFlowLogger writes each logging step's metrics with a blocking call, and the training
loop waits through it: 4-5 ms to the embedded SQLite store on a 2.1 GHz Xeon (3% of a tiny model's
CPU step at trainer=cpu's logging interval), a network round trip or more to a tracking server,
and during a server outage lmlab.pending's reachability probe, up to 2 s. ``BackgroundWriter``
hands metric writes (``log_batch`` with metrics alone, ``log_metric``) to one worker thread, in
order. Any other call (params, tags, artifacts, ``set_terminated``, reads) first waits until the
worker has sent everything before it, so the store receives the calls in the order they were
made. An error the worker meets is raised in the calling thread at its next call to the client,
where a blocking write would have raised it one logging step earlier.

Checkpoints are the exception (``MetricsBeforeCheckpoints``). A run killed just after a checkpoint
resumes from it without redoing the steps before it, so their metrics must be in the store first:
a checkpoint waits for the queued writes, and the write that follows it (the checkpointed step's
own metrics, which Lightning logs after saving) is made in the calling thread, as it was before
this module. That costs one blocking write per checkpoint, not per logging step.

Not MLflow's own ``synchronous=False``: its errors never reach the caller, and lmlab.pending has
to see an outage's error to keep the write for later instead of losing it.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import lightning as L

_STOP = object()


def _is_metrics_only(name: str, args: tuple, kwargs: dict[str, Any]) -> bool:
    if name == "log_metric":
        return True
    if name != "log_batch":
        return False
    # log_batch(run_id, metrics=(), params=(), tags=(), ...): params and tags go in order with the rest.
    params = kwargs.get("params", args[2] if len(args) > 2 else None)
    tags = kwargs.get("tags", args[3] if len(args) > 3 else None)
    return not params and not tags


class BackgroundWriter:
    """Wraps an ``MlflowClient`` (or lmlab.pending's ``ResilientClient``); see the module docstring."""

    def __init__(self, client: Any):
        self._client = client
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._next_inline = False

    @property
    def client(self) -> Any:
        return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # this object's own state (also while unpickling, before it exists)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if _is_metrics_only(name, args, kwargs):
                if not (self._closed or self._next_inline):
                    self._submit(name, args, kwargs)
                    return None
                self._next_inline = False
            self.wait()
            return attr(*args, **kwargs)

        return call

    def __getstate__(self) -> dict[str, Any]:
        # A launcher that pickles the Trainer (ddp_spawn) takes the client; the queue stays here.
        self.wait()
        return {"client": self._client}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["client"])

    def _submit(self, name: str, args: tuple, kwargs: dict[str, Any]) -> None:
        self._raise_error()
        if self._thread is None:
            # A daemon: a process that dies without terminate() must not hang on a blocked write.
            self._thread = threading.Thread(target=self._work, name="lmlab-mlflow-writer", daemon=True)
            self._thread.start()
        self._queue.put((name, args, kwargs))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:  # after a failure the rest is dropped; the caller will fail
                    name, args, kwargs = item
                    getattr(self._client, name)(*args, **kwargs)
            except BaseException as exc:  # handed to the calling thread
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self) -> None:
        """Block until every write handed over so far is sent; raise the error one of them met."""
        self._queue.join()
        self._raise_error()

    def checkpoint_barrier(self) -> None:
        """Before a checkpoint: send what is queued, and make the next metric write in the caller's thread."""
        self.wait()
        self._next_inline = True

    def close(self) -> BaseException | None:
        """Send what is queued, stop the worker and return (not raise) the error a write met.

        Later calls go straight to the wrapped client. For the end of a run, which must still mark
        the run terminated after a failed write.
        """
        if self._thread is not None:
            self._queue.put(_STOP)
            self._queue.join()
            self._thread.join()
            self._thread = None
        self._closed = True
        error, self._error = self._error, None
        return error


class MetricsBeforeCheckpoints(L.Callback):
    """Before any checkpoint is written, the queued metrics are sent and the next ones will be sent
    at once (see the module docstring)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            client = getattr(logger, "_mlflow_client", None)  # set by lmlab.run_log.RunLog.metrics_logger
            if isinstance(client, BackgroundWriter):
                client.checkpoint_barrier()
