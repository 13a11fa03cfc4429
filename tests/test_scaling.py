"""Scaling-law sweeps: run planning, skip/resume, and fits that recover known constants."""

from __future__ import annotations

import json
import math

import lightning as L
import numpy as np
import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.cli.train import train
from gptlab.data.manifest import load_manifest
from gptlab.model import GPT, GPTConfig
from gptlab.scaling.analyze import analyze, read_runs_csv
from gptlab.scaling.fit import (
    ChinchillaLaw,
    KaplanLaw,
    PowerLaw,
    Runs,
    bootstrap_intervals,
    fit_isoflops,
    fit_law,
    residual_resampler,
)
from gptlab.scaling.plan import (
    RESULT_FILE,
    ScalingConfig,
    format_flops,
    model_shape,
    plan_run,
    plan_scaling_run,
)
from tests.kit import REPO, compose_config

# Hoffmann et al.'s fitted constants, and Kaplan et al.'s, as ground truth for synthetic data.
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
KAPLAN = KaplanLaw(n_c=8.8e13, d_c=5.4e13, alpha_n=0.076, alpha_d=0.095)
BUDGETS = (1e11, 3e11, 1e12, 3e12, 1e13)
SIZES = (2e4, 5e4, 1e5, 2e5, 5e5, 1e6)
FLOPS_PER_PARAM = 6.6  # flops_per_token = 6.6 N: 6 N plus 10% attention


def synthetic_runs(loss_of) -> Runs:
    """A budgets x sizes grid of runs, D = C / flops_per_token, losses from `loss_of(runs)`."""
    grid = np.array([(c, n) for c in BUDGETS for n in SIZES])
    budget, params = grid[:, 0], grid[:, 1]
    runs = Runs(
        budget=budget,
        params=params,
        non_embedding_params=0.8 * params,
        tokens=budget / (FLOPS_PER_PARAM * params),
        flops_per_token=FLOPS_PER_PARAM * params,
        loss=np.zeros(len(grid)),
    )
    return runs.with_loss(loss_of(runs))


def chinchilla_runs() -> Runs:
    return synthetic_runs(lambda r: CHINCHILLA.loss(r.params, r.tokens))


# ----------------------------------------------------------------------------- planning


def test_shape_rules_and_run_names():
    rules = ScalingConfig(budget=1e12, aspect_ratio=32, head_size=16)
    assert model_shape(16, rules) == (1, 1)
    assert model_shape(128, rules) == (4, 8)
    with pytest.raises(ValueError, match="n_embd=40.*head_size=16"):
        model_shape(40, rules)
    with pytest.raises(ValueError, match="scaling.budget"):
        ScalingConfig(budget=0)
    assert [format_flops(c) for c in (1e11, 3e12, 2.5e11)] == ["1e11", "3e12", "2.5e11"]


def test_plan_spends_the_budget_in_whole_steps():
    model = {"vocab_size": 512, "block_size": 128, "n_layer": 2, "n_head": 4, "n_embd": 64}
    plan = plan_run(ScalingConfig(budget=1e12), model, tokens_per_step=1024, train_tokens=10**7)
    # Hand count: 6N + attention with N = body + LM head (the tied embedding).
    body = 2 * (12 * 64**2 + 13 * 64) + 2 * 64  # 2 blocks (weights, biases, norms) + final norm
    assert plan.non_embedding_params == body
    assert plan.params == body + 512 * 64 + 128 * 64  # + embedding + position table
    # 6 x the weight matrices (2 blocks of 12 d^2, the head) + attention's 12 n_layer T d.
    assert plan.flops_per_token == 6 * 2 * 12 * 64**2 + 6 * 64 * 512 + 12 * 2 * 128 * 64
    assert plan.steps == int(1e12 // (plan.flops_per_token * 1024))
    assert plan.tokens == plan.steps * 1024
    assert 1e12 - plan.flops_per_token * 1024 < plan.flops <= 1e12
    assert plan.warmup_steps == round(0.05 * plan.steps)
    assert plan.epochs == pytest.approx(plan.tokens / 10**7)
    assert plan.skip_reason is None

    too_big = plan_run(ScalingConfig(budget=1e10), model, 1024, 10**7)
    assert "min_steps" in too_big.skip_reason
    too_small = plan_run(ScalingConfig(budget=1e12), model, 1024, 10**5)
    assert "max_epochs" in too_small.skip_reason


def test_fixed_warmup_steps_are_every_budgets_warmup():
    model = {"vocab_size": 512, "block_size": 128, "n_layer": 2, "n_head": 4, "n_embd": 64}
    plans = [
        plan_run(ScalingConfig(budget=c, warmup_steps=30), model, 1024, 10**7) for c in (1e11, 1e12)
    ]
    assert [p.warmup_steps for p in plans] == [30, 30] and plans[0].steps < plans[1].steps
    by_fraction = plan_run(ScalingConfig(budget=1e12), model, 1024, 10**7)
    assert by_fraction.warmup_steps == round(0.05 * by_fraction.steps) != 30
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"scaling.warmup_steps=.* must be null or an int"):
            ScalingConfig(budget=1e12, warmup_steps=bad)


