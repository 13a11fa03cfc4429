"""Finetuning a pretrained GPT: each task's data and LightningModule together.

- `base`: what the tasks share: `ExampleDataModule` (examples held in memory, split, tokenized
  with the checkpoint's tokenizer), `FinetuneConfig` (full or LoRA, frozen blocks) and
  `LitFinetune`, the LitGPT that sets what trains.
- `sft`: instruction following: prompt/response data (Alpaca or chat records, templates,
  packing) and `LitSFT`, whose loss is on the responses only.
- `classify`: text classification: (text, label) data and `LitClassifier`, a class head read
  at each example's last token.

`gptlab-train` finetunes when the config has a `finetune` section (experiment=sft,
experiment=classify), building the module through `gptlab.training.build`, the same path as
pretraining, from the `init_from` checkpoint's weights and tokenizer.
"""

from __future__ import annotations

from gptlab.finetune.base import ExampleDataModule, LitFinetune
from gptlab.finetune.classify import ClassificationDataModule, LitClassifier
from gptlab.finetune.sft import LitSFT, SFTDataModule

# finetune.task -> its LightningModule and the data module (finetune_data.loader) it reads.
FINETUNE_TASKS: dict[str, tuple[type[LitFinetune], type[ExampleDataModule]]] = {
    "sft": (LitSFT, SFTDataModule),
    "classify": (LitClassifier, ClassificationDataModule),
}


def finetune_task(name: str) -> tuple[type[LitFinetune], type[ExampleDataModule]]:
    """The module and data module classes of `finetune.task=name`."""
    if name not in FINETUNE_TASKS:
        raise ValueError(f"finetune.task={name!r}; choose one of {', '.join(FINETUNE_TASKS)}")
    return FINETUNE_TASKS[name]
