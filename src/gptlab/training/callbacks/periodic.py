"""The shape that samples, diagnostics and task scores share: act every N steps and at the end."""

from __future__ import annotations

import lightning as L


class EveryNStepsCallback(L.Callback):
    """Calls `on_scheduled_step` after every `every_n_steps`-th optimizer step and once more when
    training ends (unless the last step was one of them), so the final weights are covered.

    With gradient accumulation several micro-batches end at the same global step; each step
    is acted on once. Subclasses may also call `act` themselves (say, at the start).
    """

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self._acted_at_step = -1

    def on_scheduled_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """What the callback does at a scheduled step (called on every rank)."""
        raise NotImplementedError

    def act(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._acted_at_step = trainer.global_step
        self.on_scheduled_step(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step > 0 and step != self._acted_at_step:
            self.act(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._acted_at_step:
            self.act(trainer, pl_module)
