"""Finding and loading gptlab checkpoints without Lightning or Hydra."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from gptlab.data.fileio import atomic_write_text
from gptlab.model import GPT, GPTConfig
from gptlab.training.checkpoint_io import CheckpointReadError
from gptlab.training.lit_gpt import TOKENIZER_KEY

RUN_RECORD = "run.json"


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
        candidates = [path for path in candidates if path.is_file()]
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
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint's tensors and plain data only (no pickled code)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise CheckpointReadError(path, err) from err


def gpt_weights(lit_state_dict: dict[str, Any]) -> dict[str, Any]:
    """The GPT's own entries of a LitGPT state dict (`model.wte.weight` -> `wte.weight`)."""
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in lit_state_dict.items() if k.startswith(prefix)}


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Tokenizer | None]:
    """Rebuild the GPT (in eval mode) and its tokenizer from a gptlab-train checkpoint."""
    checkpoint = load_checkpoint(path, device)
    try:
        model_hparams = checkpoint["hyper_parameters"]["model"]
    except KeyError as err:
        raise ValueError(
            f"{path} is not a gptlab-train checkpoint (no model hyperparameters)"
        ) from err
    model = GPT(GPTConfig.from_dict(dict(model_hparams)))
    model.load_state_dict(gpt_weights(checkpoint["state_dict"]))
    model.to(device).eval()
    tokenizer_json = checkpoint.get(TOKENIZER_KEY)
    return model, Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
