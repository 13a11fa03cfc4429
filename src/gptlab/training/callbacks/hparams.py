"""The HParams dashboard of TensorBoard: each run's hyperparameters next to its final metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L

from gptlab.training.tensorboard import StreamTensorBoardLogger


class HParamsCallback(L.Callback):
    """When fitting ends, log the run's hyperparameters with its final `metrics` to every
    TensorBoard logger, so the HParams tab lists the runs of a sweep as a sortable table.

    The hyperparameters are LitGPT's (model, optimizer, scheduler), the data module's, the
    Trainer's step budget, accumulation, precision and world size, and `params` (config values
    that live elsewhere, such as the tokenizer). The metrics are the run's own curves (e.g.
    ``loss/val``): the HParams tab shows the last value of each.
    """

    def __init__(
        self,
        metrics: Sequence[str] = ("loss/val", "loss/val_ppl", "loss/train"),
        params: Mapping[str, Any] | None = None,
    ) -> None:
        self.metrics = list(metrics)
        self.params = dict(params or {})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, StreamTensorBoardLogger)]
        if not loggers:
            return
        params = self.run_params(trainer, pl_module)
        values = {name: trainer.callback_metrics.get(name) for name in self.metrics}
        metrics = {
            name: float(value)
            for name, value in values.items()
            if value is not None and math.isfinite(float(value))
        }
        for logger in loggers:
            logger.log_hyperparams(params, metrics, step=trainer.global_step)
            logger.save()

    def run_params(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        return {
            **pl_module.hparams,
            "data": dict(getattr(datamodule, "hparams", {})),
            "trainer": {
                "max_steps": trainer.max_steps,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "precision": str(trainer.precision),
                "world_size": trainer.world_size,
            },
            **self.params,
        }
