"""LoRA: low-rank adapters on frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

A wrapped layer computes

    y = x W^T + b  +  (alpha / rank) * dropout(x) A^T B^T

where W and b are the pretrained weights, frozen, and only A (rank x in) and B (out x rank) are
trained: a fraction of a percent of the parameters for the usual ranks. B starts at zero, so
before the first step the wrapped model computes exactly what the pretrained one does.
`merge_lora` folds (alpha / rank) * B A into W for export, leaving a plain model with no adapters
and the same outputs.

`LoRALinear` subclasses `nn.Linear` and keeps its `weight` and `bias` names, so a pretrained state
dict loads into a wrapped model unchanged; only the `lora_A` / `lora_B` keys are new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LORA_PARAMETERS = ("lora_A", "lora_B")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, so changing rank keeps its size
    dropout: float = 0.0  # on the adapter's input only
    # fnmatch patterns over module names such as "blocks.3.attn.c_attn" (attention q/k/v),
    # "blocks.3.attn.c_proj" (attention output), "blocks.3.mlp.c_fc" / "blocks.3.mlp.c_proj".
    targets: list[str] = field(default_factory=lambda: ["*.attn.c_attn", "*.attn.c_proj"])

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"finetune.lora.rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"finetune.lora.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"finetune.lora.dropout={self.dropout!r} must be in [0, 1)")
        self.targets = list(self.targets)
        if not self.targets or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(
                f"finetune.lora.targets={self.targets!r} must be a non-empty list of module "
                "name patterns, e.g. ['*.attn.c_attn', '*.mlp.*']"
            )


class LoRALinear(nn.Linear):
    """An `nn.Linear` whose weight and bias are frozen, plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        # Built on the meta device, then handed the base layer's own parameters: nothing is
        # allocated twice and the pretrained tensors are shared, not copied.
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kwargs = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing what this layer computes (without adapter dropout)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device="meta"
        )
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
        linear.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype))
        linear.bias = self.bias
        return linear


def is_lora_parameter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in LORA_PARAMETERS


def linear_layer_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _layer_kinds(names: list[str]) -> str:
    """'blocks.0.attn.c_attn', 'blocks.1.attn.c_attn' -> 'blocks.{i}.attn.c_attn', for errors."""
    kinds = dict.fromkeys(
        ".".join("{i}" if part.isdigit() else part for part in name.split(".")) for name in names
    )
    return ", ".join(kinds)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of the parameters registered under more than one name (tied weights)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linear layers matching any of `patterns`; every pattern must match one."""
    linears = linear_layer_names(model)
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in linears):
            raise ValueError(
                f"finetune.lora.targets pattern {pattern!r} matches no linear layer; the "
                f"model's linear layers are: {_layer_kinds(linears)}"
            )
    targets = [name for name in linears if any(fnmatchcase(name, p) for p in patterns)]
    shared = _shared_weights(model)
    for name in targets:
        if id(model.get_submodule(name).weight) in shared:
            # Merging would change the other user of the weight too (the tied token embedding).
            raise ValueError(
                f"finetune.lora.targets: {name!r} shares its weight with another module "
                "(tied embeddings), so an adapter on it cannot be merged; leave it out"
            )
    return targets


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model` and wrap the target linear layers with trainable
    adapters, in place. Returns the wrapped layers' names."""
    targets = find_targets(model, config.targets)
    model.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = LoRALinear(getattr(parent, child), config.rank, config.alpha, config.dropout)
        setattr(parent, child, adapter)
    return targets


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` in `model` by its merged `nn.Linear`, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts; a tied tensor is counted once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen
