"""Write-then-rename, so a kill mid-write never leaves a half-written cache, checkpoint or export.

``os.replace`` within one directory is atomic on POSIX and Windows: a reader sees the old file or
the new one, never a mix. The temporary name sits beside the target so the rename never crosses a
file system.

A directory is staged as ``.NAME.tmp-HOST-PID-XXXXXXXX`` beside ``NAME``; a writer killed before it
renamed that (SIGKILL, a power cut) would leave it forever, so the next writer of ``NAME`` removes
those whose owner is gone (see ``remove_stale``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TextIO

log = logging.getLogger(__name__)

# How long a leftover whose owner cannot be asked (another host, or a name without an owner) stays:
# a live writer there may be tokenizing for hours before it writes its first file.
STALE_AFTER_SECONDS = 24 * 3600


def _fsync_dir(directory: Path) -> None:
    # The rename itself lives in the directory entry; without this a power cut may undo it.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    # /proc reads it without the set-and-restore below, which another thread could observe.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open()`` / ``mkdir`` would.

    Writers that stage through ``mkstemp`` (safetensors' ``save_file``, hence every
    ``save_pretrained``) leave 0600 files, which other users of a shared file system cannot read.
    Files keep their executable bits, if any, so a staged script stays runnable.
    """
    mask = _umask()
    for path in [Path(root), *Path(root).rglob("*")]:
        if path.is_symlink():
            continue  # chmod would follow it to a file this writer does not own
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        else:
            runnable = path.stat().st_mode & 0o111
            os.chmod(path, (0o777 if runnable else 0o666) & ~mask)


def tmp_name(final: Path) -> Path:
    """Where ``atomic_file`` stages ``final``: ``name.tmp`` beside it."""
    return final.with_name(final.name + ".tmp")


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``final`` only once the block finishes without an error."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(final)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_text(final: Path, newline: str | None = None) -> Iterator[TextIO]:
    """``atomic_file`` as UTF-8 text; ``newline`` as ``open()`` takes it ("" for the csv module)."""
    with atomic_file(final) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline=newline)
        try:
            yield text
        finally:
            # Detached, not closed: closing would close ``raw`` before atomic_file syncs and renames it.
            text.detach()


def write_text(final: Path, text: str) -> Path:
    with atomic_file(final) as handle:
        handle.write(text.encode("utf-8"))
    return Path(final)


def write_json(final: Path, data: Any) -> Path:
    return write_text(final, json.dumps(data, indent=2, sort_keys=True) + "\n")


@functools.lru_cache(maxsize=1)
def this_host() -> str:
    """The host part of staging names: the host name, and where Linux tells them, a digest of its boot
    and PID namespace.

    A process id is checked only on the host, boot and PID namespace that gave it: two containers
    sharing a host name, or a machine rebooted after a power cut, number their processes anew.
    """
    name = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        space = f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return name
    return f"{name}_{hashlib.sha256(space.encode()).hexdigest()[:8]}"


def _prefix(final: Path, kind: str, host: str, pid: int) -> str:
    return f".{final.name}.{kind}-{host}-{pid}-"


def staging_name(final: Path, kind: str = "tmp", *, host: str | None = None, pid: int | None = None) -> str:
    """A name beside ``final`` owned by this process (or ``host`` / ``pid``): ``kind`` is ``tmp`` for
    what becomes ``final``, ``old`` for the previous ``final`` moved aside to be replaced."""
    return _prefix(final, kind, host or this_host(), os.getpid() if pid is None else pid) + secrets.token_hex(4)


