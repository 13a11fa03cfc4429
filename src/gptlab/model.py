"""A GPT language model in one plain-PyTorch file.

It reads bottom-up, as nanoGPT's does: every module-level name is defined before the code that
uses it. First the configuration, then the small interchangeable pieces (init schemes, norms,
MLPs, positions, attention), then sampling and FLOP accounting, then the block and the GPT, and
last a diagnostic hook. Inside a class the constructor comes first, then the helpers it calls.

Shape comments name each axis by one letter:
    B  batch
    T  time: tokens in the sequence (Tq queries, Tk keys where they differ: a KV cache)
    C  channels, n_embd
    H  query heads, n_head
    K  key/value heads, n_kv_heads (K divides H; K < H is grouped-query attention)
    G  query heads per key/value head, H / K
    D  head dim, C / H
    V  vocabulary, vocab_size
An axis in brackets, as in ([B,] T), exists only for packed rows, whose positions differ by row.

Features (each chosen by name in `GPTConfig`; the names live in small registries):
- attention backends: "sdpa" (`F.scaled_dot_product_attention`) and "eager" (explicit mask and
  softmax, for teaching and diagnostics); both causal, with grouped-query / multi-query KV heads,
  an optional sliding window, and optional QK-norm (RMSNorm over the head dimension).
- positions: "learned" (GPT-2 table), "sinusoidal" (computed on the fly), "rope", "alibi", "none".
- norms: "layernorm", "rmsnorm"; pre-norm or post-norm blocks.
- MLPs: "gelu" (GPT-2's tanh form), "gelu_exact" (erf form), "swiglu" (LLaMA), "relu2" (Primer).
- init schemes: "gpt2" (N(0, init_std), residual projections scaled by depth) and "small_init"
  (GPT-NeoX's width-scaled scheme).
- packed rows (`forward(idx, segments=...)`): several documents per row, each with its own
  positions and attending only within itself (a block-diagonal causal mask).
- KV-cached incremental decoding, and sampling with temperature / top-k / top-p.
- `record_attention`: every layer's attention probabilities, for diagnostics.
- parameter and training-FLOP accounting for MFU.

Adding a variant is one class with a `@register(...)` line; nothing else needs editing.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptlab.parametrization import PARAMETRIZATIONS, WidthScaling, width_scaling

# The variant registries, name -> class: each class below joins one with `@register`.
ATTENTION_BACKENDS: dict[str, type[nn.Module]] = {}
POSITIONS: dict[str, type[Position]] = {}
NORMS: dict[str, type[nn.Module]] = {}
MLPS: dict[str, type[nn.Module]] = {}
INIT_SCHEMES: dict[str, type[InitScheme]] = {}
NORM_PLACEMENTS = ("pre", "post")

_Variant = TypeVar("_Variant", bound=type)


def register(registry: dict[str, type], name: str) -> Callable[[_Variant], _Variant]:
    """Class decorator: make a variant selectable by `name` from the config."""

    def add(cls: _Variant) -> _Variant:
        registry[name] = cls
        return cls

    return add


# ----------------------------------------------------------------------------- configuration


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # max context length (a hard limit only for learned positions)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_heads: int | None = None  # None = n_head (multi-head); fewer = grouped-query; 1 = MQA
    dropout: float = 0.0
    bias: bool = True
    attention: str = "sdpa"
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_placement: str = "pre"
    mlp: str = "gelu"
    mlp_ratio: float = 4.0  # hidden = ratio * n_embd (swiglu: 2/3 of that, rounded up to 64)
    qk_norm: bool = False
    sliding_window: int | None = None  # tokens a query sees, itself included; None = full causal
    tie_weights: bool = True
    # Start the (untied) LM head at zero, as Tensor Programs V advises under muP: its random
    # init adds a term to the logits' updates that vanishes only as 1/sqrt(width).
    readout_zero_init: bool = False
    init: str = "gpt2"  # weight initialisation scheme
    init_std: float = 0.02  # the "gpt2" scheme's standard deviation
    # How init, multipliers and learning rates scale with width (gptlab.parametrization): "sp",
    # or "mup" against mup_base_width (None: this model's own width is the base).
    parametrization: str = "sp"
    mup_base_width: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and value >= 1, name, "a positive integer")
        for name, registry, what in (
            ("attention", ATTENTION_BACKENDS, "attention backend"),
            ("position", POSITIONS, "position encoding"),
            ("norm", NORMS, "norm"),
            ("mlp", MLPS, "MLP"),
            ("init", INIT_SCHEMES, "init scheme"),
            ("parametrization", dict.fromkeys(PARAMETRIZATIONS), "parametrization"),
            ("norm_placement", dict.fromkeys(NORM_PLACEMENTS), "norm placement"),
        ):
            if getattr(self, name) not in registry:
                raise ValueError(
                    f"GPTConfig.{name}={getattr(self, name)!r} is not a known {what}; "
                    f"choose one of: {', '.join(sorted(registry))}"
                )
        self._require(
            self.n_embd % self.n_head == 0, "n_embd", f"divisible by n_head={self.n_head}"
        )
        kv = self.n_kv_heads
        self._require(
            kv is None or (isinstance(kv, int) and kv >= 1 and self.n_head % kv == 0),
            "n_kv_heads",
            f"None or a positive divisor of n_head={self.n_head}",
        )
        self._require(
            self.position != "rope" or self.head_size % 2 == 0,
            "n_embd",
            f"an even head size for rope (n_embd / n_head = {self.n_embd / self.n_head:g})",
        )
        self._require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)")
        self._require(self.rope_theta > 0, "rope_theta", "> 0")
        self._require(self.mlp_ratio > 0, "mlp_ratio", "> 0")
        self._require(self.init_std > 0, "init_std", "> 0")
        self._require(
            not (self.readout_zero_init and self.tie_weights),
            "readout_zero_init",
            "False while tie_weights=True (a zero head would zero the tied embedding)",
        )
        base = self.mup_base_width
        self._require(
            base is None or (isinstance(base, int) and base >= 1 and base % self.n_head == 0),
            "mup_base_width",
            f"None or a positive multiple of n_head={self.n_head}",
        )
        sw = self.sliding_window
        self._require(
            sw is None or (isinstance(sw, int) and sw >= 1), "sliding_window", "None or >= 1"
        )

    def _require(self, ok: bool, name: str, expected: str) -> None:
        if not ok:
            value = getattr(self, name)
            raise ValueError(f"GPTConfig.{name}={value!r} is invalid; expected {expected}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def width_scaling(self) -> WidthScaling:
        return width_scaling(self.parametrization, self.n_embd, self.n_head, self.mup_base_width)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Rebuild from a plain dict (checkpoints and hparams store configs that way)."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(
                f"GPTConfig got unknown keys {unknown}; valid fields are: {', '.join(valid)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Fields that change how the model runs or is initialised, not what its weights mean: a
    # checkpoint may be resumed or finetuned with other values of these.
    RUN_ONLY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"dropout", "attention", "init", "init_std", "readout_zero_init"}
    )

    def architecture_differences(self, other: GPTConfig) -> list[tuple[str, Any, Any]]:
        """(field, this value, other's value) for each field outside RUN_ONLY_FIELDS that differs:
        empty when both configs build models whose weights mean the same."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [
            (key, mine[key], theirs[key])
            for key in mine
            if key not in self.RUN_ONLY_FIELDS and mine[key] != theirs[key]
        ]


