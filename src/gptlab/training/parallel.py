"""Sharded training: FSDP2 (`fully_shard`) and Megatron-style tensor parallelism over a
DeviceMesh, applied to the GPT from outside (as torchtitan does) through Lightning's
`ModelParallelStrategy`.

The mesh has two dimensions, ("data_parallel", "tensor_parallel"). `trainer=fsdp` is
tensor_parallel_size=1: every rank is a data-parallel rank and FSDP2 shards each parameter over
all of them. `trainer.strategy.tensor_parallel_size=t` splits every block over t ranks:

- attention by heads. The fused q/k/v projection `c_attn` becomes three column-parallel
  projections `c_attn.q`, `c_attn.k`, `c_attn.v` (a column split of the fused matrix would cut
  across the q/k/v boundary), each rank computes its n_head/t query heads and n_kv_heads/t KV
  heads (grouped-query groups stay whole), and the output projection `c_proj` is row-parallel:
  one all-reduce per attention.
- the MLP: `c_fc` (and SwiGLU's `c_gate`) column-parallel, `c_proj` row-parallel: one
  all-reduce per MLP.

Embeddings, norms and the LM head stay whole on every tensor-parallel rank (so tied embeddings
work); every rank of a tensor-parallel group sees the same batch. FSDP2 then shards every
parameter over the data-parallel ranks (2-D when t > 1). Checkpoints are distributed
(torch.distributed.checkpoint; see `gptlab.training.checkpoint`); a tensor-parallel
run's checkpoint names the split projections, and `merge_qkv_projections` turns its weights
back into the plain GPT's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from gptlab.model import GPT, ALiBiPosition, GPTConfig, SwiGLUMLP
from gptlab.training.checkpoint import (
    METADATA_FILE,
    TENSOR_PARALLEL_KEY,
    check_tensor_parallel_layout,
    is_sharded_checkpoint,
    merge_qkv_projections,
    publish,
    remove_checkpoint,
    remove_stale_folders,
    staging_folder,
)
from gptlab.training.speed import checkpoint_blocks

# Trainer precisions the sharded strategy runs, and the dtype FSDP2 computes in for each
# (None: the parameters' own). Lightning itself refuses 16-mixed with ModelParallelStrategy.
PRECISION_PARAM_DTYPES = {
    "32-true": None,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": None,
    "16-true": None,
}


class QKVProjections(nn.Module):
    """The fused q/k/v projection as three linears, so that each can be split by heads.

    Its output is the fused projection's, [q | k | v] along the last axis: on a tensor-parallel
    rank, that rank's heads of each."""

    def __init__(self, fused: nn.Linear, q_size: int, kv_size: int) -> None:
        super().__init__()
        sizes = [q_size, kv_size, kv_size]
        weights = fused.weight.detach().split(sizes)
        biases = fused.bias.detach().split(sizes) if fused.bias is not None else [None] * 3
        self.q, self.k, self.v = (
            self._linear(weight, bias) for weight, bias in zip(weights, biases, strict=True)
        )

    @staticmethod
    def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
        linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def check_tensor_parallel(config: GPTConfig, size: int) -> None:
    """Refuse, before training, a model that `size`-way tensor parallelism cannot split."""
    if size == 1:
        return
    hidden = mlp_hidden_size(config)
    problems = [
        (config.n_head % size, f"model.n_head={config.n_head}"),
        (config.kv_heads % size, f"the KV heads (model.n_kv_heads={config.kv_heads})"),
        (hidden % size, f"the MLP hidden size {hidden} (model.mlp={config.mlp!r})"),
    ]
    for remainder, what in problems:
        if remainder:
            raise ValueError(
                f"trainer.strategy.tensor_parallel_size={size} must divide {what}: each "
                "tensor-parallel rank takes an equal share; choose a divisor"
            )
    if config.qk_norm:
        raise ValueError(
            f"trainer.strategy.tensor_parallel_size={size} does not support model.qk_norm=true "
            "(each rank would train the shared QK-norm gains on its own heads only); use "
            "tensor_parallel_size=1 (FSDP) or model.qk_norm=false"
        )


def mlp_hidden_size(config: GPTConfig) -> int:
    """The width of the MLP's hidden layer, as the MLP classes compute it."""
    if config.mlp == "swiglu":
        return 64 * math.ceil(2 / 3 * config.mlp_ratio * config.n_embd / 64)
    return int(config.mlp_ratio * config.n_embd)


