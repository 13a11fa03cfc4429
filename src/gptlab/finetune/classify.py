"""Text classification: (text, label) examples and `LitClassifier`, the GPT with a class head.

- ``source="jsonl"``: one ``{"text": ..., "label": ...}`` object per line (the field names are
  configurable); labels are strings or integers, and class ids follow the sorted label names.
- ``source="builtin"``: which standard-library package does a docstring come from? The
  `num_classes` packages (top-level modules) with the most distinct docstrings in the built-in
  corpus, every distinct docstring of theirs an example. Download-free and real.

An example is encoded as end-of-text, the text's tokens (cut to fit), end-of-text; the classifier
reads the hidden state of that final token, which has attended to the whole text. Batches are
right-padded with PAD_ID, a value no token has, so that `LitClassifier` can find each example's
last real token; it embeds token 0 at padded positions, which causal attention keeps from
affecting the real ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from gptlab.data.sources import iter_jsonl_values, json_field
from gptlab.errors import DataError
from gptlab.finetune.base import ExampleDataModule, LitFinetune, distinct_docstrings, pad

PAD_ID = -1


def package_examples(num_classes: int) -> list[tuple[str, str]]:
    """(docstring, package) for the `num_classes` packages with the most distinct docstrings."""
    records = [(module.split(".")[0], text) for module, _, text in distinct_docstrings()]
    counts = Counter(package for package, _ in records)
    top = {package for package, _ in counts.most_common(num_classes)}
    return [(text, package) for package, text in records if package in top]


def read_labelled_jsonl(
    paths: list[str], text_field: str, label_field: str
) -> list[tuple[str, str]]:
    examples = []
    for path, line, record in iter_jsonl_values(paths):
        where = f"{path}, line {line}"
        text = json_field(record, text_field, str, where)
        label = json_field(record, label_field, object, where)
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise DataError(
                f"{where}: key {label_field!r} holds {type(label).__name__}, expected a string "
                "or an integer label"
            )
        examples.append((text, str(label)))
    return examples


def collate(items: list[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, labels = zip(*items, strict=True)
    return pad(ids, PAD_ID), torch.tensor(labels, dtype=torch.long)


class ClassificationDataModule(ExampleDataModule):
    """Batches (token ids padded with PAD_ID, class ids) for LitClassifier."""

    def __init__(
        self,
        source: str = "builtin",
        paths: list[str] | None = None,
        text_field: str = "text",
        label_field: str = "label",
        num_classes: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 1337,
        num_workers: int = 0,
        tokenizer_path: str | None = None,
        split_seed: int | None = None,
    ) -> None:
        super().__init__(
            source,
            paths,
            max_length,
            batch_size,
            val_fraction,
            seed,
            num_workers,
            tokenizer_path,
            split_seed,
        )
        if source == "builtin" and (num_classes is None or num_classes < 2):
            raise ValueError(
                f"finetune_data.num_classes={num_classes!r}: the built-in task needs >= 2"
            )
        if max_length < 3:
            raise ValueError(
                f"finetune_data.loader.max_length={max_length}: need >= 3 (EOT, text, EOT)"
            )
        self.text_field = text_field
        self.label_field = label_field
        self.num_classes = num_classes

    def load_examples(self) -> list[tuple[str, str]]:
        if self.source == "builtin":
            return package_examples(self.num_classes)
        return read_labelled_jsonl(self.paths, self.text_field, self.label_field)

    @cached_property
    def labels(self) -> list[str]:
        """The class names; class id i is labels[i]."""
        train, val = self.splits
        labels = sorted({label for _, label in train + val})
        if len(labels) < 2:
            raise DataError(f"the data has {len(labels)} distinct label(s); need at least 2")
        if self.num_classes is not None and len(labels) != self.num_classes:
            raise DataError(
                f"finetune_data.num_classes={self.num_classes}, but the data has {len(labels)} "
                f"labels: {labels[:20]}"
            )
        return labels

    @cached_property
    def majority_class(self) -> int:
        """The most common class of the training split: the baseline that ignores the text."""
        counts = Counter(label for _, label in self.splits[0])
        return self.labels.index(counts.most_common(1)[0][0])

    def module_arguments(self) -> dict[str, Any]:
        return {"labels": self.labels, "baseline_class": self.majority_class}

    def encode(self, example: tuple[str, str]) -> tuple[list[int], int]:
        text, label = example
        ids = self.tokenizer.encode(text).ids[: self.max_length - 2]
        return [self.eot_id, *ids, self.eot_id], self.labels.index(label)

    def collate_fn(self) -> Callable:
        return collate


class LitClassifier(LitFinetune):
    """The GPT with its LM head replaced by an n-class head, read at each example's last token
    (padding is PAD_ID). Logs loss and accuracy, and the accuracy of always predicting
    `baseline_class` (the training split's majority class) as accuracy/val_majority."""

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        finetune: dict[str, Any] | None = None,
        labels: Sequence[str] = (),
        baseline_class: int | None = None,
    ) -> None:
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {list(labels)}")
        super().__init__(model, optimizer, scheduler, finetune)
        self.labels = list(labels)
        self.baseline_class = baseline_class
        self.train_acc = MulticlassAccuracy(len(labels), average="micro")
        self.val_acc = MulticlassAccuracy(len(labels), average="micro")
        self.majority_acc = MulticlassAccuracy(len(labels), average="micro")

    def add_task_modules(self) -> list[str]:
        # The head gives way to a fresh one (untied from the embedding), initialised as GPT's.
        head = nn.Linear(self.config.n_embd, len(self.hparams.labels))
        nn.init.normal_(head.weight, std=self.config.init_std)
        nn.init.zeros_(head.bias)
        self.model.lm_head = head
        return ["lm_head"]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids right-padded with PAD_ID -> class logits (B, n_classes)."""
        real = idx != PAD_ID
        logits = self.model(idx.masked_fill(~real, 0))  # (B, T, n_classes)
        last = real.sum(dim=1) - 1  # (B,) each example's last real position
        return logits[torch.arange(idx.size(0), device=idx.device), last]

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.float(), y)
        self.train_acc(logits, y)
        self.log("loss/train", loss, prog_bar=True)
        self.log("accuracy/train", self.train_acc)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits.float(), y), weight=y.numel())
        self.val_acc.update(logits, y)
        if self.baseline_class is not None:
            self.majority_acc.update(torch.full_like(y, self.baseline_class), y)

    def on_validation_epoch_end(self) -> None:
        self.log("loss/val", self.val_loss.compute(), prog_bar=True, sync_dist=False)
        self.log("accuracy/val", self.val_acc.compute(), prog_bar=True, sync_dist=False)
        if self.baseline_class is not None:
            self.log("accuracy/val_majority", self.majority_acc.compute(), sync_dist=False)
        for metric in (self.val_loss, self.val_acc, self.majority_acc):
            metric.reset()
