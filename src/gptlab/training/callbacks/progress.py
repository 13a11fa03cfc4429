"""The progress bar of a training run: one line of optimizer progress and the latest logged
loss, redrawn every `refresh_rate` batches.

Lightning's default bar is redrawn after every batch (and is rich's bar when rich is
installed, as the dev and hf extras do through transformers). On a small model on 2 CPU cores
that rich bar cost about 3% of the training throughput (docs/speed_and_scale.md); redrawn at
the logging interval, the bar shows the same numbers, since the loss is only logged there.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class TrainingProgressBar(TQDMProgressBar):
    """tqdm's bar labelled "train" (one endless epoch: an epoch number says nothing), without
    Lightning's version number, redrawn every `refresh_rate` batches."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.set_description("train")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
