"""How the command-line tools report the errors of `gptlab.errors`: one clear line on stderr
and exit status 1, not a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from hydra.errors import InstantiationException

from gptlab.errors import ERROR_FILE, USER_ERRORS
from gptlab.fileio import atomic_write_text


@contextlib.contextmanager
def report_user_errors(tool: str, sweep_job_dir: str | None = None) -> Iterator[None]:
    """Print `USER_ERRORS` raised inside as ``<tool>: error: <message>``; exit with status 1.
    In a sweep job (`sweep_job_dir`), write the message to its error.txt and return instead,
    so that the sweep's other jobs still run.

    ``HYDRA_FULL_ERROR=1`` re-raises them with the full traceback, as for Hydra's own errors.
    """
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{tool}: error: {describe(err)}", file=sys.stderr)
        if sweep_job_dir is None:
            raise SystemExit(1) from None
        first_line = describe(err).splitlines()[0]
        atomic_write_text(Path(sweep_job_dir) / ERROR_FILE, first_line + "\n")


def describe(err: BaseException) -> str:
    """The message of `err`; for a failed Hydra instantiation, that of the error behind it."""
    cause = err.__cause__
    if isinstance(err, InstantiationException) and isinstance(cause, USER_ERRORS):
        return describe(cause)
    lines = [line.rstrip() for line in str(err).splitlines() if line.strip()]
    return "\n".join(lines) or type(err).__name__
