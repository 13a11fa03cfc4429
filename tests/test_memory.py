"""The memory estimate (gptlab.training.memory) against what PyTorch really allocates: the bytes
autograd saves for the backward pass, and the peak memory of real training steps; and the
start-up check that refuses a run too large for the machine before it allocates anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from gptlab.cli.train import train
from gptlab.model import GPT, GPTConfig
from gptlab.training.memory import (
    TrainingShape,
    activation_bytes,
    check_fits,
    estimate_memory,
    fitting_overrides,
)
from tests.kit import TINY_MODEL, compose_config

SMALL = dict(vocab_size=512, block_size=128, n_layer=2, n_head=4, n_embd=64)
VARIANTS = [
    {},
    {"n_kv_heads": 2},
    {"attention": "eager"},
    {"position": "alibi"},
    {"sliding_window": 16},
    {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
    {"qk_norm": True},
    {"mlp": "relu2"},
    {"dropout": 0.1},
    {"norm_placement": "post"},
]


def saved_for_backward(config: GPTConfig, batch: int, seq_len: int) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one loss, each storage once
    (views share one), the parameters left out: measured with saved-tensor hooks."""
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (batch, seq_len))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(idx).float().flatten(0, 1), idx.flatten())
    return sum(storages.values())


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(map(str, v.items())) or "mha")
def test_activation_count_matches_what_autograd_saves(variant):
    config = GPTConfig(**SMALL, **variant)
    batch, seq_len = 4, 128
    logits_and_grad = 3 * batch * seq_len * config.vocab_size * 4  # transient, not saved
    estimate = activation_bytes(config, TrainingShape(batch, seq_len)) - logits_and_grad
    measured = saved_for_backward(config, batch, seq_len)
    assert estimate == pytest.approx(measured, rel=0.10)


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    config = GPTConfig(**{**SMALL, "n_layer": 8})
    plain = activation_bytes(config, TrainingShape(4, 128))
    checkpointed = activation_bytes(config, TrainingShape(4, 128, activation_checkpointing=True))
    one_layer = activation_bytes(replace(config, n_layer=1), TrainingShape(4, 128))
    no_layer_head = one_layer - (plain - one_layer) / 7  # the head and final norm alone
    block_inputs = 8 * 4 * 128 * config.n_embd * 4
    assert checkpointed == pytest.approx(no_layer_head + block_inputs + (one_layer - no_layer_head))


PEAK_SCRIPT = """
import json, resource, sys, torch, torch.nn.functional as F
from gptlab.model import GPT, GPTConfig
from gptlab.training.memory import TrainingShape, estimate_memory
torch.manual_seed(0)
config, batch = GPTConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
model = GPT(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
idx = torch.randint(0, config.vocab_size, (batch, config.block_size + 1))
import os
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
for _ in range(2):
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
    del logits
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
estimate = estimate_memory(config, TrainingShape(batch, config.block_size), model.parameters())
print(json.dumps({"grown": grown, "estimate": estimate.total - estimate.weights}))
"""

PEAK_SHAPES = [
    (dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128), 16),
    (dict(vocab_size=512, block_size=512, n_layer=6, n_head=4, n_embd=256), 8),
]
# The eager backend's peak is left out: its T x T backward buffers made the RSS growth vary
# between runs (290 MB alone, 450 MB inside the whole suite, against an estimate of 284 MB);
# its saved activations are checked exactly above.


@pytest.mark.slow
@pytest.mark.parametrize(("config", "batch"), PEAK_SHAPES, ids=["nano", "wide"])
def test_estimate_matches_the_peak_memory_of_training_steps(config, batch):
    """Everything a step adds to the weights (gradients, AdamW state, activations) against the
    growth of the process's peak RSS over two steps, within 20% (seen: 0.95-1.00 of it).
    glibc's malloc keeps freed blocks below its dynamic mmap threshold, so the RSS of a plain
    run also holds that slack (up to ~1.8x the activations here); a fixed threshold makes RSS
    follow live tensors."""
    # A clean environment: variables other tests or libraries set (thread counts, allocator
    # settings) change what a step allocates.
    env = {"PATH": os.environ["PATH"], "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, json.dumps(config), str(batch)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout)
    assert result["estimate"] == pytest.approx(result["grown"], rel=0.20)


def test_muon_ddp_and_fsdp_account_their_state():
    config = GPTConfig(**SMALL)
    model = GPT(config)
    n = model.num_params()
    shape = TrainingShape(4, 128)
    single = estimate_memory(config, shape, model.parameters())
    assert single.weights == single.gradients == 4 * n
    assert single.optimizer == 2 * 4 * n  # AdamW: two moments
    ddp = estimate_memory(config, replace(shape, strategy="ddp", world_size=2), model.parameters())
    assert ddp.gradients == 2 * 4 * n  # plus the gradient buckets
    fsdp_shape = replace(shape, strategy="fsdp", world_size=4)
    fsdp = estimate_memory(config, fsdp_shape, model.parameters())
    assert fsdp.optimizer == single.optimizer / 4
    muon_params = sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)
    muon = estimate_memory(config, shape, model.parameters(), muon_params)
    assert muon.optimizer == 4 * (muon_params + 2 * (n - muon_params))
    frozen = GPT(config)
    frozen.requires_grad_(False)
    frozen.lm_head.weight.requires_grad_(True)
    lora_like = estimate_memory(config, shape, frozen.parameters())
    assert lora_like.gradients == 4 * frozen.lm_head.weight.numel()


def test_a_run_too_large_is_refused_with_overrides_that_fit():
    config = GPTConfig(vocab_size=32000, block_size=2048, n_layer=2, n_head=4, n_embd=128)
    shape = TrainingShape(32, 2048)
    estimate = estimate_memory(config, shape, GPT(config).parameters())
    budget = int(estimate.total / 3)
    with pytest.raises(ValueError, match="would run out of memory") as err:
        check_fits(estimate, budget, "available RAM")
    message = str(err.value)
    assert "data.loader.batch_size=8 global_batch_tokens=65536" in message
    assert "model.block_size=512" in message
    for override in fitting_overrides(estimate, budget):
        assert override in message
    smaller = estimate_memory(config, replace(shape, batch_size=8), GPT(config).parameters())
    assert (
        smaller.total
        <= budget
        < estimate_memory(config, replace(shape, batch_size=16), GPT(config).parameters()).total
    )


def test_train_prints_the_estimate_and_estimate_only_exits(tiny_data_dir, tmp_path, caplog):
    overrides = [*TINY_MODEL, f"corpus.dir={tiny_data_dir}", "estimate_only=true"]
    with caplog.at_level("INFO"):
        results = train(compose_config("train", overrides, tmp_path))
    assert "memory estimate (available RAM" in caplog.text
    assert "activations (32 x 32 tokens)" in caplog.text
    assert results["memory_estimate"]["activations"] > 0
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_train_refuses_a_run_that_cannot_fit_before_the_first_step(tiny_data_dir, tmp_path):
    overrides = [*TINY_MODEL, f"corpus.dir={tiny_data_dir}", "data.loader.batch_size=100000000"]
    with pytest.raises(ValueError, match="data.loader.batch_size="):
        train(compose_config("train", overrides, tmp_path))
