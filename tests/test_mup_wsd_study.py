"""The μP + WSD scaling study's launcher (experiments/scaling_laws/mup_wsd_run.py): its plan
(which runs, which branch points, the skip rules), the choice of the base LR and init std, and a
smoke run of the whole study on the tiny data, each gptlab-train run made in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.scaling_laws import mup_wsd_run as study
from gptlab.cli.train import train
from gptlab.scaling.plan import RESULT_FILE
from tests.kit import compose_config

# Budgets of 11 to 119 steps of 8 x 32 tokens for widths 16 and 32 on the tiny data (213k
# training tokens). max_epochs=0.1 skips the 16-wide model at 3e9 (0.14 epochs), min_steps=10
# the 32-wide one at 3e8 (4 steps).
TINY_STUDY = ["--widths", "16", "32", "--budgets", "3e8", "1e9", "3e9", "--seeds", "1"]
TINY_RULES = ["scaling.min_steps=10", "scaling.max_epochs=0.1", "scaling.warmup_steps=2"]


def study_args(tiny_data_dir: Path, log_dir: Path, *extra: str):
    runs = [f"corpus.dir={tiny_data_dir}", "model.block_size=32", "data.loader.val_windows=16"]
    runs += ["callbacks.throughput=null", *TINY_RULES]
    return study.parse_args([*TINY_STUDY, "--log-dir", str(log_dir), *extra, "--set", *runs])


def names(points) -> list[str]:
    return [p.run_dir.name for p in points]


def test_the_plan_keeps_one_stable_run_per_width_and_branches_the_other_budgets(
    tiny_data_dir, tmp_path
):
    args = study_args(tiny_data_dir, tmp_path)
    plans = study.plan_sweep(
        study.Planner(study.common_overrides(args)), args, study.Base(1e-3, None)
    )
    by_width = {p.width: p for p in plans}
    narrow, wide = by_width[16], by_width[32]
    # The largest budget the rules leave is the stable run; the rules' reasons are kept.
    assert narrow.stable.run_dir.name == "C1e9-d16-s1" and names(narrow.branches) == ["C3e8-d16-s1"]
    assert (
        names(narrow.skipped) == ["C3e9-d16-s1"]
        and "max_epochs" in narrow.skipped[0].plan.skip_reason
    )
    assert wide.stable.run_dir.name == "C3e9-d32-s1" and names(wide.branches) == ["C1e9-d32-s1"]
    assert "min_steps" in wide.skipped[0].plan.skip_reason
    # Each branch leaves the stable run where its own WSD decay (20% of its steps) begins.
    for plan in plans:
        for point in [plan.stable, *plan.branches]:
            assert point.decay_steps == round(0.2 * point.plan.steps)
            assert point.branch_step == point.plan.steps - point.decay_steps
            assert point.plan.warmup_steps == 2
        assert all(b.branch_step <= plan.stable.branch_step for b in plan.branches)
    assert narrow.steps_trained == narrow.stable.plan.steps + narrow.branches[0].decay_steps
    assert narrow.steps_dedicated == narrow.stable.plan.steps + narrow.branches[0].plan.steps
    assert all(p.run_dir.parent == tmp_path / "scaling_law_mup" / "mup_wsd_init" / "runs" for p in
               [narrow.stable, *narrow.branches, *narrow.skipped])  # fmt: skip


def finished(run_dir: Path, val_loss: float) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / RESULT_FILE).write_text(json.dumps({"status": "finished", "val_loss": val_loss}))


def tuning_points(tiny_data_dir, tmp_path, lrs: list[str], init_stds: list[str]):
    grid = ["--lrs", *lrs, "--init-stds", *init_stds, "--tuning-budget", "1e9"]
    args = study_args(tiny_data_dir, tmp_path, *grid)
    return args, study.tuning_points(study.Planner(study.common_overrides(args)), args)


def grid_of(points) -> list[tuple[float, float]]:
    return [(p.overrides["optimizer.lr"], p.overrides["model.init_std"]) for p in points]


def test_the_base_is_the_lowest_loss_of_the_lr_by_init_grid(tiny_data_dir, tmp_path):
    lrs, init_stds = ["0.004", "0.001", "0.002"], ["0.2", "0.05", "0.1"]
    args, points = tuning_points(tiny_data_dir, tmp_path, lrs, init_stds)
    assert grid_of(points) == [(lr, s) for lr in (0.001, 0.002, 0.004) for s in (0.05, 0.1, 0.2)]
    assert {p.overrides["model.n_embd"] for p in points} == {16}  # the base width
    assert len({p.run_dir for p in points}) == 9
    losses = [4.0, 3.9, 4.1, 3.6, 3.5, 3.7, 3.8, 3.75, 3.9]  # lowest: lr 0.002, init 0.1
    for point, loss in zip(points, losses, strict=True):
        finished(point.run_dir, loss)
    assert study.choose_base(points, args) == study.Base(lr=0.002, init_std=0.1)
    tuned = json.loads(
        (tmp_path / "scaling_law_mup" / "mup_wsd_init" / study.TUNED_FILE).read_text()
    )
    assert [r["val_loss"] for r in tuned["runs"]] == losses and tuned["at_edge"] == []
    # Every later run trains at the base's LR and init std.
    plans = study.plan_sweep(
        study.Planner(study.common_overrides(args)), args, study.Base(0.002, 0.1)
    )
    assert {(p.stable.overrides["optimizer.lr"], p.stable.overrides["model.init_std"])
            for p in plans} == {(0.002, 0.1)}  # fmt: skip


@pytest.mark.parametrize(
    ("best", "axis"), [(1, "--lrs"), (5, "--init-stds"), (8, "--lrs and --init-stds")]
)
def test_a_base_at_an_end_of_either_axis_is_refused(tiny_data_dir, tmp_path, best, axis):
    args, points = tuning_points(tiny_data_dir, tmp_path, ["0.001", "0.002", "0.004"],
                                 ["0.05", "0.1", "0.2"])  # fmt: skip
    for n, point in enumerate(points):
        finished(point.run_dir, 3.0 if n == best else 4.0)
    with pytest.raises(SystemExit, match=f"edge of the grid \\({axis}\\)"):
        study.choose_base(points, args)


def test_a_diverged_run_loses_and_a_one_value_axis_has_no_edge(tiny_data_dir, tmp_path):
    args, points = tuning_points(tiny_data_dir, tmp_path, ["0.001", "0.002", "0.004"], ["0.1"])
    finished(points[0].run_dir, 3.6)
    finished(points[1].run_dir, 3.5)
    (points[2].run_dir).mkdir(parents=True)  # diverged: stopped without a record
    (points[2].run_dir / "results.json").write_text("{}")
    assert points[2].done and points[2].val_loss == float("inf")
    assert study.choose_base(points, args) == study.Base(lr=0.002, init_std=0.1)


class InProcess:
    """Stands in for `gptlab_train`: each run trained in this process, its overrides kept."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, overrides, log_file) -> bool:
        self.calls.append(list(overrides))
        values = dict(o.split("=", 1) for o in overrides)
        run_dir = Path(values.pop("hydra.run.dir"))
        train(compose_config("train", [f"{k}={v}" for k, v in values.items()], run_dir))
        return True


