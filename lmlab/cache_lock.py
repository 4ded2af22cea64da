"""One filler per cache entry: the processes that want an entry that is not there yet (every rank of
a DDP run on a cold cache, the jobs of a parallel sweep) take turns, so the first trains the
tokenizer or packs the blocks and the others wait, then read what it wrote.

Without it each of N processes did the whole work itself and all but one copy was thrown away
(``atomic_dir`` keeps whichever lands last). The lock is an advisory ``flock`` on a small file in
the cache's ``locks`` folder; the kernel drops it when its holder dies, so a killed filler blocks
nobody. Where the file system refuses ``flock`` (some network mounts), each process fills the
entry itself, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no flock; every process fills the entry itself
    fcntl = None


def lock_path(entry: Path) -> Path:
    """CACHE/locks/data/causal-128-xxx.lock for CACHE/data/causal-128-xxx: out of the folders whose
    listing is the cache's entries, and not hidden, which would read as a writer's staging folder."""
    return entry.parent.parent / "locks" / entry.parent.name / f"{entry.name}.lock"


@contextlib.contextmanager
def filling(entry: Path) -> Iterator[None]:
    """Held while this process fills ``entry``; read the entry again once inside: another process
    may have filled it while this one waited."""
    if fcntl is None:
        yield
        return
    path = lock_path(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        log.info("Cache lock %s cannot be opened (%s); filling the entry without it", path, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Waiting for another process to fill cache entry %s", entry)
            _wait(fd, path)
        except OSError as exc:  # ENOLCK and the like: no locking on this mount
            log.info("Cache lock %s is not supported here (%s); filling the entry without it", path, exc)
        yield
    finally:
        os.close(fd)  # releases the lock


def _wait(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        log.info("Cache lock %s failed while waiting (%s); filling the entry without it", path, exc)
