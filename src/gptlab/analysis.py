"""Reading Hydra multirun sweeps back, for the analysis scripts under experiments/.

`gptlab-train -m ...` (or an experiment with `hydra.mode: MULTIRUN`) writes one folder per job:

    logs/<task>/multiruns/<date_time>/<job number>/
        .hydra/overrides.yaml     this job's overrides, e.g. [model/position=rope, seed=1]
        tensorboard/              the logged scalars (loss/val, perf/tokens_per_sec, ...)
        checkpoints/last.ckpt     the model at the end, its config in the hyperparameters
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.model import GPT, GPTConfig
from gptlab.training.checkpoint import load_checkpoint
from gptlab.training.tensorboard import current_tag

Scalars = dict[str, list[tuple[int, float]]]  # tag -> [(step, value), ...]


@dataclass
class SweepJob:
    path: Path
    overrides: dict[str, str]
    scalars: Scalars

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.ckpt"

    @property
    def config(self) -> DictConfig:
        """The job's composed config (interpolations resolve, except hydra's own)."""
        return OmegaConf.load(self.path / ".hydra" / "config.yaml")

    def final(self, tag: str) -> float:
        """The last logged value of `tag`."""
        if not self.scalars.get(tag):
            raise KeyError(f"{self.path}: no scalar {tag!r} logged; have {sorted(self.scalars)}")
        return self.scalars[tag][-1][1]


def find_sweep(log_dir: str | Path, task_name: str) -> Path:
    """The newest sweep folder of `task_name` under `log_dir`."""
    root = Path(log_dir) / task_name / "multiruns"
    sweeps = sorted(p for p in root.glob("*") if p.is_dir())
    if not sweeps:
        raise FileNotFoundError(
            f"no sweep under {root}; run `gptlab-train experiment={task_name}` first"
        )
    return sweeps[-1]


def load_sweep(sweep_dir: str | Path) -> list[SweepJob]:
    """Every finished job of a sweep (one with a .hydra folder), in job-number order."""
    sweep_dir = Path(sweep_dir)
    job_dirs = sorted(
        (p for p in sweep_dir.iterdir() if p.name.isdigit() and (p / ".hydra").is_dir()),
        key=lambda p: int(p.name),
    )
    if not job_dirs:
        raise FileNotFoundError(f"{sweep_dir} holds no sweep jobs (numbered folders with .hydra/)")
    return [load_job(p) for p in job_dirs]


def load_job(job_dir: Path) -> SweepJob:
    entries = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    overrides = dict(str(entry).split("=", 1) for entry in entries)
    return SweepJob(job_dir, overrides, read_scalars(job_dir / "tensorboard"))


def read_scalars(tensorboard_dir: Path) -> Scalars:
    """Every scalar curve of a run; runs logged before the tags were renamed read under the
    current names (`loss/val` as `loss/val`, see gptlab.training.tensorboard)."""
    events = EventAccumulator(str(tensorboard_dir), size_guidance={"scalars": 0}).Reload()
    return {
        current_tag(tag): [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def checkpoint_config(checkpoint: Path) -> GPTConfig:
    """The model config stored in a gptlab-train checkpoint's hyperparameters."""
    return GPTConfig.from_dict(dict(load_checkpoint(checkpoint)["hyper_parameters"]["model"]))


def count_params(config: GPTConfig) -> int:
    """Parameters of the model `config` describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        return GPT(config).num_params()


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan
