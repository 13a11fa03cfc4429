"""One run of a scaling-law sweep: from a FLOP budget and a model width to a training run.

FLOP accounting is the model's own (`GPT.flops_per_token`): a training token costs

    6 N  +  12 n_layer T n_embd        (PaLM's and nanoGPT's convention)

where N counts the weight matrices of the blocks and the LM head (the tied embedding), whose
matmul is real compute, and T is the context length. A run with budget C trains for
D = C / flops_per_token tokens, rounded down to whole optimizer steps, and records the C it
actually spent.

`plan_scaling_run` is what `gptlab-train` does first with a config that has a `scaling`
section (see configs/experiment/scaling_law.yaml): a pure function of the config and the data's
manifest, it returns the config with the model's depth and heads, the step count and the warmup
filled in, before anything is built. The `ScalingRun` it returns says whether the run finished
before (its result file exists) or is skipped (the budget cannot buy `min_steps` steps), and
writes `scaling_run.json`; `gptlab.training.callbacks.scaling.ScalingRunCallback` logs N, D and
C while the run trains and writes the record after its last step.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from gptlab.config import dataclass_from_dict
from gptlab.fileio import atomic_write_text
from gptlab.model import GPT, GPTConfig
from gptlab.training.speed import gradient_accumulation

RESULT_FILE = "scaling_run.json"


def format_flops(value: float) -> str:
    """3e+12 -> '3e12', 2.5e11 -> '2.5e11': short, exact names for run directories (the
    `flops` resolver of configs/experiment/scaling_law.yaml, registered by gptlab-train)."""
    mantissa, exponent = f"{float(value):.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass
class ScalingConfig:
    """The `scaling` section of a sweep config. The sweep varies `budget` and `model.n_embd`;
    depth and heads follow from the width by these rules unless the model config sets them."""

    budget: float  # training FLOPs C of this run
    aspect_ratio: float = 32.0  # n_embd / n_layer
    head_size: int = 16
    warmup_fraction: float = 0.05  # of the run's steps: the schedule scales with the run length
    # Warmup steps of every run (null: warmup_fraction of each run's steps). Fixed, it lets WSD
    # decays branched off one stable run share that run's warmup whatever their budgets.
    warmup_steps: int | None = None
    # Which (budget, width) points are worth running; neither changes a run's result.
    min_steps: int = 100  # fewer steps than this: the model is too big for the budget
    max_epochs: float = 4.0  # more passes over the data: repetition would bend the law
    sweep_name: str = "default"  # names the sweep's directory (a new name starts afresh)

    def __post_init__(self) -> None:
        checks = [
            ("budget", self.budget > 0, "> 0 (training FLOPs)"),
            ("aspect_ratio", self.aspect_ratio > 0, "> 0"),
            ("head_size", _is_count(self.head_size, 1), "an int >= 1"),
            ("warmup_fraction", 0 <= self.warmup_fraction < 1, "in [0, 1)"),
            ("warmup_steps", _is_count(self.warmup_steps, 0, none_ok=True), "null or an int >= 0"),
            ("min_steps", _is_count(self.min_steps, 1), "an int >= 1"),
            ("max_epochs", self.max_epochs > 0, "> 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"scaling.{name}={getattr(self, name)!r} must be {expected}")

    def warmup(self, steps: int) -> int:
        """The warmup of a run of `steps` steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_fraction * steps)


def _is_count(value: Any, least: int, none_ok: bool = False) -> bool:
    if value is None:
        return none_ok
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def model_shape(n_embd: int, scaling: ScalingConfig) -> tuple[int, int]:
    """(n_layer, n_head) of a model `n_embd` wide: fixed aspect ratio, fixed head size."""
    if n_embd % scaling.head_size:
        raise ValueError(
            f"model.n_embd={n_embd} must be a multiple of scaling.head_size={scaling.head_size}"
        )
    return max(1, round(n_embd / scaling.aspect_ratio)), n_embd // scaling.head_size


@dataclass(frozen=True)
class RunPlan:
    budget: float  # C asked for
    n_layer: int
    n_head: int
    n_embd: int
    params: int  # N: all parameters, the tied embedding counted once (Chinchilla's N)
    non_embedding_params: int  # Kaplan's N
    flops_per_token: float
    tokens_per_step: int
    steps: int
    warmup_steps: int
    tokens: int  # D
    flops: float  # C spent: tokens x flops_per_token (<= budget)
    epochs: float  # D / unique training tokens
    skip_reason: str | None = None


