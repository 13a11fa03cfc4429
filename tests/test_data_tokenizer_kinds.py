"""Every tokenizer kind: what decode(encode(s)) gives back, as the tokenizer module documents."""

import string
from pathlib import Path

import pytest
import yaml

from gptlab.data.tokenizer import (
    EOT_TOKEN,
    TOKENIZER_KINDS,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    unk_id,
)
from tests.kit import small_english_documents

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"

# Real prose plus every printable ASCII character, so all ASCII (tab, newline, ...) is seen.
TRAIN = small_english_documents(10) + [string.printable * 3]

SEEN = [
    "The quick brown fox said: 'hello, world'.",
    "  two leading spaces, trailing ones   ",
    "def f(x):\n\treturn [x, x * 2]  # code\n\n\nblank lines\r\n",
    "",
]
UNSEEN = "naïve café ok 日本 🙂"


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(TRAIN, vocab_size=400, kind=kind) for kind in TOKENIZER_KINDS}


@pytest.fixture(params=sorted(TOKENIZER_KINDS))
def trained(request, tokenizers):
    return request.param, tokenizers[request.param]


def round_trip(tokenizer, text):
    return tokenizer.decode(tokenizer.encode(text).ids)


def words(tokenizer, text):
    return [word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def test_seen_characters_round_trip_as_documented(trained):
    kind, tokenizer = trained
    for text in SEEN:
        if kind == "wordpiece":  # the words, joined by single spaces
            assert round_trip(tokenizer, text) == " ".join(words(tokenizer, text))
        else:
            assert round_trip(tokenizer, text) == text


def test_wordpiece_normal_form_spelled_out(tokenizers):
    assert round_trip(tokenizers["wordpiece"], "f(x) = 1,\n  done.") == "f ( x ) = 1 , done ."


def test_unseen_characters(trained):
    kind, tokenizer = trained
    ids = tokenizer.encode(UNSEEN).ids
    if kind == "bpe":  # byte-level: nothing is unknown
        assert unk_id(tokenizer) is None
        assert round_trip(tokenizer, UNSEEN) == UNSEEN
        return
    assert unk_id(tokenizer) in ids
    expected = {
        "char": "nave caf ok  ",  # each unseen character dropped
        "unigram": "nave caf ok  ",
        "wordpiece": "ok",  # each word with an unseen character dropped
    }
    assert round_trip(tokenizer, UNSEEN) == expected[kind]


def test_unigram_reads_a_literal_metaspace_as_a_space(tokenizers):
    assert round_trip(tokenizers["unigram"], "a\u2581b") == "a b"


def test_eot_is_one_special_token_and_decodes_to_nothing(trained):
    _, tokenizer = trained
    assert tokenizer.encode(EOT_TOKEN).ids == [eot_id(tokenizer)]
    assert round_trip(tokenizer, f"a{EOT_TOKEN}a").replace(" ", "") == "aa"


def test_save_load_keeps_the_encoding(trained, tmp_path):
    _, tokenizer = trained
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    for text in [*SEEN, UNSEEN]:
        assert loaded.encode(text).ids == tokenizer.encode(text).ids
    assert unk_id(loaded) == unk_id(tokenizer)


def test_char_keeps_the_most_frequent_characters():
    tokenizer = train_tokenizer(["aaaaa bbbb ccc"], vocab_size=5, kind="char", min_frequency=1)
    assert set(tokenizer.get_vocab()) == {EOT_TOKEN, "[UNK]", "a", "b", "c"}


def test_every_kind_has_a_config():
    for kind in TOKENIZER_KINDS:
        config = yaml.safe_load((CONFIGS / f"{kind}.yaml").read_text())
        assert config["kind"] == kind
        train_tokenizer(TRAIN[:3], config["vocab_size"], kind)  # the default size is valid
