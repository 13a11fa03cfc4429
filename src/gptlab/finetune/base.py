"""What the finetuning tasks (`gptlab.finetune.sft`, `gptlab.finetune.classify`) share: the
data module base (`ExampleDataModule`), the `finetune` config section (`FinetuneConfig`), and
the module base (`LitFinetune`).

Finetuning data is a list of examples small enough to hold in memory. It is split once, seeded,
into training and held-out validation examples, and tokenized with the tokenizer of the
checkpoint being finetuned: token ids mean something only to the model that learned them, so
`gptlab-train` hands that tokenizer over with `use_tokenizer` before fitting. Without a
checkpoint (training from scratch) the tokenizer file at `tokenizer_path` is used instead.

Each example is encoded to token ids that start with the end-of-text token, as every document
of the pretraining stream does (documents are separated by it), and batches are right-padded
to their longest example.

`finetune.method` chooses what trains: every weight ("full") or low-rank adapters on a frozen
model ("lora", see `gptlab.lora`), and `finetune.freeze_blocks: k` also freezes the embeddings
and the lowest k blocks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer
from torch import nn
from torch.utils.data import DataLoader

from gptlab.config import dataclass_from_dict
from gptlab.data.sources import builtin_docstring_records
from gptlab.data.tokenizer import eot_id, load_tokenizer
from gptlab.errors import DataError
from gptlab.lora import LoRAConfig, apply_lora, count_parameters
from gptlab.model import GPT
from gptlab.training.lit_gpt import LitGPT

log = logging.getLogger(__name__)

# A target equal to this adds no loss: it is F.cross_entropy's default ignore_index.
IGNORE_INDEX = -100
EXAMPLE_SOURCES = ("builtin", "jsonl")
FINETUNE_METHODS = ("full", "lora")


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
        split_seed: int | None = None,
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
        self.seed = seed  # the training order's
        self.split_seed = seed if split_seed is None else split_seed  # the held-out examples'
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

    def check_vocab(self, model_vocab_size: int) -> None:
        """Fail unless every token id of the tokenizer is a valid input of the model."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"the tokenizer has {self.vocab_size} tokens, more than the model's "
                f"vocab_size={model_vocab_size}"
            )

    def module_arguments(self) -> dict[str, Any]:
        """What the task's LightningModule takes from the data (a classifier's labels)."""
        return {}

    # ----------------------------------------------------------------- data

    @cached_property
    def splits(self) -> tuple[list, list]:
        """(train, val) examples, before tokenization."""
        return split_examples(self.load_examples(), self.val_fraction, self.split_seed)

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


# ----------------------------------------------------------------------------- modules


@dataclass
class FinetuneConfig:
    task: str = "sft"  # sft | classify
    method: str = "full"  # full | lora
    freeze_blocks: int = 0  # freeze the embeddings and this many of the lowest blocks
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.method not in FINETUNE_METHODS:
            raise ValueError(
                f"finetune.method={self.method!r}; choose one of {', '.join(FINETUNE_METHODS)}"
            )
        if not (isinstance(self.freeze_blocks, int) and self.freeze_blocks >= 0):
            raise ValueError(f"finetune.freeze_blocks={self.freeze_blocks!r} must be >= 0")
        if isinstance(self.lora, Mapping):
            self.lora = dataclass_from_dict(LoRAConfig, dict(self.lora), "finetune.lora")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneConfig:
        return dataclass_from_dict(cls, dict(values), "finetune")


def prepare_for_finetuning(
    model: GPT, config: FinetuneConfig, new_modules: Sequence[str] = ()
) -> None:
    """Set what trains, in place: LoRA adapters only or every weight, minus the embeddings and
    the lowest `freeze_blocks` blocks (with tied weights, freezing the embedding freezes the LM
    head too). The modules named in `new_modules`, such as a fresh head, always train."""
    if config.freeze_blocks > model.config.n_layer:
        raise ValueError(
            f"finetune.freeze_blocks={config.freeze_blocks} exceeds the model's "
            f"n_layer={model.config.n_layer}"
        )
    if config.method == "lora":
        apply_lora(model, config.lora)
    if config.freeze_blocks:
        for module in (model.wte, model.position, *model.blocks[: config.freeze_blocks]):
            module.requires_grad_(False)
    for name in new_modules:
        model.get_submodule(name).requires_grad_(True)


class LitFinetune(LitGPT):
    """LitGPT for finetuning a pretrained GPT: `finetune` (FinetuneConfig) chooses what trains.

    A task may add modules to the GPT, such as a classifier's head, in `add_task_modules`; they
    always train, and `gptlab-train` does not load them from the pretrained checkpoint.
    """

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler)
        self.finetune_config = FinetuneConfig.from_dict(finetune or {})
        self.task_modules = self.add_task_modules()
        prepare_for_finetuning(self.model, self.finetune_config, new_modules=self.task_modules)

    def add_task_modules(self) -> list[str]:
        """Add the task's own modules to `self.model` and return their names."""
        return []


@rank_zero_only
def print_parameter_counts(module: nn.Module, config: FinetuneConfig) -> None:
    trainable, frozen = count_parameters(module)
    method = f"lora, rank {config.lora.rank}" if config.method == "lora" else config.method
    print(
        f"finetuning ({config.task}, {method}, {config.freeze_blocks} frozen blocks): "
        f"{trainable:,} parameters trained ({trainable / (trainable + frozen):.2%}), "
        f"{frozen:,} frozen"
    )
