"""Crash-safe checkpoint files: Lightning's `TorchCheckpointIO` with atomic, durable writes.

Lightning's own writer serialises into memory and moves a temporary file from the system temp
directory into place, which is neither atomic across filesystems nor fsynced. Here a checkpoint
is written to a temporary file next to its target, fsynced, and renamed over it
(`gptlab.fileio.atomic_write`): a process killed during a save leaves the previous
checkpoint intact, and a failed save (a full disk) removes its temporary file and says why.
Reading a damaged checkpoint fails with a message naming the file.
"""

from __future__ import annotations

import errno
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from gptlab.errors import CheckpointReadError, CheckpointWriteError
from gptlab.fileio import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file in the same directory, fsyncs it, then renames."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except Exception as err:
            cause = _os_error_in(err)
            if cause is None:
                raise
            raise CheckpointWriteError(cause.errno, _explain(cause, path)) from err

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise CheckpointReadError(path, err) from err


def remove_stale_temp_files(path: Path) -> None:
    """Delete temp files that a process killed while saving `path` left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by a save that was interrupted", stale)
        stale.unlink(missing_ok=True)


def _os_error_in(err: BaseException | None) -> OSError | None:
    # torch.save reports a failed write of its file object as a RuntimeError whose context
    # is the OSError that the write raised.
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _explain(err: OSError, path: Path) -> str:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return (
        f"cannot write checkpoint {path}: {reason}. The partial file was removed; the previous "
        f"{path.name}, if any, is intact. Free space (or fix the directory) and resume from "
        "the last checkpoint with ckpt_path=last"
    )
