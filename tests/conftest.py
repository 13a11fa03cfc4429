"""Shared fixtures: a tiny prepared dataset of real English and Hydra config composition."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from gptlab.cli import CONFIG_DIR
from gptlab.config_schema import register_schemas
from gptlab.data.prepare import prepare_dataset

# Tests never download: Hugging Face libraries fail fast instead of reaching for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Measured CPU matmul peaks (for MFU) are cached per machine; tests keep theirs to themselves.
os.environ["GPTLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptlab-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPTLAB_CACHE_DIR"], ignore_errors=True)

# A model small enough that a training step takes milliseconds on 2 cores.
TINY_MODEL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]


def small_english_documents(count: int = 120) -> list[str]:
    """Real prose that imports in milliseconds: pydoc's topic help texts."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)[:count]]


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("data") / "tiny"
    prepare_dataset(small_english_documents(), out_dir, vocab_size=512, progress=False)
    return out_dir


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a root config as the CLI would, with output paths outside the repository."""
    register_schemas()  # as gptlab.cli.train does
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
    return cfg


def tiny_run(tiny_data_dir: Path, tmp_path: Path, *extra: str) -> DictConfig:
    """The train config of the tiny model on the tiny data, plus `extra` overrides."""
    overrides = [*TINY_MODEL, f"corpus.dir={tiny_data_dir}", "data.loader.batch_size=16", *extra]
    return compose_config("train", overrides, tmp_path)


# Finetuning: the tiny model with room for whole examples, as a config and as a GPT dict.
FT_MODEL = [*TINY_MODEL, "model.block_size=64"]
QUIET = ["trainer.enable_progress_bar=false", "callbacks.throughput=null"]
TINY_GPT = {"vocab_size": 512, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


def finetune_config(tmp_path: Path, tiny_data_dir: Path, experiment: str, *extra: str):
    """The config of a finetuning `experiment` (sft, classify) of the tiny model."""
    overrides = [*FT_MODEL, *QUIET, f"experiment={experiment}", f"corpus.dir={tiny_data_dir}"]
    return compose_config("train", [*overrides, *extra], tmp_path)


def write_checkpoint(path: Path, model, tokenizer_json: str | None, data_dir: Path | None = None):
    """A checkpoint as gptlab-train writes it (the keys `load_model` reads), without training."""
    import torch

    from gptlab.training.checkpoint import TOKENIZER_KEY

    checkpoint = {
        "hyper_parameters": {"model": model.config.to_dict()},
        "state_dict": {f"model.{name}": value for name, value in model.state_dict().items()},
        TOKENIZER_KEY: tokenizer_json,
    }
    if data_dir is not None:
        checkpoint["datamodule_hyper_parameters"] = {"data_dir": str(data_dir)}
    torch.save(checkpoint, path)
    return path
