"""Finetuning a pretrained GPT: instruction following (LitSFT) and classification (LitClassifier).

Both are LitGPT with a different batch and loss; `finetune.method` chooses what trains: every
weight ("full") or low-rank adapters on a frozen model ("lora", see `gptlab.lora`), and
`finetune.freeze_blocks: k` also freezes the embeddings and the lowest k blocks.
`build_finetune_module` is what `gptlab-train` calls when the config has a `finetune` section
(experiment=sft, experiment=classify): it starts from the `init_from` checkpoint's weights and
hands the checkpoint's tokenizer to the data module, so the data is tokenized the way the model
learned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from gptlab.data.classify import PAD_ID, ClassificationDataModule
from gptlab.data.finetune import IGNORE_INDEX, ExampleDataModule
from gptlab.data.sft import SFTDataModule
from gptlab.data.tokenizer import EOT_TOKEN
from gptlab.lora import LoRAConfig, apply_lora, count_parameters
from gptlab.model import GPT, GPTConfig
from gptlab.training.callbacks import SampleGenerationCallback
from gptlab.training.checkpoint import Pretrained, check_architecture, load_pretrained_weights
from gptlab.training.lit_gpt import LitGPT
from gptlab.training.optim import dataclass_from_dict
from gptlab.training.scale import is_logging_step

log = logging.getLogger(__name__)

FINETUNE_METHODS = ("full", "lora")


@dataclass
class FinetuneConfig:
    task: str = "sft"  # sft | classify
    method: str = "full"  # full | lora
    freeze_blocks: int = 0  # freeze the embeddings and this many of the lowest blocks
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if self.task not in FINETUNE_TASKS:
            raise ValueError(
                f"finetune.task={self.task!r}; choose one of {', '.join(FINETUNE_TASKS)}"
            )
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


class LitSFT(LitGPT):
    """LitGPT on prompt/response batches. Prompt and padding targets are IGNORE_INDEX, so only
    response tokens add loss. Packed batches (finetune_data.loader.packing) carry a third tensor,
    the segment ids, which the model is given.

    The training loss of an optimizer step is the mean over all its response tokens, on every
    rank and in every accumulated micro-batch, as loss/val is over the validation set: a
    micro-batch with more response tokens weighs more. The total is known only once the last
    micro-batch is in, so each micro-batch backpropagates its summed loss divided by a constant,
    `loss_divisor`, and `on_before_optimizer_step` rescales the gradients to the mean.
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
        prepare_for_finetuning(self.model, self.finetune_config)
        # Any constant gives the same gradients; about the response tokens of a micro-batch
        # (set in `setup`), the backpropagated loss stays near a mean loss in size, which is
        # what fp16 loss scaling and NonFiniteGuard's spike check expect.
        self.loss_divisor = 1.0
        self._step_sums = torch.zeros(2)  # (summed loss, response tokens) of this optimizer step

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if isinstance(datamodule, SFTDataModule):
            self.loss_divisor = datamodule.response_tokens_per_batch()

    def response_loss(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token loss over the response tokens of a batch, their count)."""
        x, y, *segments = batch  # (inputs, targets) padded, (inputs, targets, segments) packed
        logits = self.model(x, segments=segments[0] if segments else None)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        return loss, (y != IGNORE_INDEX).sum()

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        loss, count = self.response_loss(batch)
        self._step_sums = self._step_sums.to(loss.device) + torch.stack(
            [loss.detach(), count.float()]
        )
        return loss / self.loss_divisor

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning divided each micro-batch's loss by the accumulation count, and DDP averages
        # the gradients of the ranks; undo both and the divisor, then divide by the step's tokens.
        loss, tokens = self.trainer.strategy.reduce(self._step_sums, reduce_op="sum")
        self._step_sums = torch.zeros_like(self._step_sums)
        trainer = self.trainer
        scale = trainer.accumulate_grad_batches * trainer.world_size * self.loss_divisor
        for param in self.parameters():
            if param.grad is not None:
                param.grad.mul_(scale / tokens.clamp(min=1))
        if trainer.progress_bar_callback or is_logging_step(trainer, self.global_step + 1):
            self.log("loss/train", loss / tokens.clamp(min=1), prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        loss, count = self.response_loss(batch)
        # Weighted by response tokens, loss/val is the exact mean over all of them.
        self.val_loss.update(loss / count, weight=count)


class LitClassifier(LitGPT):
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
        super().__init__(model, optimizer, scheduler)
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {list(labels)}")
        self.labels = list(labels)
        self.baseline_class = baseline_class
        self.finetune_config = FinetuneConfig.from_dict(finetune or {})
        # The head gives way to a fresh one (untied from the embedding), initialised as GPT's.
        head = nn.Linear(self.config.n_embd, len(labels))
        nn.init.normal_(head.weight, std=self.config.init_std)
        nn.init.zeros_(head.bias)
        self.model.lm_head = head
        prepare_for_finetuning(self.model, self.finetune_config, new_modules=["lm_head"])
        self.train_acc = MulticlassAccuracy(len(labels), average="micro")
        self.val_acc = MulticlassAccuracy(len(labels), average="micro")
        self.majority_acc = MulticlassAccuracy(len(labels), average="micro")

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


FINETUNE_TASKS: dict[str, tuple[type[LitGPT], type[ExampleDataModule]]] = {
    "sft": (LitSFT, SFTDataModule),
    "classify": (LitClassifier, ClassificationDataModule),
}


class ResponseSampleCallback(SampleGenerationCallback):
    """The model's responses to the first `num_examples` held-out prompts of an SFTDataModule,
    logged to TensorBoard as samples/<i> every `every_n_steps` and at the end of training; the
    reference responses are logged once, at the start, as samples/reference_<i>."""

    def __init__(
        self,
        num_examples: int = 3,
        every_n_steps: int = 100,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            [], every_n_steps, max_new_tokens, temperature, top_k, top_p, seed, stop_at=EOT_TOKEN
        )
        self.num_examples = num_examples
        self.references: list[str] = []
        self._prompt_ids: list[list[int]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        if not isinstance(datamodule, SFTDataModule):
            raise TypeError(
                f"ResponseSampleCallback needs an SFTDataModule, got {type(datamodule).__name__}"
            )
        pairs = datamodule.sample_prompts(self.num_examples)
        self._prompt_ids = [ids for ids, _ in pairs]
        self.references = [reference for _, reference in pairs]
        self.log_references(trainer)

    def prompt_ids(self, tokenizer: Tokenizer) -> list[list[int]]:
        return self._prompt_ids  # tokenized by the data module, as in training

    @rank_zero_only
    def log_references(self, trainer: L.Trainer) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            for i, text in enumerate(self.references):
                experiment.add_text(f"samples/reference_{i}", f"```\n{text}\n```", 0)


def build_finetune_module(
    model: dict[str, Any],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    finetune: dict[str, Any],
    datamodule: ExampleDataModule,
    pretrained: Pretrained | None,
) -> LitGPT:
    """The LightningModule of `finetune["task"]`, with the weights of `pretrained` (None: from
    scratch, with a warning) and `datamodule` switched to the checkpoint's tokenizer. The data
    is read and tokenized here, so that bad data fails before the Trainer starts."""
    config = FinetuneConfig.from_dict(finetune)
    module_class, data_class = FINETUNE_TASKS[config.task]
    if not isinstance(datamodule, data_class):
        raise TypeError(
            f"finetune.task={config.task!r} needs a {data_class.__name__} as finetune_data.loader, "
            f"got {type(datamodule).__name__}"
        )
    if pretrained is None:
        log.warning(
            "init_from is null: finetuning a randomly initialised model. Pass "
            "init_from=<checkpoint> (or init_from=last) to start from pretrained weights."
        )
    elif pretrained.tokenizer_json is None:
        raise ValueError(f"{pretrained.path} carries no tokenizer to finetune with")
    else:
        datamodule.use_tokenizer(pretrained.tokenizer_json)
    if model.get("vocab_size") is None:
        model["vocab_size"] = pretrained.config.vocab_size if pretrained else datamodule.vocab_size
    gpt_config = GPTConfig.from_dict(model)
    if pretrained is not None:
        check_architecture(gpt_config, pretrained)
    if datamodule.vocab_size > gpt_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {datamodule.vocab_size} tokens, more than the model's "
            f"vocab_size={gpt_config.vocab_size}"
        )
    datamodule.setup()
    classify = config.task == "classify"
    extra = (
        {"labels": datamodule.labels, "baseline_class": datamodule.majority_class}
        if classify
        else {}
    )
    lit = module_class(model, optimizer, scheduler, finetune, **extra)
    if pretrained is not None:
        # A classifier's head is new: the checkpoint's LM head does not apply.
        load_pretrained_weights(lit.model, pretrained, skip="lm_head." if classify else "")
    lit.tokenizer_json = datamodule.tokenizer_json
    print_parameter_counts(lit, config)
    return lit


@rank_zero_only
def print_parameter_counts(module: nn.Module, config: FinetuneConfig) -> None:
    trainable, frozen = count_parameters(module)
    method = f"lora, rank {config.lora.rank}" if config.method == "lora" else config.method
    print(
        f"finetuning ({config.task}, {method}, {config.freeze_blocks} frozen blocks): "
        f"{trainable:,} parameters trained ({trainable / (trainable + frozen):.2%}), "
        f"{frozen:,} frozen"
    )
