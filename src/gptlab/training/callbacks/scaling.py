"""The training side of one scaling-law run: log its N, D and C, and record its result."""

from __future__ import annotations

import logging
import time

import lightning as L

from gptlab.scaling.plan import ScalingRun

log = logging.getLogger(__name__)


class ScalingRunCallback(L.Callback):
    """Logs the planned N, D and C of `run` when fitting starts; after the last planned step,
    once validated, writes the run's record (its validation loss and time) for gptlab-scaling."""

    def __init__(self, run: ScalingRun) -> None:
        self.run = run
        self.plan = run.plan
        self._final_val: tuple[int, float] | None = None
        self._started = (0.0, 0.0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(self.run.metrics(), step=0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("loss/val")
        if loss is not None and not trainer.sanity_checking:
            self._final_val = (trainer.global_step, float(loss))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the run, if it is a complete sweep point: all planned steps, then validated."""
        step = trainer.global_step
        if trainer.fast_dev_run or step != self.plan.steps:
            log.warning("scaling run stopped at step %d of %d: not recorded", step, self.plan.steps)
            return
        if self._final_val is None or self._final_val[0] != step:
            log.warning(
                "scaling run: no validation after the last step %d (validation is switched "
                "off): not recorded",
                step,
            )
            return
        if trainer.is_global_zero:
            wall, cpu = self._started
            self.run.write_record(
                "finished",
                val_loss=self._final_val[1],
                train_seconds=time.perf_counter() - wall,
                cpu_seconds=time.process_time() - cpu,
            )
            print(
                f"scaling run: N={self.plan.params:,} ({self.plan.non_embedding_params:,} "
                f"non-embedding), D={self.plan.tokens:,} tokens ({self.plan.epochs:.2f} epochs), "
                f"C={self.plan.flops:.3g} FLOPs, val loss {self._final_val[1]:.4f}"
            )
