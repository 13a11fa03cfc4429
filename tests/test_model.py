"""Tests for gptlab.model: tiny fp32 models, parametrized over the variant registries so a newly
registered variant is covered without editing this file."""

import math

import pytest
import torch
from torch import nn

from gptlab.model import (
    ATTENTION_BACKENDS,
    GPT,
    MLPS,
    NORM_PLACEMENTS,
    NORMS,
    POSITIONS,
    GPTConfig,
    Position,
    SwiGLUMLP,
    alibi_slopes,
    register,
)
from tests.kit import TINY, random_tokens, tiny_config, tiny_gpt

ATTNS = sorted(ATTENTION_BACKENDS)
POS = sorted(POSITIONS)
EXTRAPOLATING = [p for p in POS if p != "learned"]

# Attention shapes worth covering everywhere: plain MHA, sliding window, GQA, MQA (+ window).
ATTN_SHAPES = {
    "mha": dict(),
    "window": dict(sliding_window=4),
    "gqa": dict(n_kv_heads=2),
    "mqa_window": dict(n_kv_heads=1, sliding_window=5),
}


# ----------------------------------------------------------------------------- masking


@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("position", POS)
@pytest.mark.parametrize("attention", ATTNS)
def test_causal(attention, position, shape):
    model = tiny_gpt(attention=attention, position=position, **ATTN_SHAPES[shape])
    idx = random_tokens()
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, t], b[:, t], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ATTNS)
@pytest.mark.parametrize("position", POS)
def test_sliding_window_never_looks_past_window(attention, position):
    window, t = 4, 10
    model = tiny_gpt(attention=attention, position=position, n_layer=1, sliding_window=window)
    idx = random_tokens()
    outside, inside = idx.clone(), idx.clone()
    outside[:, t - window] = (outside[:, t - window] + 1) % TINY["vocab_size"]  # just out of reach
    inside[:, t - window + 1] = (inside[:, t - window + 1] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        base, out, inn = model(idx)[:, t], model(outside)[:, t], model(inside)[:, t]
    torch.testing.assert_close(base, out, atol=1e-6, rtol=0)
    assert not torch.allclose(base, inn, atol=1e-5, rtol=0)


# (n_kv_heads, sliding_window, qk_norm), a spread rather than the full product
BACKEND_CASES = [(None, None, False), (2, 3, True), (1, None, True), (None, 6, False)]


@pytest.mark.parametrize("kv_heads,window,qk_norm", BACKEND_CASES)
@pytest.mark.parametrize("position", POS)
def test_backends_agree(position, kv_heads, window, qk_norm):
    kw = dict(position=position, n_kv_heads=kv_heads, sliding_window=window, qk_norm=qk_norm)
    models = {a: tiny_gpt(attention=a, **kw) for a in ATTNS}
    reference = models[ATTNS[0]]
    for model in models.values():
        model.load_state_dict(reference.state_dict())
    for T in (5, 16):
        idx = random_tokens(T)
        with torch.no_grad():
            outs = [m(idx) for m in models.values()]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=0)


def as_multi_head(gqa: GPT) -> GPT:
    """The MHA model that grouped-query attention stands for: every KV head's key and value rows
    copied to each query head of its group (the definition, written independently of model.py's
    attention code)."""
    c = gqa.config
    mha = GPT(GPTConfig(**{**c.to_dict(), "n_kv_heads": None}))
    state = gqa.state_dict()
    group, hs = c.n_head // c.kv_heads, c.head_size
    for name in [k for k in state if k.endswith("attn.c_attn.weight") or k.endswith("c_attn.bias")]:
        q, k, v = state[name].split([c.n_head * hs, c.kv_heads * hs, c.kv_heads * hs])
        k, v = (
            t.unflatten(0, (c.kv_heads, hs)).repeat_interleave(group, 0).flatten(0, 1)
            for t in (k, v)
        )
        state[name] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    return mha.eval()


