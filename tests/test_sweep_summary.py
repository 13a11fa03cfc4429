"""The summary of a Hydra sweep (gptlab.cli.sweep): one row per job with its swept values,
metrics or error line, and the swept settings averaged over seeds."""

from __future__ import annotations

import csv

import pytest

from gptlab.cli.sweep import write_summary
from tests.kit import TINY_MODEL, run_script, write_run_folder


def test_summary_lists_every_job_and_groups_seeds(tmp_path):
    losses = {("1e-3", 1): 4.0, ("1e-3", 2): 4.2, ("3e-3", 1): 3.5, ("3e-3", 2): 3.9}
    for i, ((lr, seed), loss) in enumerate(losses.items()):
        results = {"val_loss": loss, "val_ppl": 2.0, "step": 10, "best_checkpoint": f"c{i}.ckpt"}
        swept = ["model.n_layer=1", f"optimizer.lr={lr}", f"seed={seed}"]
        write_run_folder(tmp_path / str(i), swept, results)
    failed = ["model.n_layer=1", "optimizer.lr=-1", "seed=1"]
    write_run_folder(tmp_path / "4", failed, error="lr must be > 0")
    rows = write_summary(tmp_path)
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed: lr must be > 0"]
    table = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [float(r["val_loss"]) for r in table[:4]] == list(losses.values())
    assert table[2]["checkpoint"] == "c2.ckpt"
    markdown = (tmp_path / "summary.md").read_text()
    assert "Common to all jobs: `model.n_layer=1`" in markdown
    # mean and sample sd of (4.0, 4.2) and (3.5, 3.9), by hand
    # Welch: t = (3.7 - 4.1) / sqrt(0.08/2 + 0.02/2) = -1.789, df = 0.0025/(0.0016 + 0.0001)
    # = 1.47; P(T < -1.789) on 1.47 df = 0.129 (scipy.stats.ttest_ind, equal_var=False).
    assert "| `optimizer.lr=1e-3` | 4.1000 | 0.1414 | 2 | 0.129 |" in markdown
    assert "| `optimizer.lr=3e-3` | 3.7000 | 0.2828 | 2 | best |" in markdown
    assert "failed: lr must be > 0" in markdown


@pytest.mark.slow
def test_a_real_sweep_runs_past_a_failed_job_and_prints_its_summary(tiny_data_dir, tmp_path):
    args = [
        "-m", *TINY_MODEL,
        f"corpus.dir={tiny_data_dir}", "data.loader.batch_size=4", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "scheduler.warmup_steps=1", "callbacks.samples=null",
        "optimizer.lr=1e-3,-1",
    ]  # fmt: skip
    out = run_script("gptlab-train", *args, cwd=tmp_path, check=False, GPTLAB_ROOT=str(tmp_path))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "1 of 2 jobs failed" in out.stderr
    assert "| 0 | `optimizer.lr=0.001` |" in out.stdout
    assert "failed: optimizer.lr=-1.0 must be > 0" in out.stdout
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    assert (sweep / "summary.csv").is_file() and (sweep / "0" / "results.json").is_file()
