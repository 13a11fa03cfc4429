"""Finding and loading gptlab checkpoints without Lightning or Hydra, and starting a new run
from a checkpoint's weights (`init_from`): architecture and tokenizer checks, weight loading."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from gptlab.lora import LoRAConfig, apply_lora, is_lora_parameter, merge_lora
from gptlab.model import GPT, GPTConfig
from gptlab.training.lit_gpt import TOKENIZER_KEY
from gptlab.training.optim import dataclass_from_dict


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
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
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


# GPTConfig fields that leave the weights' meaning unchanged, so a finetuning run may set them
# differently from pretraining: regularisation, the attention kernel, and the initialisation
# (which the loaded weights overwrite).
RUN_ONLY_FIELDS = ("dropout", "attention", "init_std")


def check_architecture(config: GPTConfig, pretrained: Pretrained) -> None:
    """Fail, listing every differing field, unless `config` builds the checkpoint's model."""
    mine, theirs = config.to_dict(), pretrained.config.to_dict()
    differing = [k for k in mine if k not in RUN_ONLY_FIELDS and mine[k] != theirs[k]]
    if differing:
        lines = "\n".join(
            f"  model.{k}: {mine[k]!r} here, {theirs[k]!r} in the checkpoint" for k in differing
        )
        overrides = " ".join(f"model.{k}={_override_value(theirs[k])}" for k in differing)
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
