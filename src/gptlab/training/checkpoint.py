"""Everything a gptlab checkpoint is: what it holds, how it is written, read, found and checked.

What it holds. Lightning's checkpoint (weights, optimizer, LR scheduler, loop counters, the
callbacks' and the datamodule's state) with LitGPT's hyperparameters as plain dicts (`model`,
`optimizer`, `scheduler`, and for finetuning `finetune`), so a checkpoint rebuilds its model
without Hydra; plus two keys of gptlab's own: the tokenizer as JSON text (TOKENIZER_KEY), so a
checkpoint alone is enough to generate text, and every rank's RNG states (RNG_KEY), which
Lightning does not save, for an exact resume. Everything stored is tensors and plain data, so
checkpoints load with ``torch.load(weights_only=True)``: no pickled code, and no module path
that a refactoring could break.

Written atomically. Lightning's own writer serialises into memory and moves a temporary file
from the system temp directory into place, which is neither atomic across filesystems nor
fsynced. `AtomicCheckpointIO` writes to a temporary file next to its target, fsyncs it and
renames it over the target (`gptlab.fileio.atomic_write`): a process killed during a save
leaves the previous checkpoint intact, and a failed save (a full disk) removes its temporary
file and says why. Reading a damaged checkpoint fails with a message naming the file.

Read without Lightning or Hydra (`load_checkpoint`, `read_pretrained`, `load_model`), found by
name (`resolve_checkpoint`: "last" is the newest last.ckpt, through each run's run.json), and
checked before its weights are used: one architecture check for resuming and for starting a
new run from a checkpoint's weights (`init_from`), one tokenizer check.

Sharded. An FSDP2 / tensor-parallel run writes a distributed checkpoint instead: a folder of
torch.distributed.checkpoint shards (every rank writes its own shards of the weights and
optimizer state) plus Lightning's `meta.pt` (loop counters, data stream position, RNG states,
hyperparameters, tokenizer). A folder cannot be renamed over another atomically, so `last.ckpt`
is a symbolic link to a hidden sibling folder: a save writes a new folder, then replaces the
link (a rename, atomic), then deletes the old folder; the folders a killed save left behind are
deleted by the next save. `read_sharded_checkpoint` turns such a folder into the dict a
single-file checkpoint holds, so every reader above takes both kinds, and
`convert_to_single_file` writes one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import random
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.strategies.fsdp import _METADATA_FILENAME
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from gptlab.config import dataclass_from_dict
from gptlab.errors import CheckpointReadError, CheckpointWriteError
from gptlab.fileio import atomic_write, atomic_write_text, fsync_directory
from gptlab.lora import LoRAConfig, apply_lora, is_lora_parameter, merge_lora
from gptlab.model import GPT, GPTConfig

log = logging.getLogger(__name__)

TOKENIZER_KEY = "gptlab_tokenizer_json"
RNG_KEY = "gptlab_rng_states"
RUN_RECORD = "run.json"  # in each run's folder: its name and where its checkpoints go
RESULTS_FILE = "results.json"  # in a run's folder: the final metrics gptlab-train writes
METADATA_FILE = (
    _METADATA_FILENAME  # a sharded checkpoint's metadata: Lightning's loader looks for it
)
TENSOR_PARALLEL_KEY = "gptlab_tensor_parallel_size"


# ----------------------------------------------------------------------------- writing


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temp file in the same directory, fsyncs it, then renames."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(path)
        try:
            with atomic_write(path) as f:
                torch.save(checkpoint, f)
        except Exception as err:
            cause = _os_error_in(err)
            if cause is None:
                raise
            raise CheckpointWriteError(cause.errno, _explain(cause, path)) from err

    def load_checkpoint(self, path: str | Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            raise CheckpointReadError(path, err) from err


def remove_stale_temp_files(path: Path) -> None:
    """Delete temp files that a process killed while saving `path` left behind."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        log.info("removing %s, left by a save that was interrupted", stale)
        stale.unlink(missing_ok=True)


def _os_error_in(err: BaseException | None) -> OSError | None:
    # torch.save reports a failed write of its file object as a RuntimeError whose context
    # is the OSError that the write raised.
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _explain(err: OSError, path: Path) -> str:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return (
        f"cannot write checkpoint {path}: {reason}. The partial file was removed; the previous "
        f"{path.name}, if any, is intact. Free space (or fix the directory) and resume from "
        "the last checkpoint with ckpt_path=last"
    )