# ----------------------------------------------------------------------------- init schemes
# A scheme is two numbers: the standard deviation of every linear and embedding weight, and a
# smaller one for the projections that write into the residual stream (attention and MLP
# `c_proj`). `GPT.init_weights` applies them; biases start at zero and norm gains at one.


class InitScheme(ABC):
    @staticmethod
    @abstractmethod
    def std(config: GPTConfig) -> float: ...

    @staticmethod
    @abstractmethod
    def residual_std(config: GPTConfig) -> float: ...


@register(INIT_SCHEMES, "gpt2")
class GPT2Init(InitScheme):
    """N(0, init_std); residual projections shrunk by 1/sqrt(2 * n_layer), since 2 * n_layer of
    them are summed and the stream's variance would otherwise grow with depth."""

    @staticmethod
    def std(config: GPTConfig) -> float:
        return config.init_std

    @staticmethod
    def residual_std(config: GPTConfig) -> float:
        return config.init_std / math.sqrt(2 * config.n_layer)


@register(INIT_SCHEMES, "small_init")
class SmallInit(InitScheme):
    """GPT-NeoX's scheme, scaled by width d = n_embd instead of a fixed init_std: "small init"
    sqrt(2 / (5 d)) (Nguyen & Salazar 2019) and, for residual projections, Wang's
    2 / (n_layer * sqrt(d)). init_std is not used."""

    @staticmethod
    def std(config: GPTConfig) -> float:
        return math.sqrt(2 / (5 * config.n_embd))

    @staticmethod
    def residual_std(config: GPTConfig) -> float:
        return 2 / (config.n_layer * math.sqrt(config.n_embd))


