"""gptlab-export: transformers loads the export and computes the same logits as gptlab."""

import importlib.util

import pytest
import torch

from gptlab.cli.export import export
from gptlab.data.tokenizer import EOT_TOKEN, TOKENIZER_KINDS, train_tokenizer, unk_id
from gptlab.hf_export import export_to_hf, hf_architecture
from tests.kit import compose_config, small_english_documents, tiny_gpt, write_checkpoint

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None,
    reason="transformers missing: pip install -e '.[dev]' (or '.[hf]')",
)
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(small_english_documents(10), vocab_size=300)


# The tiny model on the tokenizer's vocabulary. init_std well above the default makes the logits
# large and input-dependent, so a weight mapped wrongly shows up far beyond the 1e-4 tolerance.
EXPORTED = {"vocab_size": 300, "init_std": 0.2}


@needs_transformers
@pytest.mark.parametrize(
    ("variant", "architecture"),
    [
        ({}, "GPT2LMHeadModel"),
        ({"bias": False, "tie_weights": False}, "GPT2LMHeadModel"),
        ({"mlp": "gelu_exact"}, "GPT2LMHeadModel"),
        (LLAMA | {"n_kv_heads": 2, "bias": True}, "LlamaForCausalLM"),
        (LLAMA | {"n_kv_heads": 1, "bias": False, "tie_weights": False}, "LlamaForCausalLM"),
        ({"parametrization": "mup", "mup_base_width": 16}, "GPT2LMHeadModel"),
        (
            LLAMA | {"n_kv_heads": 2, "parametrization": "mup", "mup_base_width": 16},
            "LlamaForCausalLM",
        ),
    ],
    ids=[
        "gpt2",
        "gpt2-no-bias-untied",
        "gpt2-exact-gelu",
        "llama-gqa-bias",
        "llama-mqa-untied",
        "gpt2-mup",
        "llama-mup",
    ],
)
def test_transformers_computes_the_same_logits(tmp_path, tokenizer, variant, architecture):
    from transformers import AutoModelForCausalLM

    model = tiny_gpt(**EXPORTED | variant)
    out = export_to_hf(model, tokenizer, tmp_path / "hf")
    hf, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == architecture
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()

    idx = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.std() > 0.3  # far from uniform: the comparison below means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    prompt = idx[:, :4]
    generated = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=hf.config.eos_token_id,
    )
    # A row that reaches end-of-text stops; transformers pads it with pad = eos, as gptlab does.
    expected = model.generate(prompt, 6, temperature=0, eos_id=hf.config.eos_token_id)
    assert torch.equal(generated, expected)


@needs_transformers
@pytest.mark.parametrize("kind", sorted(TOKENIZER_KINDS))
def test_every_tokenizer_kind_loads_as_a_fast_tokenizer(tmp_path, kind):
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(small_english_documents(10), vocab_size=300, kind=kind)
    out = export_to_hf(tiny_gpt(**EXPORTED), tokenizer, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == FILES
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Return the square root of x.\n\tünïcode 🙂"
    ids = tokenizer.encode(text).ids
    assert hf_tokenizer.encode(text) == ids
    # Lossy kinds lose the same; `tokenizers` drops special tokens by default, transformers not.
    assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)
    assert hf_tokenizer.eos_token == EOT_TOKEN
    assert hf_tokenizer.eos_token_id == tokenizer.token_to_id(EOT_TOKEN)
    assert hf_tokenizer.unk_token_id == unk_id(tokenizer)  # None for byte-level BPE
    assert hf_tokenizer.model_max_length == 16


@pytest.mark.parametrize(
    ("variant", "in_the_way"),
    [
        ({"norm_placement": "post"}, "norm_placement='post' (needs 'pre')"),
        ({"position": "alibi"}, "position='alibi' (needs 'learned')"),
        ({"n_kv_heads": 2}, "gpt2 fails on grouped_query=True (needs False)"),
        (LLAMA | {"qk_norm": True}, "llama fails on qk_norm=True (needs False)"),
        (LLAMA | {"norm": "layernorm"}, "llama fails on norm='layernorm' (needs 'rmsnorm')"),
        ({"sliding_window": 4}, "sliding_window=4 (needs None)"),
        ({"mlp": "relu2"}, "mlp='relu2' (needs 'gelu' or 'gelu_exact')"),
    ],
)
def test_no_matching_architecture_is_a_clear_error(variant, in_the_way):
    with pytest.raises(ValueError, match="no Hugging Face transformers architecture") as error:
        hf_architecture(tiny_gpt(**EXPORTED | variant).config)
    message = str(error.value)
    assert in_the_way in message
    assert "Supported: gpt2: position='learned'" in message and "llama: position='rope'" in message


def export_config(tmp_path, ckpt, *overrides):
    return compose_config("export", [f"ckpt_path={ckpt}", *overrides], tmp_path)


def test_export_command(tmp_path, tokenizer, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = write_checkpoint(
        run / "checkpoints" / "last.ckpt", tiny_gpt(**EXPORTED | LLAMA), tokenizer.to_str()
    )
    out = export(export_config(tmp_path, ckpt))
    assert out == run / "hf" and sorted(p.name for p in out.iterdir()) == FILES
    assert "exported a llama model" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="set force=true"):
        export(export_config(tmp_path, ckpt))
    (out / "stray.txt").write_text("from an earlier export")
    export(export_config(tmp_path, ckpt, "force=true"))
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "hf"]  # no temp folders


def test_export_of_an_unsupported_model_writes_nothing(tmp_path, tokenizer):
    ckpt = write_checkpoint(
        tmp_path / "m.ckpt", tiny_gpt(**EXPORTED, position="alibi"), tokenizer.to_str()
    )
    with pytest.raises(ValueError, match="no Hugging Face transformers architecture"):
        export(export_config(tmp_path, ckpt))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]
