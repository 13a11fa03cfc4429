"""How much memory a training run needs, estimated before the first step.

A run's memory on each process (rank) is the sum of

- **weights**: every parameter, in the parameters' dtype (fp32 under mixed precision, which
  keeps fp32 master weights; 2 bytes under ``bf16-true``/``16-true``);
- **gradients**: one per trainable parameter, same dtype, plus DDP's gradient buckets (a second
  copy, torch's default ``gradient_as_bucket_view=False``);
- **optimizer state**: AdamW keeps two moments per trainable parameter, Muon one momentum per
  matrix it owns (and AdamW's two on the rest);
- **activations**: the tensors autograd saves for the backward pass, per micro-batch (below),
  plus the gradient of the logits at the start of the backward pass.

Under FSDP (full sharding) weights, gradients and optimizer state are divided by the world size,
and one block's weights are gathered whole at a time (two, with prefetching).

Activations per token and layer, in elements (C = n_embd, Ckv = the k/v width, F = MLP hidden,
H = n_head, T = sequence length), as autograd saves them on a CPU:

    norm inputs 2C  +  q/k/v projection input C  +  q, k, v: C + 2 Ckv  +  attention output C
    (also the output projection's input)  +  MLP input C  +  MLP hidden: 2F (gelu, relu2) or 4F
    (swiglu)  +  QK-norm inputs and outputs
    2 (C + Ckv)  +  RoPE's rotated q and k and their halves 2 (C + Ckv)

    + attention probabilities H T where they are materialised: the eager backend, and sdpa when
      it falls back to its math kernel (dropout > 0, ALiBi's per-head bias); twice with dropout,
      which also keeps its masks and copies, about 7C

and for the head, per token: the final norm's input and output 2C, the log-softmax of the logits
V (fp32) and, at the peak where the backward pass starts, three more V-wide fp32 tensors (the
logits and the gradients of both), 3V. Under
mixed precision the tensors saved for matmuls are 16-bit and the norm inputs stay fp32. With
activation checkpointing only each block's input C is kept, plus one block's activations while
it is recomputed. The estimate leaves out what a run needs besides (the framework, the data
loader, allocator slack), about a few hundred MB.

`tests/test_memory.py` checks the activation count against the bytes autograd really saves, and
the whole estimate against the peak memory of real training steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from gptlab.model import MLPS, Block, GPTConfig
from gptlab.training.muon import hidden_matrices

GiB = 1024**3

# (bytes per parameter, bytes per activation saved for a matmul), per Lightning precision.
PRECISIONS: dict[str, tuple[int, int]] = {
    "64-true": (8, 8),
    "32-true": (4, 4),
    "bf16-mixed": (4, 2),
    "16-mixed": (4, 2),
    "bf16-true": (2, 2),
    "16-true": (2, 2),
}
OPTIMIZER_MOMENTS = {"adamw": 2, "muon": 1}  # per parameter the optimizer owns


@dataclass(frozen=True)
class TrainingShape:
    """What the estimate depends on besides the model config."""

    batch_size: int  # sequences per micro-batch on one rank
    seq_len: int
    precision: str = "32-true"
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    strategy: str = "single"  # single | ddp | fsdp
    world_size: int = 1
    processes_per_host: int = 1  # ranks sharing this host's memory (DDP on one CPU machine)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs, by kind, for the model `config` describes."""

    config: GPTConfig
    weights: float
    gradients: float
    optimizer: float
    activations: float  # per micro-batch, the logits' gradient included
    shape: TrainingShape

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def host_total(self) -> float:
        """What all processes on this host need together."""
        return self.total * self.shape.processes_per_host

    def table(self) -> str:
        s = self.shape
        rows = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            (f"optimizer state ({s.optimizer})", self.optimizer),
            (f"activations ({s.batch_size} x {s.seq_len} tokens)", self.activations),
            ("total per process", self.total),
        ]
        if s.processes_per_host > 1:
            rows.append((f"total of {s.processes_per_host} processes here", self.host_total))
        return "\n".join(f"  {name:<40} {gib(value):>11}" for name, value in rows)


