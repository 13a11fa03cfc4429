"""Reading Hydra multirun sweeps back, and the statistics studies report: differences over
seeds (Welch's t-test and its confidence interval), the optimum of a loss over a grid of
settings, and the muP coordinate check.

`gptlab-train -m ...` (or an experiment with `hydra.mode: MULTIRUN`) writes one folder per job:

    logs/<task>/multiruns/<date_time>/<job number>/
        .hydra/overrides.yaml     this job's overrides, e.g. [model/position=rope, seed=1]
        tensorboard/              the logged scalars (loss/val, perf/tokens_per_sec, ...)
        checkpoints/last.ckpt     the model at the end, its config in the hyperparameters
        results.json              the final metrics, once the job finished (error.txt if it failed)

A study made of several sweeps and single runs keeps them under one folder: `load_runs` reads
every run below it.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.errors import ERROR_FILE
from gptlab.model import GPT, GPTConfig
from gptlab.training.checkpoint import RESULTS_FILE, load_checkpoint
from gptlab.training.optim import OptimizerConfig, build_adamw
from gptlab.training.tensorboard import current_tag

Scalars = dict[str, list[tuple[int, float]]]  # tag -> [(step, value), ...]


@dataclass
class SweepJob:
    """One run (a sweep job or a single run): its folder and command-line overrides; its logged
    scalars and final results are read when first asked for."""

    path: Path
    overrides: dict[str, str]

    @cached_property
    def scalars(self) -> Scalars:
        return read_scalars(self.path / "tensorboard")

    @cached_property
    def results(self) -> dict[str, Any] | None:
        """The final metrics train wrote when the run finished (results.json), else None."""
        path = self.path / RESULTS_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @cached_property
    def error(self) -> str | None:
        """The error line of a sweep job that failed (error.txt), else None."""
        path = self.path / ERROR_FILE
        return path.read_text(encoding="utf-8").strip() if path.is_file() else None

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
    return SweepJob(job_dir, job_overrides(job_dir))


def load_runs(root: str | Path) -> list[SweepJob]:
    """Every run under `root` at any depth, finished or not: single runs and sweep jobs alike
    (folders with a .hydra folder), sorted by path. None if `root` does not exist."""
    return [load_job(p.parent) for p in sorted(Path(root).rglob(".hydra")) if p.is_dir()]


def unfinished_lines(runs: Sequence[SweepJob]) -> list[str]:
    """Markdown lines for a study's report: the runs without results, and why (their error, if
    they left one); none if every run finished."""
    if not runs:
        return []
    lines = ["", f"Not counted: {len(runs)} runs that did not finish:", ""]
    return lines + [
        f"- `{run.path}`: {run.error or 'no results (running or killed)'}" for run in runs
    ]


def group_runs(runs: Sequence[SweepJob], keys: Sequence[str]) -> dict[tuple, list[SweepJob]]:
    """`runs` grouped by their values of the override `keys` (None where a run lacks one), in
    order of first appearance: with every key but the seed, each group holds one setting's
    seeds."""
    groups: dict[tuple, list[SweepJob]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(k) for k in keys), []).append(run)
    return groups


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


def mean_std_text(values: list[float], digits: int = 3) -> str:
    """'mean ± sd (n=N)', the form every study's tables report a setting's seeds in."""
    mean, sd = mean_std(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


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
    se: float  # the standard error of mean_a - mean_b

    @property
    def difference(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def p_two_sided(self) -> float:
        """The p-value of "a and b differ", in either direction."""
        return min(1.0, 2 * min(self.p_less, 1 - self.p_less))

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """Welch's confidence interval for mean_a - mean_b. A difference is shown to lie within
        +-margin (equivalence, at 5%) when its 90% interval does (two one-sided tests)."""
        half = student_t_quantile(0.5 + level / 2, self.df) * self.se
        return self.difference - half, self.difference + half

    def verdict(self, alpha: float = 0.05) -> str:
        """What the one-sided tests at `alpha` find: "a lower" (p_less < alpha), "a higher"
        (the test the other way round), else "within seed noise"."""
        if self.p_less < alpha:
            return "a lower"
        return "a higher" if 1 - self.p_less < alpha else "within seed noise"

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
    return welch(*mean_std(a), len(a), *mean_std(b), len(b))


def welch(
    mean_a: float, sd_a: float, n_a: int, mean_b: float, sd_b: float, n_b: int
) -> SeedComparison:
    """Welch's t-test from each side's mean, sample standard deviation and count: all it needs,
    so a published 'mean ± sd (n)' table can be tested without its runs."""
    if n_a < 2 or n_b < 2:
        raise ValueError(f"a comparison over seeds needs >= 2 runs a side, got {n_a} and {n_b}")
    va, vb = sd_a**2 / n_a, sd_b**2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        t = math.copysign(math.inf, mean_a - mean_b) if mean_a != mean_b else 0.0
        df = float(n_a + n_b - 2)
    else:
        t = (mean_a - mean_b) / se
        df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    p_less = student_t_cdf(t, df)
    return SeedComparison(mean_a, sd_a, n_a, mean_b, sd_b, n_b, t, df, p_less, se)


def comparison_table(
    comparisons: dict[str, SeedComparison], digits: int = 3, verdicts: bool = False
) -> str:
    """A markdown table of named comparisons: each side's mean ± sd (n), the difference a - b
    with its 95% and 90% Welch intervals, t, df and the two-sided p. With `verdicts`, each
    comparison is a claim that a is lower than b (name a claimed higher metric, such as an
    accuracy, as "b vs a"): also the claim's one-sided p and `SeedComparison.verdict`."""
    header = "| comparison (a vs b) | a | b | a − b | 95% interval | 90% interval | Welch t (df) "
    header += "| p (two-sided) |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if verdicts:
        header += " p (one-sided, a < b) | verdict (5%) |"
        rule += " ---: | --- |"
    lines = [header, rule]

    def interval(c: SeedComparison, level: float) -> str:
        low, high = c.interval(level)
        return f"[{low:+.{digits}f}, {high:+.{digits}f}]"

    for name, c in comparisons.items():
        a = f"{c.mean_a:.{digits}f} ± {c.sd_a:.{digits}f} (n={c.n_a})"
        b = f"{c.mean_b:.{digits}f} ± {c.sd_b:.{digits}f} (n={c.n_b})"
        row = (
            f"| {name} | {a} | {b} | {c.difference:+.{digits}f} | {interval(c, 0.95)} "
            f"| {interval(c, 0.9)} | {c.t:.2f} ({c.df:.1f}) | {c.p_two_sided:.3g} |"
        )
        if verdicts:
            row += f" {c.p_less:.3g} | {c.verdict()} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def claims_table(claims: dict[str, tuple[list[float], list[float]]], digits: int = 3) -> str:
    """The Welch table, with verdicts, of named claims that a is lower than b, each given as a's
    and b's values over seeds; a claim with fewer than 2 values a side is named below it as
    not tested."""
    tested = {
        name: compare_seeds(a, b) for name, (a, b) in claims.items() if min(len(a), len(b)) > 1
    }
    text = comparison_table(tested, digits, verdicts=True) if tested else ""
    untested = [name for name in claims if name not in tested]
    if untested:
        text += "\n" if text else ""
        text += f"Not tested (fewer than 2 finished runs a side): {', '.join(untested)}.\n"
    return text


