"""gptlab-train: config -> scaling plan -> data -> module -> Trainer -> fit -> results.

`train(cfg)` reads top-down: a scaling-law sweep point first gets its plan (a pure function of
the config and the data's manifest, gptlab.scaling.plan); then the data module and the
LightningModule are built on one path for pretraining and finetuning (gptlab.training.build);
then the Trainer, the memory check and the checkpoint to resume; then the fit, and the final
metrics in results.json.
"""

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
from gptlab.config_schema import TrainSchema, register_schemas
from gptlab.data.datamodule import GPTDataModule
from gptlab.data.manifest import load_manifest
from gptlab.fileio import atomic_write_text, ensure_writable_dir
from gptlab.scaling.plan import ScalingRun, format_flops, plan_scaling_run
from gptlab.training.build import build_datamodule, build_module
from gptlab.training.callbacks.progress import TrainingProgressBar
from gptlab.training.callbacks.samples import SampleGenerationCallback
from gptlab.training.callbacks.scaling import ScalingRunCallback
from gptlab.training.callbacks.throughput import ThroughputCallback
from gptlab.training.checkpoint import RESULTS_FILE, resolve_checkpoint, write_run_record
from gptlab.training.console import quiet_known_notices
from gptlab.training.memory import (
    MemoryEstimate,
    available_memory,
    check_fits,
    estimate_run_memory,
    gib,
)
from gptlab.training.parallel import check_tensor_parallel
from gptlab.training.speed import check_launch, keep_log_file_on_rank_zero, set_global_batch


def train(cfg: DictConfig, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train as `cfg` says and return the final metrics. Every config error surfaces before the
    first step: the model, optimizer, schedule, data and Trainer are all built first.
    `extra_callbacks` join the configured ones (benchmarks use it to time steps)."""
    started = time.perf_counter()
    quiet_known_notices()
    L.seed_everything(cfg.seed, workers=True)
    ensure_writable_dir(cfg.paths.output_dir)
    cfg, scaling_run = plan_scaling(cfg)
    if scaling_run is not None and (earlier := scaling_run.earlier_result()) is not None:
        return earlier  # finished before, or too big for its FLOP budget
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    callbacks = [*instantiate_group(cfg.get("callbacks")), *extra_callbacks]
    if scaling_run is not None:
        callbacks.append(ScalingRunCallback(scaling_run))
    trainer = build_trainer(cfg, callbacks, datamodule)
    check_tensor_parallel(module.config, getattr(trainer.strategy, "tensor_parallel_size", 1))
    estimate = check_memory(cfg, trainer, module, datamodule)
    if cfg.estimate_only:
        return {"memory_estimate": asdict(estimate)}
    ckpt_path = checkpoint_to_resume(cfg, trainer)
    # weights_only: a checkpoint holds tensors and plain data, never pickled code.
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    results = collect_results(trainer, datamodule, callbacks)
    results["wall_time_s"] = time.perf_counter() - started
    save_results(cfg.paths.output_dir, results)
    print_results(results)
    return results


def plan_scaling(cfg: DictConfig) -> tuple[DictConfig, ScalingRun | None]:
    """A scaling-law sweep point (a config with a `scaling` section) gets its model shape, step
    count and warmup from its FLOP budget, before anything is built."""
    if cfg.get("scaling") is None:
        return cfg, None
    return plan_scaling_run(cfg, load_manifest(cfg.data.loader.data_dir))


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group; an entry set to null is switched off."""
    if group is None:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


def build_trainer(
    cfg: DictConfig, callbacks: list[L.Callback], datamodule: L.LightningDataModule
) -> L.Trainer:
    """The configured Trainer with its loggers and progress bar, the global batch set and the
    launch checked."""
    loggers = instantiate_group(cfg.get("logger"))
    if cfg.trainer.get("enable_progress_bar", True):
        refresh = max(1, cfg.trainer.get("log_every_n_steps", 1))
        callbacks = [*callbacks, TrainingProgressBar(refresh_rate=refresh)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    set_global_batch(trainer, cfg.global_batch_tokens, datamodule)
    check_launch(trainer)
    return trainer


def run_name(cfg: DictConfig) -> str:
    """The experiment a run belongs to: `run_name`, else the chosen `experiment=` config."""
    if cfg.get("run_name"):
        return str(cfg.run_name)
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("experiment") or "default"
    return "default"


def checkpoint_to_resume(cfg: DictConfig, trainer: L.Trainer) -> str | None:
    """The file `ckpt_path` names ("last": the newest last.ckpt of runs of this name); the run's
    record (run.json) notes it, and where this run's checkpoints go."""
    name = run_name(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        ckpt_path = str(resolve_checkpoint(ckpt_path, cfg.paths.log_dir, cfg.task_name, name))
    record_run(trainer, cfg.paths.output_dir, name, ckpt_path)
    return ckpt_path


def check_memory(
    cfg: DictConfig, trainer: L.Trainer, model: L.LightningModule, datamodule: Any
) -> MemoryEstimate:
    """Print the model's size and the memory the run needs next to what the device has; refuse
    it, before anything is allocated, when it would not fit (unless `memory_check=false`)."""
    seq_len = getattr(datamodule, "block_size", None) or model.config.block_size
    estimate = estimate_run_memory(
        trainer, model, datamodule.batch_size, seq_len, cfg.activation_checkpointing
    )
    gpt = model.model
    rank_zero_info(
        f"model: {gpt.num_params():,} parameters ({gpt.num_params(non_embedding=True):,} "
        f"non-embedding); {gpt.flops_per_token(seq_len):.3g} training FLOPs per token"
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


def register_resolvers() -> None:
    """The resolvers train configs use: `${flops:...}` names the run folders of
    experiment=scaling_law. Hydra resolves a run's folder before the task runs."""
    OmegaConf.register_new_resolver("flops", format_flops, replace=True)


@check_overrides("gptlab-train", TrainSchema)
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def command(cfg: DictConfig) -> None:
    keep_log_file_on_rank_zero()
    # In a sweep a job's error is written to its folder and the other jobs still run; the
    # sweep's summary lists it and the sweep exits with status 1 (see gptlab.cli.sweep).
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    with report_user_errors("gptlab-train", cfg.paths.output_dir if in_sweep else None):
        train(cfg)


def main() -> None:
    register_resolvers()
    register_schemas()  # configs/train.yaml names train_schema first
    command()


if __name__ == "__main__":
    main()