def gib(n: float) -> str:
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 1024**2:.1f} MiB"


def mlp_hidden(config: GPTConfig) -> int:
    """The MLP's hidden width, read off an MLP built on the meta device (no memory)."""
    with torch.device("meta"):
        mlp = MLPS[config.mlp](config)
    return max(m.out_features for m in mlp.modules() if isinstance(m, nn.Linear))


def saves_attention_probs(config: GPTConfig) -> bool:
    """Whether attention keeps its (T x T) probabilities for the backward pass on a CPU."""
    return config.attention == "eager" or config.dropout > 0 or config.position == "alibi"


def layer_elements(config: GPTConfig, seq_len: int) -> tuple[int, int]:
    """Elements one block saves per token: (saved for matmuls, norm inputs)."""
    c, kv = config.n_embd, config.kv_heads * config.head_size
    hidden = mlp_hidden(config)
    matmul = c + (c + 2 * kv) + c + c  # qkv input, q/k/v, attention output, MLP input
    matmul += 4 * hidden if config.mlp == "swiglu" else 2 * hidden
    if config.qk_norm:
        matmul += 2 * (c + kv)  # the norms' inputs and outputs
    if config.position == "rope":
        matmul += 2 * (c + kv)  # rotated q and k, and their rotated halves
    if saves_attention_probs(config):
        matmul += config.n_head * seq_len * (2 if config.dropout > 0 else 1)
    if config.dropout > 0:
        matmul += 7 * c  # the masks, and the un-dropped copies the math kernel keeps
    return matmul, 2 * c


def activation_bytes(config: GPTConfig, shape: TrainingShape) -> float:
    """Bytes saved for the backward pass by one micro-batch, plus the logits' gradient."""
    _, matmul_bytes = PRECISIONS[shape.precision]
    norm_bytes = 4 if shape.precision.endswith("mixed") else matmul_bytes
    matmul, norm = layer_elements(config, shape.seq_len)
    layer = matmul * matmul_bytes + norm * norm_bytes
    if shape.activation_checkpointing:
        body = config.n_layer * config.n_embd * norm_bytes + layer
    else:
        body = config.n_layer * layer
    head = 2 * config.n_embd * norm_bytes + 4 * config.vocab_size * 4
    return float(shape.batch_size * shape.seq_len * (body + head))


def estimate_memory(
    config: GPTConfig,
    shape: TrainingShape,
    parameters: Iterable[nn.Parameter],
    muon_parameters: int = 0,
) -> MemoryEstimate:
    """The memory one rank needs to train `parameters` (the model's, shared ones once) of a GPT
    described by `config`; `muon_parameters` of them are Muon's, the rest AdamW's."""
    param_bytes, _ = PRECISIONS[shape.precision]
    params = list(parameters)
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weights = total * param_bytes
    gradients = trainable * param_bytes * (2 if shape.strategy == "ddp" else 1)
    moments = muon_parameters * OPTIMIZER_MOMENTS["muon"]
    moments += (trainable - muon_parameters) * OPTIMIZER_MOMENTS["adamw"]
    optimizer = moments * param_bytes
    if shape.strategy == "fsdp":
        block = largest_block_parameters(config)
        weights = weights / shape.world_size + 2 * block * param_bytes
        gradients /= shape.world_size
        optimizer /= shape.world_size
    activations = activation_bytes(config, shape)
    return MemoryEstimate(config, weights, gradients, optimizer, activations, shape)


def largest_block_parameters(config: GPTConfig) -> int:
    """Parameters of one block, the unit FSDP gathers whole."""
    with torch.device("meta"):
        return sum(p.numel() for p in Block(config, 0).parameters())