# ----------------------------------------------------------------------------- sweep runs


def sweep_config(tiny_data_dir, tmp_path, *extra: str):
    overrides = [
        "experiment=scaling_law",
        f"corpus.dir={tiny_data_dir}",
        "model.block_size=32",
        "model.n_embd=32",
        "data.loader.val_windows=16",
        "scaling.min_steps=10",
        "scaling.budget=1e9",  # ~20 steps of 256 tokens for this model
        *extra,
    ]
    return compose_config("train", overrides, tmp_path)


def test_sweep_run_records_n_d_c_and_is_skipped_when_finished(tiny_data_dir, tmp_path):
    results = train(sweep_config(tiny_data_dir, tmp_path))
    record = json.loads((tmp_path / RESULT_FILE).read_text())
    assert record["status"] == "finished" and results["step"] == record["steps"] >= 10
    assert (record["n_layer"], record["n_head"]) == (1, 2)  # from the depth and head rules
    assert record["tokens"] == record["steps"] * 8 * 32
    assert record["flops"] == pytest.approx(record["tokens"] * record["flops_per_token"])
    assert record["flops"] <= 1e9 and math.isfinite(record["val_loss"])
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert events.Scalars("scaling/params")[0].value == record["params"]
    assert {"scaling/tokens", "scaling/flops", "scaling/non_embedding_params"} <= set(
        events.Tags()["scalars"]
    )

    # Resuming the sweep: the finished run is returned as it was, without training again.
    again = train(sweep_config(tiny_data_dir, tmp_path))
    assert again == json.loads((tmp_path / RESULT_FILE).read_text()) == record
    # ... unless its settings changed: then it refuses rather than mix two studies.
    with pytest.raises(ValueError, match="optimizer"):
        train(sweep_config(tiny_data_dir, tmp_path, "optimizer.lr=1e-4"))


class TokenCounter(L.Callback):
    """Counts the input tokens of every training micro-batch: the D a run really trained on."""

    tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens += batch[0].numel()


@pytest.mark.parametrize(
    "batching",
    [
        ["global_batch_tokens=256"],  # 2 micro-batches of 8 x 16 tokens per step
        ["trainer.accumulate_grad_batches=2"],
    ],
)
def test_sweep_records_the_tokens_and_flops_it_trained(tiny_data_dir, tmp_path, batching):
    counter = TokenCounter()
    cfg = sweep_config(tiny_data_dir, tmp_path, "data.loader.block_size=16", *batching)
    train(cfg, extra_callbacks=[counter])
    record = json.loads((tmp_path / RESULT_FILE).read_text())
    assert record["status"] == "finished" and record["tokens_per_step"] == 2 * 8 * 16
    assert record["tokens"] == counter.tokens == record["steps"] * 256
    # Attention FLOPs at the length of the sequences trained on, not the model's block_size.
    model = GPTConfig.from_dict(record["settings"]["model"])
    expected = GPT(model).flops_per_token(seq_len=16)
    assert record["flops_per_token"] == expected < GPT(model).flops_per_token()
    assert record["flops"] == pytest.approx(counter.tokens * expected)

    both = ["global_batch_tokens=256", "trainer.accumulate_grad_batches=2"]
    with pytest.raises(ValueError, match="not both"):
        train(sweep_config(tiny_data_dir, tmp_path / "both", *both))


def test_a_fixed_warmup_reaches_the_scheduler_and_the_runs_settings(tiny_data_dir, tmp_path):
    cfg = sweep_config(tiny_data_dir, tmp_path, "scaling.warmup_steps=3")
    planned, run = plan_scaling_run(cfg, load_manifest(cfg.data.loader.data_dir))
    assert planned.scheduler.warmup_steps == run.plan.warmup_steps == 3
    assert run.settings["scheduler"]["warmup_steps"] == 3


def test_sweep_skips_a_model_too_big_for_its_budget(tiny_data_dir, tmp_path):
    result = train(sweep_config(tiny_data_dir, tmp_path, "scaling.budget=1e8"))
    assert result["status"] == "skipped" and "min_steps" in result["skip_reason"]
    assert not (tmp_path / "tensorboard").exists()  # nothing was trained


def test_fast_dev_run_of_the_sweep_config_is_not_recorded(tiny_data_dir, tmp_path):
    # A budget the rules would skip still gets its one smoke-test step.
    results = train(
        sweep_config(tiny_data_dir, tmp_path, "scaling.budget=1e8", "debug=fast_dev_run")
    )
    assert results["step"] == 1
    assert not (tmp_path / RESULT_FILE).exists()


