"""Validation loss of the pretrained model on the SFT responses, before any finetuning step:
the baseline the finetuning runs improve on.

    python experiments/finetune/baseline.py [hydra overrides, e.g. init_from=path/to/last.ckpt]
"""

from __future__ import annotations

import sys

import lightning as L
from hydra import compose, initialize_config_dir

from gptlab.cli import CONFIG_DIR
from gptlab.training.build import build_datamodule, build_module


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", ["experiment=sft", "init_from=last", *overrides])
    datamodule = build_datamodule(cfg)
    model = build_module(cfg, datamodule)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (metrics,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    print(f"pretrained model, no finetuning: loss/val {metrics['loss/val']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
