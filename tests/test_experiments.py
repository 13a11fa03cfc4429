"""Every config under configs/experiment/ composes and trains one fast_dev_run step, and every
value its Hydra sweep names is a valid override. Globs the folder: new experiments are covered."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.train import train
from gptlab.model import GPTConfig
from gptlab.scaling.plan import ScalingConfig, model_shape
from tests.kit import TINY_MODEL, compose_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def test_the_ablations_are_there():
    assert {"attention_ablation", "position_ablation"} <= set(EXPERIMENTS)


# The built-in SFT examples (prompt + docstring paragraph) do not fit TINY_MODEL's 32 tokens.
EXTRA_OVERRIDES = {"sft": ["model.block_size=128"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_step(experiment, tiny_data_dir, tmp_path):
    overrides = [
        f"experiment={experiment}",
        f"corpus.dir={tiny_data_dir}",
        *TINY_MODEL,
        *EXTRA_OVERRIDES.get(experiment, []),
        "debug=fast_dev_run",
    ]
    results = train(compose_config("train", overrides, tmp_path))
    assert results["step"] == 1
    assert math.isfinite(results["val_loss"])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_swept_value_composes_to_a_valid_model(experiment):
    base = f"experiment={experiment}"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        sweep = compose("train", [base], return_hydra_config=True).hydra.sweeper.params or {}
        for key, values in sweep.items():  # sweep is null for a single-run experiment
            for value in str(values).split(","):
                cfg = compose("train", [base, f"{key}={value}"])
                model = OmegaConf.to_container(cfg.model)
                if cfg.get("scaling") is not None:  # unless set, depth and heads follow width
                    scaling = ScalingConfig(**OmegaConf.to_container(cfg.scaling))
                    n_layer, n_head = model_shape(model["n_embd"], scaling)
                    model["n_layer"] = model["n_layer"] or n_layer
                    model["n_head"] = model["n_head"] or n_head
                GPTConfig.from_dict({**model, "vocab_size": model["vocab_size"] or 4096})
