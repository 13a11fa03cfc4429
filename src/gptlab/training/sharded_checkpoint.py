"""Distributed (sharded) checkpoints of FSDP2 / tensor-parallel runs: written atomically, read
back whole by the tools that want a plain checkpoint.

A sharded checkpoint is a folder: torch.distributed.checkpoint's shard files (every rank writes
its own shards of the weights and optimizer state) plus Lightning's `meta.pt` (loop counters,
data stream position, RNG states, hyperparameters, tokenizer). A folder cannot be renamed over
another atomically, so `last.ckpt` is a symbolic link to a hidden sibling folder: a save writes
a new folder, then replaces the link (a rename, atomic), then deletes the old folder. A process
killed at any point leaves `last.ckpt` pointing at a complete checkpoint; the folders a killed
save left behind are deleted by the next save.

`read_sharded_checkpoint` turns such a folder into the dict a single-file checkpoint holds
(hyperparameters, tokenizer, the GPT's weights under their plain names), so gptlab-generate,
-eval and -export read sharded checkpoints directly, and `convert_to_single_file` writes one.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from gptlab.data.fileio import atomic_write

log = logging.getLogger(__name__)

METADATA_FILE = _METADATA_FILENAME  # Lightning's name: its loader looks for it
TENSOR_PARALLEL_KEY = "gptlab_tensor_parallel_size"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder (or a link to one) holding a distributed checkpoint."""
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def staging_folder(path: Path) -> Path:
    """A fresh hidden sibling of `path` to write a checkpoint into before publishing it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}")


def remove_stale_folders(path: Path) -> None:
    """Delete the folders that saves of `path` killed before publishing left behind."""
    current = path.resolve() if path.is_symlink() else None
    for folder in path.parent.glob(f".{path.name}.*"):
        if folder.is_dir() and folder.resolve() != current:
            log.info("removing %s, left by a save that was interrupted", folder)
            shutil.rmtree(folder, ignore_errors=True)


def publish(staging: Path, path: Path) -> None:
    """Point `path` at the complete checkpoint folder `staging` in one atomic rename, then
    delete the folder it pointed at before."""
    previous = path.resolve() if path.is_symlink() else None
    link = path.with_name(f".{path.name}.link")
    link.unlink(missing_ok=True)
    os.symlink(staging.name, link)  # relative: the run folder may be moved
    if path.exists() and not path.is_symlink():  # a plain file or folder (another strategy's)
        remove_checkpoint(path)
    os.replace(link, path)
    _fsync_dir(path.parent)
    if previous is not None and previous != staging.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: a link and the folder it points at, a folder, or a file."""
    if path.is_symlink():
        target = path.resolve()
        path.unlink()
        shutil.rmtree(target, ignore_errors=True)
    elif path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_tensor_parallel_layout(path: Path, tensor_parallel_size: int) -> None:
    """Refuse to resume a checkpoint whose attention projections are stored split (a
    tensor-parallel run's) into a run that keeps them fused, or the other way round. Any other
    change of sizes is resharded on load."""
    metadata = torch.load(path / METADATA_FILE, weights_only=True)
    saved = metadata.get(TENSOR_PARALLEL_KEY, 1)
    if (saved > 1) != (tensor_parallel_size > 1):
        raise ValueError(
            f"checkpoint {path} was trained with tensor_parallel_size={saved}, which stores the "
            "attention's q/k/v projections "
            f"{'split' if saved > 1 else 'fused'}; resume it with trainer.strategy."
            f"tensor_parallel_size {'> 1' if saved > 1 else '= 1'}, or convert it to a "
            "single file (gptlab.training.sharded_checkpoint.convert_to_single_file) and "
            "start from its weights with init_from"
        )


def merge_qkv_projections(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A tensor-parallel run's weights with each `c_attn.{q,k,v}` joined back into the plain
    GPT's fused `c_attn`; other state dicts come back unchanged."""
    merged = dict(state_dict)
    for key in [k for k in state_dict if ".c_attn.q." in k]:
        parts = [merged.pop(key.replace(".c_attn.q.", f".c_attn.{p}.")) for p in "qkv"]
        merged[key.replace(".c_attn.q.", ".c_attn.")] = torch.cat(parts)
    return merged


def read_sharded_checkpoint(path: str | Path) -> dict[str, Any]:
    """A sharded checkpoint as a single-file checkpoint's dict, in one process: its metadata
    and the whole weights (a tensor-parallel run's projections joined back into the plain GPT's
    names); the optimizer state is left out."""
    path = Path(path)
    checkpoint = torch.load(path / METADATA_FILE, weights_only=True)
    state: dict[str, Any] = {}
    _load_state_dict(
        state,
        storage_reader=FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    checkpoint["state_dict"] = merge_qkv_projections(state["state_dict"])
    return checkpoint


def convert_to_single_file(path: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint `path` as one file (weights, no optimizer state), atomically."""
    out = Path(out)
    checkpoint = read_sharded_checkpoint(path)
    with atomic_write(out) as f:
        torch.save(checkpoint, f)
    return out