@pytest.mark.parametrize("kv_heads,window", [(2, None), (1, 5)])
@pytest.mark.parametrize("position", POS)
@pytest.mark.parametrize("attention", ATTNS)
def test_grouped_query_attention_equals_mha_with_shared_kv_heads(
    attention, position, kv_heads, window
):
    gqa = tiny_gpt(
        attention=attention, position=position, n_kv_heads=kv_heads, sliding_window=window
    )
    mha = as_multi_head(gqa)
    idx = random_tokens(12)
    segments = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])  # a packed row and a whole one
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            gqa(idx, segments=segments), mha(idx, segments=segments), atol=1e-5, rtol=0
        )
        cache = gqa.new_kv_cache()
        steps = [gqa(idx[:, :4], kv_cache=cache)] + [
            gqa(idx[:, t : t + 1], kv_cache=cache) for t in range(4, 12)
        ]
        torch.testing.assert_close(torch.cat(steps, dim=1), mha(idx), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("shape", ["mha", "mqa_window"])
@pytest.mark.parametrize("position", POS)
@pytest.mark.parametrize("attention", ATTNS)
def test_kv_cache_matches_full_forward(attention, position, shape):
    model = tiny_gpt(attention=attention, position=position, **ATTN_SHAPES[shape])
    idx = random_tokens(16)
    with torch.no_grad():
        full = model(idx)
        for chunks in ([3] + [1] * 13, [5, 4, 1, 6]):  # prefill then one-by-one; uneven chunks
            cache = model.new_kv_cache()
            outs, start = [], 0
            for n in chunks:
                outs.append(model(idx[:, start : start + n], kv_cache=cache))
                start += n
            assert cache.length == 16
            torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_overflow_raises():
    model = tiny_gpt(position="rope")
    cache = model.new_kv_cache(max_len=8)
    model(random_tokens(6), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        model(random_tokens(3), kv_cache=cache)


# ----------------------------------------------------------------------------- lengths


@pytest.mark.parametrize("position", EXTRAPOLATING)
def test_extrapolating_positions_run_past_block_size(position):
    model = tiny_gpt(position=position)
    T = 2 * TINY["block_size"]
    with torch.no_grad():
        logits = model(random_tokens(T))
        cache = model.new_kv_cache(max_len=T)
        cached = torch.cat(
            [model(random_tokens(T)[:, :20], cache), model(random_tokens(T)[:, 20:], cache)], 1
        )
    assert logits.shape == (2, T, TINY["vocab_size"])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(cached, logits, atol=1e-5, rtol=0)


def test_learned_positions_reject_long_sequences():
    model = tiny_gpt(position="learned")
    with pytest.raises(ValueError, match="block_size=16"):
        model(random_tokens(17))
    cache = model.new_kv_cache(max_len=32)
    model(random_tokens(10), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(random_tokens(7), kv_cache=cache)


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("placement", NORM_PLACEMENTS)
@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("mlp", sorted(MLPS))
def test_every_block_variant_trains(mlp, norm, placement):
    model = tiny_gpt(mlp=mlp, norm=norm, norm_placement=placement, dropout=0.1, bias=False).train()
    idx = random_tokens()
    logits = model(idx)
    loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert isinstance(model.norm_f, nn.Identity) == (placement == "post")


@pytest.mark.parametrize(
    ("mlp", "gelu"),
    [
        ("gelu_exact", lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))),
        (
            "gelu",
            lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
        ),
    ],
)
def test_gelu_mlps_apply_their_gelu_form(mlp, gelu):
    block = MLPS[mlp](tiny_config())
    with torch.no_grad():  # c_fc the identity on the first 3 units, c_proj reads them out
        block.c_fc.weight.zero_(), block.c_fc.bias.zero_(), block.c_proj.bias.zero_()
        block.c_proj.weight.zero_()
        block.c_fc.weight[:3, :3] = block.c_proj.weight[:3, :3] = torch.eye(3)
    x = torch.zeros(1, tiny_config().n_embd)
    x[0, :3] = torch.tensor([-1.5, 0.3, 2.0])
    out = block(x)[0, :3].tolist()
    assert out == pytest.approx([gelu(v) for v in (-1.5, 0.3, 2.0)], abs=1e-6)


def test_swiglu_hidden_size_is_two_thirds_rounded_to_64():
    assert SwiGLUMLP(tiny_config()).c_fc.out_features == 128  # 2/3 * 128 = 85.3 -> 128
    assert SwiGLUMLP(GPTConfig(n_embd=384)).c_fc.out_features == 1024  # 2/3 * 1536 = 1024


def test_alibi_slopes():
    assert alibi_slopes(8) == [2 ** -(i + 1) for i in range(8)]
    six = alibi_slopes(6)  # not a power of two: 4 base slopes + 2 interleaved from the 8-series
    assert six[:4] == alibi_slopes(4) and six[4:] == alibi_slopes(8)[0::2][:2]


def test_new_variant_needs_only_registration(monkeypatch):
    monkeypatch.setitem(POSITIONS, "shifted", None)  # reserve the name; restored after the test

    @register(POSITIONS, "shifted")
    class Shifted(Position):
        def embed(self, x, pos):
            return x + 1.0

    model = tiny_gpt(position="shifted")
    assert isinstance(model.position, Shifted)
    assert model(random_tokens()).shape == (2, 16, 64)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(position="rop"), "position='rop'.*alibi, learned, none, rope, sinusoidal"),
        (dict(attention="flash"), "attention='flash'.*eager, sdpa"),
        (dict(norm="batchnorm"), "norm='batchnorm'.*layernorm, rmsnorm"),
        (dict(mlp="moe"), "mlp='moe'.*gelu, gelu_exact, relu2, swiglu"),
        (dict(norm_placement="sandwich"), "norm_placement='sandwich'.*post, pre"),
        (dict(init="xavier"), "init='xavier'.*gpt2, small_init"),
        (dict(n_embd=30), "n_embd=30.*divisible by n_head=4"),
        (dict(n_kv_heads=3), "n_kv_heads=3"),
        (dict(n_kv_heads=0), "n_kv_heads=0"),
        (dict(n_head=8, n_embd=24, position="rope"), "n_embd=24.*even head size"),
        (dict(n_layer=0), "n_layer=0.*positive"),
        (dict(vocab_size=-1), "vocab_size=-1"),
        (dict(block_size=2.5), "block_size=2.5"),
        (dict(dropout=1.0), r"dropout=1.0.*\[0, 1\)"),
        (dict(dropout=-0.1), "dropout=-0.1"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(mlp_ratio=0), "mlp_ratio"),
        (dict(init_std=-1.0), "init_std"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = tiny_config(position="rope", n_kv_heads=2)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"\['n_embed'\].*vocab_size, block_size"):
        GPTConfig.from_dict({**TINY, "n_embed": 32})