def sequential(lanes) -> None:
    for lane in lanes:
        lane()


def test_a_smoke_run_of_the_study_branches_records_and_reruns_nothing(
    tiny_data_dir, tmp_path, monkeypatch
):
    runner = InProcess()
    monkeypatch.setattr(study, "gptlab_train", runner)
    monkeypatch.setattr(study, "run_lanes", sequential)
    args = study_args(tiny_data_dir, tmp_path, "--lr", "0.002")
    summary = study.run_study(args)
    runs = tmp_path / "scaling_law_mup" / "mup_wsd_init" / "runs"
    records = {p.parent.name: json.loads(p.read_text()) for p in runs.glob(f"*/{RESULT_FILE}")}
    assert sorted(records) == ["C1e9-d16-s1", "C1e9-d32-s1", "C3e8-d16-s1", "C3e9-d32-s1"]
    assert {r["status"] for r in records.values()} == {"finished"}
    # A branch records its own budget's N, D, C and steps, and trained only its decay.
    branch = records["C1e9-d32-s1"]
    assert branch["budget"] == 1e9 and branch["tokens"] == branch["steps"] * 256
    assert branch["settings"]["optimizer"]["lr"] == 0.002
    (stable_call,) = [c for c in runner.calls if "hydra.run.dir=" + str(runs / "C3e9-d32-s1") in c]
    branch_point = summary["widths"][1]["branches"][0]["branch_step"]
    assert f"callbacks.step_checkpoints.steps=[{branch_point}]" in stable_call
    (branch_call,) = [c for c in runner.calls if any(o.startswith("ckpt_path=") and "d32" in o
                                                    for o in c)]  # fmt: skip
    assert f"step{branch_point:06d}.ckpt" in next(o for o in branch_call if "ckpt_path" in o)
    # Branched, it ends as a dedicated run of its budget would (bit for bit).
    dedicated = tmp_path / "dedicated"
    runner([o for o in branch_call if not o.startswith(("ckpt_path", "hydra.run.dir"))]
           + [f"hydra.run.dir={dedicated}"], None)  # fmt: skip
    assert json.loads((dedicated / RESULT_FILE).read_text())["val_loss"] == branch["val_loss"]
    # The stable runs' checkpoints are gone once their branches finished.
    assert not list(runs.rglob("step??????.ckpt"))
    assert summary["steps_trained"] < summary["steps_dedicated"]
    assert json.loads((runs.parent / study.PLAN_FILE).read_text()) == summary

    # A rerun trains nothing.
    runner.calls.clear()
    study.run_study(args)
    assert runner.calls == []
