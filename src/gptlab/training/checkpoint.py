"""Finding and loading gptlab checkpoints without Lightning or Hydra, and starting a new run
from a checkpoint's weights (`init_from`): architecture and tokenizer checks, weight loading."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from gptlab.config import dataclass_from_dict
from gptlab.errors import CheckpointReadError
from gptlab.fileio import atomic_write_text
from gptlab.lora import LoRAConfig, apply_lora, is_lora_parameter, merge_lora
from gptlab.model import GPT, GPTConfig
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
    try:
        hparams = dict(checkpoint["hyper_parameters"])
        config = GPTConfig.from_dict(dict(hparams["model"]))
    except KeyError as err:
        raise ValueError(
            f"{path} is not a gptlab-train checkpoint (no model hyperparameters)"
        ) from err
    state = gpt_weights(checkpoint["state_dict"])
    finetune = hparams.get("finetune") or {}
    if finetune.get("task") == "classify":
        raise ValueError(
            f"{path} is a classifier (its head predicts classes, not tokens), so it cannot be "
            "used as a language model; load it with "
            "gptlab.training.finetune.LitClassifier.load_from_checkpoint"
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


def check_architecture(config: GPTConfig, pretrained: Pretrained) -> None:
    """Fail, listing every differing field, unless `config` builds the checkpoint's model."""
    differing = config.architecture_differences(pretrained.config)
    if differing:
        lines = "\n".join(
            f"  model.{key}: {mine!r} here, {theirs!r} in the checkpoint"
            for key, mine, theirs in differing
        )
        overrides = " ".join(f"model.{k}={_override_value(theirs)}" for k, _, theirs in differing)
        raise ValueError(
            f"the model config differs from the architecture of {pretrained.path}:\n{lines}\n"
            f"start from it with the same architecture: {overrides}"
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


def load_pretrained_weights(model: nn.Module, pretrained: Pretrained, skip: str = "") -> None:
    """Copy the checkpoint's weights into `model` (a GPT, possibly with LoRA adapters).

    Keys starting with `skip` (a replaced head, say) are left out. Every other weight of the
    model must come from the checkpoint, except the adapters, which keep their fresh init.
    """
    state = {k: v for k, v in pretrained.state_dict.items() if not (skip and k.startswith(skip))}
    result = model.load_state_dict(state, strict=False)
    missing = [
        k
        for k in result.missing_keys
        if not is_lora_parameter(k) and not (skip and k.startswith(skip))
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{pretrained.path} does not fit the model: missing weights {missing}, "
            f"unexpected weights {result.unexpected_keys}"
        )