# ----------------------------------------------------------------------------- norms


@register(NORMS, "layernorm")
class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__(dim, eps=1e-5, bias=bias)


@register(NORMS, "rmsnorm")
class RMSNorm(nn.RMSNorm):
    """No bias and no mean-centering, as in LLaMA; `bias` is accepted for a uniform signature."""

    def __init__(self, dim: int, bias: bool = True) -> None:
        super().__init__(dim, eps=1e-6)


# ----------------------------------------------------------------------------- MLPs
# Every MLP names its output projection `c_proj`: `GPT.init_weights` scales residual branches by it.


@register(MLPS, "gelu")
class GELUMLP(nn.Module):
    """GPT-2's MLP, with GELU's tanh approximation as GPT-2 (and transformers' "gelu_new")."""

    approximate = "tanh"

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = int(config.mlp_ratio * config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


@register(MLPS, "gelu_exact")
class ExactGELUMLP(GELUMLP):
    """GELU as defined, x * Phi(x) (nanoGPT's and BERT's). On CPU PyTorch's erf kernel is about
    2x faster than the tanh form, a few percent of a small model's step."""

    approximate = "none"


@register(MLPS, "swiglu")
class SwiGLUMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # Three matrices instead of two: 2/3 of the hidden size keeps the parameter count level.
        hidden = 64 * math.ceil(2 / 3 * config.mlp_ratio * config.n_embd / 64)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))


@register(MLPS, "relu2")
class ReLU2MLP(GELUMLP):
    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


# ----------------------------------------------------------------------------- positions


class Position(nn.Module):
    """Base position encoding: three hooks, each an identity unless a subclass overrides it.

    Blocks call every hook unconditionally, so they never need to know which encoding is in use.
    `pos`, `q_pos`, `k_pos` are token positions, LongTensors of shape (T,), or (B, T) when each
    row has its own (packed sequences, whose positions restart at every document).
    """

    max_len: int | None = None  # longest sequence supported; None = can extrapolate

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x  # x: (B, T, C) token embeddings

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        return q, k  # (B, H, T, D), (B, K, T, D)

    def attn_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
        return None  # or an additive (H, Tq, Tk) or (B, H, Tq, Tk) bias on the scores


@register(POSITIONS, "none")
class NoPosition(Position):
    """NoPE: the causal mask alone leaks enough order information to learn positions."""


@register(POSITIONS, "learned")
class LearnedPosition(Position):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.max_len = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.wpe(pos)


# The RMS of the sinusoidal table: GPTConfig's default init_std, so that models trained with the
# default init (every preset) compute what they computed when the table followed init_std.
SINUSOIDAL_RMS = 0.02


@register(POSITIONS, "sinusoidal")
class SinusoidalPosition(Position):
    """Vaswani et al. table, computed on the fly so any length works and nothing is stored.

    Scaled to an RMS of SINUSOIDAL_RMS, the default init's token-embedding std: at unit amplitude
    the fixed table would drown the small-initialised token signal (Vaswani instead scale tokens
    up by sqrt(C)). The scale is a constant, not the run's init_std: init settings may change
    when a checkpoint is resumed or finetuned, and the same weights must compute the same logits.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.dim = config.n_embd
        self.scale = SINUSOIDAL_RMS * math.sqrt(2)  # sin and cos have RMS 1/sqrt(2)

    def embed(self, x: Tensor, pos: Tensor) -> Tensor:
        i = torch.arange(0, self.dim, 2, device=pos.device, dtype=torch.float32)
        angles = pos.float()[..., None] * 10000.0 ** (-i / self.dim)  # ([B,] T, ceil(C/2))
        pe = torch.cat([angles.sin(), angles.cos()], dim=-1)[..., : self.dim]  # ([B,] T, C)
        return x + (self.scale * pe).to(x.dtype)


@register(POSITIONS, "rope")
class RotaryPosition(Position):
    """RoPE, rotate-half layout (GPT-NeoX / LLaMA). Angles are recomputed in fp32 on each call:
    cheap at this scale, and immune to the model being cast to a low-precision dtype."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.head_size = config.head_size
        self.theta = config.rope_theta

    def rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        i = torch.arange(0, self.head_size, 2, device=pos.device, dtype=torch.float32)
        angles = pos.float()[..., None] * self.theta ** (-i / self.head_size)  # ([B,] T, D/2)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(-3)  # ([B,] 1, T, D): all heads
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)

        def rot(x: Tensor) -> Tensor:
            x1, x2 = x.chunk(2, dim=-1)  # (B, H or K, T, D/2) each
            return x * cos + torch.cat([-x2, x1], dim=-1) * sin

        return rot(q), rot(k)