def plan_run(
    scaling: ScalingConfig,
    model: dict[str, Any],
    tokens_per_step: int,
    train_tokens: int,
    seq_len: int | None = None,
) -> RunPlan:
    """Steps, warmup and the N, D, C bookkeeping of `model` (a complete GPTConfig dict) trained
    on sequences of `seq_len` tokens (default: its block_size)."""
    config = GPTConfig.from_dict(model)
    with torch.device("meta"):  # counts without allocating or initialising any weights
        gpt = GPT(config)
    flops_per_token = gpt.flops_per_token(seq_len)
    steps = int(scaling.budget // (flops_per_token * tokens_per_step))
    tokens = steps * tokens_per_step
    skip_reason = None
    if steps < scaling.min_steps:
        skip_reason = (
            f"budget {scaling.budget:.3g} FLOPs buys {steps} steps of {tokens_per_step} tokens "
            f"for this model, fewer than scaling.min_steps={scaling.min_steps}"
        )
    elif tokens > scaling.max_epochs * train_tokens:
        skip_reason = (
            f"budget {scaling.budget:.3g} FLOPs buys {tokens:,} tokens for this model, "
            f"{tokens / train_tokens:.1f} epochs of the data, more than "
            f"scaling.max_epochs={scaling.max_epochs}"
        )
    return RunPlan(
        budget=float(scaling.budget),
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        params=gpt.num_params(),
        non_embedding_params=gpt.num_params(non_embedding=True),
        flops_per_token=flops_per_token,
        tokens_per_step=tokens_per_step,
        steps=steps,
        warmup_steps=scaling.warmup(steps),
        tokens=tokens,
        flops=tokens * flops_per_token,
        epochs=tokens / train_tokens,
        skip_reason=skip_reason,
    )


def tokens_per_step(cfg: DictConfig) -> int:
    """Training tokens in one optimizer step, over all devices and accumulated micro-batches
    (as `global_batch_tokens` or trainer.accumulate_grad_batches set them)."""
    devices, nodes = cfg.trainer.get("devices", 1), cfg.trainer.get("num_nodes", 1)
    if not isinstance(devices, int):
        raise ValueError(
            f"trainer.devices={devices!r}: a scaling run needs the device count as an int "
            "to count the tokens of a step"
        )
    batch, block, world = cfg.data.loader.batch_size, cfg.data.loader.block_size, devices * nodes
    accumulate = gradient_accumulation(
        cfg.get("global_batch_tokens"),
        cfg.trainer.get("accumulate_grad_batches", 1),
        batch,
        block,
        world,
    )
    return batch * block * accumulate * world


@dataclass(frozen=True)
class ScalingRun:
    """One sweep point: its plan, the settings that decide its result (a finished run is reused
    only if these match), and its record file."""

    plan: RunPlan
    settings: dict[str, Any]
    result_path: Path
    smoke_test: bool

    def earlier_result(self) -> dict[str, Any] | None:
        """The result to return instead of training: a run finished before, or a skip record."""
        if self.result_path.is_file():
            record = json.loads(self.result_path.read_text(encoding="utf-8"))
            if record.get("status") == "finished":
                self._check_same_settings(record.get("settings", {}))
                print(f"{self.result_path.parent}: finished before, skipping")
                return record
        if self.plan.skip_reason is not None and not self.smoke_test:
            print(f"{self.result_path.parent}: skipped: {self.plan.skip_reason}")
            return self.write_record("skipped")
        return None

    def _check_same_settings(self, earlier: dict[str, Any]) -> None:
        keys = sorted(
            k
            for k in earlier.keys() | self.settings.keys()
            if earlier.get(k) != self.settings.get(k)
        )
        if keys:
            raise ValueError(
                f"{self.result_path} holds a finished run with other settings (differing: "
                f"{', '.join(keys)}); set another scaling.sweep_name or remove that directory"
            )

    def write_record(self, status: str, **measured: Any) -> dict[str, Any]:
        record = {"status": status, **asdict(self.plan), **measured, "settings": self.settings}
        self.result_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.result_path, json.dumps(record, indent=2) + "\n")
        return record

    def metrics(self) -> dict[str, float]:
        """N, D and C of the run, as logged at its start."""
        p = self.plan
        return {
            "scaling/params": p.params,
            "scaling/non_embedding_params": p.non_embedding_params,
            "scaling/tokens": p.tokens,
            "scaling/flops": p.flops,
            "scaling/budget": p.budget,
            "scaling/epochs": p.epochs,
        }


def plan_scaling_run(cfg: DictConfig, manifest: dict[str, Any]) -> tuple[DictConfig, ScalingRun]:
    """A copy of `cfg` with its sweep point planned (model depth and heads, unless the model
    config sets them; max_steps and warmup, unless the run is skipped), and the ScalingRun.
    `manifest` is the prepared data's (its vocabulary, training tokens and tokenizer)."""
    scaling = dataclass_from_dict(
        ScalingConfig, OmegaConf.to_container(cfg.scaling, resolve=True), "scaling"
    )
    planned = copy.deepcopy(cfg)
    model = planned.model
    n_layer, n_head = model_shape(model.n_embd, scaling)
    model.n_layer = n_layer if model.n_layer is None else model.n_layer
    model.n_head = n_head if model.n_head is None else model.n_head
    model.vocab_size = manifest["vocab_size"] if model.vocab_size is None else model.vocab_size
    train_tokens = manifest["splits"]["train"]["tokens"]
    plan = plan_run(
        scaling,
        OmegaConf.to_container(model, resolve=True),
        tokens_per_step(planned),
        train_tokens,
        seq_len=planned.data.loader.block_size,  # the loader's, maybe shorter than the model's
    )
    # A smoke test (fast_dev_run) runs one step of any plan, even one the rules would skip.
    smoke_test = bool(cfg.trainer.get("fast_dev_run"))
    if plan.skip_reason is None or smoke_test:
        planned.trainer.max_steps = max(1, plan.steps)
        planned.scheduler.warmup_steps = plan.warmup_steps
    settings = {
        name: OmegaConf.to_container(planned[name], resolve=True)
        for name in ("model", "optimizer", "scheduler")
    }
    settings.update(
        budget=scaling.budget,
        seed=cfg.seed,
        tokens_per_step=plan.tokens_per_step,
        tokenizer_sha256=manifest["tokenizer"]["sha256"],
        train_tokens=train_tokens,
    )
    result_path = Path(cfg.paths.output_dir) / RESULT_FILE
    # As the settings read back from the file (tuples: lists).
    return planned, ScalingRun(plan, json.loads(json.dumps(settings)), result_path, smoke_test)


def load_run_records(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every `scaling_run.json` under `sweep_dir` (finished and skipped), sorted by C then N."""
    paths = sorted(Path(sweep_dir).rglob(RESULT_FILE))
    records = []
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        records.append({**record, "run_dir": str(path.parent)})
    return sorted(records, key=lambda r: (r["budget"], r["params"]))
