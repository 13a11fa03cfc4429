"""Crash-safe file writing: atomic replacement, durable renames, writable-directory checks."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for binary writing; on success it replaces `path`.

    The data is fsynced before the rename and the directory after it, so after a crash `path`
    holds either its old content or the complete new content, never a torn write. On error the
    temp file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates files readable by the owner only; data files are meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def remove_temp_files(path: str | Path) -> None:
    """Delete the temporary files that `atomic_write`s of `path` killed mid-write left beside
    it. Only for a path no other process is writing at the same time."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_directory(directory: Path) -> None:
    """Sync `directory`'s entries: a rename lives there, and a power loss could undo it."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` as UTF-8 to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def ensure_writable_dir(path: str | Path) -> Path:
    """Create directory `path` if needed and prove we can write there, before any real work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise PermissionError(f"output directory {path} is not writable: {e}") from e
    return path