# ----------------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint's tensors and plain data only (no pickled code); a sharded (FSDP2 /
    tensor-parallel) checkpoint folder comes back whole, without its optimizer state."""
    if is_sharded_checkpoint(path):
        return read_sharded_checkpoint(path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise CheckpointReadError(path, err) from err


def saved_model_config(checkpoint: dict[str, Any], source: str) -> GPTConfig:
    """The config of the model whose weights `checkpoint` holds (`source` names it in errors)."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("model")
    if saved is None:
        raise ValueError(f"{source} is not a gptlab-train checkpoint (no model hyperparameters)")
    try:
        return GPTConfig.from_dict(dict(saved))
    except ValueError as err:
        raise ValueError(f"{source}: cannot rebuild its model config: {err}") from None


def gpt_weights(lit_state_dict: dict[str, Any]) -> dict[str, Any]:
    """The GPT's own entries of a LitGPT state dict (`model.wte.weight` -> `wte.weight`)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in lit_state_dict.items() if k.startswith(prefix)}


@dataclass
class Pretrained:
    """What a gptlab-train checkpoint holds for starting another run from it."""

    path: Path
    config: GPTConfig
    state_dict: dict[str, Tensor]  # the GPT's weights, keys without the "model." prefix
    tokenizer_json: str | None


def read_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """The language model in a checkpoint: GPT config, weights (LoRA adapters merged in) and
    tokenizer."""
    checkpoint = load_checkpoint(path, device)
    config = saved_model_config(checkpoint, str(path))
    state = gpt_weights(checkpoint["state_dict"])
    finetune = checkpoint["hyper_parameters"].get("finetune") or {}
    if finetune.get("task") == "classify":
        raise ValueError(
            f"{path} is a classifier (its head predicts classes, not tokens), so it cannot be "
            "used as a language model; load it with "
            "gptlab.finetune.classify.LitClassifier.load_from_checkpoint"
        )
    if finetune.get("method") == "lora":
        state = _merge_lora_state(config, state, finetune.get("lora") or {})
    return Pretrained(Path(path), config, state, checkpoint.get(TOKENIZER_KEY))


def _merge_lora_state(
    config: GPTConfig, state: dict[str, Tensor], lora: dict[str, Any]
) -> dict[str, Tensor]:
    """The weights of a LoRA-finetuned GPT with its adapters merged in: plain GPT weights."""
    model = GPT(config)
    apply_lora(model, dataclass_from_dict(LoRAConfig, dict(lora), "finetune.lora"))
    model.load_state_dict(state)
    return merge_lora(model).state_dict()


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer | None]:
    """Rebuild the GPT (in eval mode) and its tokenizer from a gptlab-train checkpoint.

    LoRA adapters of a finetuned checkpoint come back merged into the weights (a plain GPT).
    """
    pretrained = read_pretrained(path, device)
    model = GPT(pretrained.config)
    model.load_state_dict(pretrained.state_dict)
    model.to(device).eval()
    tokenizer_json = pretrained.tokenizer_json
    return model, Tokenizer.from_str(tokenizer_json) if tokenizer_json else None


# ----------------------------------------------------------------------------- finding


def write_run_record(
    output_dir: str | Path,
    run_name: str,
    checkpoint_dir: str | Path | None,
    resumed_from: str | None,
) -> None:
    """Write ``run.json`` in a run's folder: the experiment it belongs to, where its checkpoints
    go and which checkpoint it resumed. `find_last_checkpoint` reads it."""
    record = {
        "run_name": run_name,
        "checkpoint_dir": str(Path(checkpoint_dir).resolve()) if checkpoint_dir else None,
        "resumed_from": resumed_from,
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    atomic_write_text(Path(output_dir) / RUN_RECORD, json.dumps(record, indent=2) + "\n")


def find_last_checkpoint(
    log_dir: str | Path, task_name: str = "train", run_name: str | None = None
) -> Path:
    """The most recently written `last.ckpt` of any run or sweep job of `task_name`; with
    `run_name`, only of the runs recorded under that name."""
    root = Path(log_dir) / task_name
    if run_name is None:
        candidates = list(root.glob("**/checkpoints/last.ckpt"))
    else:
        candidates = [
            Path(record["checkpoint_dir"]) / "last.ckpt"
            for record in _run_records(root)
            if record.get("run_name") == run_name and record.get("checkpoint_dir")
        ]
        candidates = [p for p in candidates if p.is_file() or is_sharded_checkpoint(p)]
    if not candidates:
        named = f" of a run named {run_name!r}" if run_name is not None else ""
        raise FileNotFoundError(
            f"no last.ckpt{named} under {root}; train a model first (gptlab-train) "
            "or pass ckpt_path=path/to/file.ckpt"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime)


def _run_records(root: Path) -> list[dict[str, Any]]:
    records = []
    for path in root.glob(f"**/{RUN_RECORD}"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):  # a run being written, or not ours: not a candidate
            continue
    return records


def resolve_checkpoint(
    ckpt_path: str | Path,
    log_dir: str | Path,
    task_name: str = "train",
    run_name: str | None = None,
) -> Path:
    """`"last"` means the newest last.ckpt of the task (of runs named `run_name`, if given);
    anything else must be an existing file."""
    if str(ckpt_path) == "last":
        return find_last_checkpoint(log_dir, task_name, run_name)
    path = Path(ckpt_path)
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


# ----------------------------------------------------------------------------- checks


def check_architecture(config: GPTConfig, saved: GPTConfig, source: str, remedy: str) -> None:
    """Fail, listing every differing field, unless `config` builds the model whose weights
    `source` holds (fields that only change how it runs, such as dropout, may differ). The
    message ends with `remedy` and the overrides that give the checkpoint's architecture."""
    differing = config.architecture_differences(saved)
    if differing:
        lines = "\n".join(
            f"  model.{key}: {mine!r} here, {theirs!r} in the checkpoint"
            for key, mine, theirs in differing
        )
        overrides = " ".join(f"model.{k}={_override_value(theirs)}" for k, _, theirs in differing)
        raise ValueError(
            f"the model config differs from the architecture of {source}:\n{lines}\n"
            f"{remedy}: {overrides}"
        )