def alibi_slopes(n_head: int) -> list[float]:
    """Geometric slopes 2^(-8/n), 2^(-16/n), ...; for non-powers of two, interleave the next
    power's slopes as in the ALiBi reference code."""

    def power_of_2(n: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / n) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_head - closest]


@register(POSITIONS, "alibi")
class ALiBiPosition(Position):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.slopes = alibi_slopes(config.n_head)

    def attn_bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        slopes = torch.tensor(self.slopes, device=q_pos.device)  # (H,)
        distance = (k_pos[..., None, :] - q_pos[..., :, None]).float()  # ([B,] Tq, Tk), <= 0 seen
        return slopes[:, None, None] * distance.unsqueeze(-3)  # ([B,] H, Tq, Tk)


# ----------------------------------------------------------------------------- attention


def segment_positions(segments: Tensor) -> Tensor:
    """Each token's offset from the start of its segment: [[7, 7, 7, 2, 2]] -> [[0, 1, 2, 0, 1]].
    A segment starts wherever the id differs from the token before."""
    t = torch.arange(segments.size(1), device=segments.device).expand_as(segments)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, t, 0).cummax(dim=1).values  # (B, T) where each segment starts
    return t - first


def attention_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    window: int | None,
    bias: Tensor | None,
    segments: Tensor | None = None,
) -> Tensor | None:
    """Additive float mask, 0 where a query may look and -inf elsewhere, plus any position bias.

    The queries are the last Tq of the Tk key positions. Returns None in the one case
    `is_causal=True` describes exactly (Tq == Tk, no window, no bias), which lets sdpa pick its
    fastest kernels; with a KV cache prefix, is_causal would align queries to the first keys.
    With `segments` (B, T), positions are (B, T) and restart in each segment; a query then sees
    only keys of its own segment, which makes the mask block-diagonal, one (B, 1, T, T) per row.
    """
    if segments is None and q_pos.size(-1) == k_pos.size(-1) and window is None and bias is None:
        return None
    distance = q_pos[..., :, None] - k_pos[..., None, :]  # ([B,] Tq, Tk)
    visible = distance >= 0
    if window is not None:
        visible &= distance < window
    if segments is not None:
        # Across segments `distance` means nothing (positions restart), so this test comes last.
        visible = (visible & (segments[:, :, None] == segments[:, None, :]))[:, None]
    mask = torch.zeros(visible.shape, device=q_pos.device).masked_fill(~visible, float("-inf"))
    return mask if bias is None else mask + bias  # ([B,] Tq, Tk) or ([B,] H, Tq, Tk)


@register(ATTENTION_BACKENDS, "sdpa")
class SDPAttention(nn.Module):
    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float
    ) -> Tensor:
        # enable_gqa: each KV head serves its group of query heads without copying K and V.
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout_p,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=k.size(1) != q.size(1),
        )


