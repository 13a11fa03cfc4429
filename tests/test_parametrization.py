"""muP (gptlab.parametrization): at its base width a muP model is the SP model; wider, its
multipliers, init and learning rates follow the table by hand; the coordinate check is flat
under muP and grows under SP; and an exported muP model computes the same logits."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.analysis import coordinate_check
from gptlab.model import GPT, GPTConfig
from gptlab.training.optim import OptimizerConfig, build_optimizer

SMALL = dict(vocab_size=256, block_size=32, n_layer=2, n_head=4)


def model(width: int, parametrization: str = "mup", base: int | None = 32, **kw) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, n_embd=width, parametrization=parametrization, mup_base_width=base)
    return GPT(config if not kw else GPTConfig(**{**config.to_dict(), **kw}))


def test_at_its_base_width_mup_is_sp():
    sp, mup = model(64, "sp", None), model(64, "mup", 64)
    idx = torch.randint(0, 256, (2, 32))
    for (name, a), b in zip(sp.state_dict().items(), mup.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(sp(idx), mup(idx))
    groups = build_optimizer(mup, OptimizerConfig(lr=3e-3)).param_groups
    assert {g["name"]: g["lr"] for g in groups} == {"decay": 3e-3, "no_decay": 3e-3, "hidden": 3e-3}


def test_a_wider_model_follows_the_mup_table():
    m = 4  # width 128 over base 32
    wide = model(128)
    assert wide.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)  # input: as at base
    fc = wide.blocks[0].mlp.c_fc.weight  # hidden: std / sqrt(m)
    assert fc.std().item() == pytest.approx(0.02 / math.sqrt(m), rel=0.05)
    proj = wide.blocks[0].mlp.c_proj.weight  # residual projection: GPT-2's 1/sqrt(2L) too
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 2) / math.sqrt(m), rel=0.05)

    # logits = head(norm(x)) / m, by hand through the model's own parts
    idx = torch.randint(0, 256, (2, 32))
    captured = {}
    wide.norm_f.register_forward_hook(lambda mod, i, o: captured.update(h=o))
    logits = wide(idx)
    torch.testing.assert_close(logits, captured["h"] @ wide.wte.weight.T / m)

    # attention: sqrt(base head size) / head size = sqrt(8) / 32, not 1 / sqrt(32)
    assert wide.blocks[0].attn.scale == pytest.approx(math.sqrt(32 / 4) / (128 / 4))

    groups = {g["name"]: g for g in build_optimizer(wide, OptimizerConfig(lr=1e-2)).param_groups}
    assert groups["hidden"]["lr"] == pytest.approx(1e-2 / m)
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == 1e-2
    hidden = {id(p) for p in groups["hidden"]["params"]}
    assert id(fc) in hidden and id(wide.wte.weight) not in hidden
    assert len(hidden) == 2 * 4  # qkv, attention output, MLP in and out, in each block


def test_muon_under_mup_needs_its_spectral_scaling():
    wide = model(128)
    with pytest.raises(ValueError, match="set optimizer.muon_lr_adjust=original"):
        build_optimizer(wide, OptimizerConfig(name="muon", muon_lr_adjust="match_rms_adamw"))
    optimizer = build_optimizer(wide, OptimizerConfig(name="muon", muon_lr_adjust="original"))
    assert optimizer is not None


def test_bad_mup_settings_are_refused():
    with pytest.raises(ValueError, match="choose one of: mup, sp"):
        GPTConfig(**SMALL, n_embd=64, parametrization="ntk")
    with pytest.raises(ValueError, match="mup_base_width"):
        GPTConfig(**SMALL, n_embd=64, parametrization="mup", mup_base_width=30)


def test_coordinate_check_is_flat_under_mup_and_grows_under_sp():
    """Widths 64-256, one 32-token row, 3 AdamW steps at lr 3e-3, 2 seeds: the mean change of
    every layer's activations stays within 1.5x across widths under muP (seen: 1.02-1.10x) and
    grows under SP (seen: 2.8x for the logits, 5.9-6.7x for the blocks)."""
    widths = [64, 128, 256]
    for parametrization, check in (("mup", lambda s: s <= 1.5), ("sp", lambda s: s >= 2)):
        config = GPTConfig(**SMALL, n_embd=32, parametrization=parametrization, mup_base_width=32)
        result = coordinate_check(config, widths, seeds=(0, 1))
        for layer in ("block_0", "block_1", "logits"):
            values = [result[w][layer] for w in widths]
            spread = max(values) / min(values)
            assert check(spread), (parametrization, layer, values)


def test_the_coordinate_check_averages_its_seeds():
    config = GPTConfig(**SMALL, n_embd=32, parametrization="mup", mup_base_width=32)
    one, two = (coordinate_check(config, [32, 64], seeds=(s,)) for s in (0, 1))
    both = coordinate_check(config, [32, 64], seeds=(0, 1))
    for width in (32, 64):
        for layer, value in both[width].items():
            assert value == pytest.approx((one[width][layer] + two[width][layer]) / 2)
    assert one[64]["logits"] != two[64]["logits"]


def test_a_zero_initialised_readout_starts_the_untied_head_at_zero():
    zero = model(64, tie_weights=False, readout_zero_init=True)
    assert torch.count_nonzero(zero.lm_head.weight) == 0
    assert torch.count_nonzero(zero(torch.randint(0, 256, (1, 8)))) == 0  # logits start at 0
    assert zero.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)  # the input is kept
    with pytest.raises(ValueError, match="readout_zero_init=True is invalid.*tie_weights"):
        GPTConfig(**SMALL, n_embd=64, readout_zero_init=True)