def available_memory(device: torch.device) -> tuple[int, str]:
    """Free bytes on `device` and where the number comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    return host_available_memory()


def host_available_memory() -> tuple[int, str]:
    """The host's available RAM (MemAvailable), capped by this container's cgroup limit."""
    available, source = physical_available(), "available RAM"
    limit = cgroup_headroom()
    if limit is not None and limit < available:
        available, source = limit, "memory left under this container's cgroup limit"
    return available, source


def physical_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_headroom() -> int | None:
    """cgroup v2 memory.max minus memory.current, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def fitting_overrides(estimate: MemoryEstimate, budget: float) -> list[str]:
    """Overrides that would bring `estimate` under `budget` bytes per process, best first."""
    config, shape = estimate.config, estimate.shape
    fixed = estimate.weights + estimate.gradients + estimate.optimizer
    per_host = shape.processes_per_host

    def fits(new_shape: TrainingShape, new_config: GPTConfig = config) -> bool:
        return (fixed + activation_bytes(new_config, new_shape)) * per_host <= budget

    found = []
    batch = shape.batch_size // 2
    while batch >= 1 and not fits(replace(shape, batch_size=batch)):
        batch //= 2
    if batch >= 1:
        tokens = shape.batch_size * shape.seq_len * shape.world_size
        found.append(
            f"data.loader.batch_size={batch} global_batch_tokens={tokens} "
            "(the same tokens per optimizer step, by gradient accumulation)"
        )
    if not shape.activation_checkpointing and fits(replace(shape, activation_checkpointing=True)):
        found.append("activation_checkpointing=true")
    seq = shape.seq_len // 2
    while seq >= 16 and not fits(replace(shape, seq_len=seq), replace(config, block_size=seq)):
        seq //= 2
    if seq >= 16:
        found.append(f"model.block_size={seq} (a shorter context)")
    return found


def check_fits(estimate: MemoryEstimate, available: int, source: str) -> None:
    """Refuse, before anything is allocated, a run whose estimate exceeds the free memory."""
    needed = estimate.host_total
    if needed <= available:
        return
    who = (
        f"{estimate.shape.processes_per_host} processes need"
        if estimate.shape.processes_per_host > 1
        else "it needs"
    )
    s = estimate.shape
    lines = [
        f"this run would run out of memory: {who} about {gib(needed)} (activations "
        f"{gib(estimate.activations)} for micro-batches of {s.batch_size} x {s.seq_len} tokens), "
        f"but the {source} is {gib(available)}"
    ]
    options = fitting_overrides(estimate, available)
    if options:
        lines.append("any of these would fit: " + "; or ".join(options))
    else:
        lines.append("no smaller batch or context fits: use a smaller model or more devices")
    lines.append("(memory_check=false runs anyway; estimate_only=true prints the estimate)")
    raise ValueError("\n".join(lines))


def estimate_run_memory(
    trainer: L.Trainer,
    module: L.LightningModule,
    batch_size: int,
    seq_len: int,
    checkpointing: bool,
) -> MemoryEstimate:
    """The estimate for a built (not yet fitted) Trainer and module; the module's `model` is a GPT
    whose head may be narrower than the vocabulary (a classifier's)."""
    gpt = module.model
    config = replace(gpt.config, vocab_size=gpt.lm_head.out_features)
    precision = str(trainer.precision)
    if precision not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision!r} has no memory estimate; choose one of: "
            f"{', '.join(PRECISIONS)}, or memory_check=false"
        )
    strategy = trainer.strategy
    kind = "fsdp" if isinstance(strategy, FSDPStrategy | ModelParallelStrategy) else "single"
    if isinstance(strategy, DDPStrategy) and trainer.world_size > 1:
        kind = "ddp"
    on_cpu = strategy.root_device.type == "cpu"
    shape = TrainingShape(
        batch_size=batch_size,
        seq_len=seq_len,
        precision=precision,
        activation_checkpointing=checkpointing,
        optimizer=module.optimizer_config.name,
        strategy=kind,
        world_size=trainer.world_size,
        processes_per_host=trainer.num_devices if on_cpu else 1,
    )
    muon = hidden_matrices(gpt) if shape.optimizer == "muon" else []
    return estimate_memory(
        config, shape, gpt.parameters(), sum(p.numel() for p in muon if p.requires_grad)
    )
