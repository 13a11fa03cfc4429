"""SIGKILL a real `gptlab-train` twice, resume it each time, and compare with a run never killed.

Every training loss logged after each resume, and the final weights, must equal those of the
uninterrupted run exactly (fp32 on CPU), on one process, under 2-process DDP and under 2-process
FSDP2 (gloo; its checkpoints are sharded folders published by an atomic link swap). The
model has dropout, so the RNG states must survive the kills too.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gptlab.training.checkpoint import load_checkpoint
from tests.kit import TINY_MODEL, start_script

MAX_STEPS = 48
CHECK_EVERY = 6  # validation, hence a checkpoint, every 6 steps
# Kill once the CSV log reaches these steps: 2 steps after a checkpoint (so work is lost) and 3
# steps before the next one, a margin for the poll below to notice the step on a loaded machine.
KILL_AFTER = (8, 26)


def train_args(data_dir: Path, log_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY_MODEL,
        f"corpus.dir={data_dir}",
        "data.loader.batch_size=8",
        "data.loader.val_windows=8",
        "model.dropout=0.1",
        f"trainer.max_steps={MAX_STEPS}",
        f"trainer.val_check_interval={CHECK_EVERY}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "scheduler.warmup_steps=5",
        "callbacks.samples=null",
        "callbacks.throughput=null",
        "+logger.csv._target_=lightning.pytorch.loggers.CSVLogger",
        f"+logger.csv.save_dir={run_dir}",
        "+logger.csv.name=csv",
        "+logger.csv.version=0",
        "+logger.csv.flush_logs_every_n_steps=1",
        f"paths.log_dir={log_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def start(args: list[str], run_dir: Path) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    return start_script("gptlab-train", *args, cwd=run_dir, output=run_dir / "output.txt")


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from the run's CSV log (rows being written are skipped)."""
    path = run_dir / "csv" / "version_0" / "metrics.csv"
    if not path.is_file():
        return {}
    losses = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            try:
                losses[int(row["step"])] = float(row["loss/train"])
            except (KeyError, TypeError, ValueError):
                continue
    return losses


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 150) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = (run_dir / "output.txt").read_text()
    assert proc.returncode == 0, f"gptlab-train failed:\n{output[-4000:]}"


def kill_when_logged(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 150
    while max(logged_losses(run_dir), default=-1) < step:
        assert proc.poll() is None, (run_dir / "output.txt").read_text()[-4000:]
        assert time.monotonic() < deadline, f"{run_dir} never logged step {step}"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"{run_dir} finished before it could be killed"


def checkpoint_step(path: Path) -> int:
    return load_checkpoint(path)["global_step"]  # a file, or a sharded folder (FSDP2)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["state_dict"]


def run_kill_resume_and_compare(data_dir: Path, tmp_path: Path, *extra: str) -> None:
    logs = tmp_path / "logs"
    runs = logs / "train" / "runs"

    # The chain: killed, resumed and killed again, resumed to the end. The reference run goes
    # between the first kill and the first resume, so its last.ckpt is the newest on disk, and
    # `ckpt_path=last` must still pick the newest run named "chain".
    reference = runs / "reference"
    chain = [runs / f"chain{i}" for i in range(3)]
    for i, run_dir in enumerate(chain):
        resume = ["ckpt_path=last"] if i else []
        proc = start(
            train_args(data_dir, logs, run_dir, "run_name=chain", *resume, *extra), run_dir
        )
        if i < len(KILL_AFTER):
            kill_when_logged(proc, run_dir, KILL_AFTER[i])
        else:
            finish(proc, run_dir)
        if i == 0:
            args = train_args(data_dir, logs, reference, "run_name=reference", *extra)
            finish(start(args, reference), reference)

    expected = logged_losses(reference)
    assert sorted(expected) == list(range(MAX_STEPS))
    for i, run_dir in enumerate(chain):
        losses = logged_losses(run_dir)
        steps = sorted(losses)
        if i < len(KILL_AFTER):
            steps = steps[:-1]  # the kill may have torn the last row
        assert {s: losses[s] for s in steps} == {s: expected[s] for s in steps}  # equal floats
        if i > 0:
            killed = chain[i - 1]
            resumed_from = checkpoint_step(killed / "checkpoints" / "last.ckpt")
            assert min(losses) == resumed_from  # continues right after the checkpoint
            assert max(logged_losses(killed)) >= resumed_from + 2  # the kill lost some steps
    assert max(logged_losses(chain[-1])) == MAX_STEPS - 1

    final, uninterrupted = (
        weights(d / "checkpoints" / "last.ckpt") for d in (chain[-1], reference)
    )
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


@pytest.mark.slow
def test_sigkill_twice_then_resume_matches_uninterrupted_run(tiny_data_dir, tmp_path):
    run_kill_resume_and_compare(tiny_data_dir, tmp_path)


@pytest.mark.slow
def test_sigkill_twice_then_resume_matches_uninterrupted_run_ddp(tiny_data_dir, tmp_path):
    run_kill_resume_and_compare(
        tiny_data_dir, tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"
    )


@pytest.mark.slow
def test_sigkill_twice_then_resume_matches_uninterrupted_run_fsdp2(tiny_data_dir, tmp_path):
    run_kill_resume_and_compare(tiny_data_dir, tmp_path, "trainer=fsdp_cpu")
    # Each kill may have hit a save: only published checkpoints and their folders remain.
    for run_dir in (tmp_path / "logs" / "train" / "runs").glob("chain*"):
        folders = {p.name for p in (run_dir / "checkpoints").iterdir() if not p.is_symlink()}
        links = [p for p in (run_dir / "checkpoints").iterdir() if p.is_symlink()]
        assert {p.resolve().name for p in links} <= folders
        assert len(folders) <= len(links) + 1  # at most one save was cut short
