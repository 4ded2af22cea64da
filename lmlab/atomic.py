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
        yield tmp
        plain_permissions(tmp)  # mkdtemp's 0700 and mkstemp'd files' 0600 would otherwise stick
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
