"""Reading Hydra multirun sweeps back, and the statistics studies report: differences over
seeds (Welch's t-test) and the muP coordinate check.

`gptlab-train -m ...` (or an experiment with `hydra.mode: MULTIRUN`) writes one folder per job:

    logs/<task>/multiruns/<date_time>/<job number>/
        .hydra/overrides.yaml     this job's overrides, e.g. [model/position=rope, seed=1]
        tensorboard/              the logged scalars (loss/val, perf/tokens_per_sec, ...)
        checkpoints/last.ckpt     the model at the end, its config in the hyperparameters
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.model import GPT, GPTConfig
from gptlab.training.checkpoint import load_checkpoint
from gptlab.training.optim import OptimizerConfig, build_adamw
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
    dirs = job_dirs(sweep_dir)
    if not dirs:
        raise FileNotFoundError(f"{sweep_dir} holds no sweep jobs (numbered folders with .hydra/)")
    return [load_job(p) for p in dirs]


def job_dirs(sweep_dir: str | Path) -> list[Path]:
    """The job folders of a sweep (numbered, with a .hydra folder), in job-number order."""
    jobs = (p for p in Path(sweep_dir).iterdir() if p.name.isdigit() and (p / ".hydra").is_dir())
    return sorted(jobs, key=lambda p: int(p.name))


def job_overrides(job_dir: Path) -> dict[str, str]:
    """A job's command-line overrides as key -> value, in the order given."""
    entries = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    return dict(str(entry).split("=", 1) for entry in entries)


def load_job(job_dir: Path) -> SweepJob:
    return SweepJob(job_dir, job_overrides(job_dir), read_scalars(job_dir / "tensorboard"))


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


@dataclass(frozen=True)
class SeedComparison:
    """Two settings' final metric over seeds, and Welch's t-test of their difference."""

    mean_a: float
    sd_a: float
    n_a: int
    mean_b: float
    sd_b: float
    n_b: int
    t: float  # (mean_a - mean_b) / its standard error
    df: float  # Welch-Satterthwaite degrees of freedom
    p_less: float  # one-sided p-value of "a is lower than b" (lower loss is better)

    def describe(self, alpha: float = 0.05) -> str:
        verdict = "lower" if self.p_less < alpha else "within seed noise of"
        return (
            f"{self.mean_a:.4f} ± {self.sd_a:.4f} (n={self.n_a}) is {verdict} "
            f"{self.mean_b:.4f} ± {self.sd_b:.4f} (n={self.n_b}): Welch t={self.t:.2f}, "
            f"df={self.df:.1f}, one-sided p={self.p_less:.3g}"
        )


def compare_seeds(a: list[float], b: list[float]) -> SeedComparison:
    """Welch's unequal-variance t-test of mean(a) < mean(b), for final metrics over seeds.
    Needs at least two values on each side."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"a comparison over seeds needs >= 2 runs a side, got {len(a)} and {len(b)}"
        )
    (mean_a, sd_a), (mean_b, sd_b) = mean_std(a), mean_std(b)
    va, vb = sd_a**2 / len(a), sd_b**2 / len(b)
    if va + vb == 0:
        t = math.copysign(math.inf, mean_a - mean_b) if mean_a != mean_b else 0.0
        df = float(len(a) + len(b) - 2)
    else:
        t = (mean_a - mean_b) / math.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return SeedComparison(mean_a, sd_a, len(a), mean_b, sd_b, len(b), t, df, student_t_cdf(t, df))


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom, through the regularized
    incomplete beta function: P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t^2)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), by its continued fraction (Numerical Recipes, 2nd ed., section 6.4, evaluated
    with the modified Lentz method); the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) keeps it
    converging fast."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_beta(1 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(log_front + a * math.log(x) + b * math.log1p(-x))
    return front * beta_continued_fraction(x, a, b) / a


def beta_continued_fraction(x: float, a: float, b: float) -> float:
    def nonzero(v: float) -> float:
        return v if abs(v) > 1e-300 else 1e-300

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    h = d
    for m in range(1, 400):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 / nonzero(1.0 + numerator * d)
            c = nonzero(1.0 + numerator / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def coordinate_check(
    config: GPTConfig,
    widths: Sequence[int],
    steps: int = 3,
    lr: float = 1e-2,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """How far each layer's activations move in `steps` AdamW steps, at each width: the
    coordinate check of Yang et al. (Tensor Programs V, figure 5). Each model is `config` at
    n_embd=width (same heads, so head size grows), trained on one fixed random batch; the
    result maps width -> {layer: mean |x_steps - x_0|} for the token embedding, every block's
    output and the logits. Under muP (with `config.mup_base_width` set) these stay flat as the
    width grows; under SP they grow with it."""
    results = {}
    for width in widths:
        torch.manual_seed(seed)
        model = GPT(replace(config, n_embd=width))
        idx = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1))
        inputs, targets = idx[:, :-1], idx[:, 1:]
        optimizer = build_adamw(model, OptimizerConfig(lr=lr, weight_decay=0.0))
        before = layer_outputs(model, inputs)
        for _ in range(steps):
            logits = model(inputs)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        after = layer_outputs(model, inputs)
        results[width] = {k: (after[k] - before[k]).abs().mean().item() for k in before}
    return results


@torch.no_grad()
def layer_outputs(model: GPT, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """The token embedding, each block's output and the logits of `model` on `idx`."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.wte.register_forward_hook(lambda m, i, o: outputs.__setitem__("embedding", o))]
    for n, block in enumerate(model.blocks):
        hooks.append(
            block.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(f"block_{n}", o))
        )
    outputs["logits"] = model(idx)
    for hook in hooks:
        hook.remove()
    return outputs
