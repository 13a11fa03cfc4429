"""What the finetuning data modules (`gptlab.data.sft`, `gptlab.data.classify`) share.

Finetuning data is a list of examples small enough to hold in memory. It is split once, seeded,
into training and held-out validation examples, and tokenized with the tokenizer of the
checkpoint being finetuned: token ids mean something only to the model that learned them, so
`gptlab-train` hands that tokenizer over with `use_tokenizer` before fitting. Without a
checkpoint (training from scratch) the tokenizer file at `tokenizer_path` is used instead.

Each example is encoded to token ids that start with the end-of-text token, as every document
of the pretraining stream does (documents are separated by it), and batches are right-padded
to their longest example.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from gptlab.data.errors import DataError
from gptlab.data.sources import builtin_docstring_records
from gptlab.data.tokenizer import eot_id, load_tokenizer

log = logging.getLogger(__name__)

# A target equal to this adds no loss: it is F.cross_entropy's default ignore_index.
IGNORE_INDEX = -100
EXAMPLE_SOURCES = ("builtin", "jsonl")


def split_examples(examples: Sequence[Any], val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first max(1, round(val_fraction * n)) examples are held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"finetune_data.loader.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, round(val_fraction * len(examples)))
    if n_val >= len(examples):
        raise DataError(
            f"{len(examples)} examples cannot be split into training and validation examples "
            f"with val_fraction={val_fraction}; give more examples"
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """(len(rows), longest row) int64 tensor, each row right-padded with `value`."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def distinct_docstrings(include_site_packages: bool = False) -> list[tuple[str, str, str]]:
    """The built-in corpus's (module, qualified name, docstring) records whose text occurs once:
    boilerplate such as "Return self==value." belongs to no one object and would be noise."""
    records = builtin_docstring_records(include_site_packages)
    counts = Counter(text for _, _, text in records)
    return [record for record in records if counts[record[2]] == 1]


class ExampleDataModule(L.LightningDataModule):
    """Base class: subclasses say how to read examples, encode one, and collate a batch."""

    def __init__(
        self,
        source: str,
        paths: Sequence[str] | None,
        max_length: int,
        batch_size: int,
        val_fraction: float = 0.05,
        seed: int = 1337,
        num_workers: int = 0,
        tokenizer_path: str | None = None,
    ) -> None:
        super().__init__()
        if source not in EXAMPLE_SOURCES:
            raise ValueError(
                f"finetune_data.source={source!r}; choose one of {', '.join(EXAMPLE_SOURCES)}"
            )
        if (source == "jsonl") != bool(paths):
            raise ValueError(
                f"finetune_data.paths={list(paths or [])}: source 'jsonl' needs files or globs, "
                "source 'builtin' takes none"
            )
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"finetune_data.loader.{name} must be >= 1, got {value}")
        self.source = source  # "builtin": a task made from the built-in corpus; "jsonl": files
        self.paths = list(paths or [])
        self.max_length = max_length
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer_path = tokenizer_path
        self._tokenizer: Tokenizer | None = None
        self.train_items: list | None = None
        self.val_items: list | None = None

    # ----------------------------------------------------------------- subclass interface

    def load_examples(self) -> list:
        """Every example, in a deterministic order."""
        raise NotImplementedError

    def encode(self, example: Any) -> Any | None:
        """One example as model inputs, or None when it cannot be used (e.g. too long)."""
        raise NotImplementedError

    def collate_fn(self) -> Callable[[list], Any]:
        """A picklable function (for loader workers) that turns encoded examples into a batch."""
        raise NotImplementedError

    # ----------------------------------------------------------------- tokenizer

    def use_tokenizer(self, tokenizer_json: str) -> None:
        """Encode with this tokenizer (the checkpoint's), not the one at `tokenizer_path`."""
        if self.train_items is not None:
            raise RuntimeError("use_tokenizer must be called before setup")
        self._tokenizer = Tokenizer.from_str(tokenizer_json)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise ValueError(
                    "no tokenizer: finetune from a checkpoint (init_from=...), which brings its "
                    "own, or set finetune_data.loader.tokenizer_path to a tokenizer.json"
                )
            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def tokenizer_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return eot_id(self.tokenizer)

    # ----------------------------------------------------------------- data

    @cached_property
    def splits(self) -> tuple[list, list]:
        """(train, val) examples, before tokenization."""
        return split_examples(self.load_examples(), self.val_fraction, self.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_items is not None:
            return
        train, val = self.splits
        self.train_items = self._encode_split(train, "train")
        self.val_items = self._encode_split(val, "val")

    def _encode_split(self, examples: list, split: str) -> list:
        items = [item for item in map(self.encode, examples) if item is not None]
        dropped = len(examples) - len(items)
        if not items:
            raise DataError(
                f"none of the {len(examples)} {split} examples fits in max_length="
                f"{self.max_length} tokens; use a longer max_length (model.block_size)"
            )
        if dropped:
            log.warning(
                "dropped %d of %d %s examples that do not fit in max_length=%d tokens",
                dropped,
                len(examples),
                split,
                self.max_length,
            )
        return items

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.train_items,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.val_items,
            batch_size=self.batch_size,
            collate_fn=self.collate_fn(),
            num_workers=self.num_workers,
        )
