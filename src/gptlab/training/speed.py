"""Speed options, applied to the GPT from outside (as torchtitan does): torch.compile,
activation checkpointing per block, and the global batch in tokens (sharding: parallel.py).

The model file stays plain single-device PyTorch; everything here wraps or configures it.
"""

from __future__ import annotations

import logging
import os

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)

from gptlab.data.datamodule import GPTDataModule
from gptlab.model import GPT, Block

log = logging.getLogger(__name__)


def checkpoint_blocks(model: GPT) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them: memory
    per layer drops to the block's input, at the cost of one more forward per block.

    torch's checkpoint wrapper strips its own prefix from state-dict keys, so checkpoints keep
    the plain keys (`blocks.0.attn...`) and load into an unwrapped GPT.
    """
    apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))


def check_switches(**switches: object) -> None:
    """Config switches must be real booleans: `compile=yes` should not pass silently."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} must be true or false")


def speed_up_model(model: GPT, compile: bool, activation_checkpointing: bool) -> None:
    """Apply the speed options in place. `GPT.compile()` (nn.Module.compile) compiles the
    forward without wrapping the module, so state-dict keys gain no `_orig_mod.` prefix."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if compile:
        model.compile()


def is_logging_step(trainer: L.Trainer, step: int) -> bool:
    """Whether the loggers write at optimizer step `step` (1-based): every
    `trainer.log_every_n_steps`, and the last step (`trainer.max_steps`, where the run stops,
    which makes Lightning write). Each `LightningModule.log` call costs a fixed fraction of a
    millisecond (Lightning moves its result store to the value's device), which on small models
    is a visible share of a step; values logged on other steps would never be written anyway."""
    every = trainer.log_every_n_steps
    return every > 0 and (step % every == 0 or step == trainer.max_steps)


def check_optimizer_strategy(optimizer_name: str, strategy: Strategy) -> None:
    """Muon needs whole 2-D weights; torch's first FSDP (Lightning's FSDPStrategy) hands each
    rank flat shards of them. FSDP2 (trainer=fsdp) keeps them as DTensors, which Muon handles."""
    if optimizer_name == "muon" and isinstance(strategy, FSDPStrategy):
        raise ValueError(
            "optimizer=muon does not work with trainer.strategy=fsdp (torch's first FSDP shards "
            "each weight matrix into flat pieces, Muon orthogonalises whole matrices); use "
            "trainer=fsdp (FSDP2) or optimizer=adamw"
        )
    tensor_parallel = getattr(strategy, "tensor_parallel_size", 1)
    if optimizer_name == "muon" and tensor_parallel > 1:
        raise ValueError(
            f"optimizer=muon does not work with trainer.strategy.tensor_parallel_size="
            f"{tensor_parallel}: tensor parallelism splits the fused q/k/v matrix into three, "
            "which Muon would orthogonalise separately (another optimizer than the "
            "unsplit run's); use tensor_parallel_size=1 (FSDP2) or optimizer=adamw"
        )


def is_global_rank_zero() -> bool:
    """From the launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID; NODE_RANK for
    Lightning's own multi-node launch), so it is known before any Trainer exists."""
    return rank_zero_only.rank == 0 and os.environ.get("NODE_RANK", "0") == "0"


def keep_log_file_on_rank_zero() -> None:
    """One text log per run: other ranks keep logging to the console but not to the run's
    log file. Hydra opens that file lazily (hydra/default.yaml sets `delay: true`), so a rank
    that drops the handler before logging anything leaves no file behind."""
    if is_global_rank_zero():
        return
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def check_launch(trainer: L.Trainer) -> None:
    """Refuse the one launch that cannot work: a Hydra multirun (-m) in which Lightning starts
    the extra DDP ranks itself. It restarts the script with the original command line, so every
    extra rank would run the whole sweep on its own."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    environment = getattr(trainer.strategy, "cluster_environment", None)
    spawns = environment is not None and not environment.creates_processes_externally
    if spawns and trainer.num_devices > 1:
        raise ValueError(
            f"a Hydra multirun (-m) cannot start {trainer.num_devices} DDP processes per "
            "job itself; launch the sweep with torchrun (docs/speed_and_scale.md) or run "
            "the jobs one at a time"
        )


def accumulation_for_tokens(
    global_batch_tokens: int, batch_size: int, block_size: int, world_size: int
) -> int:
    """Micro-batches to accumulate per optimizer step so that one step sees
    `global_batch_tokens` = accumulation x batch_size x block_size x world_size tokens."""
    per_micro_batch = batch_size * block_size * world_size
    valid = isinstance(global_batch_tokens, int) and global_batch_tokens >= 1
    if not valid or global_batch_tokens % per_micro_batch:
        raise ValueError(
            f"global_batch_tokens={global_batch_tokens} must be a positive multiple of "
            f"data.loader.batch_size x model.block_size x world size = {batch_size} x "
            f"{block_size} x {world_size} = {per_micro_batch} tokens"
        )
    return global_batch_tokens // per_micro_batch


def gradient_accumulation(
    global_batch_tokens: int | None,
    accumulate_grad_batches: int,
    batch_size: int,
    block_size: int,
    world_size: int,
) -> int:
    """Micro-batches per optimizer step: from `global_batch_tokens` when it is set (then
    trainer.accumulate_grad_batches must stay 1), else trainer.accumulate_grad_batches."""
    if global_batch_tokens is None:
        return accumulate_grad_batches
    if accumulate_grad_batches != 1:
        raise ValueError(
            f"set either global_batch_tokens={global_batch_tokens} or "
            f"trainer.accumulate_grad_batches={accumulate_grad_batches}, not both"
        )
    return accumulation_for_tokens(global_batch_tokens, batch_size, block_size, world_size)


def data_parallel_size(trainer: L.Trainer) -> int:
    """Ranks that see different data: the world size over the tensor-parallel size (ranks of a
    tensor-parallel group share each batch). Known before the processes start."""
    return trainer.world_size // getattr(trainer.strategy, "tensor_parallel_size", 1)


def set_global_batch(
    trainer: L.Trainer, global_batch_tokens: int | None, datamodule: GPTDataModule
) -> None:
    """Set the trainer's gradient accumulation from a global batch in tokens (None: leave it)."""
    if global_batch_tokens is None:
        return
    batch, block, ranks = datamodule.batch_size, datamodule.block_size, data_parallel_size(trainer)
    trainer.accumulate_grad_batches = gradient_accumulation(
        global_batch_tokens, trainer.accumulate_grad_batches, batch, block, ranks
    )
    log.info(
        "global batch %d tokens: accumulating %d micro-batches of %d x %d tokens on %d ranks",
        global_batch_tokens,
        trainer.accumulate_grad_batches,
        batch,
        block,
        ranks,
    )
