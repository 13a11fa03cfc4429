"""The summary of a `gptlab-train -m` sweep: one row per job, and the swept settings averaged
over seeds, written as summary.csv and summary.md in the sweep folder and printed at the end.

Each job leaves `results.json` (its final metrics, written by `train`) or `error.txt` (its
error line) in its folder; the summary is rebuilt from those files after every job, so it is
current even when a sweep is stopped half-way, and it reads the same with any Hydra launcher.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gptlab.analysis import compare_seeds, job_dirs, job_overrides, mean_std
from gptlab.errors import ERROR_FILE
from gptlab.fileio import atomic_write_text
from gptlab.training.checkpoint import RESULTS_FILE

METRICS = ("val_loss", "val_ppl", "val_acc", "step", "tokens_per_sec", "wall_time_s")
SEED_KEYS = ("seed",)


def job_row(job_dir: Path) -> dict[str, Any]:
    """One job: its overrides, and its results or its error."""
    swept = job_overrides(job_dir)
    overrides = " ".join(f"{k}={v}" for k, v in swept.items())
    row: dict[str, Any] = {"job": int(job_dir.name), "overrides": overrides, "swept": swept}
    if (job_dir / RESULTS_FILE).is_file():
        results = json.loads((job_dir / RESULTS_FILE).read_text(encoding="utf-8"))
        row.update({key: results.get(key, math.nan) for key in METRICS})
        row["checkpoint"] = results.get("best_checkpoint") or ""
        row["status"] = "ok"
    elif (job_dir / ERROR_FILE).is_file():
        row["status"] = "failed: " + (job_dir / ERROR_FILE).read_text(encoding="utf-8").strip()
    else:
        row["status"] = "running or killed"
    return row


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    return [job_row(p) for p in job_dirs(sweep_dir)]


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The override keys whose values differ between jobs (the others are common to all)."""
    keys = dict.fromkeys(k for row in rows for k in row["swept"])
    return [k for k in keys if len({row["swept"].get(k) for row in rows}) > 1]


def setting(row: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{k}={row['swept'][k]}" for k in keys if k in row["swept"])


def group_over_seeds(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The finished jobs grouped by their swept values other than the seed: mean, sd, n, and
    the one-sided Welch p-value that the best setting is better than this one (`p_vs_best`;
    nan for the best itself or with fewer than 2 seeds a side)."""
    keys = [k for k in swept_keys(rows) if k not in SEED_KEYS]
    groups: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["status"] != "ok" or not math.isfinite(row.get(metric, math.nan)):
            continue
        groups[setting(row, keys) or "(all jobs)"].append(row[metric])
    sign = -1 if metric == "val_acc" else 1  # lower loss, higher accuracy is better
    best = min(groups.values(), key=lambda v: sign * mean_std(v)[0], default=[])
    out = []
    for name, values in groups.items():
        mean, sd = mean_std(values)
        p = math.nan
        if values is not best and len(values) > 1 and len(best) > 1:
            p = compare_seeds([sign * v for v in best], [sign * v for v in values]).p_less
        out.append(
            {"setting": name, "mean": mean, "sd": sd, "n": len(values), "p_vs_best": p}
            | {"is_best": values is best}
        )
    return out


def metric_of(rows: list[dict[str, Any]]) -> str:
    """Accuracy for classifiers, loss otherwise."""
    has_acc = any(math.isfinite(row.get("val_acc", math.nan)) for row in rows)
    return "val_acc" if has_acc else "val_loss"


def summary_csv(rows: list[dict[str, Any]]) -> str:
    columns = ["job", "overrides", *METRICS, "checkpoint", "status"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    metric, keys = metric_of(rows), swept_keys(rows)
    common = [f"{k}={v}" for k, v in rows[0]["swept"].items() if k not in keys] if rows else []
    lines = [f"Common to all jobs: `{' '.join(common)}`", ""] if common else []
    lines += [
        "| job | swept | val loss | val ppl | val acc | steps | tokens/s | wall s | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [r["job"], f"`{setting(r, keys)}`"]
        cells += [fmt(r.get(k, math.nan), d) for k, d in (("val_loss", 4), ("val_ppl", 2))]
        cells += [fmt(r.get(k, math.nan), d) for k, d in (("val_acc", 4), ("step", 0))]
        cells += [fmt(r.get(k, math.nan), 0) for k in ("tokens_per_sec", "wall_time_s")]
        cells.append(r["status"])
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    groups = group_over_seeds(rows, metric)
    if any(g["n"] > 1 for g in groups):
        note = "p: one-sided Welch t-test that the best setting beats it; above 0.05: seed noise"
        lines += ["", f"Over seeds ({metric}, mean ± sd, n; {note}):", ""]
        lines += ["| setting | mean | sd | n | p vs best |", "| --- | --- | --- | --- | --- |"]
        for g in groups:
            p = "best" if g["is_best"] else fmt(g["p_vs_best"], 3)
            cells = [f"`{g['setting']}`", fmt(g["mean"]), fmt(g["sd"]), g["n"], p]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = sweep_rows(sweep_dir)
    atomic_write_text(sweep_dir / "summary.csv", summary_csv(rows))
    atomic_write_text(sweep_dir / "summary.md", summary_markdown(rows))
    return rows


class SweepSummary(Callback):
    """Hydra callback: rebuild the summary after every job, print it when the sweep ends, and
    exit with status 1 when any job failed (the others still ran)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode.name != "MULTIRUN":
            return
        job_dir = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the exception; .return_value would raise it
            atomic_write_text(job_dir / ERROR_FILE, f"{type(error).__name__}: {error}\n")
        write_summary(job_dir.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n")
        print(summary_markdown(rows))
        failed = [r for r in rows if r["status"].startswith("failed")]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs failed", file=sys.stderr)
            raise SystemExit(1)
