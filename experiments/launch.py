"""Launching a study's training runs: `gptlab-train` commands on one thread each, in lanes that
run side by side, skipping the runs a previous launch finished.

On a few CPU cores, one thread per run with one run per core is the fastest layout: two
threads of one small run mostly wait for each other at every op. A lane is a function that
trains its runs one after the other; `run_lanes` runs the lanes at once, each in a thread of
its own that waits on its `gptlab-train` processes. A run is done once it has left
results.json (finished) or error.txt (failed, e.g. diverged): a rerun of the study skips both,
so delete a failed run's folder to retry it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gptlab.analysis import load_runs

# Each sweep or run gets a folder of its own, stamped with its start: a rerun never reuses one.
STAMP = "${now:%Y-%m-%d_%H-%M-%S}"


def analysis_arguments(
    description: str,
    steps: int,
    out_dir: Path,
    argv: list[str] | None,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The command line of a study's analysis: where its runs are (--log-dir), the run length
    that counts as finished (--steps) and where the tables and plots go (--out-dir), plus the
    study's own options (`add_options`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out-dir", type=Path, default=out_dir)
    if add_options is not None:
        add_options(parser)
    return parser.parse_args(argv)


def done_settings(root: Path, keys: Sequence[str]) -> set[tuple[str | None, ...]]:
    """The values of the override `keys` of every run under `root` that finished or failed."""
    return {
        tuple(run.overrides.get(k) for k in keys)
        for run in load_runs(root)
        if run.results is not None or run.error is not None
    }


def products(pairs: Iterable[tuple[str, str]]) -> list[tuple[list[str], list[str]]]:
    """(x, y) pairs covered by few products xs x ys, each one Hydra sweep `x=..,.. y=..,..`:
    the ys that need the same xs share one. All pairs of a fresh study make a single product."""
    xs_of: dict[str, list[str]] = {}
    for x, y in pairs:
        xs_of.setdefault(y, []).append(x)
    ys_of: dict[tuple[str, ...], list[str]] = {}
    for y, xs in xs_of.items():
        ys_of.setdefault(tuple(xs), []).append(y)
    return [(list(xs), ys) for xs, ys in ys_of.items()]


def gptlab_train(overrides: Sequence[str], log_file: Path) -> bool:
    """Run `gptlab-train` with `overrides` (add "-m" for a sweep) on one thread, its output
    appended to `log_file`; True if it succeeded. A failed run or sweep job does not stop the
    study: its error.txt says why, and the analysis lists it."""
    command = ["gptlab-train", *overrides]
    say(f"+ {shlex.join(command)}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8") as log:
        log.write(f"\n+ {shlex.join(command)}\n")
        log.flush()
        status = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"OMP_NUM_THREADS": "1"}
        ).returncode
    if status != 0:
        say(f"  exit status {status}: see {log_file}")
    return status == 0


def say(line: str) -> None:
    """Print a line in one write, so that lanes printing at once do not mix their lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_lanes(lanes: Sequence[Callable[[], None]]) -> None:
    """Run the lanes at once, each in a thread of its own; re-raise the first error."""
    with ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(lane) for lane in lanes]:
            future.result()
