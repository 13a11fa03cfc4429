"""Welch's tests of the differences README.md here claims, from the shipped tables in results/:
Welch's t needs only each side's mean, sd and number of seeds, which the tables hold.

    python -m experiments.ablations.welch_tests     # writes results/welch_tests.md

The tables round to 3 decimals, so the tests are as exact as that; `analyze` computes the p
column from the runs themselves when the sweeps are rerun.
"""

from __future__ import annotations

import re
from pathlib import Path

from gptlab.analysis import SeedComparison, comparison_table, welch

RESULTS = Path(__file__).resolve().parent / "results"
MEAN_SD = re.compile(r"([-+]?\d+\.\d+) ± (\d+\.\d+)(?: \(n=(\d+)\))?")
LENGTH_SEEDS = 3  # the length table does not print n: it covers the position sweep's 3 seeds

# (label, table, column, variant a, variant b): a vs b, as README.md claims them.
CLAIMS = [
    ("position: rope vs learned", "position_ablation", 2, "rope", "learned"),
    ("position: alibi vs learned", "position_ablation", 2, "alibi", "learned"),
    ("position: none (NoPE) vs learned", "position_ablation", 2, "none", "learned"),
    ("position: rope vs sinusoidal", "position_ablation", 2, "rope", "sinusoidal"),
    ("position: sinusoidal vs learned", "position_ablation", 2, "sinusoidal", "learned"),
    ("position: alibi vs rope", "position_ablation", 2, "alibi", "rope"),
    ("attention: gqa vs mha", "attention_ablation", 2, "gqa", "mha"),
    ("attention: mqa vs mha", "attention_ablation", 2, "mqa", "mha"),
    ("attention: local vs mha", "attention_ablation", 2, "local", "mha"),
    ("attention: qk_norm vs mha", "attention_ablation", 2, "qk_norm", "mha"),
    ("beyond − late: alibi vs none", "length_generalisation", 4, "alibi", "none"),
    ("beyond − late: alibi vs sinusoidal", "length_generalisation", 4, "alibi", "sinusoidal"),
    ("beyond − late: alibi vs rope", "length_generalisation", 4, "alibi", "rope"),
]


def read_column(table: str, column: int) -> dict[str, tuple[float, float, int]]:
    """variant -> (mean, sd, n) from the 'mean ± sd (n=N)' cells of one column of a results
    table (cells after the variant name are numbered from 1)."""
    out = {}
    for line in (RESULTS / f"{table}.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = MEAN_SD.fullmatch(cells[column]) if len(cells) > column else None
        if match:
            mean, sd, n = match.groups()
            out[cells[0]] = (float(mean), float(sd), int(n) if n else LENGTH_SEEDS)
    return out


def claimed_differences() -> dict[str, SeedComparison]:
    tables: dict[tuple[str, int], dict[str, tuple[float, float, int]]] = {}
    comparisons = {}
    for label, table, column, a, b in CLAIMS:
        rows = tables.setdefault((table, column), read_column(table, column))
        comparisons[label] = welch(*rows[a], *rows[b])
    return comparisons


def main() -> None:
    text = (
        "Welch's tests of the differences claimed in README.md, from the mean ± sd (n) of the "
        "tables here (rounded to 3 decimals). Written by "
        "`python -m experiments.ablations.welch_tests`.\n\n"
        + comparison_table(claimed_differences())
    )
    (RESULTS / "welch_tests.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
