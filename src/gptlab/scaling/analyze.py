"""What `gptlab-scaling` does: read a sweep's runs, fit scaling laws, test them on a held-out
budget, plot, and write the report (see gptlab.cli.scaling for the command)."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from gptlab.fileio import atomic_write_text
from gptlab.scaling.fit import (
    ChinchillaLaw,
    IsoFLOPFit,
    KaplanLaw,
    PowerLaw,
    Runs,
    bootstrap_intervals,
    fit_isoflops,
    fit_law,
    flops_per_token_law,
    pairs_resampler,
    residual_resampler,
)
from gptlab.scaling.plan import format_flops, load_run_records

CSV_COLUMNS = (
    "budget",
    "n_embd",
    "n_layer",
    "n_head",
    "params",
    "non_embedding_params",
    "flops_per_token",
    "steps",
    "tokens",
    "flops",
    "epochs",
    "val_loss",
    "train_seconds",
    "cpu_seconds",
    "seed",
)
OPTIONAL_COLUMNS = ("seed",)  # runs.csv files written before seeds were recorded lack it

# Published values, for the report: (quantity, Kaplan et al. 2020, Hoffmann et al. 2022,
# Besiroglu et al. 2024). Hoffmann's a and b are given per approach (1 / 2 / 3).
PUBLISHED = {
    "a": ("0.73", "0.50 / 0.49 / 0.46", "0.51"),
    "b": ("0.27", "0.50 / 0.51 / 0.54", "0.49"),
    "tokens_per_param": ("-", "~20", "~20"),
    "alpha": ("-", "0.34", "0.35"),
    "beta": ("-", "0.28", "0.37"),
    "E": ("-", "1.69", "1.82"),
    "alpha_n": ("0.076", "-", "-"),
    "alpha_d": ("0.095", "-", "-"),
}


# ----------------------------------------------------------------------------- runs


def finished_rows(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(finished, skipped) run records of a sweep directory."""
    records = load_run_records(sweep_dir)
    if not records:
        raise FileNotFoundError(
            f"no scaling_run.json under {sweep_dir}; run `gptlab-train -m experiment=scaling_law` "
            "first, or point sweep_dir= at a sweep"
        )
    finished = [
        {**r, "seed": r.get("settings", {}).get("seed")}
        for r in records
        if r["status"] == "finished"
    ]
    skipped = [r for r in records if r["status"] == "skipped"]
    return finished, skipped


def write_runs_csv(rows: list[dict[str, Any]], path: Path) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, out.getvalue())


def read_runs_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows written by `write_runs_csv`, numbers as floats."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = set(CSV_COLUMNS) - set(OPTIONAL_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected {CSV_COLUMNS}")
        rows = [{k: float(v) if v else None for k, v in row.items()} for row in reader]
    if not rows:
        raise ValueError(f"{path} holds no runs")
    return rows


# What N counts in approach 2 and 3 (Kaplan's law always uses non-embedding N): all parameters,
# as Chinchilla does, or the transformer body without the token and position tables (Kaplan).
N_CONVENTIONS = {"total": "params", "non_embedding": "non_embedding_params"}
N_DESCRIPTIONS = {
    "total": "all parameters, the token and position tables included (Chinchilla's convention)",
    "non_embedding": "parameters without the token and position tables (Kaplan's convention)",
}
# gptlab-scaling's n_params: one convention, or both, each fitted and reported in turn.
N_PARAMS_CHOICES = {**{n: (n,) for n in N_CONVENTIONS}, "both": ("total", "non_embedding")}
# What the held-out budget is to be predicted within (issue 15): the mean relative error of
# the losses, and the relative error of N_opt.
HOLDOUT_TARGETS = {"loss": 0.02, "n_opt": 0.10}


