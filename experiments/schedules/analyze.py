"""Results of the schedules study (run.py): the seed-to-seed sd of the default model, WSD vs
cosine at equal steps, decays branched off the stable run vs dedicated runs, and the compute the
branches save.

    python -m experiments.schedules.analyze [--log-dir logs] [--steps 1000]

Writes results.md (the tables) and curves.png (val loss vs step per schedule and length) next to
this file, and prints the tables.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from experiments.launch import analysis_arguments
from experiments.schedules.run import STEPS, TASK, branch_point, shorter_lengths
from gptlab.analysis import (
    SeedComparison,
    SweepJob,
    compare_seeds,
    comparison_table,
    load_runs,
    mean_std_text,
    unfinished_lines,
)

HERE = Path(__file__).resolve().parent
ARMS = ("cosine", "wsd", "branch")
WSD_TARGET = 0.01  # the targets (nats): WSD vs cosine at equal steps,
BRANCH_TARGET = 0.02  # and a branched decay vs a dedicated run of its length

Finished = dict[int, dict[int, SweepJob]]  # length -> seed -> the finished run
ByLR = dict[float, dict[int, float]]  # peak LR -> seed -> final val loss


def finished(runs: list[SweepJob]) -> Finished:
    """The finished runs of one arm, by length and seed (the newest where one ran twice)."""
    out: Finished = {}
    for run in runs:
        if run.results is not None:
            length, seed = int(run.overrides["trainer.max_steps"]), int(run.overrides["seed"])
            out.setdefault(length, {})[seed] = run
    return out


def losses(runs: dict[int, SweepJob]) -> dict[int, float]:
    return {seed: run.results["val_loss"] for seed, run in sorted(runs.items())}


def verdict(c: SeedComparison, margin: float) -> str:
    """Is a within +-margin of b? Shown so when the 90% interval lies inside (two one-sided
    tests at 5%); shown to differ when the 95% interval excludes 0; else not resolved."""
    low, high = c.interval(0.9)
    if -margin < low and high < margin:
        return f"within ±{margin:g} nats (90% interval inside it)"
    low, high = c.interval(0.95)
    if low > 0 or high < 0:
        return f"they differ (95% interval excludes 0; target ±{margin:g})"
    return f"not resolved at this n: the 90% interval reaches past ±{margin:g}"


def paired_table(a_name: str, a: dict[int, float], b_name: str, b: dict[int, float]) -> list[str]:
    """Per seed in both: a, b and a - b (the same seed: the same initialisation and data)."""
    lines = [f"| seed | {a_name} | {b_name} | difference |", "| ---: | ---: | ---: | ---: |"]
    for seed in sorted(a.keys() & b.keys()):
        lines.append(f"| {seed} | {a[seed]:.4f} | {b[seed]:.4f} | {a[seed] - b[seed]:+.4f} |")
    return lines


def compare(a: dict[int, float], b: dict[int, float]) -> SeedComparison | None:
    return compare_seeds(list(a.values()), list(b.values())) if min(len(a), len(b)) > 1 else None


def peak_lr(run: SweepJob) -> float:
    """The run's peak learning rate: its override, else the config Hydra saved beside it."""
    if "optimizer.lr" in run.overrides:
        return float(run.overrides["optimizer.lr"])
    return float(OmegaConf.load(run.path / ".hydra" / "config.yaml").optimizer.lr)


def by_lr(runs: dict[int, SweepJob]) -> ByLR:
    out: ByLR = {}
    for seed, run in sorted(runs.items()):
        out.setdefault(peak_lr(run), {})[seed] = run.results["val_loss"]
    return out


def scan_losses(arms: dict[str, Finished], log_dir: Path, steps: int) -> dict[str, ByLR]:
    """Each schedule's full-length losses by peak LR: the main arm's (the default LR) and the
    LR scan's (run.py's lr<LR>/<schedule> folders)."""
    scan: dict[str, ByLR] = {}
    if not any((log_dir / TASK).glob("lr*")):
        return scan
    for schedule in ("cosine", "wsd"):
        runs = [dict(arms[schedule].get(steps, {}))]
        for folder in sorted((log_dir / TASK).glob(f"lr*/{schedule}")):
            runs.append(finished(load_runs(folder)).get(steps, {}))
        for found in runs:
            for lr, values in by_lr(found).items():
                scan.setdefault(schedule, {}).setdefault(lr, {}).update(values)
    return scan