def _override_value(value: Any) -> str:
    """`value` as a Hydra command-line override writes it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_same_tokenizer(tokenizer_json: str, pretrained: Pretrained) -> None:
    """Fail unless `tokenizer_json` is the tokenizer the checkpoint was trained with."""
    if pretrained.tokenizer_json is None:
        return  # nothing to compare against: not written by gptlab-train's LitGPT
    ours = Tokenizer.from_str(tokenizer_json).to_str()
    if ours != Tokenizer.from_str(pretrained.tokenizer_json).to_str():
        raise ValueError(
            f"the data's tokenizer differs from the one {pretrained.path} was trained with, so "
            "token ids would mean different things; prepare the data with the pretraining "
            "tokenizer (gptlab-prepare tokenizer.path=<pretraining data dir>/tokenizer.json)"
        )


def load_pretrained_weights(
    model: nn.Module, pretrained: Pretrained, skip: Sequence[str] = ()
) -> None:
    """Copy the checkpoint's weights into `model` (a GPT, possibly with LoRA adapters).

    The weights of the modules named in `skip` (a replaced head, say) are left out. Every other
    weight of the model must come from the checkpoint, except the adapters, which keep their
    fresh init.
    """
    skipped = tuple(f"{name}." for name in skip)
    state = {k: v for k, v in pretrained.state_dict.items() if not k.startswith(skipped)}
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not is_lora_parameter(k) and not k.startswith(skipped)
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{pretrained.path} does not fit the model: missing weights {missing}, "
            f"unexpected weights {result.unexpected_keys}"
        )


def check_same_finetuning(saved: Any, current: Any, source: str) -> None:
    """Refuse to resume a finetuning run with other `finetune` settings: they decide which weights
    train (full, LoRA, frozen blocks), so the optimizer state would not fit."""
    if (saved or None) != (current or None):
        raise ValueError(
            f"{source} was made with finetune={saved}, but this run has finetune={current}; "
            "resume with the same finetune.* settings, or start a new run without ckpt_path"
        )


# ----------------------------------------------------------------------------- sharded


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
    fsync_directory(path.parent)
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
            "single file (gptlab.training.checkpoint.convert_to_single_file) and "
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


# ----------------------------------------------------------------------------- RNG states


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