# ----------------------------------------------------------------------------- params and init


def test_tied_weights_share_storage_and_are_counted_once():
    tied, untied = tiny_gpt(), tiny_gpt(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    V, C = TINY["vocab_size"], TINY["n_embd"]
    assert untied.num_params() == tied.num_params() + V * C
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)
    listed = sum(t.numel() for t in tied.state_dict().values())  # lists the tied matrix twice
    assert tied.num_params() == listed - V * C


def test_num_params_and_flops_hand_computed():
    # d=8, one layer, gelu x4, biases, layernorm, learned positions, tied head.
    model = tiny_gpt(vocab_size=16, block_size=4, n_layer=1, n_head=2, n_embd=8)
    d = 8
    body = (
        2 * d  # norm_1
        + (d * 3 * d + 3 * d)  # c_attn
        + (d * d + d)  # attn c_proj
        + 2 * d  # norm_2
        + (d * 4 * d + 4 * d)  # c_fc
        + (4 * d * d + d)  # mlp c_proj
        + 2 * d  # norm_f
    )
    assert body == 888
    assert model.num_params(non_embedding=True) == 888
    assert model.num_params() == 888 + 16 * d + 4 * d  # + token table + position table


def counted_training_flops(model: GPT, B: int = 2, T: int = 12) -> float:
    """FLOPs of one real forward and backward pass per token, as torch's FlopCounterMode counts
    the matmuls that ran: an independent check of `GPT.flops_per_token`."""
    from torch.utils.flop_counter import FlopCounterMode

    model.train()
    idx = random_tokens(T, B)
    with FlopCounterMode(display=False) as counter:
        model(idx).logsumexp(-1).mean().backward()
    return counter.get_total_flops() / (B * T)


FINETUNING = {
    "full": {},
    "lora": {"method": "lora"},
    "lora_mlp": {"method": "lora", "lora": {"targets": ["*.mlp.*"]}},
    "freeze_1": {"freeze_blocks": 1},
    "freeze_all": {"freeze_blocks": 2},
}


@pytest.mark.parametrize("finetuning", FINETUNING)
@pytest.mark.parametrize(
    "variant", [{}, {"n_kv_heads": 2, "mlp": "swiglu", "bias": False}, {"tie_weights": False}]
)
def test_flops_per_token_counts_what_a_training_step_computes(variant, finetuning):
    # Eager attention: its QK^T and AV are plain matmuls the counter sees.
    model = tiny_gpt(attention="eager", **variant)
    if finetuning:
        from gptlab.finetune.base import FinetuneConfig, prepare_for_finetuning

        prepare_for_finetuning(model, FinetuneConfig.from_dict(FINETUNING[finetuning]))
    for T in (12, 16):
        assert model.flops_per_token(seq_len=T) == pytest.approx(
            counted_training_flops(model, T=T), rel=1e-9
        )
    assert model.flops_per_token() == model.flops_per_token(seq_len=TINY["block_size"])


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    n_layer, std = 8, 0.02
    model = GPT(GPTConfig(vocab_size=256, n_layer=n_layer, n_embd=256, n_head=4, init_std=std))
    scaled = std / math.sqrt(2 * n_layer)
    block = model.blocks[3]
    assert block.attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.attn.c_attn.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(std, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0) and torch.all(block.norm_1.weight == 1)


