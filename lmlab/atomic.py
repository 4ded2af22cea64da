"""Write-then-rename, so a kill mid-write never leaves a half-written cache, checkpoint or export.

``os.replace`` within one directory is atomic on POSIX and Windows: a reader sees the old file or
the new one, never a mix. The temporary name sits beside the target so the rename never crosses a
file system.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


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
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def write_text(final: Path, text: str) -> Path:
    with atomic_file(final) as handle:
        handle.write(text.encode("utf-8"))
    return Path(final)


def write_json(final: Path, data: Any) -> Path:
    return write_text(final, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``final`` only if the block succeeds.

    Replacing an existing directory takes two renames (POSIX cannot swap directories in one): a
    kill between them leaves the previous content as ``.NAME.old.PID`` beside the missing ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise stick to the result
        yield tmp
        if final.exists():
            # Another process finished the same cache entry first, or an export is replaced.
            old = final.with_name(f".{final.name}.old.{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
