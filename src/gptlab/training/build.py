"""From a composed config to the LightningModule: one path for pretraining and finetuning.

    init_from checkpoint ─▶ its weights, architecture and tokenizer
    data module ─▶ tokenizer: the data's (pretraining) or the checkpoint's, adopted (finetuning)
    model section ─▶ vocabulary filled in (the checkpoint's, else the tokenizer's) ─▶ module:
        LitGPT, or the `finetune.task`'s LitSFT / LitClassifier; its GPTConfig is built once
    checks: the model fits the data (vocabulary, position table) and the checkpoint
        (architecture, tokenizer)
    the checkpoint's weights ─▶ the module (all but the task's new modules, such as a head)

Every config error surfaces here, before a Trainer exists.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gptlab.finetune import finetune_task
from gptlab.finetune.base import FinetuneConfig, print_parameter_counts
from gptlab.training.checkpoint import (
    Pretrained,
    check_architecture,
    check_same_tokenizer,
    load_pretrained_weights,
    read_pretrained,
    resolve_checkpoint,
)
from gptlab.training.lit_gpt import LitGPT

log = logging.getLogger(__name__)


def plain(node: DictConfig | None) -> dict[str, Any]:
    """A config node as a plain dict: what goes into checkpoints must reload without OmegaConf."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The pretraining stream (GPTDataModule), or a finetuning run's examples."""
    if cfg.get("finetune") is not None:
        return instantiate(cfg.finetune_data.loader)
    return instantiate(cfg.data.loader, allow_data_change=cfg.resume.allow_data_change)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> LitGPT:
    """LitGPT, or with a `finetune` section LitSFT / LitClassifier; with `init_from`, its weights
    come from that checkpoint (optimizer and step count start fresh)."""
    pretrained = read_init_from(cfg)
    finetuning = cfg.get("finetune") is not None
    if finetuning:
        check_pretraining_only_options(cfg)
        adopt_tokenizer(datamodule, pretrained)
        datamodule.setup()  # read and tokenize the examples: bad data fails here
    model = plain(cfg.model)
    if model.get("vocab_size") is None:
        model["vocab_size"] = pretrained.config.vocab_size if pretrained else datamodule.vocab_size
    if finetuning:
        module = build_finetune_module(cfg, model, datamodule)
    else:
        module = LitGPT(
            model,
            plain(cfg.optimizer),
            plain(cfg.scheduler),
            compile=cfg.compile,
            activation_checkpointing=cfg.activation_checkpointing,
        )
    module.tokenizer_json = datamodule.tokenizer_json
    check_fits_data(module, datamodule)
    if pretrained is not None:
        check_architecture(
            module.config,
            pretrained.config,
            str(pretrained.path),
            "start from it with the same architecture",
        )
        check_same_tokenizer(module.tokenizer_json, pretrained)
        new_modules = module.task_modules if finetuning else []
        load_pretrained_weights(module.model, pretrained, skip=new_modules)
    if finetuning:
        print_parameter_counts(module, module.finetune_config)
    return module


def read_init_from(cfg: DictConfig) -> Pretrained | None:
    init_from = cfg.get("init_from")
    if init_from is None:
        return None
    return read_pretrained(resolve_checkpoint(init_from, cfg.paths.log_dir))


def check_pretraining_only_options(cfg: DictConfig) -> None:
    if cfg.compile or cfg.activation_checkpointing or cfg.global_batch_tokens is not None:
        raise ValueError(
            "compile, activation_checkpointing and global_batch_tokens apply to pretraining "
            "only; for a finetuning experiment leave them at false, false and null "
            "(trainer.accumulate_grad_batches accumulates gradients)"
        )


def adopt_tokenizer(datamodule: L.LightningDataModule, pretrained: Pretrained | None) -> None:
    """Finetuning data is tokenized as the checkpoint's model learned: with its tokenizer."""
    if pretrained is None:
        log.warning(
            "init_from is null: finetuning a randomly initialised model. Pass "
            "init_from=<checkpoint> (or init_from=last) to start from pretrained weights."
        )
    elif pretrained.tokenizer_json is None:
        raise ValueError(f"{pretrained.path} carries no tokenizer to finetune with")
    else:
        datamodule.use_tokenizer(pretrained.tokenizer_json)


def build_finetune_module(
    cfg: DictConfig, model: dict[str, Any], datamodule: L.LightningDataModule
) -> LitGPT:
    """The LightningModule of `finetune.task`, after checking that data.loader is its kind."""
    finetune = plain(cfg.finetune)
    config = FinetuneConfig.from_dict(finetune)
    module_class, data_class = finetune_task(config.task)
    if not isinstance(datamodule, data_class):
        raise TypeError(
            f"finetune.task={config.task!r} needs a {data_class.__name__} as finetune_data.loader, "
            f"got {type(datamodule).__name__}"
        )
    task_args = datamodule.module_arguments()  # e.g. a classifier's labels
    return module_class(model, plain(cfg.optimizer), plain(cfg.scheduler), finetune, **task_args)


def check_fits_data(module: LitGPT, datamodule: L.LightningDataModule) -> None:
    """Every token id of the data must be a valid model input, and every window must fit the
    model's position table."""
    datamodule.check_vocab(module.config.vocab_size)
    block_size = getattr(datamodule, "block_size", None)  # finetuning examples have max_length
    limit = module.model.position.max_len
    if block_size is not None and limit is not None and block_size > limit:
        raise ValueError(
            f"data.loader.block_size={block_size} exceeds model.block_size={limit}, "
            f"the length of the {module.config.position!r} position table; make them equal"
        )
