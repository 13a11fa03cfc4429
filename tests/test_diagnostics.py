"""Attention diagnostics: the recording hook, the statistics against known values, and the
callback writing to TensorBoard in a real (tiny) training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.cli.train import train
from gptlab.model import SDPAttention, record_attention
from gptlab.training.callbacks.diagnostics import (
    AttentionDiagnosticsCallback,
    attention_entropy,
    attention_figure,
    attention_probs,
    summarize,
)
from tests.kit import TINY, random_tokens, short_run, tiny_gpt


@pytest.mark.parametrize("position", ["learned", "alibi", "rope"])
@pytest.mark.parametrize("window", [None, 3])
def test_recorded_probs_are_causal_distributions(position, window):
    model = tiny_gpt(position=position, sliding_window=window, n_kv_heads=2)
    idx = random_tokens(12)
    with torch.no_grad():
        plain = model(idx)
        with record_attention(model) as probs:
            recorded = model(idx)
    assert len(probs) == TINY["n_layer"]
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=0)  # eager == sdpa
    T = idx.size(1)
    distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    hidden = (distance < 0) | (distance >= (window or T))
    for p in probs:
        assert p.shape == (2, TINY["n_head"], T, T)
        torch.testing.assert_close(p.sum(-1), torch.ones(2, TINY["n_head"], T))
        assert torch.all(p[..., hidden] == 0)
        assert torch.all(p[..., ~hidden] > 0)
    # The hook is gone afterwards: the sdpa backend is back and nothing more is recorded.
    assert all(isinstance(b.attn.backend, SDPAttention) for b in model.blocks)
    model(idx)
    assert len(probs) == TINY["n_layer"]


def test_uniform_attention_has_the_analytic_entropy_and_sink_share():
    model = tiny_gpt(position="none")
    with torch.no_grad():
        for block in model.blocks:  # zero queries: every visible key scores the same
            block.attn.c_attn.weight[: TINY["n_embd"]] = 0
            block.attn.c_attn.bias[: TINY["n_embd"]] = 0
    T = 12
    probs = attention_probs(model, random_tokens(T))
    # Query t sees t + 1 tokens with weight 1 / (t + 1) each; queries 1..T-1 are averaged.
    expected_entropy = sum(math.log(t + 1) for t in range(1, T)) / (T - 1)
    expected_sink = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    for p in probs:
        stats = summarize(p)
        assert stats["entropy"] == pytest.approx(expected_entropy, rel=1e-5)
        assert stats["sink"] == pytest.approx(expected_sink, rel=1e-5)


def test_statistics_of_known_rows():
    all_on_first = torch.zeros(1, 1, 5, 5)
    all_on_first[..., 0] = 1
    assert summarize(all_on_first) == {"entropy": 0.0, "sink": 1.0}
    on_self = torch.eye(5)[None, None]
    assert summarize(on_self) == {"entropy": 0.0, "sink": 0.0}
    half = torch.tensor([[0.5, 0.5, 0.0]])
    assert attention_entropy(half).item() == pytest.approx(math.log(2))


def test_attention_figure_is_an_rgb_image():
    image = attention_figure(torch.softmax(torch.randn(6, 8, 8), -1), "layer 0")
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.std() > 0  # something was drawn


def test_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        AttentionDiagnosticsCallback(every_n_steps=0)


def test_callback_logs_per_layer_scalars_and_maps(tiny_data_dir, tmp_path):
    diagnostics = [
        "callbacks=diagnostics",
        "callbacks.attention_diagnostics.every_n_steps=2",
        "callbacks.attention_diagnostics.prompt_tokens=24",
    ]
    train(short_run(tiny_data_dir, tmp_path, 3, "data.loader.batch_size=8", *diagnostics))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    n_layer, T = 2, 24
    for i in range(n_layer):
        entropy = events.Scalars(f"model/attention_entropy/layer_{i}")
        sink = events.Scalars(f"model/attention_sink/layer_{i}")
        assert [e.step for e in entropy] == [0, 2, 3]  # start, every 2 steps, end
        assert all(0 < e.value < math.log(T) for e in entropy)
        assert all(0 < e.value < 1 for e in sink)
        assert len(events.Images(f"model/attention_map/layer_{i}")) == 3
