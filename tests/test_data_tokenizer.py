"""The byte-level BPE tokenizer: its vocabulary, exact round trips, one end-of-text token,
deterministic training, saving and loading, and clear errors."""

import re

import pytest
from tokenizers import Tokenizer, models

from gptlab.data.tokenizer import (
    EOT_TOKEN,
    eot_id,
    file_sha256,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from gptlab.errors import DataError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x * x\n",
    "Tokenizers split text into pieces; the pieces become ids.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=320)


def test_vocab_has_bytes_eot_and_merges(tokenizer):
    assert 257 < tokenizer.get_vocab_size() <= 320
    assert eot_id(tokenizer) == tokenizer.token_to_id(EOT_TOKEN)


@pytest.mark.parametrize(
    "text",
    [
        "plain ascii text",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n\n\nand blank lines",
        "ünïcödé, 日本語, emoji 🙂👍🏽, RTL שלום, combining e\u0301",
        "for i in range(10):\n\tprint(f'{i:>3}')  # code\n",
        "",
        "\x00\x7f control chars",
    ],
)
def test_decode_encode_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_eot_is_a_single_special_token(tokenizer):
    ids = tokenizer.encode(f"a{EOT_TOKEN}b").ids
    assert ids.count(eot_id(tokenizer)) == 1
    assert tokenizer.encode(EOT_TOKEN).ids == [eot_id(tokenizer)]


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    loaded = load_tokenizer(path)
    for text in TEXTS[:3] + ["unseen wörds 123"]:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert len(file_sha256(path)) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_training_is_deterministic(tokenizer):
    assert train_tokenizer(TEXTS, vocab_size=320).to_str() == tokenizer.to_str()


def test_unknown_kind_lists_choices():
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'bert'.*'bpe', 'char'"):
        train_tokenizer(TEXTS, vocab_size=320, kind="bert")


def test_vocab_size_must_exceed_bytes_plus_eot():
    with pytest.raises(ValueError, match=r"'bpe' must be >= 258 \(256 byte symbols"):
        train_tokenizer(TEXTS, vocab_size=257)
    with pytest.raises(ValueError, match=r"'char' must be >= 3"):
        train_tokenizer(TEXTS, vocab_size=2, kind="char")


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.json.*gptlab-prepare"):
        load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("content", ["{not json", '{"valid": "json, not a tokenizer"}'])
def test_corrupt_file_names_it(tmp_path, content):
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(DataError, match=r"broken\.json.*not a valid tokenizer"):
        load_tokenizer(path)


def test_eot_missing():
    with pytest.raises(DataError, match=re.escape("no '<|endoftext|>' token")):
        eot_id(Tokenizer(models.BPE()))