def tensor_parallelize(model: GPT, mesh: DeviceMesh) -> None:
    """Split each block's attention (by heads) and MLP over the ranks of the 1-D `mesh`."""
    size, rank = mesh.size(), mesh.get_local_rank()
    check_tensor_parallel(model.config, size)
    for block in model.blocks:
        attn = block.attn
        attn.c_attn = QKVProjections(
            attn.c_attn, attn.n_head * attn.head_dim, attn.n_kv * attn.head_dim
        )
        plan: dict[str, Any] = {
            "attn.c_attn.q": ColwiseParallel(),
            "attn.c_attn.k": ColwiseParallel(),
            "attn.c_attn.v": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(),
        }
        if isinstance(block.mlp, SwiGLUMLP):
            plan["mlp.c_gate"] = ColwiseParallel()
        parallelize_module(block, mesh, plan)
        attn.n_head //= size  # the attention's forward now sees this rank's heads only
        attn.n_kv //= size
    if isinstance(model.position, ALiBiPosition):  # each head keeps its own slope
        per_rank = model.config.n_head // size
        model.position.slopes = model.position.slopes[rank * per_rank : (rank + 1) * per_rank]


def parallelize_gpt(
    model: GPT,
    mesh: DeviceMesh,
    precision: str,
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> None:
    """Tensor parallel (when the mesh's tensor-parallel size is > 1), then activation
    checkpointing and compilation per block, then one FSDP2 unit per block and the root.

    The order is torchtitan's: checkpointing and compilation go inside each FSDP unit, so a
    unit's parameters are gathered once per forward (and once more to recompute it)."""
    if precision not in PRECISION_PARAM_DTYPES:
        raise ValueError(
            f"trainer.precision={precision!r} is not supported by the sharded strategy; "
            f"choose one of: {', '.join(PRECISION_PARAM_DTYPES)}"
        )
    if mesh["tensor_parallel"].size() > 1:
        tensor_parallelize(model, mesh["tensor_parallel"])
        # A norm over a 2-D sharded tensor (gradient clipping, the NaN guard) is partial on
        # both mesh dimensions; with the dimensions also flattened into one, DTensor makes it
        # whole in one all-reduce instead of two in a row (torchtitan flattens its meshes so).
        mesh["data_parallel", "tensor_parallel"]._flatten()
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        for block in model.blocks:
            block.compile()
    policy = MixedPrecisionPolicy(
        param_dtype=PRECISION_PARAM_DTYPES[precision], reduce_dtype=torch.float32
    )
    data_mesh = mesh["data_parallel"]
    for block in model.blocks:
        fully_shard(block, mesh=data_mesh, mp_policy=policy)
    fully_shard(model, mesh=data_mesh, mp_policy=policy)


@torch.no_grad()
def global_norm(tensors: Iterable[Tensor]) -> Tensor:
    """The L2 norm of all `tensors` together, in fp32, where they may mix DTensors of different
    meshes and placements (FSDP2 x tensor parallel) with plain tensors: each tensor's norm is
    made whole (reduced over the ranks holding a shard of it) before the norms are combined."""
    norms = []
    for tensor in tensors:
        norm = torch.linalg.vector_norm(tensor, dtype=torch.float32)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for sharded parameters (see `global_norm`)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = global_norm(grads)
    scale = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    for grad in grads:
        grad.mul_(scale)
    return total


def gather_gpt_weights(module: nn.Module) -> dict[str, Tensor]:
    """The whole weights of a sharded LitGPT's GPT as plain tensors on rank 0 (empty elsewhere),
    under the plain GPT's names. A collective: every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module, options=options)
    prefix = "model."
    return merge_qkv_projections(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    )


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy with the data-parallel size derived from the world
    size (world size / tensor_parallel_size: any number of devices and nodes), and checkpoints
    published atomically (see `gptlab.training.checkpoint`)."""

    def __init__(self, tensor_parallel_size: int = 1, **kwargs: Any) -> None:
        if not (isinstance(tensor_parallel_size, int) and tensor_parallel_size >= 1):
            raise ValueError(
                f"trainer.strategy.tensor_parallel_size={tensor_parallel_size!r} must be a "
                "positive integer"
            )
        super().__init__(tensor_parallel_size=tensor_parallel_size, **kwargs)
        self.tensor_parallel_size = tensor_parallel_size

    def _setup_distributed(self) -> None:
        super()._setup_distributed()
        if self.world_size % self.tensor_parallel_size:
            raise ValueError(
                f"trainer.strategy.tensor_parallel_size={self.tensor_parallel_size} must divide "
                f"the world size {self.world_size} (trainer.devices x trainer.num_nodes)"
            )
        self._data_parallel_size = self.world_size // self.tensor_parallel_size

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Every rank writes its shards into a new folder; rank 0 then publishes it as
        `filepath` (see `gptlab.training.checkpoint`)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(self.broadcast(str(filepath)))
        if self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_folders(path)
        staging = Path(self.broadcast(str(staging_folder(path))))
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, optimizer_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optimizer_state
        checkpoint[TENSOR_PARALLEL_KEY] = self.tensor_parallel_size
        dcp.save(state, checkpoint_id=staging)
        if self.global_rank == 0:
            torch.save(checkpoint, staging / METADATA_FILE)
        self.barrier()
        if self.global_rank == 0:
            publish(staging, path)
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded_checkpoint(path):
            check_tensor_parallel_layout(path, self.tensor_parallel_size)
        return super().load_checkpoint(path, weights_only=weights_only)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.global_rank == 0:
            remove_checkpoint(Path(filepath))
