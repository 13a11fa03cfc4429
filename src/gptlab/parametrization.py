"""How initialisation, multipliers and learning rates scale with width: SP and μP.

`model.parametrization` picks the rules; the model (`gptlab.model`) and the optimizer
(`gptlab.training.optim`) read them from here. Under the standard parametrization (SP) nothing
depends on width. Under μP (maximal update parametrization; Yang et al. 2021, "Tensor Programs
V", Table 3, in the form of the `mup` package) a model of width d is described against a base
width d0 (`model.mup_base_width`, default its own width), with the width multiplier m = d / d0,
so that a model at its base width computes and trains exactly as under SP, and wider models keep
the size of their activations and of their updates as they grow. That is what lets a learning
rate tuned at the base width transfer to wider models.

| parameter (kind)                                  | init std        | AdamW learning rate |
| ------------------------------------------------- | --------------- | ------------------- |
| hidden matrices: attention and MLP projections    | base / sqrt(m)  | base / m            |
| token and position embeddings, the LM head       | base            | base                |
| biases and norm gains (vectors)                   | base            | base                |

and two multipliers in the forward pass:

- the logits are multiplied by 1 / m (the `mup` package's MuReadout; with tied weights the
  embedding keeps its role as an input layer, as in its MuSharedReadout);
- attention scores are scaled by 1 / d_head instead of 1 / sqrt(d_head), written
  sqrt(d0_head) / d_head so that it equals SP's scale at the base width (TP V, section 4).

TP V also advises starting the readout at zero: its random init adds a term to the logits'
updates that vanishes only as 1/sqrt(width). `model.readout_zero_init=true` does that for an
untied head (`model.tie_weights=false`); a tied head is the token embedding and keeps its init
(experiments/mup/README.md measures the term: the logits' updates fall 1.54x from width 64 to
1024 with the tied head, 1.09x with a zero one).

Muon (`optimizer=muon`) already normalises each hidden matrix's update to a width-independent
spectral size when its learning rate is adjusted by sqrt(fan_out / fan_in) (Keller Jordan's
original scaling): that is the spectral condition for feature learning (Yang, Simon and
Bernstein 2023, "A Spectral Condition for Feature Learning"), so under μP Muon's matrices take
no 1/m and `optimizer.muon_lr_adjust` must be "original"; the AdamW part follows the table.
Weight decay is left as configured (decoupled: its effect per step is lr x wd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PARAMETRIZATIONS = ("sp", "mup")


@dataclass(frozen=True)
class WidthScaling:
    """The factors one model's parametrization applies (all 1 under SP or at the base width)."""

    width_mult: float  # m = n_embd / base width
    base_head_size: float  # the head size at the base width
    mup: bool

    @property
    def hidden_init(self) -> float:
        """Factor on the init std of hidden matrices."""
        return 1 / math.sqrt(self.width_mult) if self.mup else 1.0

    @property
    def hidden_lr(self) -> float:
        """Factor on AdamW's learning rate for hidden matrices."""
        return 1 / self.width_mult if self.mup else 1.0

    @property
    def output_mult(self) -> float:
        """Factor on the logits."""
        return 1 / self.width_mult if self.mup else 1.0

    def attention_scale(self, head_size: int) -> float:
        """What attention scores q.k are multiplied by."""
        if self.mup:
            return math.sqrt(self.base_head_size) / head_size
        return 1 / math.sqrt(head_size)


def width_scaling(
    parametrization: str, n_embd: int, n_head: int, base_width: int | None
) -> WidthScaling:
    """The factors for a model of width `n_embd` with `n_head` heads."""
    base = n_embd if base_width is None else base_width
    return WidthScaling(n_embd / base, base / n_head, parametrization == "mup")