# ----------------------------------------------------------------------------- fits


def test_parametric_fit_recovers_chinchilla_constants():
    law = fit_law(ChinchillaLaw, chinchilla_runs(), starts=2)
    assert law.alpha == pytest.approx(0.34, abs=2e-3)
    assert law.beta == pytest.approx(0.28, abs=2e-3)
    constants = (law.E, law.A, law.B)
    assert constants == pytest.approx((1.69, 406.4, 410.7), rel=1e-2)
    assert law.a == pytest.approx(0.28 / 0.62, abs=2e-3)


def test_parametric_fit_shrugs_off_an_outlier():
    runs = chinchilla_runs()
    loss = runs.loss.copy()
    loss[7] *= 1.3  # a diverged run: Huber on log-loss barely moves the fit
    law = fit_law(ChinchillaLaw, runs.with_loss(loss), starts=2)
    assert law.alpha == pytest.approx(0.34, abs=0.01)
    assert law.beta == pytest.approx(0.28, abs=0.01)


def test_kaplan_fit_recovers_its_exponents():
    runs = synthetic_runs(lambda r: KAPLAN.loss(r.non_embedding_params, r.tokens))
    law = fit_law(KaplanLaw, runs, starts=2)
    assert law.alpha_n == pytest.approx(0.076, abs=1e-3)
    assert law.alpha_d == pytest.approx(0.095, abs=1e-3)


def parabola_runs(a: float, noise: float = 0.0, seed: int = 0) -> Runs:
    """isoFLOP losses that are exact parabolas in ln N around N_opt = 0.05 C^a, plus noise."""
    rng = np.random.default_rng(seed)

    def loss_of(r: Runs) -> np.ndarray:
        n_opt = 0.05 * r.budget**a
        bottom = 10 * r.budget**-0.05
        return bottom + 0.1 * np.log(r.params / n_opt) ** 2 + rng.normal(0, noise, len(r))

    return synthetic_runs(loss_of)


def test_isoflop_fit_recovers_exponents():
    fit = fit_isoflops(parabola_runs(a=0.55))
    assert fit.a == pytest.approx(0.55, abs=1e-9)
    assert fit.b == pytest.approx(0.45, abs=1e-9)  # D = C / (6.6 N)
    assert fit.tokens_per_param(1e12) == pytest.approx(1e12 / 6.6 / (0.05 * 1e12**0.55) ** 2)
    assert all(curve.inside for curve in fit.curves)


def test_isoflop_bootstrap_intervals_cover_the_truth():
    covered, widths = 0, []
    for seed in range(20):
        noisy = parabola_runs(a=0.55, noise=0.01, seed=seed)
        fit = fit_isoflops(noisy)
        intervals, failed = bootstrap_intervals(
            lambda r: {"a": fit_isoflops(r).a}, residual_resampler(noisy, fit), 50, seed=seed
        )
        lo, hi = intervals["a"]
        covered += lo < 0.55 < hi
        widths.append(hi - lo)
        assert failed == 0
    assert covered >= 16  # nominal 95%: a too-narrow interval would miss far more often
    assert 0.005 < np.median(widths) < 0.1


def test_power_law_fit():
    law = PowerLaw.fit(np.array([1.0, 10.0, 100.0]), np.array([2.0, 20.0, 200.0]))
    assert (law.coef, law.exponent) == pytest.approx((2.0, 1.0))


# ----------------------------------------------------------------------------- analysis


def write_sweep(runs: Runs, sweep_dir, seed: int = 0) -> None:
    """Result files as a sweep writes them, one directory per run."""
    for i in range(len(runs)):
        run_dir = sweep_dir / f"run{i}-s{seed}"
        run_dir.mkdir(parents=True)
        record = {
            "status": "finished",
            "budget": runs.budget[i],
            "n_embd": 16 * (1 + i % len(SIZES)),
            "n_layer": 1,
            "n_head": 1,
            "params": runs.params[i],
            "non_embedding_params": runs.non_embedding_params[i],
            "flops_per_token": runs.flops_per_token[i],
            "steps": 100,
            "tokens": runs.tokens[i],
            "flops": runs.budget[i],
            "epochs": 0.5,
            "val_loss": runs.loss[i],
            "settings": {"seed": seed},
        }
        (run_dir / RESULT_FILE).write_text(json.dumps(record))
    (sweep_dir / "skipped").mkdir(exist_ok=True)
    (sweep_dir / "skipped" / RESULT_FILE).write_text(
        json.dumps({"status": "skipped", "budget": 1e11, "params": 1e7, "n_embd": 512})
    )


