"""Finding and loading gptlab checkpoints without Lightning or Hydra."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from gptlab.model import GPT, GPTConfig
from gptlab.training.lit_gpt import TOKENIZER_KEY


def find_last_checkpoint(log_dir: str | Path, task_name: str = "train") -> Path:
    """The most recently written `last.ckpt` of any run or sweep job of `task_name`."""
    root = Path(log_dir) / task_name
    candidates = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"no last.ckpt under {root}; train a model first (gptlab-train) "
            "or pass ckpt_path=path/to/file.ckpt"
        )
    return candidates[-1]


def resolve_checkpoint(
    ckpt_path: str | Path, log_dir: str | Path, task_name: str = "train"
) -> Path:
    """`"last"` means the newest last.ckpt of the task; anything else must be an existing file."""
    if str(ckpt_path) == "last":
        return find_last_checkpoint(log_dir, task_name)
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint's tensors and plain data only (no pickled code)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


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