def runs_from_rows(rows: list[dict[str, Any]], n_params: str = "total") -> Runs:
    if n_params not in N_CONVENTIONS:
        raise ValueError(f"n_params={n_params!r}; expected one of {sorted(N_CONVENTIONS)}")

    def column(name: str) -> np.ndarray:
        return np.array([row[name] for row in rows], dtype=np.float64)

    return Runs(
        budget=column("budget"),
        params=column(N_CONVENTIONS[n_params]),
        non_embedding_params=column("non_embedding_params"),
        tokens=column("tokens"),
        flops_per_token=column("flops_per_token"),
        loss=column("val_loss"),
    )


# ----------------------------------------------------------------------------- fits


def isoflop_summary(fit: IsoFLOPFit, budget: float) -> dict[str, float]:
    return {"a": fit.a, "b": fit.b, "tokens_per_param": fit.tokens_per_param(budget)}


def chinchilla_summary(law: ChinchillaLaw, budget: float, fpt: PowerLaw) -> dict[str, float]:
    n, d = law.optimum(budget, fpt)
    return {"a": law.a, "b": law.b, "tokens_per_param": d / n, **asdict(law)}


@dataclass
class Fits:
    fpt: PowerLaw
    isoflop: IsoFLOPFit
    chinchilla: ChinchillaLaw
    kaplan: KaplanLaw

    def summary(self, budget: float) -> dict[str, dict[str, float]]:
        """The headline numbers of each fit; tokens per parameter at `budget`."""
        return {
            "approach2": isoflop_summary(self.isoflop, budget),
            "approach3": chinchilla_summary(self.chinchilla, budget, self.fpt),
            "kaplan": asdict(self.kaplan),
        }


def fit_all(runs: Runs, starts: int) -> Fits:
    fpt = flops_per_token_law(runs)
    return Fits(
        fpt=fpt,
        isoflop=fit_isoflops(runs, fpt),
        chinchilla=fit_law(ChinchillaLaw, runs, starts=starts),
        kaplan=fit_law(KaplanLaw, runs, starts=starts),
    )


def confidence_intervals(
    runs: Runs, fits: Fits, n_resamples: int, seed: int
) -> tuple[dict[str, dict[str, tuple[float, float]]], dict[str, int]]:
    """95% bootstrap intervals of every summary number (see `gptlab.scaling.fit`), and per fit
    the number of resamples that could not be fitted. Refits start from the best grid point and
    from the full-data optimum."""
    budget = float(runs.budgets.max())

    def approach2(r: Runs) -> dict[str, float]:
        return isoflop_summary(fit_isoflops(r, fits.fpt), budget)

    def approach3(r: Runs) -> dict[str, float]:
        law = fit_law(ChinchillaLaw, r, starts=1, near=fits.chinchilla)
        return chinchilla_summary(law, budget, fits.fpt)

    def kaplan(r: Runs) -> dict[str, float]:
        return asdict(fit_law(KaplanLaw, r, starts=1, near=fits.kaplan))

    intervals, failures = {}, {}
    for name, statistics, resample in (
        ("approach2", approach2, residual_resampler(runs, fits.isoflop)),
        ("approach3", approach3, pairs_resampler(runs)),
        ("kaplan", kaplan, pairs_resampler(runs)),
    ):
        intervals[name], failures[name] = bootstrap_intervals(
            statistics, resample, n_resamples, seed
        )
    return intervals, failures


def holdout(runs: Runs, starts: int) -> dict[str, Any] | None:
    """Fit on every budget but the largest, then predict the largest budget's losses (each
    point's mean over its seeds) and N_opt; None with fewer than 3 budgets (approach 2 needs
    two to fit)."""
    largest = float(runs.budgets.max())
    train = runs.take(runs.budget < largest)
    test = runs.take(runs.budget == largest).point_means()
    if len(train.budgets) < 2:
        return None
    fits = fit_all(train, starts)
    result: dict[str, Any] = {"budget": largest, "fit_budgets": train.budgets.tolist()}
    for name, predicted in (
        ("approach3", fits.chinchilla.loss(test.params, test.tokens)),
        ("kaplan", fits.kaplan.loss(test.non_embedding_params, test.tokens)),
    ):
        error = predicted - test.loss
        result[name] = {
            "mean_abs_error": float(np.mean(np.abs(error))),
            "max_abs_error": float(np.max(np.abs(error))),
            "mean_abs_rel_error": float(np.mean(np.abs(error) / test.loss)),
        }
    observed = [c for c in fit_isoflops(runs, fits.fpt).curves if c.budget == largest]
    predicted_n = {
        "approach2": float(fits.isoflop.n_opt(largest)),
        "approach3": fits.chinchilla.optimum(largest, fits.fpt)[0],
    }
    n_opt = observed[0].n_opt if observed else None
    result["n_opt_predicted"] = predicted_n
    result["n_opt_observed"] = n_opt
    result["n_opt_rel_error"] = n_opt and {k: abs(v / n_opt - 1) for k, v in predicted_n.items()}
    result["fits"] = fits
    return result


