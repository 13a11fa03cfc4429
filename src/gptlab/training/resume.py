"""What an exact resume needs beyond Lightning's own checkpoint state.

Lightning saves the weights, optimizer, LR scheduler, loop counters and the datamodule's stream
position, but no random number generator. `LitGPT` adds the RNG states of every rank (torch CPU,
CUDA where initialised, Python `random`, NumPy's global generator; dropout draws from the torch
one) and refuses a checkpoint of a differently shaped model with a message, instead of
Lightning's state_dict size-mismatch traceback. Everything stored is tensors and plain data, so
checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

from gptlab.model import GPTConfig

log = logging.getLogger(__name__)

RNG_KEY = "gptlab_rng_states"


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data."""
    version, mt_state, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt_state), gauss_next],
        "numpy": {
            "key": numpy_state["state"]["key"].tolist(),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's RNGs to `state` (from `capture_rng_state`)."""
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint may have been mapped to a GPU
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    saved = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np.array(saved["key"], dtype=np.uint32), "pos": saved["pos"]},
            "has_gauss": saved["has_gauss"],
            "gauss": saved["gauss"],
        }
    )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning(
                "checkpoint has CUDA RNG states of %d devices, this process sees %d; "
                "CUDA RNGs not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def gather_rng_states() -> list[dict[str, Any]]:
    """The RNG states of every rank, indexed by rank (a collective: call it on all ranks)."""
    state = capture_rng_state()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return states


def rng_state_of_rank(states: list[dict[str, Any]] | None, rank: int) -> dict[str, Any] | None:
    """The saved RNG state of `rank`, or None (with a warning) where the checkpoint has none."""
    if states is None:
        log.warning("checkpoint holds no RNG states; random draws will differ from the saved run")
        return None
    if rank >= len(states):
        log.warning(
            "checkpoint holds RNG states of %d ranks; rank %d keeps its fresh RNG state",
            len(states),
            rank,
        )
        return None
    return states[rank]


def check_same_model(saved: dict[str, Any] | None, config: GPTConfig, source: str) -> None:
    """Refuse to resume a model whose config differs from the one `source` was trained with."""
    if saved is None:
        raise ValueError(f"{source} is not a gptlab-train checkpoint (no model hyperparameters)")
    try:
        saved_config = GPTConfig.from_dict(dict(saved))
    except ValueError as err:
        raise ValueError(f"{source}: cannot rebuild its model config: {err}") from None
    changes = [
        f"{key} {saved_value!r} -> {value!r}"
        for key, value, saved_value in config.architecture_differences(saved_config)
    ]
    if changes:
        raise ValueError(
            f"{source} was trained with a different model config (model.{'; model.'.join(changes)}"
            "); a checkpoint resumes only the model it holds. Set these model.* values back, "
            "or start a new run without ckpt_path"
        )


def check_same_finetuning(saved: Any, current: Any, source: str) -> None:
    """Refuse to resume a finetuning run with other `finetune` settings: they decide which weights
    train (full, LoRA, frozen blocks), so the optimizer state would not fit."""
    if (saved or None) != (current or None):
        raise ValueError(
            f"{source} was made with finetune={saved}, but this run has finetune={current}; "
            "resume with the same finetune.* settings, or start a new run without ckpt_path"
        )
