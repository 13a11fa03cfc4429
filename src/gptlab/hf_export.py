"""Export a gptlab GPT as a Hugging Face `transformers` model folder.

Two transformers architectures express gptlab models exactly (same logits):

- GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU (tanh form "gelu_new", or
  the exact "gelu"), pre-norm, multi-head attention. A model without biases exports zero biases.
- Llama (`LlamaForCausalLM`): RoPE, RMSNorm, SwiGLU, pre-norm, any number of KV heads.
  gptlab's RoPE uses the same rotate-half layout and frequencies as transformers' Llama, and
  both give each KV head a contiguous group of query heads, so q/k weights are copied as is.

Other combinations (post-norm, ALiBi, QK-norm, a sliding window, ...) have no architecture in
transformers that computes the same function, and `hf_architecture` says which settings are in
the way. Writing the folder needs only `safetensors`; loading it needs `transformers`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from gptlab.data.tokenizer import EOT_TOKEN, eot_id, unk_id
from gptlab.model import GPT, GPTConfig

# transformers' GPT-2 activation for each of gptlab's GELU MLPs.
GPT2_ACTIVATIONS = {"gelu": "gelu_new", "gelu_exact": "gelu"}

# What each architecture needs of a GPTConfig ("grouped_query": n_kv_heads < n_head); a tuple
# lists the values it accepts.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "gpt2": {
        "position": "learned",
        "norm": "layernorm",
        "mlp": tuple(GPT2_ACTIVATIONS),
        "norm_placement": "pre",
        "grouped_query": False,
        "qk_norm": False,
        "sliding_window": None,
    },
    "llama": {
        "position": "rope",
        "norm": "rmsnorm",
        "mlp": "swiglu",
        "norm_placement": "pre",
        "qk_norm": False,
        "sliding_window": None,
    },
}


_MODEL_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def hf_architecture(config: GPTConfig) -> str:
    """ "gpt2" or "llama"; a ValueError listing what is supported when neither fits."""
    features = {
        "position": config.position,
        "norm": config.norm,
        "mlp": config.mlp,
        "norm_placement": config.norm_placement,
        "grouped_query": config.kv_heads < config.n_head,
        "qk_norm": config.qk_norm,
        "sliding_window": config.sliding_window,
    }
    mismatches = {
        arch: [
            f"{k}={features[k]!r} (needs {_choices(v)})"
            for k, v in needs.items()
            if features[k] not in _accepted(v)
        ]
        for arch, needs in ARCHITECTURES.items()
    }
    for arch, wrong in mismatches.items():
        if not wrong:
            return arch
    supported = "; ".join(
        f"{arch}: " + ", ".join(f"{k}={_choices(v)}" for k, v in needs.items())
        for arch, needs in ARCHITECTURES.items()
    )
    in_the_way = "; ".join(f"{arch} fails on {', '.join(w)}" for arch, w in mismatches.items())
    raise ValueError(
        f"no Hugging Face transformers architecture computes this model ({in_the_way}). "
        f"Supported: {supported}"
    )


def _accepted(needed: Any) -> tuple:
    """The values an ARCHITECTURES entry accepts: the tuple itself, or its one value."""
    return needed if isinstance(needed, tuple) else (needed,)


def _choices(needed: Any) -> str:
    """'gelu' for one accepted value, 'gelu' or 'gelu_exact' for a tuple of them."""
    return " or ".join(map(repr, _accepted(needed)))


@torch.no_grad()
def with_standard_parametrization(model: GPT) -> GPT:
    """`model` itself under SP; under muP, the same function with its two multipliers folded into
    the weights, which transformers' architectures do not have: the attention scale into the
    query projection (q.k scales linearly with q), the logits' 1/m into an untied LM head."""
    c = model.config
    if c.parametrization == "sp":
        return model
    scaling = c.width_scaling
    tied = c.tie_weights and scaling.output_mult == 1.0
    plain = replace(c, parametrization="sp", mup_base_width=None, tie_weights=tied)
    folded = GPT(plain).to(next(model.parameters()).device)
    folded.load_state_dict(model.state_dict())
    q_rows = c.n_head * c.head_size
    to_sp = scaling.attention_scale(c.head_size) * math.sqrt(c.head_size)
    for block in folded.blocks:
        block.attn.c_attn.weight[:q_rows] *= to_sp
        if block.attn.c_attn.bias is not None:
            block.attn.c_attn.bias[:q_rows] *= to_sp
    folded.lm_head.weight.copy_(model.lm_head.weight * scaling.output_mult)
    return folded


