"""Training, saving and loading tokenizers (Hugging Face `tokenizers`).

Four kinds, chosen by name (`TOKENIZER_KINDS`, config group `tokenizer=`):

=========  ==========================================  ======================================
kind       what it is                                  what ``decode(encode(s))`` gives back
=========  ==========================================  ======================================
bpe        GPT-2 byte-level BPE (the default)          exactly ``s``, for any text
unigram    SentencePiece-style Unigram LM: spaces      ``s`` with every character unseen in
           become "▁" and belong to the next piece     training dropped (it encodes as [UNK])
                                                       and a literal "▁" turned into a space
char       one token per Unicode character             the same as unigram
wordpiece  BERT-style WordPiece: words split at        the words (split at whitespace and
           whitespace and punctuation, "##" marks a    punctuation) joined by single spaces;
           piece that continues a word                 a word with an unseen character is
                                                       dropped (it encodes as one [UNK])
=========  ==========================================  ======================================

Only byte-level BPE is lossless; for the others `gptlab-prepare` reports the share of
validation tokens that are [UNK] (coverage). Documents are separated by the single special
token ``EOT_TOKEN``; decoding drops special tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from gptlab.errors import DataError
from gptlab.fileio import atomic_write_text

EOT_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"

# A builder returns an untrained tokenizer and the trainer that fits it.
_Builder = Callable[[int, int], tuple[Tokenizer, trainers.Trainer]]


def _byte_level_bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    _require_vocab("bpe", vocab_size, 256 + 2, f"256 byte symbols + {EOT_TOKEN} + 1 merge")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN],
        # All 256 byte symbols, so text never seen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def _wordpiece(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    _require_vocab("wordpiece", vocab_size, 3, f"{EOT_TOKEN}, {UNK_TOKEN} + 1 piece")
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # No "cleanup" heuristics (" ," -> ","): the decoded form is then simply the words joined
    # by spaces, which is easy to state and to test.
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN, UNK_TOKEN],
        show_progress=False,
    )
    return tokenizer, trainer


def _unigram(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    """`min_frequency` does not apply: Unigram prunes by likelihood, not by count."""
    _require_vocab("unigram", vocab_size, 3, f"{EOT_TOKEN}, {UNK_TOKEN} + 1 piece")
    tokenizer = Tokenizer(models.Unigram())
    # prepend_scheme="never": no "▁" is invented before the first word, so decoding has none
    # to strip, and leading spaces survive the round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN, UNK_TOKEN],
        unk_token=UNK_TOKEN,
        show_progress=False,
    )
    return tokenizer, trainer


def _char(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
    """The `vocab_size` - 2 most frequent characters (seen at least `min_frequency` times)."""
    _require_vocab("char", vocab_size, 3, f"{EOT_TOKEN}, {UNK_TOKEN} + 1 character")
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    # Every code point is its own "word"; [\s\S] (unlike ".") matches newlines too.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # concatenate, no spaces in between
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT_TOKEN, UNK_TOKEN],
        show_progress=False,
    )
    return tokenizer, trainer


def _require_vocab(kind: str, vocab_size: int, minimum: int, what: str) -> None:
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size for tokenizer kind {kind!r} must be >= {minimum} ({what}), "
            f"got {vocab_size}"
        )


TOKENIZER_KINDS: dict[str, _Builder] = {
    "bpe": _byte_level_bpe,
    "wordpiece": _wordpiece,
    "unigram": _unigram,
    "char": _char,
}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, kind: str = "bpe", min_frequency: int = 2
) -> Tokenizer:
    """Train a `kind` tokenizer with at most `vocab_size` entries (special tokens included).

    The result can be smaller than `vocab_size` when the corpus offers too few merges (or
    characters) that occur at least `min_frequency` times.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r}; choose one of {sorted(TOKENIZER_KINDS)}"
        )
    tokenizer, trainer = TOKENIZER_KINDS[kind](vocab_size, min_frequency)
    tokenizer.train_from_iterator(_bounded_runs(texts), trainer=trainer)
    return tokenizer


# Training time grows with the square of a pre-tokenized word's length: one 2 MB line without
# spaces (minified code, a base64 blob) would take an hour. Longer runs of non-space or space
# characters are cut into pieces for training only; encoding is unaffected and stays exact.
MAX_TRAINING_RUN = 1000
_LONG_RUN = re.compile(rf"\S{{{MAX_TRAINING_RUN},}}|\s{{{MAX_TRAINING_RUN},}}")


def _bounded_runs(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        start = 0
        for match in _LONG_RUN.finditer(text):
            yield text[start : match.start()]
            run = match.group()
            for i in range(0, len(run), MAX_TRAINING_RUN):
                yield run[i : i + MAX_TRAINING_RUN]
            start = match.end()
        yield text[start:]


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Save `tokenizer` as JSON to `path` atomically."""
    atomic_write_text(path, tokenizer.to_str(pretty=True))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer JSON file saved by `save_tokenizer` (or any `tokenizers` JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist; run gptlab-prepare to create it "
            "or set the tokenizer path to an existing tokenizer.json"
        )
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)  # a clearer message for non-JSON than the Rust parser gives
        return Tokenizer.from_str(text)
    # The Rust side raises a bare Exception for JSON that is not a tokenizer.
    except Exception as e:
        raise DataError(f"{path}: not a valid tokenizer JSON file ({e})") from e


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at `path`, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of `EOT_TOKEN`; a DataError if the tokenizer lacks it."""
    token_id = tokenizer.token_to_id(EOT_TOKEN)
    if token_id is None:
        raise DataError(
            f"tokenizer has no {EOT_TOKEN!r} token; gptlab needs it to separate documents"
        )
    return token_id


def unk_id(tokenizer: Tokenizer) -> int | None:
    """The id of the tokenizer's unknown token, or None when it has none (byte-level BPE)."""
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("unk_id") is not None:  # Unigram stores the id
        return int(model["unk_id"])
    token = model.get("unk_token")  # BPE, WordPiece and WordLevel store the string
    return tokenizer.token_to_id(token) if token is not None else None