def claims_section(claims: dict[str, tuple[list[float], list[float]]], claim: str) -> list[str]:
    """A study report's section of Welch's tests of the claims its README makes, each that
    `claim` (e.g. "a has fewer bits per byte than b"), as markdown lines."""
    return [
        "## Welch's tests of the claims in README.md",
        "",
        f"Each claims that {claim}. Verdict: Welch's one-sided test at 5%, either way round;",
        "otherwise the difference is within seed noise.",
        "",
        claims_table(claims).rstrip(),
    ]


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom, through the regularized
    incomplete beta function: P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t^2)."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, by bisection on `student_t_cdf`."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    low, high = -1.0, 1.0
    while student_t_cdf(low, df) > p:
        low *= 2
    while student_t_cdf(high, df) < p:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if student_t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


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


@dataclass(frozen=True)
class GridOptimum:
    """Where a loss measured over seeds on a grid of one setting (e.g. log2 of the learning
    rate) is lowest."""

    best: float  # the grid point with the lowest mean over seeds
    fitted: float  # vertex of the parabola through `best` and its neighbours (at an edge: `best`)
    low: float  # percentile interval of `fitted` over resamples of each point's seeds
    high: float
    at_edge: bool  # the lowest mean is at an end of the grid: the optimum may lie beyond it