def hf_config(model: GPT, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of the export (written directly: the export itself needs no transformers)."""
    c = model.config
    arch = hf_architecture(c)
    block = model.blocks[0]
    if arch == "gpt2":
        specific = {
            "n_positions": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": block.mlp.c_fc.out_features,
            "activation_function": GPT2_ACTIVATIONS[c.mlp],
            "layer_norm_epsilon": block.norm_1.eps,
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "scale_attn_weights": True,
        }
    else:
        specific = {
            "hidden_size": c.n_embd,
            "intermediate_size": block.mlp.c_fc.out_features,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.kv_heads,
            "head_dim": c.head_size,
            "hidden_act": "silu",
            "max_position_embeddings": c.block_size,
            "rms_norm_eps": block.norm_1.eps,
            # transformers 5 reads rope_parameters, earlier versions rope_theta.
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": c.bias,
            "mlp_bias": c.bias,
            "attention_dropout": c.dropout,
        }
    eot = eot_id(tokenizer)
    return {
        "architectures": [_MODEL_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": c.vocab_size,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": c.tie_weights,
        "initializer_range": c.init_std,
        "torch_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **specific,
    }


def hf_state_dict(model: GPT) -> dict[str, Tensor]:
    """The weights under transformers' names for `hf_architecture(model.config)`. A tied LM
    head is left out: transformers ties it to the embedding on load."""
    c = model.config
    convert = _gpt2_state_dict if hf_architecture(c) == "gpt2" else _llama_state_dict
    state = convert(model)
    if not c.tie_weights:
        state["lm_head.weight"] = model.lm_head.weight
    # safetensors refuses tensors that share memory or are not contiguous.
    return {name: t.detach().contiguous().clone() for name, t in state.items()}


def _gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    def bias(module: torch.nn.Module) -> Tensor:
        # GPT-2 always has biases; a bias-free gptlab model is the same as zero biases.
        weight = module.weight
        return module.bias if module.bias is not None else weight.new_zeros(weight.shape[0])

    state = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.position.wpe.weight,
        "transformer.ln_f.weight": model.norm_f.weight,
        "transformer.ln_f.bias": bias(model.norm_f),
    }
    for i, block in enumerate(model.blocks):
        h = f"transformer.h.{i}."
        for name, norm in (("ln_1", block.norm_1), ("ln_2", block.norm_2)):
            state[h + name + ".weight"] = norm.weight
            state[h + name + ".bias"] = bias(norm)
        for name, linear in (
            ("attn.c_attn", block.attn.c_attn),
            ("attn.c_proj", block.attn.c_proj),
            ("mlp.c_fc", block.mlp.c_fc),
            ("mlp.c_proj", block.mlp.c_proj),
        ):
            # GPT-2's Conv1D stores its weight as (in, out); nn.Linear as (out, in).
            state[h + name + ".weight"] = linear.weight.t()
            state[h + name + ".bias"] = bias(linear)
    return state


def _llama_state_dict(model: GPT) -> dict[str, Tensor]:
    c = model.config
    state = {
        "model.embed_tokens.weight": model.wte.weight,
        "model.norm.weight": model.norm_f.weight,
    }

    def add(name: str, weight: Tensor, bias: Tensor | None) -> None:
        state[name + ".weight"] = weight
        if bias is not None:
            state[name + ".bias"] = bias

    # gptlab fuses q, k and v into one projection; Llama keeps three.
    qkv_sizes = [c.n_head * c.head_size, c.kv_heads * c.head_size, c.kv_heads * c.head_size]
    for i, block in enumerate(model.blocks):
        layer = f"model.layers.{i}."
        attn, mlp = block.attn, block.mlp
        weights = attn.c_attn.weight.split(qkv_sizes)
        biases = attn.c_attn.bias.split(qkv_sizes) if attn.c_attn.bias is not None else [None] * 3
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
            add(layer + "self_attn." + name, weight, bias)
        for name, linear in (
            ("self_attn.o_proj", attn.c_proj),
            ("mlp.gate_proj", mlp.c_gate),
            ("mlp.up_proj", mlp.c_fc),
            ("mlp.down_proj", mlp.c_proj),
        ):
            add(layer + name, linear.weight, linear.bias)
        state[layer + "input_layernorm.weight"] = block.norm_1.weight
        state[layer + "post_attention_layernorm.weight"] = block.norm_2.weight
    return state


def tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, str]:
    """tokenizer.json plus the configs that make it a `PreTrainedTokenizerFast`."""
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN}
    unknown = unk_id(tokenizer)
    if unknown is not None:
        special["unk_token"] = tokenizer.id_to_token(unknown)
    config = special | {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


def export_to_hf(
    model: GPT, tokenizer: Tokenizer, out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Write `model` and `tokenizer` to `out_dir` as a transformers model folder.

    The folder is assembled next to `out_dir` and renamed into place, so `out_dir` ends up
    either untouched or complete. An existing `out_dir` is replaced only with `overwrite`.
    """
    from safetensors.torch import save_file  # optional dependency: gptlab[hf]

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another out_dir or set force=true")
    model = with_standard_parametrization(model)
    files = tokenizer_files(tokenizer, model.config.block_size)
    config = hf_config(model, tokenizer)  # fails early for an architecture that cannot export
    files["config.json"] = json.dumps(config, indent=2)
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    files["generation_config.json"] = json.dumps(generation, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