# ----------------------------------------------------------------------------- plots


def budget_colors(budgets: np.ndarray) -> dict[float, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("viridis")
    return {b: cmap(i / max(1, len(budgets) - 1)) for i, b in enumerate(sorted(budgets))}


def log_axes(ax, x: bool = True, y: bool = False) -> None:
    """Log scales without labels on the minor ticks, which would overlap on short ranges."""
    from matplotlib.ticker import NullFormatter

    for on, axis, set_scale in ((x, ax.xaxis, ax.set_xscale), (y, ax.yaxis, ax.set_yscale)):
        if on:
            set_scale("log")
            axis.set_minor_formatter(NullFormatter())


def plot_isoflops(runs: Runs, fits: Fits, held_out: float | None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    colors = budget_colors(runs.budgets)
    curves = {c.budget: c for c in fits.isoflop.curves}
    for budget in runs.budgets:
        at = runs.budget == budget
        label = f"C = {format_flops(budget)}" + (" (held out)" if budget == held_out else "")
        ax.scatter(runs.params[at], runs.loss[at], color=colors[budget], label=label, zorder=3)
        if budget in curves:
            curve = curves[budget]
            n = np.exp(np.linspace(*np.log(curve.n_range), 100))
            ax.plot(n, curve.loss(n), color=colors[budget], lw=1)
            ax.plot(curve.n_opt, curve.loss_opt, "x", color=colors[budget], ms=9, mew=2)
    log_axes(ax)
    ax.set(xlabel="parameters N", ylabel="final validation loss (nats/token)")
    ax.set_title("isoFLOP curves (x: parabola minimum)")
    ax.legend(fontsize=8)
    return fig


def plot_optimal(runs: Runs, fits: Fits, held: dict[str, Any] | None):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    c_curves = np.array([c.budget for c in fits.isoflop.curves])
    c_line = np.geomspace(runs.budgets.min() / 2, runs.budgets.max() * 2, 50)
    optimum3 = np.array([fits.chinchilla.optimum(c, fits.fpt) for c in c_line])
    for ax, i, name, law in (
        (axes[0], 0, "N", fits.isoflop.n_opt),
        (axes[1], 1, "D", fits.isoflop.d_opt),
    ):
        vertices = [(c.n_opt, c.d_opt)[i] for c in fits.isoflop.curves]
        ax.scatter(c_curves, vertices, color="k", zorder=3, label="isoFLOP minima")
        ax.plot(c_line, law(c_line), label=f"approach 2: ∝ C^{law.exponent:.2f}")
        exponent = (fits.chinchilla.a, fits.chinchilla.b)[i]
        ax.plot(c_line, optimum3[:, i], "--", label=f"approach 3 (a={exponent:.2f} as C→∞)")
        log_axes(ax, y=True)
        ax.set(xlabel="training FLOPs C", ylabel=f"{name}_opt")
        ax.legend(fontsize=8)
    if held is not None:
        axes[0].scatter(
            [held["budget"]],
            [held["fits"].isoflop.n_opt(held["budget"])],
            marker="*",
            s=120,
            color="tab:red",
            zorder=4,
            label="predicted from smaller budgets",
        )
        axes[0].legend(fontsize=8)
    fig.suptitle("compute-optimal model size and data")
    return fig


def plot_predicted(runs: Runs, fits: Fits, held: dict[str, Any] | None):
    """Approach 3's predictions against the observed losses; fitted without the largest budget
    when there is a held-out test."""
    import matplotlib.pyplot as plt

    law: ChinchillaLaw = (held["fits"] if held else fits).chinchilla
    predicted = law.loss(runs.params, runs.tokens)
    test = runs.budget == (held["budget"] if held else np.nan)
    fig, ax = plt.subplots(figsize=(4.5, 4), layout="constrained")
    ax.scatter(runs.loss[~test], predicted[~test], label="fitted budgets", color="tab:blue")
    ax.scatter(runs.loss[test], predicted[test], label="held-out budget", color="tab:red")
    lo, hi = runs.loss.min() - 0.05, runs.loss.max() + 0.05
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set(xlabel="observed loss", ylabel="approach-3 prediction", xlim=(lo, hi), ylim=(lo, hi))
    ax.set_title("L(N, D) fitted without the largest budget" if held else "L(N, D) fit")
    ax.legend(fontsize=8)
    return fig


def plot_kaplan(runs: Runs, fits: Fits):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), layout="constrained")
    colors = budget_colors(runs.budgets)
    for budget in runs.budgets:
        at = runs.budget == budget
        ax.scatter(runs.non_embedding_params[at], runs.loss[at], color=colors[budget],
                   label=f"C = {format_flops(budget)}")  # fmt: skip
    n = np.geomspace(runs.non_embedding_params.min() / 2, runs.non_embedding_params.max() * 2, 50)
    law = fits.kaplan
    ax.plot(n, law.loss_n(n), "k--", label=f"L(N) = (N_c/N)^{law.alpha_n:.3f}  (D → ∞)")
    log_axes(ax)
    ax.set(xlabel="non-embedding parameters N", ylabel="final validation loss")
    ax.set_title("Kaplan-style L(N)")
    ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------- report