def lr_scan_section(
    scan: dict[str, ByLR], comparisons: dict[str, SeedComparison], steps: int
) -> list[str]:
    """The loss of each schedule at each peak LR, and WSD at its best LR vs cosine at its."""
    lines = [
        "",
        f"## Peak learning rate: WSD vs cosine, each at its best ({steps} steps)",
        "",
        "| schedule | peak LR | final val loss |",
        "| --- | ---: | ---: |",
    ]
    best: dict[str, float] = {}
    for schedule, losses_by_lr in scan.items():
        for lr, values in sorted(losses_by_lr.items()):
            lines.append(f"| {schedule} | {lr:g} | {mean_std_text(list(values.values()), 4)} |")
        best[schedule] = min(
            losses_by_lr, key=lambda lr: statistics.mean(losses_by_lr[lr].values())
        )
    a, b = scan["wsd"][best["wsd"]], scan["cosine"][best["cosine"]]
    c = compare(a, b)
    lines += [
        "",
        f"Best peak LR (lowest mean): cosine {best['cosine']:g}, WSD {best['wsd']:g}. Each best is "
        "picked on these same runs, which biases both means low by a similar amount.",
    ]
    name = f"WSD at {best['wsd']:g} vs cosine at {best['cosine']:g}"
    if c is not None:
        comparisons[name] = c
        lines += ["", f"{name}: {c.difference:+.4f} nats; Welch: {verdict(c, WSD_TARGET)}."]
    lines += ["", f"{name}, same seeds side by side:", "", *paired_table("WSD", a, "cosine", b)]
    return lines


def report(
    arms: dict[str, Finished],
    scan: dict[str, ByLR],
    unfinished: list[SweepJob],
    args: argparse.Namespace,
) -> str:
    steps, shorter = args.steps, shorter_lengths(args.steps)
    cosine, wsd, branch = (arms[arm] for arm in ARMS)
    lines = [
        f"# Schedules: results (model=nano, {steps} steps)",
        "",
        "Written by `python -m experiments.schedules.analyze`. Final validation loss "
        "(nats/token), mean ± sample sd over seeds (n = seeds that finished).",
        *unfinished_lines(unfinished),
    ]
    if steps in cosine:
        values = losses(cosine[steps])
        spread = max(values.values()) - min(values.values())
        lines += [
            "",
            f"## Seed-to-seed spread of the default model (cosine, {steps} steps)",
            "",
            f"**{mean_std_text(list(values.values()), 4)}**; range {spread:.4f} "
            f"(seeds: {', '.join(f'{s}: {v:.4f}' for s, v in values.items())}).",
        ]
    comparisons: dict[str, SeedComparison] = {}
    if steps in cosine and steps in wsd:
        a, b = losses(wsd[steps]), losses(cosine[steps])
        c = compare(a, b)
        lines += ["", f"## WSD vs cosine at {steps} steps", ""]
        if c is not None:
            comparisons[f"WSD vs cosine, {steps} steps"] = c
            lines += [f"Welch: {verdict(c, WSD_TARGET)}.", ""]
        lines += ["Same seeds side by side:", "", *paired_table("WSD", a, "cosine", b)]
    if len(scan) == 2 and any(len(by) > 1 for by in scan.values()):
        lines += lr_scan_section(scan, comparisons, steps)
    lines += [
        "",
        "## Decays branched off the stable run vs dedicated WSD runs",
        "",
        f"The {steps}-step WSD runs are the stable runs; a branch to L steps resumes its "
        f"checkpoint at step L − decay. The {steps}-step length needs no branch: it is the "
        "stable run's own decay.",
    ]
    for length in shorter:
        if length not in branch or length not in wsd:
            lines += ["", f"{length} steps: no branched and dedicated runs to compare yet."]
            continue
        a, b = losses(branch[length]), losses(wsd[length])
        both = a.keys() & b.keys()
        largest = max((abs(a[s] - b[s]) for s in both), default=float("nan"))
        within = "within" if largest < BRANCH_TARGET else "not within"
        lines += [
            "",
            f"### {length} steps (branched at step {branch_point(length, args)})",
            "",
            f"Largest |branch − dedicated| over the {len(both)} shared seeds: **{largest:.4f}**, "
            f"{within} the ±{BRANCH_TARGET:g} target.",
            "",
            *paired_table("branch", a, "dedicated", b),
        ]
        c = compare(a, b)
        if c is not None:
            comparisons[f"branch vs dedicated, {length} steps"] = c
    if comparisons:
        lines += ["", "## Welch's tests", "", comparison_table(comparisons, digits=4).rstrip()]
    lines += ["", *compute_saved(wsd, branch, args)]
    return "\n".join(lines) + "\n"


