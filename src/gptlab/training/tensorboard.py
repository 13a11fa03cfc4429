"""What a run's TensorBoard shows first: the losses.

TensorBoard orders its cards by tag, alphabetically, so the tags are named for that order:
`accuracy/*` (classifiers), `loss/train`, `loss/val`, `loss/val_ppl`, then `lr-*` (the learning
rates), `model/*` (attention diagnostics), `perf/*` (tokens/s, MFU) and `stability/*`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

# Tags of runs logged before the renaming, and what they are called now (gptlab.analysis reads
# old runs under the new names).
RENAMED_TAGS = {
    "train/loss": "loss/train",
    "val/loss": "loss/val",
    "val/ppl": "loss/val_ppl",
    "train/acc": "accuracy/train",
    "val/acc": "accuracy/val",
    "val/majority_acc": "accuracy/val_majority",
    "train/loss_spikes": "stability/loss_spikes",
    "train/skipped_steps": "stability/skipped_steps",
    "attention/entropy/": "model/attention_entropy/",
    "attention/sink/": "model/attention_sink/",
    "attention/map/": "model/attention_map/",
}


def current_tag(tag: str) -> str:
    """The name a tag of an older run has now."""
    for old, new in RENAMED_TAGS.items():
        if tag == old or (old.endswith("/") and tag.startswith(old)):
            return new + tag[len(old) :]
    return tag


class StreamTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger for training on an endless token stream.

    - No `epoch` scalar: the stream is one endless epoch, so Lightning's flat `epoch` curve would
      only push the losses down the page.
    - Hyperparameters name the run's own curves as their metrics (the HParams tab reads each
      curve's last value), instead of logging a copy of every metric under `hparams/`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._linking_hparams = False

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if self._linking_hparams:
            return  # the values are on their curves already
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)

    def log_hyperparams(
        self, params: Any, metrics: Mapping[str, Any] | None = None, step: int | None = None
    ) -> None:
        self._linking_hparams = True
        try:
            super().log_hyperparams(params, metrics, step)
        finally:
            self._linking_hparams = False


def tensorboard_writer(trainer: L.Trainer) -> Any | None:
    """The SummaryWriter of the Trainer's TensorBoard logger, if it has one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
