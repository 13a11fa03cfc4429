"""Every error a user can fix, and the tuple of them that the command-line tools catch.

A tool prints such an error as one line, ``<tool>: error: <message>``, and exits with status 1
(`gptlab.cli.errors.report_user_errors`); every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

from hydra.errors import InstantiationException


class DataError(ValueError):
    """Bad data or configuration, described well enough to fix without a traceback."""


class ShardError(DataError):
    """A shard file is malformed or does not match what it should contain."""


class CheckpointReadError(ValueError):
    """A checkpoint file is truncated, corrupt, or holds more than tensors and plain data."""

    def __init__(self, path: str | Path, err: BaseException) -> None:
        super().__init__(
            f"cannot read checkpoint {path}: {err}. It is truncated, corrupt or not a gptlab "
            "checkpoint; resume from another one (e.g. ckpt_path=last)"
        )


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file under that name is intact."""


class TrainingDivergedError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


# Bad values and data (ValueError: DataError, ShardError, CheckpointReadError), missing or
# unwritable files and full disks (OSError: CheckpointWriteError), a diverged run
# (TrainingDivergedError), and errors raised while Hydra builds a `_target_` (the datamodule,
# Trainer, callbacks, loggers).
USER_ERRORS = (ValueError, OSError, FloatingPointError, InstantiationException)
ERROR_FILE = "error.txt"  # in a sweep job's folder: the error that stopped it
