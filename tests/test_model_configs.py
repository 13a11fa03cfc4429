"""The model configs: presets sized as the published models, and every variant group file a
one-value swap that lands in cfg.model. Globs configs/model/, so new files are covered."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.model import GPT, GPTConfig
from tests.kit import compose_config

MODEL_DIR = Path(CONFIG_DIR) / "model"
PRESETS = sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))
GROUP_OPTIONS = sorted(
    (p.parent.name, p.stem) for p in MODEL_DIR.glob("*/*.yaml")
)  # e.g. ("position", "rope")

# Parameter counts of the published checkpoints (Hugging Face `num_parameters()`).
PUBLISHED = {
    "gpt2_124m": 124_439_808,  # openai-community/gpt2
    "llama_style": 1_100_048_384,  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
}


def model_config(tmp_path: Path, *overrides: str) -> GPTConfig:
    cfg = compose_config("train", list(overrides), tmp_path)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["vocab_size"] is None:
        model["vocab_size"] = 4096  # what the data would supply
    return GPTConfig.from_dict(model)


def count_on_meta(config: GPTConfig) -> GPT:
    with torch.device("meta"):  # shapes only: a 1.1B model is built in milliseconds
        return GPT(config)


def test_presets_include_the_issue_three():
    assert {"nano", "gpt2_124m", "llama_style"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_parameter_counts(preset, tmp_path):
    model = count_on_meta(model_config(tmp_path, f"model={preset}"))
    total, body = model.num_params(), model.num_params(non_embedding=True)
    print(f"{preset}: {total:,} parameters ({body:,} non-embedding)")
    if preset in PUBLISHED:
        assert total == PUBLISHED[preset]
    assert 0 < body < total


def test_llama_style_is_the_llama_recipe(tmp_path):
    c = model_config(tmp_path, "model=llama_style")
    assert (c.position, c.norm, c.mlp, c.bias, c.tie_weights) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
        False,
    )
    assert c.kv_heads == 4 < c.n_head
    assert count_on_meta(c).blocks[0].mlp.c_fc.out_features == 5632


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default (nano) model config as a plain dict."""
    cfg = compose_config("train", [], tmp_path_factory.mktemp("base"))
    return OmegaConf.to_container(cfg.model)


@pytest.mark.parametrize("group,option", GROUP_OPTIONS)
def test_each_group_option_is_a_one_value_swap(group, option, base, tmp_path):
    swapped = model_config(tmp_path, f"model/{group}={option}").to_dict()
    values = OmegaConf.to_container(OmegaConf.load(MODEL_DIR / group / f"{option}.yaml"))
    assert list(values) == [group], f"{group}/{option}.yaml must set model.{group} only"
    for key, value in values.items():
        assert swapped[key] == value, f"model/{group}={option} did not set model.{key}"
    untouched = {k for k in base if k not in values and k != "vocab_size"}
    assert {k: swapped[k] for k in untouched} == {k: base[k] for k in untouched}
    count_on_meta(GPTConfig.from_dict(swapped))  # a valid model


def test_group_swaps_combine_and_values_still_override(tmp_path):
    c = model_config(
        tmp_path,
        "model/position=rope",
        "model/norm=rmsnorm",
        "model/mlp=swiglu",
        "model.n_kv_heads=1",
        "model.qk_norm=true",
    )
    assert (c.position, c.norm, c.mlp, c.n_kv_heads, c.qk_norm) == (
        "rope",
        "rmsnorm",
        "swiglu",
        1,
        True,
    )


def test_group_swap_on_a_preset(tmp_path):
    c = model_config(tmp_path, "model=gpt2_124m", "model/position=alibi")
    assert (c.position, c.n_layer, c.n_embd) == ("alibi", 12, 768)
