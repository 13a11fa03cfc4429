"""Optimizers, parameter groups and learning-rate schedules, configured by plain data.

Configs arrive as plain dicts (from Hydra or from a checkpoint's hyperparameters) and are turned
into validated dataclasses here, so a bad value fails before the first training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("adamw",)
SCHEDULERS = ("cosine", "linear", "constant")


def dataclass_from_dict(cls: type, values: dict[str, Any], section: str) -> Any:
    """Build dataclass `cls` from `values`, naming the config section on an unknown key."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in config section '{section}'; "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    return cls(**values)


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.name not in OPTIMIZERS:
            raise ValueError(
                f"optimizer.name={self.name!r} is not known; choose one of: {', '.join(OPTIMIZERS)}"
            )
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas={list(self.betas)} must be two values in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps={self.eps} must be > 0")


@dataclass
class SchedulerConfig:
    """Linear warmup to the peak LR, then decay over the rest of `max_steps` to `min_lr_ratio`."""

    name: str = "cosine"
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise ValueError(
                f"scheduler.name={self.name!r} is not known; choose one of: {', '.join(SCHEDULERS)}"
            )
        if self.max_steps < 1:
            raise ValueError(
                f"scheduler.max_steps={self.max_steps} must be >= 1 "
                "(it follows trainer.max_steps; set trainer.max_steps to a positive number)"
            )
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(
                f"scheduler.warmup_steps={self.warmup_steps} must be in "
                f"[0, max_steps={self.max_steps}]"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"scheduler.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only matrices (linear and embedding weights); biases and norm gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # The fused kernel needs every parameter on an accelerator; elsewhere foreach is fastest.
    on_accelerator = all(p.device.type in ("cuda", "xpu") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=on_accelerator or None,
        foreach=None if on_accelerator else True,
    )


def lr_factor(step: int, cfg: SchedulerConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = cfg.name == "cosine"
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cosine else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
