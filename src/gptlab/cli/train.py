"""gptlab-train: train a GPT on prepared shards, as the composed Hydra config says."""

from __future__ import annotations

import math
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.data.datamodule import GPTDataModule
from gptlab.model import GPTConfig
from gptlab.training.callbacks import SampleGenerationCallback, ThroughputCallback
from gptlab.training.checkpoint import (
    check_architecture,
    check_same_tokenizer,
    load_pretrained_weights,
    read_pretrained,
    resolve_checkpoint,
)
from gptlab.training.finetune import build_finetune_module
from gptlab.training.lit_gpt import LitGPT


def plain(node: DictConfig | None) -> dict[str, Any]:
    """A config node as a plain dict: what goes into checkpoints must reload without OmegaConf."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build_model(cfg: DictConfig, datamodule: GPTDataModule) -> LitGPT:
    """LitGPT, or with a `finetune` section LitSFT / LitClassifier; with `init_from`, its weights
    come from that checkpoint (optimizer and step count start fresh)."""
    init_from = cfg.get("init_from")
    pretrained = None
    if init_from is not None:
        pretrained = read_pretrained(resolve_checkpoint(init_from, cfg.paths.log_dir))
    model, optimizer, scheduler = plain(cfg.model), plain(cfg.optimizer), plain(cfg.scheduler)
    if cfg.get("finetune") is not None:
        return build_finetune_module(
            model, optimizer, scheduler, plain(cfg.finetune), datamodule, pretrained
        )
    if model.get("vocab_size") is None:
        model["vocab_size"] = datamodule.vocab_size
    config = GPTConfig.from_dict(dict(model))  # validate before anything heavy happens
    datamodule.check_vocab(model["vocab_size"])
    lit = LitGPT(model=model, optimizer=optimizer, scheduler=scheduler)
    lit.tokenizer_json = datamodule.tokenizer_path.read_text(encoding="utf-8")
    if pretrained is not None:
        check_architecture(config, pretrained)
        check_same_tokenizer(lit.tokenizer_json, pretrained)
        load_pretrained_weights(lit.model, pretrained)
    return lit


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group; an entry set to null is switched off."""
    if group is None:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train as `cfg` says and return the final metrics. Every config error surfaces before the
    first step: the model, optimizer, schedule, data and Trainer are all built first."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule: GPTDataModule = instantiate(cfg.data.loader)
    model = build_model(cfg, datamodule)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        ckpt_path = str(resolve_checkpoint(ckpt_path, cfg.paths.log_dir, cfg.task_name))
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    results = collect_results(trainer, datamodule, callbacks)
    print_results(results)
    return results


def collect_results(
    trainer: L.Trainer, datamodule: GPTDataModule, callbacks: list[Any]
) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    manifest = getattr(datamodule, "manifest", {})  # finetuning data has no manifest
    results: dict[str, Any] = {
        "step": trainer.global_step,
        "val_loss": metrics.get("val/loss", math.nan),
        "val_ppl": metrics.get("val/ppl", math.nan),
        "val_acc": metrics.get("val/acc", math.nan),
        "val_majority_acc": metrics.get("val/majority_acc", math.nan),
        "unigram_entropy": manifest.get("unigram_entropy", math.nan),
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
        "samples": [],
    }
    for callback in callbacks:
        if isinstance(callback, ThroughputCallback):
            results.update(callback.summary)
        if isinstance(callback, SampleGenerationCallback):
            results["samples"] = callback.last_samples
    return results


@rank_zero_only
def print_results(results: dict[str, Any]) -> None:
    print(f"\nstep {results['step']}")
    line = f"val loss {results['val_loss']:.4f}"
    if math.isnan(results["val_acc"]):
        line += f" nats/token (perplexity {results['val_ppl']:.1f})"
    else:
        line += (
            f", accuracy {results['val_acc']:.2%} "
            f"(always the majority class: {results['val_majority_acc']:.2%})"
        )
    if not math.isnan(results["unigram_entropy"]):
        line += f"; unigram entropy of the data {results['unigram_entropy']:.4f} nats/token"
    print(line)
    if "tokens_per_sec" in results:
        print(
            f"training throughput {results['tokens_per_sec']:,.0f} tokens/s, "
            f"MFU {results['mfu']:.1%}"
        )
    if results["best_checkpoint"]:
        print(f"best checkpoint: {results['best_checkpoint']}")
    for sample in results["samples"]:
        print(f"--- sample ---\n{sample}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
