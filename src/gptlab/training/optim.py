"""Optimizers, parameter groups and learning-rate schedules, configured by plain data.

Configs arrive as plain dicts (from Hydra or from a checkpoint's hyperparameters) and are turned
into validated dataclasses here, so a bad value fails before the first training step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gptlab.model import GPT
from gptlab.training.muon import MuonWithAdamW, hidden_matrices

OPTIMIZERS = ("adamw", "muon")
MUON_LR_ADJUSTMENTS = ("match_rms_adamw", "original")
FUSED_DEVICES = ("cpu", "cuda", "xpu")  # where torch has a fused AdamW kernel
SCHEDULERS = ("cosine", "linear", "constant", "wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt")  # of the WSD decay


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # name=muon: Muon on the hidden matrices (see training/muon.py), AdamW (above) on the rest.
    # match_rms_adamw scales Muon's update to AdamW's RMS, so muon_lr=null (= lr) works;
    # "original" is Keller Jordan's scaling, which wants a larger muon_lr (~0.02).
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    muon_lr_adjust: str = "match_rms_adamw"

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
        if self.muon_lr is not None and not self.muon_lr > 0:
            raise ValueError(f"optimizer.muon_lr={self.muon_lr} must be > 0 (or null: = lr)")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"optimizer.muon_momentum={self.muon_momentum} must be in [0, 1)")
        if self.muon_lr_adjust not in MUON_LR_ADJUSTMENTS:
            raise ValueError(
                f"optimizer.muon_lr_adjust={self.muon_lr_adjust!r} is not known; "
                f"choose one of: {', '.join(MUON_LR_ADJUSTMENTS)}"
            )


@dataclass
class SchedulerConfig:
    """Linear warmup to the peak LR, then decay to `min_lr_ratio` x peak at `max_steps`.

    cosine and linear decay over all of the steps after warmup; constant never decays. wsd
    (warmup-stable-decay; Hu et al. 2024, MiniCPM) holds the peak and decays only over the last
    `decay_steps` steps (null: `decay_fraction` of max_steps), in `decay_shape`: linear, cosine,
    or sqrt (1 - sqrt(progress), Hägele et al. 2024). Up to its decay, a wsd run is the same for
    every max_steps, so a checkpoint of its stable phase can be resumed with a shorter max_steps
    to branch off a decay (see docs/tour.md, "Schedules").
    """

    name: str = "cosine"
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    decay_steps: int | None = None
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

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
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"scheduler.decay_shape={self.decay_shape!r} is not known; "
                f"choose one of: {', '.join(DECAY_SHAPES)}"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"scheduler.decay_fraction={self.decay_fraction} must be in (0, 1]")
        stable_and_decay = self.max_steps - self.warmup_steps
        if self.name == "wsd" and not 1 <= self.wsd_decay_steps <= stable_and_decay:
            raise ValueError(
                f"scheduler.decay_steps={self.wsd_decay_steps} must be in [1, max_steps - "
                f"warmup_steps = {stable_and_decay}]"
            )

    @property
    def wsd_decay_steps(self) -> int:
        """The length of a wsd schedule's decay."""
        if self.decay_steps is not None:
            return self.decay_steps
        return max(1, round(self.decay_fraction * self.max_steps))


def param_groups(
    model: GPT, weight_decay: float, lr: float, exclude: Sequence[nn.Parameter] = ()
) -> list[dict[str, Any]]:
    """Decay only matrices (linear and embedding weights); biases and norm gains are not decayed.
    Under muP the hidden matrices form a third group, at the learning rate its width calls for
    (gptlab.parametrization). Parameters in `exclude` (another optimizer's) are left out."""
    excluded = {id(p) for p in exclude}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in excluded]
    mup = model.config.parametrization == "mup"
    hidden = [p for p in hidden_matrices(model) if id(p) not in excluded] if mup else []
    in_hidden = {id(p) for p in hidden}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in in_hidden]
    no_decay = [p for p in params if p.dim() < 2]
    # The names label the groups' learning rates in TensorBoard (lr-AdamW/decay, ...).
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if hidden:
        hidden_lr = lr * model.config.width_scaling.hidden_lr
        groups.append(
            {"params": hidden, "weight_decay": weight_decay, "lr": hidden_lr, "name": "hidden"}
        )
    return groups


def build_optimizer(
    model: nn.Module, cfg: OptimizerConfig, grad_scaler: bool = False
) -> torch.optim.Optimizer:
    """`grad_scaler`: the gradients reach the optimizer scaled (16-mixed precision). A fused AdamW
    would unscale them inside its step, after gradient clipping has seen them scaled, so it is
    not used then."""
    if cfg.name == "muon":
        return build_muon_adamw(model, cfg, grad_scaler)
    return build_adamw(model, cfg, grad_scaler=grad_scaler)


def build_adamw(
    model: nn.Module,
    cfg: OptimizerConfig,
    exclude: Sequence[nn.Parameter] = (),
    grad_scaler: bool = False,
) -> torch.optim.AdamW:
    # The fused kernel (CPU, CUDA, XPU) is the fastest: on a CPU, for the nano model, 1.2 ms per
    # step against 6.7 ms for foreach and 3.3 ms for the per-tensor loop (1 thread).
    fused = not grad_scaler and all(p.device.type in FUSED_DEVICES for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.lr, exclude),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def build_muon_adamw(
    model: nn.Module, cfg: OptimizerConfig, grad_scaler: bool = False
) -> MuonWithAdamW:
    """Muon on the hidden matrices (with weight decay), AdamW on the rest."""
    if model.config.parametrization == "mup" and cfg.muon_lr_adjust != "original":
        raise ValueError(
            f"optimizer.muon_lr_adjust={cfg.muon_lr_adjust!r} scales Muon's updates with width; "
            "under model.parametrization=mup set optimizer.muon_lr_adjust=original, whose "
            "spectral scaling is muP's for hidden matrices (see gptlab.parametrization)"
        )
    matrices = hidden_matrices(model)
    muon = torch.optim.Muon(
        matrices,
        lr=cfg.muon_lr or cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.muon_momentum,
        adjust_lr_fn=cfg.muon_lr_adjust,
    )
    return MuonWithAdamW(muon, build_adamw(model, cfg, matrices, grad_scaler))


def lr_factor(step: int, cfg: SchedulerConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "wsd":
        decay_start, shape = cfg.max_steps - cfg.wsd_decay_steps, cfg.decay_shape
    else:
        decay_start, shape = cfg.warmup_steps, cfg.name
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
    remaining = {
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
        "linear": 1.0 - progress,
        "sqrt": 1.0 - math.sqrt(progress),
    }[shape]
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * remaining


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
