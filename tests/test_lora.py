"""LoRA adapters: exact start from the base model, merge for export, targets, what trains."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptlab.lora import LoRAConfig, LoRALinear, apply_lora, count_parameters, merge_lora
from gptlab.model import GPT
from tests.kit import random_tokens, tiny_gpt


def train_adapters(model: GPT, steps: int = 5) -> None:
    """A few optimizer steps on the trainable parameters, so the adapters are non-zero."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = random_tokens(12, batch=3)
    for _ in range(steps):
        loss = model(x[:, :-1]).flatten(0, 1).logsumexp(-1).mean()  # any differentiable loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_step_zero_is_exactly_the_base_model_and_only_adapters_train():
    model = tiny_gpt()
    x = random_tokens(12, batch=3)
    with torch.no_grad():
        base_logits = model(x)
    total = sum(p.numel() for p in model.parameters())
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["*.attn.c_attn"]))

    assert wrapped == ["blocks.0.attn.c_attn", "blocks.1.attn.c_attn"]
    with torch.no_grad():
        assert torch.equal(model(x), base_logits)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.c_attn.lora_{m}" for i in (0, 1) for m in "AB"}
    adapter_size = 2 * (4 * 32 + 96 * 4)  # two layers of A (r x in) and B (out x r)
    assert count_parameters(model) == (adapter_size, total)


def test_merged_model_matches_the_adapted_model():
    model = tiny_gpt(dropout=0.0)
    with torch.no_grad():
        base_logits = model(random_tokens(12, batch=3))
    apply_lora(model, LoRAConfig(rank=4, alpha=16, dropout=0.1, targets=["*.attn.*", "*.mlp.*"]))
    train_adapters(model)
    model.eval()  # adapter dropout off: the merged model has none
    with torch.no_grad():
        adapted = model(random_tokens(12, batch=3))
        merge_lora(model)
        merged = model(random_tokens(12, batch=3))

    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_gpt().state_dict())  # a plain GPT again
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapters did change the model
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_base_weights_stay_frozen_while_adapters_learn():
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(rank=2, targets=["*.mlp.c_fc"]))
    layer = model.blocks[0].mlp.c_fc
    before = layer.weight.clone(), layer.lora_A.clone()
    train_adapters(model)
    assert torch.equal(layer.weight, before[0])
    assert not torch.equal(layer.lora_A, before[1])
    assert layer.lora_B.abs().sum() > 0


def test_pretrained_state_dict_loads_into_the_adapted_model():
    """LoRALinear keeps nn.Linear's parameter names: only the adapter keys are new."""
    source, target = tiny_gpt(), tiny_gpt(init_std=0.05)
    apply_lora(target, LoRAConfig())
    result = target.load_state_dict(source.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".lora_" in key for key in result.missing_keys)
    assert torch.equal(target.blocks[1].attn.c_proj.weight, source.blocks[1].attn.c_proj.weight)


def test_target_patterns_select_layers_by_name_and_errors_list_them():
    model = tiny_gpt(tie_weights=False)
    wrapped = apply_lora(model, LoRAConfig(targets=["blocks.1.mlp.*", "lm_head"]))
    assert wrapped == ["blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj", "lm_head"]

    with pytest.raises(
        ValueError, match=r"'\*\.attn\.qkv' matches no.*blocks\.\{i\}\.attn\.c_attn"
    ):
        apply_lora(tiny_gpt(), LoRAConfig(targets=["*.attn.qkv"]))
    with pytest.raises(ValueError, match="'lm_head' shares its weight"):
        apply_lora(tiny_gpt(tie_weights=True), LoRAConfig(targets=["lm_head"]))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"targets": []}, "targets"),
    ],
)
def test_bad_lora_config_is_named(values, message):
    with pytest.raises(ValueError, match=f"finetune.lora.{message}"):
        LoRAConfig(**values)


def test_lora_linear_keeps_the_base_tensors():
    base = nn.Linear(8, 4)
    adapted = LoRALinear(base, rank=2, alpha=4)
    assert adapted.weight is base.weight and adapted.bias is base.bias  # shared, not copied
    assert adapted.scaling == 2.0