def _interval(intervals: dict[str, tuple[float, float]], key: str) -> str:
    if key not in intervals:
        return ""
    lo, hi = intervals[key]
    return f" ({lo:.3g} – {hi:.3g})"


def runs_table(rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| C (budget) | n_embd | seed | n_layer | N | N non-emb. | D | D/N | epochs | steps | "
        "val loss |",
        "|" + " --- |" * 11,
    ]
    for r in rows:
        seed = "-" if r.get("seed") is None else f"{r['seed']:.0f}"
        lines.append(
            f"| {format_flops(r['budget'])} | {r['n_embd']:.0f} | {seed} | {r['n_layer']:.0f} | "
            f"{r['params']:,.0f} | {r['non_embedding_params']:,.0f} | {r['tokens']:,.0f} | "
            f"{r['tokens'] / r['params']:.1f} | {r['epochs']:.2f} | {r['steps']:.0f} | "
            f"{r['val_loss']:.4f} |"
        )
    if skipped:
        names = [f"C={format_flops(r['budget'])} n_embd={r['n_embd']}" for r in skipped]
        lines += ["", f"Skipped by the sweep's rules (min_steps, max_epochs): {', '.join(names)}."]
    return lines


def fits_table(
    fits: Fits,
    summary: dict[str, dict[str, float]],
    intervals: dict[str, dict[str, tuple[float, float]]],
    failures: dict[str, int],
    budget: float,
) -> list[str]:
    lines = [
        "## isoFLOP minima (approach 2)",
        "",
        "| C | N_opt | D_opt | D_opt / N_opt | loss at minimum | minimum inside the sizes run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in fits.isoflop.curves:
        lines.append(
            f"| {format_flops(c.budget)} | {c.n_opt:,.0f} | {c.d_opt:,.0f} | "
            f"{c.d_opt / c.n_opt:.1f} | {c.loss_opt:.4f} | {'yes' if c.inside else 'no'} |"
        )
    lines += [f"- {reason}" for reason in fits.isoflop.skipped]
    lines += [
        "",
        f"## Fits (all budgets; 95% bootstrap intervals; tokens per parameter at "
        f"C = {format_flops(budget)})",
        "",
        "| method | quantity | this study | Kaplan 2020 | Hoffmann 2022 | Besiroglu 2024 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, values in summary.items():
        for key, value in values.items():
            interval = _interval(intervals.get(method, {}), key)
            published = " | ".join(PUBLISHED.get(key, ("-", "-", "-")))
            lines.append(f"| {method} | {key} | {value:.4g}{interval} | {published} |")
    lines += ["", f"Bootstrap resamples that could not be fitted, per fit: {failures}."]
    return lines


def holdout_table(held: dict[str, Any] | None) -> list[str]:
    if held is None:
        return ["## Held-out budget", "", "Not tested: that needs runs at >= 3 budgets."]
    fitted_on = ", ".join(format_flops(b) for b in held["fit_budgets"])
    lines = [
        f"## Held-out budget C = {format_flops(held['budget'])} (fitted on {fitted_on})",
        "",
        "| law | mean abs. error (nats) | max abs. error | mean rel. error |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("approach3", "kaplan"):
        e = held[name]
        lines.append(
            f"| {name} | {e['mean_abs_error']:.4f} | {e['max_abs_error']:.4f} | "
            f"{e['mean_abs_rel_error']:.2%} |"
        )
    observed = held["n_opt_observed"]
    predicted = ", ".join(f"{k} {v:,.0f}" for k, v in held["n_opt_predicted"].items())
    seen = f"{observed:,.0f}" if observed else "n/a (no minimum)"
    lines += ["", f"N_opt at the held-out budget: observed {seen}; predicted by {predicted}."]
    return lines + [""] + holdout_targets(held)


def holdout_targets(held: dict[str, Any]) -> list[str]:
    """The held-out test against HOLDOUT_TARGETS, one line per law."""

    def verdict(error: float, target: float) -> str:
        return f"{error:.1%} ({'met' if error <= target else 'missed'})"

    loss, n_opt = HOLDOUT_TARGETS["loss"], HOLDOUT_TARGETS["n_opt"]
    lines = [f"Targets: mean relative loss error <= {loss:.0%}, N_opt error <= {n_opt:.0%}.", ""]
    for name in ("approach3", "kaplan"):
        error = held[name]["mean_abs_rel_error"]
        lines.append(f"- {name}, losses (seed means per point): {verdict(error, loss)}")
    for name, error in (held["n_opt_rel_error"] or {}).items():
        lines.append(f"- {name}, N_opt: {verdict(error, n_opt)}")
    if not held["n_opt_rel_error"]:
        lines.append("- N_opt: not tested (the held-out budget's runs have no isoFLOP minimum)")
    return lines


def log_to_tensorboard(
    log_dir: Path, report: str, summaries: dict[str, dict[str, dict[str, float]]], pngs: list[Path]
) -> None:
    """The report as text, the fitted numbers as scalars (tagged scaling/<prefix><method>/...),
    the saved plots as images."""
    from matplotlib.image import imread
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_text("scaling/report", report)
        for prefix, summary in summaries.items():
            for method, values in summary.items():
                for key, value in values.items():
                    writer.add_scalar(f"scaling/{prefix}{method}/{key}", value)
        for png in pngs:
            writer.add_image(f"scaling/{png.stem}", imread(png), dataformats="HWC")
    finally:
        writer.close()


@dataclass
class Analysis:
    """The fits of one N convention: on all budgets, their intervals, and the held-out test."""

    n_params: str
    runs: Runs
    fits: Fits
    summary: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, tuple[float, float]]]
    failures: dict[str, int]
    held: dict[str, Any] | None

    def report(self) -> list[str]:
        largest = float(self.runs.budgets.max())
        return (
            [f"# N = {N_DESCRIPTIONS[self.n_params]} (n_params={self.n_params})", ""]
            + fits_table(self.fits, self.summary, self.intervals, self.failures, largest)
            + [""]
            + holdout_table(self.held)
        )

    def results(self, bootstrap: int) -> dict[str, Any]:
        return {
            "n_params": self.n_params,
            "summary": self.summary,
            "intervals": self.intervals,
            "bootstrap": {"resamples": bootstrap, "failed": self.failures},
            "holdout": self.held and {k: v for k, v in self.held.items() if k != "fits"},
            "isoflop_minima": [asdict(c) for c in self.fits.isoflop.curves],
            "isoflop_skipped": self.fits.isoflop.skipped,
            "flops_per_token_law": asdict(self.fits.fpt),
        }

    def figures(self) -> dict[str, Any]:
        held = self.held
        return {
            "isoflop": plot_isoflops(self.runs, self.fits, held and held["budget"]),
            "optimal": plot_optimal(self.runs, self.fits, held),
            "predicted": plot_predicted(self.runs, self.fits, held),
        }


def analyze_convention(rows: list[dict[str, Any]], n_params: str, cfg: DictConfig) -> Analysis:
    runs = runs_from_rows(rows, n_params)
    fits = fit_all(runs, cfg.starts)
    summary = fits.summary(float(runs.budgets.max()))  # tokens per parameter at the largest C
    intervals, failures = confidence_intervals(runs, fits, cfg.bootstrap, cfg.seed)
    return Analysis(n_params, runs, fits, summary, intervals, failures, holdout(runs, cfg.starts))


def seeds_line(rows: list[dict[str, Any]]) -> str:
    """How many runs (seeds) each sweep point has, and how the fits use them."""
    per_point = Counter((row["budget"], row["params"]) for row in rows).values()
    return (
        f"{len(rows)} runs at {len(per_point)} (budget, N) points, {min(per_point)} to "
        f"{max(per_point)} per point. Every run is a point of the fits (a point with k seeds "
        "weighs k times, and the bootstraps resample the seed-to-seed noise with it); the "
        "held-out test compares predictions with each point's mean over its seeds."
    )


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Load runs; per N convention fit, bootstrap and hold out the largest budget; write the
    report and plots. With n_params=both, fits.json holds one entry per convention, and the
    plots of non-embedding N carry that suffix."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "gptlab-scaling draws its plots with matplotlib: pip install 'gptlab[plots]'"
        ) from e
    matplotlib.use("Agg")
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_params = cfg.get("n_params", "total")
    if n_params not in N_PARAMS_CHOICES:  # before any work
        raise ValueError(f"n_params={n_params!r}; expected one of {sorted(N_PARAMS_CHOICES)}")
    if cfg.get("runs_csv"):
        rows, skipped = read_runs_csv(cfg.runs_csv), []
    else:
        rows, skipped = finished_rows(cfg.sweep_dir)
        write_runs_csv(rows, out_dir / "runs.csv")
    analyses = [analyze_convention(rows, n, cfg) for n in N_PARAMS_CHOICES[n_params]]
    report_lines = [seeds_line(rows), ""] + runs_table(rows, skipped)
    for analysis in analyses:
        report_lines += [""] + analysis.report()
    report = "\n".join(report_lines)
    atomic_write_text(out_dir / "report.md", report)
    per_convention = {a.n_params: a.results(cfg.bootstrap) for a in analyses}
    results = (
        per_convention[n_params] if len(analyses) == 1 else {"n_params": n_params, **per_convention}
    )
    atomic_write_text(out_dir / "fits.json", json.dumps(results, indent=2) + "\n")
    figures, summaries = {}, {}
    for i, analysis in enumerate(analyses):  # the first convention's under the plain names
        suffix, prefix = ("", "") if i == 0 else (f"_{analysis.n_params}", f"{analysis.n_params}/")
        figures |= {f"{name}{suffix}": fig for name, fig in analysis.figures().items()}
        summaries[prefix] = analysis.summary
    figures["kaplan"] = plot_kaplan(analyses[0].runs, analyses[0].fits)  # non-embedding N always
    pngs = [out_dir / f"{name}.png" for name in figures]
    for png, fig in zip(pngs, figures.values(), strict=True):
        fig.savefig(png, dpi=80)
    log_to_tensorboard(Path(cfg.tensorboard_dir), report, summaries, pngs)
    print(report)
    return results
