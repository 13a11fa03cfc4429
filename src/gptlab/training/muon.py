"""Muon for the hidden weight matrices, AdamW for everything else, stepped as one optimizer.

Muon (Jordan et al. 2024; `torch.optim.Muon`) orthogonalises the momentum of each 2-D weight
with a Newton-Schulz iteration. It is meant for the matrices inside the transformer blocks; the
embedding, the LM head, biases and norm gains stay on AdamW.

Lightning's automatic optimization (gradient accumulation, clipping, mixed precision, LR
schedulers) drives a single optimizer, and manual optimization would mean rewriting all of that.
`MuonWithAdamW` is that single optimizer: its `param_groups` *are* the two inner optimizers'
group dicts, so an LR scheduler, gradient clipping or a grad scaler walking them acts on both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The trainable 2-D weights inside `model.blocks` (attention and MLP projections)."""
    return [p for p in model.blocks.parameters() if p.requires_grad and p.ndim == 2]


class MergedState(Mapping):
    """Per-parameter states of optimizers over disjoint parameters, read as one mapping.

    Read-only, and lookups never create entries (a ChainMap over the optimizers' defaultdicts
    would file every missing parameter under the first optimizer)."""

    def __init__(self, *states: Mapping) -> None:
        self.states = states

    def __getitem__(self, param: torch.Tensor) -> Any:
        for state in self.states:
            if param in state:
                return state[param]
        raise KeyError(param)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for state in self.states:
            yield from state

    def __len__(self) -> int:
        return sum(len(state) for state in self.states)


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps a Muon and an AdamW optimizer together; checkpoints hold both states."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        params = [p for opt in (muon, adamw) for group in opt.param_groups for p in group["params"]]
        super().__init__(params, defaults={})
        self.muon, self.adamw = muon, adamw
        self._share_inner_state()

    def _share_inner_state(self) -> None:
        # The inner optimizers' own objects, not copies: writing group["lr"] here changes them.
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self.state = MergedState(self.muon.state, self.adamw.state)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    # The state dict is the standard one over the shared groups and merged state (Muon's groups
    # first), so torch.distributed.checkpoint can key it by parameter name and reshard it under
    # FSDP2. Checkpoints written before hold {"muon": ..., "adamw": ...}; they still load.

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) == {"muon", "adamw"}:
            self.muon.load_state_dict(state_dict["muon"])
            self.adamw.load_state_dict(state_dict["adamw"])
        else:
            groups = state_dict.get("param_groups", [])
            if len(groups) != len(self.param_groups):
                raise ValueError(
                    f"optimizer state has {len(groups)} parameter groups; this MuonWithAdamW has "
                    f"{len(self.param_groups)} (was the checkpoint trained with "
                    "optimizer.name=adamw?)"
                )
            split = len(self.muon.param_groups)
            self.muon.load_state_dict(_state_of_groups(state_dict, groups[:split]))
            self.adamw.load_state_dict(_state_of_groups(state_dict, groups[split:]))
        self._share_inner_state()  # load_state_dict replaced the inner group and state objects

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "muon"):  # Optimizer.__init__ adds the initial groups through here
            raise NotImplementedError("add parameters to the inner .muon or .adamw optimizer")
        super().add_param_group(param_group)


def _state_of_groups(state_dict: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The part of a standard optimizer state dict that belongs to `groups`."""
    indices = {index for group in groups for index in group["params"]}
    state = {index: value for index, value in state_dict["state"].items() if index in indices}
    return {"state": state, "param_groups": groups}
