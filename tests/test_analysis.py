"""The ablation analysis: sweep folders read back into tables and plots with the right numbers,
and the length-generalisation evaluation; the statistics of gptlab.analysis (Welch's test, its
intervals, the optimum over a grid) against scipy, numpy and hand computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from experiments.ablations.analyze import analyze, group_by_variant
from experiments.ablations.length_generalisation import (
    evaluate_job,
    length_table,
    loss_by_position,
)
from experiments.ablations.welch_tests import claimed_differences
from gptlab.analysis import (
    GridOptimum,
    claims_table,
    compare_seeds,
    comparison_table,
    count_params,
    find_sweep,
    grid_optimum,
    group_runs,
    load_runs,
    load_sweep,
    lowest_vertex,
    mean_std_text,
    read_scalars,
    student_t_cdf,
    student_t_quantile,
    welch,
)
from gptlab.data.datamodule import GPTDataModule
from gptlab.training.lit_gpt import next_token_loss
from tests.kit import TINY, tiny_config, tiny_gpt, write_checkpoint, write_run_folder

# One layer of width 16 on the tiny data's vocabulary: the parameter counts in the table below
# are worked out for it.
ONE_LAYER = {"vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 16}


def write_job(
    sweep: Path,
    num: int,
    position: str,
    seed: int,
    val_losses: list[float],
    data_dir: Path | str = "unused",
) -> None:
    """A sweep job folder as gptlab-train -m leaves it: overrides, config, events, checkpoint."""
    job = sweep / str(num)
    overrides = [f"model/position={position}", f"seed={seed}", "experiment=position_ablation"]
    write_run_folder(job, overrides)
    (job / ".hydra" / "config.yaml").write_text(f"data:\n  loader:\n    data_dir: {data_dir}\n")
    writer = SummaryWriter(str(job / "tensorboard"))
    for i, loss in enumerate(val_losses):
        writer.add_scalar("loss/val", loss, 10 * (i + 1))
    for step, tps in enumerate([100.0, 1000.0 * seed, 1000.0 * seed]):  # median: 1000 * seed
        writer.add_scalar("perf/tokens_per_sec", tps, step)
    for layer, sink in enumerate([0.2, 0.4]):
        writer.add_scalar(f"model/attention_sink/layer_{layer}", sink, 30)
        writer.add_scalar(f"model/attention_entropy/layer_{layer}", 1.0 + layer, 30)
    writer.close()
    model = tiny_gpt(seed, **ONE_LAYER, position=position)
    (job / "checkpoints").mkdir()
    write_checkpoint(job / "checkpoints" / "last.ckpt", model, tokenizer_json=None)


def test_table_and_plot_of_a_sweep(tmp_path):
    sweep = tmp_path / "logs" / "position_ablation" / "multiruns" / "2026-01-01_00-00-00"
    write_job(sweep, 0, "rope", 1, [5.0, 3.0])
    write_job(sweep, 1, "rope", 2, [5.0, 3.2])
    write_job(sweep, 2, "learned", 1, [5.0, 4.0])
    write_job(sweep, 3, "learned", 2, [5.0, 4.0])
    (sweep / "4").mkdir()  # a job that never started: no .hydra, ignored
    assert find_sweep(tmp_path / "logs", "position_ablation") == sweep
    assert list(group_by_variant(load_sweep(sweep))) == ["rope", "learned"]

    summaries = analyze("position_ablation", sweep, tmp_path / "out")
    rope, learned = summaries
    assert rope.val_loss == pytest.approx((3.1, 0.1414), abs=1e-4)
    assert learned.val_loss == pytest.approx((4.0, 0.0))
    assert rope.tokens_per_sec == pytest.approx((1500.0, 707.1), abs=0.1)
    assert rope.curve == {10: [5.0, 5.0], 20: pytest.approx([3.0, 3.2])}
    assert (rope.sink, rope.entropy) == (pytest.approx(0.3), pytest.approx(1.5))
    rope_config = tiny_config(**ONE_LAYER, position="rope")
    assert rope.params == count_params(rope_config)
    assert learned.params == rope.params + rope_config.block_size * rope_config.n_embd
    table = (tmp_path / "out" / "position_ablation.md").read_text()
    rope_row = "| rope | 11,504 | 3.100 ± 0.141 (n=2) | +0.000 | – | 1,500 ± 707 | 1.50 | 0.300 |"
    assert rope_row in table
    # Welch by hand: se = 0.1 (0.141 / sqrt 2, and 0), t = 9 with df = 1: P(|T| > 9) for the
    # Cauchy distribution = 1 - 2 atan(9) / pi = 0.0704.
    assert "| learned | 11,760 | 4.000 ± 0.000 (n=2) | +0.900 | 0.07 |" in table
    assert (tmp_path / "out" / "position_ablation.png").stat().st_size > 10_000


def test_loss_by_position_averages_to_the_mean_loss(tiny_data_dir):
    model = tiny_gpt(**ONE_LAYER, position="alibi")
    batches = list(GPTDataModule(tiny_data_dir, 32, batch_size=8, val_windows=36).val_dataloader())
    by_position = loss_by_position(model, batches)
    assert by_position.shape == (32,)
    with torch.no_grad():  # batches may differ in size: weight each by its windows
        total = sum(next_token_loss(model(x), y) * len(x) for x, y in batches)
    torch.testing.assert_close(by_position.mean(), total / sum(len(x) for x, _ in batches))


def test_length_evaluation_runs_past_block_size_except_learned(tiny_data_dir, tmp_path):
    write_job(tmp_path, 0, "rope", 1, [4.0], data_dir=tiny_data_dir)
    write_job(tmp_path, 1, "learned", 1, [4.0], data_dir=tiny_data_dir)
    rope, learned = load_sweep(tmp_path)
    losses = evaluate_job(rope, factor=2)
    assert losses.shape == (2 * TINY["block_size"],) and torch.isfinite(losses).all()
    assert evaluate_job(learned, factor=2) == "n/a: the learned table has 16 positions"


def test_length_table_compares_beyond_with_the_late_range():
    # Positions 1-4 at 3.0, 5-8 (late in range) at 2.0, 9-16 (beyond) at 2.5; a second seed +1.
    run = torch.cat([torch.full((4,), 3.0), torch.full((4,), 2.0), torch.full((8,), 2.5)])
    table = length_table({"rope": [run, run + 1], "learned": ["n/a: why"]}, 8, 2)
    assert "| rope | 3.000 ± 0.707 | 2.500 ± 0.707 | 3.000 ± 0.707 | +0.500 ± 0.000 |" in table
    assert "| learned | n/a: why |" in table


def test_runs_logged_under_the_old_tag_names_read_under_the_new(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for old in ("val/loss", "train/loss", "val/ppl", "val/acc", "attention/sink/layer_3"):
        writer.add_scalar(old, 1.5, 7)
    writer.add_scalar("perf/mfu", 0.4, 7)
    writer.close()
    assert set(read_scalars(tmp_path)) == {
        "loss/val",
        "loss/train",
        "loss/val_ppl",
        "accuracy/val",
        "model/attention_sink/layer_3",
        "perf/mfu",
    }
    assert read_scalars(tmp_path)["loss/val"] == [(7, 1.5)]


@pytest.mark.parametrize(
    ("t", "df", "upper_tail"),  # printed t-tables: P(T > t) for these critical values
    [
        (2.228, 10, 0.025),
        (1.812, 10, 0.05),
        (3.182, 3, 0.025),
        (12.706, 1, 0.025),
        (1.96, 1e6, 0.025),
    ],
)
def test_student_t_tail_matches_printed_tables(t, df, upper_tail):
    assert 1 - student_t_cdf(t, df) == pytest.approx(upper_tail, abs=2e-4)
    assert student_t_cdf(-t, df) == pytest.approx(upper_tail, abs=2e-4)


def test_welch_test_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [4.0, 4.1, 3.95], [4.2, 4.25, 4.3, 4.18]
    result = compare_seeds(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False, alternative="less")
    assert result.t == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p_less == pytest.approx(reference.pvalue, rel=1e-9)
    assert "is lower" in result.describe()
    assert "within seed noise" in compare_seeds([4.0, 4.3], [4.1, 4.2]).describe()
    with pytest.raises(ValueError, match=">= 2 runs a side"):
        compare_seeds([4.0], [4.1, 4.2])


def test_welch_from_summary_statistics_matches_the_raw_values_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = [4.0, 4.1, 3.95], [4.2, 4.25, 4.3, 4.18]
    from_values = compare_seeds(a, b)
    from_summary = welch(
        from_values.mean_a, from_values.sd_a, 3, from_values.mean_b, from_values.sd_b, 4
    )
    assert from_summary == from_values
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert from_values.p_two_sided == pytest.approx(reference.pvalue, rel=1e-9)
    for level in (0.95, 0.9):
        interval = reference.confidence_interval(level)
        assert from_values.interval(level) == pytest.approx((interval.low, interval.high))


def test_student_t_quantile_matches_printed_tables():
    assert student_t_quantile(0.975, 10) == pytest.approx(2.228, abs=1e-3)
    assert student_t_quantile(0.95, 3) == pytest.approx(2.353, abs=1e-3)
    assert student_t_quantile(0.025, 1) == pytest.approx(-12.706, abs=1e-3)
    with pytest.raises(ValueError, match="0 < p < 1"):
        student_t_quantile(1.0, 3)


def test_comparison_table_by_hand():
    # a = [1, 3]: mean 2, sd sqrt(2); b = [0, 0, 0]: sd 0. So se = 1, t = 2 and df = 1, where
    # Student's t is the Cauchy distribution: P(|T| > 2) = 1 - 2 atan(2) / pi = 0.2952, and the
    # 95% interval is 2 +- 12.706 (the printed table's t for df = 1).
    table = comparison_table({"x vs y": compare_seeds([1.0, 3.0], [0.0, 0.0, 0.0])})
    row = table.splitlines()[2]
    assert row.startswith("| x vs y | 2.000 ± 1.414 (n=2) | 0.000 ± 0.000 (n=3) | +2.000 |")
    assert "[-10.706, +14.706]" in row and "| 2.00 (1.0) | 0.295 |" in row


def test_verdicts_of_claims_by_hand():
    # a = [1, 2, 3], b = [4, 5, 6]: sd 1 each, se = sqrt(2 / 3), t = -3 / se = -3.674 and
    # df = (2/3)^2 / (2 (1/3)^2 / 2) = 4, where Student's t has the closed form
    # P(T <= t) = 1/2 + 3/4 s (1 - s^2 / 3) with s = t / sqrt(4 + t^2): p = 0.0107.
    lower = compare_seeds([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert lower.p_less == pytest.approx(0.0107, abs=1e-4)
    assert lower.verdict() == "a lower"
    assert compare_seeds([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]).verdict() == "a higher"
    # b = a + 0.5: t = -0.5 / se = -0.612, so p = 0.287: within seed noise.
    noise = compare_seeds([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert noise.p_less == pytest.approx(0.287, abs=1e-3)
    assert noise.verdict() == "within seed noise"
    table = comparison_table({"x vs y": lower, "u vs v": noise}, verdicts=True)
    assert table.splitlines()[0].endswith("| p (one-sided, a < b) | verdict (5%) |")
    assert table.splitlines()[2].endswith("| 0.0213 | 0.0107 | a lower |")
    assert table.splitlines()[3].endswith("| 0.573 | 0.287 | within seed noise |")
    assert "verdict" not in comparison_table({"x vs y": lower})
    claims = claims_table({"x vs y": ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), "z vs y": ([1.0], [4.0])})
    assert claims.splitlines()[2].endswith("| 0.0107 | a lower |")
    assert claims.endswith("\nNot tested (fewer than 2 finished runs a side): z vs y.\n")


def test_mean_std_text():
    assert mean_std_text([3.0, 3.2]) == "3.100 ± 0.141 (n=2)"
    assert mean_std_text([1.0, 2.0, 3.0], digits=1) == "2.0 ± 1.0 (n=3)"


def test_grid_optimum_finds_the_vertex_of_a_parabola():
    grid = [-2.0, -1.0, 0.0, 1.0, 2.0]
    values = [[(x - 0.3) ** 2 + 4.0] * 3 for x in grid]  # no seed noise: a zero-width interval
    optimum = grid_optimum(grid, values)
    assert optimum == GridOptimum(best=0.0, fitted=pytest.approx(0.3), low=pytest.approx(0.3),
                                  high=pytest.approx(0.3), at_edge=False)  # fmt: skip


def test_grid_optimum_fits_the_three_points_around_the_minimum_like_polyfit():
    np = pytest.importorskip("numpy")
    grid = [0.0, 1.0, 2.5, 3.0, 5.0]  # uneven spacing, a skewed curve
    means = [5.0, 4.2, 4.0, 4.3, 6.0]
    a, b, _ = np.polyfit(grid[1:4], means[1:4], 2)
    assert lowest_vertex(grid, means) == pytest.approx(-b / (2 * a))


def test_grid_optimum_at_an_edge_and_its_interval_over_noisy_seeds():
    grid = [-3.0, -2.0, -1.0]
    falling = grid_optimum(grid, [[5.0, 5.1], [4.5, 4.6], [4.0, 4.1]])
    assert falling.at_edge and falling.best == falling.fitted == -1.0
    noisy = [[4.3, 4.5, 4.4], [4.0, 4.2, 4.05], [4.1, 4.0, 4.3]]
    optimum = grid_optimum(grid, noisy, resamples=500)
    assert -3.0 <= optimum.low < optimum.fitted < optimum.high <= -1.0
    assert grid_optimum(grid, noisy, resamples=500) == optimum  # seeded: the same every time
    assert grid_optimum([1.0, 2.0], [[4.1], [4.0]]).at_edge  # too few points to fit
    with pytest.raises(ValueError, match="increasing grid"):
        grid_optimum([0.0, 2.0, 1.0], noisy)


def test_load_runs_reads_sweep_jobs_and_single_runs_at_any_depth(tmp_path):
    write_run_folder(tmp_path / "a" / "2026-01-01" / "0", ["lr=0.1", "seed=1"], {"val_loss": 4.0})
    write_run_folder(tmp_path / "a" / "2026-01-01" / "1", ["lr=0.1", "seed=2"], None, "diverged")
    write_run_folder(tmp_path / "b" / "single", ["lr=0.2", "seed=1"], {"val_loss": 3.5})
    write_run_folder(tmp_path / "b" / "killed", ["lr=0.2", "seed=2"], None)
    runs = load_runs(tmp_path)
    assert [r.path.relative_to(tmp_path).as_posix() for r in runs] == [
        "a/2026-01-01/0", "a/2026-01-01/1", "b/killed", "b/single",
    ]  # fmt: skip
    assert [r.results and r.results["val_loss"] for r in runs] == [4.0, None, None, 3.5]
    assert [r.error for r in runs] == [None, "diverged", None, None]
    groups = group_runs(runs, ["lr"])
    assert {k: [r.overrides["seed"] for r in v] for k, v in groups.items()} == {
        ("0.1",): ["1", "2"],
        ("0.2",): ["2", "1"],
    }
    assert load_runs(tmp_path / "missing") == []


def test_the_ablation_claims_are_tested_from_the_shipped_tables():
    comparisons = claimed_differences()
    # rope 5.618 ± 0.026 vs learned 5.943 ± 0.074, 3 seeds each, by hand:
    # se = sqrt(0.026^2 / 3 + 0.074^2 / 3) = 0.04529, t = -0.325 / se = -7.18.
    rope = comparisons["position: rope vs learned"]
    assert (rope.n_a, rope.n_b) == (3, 3)
    assert rope.t == pytest.approx(-7.177, abs=1e-3)
    alibi = comparisons["beyond − late: alibi vs none"]  # a table without "(n=...)"
    assert (alibi.mean_a, alibi.sd_b, alibi.n_b) == (0.011, 0.009, 3)
