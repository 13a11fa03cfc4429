"""Training, saving and loading tokenizers (Hugging Face `tokenizers`).

The default is GPT-2 style byte-level BPE: text is mapped to bytes before merging, so every
string round-trips exactly (``decode(encode(s)) == s``) and there is no unknown token.
Documents are separated by the single special token ``EOT_TOKEN``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptlab.data.errors import DataError
from gptlab.data.fileio import atomic_write_text

EOT_TOKEN = "<|endoftext|>"

# A builder returns an untrained tokenizer and the trainer that fits it.
_Builder = Callable[[int, int], tuple[Tokenizer, trainers.Trainer]]


def _byte_level_bpe(vocab_size: int, min_frequency: int) -> tuple[Tokenizer, trainers.Trainer]:
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


TOKENIZER_KINDS: dict[str, _Builder] = {"bpe": _byte_level_bpe}


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, kind: str = "bpe", min_frequency: int = 2
) -> Tokenizer:
    """Train a `kind` tokenizer with at most `vocab_size` entries (EOT included) on `texts`.

    The result can be smaller than `vocab_size` when the corpus offers too few merges that
    occur at least `min_frequency` times.
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(
            f"unknown tokenizer kind {kind!r}; choose one of {sorted(TOKENIZER_KINDS)}"
        )
    if vocab_size <= 256 + 1:
        raise ValueError(
            f"vocab_size must be > 257 (256 byte symbols + {EOT_TOKEN}), got {vocab_size}"
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
