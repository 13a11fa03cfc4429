"""gptlab-train: train a GPT on prepared shards, as the composed Hydra config says."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from gptlab.cli import CONFIG_DIR
from gptlab.cli.errors import report_user_errors
from gptlab.cli.overrides import check_overrides
from gptlab.cli.sweep import RESULTS_FILE
from gptlab.config_schema import TrainSchema, register_schemas
from gptlab.data.datamodule import GPTDataModule
from gptlab.data.fileio import atomic_write_text, ensure_writable_dir
from gptlab.model import GPTConfig
from gptlab.scaling.plan import ScalingRun
from gptlab.training.callbacks import SampleGenerationCallback, ThroughputCallback
from gptlab.training.checkpoint import (
    check_architecture,
    check_same_tokenizer,
    load_pretrained_weights,
    read_pretrained,
    resolve_checkpoint,
    write_run_record,
)
from gptlab.training.console import quiet_known_notices
from gptlab.training.finetune import build_finetune_module
from gptlab.training.lit_gpt import LitGPT
from gptlab.training.memory import (
    MemoryEstimate,
    available_memory,
    check_fits,
    estimate_run_memory,
    gib,
)
from gptlab.training.scale import check_launch, keep_log_file_on_rank_zero, set_global_batch

register_schemas()  # configs/train.yaml names train_schema first


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
        if cfg.compile or cfg.activation_checkpointing or cfg.global_batch_tokens is not None:
            raise ValueError(
                "compile, activation_checkpointing and global_batch_tokens apply to pretraining "
                "only; for a finetuning experiment leave them at false, false and null "
                "(trainer.accumulate_grad_batches accumulates gradients)"
            )
        return build_finetune_module(
            model, optimizer, scheduler, plain(cfg.finetune), datamodule, pretrained
        )
    if model.get("vocab_size") is None:
        model["vocab_size"] = datamodule.vocab_size
    config = GPTConfig.from_dict(dict(model))  # validate before anything heavy happens
    datamodule.check_vocab(model["vocab_size"])
    lit = LitGPT(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        compile=cfg.compile,
        activation_checkpointing=cfg.activation_checkpointing,
    )
    limit = lit.model.position.max_len
    if limit is not None and datamodule.block_size > limit:
        raise ValueError(
            f"data.loader.block_size={datamodule.block_size} exceeds model.block_size={limit}, "
            f"the length of the {lit.config.position!r} position table; make them equal"
        )
    lit.tokenizer_json = datamodule.tokenizer_path.read_text(encoding="utf-8")
    if pretrained is not None:
        check_architecture(config, pretrained)
        check_same_tokenizer(lit.tokenizer_json, pretrained)
        load_pretrained_weights(lit.model, pretrained)
    return lit


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The pretraining stream (GPTDataModule), or a finetuning run's examples."""
    if cfg.get("finetune") is not None:
        return instantiate(cfg.finetune_data.loader)
    return instantiate(cfg.data.loader, allow_data_change=cfg.resume.allow_data_change)


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group; an entry set to null is switched off."""
    if group is None:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


def run_name(cfg: DictConfig) -> str:
    """The experiment a run belongs to: `run_name`, else the chosen `experiment=` config."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("experiment") or "default"
    return "default"


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train as `cfg` says and return the final metrics. Every config error surfaces before the
    first step: the model, optimizer, schedule, data and Trainer are all built first.
    `extra_callbacks` join the configured ones (benchmarks use it to time steps)."""
    started = time.perf_counter()
    quiet_known_notices()
    L.seed_everything(cfg.seed, workers=True)
    ensure_writable_dir(cfg.paths.output_dir)
    datamodule = build_datamodule(cfg)
    scaling_run = ScalingRun.start(cfg, datamodule)  # only for configs with a `scaling` section
    if scaling_run is not None and scaling_run.earlier_result is not None:
        return scaling_run.earlier_result  # finished before, or too big for its FLOP budget
    model = build_model(cfg, datamodule)
    callbacks = [*instantiate_group(cfg.get("callbacks")), *extra_callbacks]
    if scaling_run is not None:
        callbacks.append(scaling_run)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    set_global_batch(trainer, cfg.global_batch_tokens, datamodule)
    check_launch(trainer)
    estimate = check_memory(cfg, trainer, model, datamodule)
    if cfg.estimate_only:
        return {"memory_estimate": asdict(estimate)}
    name = run_name(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        ckpt_path = str(resolve_checkpoint(ckpt_path, cfg.paths.log_dir, cfg.task_name, name))
    record_run(trainer, cfg.paths.output_dir, name, ckpt_path)
    # weights_only: a checkpoint holds tensors and plain data, never pickled code.
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    results = collect_results(trainer, datamodule, callbacks)
    results["wall_time_s"] = time.perf_counter() - started
    save_results(cfg.paths.output_dir, results)
    print_results(results)
    return results


def check_memory(
    cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, datamodule: Any
) -> MemoryEstimate:
    """Print the memory the run needs next to what the device has; refuse it, before anything
    is allocated, when it would not fit (unless `memory_check=false`)."""
    seq_len = getattr(datamodule, "block_size", None) or model.config.block_size
    estimate = estimate_run_memory(
        trainer, model, datamodule.batch_size, seq_len, cfg.activation_checkpointing
    )
    available, source = available_memory(trainer.strategy.root_device)
    rank_zero_info(f"memory estimate ({source}: {gib(available)}):\n{estimate.table()}")
    if cfg.memory_check and not cfg.estimate_only:
        check_fits(estimate, available, source)
    return estimate


@rank_zero_only
def record_run(trainer: L.Trainer, output_dir: str, name: str, ckpt_path: str | None) -> None:
    checkpoint_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
    write_run_record(output_dir, name, checkpoint_dir, ckpt_path)


def collect_results(
    trainer: L.Trainer, datamodule: GPTDataModule, callbacks: list[Any]
) -> dict[str, Any]:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    manifest = getattr(datamodule, "manifest", {})  # finetuning data has no manifest
    results: dict[str, Any] = {
        "step": trainer.global_step,
        "val_step": trainer.lightning_module.validated_at_step,  # None: no validation ran
        "val_loss": metrics.get("loss/val", math.nan),
        "val_ppl": metrics.get("loss/val_ppl", math.nan),
        "val_acc": metrics.get("accuracy/val", math.nan),
        "val_majority_acc": metrics.get("accuracy/val_majority", math.nan),
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


def validation_line(results: dict[str, Any]) -> str:
    if results["val_step"] is None:
        return "no validation ran: validation is switched off, or no step was left to train"
    line = "val loss"
    if results["val_step"] != results["step"]:  # the run ended between two validations
        line += f" at step {results['val_step']} (the last validation)"
    line += f" {results['val_loss']:.4f}"
    if math.isnan(results["val_acc"]):
        line += f" nats/token (perplexity {results['val_ppl']:.1f})"
    else:
        line += (
            f", accuracy {results['val_acc']:.2%} "
            f"(always the majority class: {results['val_majority_acc']:.2%})"
        )
    if not math.isnan(results["unigram_entropy"]):
        line += f"; unigram entropy of the data {results['unigram_entropy']:.4f} nats/token"
    return line


@rank_zero_only
def save_results(output_dir: str, results: dict[str, Any]) -> None:
    """The final metrics as results.json in the run folder (a sweep's summary reads them)."""
    text = json.dumps(results, indent=2, default=str, allow_nan=True)
    atomic_write_text(Path(output_dir) / RESULTS_FILE, text + "\n")


@rank_zero_only
def print_results(results: dict[str, Any]) -> None:
    print(f"\nstep {results['step']}")
    print(validation_line(results))
    if "tokens_per_sec" in results:
        print(
            f"training throughput {results['tokens_per_sec']:,.0f} tokens/s, "
            f"MFU {results['mfu']:.1%}"
        )
    if results["best_checkpoint"]:
        print(f"best checkpoint: {results['best_checkpoint']}")
    for sample in results["samples"]:
        print(f"--- sample ---\n{sample}")


@check_overrides("gptlab-train", TrainSchema)
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    keep_log_file_on_rank_zero()
    # In a sweep a job's error is written to its folder and the other jobs still run; the
    # sweep's summary lists it and the sweep exits with status 1 (see gptlab.cli.sweep).
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    with report_user_errors("gptlab-train", cfg.paths.output_dir if in_sweep else None):
        train(cfg)


if __name__ == "__main__":
    main()