def test_small_init_scales_with_width_and_depth():
    torch.manual_seed(0)
    n_layer, d = 8, 256
    cfg = GPTConfig(vocab_size=256, n_layer=n_layer, n_embd=d, n_head=4, init="small_init")
    model = GPT(cfg)
    small, wang = math.sqrt(2 / (5 * d)), 2 / (n_layer * math.sqrt(d))  # 0.0395, 0.0156
    block = model.blocks[3]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(small, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(small, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(wang, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(wang, rel=0.05)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("position", POS)
def test_greedy_generate_with_and_without_cache_agree(position):
    model = tiny_gpt(position=position, sliding_window=6)
    prompt = random_tokens(4)
    n = 20 if position != "learned" else 12  # learned: stays within block_size=16
    cached = model.generate(prompt, n, temperature=0)
    uncached = model.generate(prompt, n, temperature=0, use_cache=False)
    assert cached.shape == (2, 4 + n)
    assert torch.equal(cached[:, :4], prompt)
    assert torch.equal(cached, uncached)


def test_learned_generation_past_block_size_falls_back_to_cropping():
    model = tiny_gpt()
    prompt = random_tokens(10)
    cached = model.generate(prompt, 20, temperature=0)
    uncached = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 30)
    assert torch.equal(cached, uncached)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny_gpt()
    prompt = random_tokens(4)
    greedy = model.generate(prompt, 10, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 10, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 10, top_p=1e-6, generator=g), greedy)
    both = model.generate(prompt, 10, temperature=2.0, top_k=1, top_p=1e-6, generator=g)
    assert torch.equal(both, greedy)


def test_seeded_sampling_is_reproducible():
    model = tiny_gpt()
    prompt = random_tokens(4)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 12, temperature=1.5, top_k=20, top_p=0.9, generator=g)

    assert torch.equal(run(123), run(123))
    assert run(123).shape == (2, 16)


def test_stream_yields_each_token():
    model = tiny_gpt()
    prompt = random_tokens(3)
    streamed = list(model.stream(prompt, 7, temperature=0))
    assert len(streamed) == 7 and all(t.shape == (2,) for t in streamed)
    assert torch.equal(torch.stack(streamed, 1), model.generate(prompt, 7, temperature=0)[:, 3:])


def test_eos_stops_generation():
    model = tiny_gpt()
    prompt = random_tokens(3, batch=1)
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0, eos_id=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first
    # Batched: a finished row keeps emitting eos until every row is done (or tokens run out).
    prompt2 = random_tokens(3, batch=2, seed=5)
    eos = model.generate(prompt2, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt2, 10, temperature=0, eos_id=eos)
    assert torch.all(out[0, 3:] == eos)


def test_sampling_rejects_bad_arguments():
    model = tiny_gpt()
    for kwargs in (dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            model.generate(random_tokens(2), 2, **kwargs)


def test_architecture_differences_ignore_how_a_model_runs_or_was_initialised():
    base = GPTConfig()
    run_only = GPTConfig(dropout=0.1, attention="eager", init="small_init", init_std=0.01)
    assert base.architecture_differences(run_only) == []
    assert base.architecture_differences(GPTConfig(n_layer=2, mlp="swiglu")) == [
        ("n_layer", 4, 2),
        ("mlp", "gelu", "swiglu"),
    ]


# A value other than the default for every run-only field; the test below checks the list is full.
OTHER_RUN_VALUES = {
    "dropout": 0.3,
    "attention": "eager",
    "init": "small_init",
    "init_std": 0.1,
    "readout_zero_init": True,
}
# What both models of the test need for a field's other value to be valid.
RUN_VALUE_NEEDS = {"readout_zero_init": {"tie_weights": False}}


@pytest.mark.parametrize("field", sorted(GPTConfig.RUN_ONLY_FIELDS))
@pytest.mark.parametrize("position", POS)
def test_run_only_fields_leave_the_logits_of_loaded_weights_unchanged(field, position):
    """Run-only fields may change on resume and init_from; the weights must mean the same."""
    assert set(OTHER_RUN_VALUES) == GPTConfig.RUN_ONLY_FIELDS
    needs = RUN_VALUE_NEEDS.get(field, {})
    trained = tiny_gpt(seed=0, position=position, **needs)
    with torch.no_grad():  # weights unlike any init, so nothing can hide behind an init value
        for param in trained.parameters():
            param.add_(0.05 * torch.randn_like(param))
    other = tiny_gpt(seed=1, position=position, **needs, **{field: OTHER_RUN_VALUES[field]})
    other.load_state_dict(trained.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            other(random_tokens()), trained(random_tokens()), atol=1e-5, rtol=1e-5
        )
