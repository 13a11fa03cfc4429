"""Checkpoints at given optimizer steps, for branching WSD decays off one stable run.

A WSD run of L steps with a decay of d steps trains exactly as any longer WSD run (same warmup,
seed and data) up to step L - d, so it can start from the longer run's state at that step: a
resume with `ckpt_path=<the checkpoint>` and `trainer.max_steps=L` (docs/tour.md, "Schedules").
The branch points of a study are arbitrary step counts, which validation-time checkpoints
(ModelCheckpoint) only hit if validation runs at every one of them; this callback saves the
full training state (the format `ckpt_path=` resumes exactly) right after each listed step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L


def step_checkpoint_path(dirpath: str | Path, step: int) -> Path:
    """Where `CheckpointAtSteps` saves the state after optimizer step `step`."""
    return Path(dirpath) / f"step{step:06d}.ckpt"


class CheckpointAtSteps(L.Callback):
    """Saves a resumable checkpoint after each optimizer step in `steps` (global steps, as
    trainer.max_steps counts them), to `step_checkpoint_path(dirpath, step)`."""

    def __init__(self, dirpath: str, steps: Sequence[int] = ()) -> None:
        if any(not isinstance(s, int) or s < 1 for s in steps):
            raise ValueError(f"CheckpointAtSteps.steps={list(steps)} must be ints >= 1")
        self.dirpath = dirpath
        self.steps = frozenset(steps)
        self._saved_at = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # With gradient accumulation several micro-batches end at one global step: save once,
        # after the optimizer stepped (the first micro-batch that reaches the new step count).
        step = trainer.global_step
        if step in self.steps and step != self._saved_at:
            self._saved_at = step
            trainer.save_checkpoint(step_checkpoint_path(self.dirpath, step))