def compute_saved(wsd: Finished, branch: Finished, args: argparse.Namespace) -> list[str]:
    """The steps, and the measured wall time, of every length from dedicated runs vs from one
    stable run and its branches."""
    steps, shorter = args.steps, shorter_lengths(args.steps)
    dedicated_steps = steps + sum(shorter)
    branched_steps = steps + sum(length - branch_point(length, args) for length in shorter)
    lines = [
        "## Compute saved by branching",
        "",
        f"Per seed, lengths {', '.join(map(str, [*shorter, steps]))}: dedicated runs train "
        f"{dedicated_steps} steps, one stable run and its branches {branched_steps}: "
        f"**{1 - branched_steps / dedicated_steps:.0%} fewer steps**.",
    ]
    seeds = set.intersection(*(set(wsd.get(n, {})) for n in [*shorter, steps]))
    seeds &= set.intersection(*(set(branch.get(n, {})) for n in shorter))
    if seeds:

        def wall(runs: dict[int, SweepJob]) -> float:
            return sum(runs[s].results["wall_time_s"] for s in seeds)

        dedicated = sum(wall(wsd[n]) for n in [*shorter, steps])
        branched = wall(wsd[steps]) + sum(wall(branch[n]) for n in shorter)
        lines += [
            "",
            f"Measured over seeds {', '.join(map(str, sorted(seeds)))} (wall time of the runs, "
            f"machine as it was): dedicated {dedicated / 60:.1f} min, stable run and branches "
            f"{branched / 60:.1f} min ({1 - branched / dedicated:.0%} less).",
        ]
    return lines


def plot(arms: dict[str, Finished], path: Path, args: argparse.Namespace) -> None:
    """Val loss vs step, the mean over seeds: cosine, WSD at each length (dedicated), and the
    branched decays (dashed, crosses: on top of the dedicated runs when they match)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves = [("cosine", args.steps, "cosine", ".")]
    curves += [("wsd", n, "WSD", ".") for n in sorted(arms["wsd"])]
    curves += [("branch", n, "WSD branched", "x") for n in sorted(arms["branch"])]
    for arm, length, label, marker in curves:
        runs = arms[arm].get(length)
        if not runs:
            continue
        by_step: dict[int, list[float]] = {}
        for run in runs.values():
            for step, value in run.scalars.get("loss/val", []):
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        means = [statistics.fmean(by_step[s]) for s in steps]
        style = "--" if arm == "branch" else "-"
        label += " (the stable run)" if arm == "wsd" and length == args.steps else ""
        ax.plot(steps, means, style, marker=marker, ms=7 if marker == "x" else 4,
                label=f"{label}, {length} steps (n={len(runs)})")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token), mean over seeds")
    ax.set_title("crosses: decays branched off the stable WSD run", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> None:
    args = analysis_arguments(__doc__.splitlines()[0], STEPS, HERE, argv)
    runs = {arm: load_runs(args.log_dir / TASK / arm) for arm in ARMS}
    arms = {arm: finished(arm_runs) for arm, arm_runs in runs.items()}
    if not any(arms.values()):
        raise SystemExit(
            f"no finished runs under {args.log_dir / TASK}: "
            "run `python -m experiments.schedules.run` first"
        )
    unfinished = [run for arm_runs in runs.values() for run in arm_runs if run.results is None]
    text = report(arms, scan_losses(arms, args.log_dir, args.steps), unfinished, args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.md").write_text(text, encoding="utf-8")
    plot(arms, args.out_dir / "curves.png", args)
    print(text)


if __name__ == "__main__":
    main()
