"""gptlab-eval: loss, perplexity and bits per byte, checked against a hand computation."""

import math

import numpy as np
import pytest
import torch

from gptlab.cli.evaluate import evaluate, score
from gptlab.data.prepare import load_manifest
from gptlab.data.tokenizer import load_tokenizer, train_tokenizer
from gptlab.errors import DataError
from tests.kit import compose_config, tiny_gpt, write_checkpoint

# A large init_std gives confident, context-dependent predictions, so a token scored with the
# wrong context would change the result far beyond the tolerance.
CONFIDENT = {"init_std": 0.3}


@pytest.mark.parametrize("length", [2, 9, 19])
def test_score_matches_a_hand_computation(length):
    model = tiny_gpt(vocab_size=50, block_size=8, **CONFIDENT)
    stream = np.random.default_rng(length).integers(0, 50, size=length)
    nats = 0.0
    for t in range(1, length):  # token t, predicted from the tokens before it in its window
        start = (t - 1) // 8 * 8
        logits = model(torch.tensor(stream[start:t])[None])[0, -1]
        nats -= torch.log_softmax(logits, dim=-1)[stream[t]].item()
    result = score(model, stream, num_bytes=40, batch_size=2)
    assert result["tokens"] == length - 1
    assert result["loss"] == pytest.approx(nats / (length - 1), rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nats / (length - 1)), rel=1e-5)
    assert result["bpb"] == pytest.approx(nats / (math.log(2) * 40), rel=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory):
    tokenizer_json = (tiny_data_dir / "tokenizer.json").read_text()
    vocab_size = load_manifest(tiny_data_dir)["vocab_size"]
    model = tiny_gpt(vocab_size=vocab_size, block_size=32, **CONFIDENT)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    return write_checkpoint(path, model, tokenizer_json, data_dir=tiny_data_dir), model


def eval_config(tmp_path, ckpt_path, *overrides):
    return compose_config("eval", [f"ckpt_path={ckpt_path}", *overrides], tmp_path)


def test_val_split_of_the_training_data_by_default(checkpoint, tiny_data_dir, tmp_path, capsys):
    path, _ = checkpoint
    results = evaluate(eval_config(tmp_path, path))
    val = load_manifest(tiny_data_dir)["splits"]["val"]
    # Every val token is predicted once (an end-of-text token goes first, as context).
    assert (results["tokens"], results["bytes"]) == (val["tokens"], val["bytes"])
    assert results["bpb"] == pytest.approx(
        results["loss"] * results["tokens"] / (math.log(2) * results["bytes"])
    )
    assert "bits/byte" in capsys.readouterr().out


def test_text_files(checkpoint, tiny_data_dir, tmp_path):
    path, model = checkpoint
    docs = ["The first document.\n", "Second one, ünïcode."]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    results = evaluate(eval_config(tmp_path, path, f"text_files=[{tmp_path}/*.txt]"))
    tokenizer = load_tokenizer(tiny_data_dir / "tokenizer.json")
    eot = tokenizer.token_to_id("<|endoftext|>")
    cleaned = [doc.strip("\n") for doc in docs]  # as gptlab-prepare cleans documents
    stream = [eot] + [t for doc in cleaned for t in [*tokenizer.encode(doc).ids, eot]]
    expected = score(model, np.array(stream), sum(len(d.encode()) for d in cleaned))
    assert results["bytes"] == 41  # 19 + 20 characters, ü and ï take 2 bytes
    for key in ("tokens", "loss", "bpb"):
        assert results[key] == pytest.approx(expected[key])


def test_data_with_another_tokenizer_is_refused(tiny_data_dir, tmp_path):
    other = train_tokenizer(["some other text"] * 5, vocab_size=300, kind="char")
    model = tiny_gpt(vocab_size=load_manifest(tiny_data_dir)["vocab_size"])
    path = write_checkpoint(tmp_path / "other.ckpt", model, other.to_str())
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        evaluate(eval_config(tmp_path, path, f"data_dir={tiny_data_dir}"))