def grid_optimum(
    grid: Sequence[float],
    values: Sequence[Sequence[float]],
    level: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> GridOptimum:
    """The optimum of a loss on an increasing `grid`, from `values[i]`, the losses of the seeds
    run at `grid[i]`. The interval bootstraps the seeds: each resample draws every point's seeds
    with replacement and refits; with 3 seeds a point it is a rough guide, not an exact one."""
    if len(grid) != len(values) or not grid or list(grid) != sorted(set(grid)):
        raise ValueError(f"need increasing grid points with values each, got {list(grid)}")
    rng = random.Random(seed)
    fitted = lowest_vertex(grid, [statistics.fmean(v) for v in values])
    estimates = sorted(
        lowest_vertex(grid, [statistics.fmean(rng.choices(v, k=len(v))) for v in values])
        for _ in range(resamples)
    )
    tail = (1 - level) / 2
    best = min(range(len(grid)), key=lambda i: statistics.fmean(values[i]))
    return GridOptimum(
        best=grid[best],
        fitted=fitted,
        low=estimates[round(tail * (resamples - 1))],
        high=estimates[round((1 - tail) * (resamples - 1))],
        at_edge=best in (0, len(grid) - 1),
    )


def lowest_vertex(x: Sequence[float], y: Sequence[float]) -> float:
    """The vertex of the parabola through the lowest y and its two neighbours; at either end of
    the grid, or when the three points are collinear, that grid point itself."""
    i = min(range(len(y)), key=y.__getitem__)
    if i in (0, len(y) - 1):
        return x[i]
    (x0, x1, x2), (y0, y1, y2) = x[i - 1 : i + 2], y[i - 1 : i + 2]
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    if denominator == 0:
        return x[i]
    return x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)) / denominator


def coordinate_check(
    config: GPTConfig,
    widths: Sequence[int],
    steps: int = 3,
    lr: float = 3e-3,
    batch_size: int = 1,
    seeds: Sequence[int] = (0,),
) -> dict[int, dict[str, float]]:
    """How far each layer's activations move in `steps` AdamW steps, at each width: the
    coordinate check of Yang et al. (Tensor Programs V, figure 5). Each model is `config` at
    n_embd=width (same heads, so head size grows), trained on one fixed random batch of
    `batch_size` rows of block_size tokens; the result maps width -> {layer: mean |x_steps -
    x_0|} for the token embedding, every block's output and the logits, averaged over `seeds`.
    Under muP (with `config.mup_base_width` set) these stay flat as the width grows; under SP
    they grow with it.

    muP's flatness is a statement about width -> infinity with the batch held fixed. Adam's first
    steps are nearly sign updates, and roughly, the part of a sign update aligned with a token's
    input grows as width / sqrt(tokens) while the unaligned rest grows as sqrt(width), so at
    widths not far above the batch's token count the check also shows that finite-width rest as
    a slope. Measured (experiments/mup/README.md), the slope shrinks with the tokens per batch.
    Hence the default of one row: keep batch_size * block_size below the narrowest width."""
    runs = [_coordinate_changes(config, widths, steps, lr, batch_size, seed) for seed in seeds]
    return {
        width: {
            layer: sum(run[width][layer] for run in runs) / len(runs) for layer in runs[0][width]
        }
        for width in widths
    }


def _coordinate_changes(
    config: GPTConfig, widths: Sequence[int], steps: int, lr: float, batch_size: int, seed: int
) -> dict[int, dict[str, float]]:
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