def analysis_config(tmp_path, **changes):
    values = {
        "sweep_dir": str(tmp_path / "sweep"),
        "runs_csv": None,
        "out_dir": str(tmp_path / "out"),
        "tensorboard_dir": str(tmp_path / "tb"),
        "starts": 1,
        "bootstrap": 2,
        "seed": 0,
    }
    return OmegaConf.create(values | changes)


def test_analysis_fits_holds_out_plots_and_logs(tmp_path):
    write_sweep(chinchilla_runs(), tmp_path / "sweep")
    results = analyze(analysis_config(tmp_path))
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "runs.csv",
        "fits.json",
        "report.md",
        "isoflop.png",
        "optimal.png",
        "predicted.png",
        "kaplan.png",
    }
    assert results["summary"]["approach3"]["alpha"] == pytest.approx(0.34, abs=5e-3)
    # Exact synthetic data: a law fitted without the largest budget predicts it exactly.
    assert results["holdout"]["budget"] == 1e13
    assert results["holdout"]["approach3"]["max_abs_error"] < 1e-3
    assert "n_embd=512" in (out / "report.md").read_text()  # skipped runs are listed
    assert len(read_runs_csv(out / "runs.csv")) == len(SIZES) * len(BUDGETS)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert "scaling/report/text_summary" in events.Tags()["tensors"]
    assert "scaling/isoflop" in events.Tags()["images"]


def test_point_means_average_each_points_seeds():
    runs = chinchilla_runs()
    both = Runs(**{f: np.concatenate([getattr(runs, f)] * 2) for f in runs.__dataclass_fields__})
    noisy = both.with_loss(both.loss + np.repeat([0.05, -0.03], len(runs)))
    means = noisy.point_means()
    assert len(means) == len(runs)
    order = np.lexsort((runs.params, runs.budget))  # point_means sorts by budget, then N
    assert means.params == pytest.approx(runs.params[order])
    assert means.loss == pytest.approx(runs.loss[order] + 0.01)


def test_analysis_of_several_seeds_in_both_n_conventions(tmp_path):
    """Two seeds per point; at the held-out budget they lie 0.1 nats above and below the law:
    each run is off by 2-3%, their mean is on it, and the held-out test compares with means."""
    runs = chinchilla_runs()
    held_out = runs.budget == runs.budget.max()
    for seed, offset in ((1, 0.1), (2, -0.1)):
        write_sweep(runs.with_loss(runs.loss + offset * held_out), tmp_path / "sweep", seed)
    results = analyze(analysis_config(tmp_path, n_params="both"))
    assert results["n_params"] == "both"
    for convention in ("total", "non_embedding"):
        held = results[convention]["holdout"]
        assert held["approach3"]["mean_abs_rel_error"] < 1e-3
        assert set(held["n_opt_rel_error"]) == {"approach2", "approach3"}
    # Non-embedding N is 0.8 x N here: approach 2's optimum moves by that factor.
    minima = {c: results[c]["isoflop_minima"][0]["n_opt"] for c in ("total", "non_embedding")}
    assert minima["non_embedding"] == pytest.approx(0.8 * minima["total"], rel=1e-6)
    out = tmp_path / "out"
    assert {"isoflop_non_embedding.png", "optimal_non_embedding.png"} <= {
        p.name for p in out.iterdir()
    }
    report = (out / "report.md").read_text()
    assert f"{2 * len(runs)} runs at {len(runs)} (budget, N) points, 2 to 2 per point" in report
    assert "(n_params=total)" in report and "(n_params=non_embedding)" in report
    assert "approach3, losses (seed means per point): 0.0% (met)" in report
    assert {row["seed"] for row in read_runs_csv(out / "runs.csv")} == {1.0, 2.0}


def test_a_runs_csv_without_seeds_still_reads():
    rows = read_runs_csv(REPO / "experiments" / "scaling_laws" / "runs.csv")
    assert len(rows) == 23 and "seed" not in rows[0]


def test_n_params_chooses_what_n_counts_in_approaches_2_and_3():
    from gptlab.scaling.analyze import CSV_COLUMNS, runs_from_rows

    sizes = [{"params": 100.0 * i, "non_embedding_params": 40.0 * i} for i in (1, 2)]
    rows = [dict.fromkeys(CSV_COLUMNS, 1.0) | size for size in sizes]
    assert runs_from_rows(rows).params.tolist() == [100.0, 200.0]
    non_embedding = runs_from_rows(rows, "non_embedding")
    assert non_embedding.params.tolist() == [40.0, 80.0]
    assert non_embedding.non_embedding_params.tolist() == [40.0, 80.0]
    with pytest.raises(ValueError, match=r"n_params='all'; expected one of \['non_embedding', "):
        runs_from_rows(rows, "all")