def _owner(final: Path, name: str) -> tuple[str | None, int] | None:
    """(host, pid) of a staging name of ``final``; (None, 0) for one written before names held their
    owner (``tempfile.mkdtemp``'s ``.NAME.XXXXXXXX``, ``.NAME.old.PID``); None for any other name."""
    stem = re.escape(final.name)
    named = re.fullmatch(rf"\.{stem}\.(?:tmp|old)-(.+)-(\d+)-[a-z0-9_]+", name)
    if named:
        return named.group(1), int(named.group(2))
    if re.fullmatch(rf"\.{stem}\.(?:[a-z0-9_]{{8}}|old\.\d+)", name):
        return None, 0
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid() or pid <= 0:  # 0 and below would signal process groups
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _last_written(path: Path) -> float:
    newest = 0.0
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            newest = max(newest, p.lstat().st_mtime)
    return newest


def _is_stale(path: Path, host: str | None, pid: int) -> bool:
    # os.kill(pid, 0) would end the process on Windows: there, as on another host, the age decides.
    if host == this_host() and os.name == "posix":
        return not _alive(pid)
    return time.time() - _last_written(path) > STALE_AFTER_SECONDS


def remove_stale(final: Path) -> list[Path]:
    """Remove the staging folders of ``final`` whose writer is gone; return them.

    Gone: a process of this host that no longer exists, or, where it cannot be asked, nothing written
    for ``STALE_AFTER_SECONDS``. A live writer's folder is kept: several processes may fill one cache
    entry at once (DDP ranks, a sweep's jobs). A folder that cannot be removed (a read-only cache) is
    left as it is.
    """
    final = Path(final)
    removed = []
    try:
        names = os.listdir(final.parent)
    except OSError:
        return removed
    for name in names:
        owner = _owner(final, name)
        path = final.parent / name
        if owner is None or path.is_symlink() or not path.is_dir() or not _is_stale(path, *owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            log.info("Removed %s, left by a writer that was killed before it finished", path)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A new empty folder beside ``final`` to write it in, once killed writers' leftovers are gone;
    removed again if the block raises (what it was renamed to is the block's to keep).

    The folder is made inside the ``try`` rather than by ``tempfile.mkdtemp`` before it: a SIGTERM's
    exception raised between the ``mkdir`` and the ``try`` left the folder behind for good (seen in
    ``test_signals``). The name holds this process's id and 32 random bits, so it is new.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = final.with_name(staging_name(final))
    try:
        os.mkdir(tmp, 0o700)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, final: Path, tries: int = 20) -> None:
    """Rename ``tmp`` to ``final``, moving a ``final`` already there aside (and deleting it).

    Another process finishing the same cache entry (DDP ranks tokenize the same corpus at the same
    pace) may publish, or move ``final`` aside, between any two of these steps: a rename that finds
    ``final`` changed under it looks again instead of failing the run.
    """
    for attempt in range(tries):
        old = final.with_name(staging_name(final, "old")) if final.exists() else None
        try:
            if old is not None:
                os.replace(final, old)
            os.replace(tmp, final)
            return
        except FileNotFoundError:  # another writer moved final aside first
            if attempt == tries - 1 or not tmp.exists():
                raise
        except OSError as exc:  # another writer published final first
            if attempt == tries - 1 or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        finally:
            if old is not None:
                if final.exists():
                    shutil.rmtree(old, ignore_errors=True)
                elif old.exists():
                    # Stopped between the two renames (a SIGTERM's exception, a rename refused): the
                    # previous content goes back under its name rather than waiting aside, unnamed,
                    # for the next writer to delete it. Only SIGKILL still leaves it aside.
                    with contextlib.suppress(OSError):
                        os.replace(old, final)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``final`` only if the block succeeds.

    Replacing an existing directory takes two renames (POSIX cannot swap directories in one): an
    exception between them (a signal's) puts the previous content back; SIGKILL there leaves it as
    ``.NAME.old-HOST-PID-XXXXXXXX`` beside the missing ``final``, which the next writer removes with
    the rest of the leftovers.
    """
    final = Path(final)
    with staging_dir(final) as tmp:
        yield tmp
        plain_permissions(tmp)  # the staging folder's 0700 and mkstemp'd files' 0600 would otherwise stick
        _swap_in(tmp, final)
    _fsync_dir(final.parent)