@register(ATTENTION_BACKENDS, "eager")
class EagerAttention(nn.Module):
    """Every step spelled out; slower and hungrier than sdpa, but easy to inspect or modify.

    With a `record` list, each call appends its attention probabilities (see `record_attention`).
    """

    def __init__(self, record: list[Tensor] | None = None) -> None:
        super().__init__()
        self.record = record

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, scale: float
    ) -> Tensor:
        B, H, Tq, D = q.shape
        K, Tk = k.size(1), k.size(2)
        if mask is None:
            mask = torch.full((Tq, Tk), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        if mask.dim() > 2:  # ([B,] H or 1, Tq, Tk): split the head axis as the queries below
            head = mask.dim() - 3
            mask = mask.unflatten(head, (K, -1) if mask.size(head) == H else (1, 1))
        # Grouped-query attention: query heads as (K, G), so that each group's scores
        # broadcast against its one KV head instead of a copy per query head.
        q = q.view(B, K, H // K, Tq, D)  # (B, K, G, Tq, D)
        k, v = k.unsqueeze(2), v.unsqueeze(2)  # (B, K, 1, Tk, D)
        scores = (q @ k.transpose(-2, -1)) * scale  # (B, K, G, Tq, Tk)
        weights = F.softmax(scores + mask, dim=-1)  # (B, K, G, Tq, Tk)
        if self.record is not None:
            self.record.append(weights.detach().flatten(1, 2))  # (B, H, Tq, Tk)
        weights = F.dropout(weights, p=dropout_p)  # dropout_p is 0 outside training
        return (weights @ v).flatten(1, 2)  # (B, H, Tq, D)


class KVCache:
    """Keys and values of every layer, for incremental decoding.

    Buffers are allocated by the first write, with that write's batch size, dtype and device, so
    the cache needs no setup and works unchanged under autocast. Keys are stored already rotated
    (RoPE) and before GQA expansion: (B, K, max_len, D). The cache keeps every token,
    even with a sliding window; the mask hides what is out of reach. `length` counts the tokens
    stored; `GPT.forward` advances it once all layers have written.
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.k: list[Tensor | None] = [None] * n_layer
        self.v: list[Tensor | None] = [None] * n_layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's keys/values at [length, length+T); return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        if self.k[layer] is None:
            B, K, _, D = k.shape
            self.k[layer] = k.new_zeros(B, K, self.max_len, D)
            self.v[layer] = v.new_zeros(B, K, self.max_len, D)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, K, end, D)

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.kv_heads, config.head_size
        # One matmul for q, k and v; with GQA the k and v parts are narrower.
        self.c_attn = nn.Linear(
            config.n_embd, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=config.bias
        )
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.backend = ATTENTION_BACKENDS[config.attention]()
        self.scale = config.width_scaling.attention_scale(self.head_dim)  # 1/sqrt(D) under SP
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        mask: Tensor | None,
        position: Position,
        kv_cache: KVCache | None,
    ) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        # QK-norm bounds the attention logits, which keeps training stable at high learning rates.
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = position.rotate(q, k, pos)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, K, Tk, D)
        # With GQA k and v keep their K heads: each serves a contiguous group of G query heads.
        if mask is not None:
            mask = mask.to(q.dtype)  # sdpa wants the mask in the query's dtype (autocast)
        dropout_p = self.dropout if self.training else 0.0
        y = self.backend(q, k, v, mask, dropout_p, self.scale)  # (B, H, T, D)
        # (B, T, H * D) = (B, T, C), or under tensor parallel this rank's heads only
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- sampling


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for options `sample` cannot honour."""
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0 and top_k >= 1, got {temperature}, {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one token per row from logits (B, V); temperature=0 means argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the top token always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------- FLOP accounting


def _trains(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


class _TrainingFlops:
    """Walks the matmuls of a forward pass in order (see `GPT.flops_per_token`). `grad` says
    whether the gradient reaches the current point, i.e. whether any weight before it trains."""

    def __init__(self, grad: bool) -> None:
        self.grad = grad
        self.flops = 0.0

    def linear(self, layer: nn.Module) -> None:
        self.parallel_linears([layer])

    def parallel_linears(self, layers: list[nn.Module]) -> None:
        """Layers that read the same input. Inside one layer the matrices form a chain (a LoRA
        layer's B reads A's output), so a trainable matrix passes the gradient to the next."""
        grad_out = self.grad
        for layer in layers:
            grad = self.grad
            for weight in (p for p in layer.parameters() if p.ndim == 2):
                self.flops += 2 * weight.numel() * (1 + grad + weight.requires_grad)
                grad |= weight.requires_grad
            grad_out |= grad
        self.grad = grad_out

    def attention(self, T: int, n_embd: int) -> None:
        # QK^T and AV: 2 T n_embd each forward; backward, the gradients of both operands.
        self.flops += 4 * T * n_embd * (1 + 2 * self.grad)


# ----------------------------------------------------------------------------- the model


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm_1 = NORMS[config.norm](config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.norm_2 = NORMS[config.norm](config.n_embd, config.bias)
        self.mlp = MLPS[config.mlp](config)
        self.mlp_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        mask: Tensor | None,
        position: Position,
        kv_cache: KVCache | None,
    ) -> Tensor:
        if self.pre_norm:  # GPT-2 and later: a clean residual stream, easier to train deep
            x = x + self.attn(self.norm_1(x), pos, mask, position, kv_cache)
            return x + self.mlp_dropout(self.mlp(self.norm_2(x)))
        # Post-norm (original Transformer): normalises the residual stream after each sum.
        x = self.norm_1(x + self.attn(x, pos, mask, position, kv_cache))
        return self.norm_2(x + self.mlp_dropout(self.mlp(x)))


class GPT(nn.Module):
    """Token embedding -> position encoding -> n_layer blocks -> final norm -> LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.position = POSITIONS[config.position](config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        pre = config.norm_placement == "pre"
        self.norm_f = NORMS[config.norm](config.n_embd, config.bias) if pre else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix embeds and unembeds
        self.output_mult = config.width_scaling.output_mult
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The whole initialisation, as `config.init` names it (see the init schemes above)."""
        c = self.config
        scheme = INIT_SCHEMES[c.init]
        # The scheme's stds at the base width; muP shrinks only the hidden matrices' from there.
        mup_base = c.parametrization == "mup" and c.mup_base_width is not None
        base = replace(c, n_embd=c.mup_base_width) if mup_base else c
        std, residual_std = scheme.std(base), scheme.residual_std(base)
        hidden = c.width_scaling.hidden_init
        in_blocks = {id(m) for m in self.blocks.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                factor = hidden if id(module) in in_blocks else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * factor)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm | nn.RMSNorm):
                module.reset_parameters()
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std * hidden)
        if c.readout_zero_init:
            nn.init.zeros_(self.lm_head.weight)

    def new_kv_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for up to `max_len` tokens (default: block_size). Batch size, dtype and
        device come from the first forward that uses it."""
        return KVCache(self.config.n_layer, max_len or self.config.block_size)

    def check_inputs(self, idx: Tensor, kv_cache: KVCache | None, segments: Tensor | None) -> None:
        """Raise ValueError, naming the shapes and lengths, for inputs `forward` cannot take."""
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must have shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if segments is not None and kv_cache is not None:
            raise ValueError("segments (packed rows, for training) cannot be used with a kv_cache")
        if segments is not None and segments.shape != idx.shape:
            raise ValueError(
                f"segments must have the shape of idx {tuple(idx.shape)}, "
                f"got {tuple(segments.shape)}"
            )
        T = idx.size(1)
        start = kv_cache.length if kv_cache is not None else 0
        limit = self.position.max_len
        if limit is not None and start + T > limit:
            raise ValueError(
                f"sequence of {start + T} tokens (cached {start} + new {T}) exceeds "
                f"block_size={limit} of the {self.config.position!r} position table"
            )
        if kv_cache is not None and start + T > kv_cache.max_len:
            raise ValueError(f"KV cache holds {kv_cache.max_len} tokens; {start + T} requested")

    def forward(
        self, idx: Tensor, kv_cache: KVCache | None = None, segments: Tensor | None = None
    ) -> Tensor:
        """idx: (B, T) token ids -> logits (B, T, V).

        With `kv_cache`, idx holds only the new tokens; their positions continue from
        `kv_cache.length`, and the cache is advanced by T.

        `segments` (B, T), for packed rows: the id of the document each token belongs to, equal
        along each document. Every document is then computed as if it were alone in its row:
        positions restart at 0 where the id changes, and tokens attend only within their document.
        """
        self.check_inputs(idx, kv_cache, segments)
        T = idx.size(1)
        start = kv_cache.length if kv_cache is not None else 0
        if segments is None:
            k_pos = torch.arange(start + T, device=idx.device)  # (Tk,) every key, cached first
            pos = k_pos[start:]  # (T,) the queries
        else:
            pos = k_pos = segment_positions(segments)  # (B, T), restarting in each document
        bias = self.position.attn_bias(pos, k_pos)
        mask = attention_mask(pos, k_pos, self.config.sliding_window, bias, segments)
        x = self.drop(self.position.embed(self.wte(idx), pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, pos, mask, self.position, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm_f(x)
        if self.output_mult != 1.0:  # muP's 1/m on the logits, applied to the head's input
            x = x * self.output_mult
        return self.lm_head(x)  # (B, T, V)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, a tied matrix counted once.

        non_embedding=True gives Kaplan et al.'s N, the transformer body: it leaves out the token
        embedding, the learned position table and the LM head (tied or not).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields shared tensors once
        if non_embedding:
            n -= self.wte.weight.numel()
            if self.lm_head.weight is not self.wte.weight:  # untied, or replaced (a classifier)
                n -= sum(p.numel() for p in self.lm_head.parameters())
            if isinstance(self.position, LearnedPosition):
                n -= self.position.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, forward and backward, counted matmul by matmul, for MFU and
        scaling-law budgets. The convention of PaLM (Chowdhery et al. 2022, appendix B) and
        nanoGPT, `6 N + 12 n_layer T n_embd`:

        - a weight matrix of n entries costs 2n per token forward, 2n backward for the gradient
          of its input and 2n for its own gradient: 6n, over every matrix of the blocks and the
          LM head (with its real width: a classifier's head has n_classes outputs);
        - attention's QK^T and AV cost 2 T n_embd each forward per layer at context length T,
          and twice that backward (the gradients of both operands): 12 n_layer T n_embd. The
          causal mask's and a sliding window's savings are not subtracted: sdpa's masked kernels
          and the eager path compute every score. T defaults to block_size; pass the batch's.

        Embedding lookups, norms, biases and softmax are not matmuls and are left out. Frozen
        weights (LoRA, `finetune.freeze_blocks`) cost no weight gradient, and layers below every
        trainable weight need no input gradient either: there only the forward counts.
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        counter = _TrainingFlops(grad=_trains(self.wte, self.position))
        for block in self.blocks:
            counter.grad |= _trains(block.norm_1)
            counter.linear(block.attn.c_attn)
            counter.grad |= _trains(block.attn.q_norm, block.attn.k_norm)
            counter.attention(T, c.n_embd)
            counter.linear(block.attn.c_proj)
            counter.grad |= _trains(block.norm_2)
            inputs = [m for name, m in block.mlp.named_children() if name != "c_proj"]
            counter.parallel_linears(inputs)  # the MLP's input matrices all read x
            counter.linear(block.mlp.c_proj)
        counter.grad |= _trains(self.norm_f)
        counter.linear(self.lm_head)
        return counter.flops

    @torch.no_grad()
    def stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yield each new token, a (B,) LongTensor, as soon as it is sampled.

        temperature=0 is greedy. Once a row emits `eos_id` it keeps emitting it, and the stream
        ends when every row has. Learned positions cap the context at block_size: without a cache
        the context is cropped to its last block_size tokens; with one, the cache is used while
        the sequence fits and decoding then continues uncached with cropping. Other positions
        keep the whole context (extrapolating past block_size).
        """
        check_sampling_options(temperature, top_k, top_p)
        limit = self.position.max_len
        total = idx.size(1) + max_new_tokens
        cache = self.new_kv_cache(min(total, limit or total)) if use_cache else None
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) > cache.max_len:
                cache = None  # learned positions: the cache is full, continue with cropping
            if cache is not None:
                logits = self(idx[:, cache.length :], cache)
            else:
                logits = self(idx if limit is None else idx[:, -limit:])
            token = sample(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            idx = torch.cat([idx, token[:, None]], dim=1)  # (B, T + 1)
            yield token
            if eos_id is not None and bool(done.all()):
                return

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Complete idx (B, T); returns (B, T + generated), generated < max_new_tokens only when
        every row hit eos_id. The tokens are those of `stream`, which has the one decoding loop
        and documents the options."""
        tokens = self.stream(
            idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator
        )
        return torch.cat([idx, *(token[:, None] for token in tokens)], dim=1)  # (B, T + generated)


# ----------------------------------------------------------------------------- diagnostics


@contextmanager
def record_attention(model: GPT) -> Iterator[list[Tensor]]:
    """Record attention probabilities: inside the `with` block, every forward appends each
    layer's softmax weights, (B, H, Tq, Tk) in layer order, to the yielded list.

    The layers run on the eager backend meanwhile (sdpa never materialises the weights, and
    agrees with eager within 1e-5), so the model's normal path pays nothing for this hook.
    """
    probs: list[Tensor] = []
    layers = [block.attn for block in model.blocks]
    backends = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = EagerAttention(record=probs)
    try:
        yield probs
    finally:
        for layer, backend in zip(layers, backends, strict=True):
            layer.backend = backend
