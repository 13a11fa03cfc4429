"""The isoFLOP study rerun under μP with WSD decays (README.md here, "μP + WSD rerun"):
experiment=scaling_law_mup, trained in two steps, then fitted.

    python -m experiments.scaling_laws.mup_wsd_run     # the study; a rerun skips finished runs
    gptlab-scaling sweep_dir=logs/scaling_law_mup/mup_wsd_init/runs n_params=both out_dir=...

1. The base hyperparameters, tuned once: dedicated WSD runs of the base width (the smallest,
   where μP is SP) at one budget over a grid of learning rates (2x steps) x init stds
   (model.init_std, the std at the base width; μP scales it for wider models), one seed. The
   lowest final validation loss wins, unless it lies at an end of either axis of the grid (the
   study stops: widen --lrs or --init-stds). The choice is written to tuned.json in the sweep
   folder; every later run trains at it.
2. The sweep, per width and seed: every budget is planned by gptlab-train's own plan
   (`plan_scaling_run`) and the points the sweep's rules skip (min_steps, max_epochs) are
   dropped. ONE WSD run trains at the largest budget left, keeping a checkpoint at every other
   budget's branch point (its steps minus its decay); each other budget then resumes that
   checkpoint with its own scaling.budget, so it trains only its decay and its record holds its
   own N, D, C and steps. Once every branch of a stable run is done, its checkpoints are
   deleted. A branch whose checkpoint is missing trains from scratch: the same result (bit for
   bit, tests/test_schedules.py), at full cost.

Runs go under <log dir>/scaling_law_mup/<sweep name>/:
lr_tuning/lr<lr>-init<std>/C<budget>-d<width>-s<seed>
and runs/C<budget>-d<width>-s<seed>, in two lanes side by side, one thread each (each lane's
output in launch.log). plan.json there lists every run, its branch point and the steps saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.launch import gptlab_train, run_lanes, say
from gptlab.analysis import SweepJob
from gptlab.cli import CONFIG_DIR
from gptlab.cli.train import register_resolvers
from gptlab.config_schema import register_schemas
from gptlab.data.manifest import load_manifest
from gptlab.fileio import atomic_write_text
from gptlab.scaling.plan import RESULT_FILE, RunPlan, format_flops, plan_scaling_run
from gptlab.training.callbacks.step_checkpoints import step_checkpoint_path
from gptlab.training.optim import SchedulerConfig

TASK = "scaling_law_mup"
EXPERIMENT = "scaling_law_mup"
SWEEP = "mup_wsd_init"
WIDTHS = (16, 32, 48, 64, 80, 96, 112, 128)
# The largest budget is the one gptlab-scaling holds out.
BUDGETS = (1e11, 1.7e11, 3e11, 5.5e11, 1e12, 1.7e12, 3e12)
SEEDS = (1, 2)
LRS = tuple(2.0**k for k in range(-9, -4))  # 2^-9 (~0.002) to 2^-5 (0.031)
INIT_STDS = (0.02, 0.05, 0.1, 0.2)  # 0.02 is GPT-2's (the config's default)
TUNING_BUDGET = 1e12
TUNED_FILE = "tuned.json"
PLAN_FILE = "plan.json"


# ----------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Point:
    """One run: a budget, width and seed at a learning rate, planned as gptlab-train plans it."""

    overrides: dict[str, Any]  # what makes this run, on top of the study's common overrides
    run_dir: Path
    plan: RunPlan
    decay_steps: int  # of its WSD schedule (0 for a skipped point)

    @property
    def branch_step(self) -> int:
        """The last step of the stable phase: where this run's decay branches off."""
        return self.plan.steps - self.decay_steps

    @property
    def record(self) -> dict[str, Any] | None:
        path = self.run_dir / RESULT_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    @property
    def done(self) -> bool:
        """Finished (recorded), or ended without a record (stopped early, e.g. diverged, or
        failed: see its results.json or error.txt). A rerun skips both; delete the folder to
        retry one."""
        job = SweepJob(self.run_dir, {})
        finished = (self.record or {}).get("status") == "finished"
        return finished or job.results is not None or job.error is not None

    @property
    def val_loss(self) -> float:
        """The final validation loss, inf if the run did not finish (diverged or failed)."""
        record = self.record or {}
        return record["val_loss"] if record.get("status") == "finished" else math.inf


class Planner:
    """Plans runs from the study's config, composed once: a run's plan is the config with its
    overrides applied, through `plan_scaling_run`, the function gptlab-train itself calls."""

    def __init__(self, common: Sequence[str]) -> None:
        register_schemas()
        register_resolvers()
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            self.base = compose(config_name="train", overrides=list(common))
        self.manifest = load_manifest(self.base.data.loader.data_dir)

    def point(self, overrides: dict[str, Any], run_dir: Path) -> Point:
        cfg = copy.deepcopy(self.base)
        with open_dict(cfg):
            for key, value in overrides.items():
                OmegaConf.update(cfg, key, value, merge=False)
            cfg.paths.output_dir = str(run_dir)
        planned, run = plan_scaling_run(cfg, self.manifest)
        decay = 0 if run.plan.skip_reason else wsd_decay_steps(planned)
        return Point(overrides, run_dir, run.plan, decay)


def wsd_decay_steps(planned: DictConfig) -> int:
    """The decay length of a planned run's WSD schedule."""
    scheduler = OmegaConf.to_container(planned.scheduler, resolve=True)
    if scheduler["name"] != "wsd":
        raise ValueError(f"the study branches WSD decays; the config has {scheduler['name']}")
    return SchedulerConfig(**scheduler).wsd_decay_steps


def sweep_root(args: argparse.Namespace) -> Path:
    return args.log_dir / TASK / args.sweep_name


def run_name(budget: float, width: int, seed: int) -> str:
    return f"C{format_flops(budget)}-d{width}-s{seed}"


@dataclass(frozen=True)
class Base:
    """The hyperparameters tuned at the base width, which μP carries to every width."""

    lr: float
    init_std: float | None  # None: the config's model.init_std

    @property
    def overrides(self) -> dict[str, Any]:
        init = {} if self.init_std is None else {"model.init_std": self.init_std}
        return {"optimizer.lr": self.lr, **init}


def point_overrides(budget: float, width: int, seed: int, base: Base) -> dict[str, Any]:
    """The values that make a run (as the planner applies them; on the command line by repr,
    which Hydra reads back to the same values)."""
    return {"scaling.budget": budget, "model.n_embd": width, "seed": seed, **base.overrides}


@dataclass
class WidthPlan:
    """The runs of one width and seed: the stable run (the largest budget the sweep's rules
    leave) and the budgets branched off it, and the points the rules skip."""

    width: int
    seed: int
    stable: Point | None
    branches: list[Point] = field(default_factory=list)
    skipped: list[Point] = field(default_factory=list)

    @property
    def steps_trained(self) -> int:
        """Optimizer steps the study trains for this width and seed: the stable run, then only
        the decay of each branch."""
        if self.stable is None:
            return 0
        return self.stable.plan.steps + sum(b.decay_steps for b in self.branches)

    @property
    def steps_dedicated(self) -> int:
        """Steps the same runs would take, each trained from scratch."""
        runs = [self.stable] if self.stable else []
        return sum(p.plan.steps for p in runs + self.branches)


def plan_width(planner: Planner, args: argparse.Namespace, width: int, seed: int, base: Base):
    points = [
        planner.point(
            point_overrides(budget, width, seed, base),
            sweep_root(args) / "runs" / run_name(budget, width, seed),
        )
        for budget in sorted(args.budgets)
    ]
    valid = [p for p in points if p.plan.skip_reason is None]
    skipped = [p for p in points if p.plan.skip_reason is not None]
    if not valid:
        return WidthPlan(width, seed, None, [], skipped)
    stable, branches = valid[-1], valid[:-1]
    for branch in branches:
        if branch.branch_step > stable.branch_step:
            raise ValueError(
                f"{branch.run_dir.name}: its decay starts after step {branch.branch_step}, "
                f"beyond the stable phase of {stable.run_dir.name} (steps 1 to "
                f"{stable.branch_step})"
            )
    return WidthPlan(width, seed, stable, branches, skipped)


def plan_sweep(planner: Planner, args: argparse.Namespace, base: Base) -> list[WidthPlan]:
    return [plan_width(planner, args, w, s, base) for w in args.widths for s in args.seeds]


def write_plan(plans: list[WidthPlan], base: Base, args: argparse.Namespace) -> dict[str, Any]:
    """plan.json: every run, its branch point, the skipped points and the compute saved."""
    trained = sum(p.steps_trained for p in plans)
    dedicated = sum(p.steps_dedicated for p in plans)

    def entry(point: Point) -> dict[str, Any]:
        return {
            "run": point.run_dir.name,
            "steps": point.plan.steps,
            "decay_steps": point.decay_steps,
            "branch_step": point.branch_step,
            "flops": point.plan.flops,
        }

    summary = {
        "lr": base.lr,
        "init_std": base.init_std,
        "steps_trained": trained,
        "steps_dedicated": dedicated,
        "steps_saved_fraction": 1 - trained / dedicated if dedicated else 0.0,
        "widths": [
            {
                "width": p.width,
                "seed": p.seed,
                "stable": p.stable and entry(p.stable),
                "branches": [entry(b) for b in p.branches],
                "skipped": {s.run_dir.name: s.plan.skip_reason for s in p.skipped},
            }
            for p in plans
        ],
    }
    path = sweep_root(args) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    say(
        f"plan: {sum(bool(p.stable) + len(p.branches) for p in plans)} runs; {trained:,} "
        f"optimizer steps instead of {dedicated:,} for dedicated runs "
        f"({summary['steps_saved_fraction']:.0%} saved); {path}"
    )
    return summary


# ----------------------------------------------------------------------------- training


def launch(point: Point, args: argparse.Namespace, *extra: str) -> None:
    """gptlab-train of one planned point, unless it is done."""
    if point.done:
        say(f"{point.run_dir}: done before, skipping")
        return
    overrides = [*common_overrides(args), *(f"{k}={v!r}" for k, v in point.overrides.items())]
    overrides += [*extra, f"hydra.run.dir={point.run_dir}"]
    gptlab_train(overrides, sweep_root(args) / "launch.log")


def common_overrides(args: argparse.Namespace) -> list[str]:
    return [f"experiment={EXPERIMENT}", *args.set]


def train_width(plan: WidthPlan, args: argparse.Namespace) -> None:
    """The stable run with a checkpoint at every branch point, then each branch's decay; then
    the stable run's checkpoints are deleted, once every branch is done."""
    if plan.stable is None:
        return
    points = sorted({b.branch_step for b in plan.branches})
    steps = f"callbacks.step_checkpoints.steps=[{','.join(map(str, points))}]"
    launch(plan.stable, args, steps)
    checkpoints = plan.stable.run_dir / "checkpoints"
    for branch in plan.branches:
        checkpoint = step_checkpoint_path(checkpoints, branch.branch_step)
        if checkpoint.is_file():
            launch(branch, args, f"ckpt_path={checkpoint}")
        elif not branch.done:
            say(f"{branch.run_dir.name}: no checkpoint at step {branch.branch_step}: from scratch")
            launch(branch, args)
    if all(b.done for b in plan.branches):
        for step in points:
            step_checkpoint_path(checkpoints, step).unlink(missing_ok=True)


def deal(tasks: Sequence[tuple[float, Callable[[], None]]], lanes: int) -> list[Callable[[], None]]:
    """Lanes of about equal cost: the costliest task first, each to the least loaded lane."""
    loads = [0.0] * lanes
    queues: list[list[Callable[[], None]]] = [[] for _ in range(lanes)]
    for cost, task in sorted(tasks, key=lambda t: -t[0]):
        lane = loads.index(min(loads))
        loads[lane] += cost
        queues[lane].append(task)

    def lane_of(queue: list[Callable[[], None]]) -> Callable[[], None]:
        def lane() -> None:
            for task in queue:
                task()

        return lane

    return [lane_of(q) for q in queues if q]


# ----------------------------------------------------------------------------- the base


def tuning_points(planner: Planner, args: argparse.Namespace) -> list[Point]:
    """The tuning grid's runs, learning rate by learning rate, each over the init stds."""
    width, seed = min(args.widths), args.seeds[0]
    root = sweep_root(args) / "lr_tuning"
    return [
        planner.point(
            point_overrides(args.tuning_budget, width, seed, Base(lr, init_std)),
            root / f"lr{lr:g}-init{init_std:g}" / run_name(args.tuning_budget, width, seed),
        )
        for lr in sorted(args.lrs)
        for init_std in sorted(args.init_stds)
    ]


def choose_base(points: list[Point], args: argparse.Namespace) -> Base:
    """The grid point of the lowest final validation loss; refused at an end of an axis of the
    grid (one with more than one value), where the optimum may lie beyond it. Written to
    tuned.json either way."""
    lrs, init_stds = sorted(args.lrs), sorted(args.init_stds)
    losses = [p.val_loss for p in points]
    best = min(range(len(points)), key=losses.__getitem__)
    lr, init_std = points[best].overrides["optimizer.lr"], points[best].overrides["model.init_std"]
    at_edge = [
        name
        for name, grid, value in (("--lrs", lrs, lr), ("--init-stds", init_stds, init_std))
        if len(grid) > 1 and value in (grid[0], grid[-1])
    ]
    choice = {
        "lr": lr,
        "init_std": init_std,
        "at_edge": at_edge,
        "runs": [
            {
                "lr": p.overrides["optimizer.lr"],
                "init_std": p.overrides["model.init_std"],
                "val_loss": loss,
            }
            for p, loss in zip(points, losses, strict=True)
        ],
        "budget": args.tuning_budget,
        "width": min(args.widths),
        "seed": args.seeds[0],
    }
    path = sweep_root(args) / TUNED_FILE
    atomic_write_text(path, json.dumps(choice, indent=2) + "\n")
    if not math.isfinite(losses[best]):
        raise SystemExit(f"no tuning run finished: see {sweep_root(args) / 'launch.log'}")
    if at_edge:
        raise SystemExit(
            f"the best point, lr {lr:g} and init std {init_std:g}, is at the edge of the grid "
            f"({' and '.join(at_edge)}): the optimum may lie beyond it; widen the grid and rerun "
            f"(finished runs are kept). See {path}"
        )
    say(f"base: lr {lr:g}, init std {init_std:g} (val loss {losses[best]:.4f}); {path}")
    return Base(lr, init_std)


def tune_base(planner: Planner, args: argparse.Namespace) -> Base:
    points = tuning_points(planner, args)
    tasks = [(float(p.plan.steps), lambda p=p: launch(p, args)) for p in points]
    run_lanes(deal(tasks, args.lanes))
    return choose_base(points, args)


# ----------------------------------------------------------------------------- the study


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    planner = Planner(common_overrides(args))
    base = Base(args.lr, args.init_std) if args.lr is not None else tune_base(planner, args)
    plans = plan_sweep(planner, args, base)
    summary = write_plan(plans, base, args)
    tasks = [
        (float(p.steps_trained * p.stable.plan.flops_per_token), lambda p=p: train_width(p, args))
        for p in plans
        if p.stable is not None
    ]
    run_lanes(deal(tasks, args.lanes))
    runs = shlex.quote(str(sweep_root(args) / "runs"))
    say(f"done; fit with: gptlab-scaling sweep_dir={runs} n_params=both out_dir=<folder>")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    parser.add_argument("--budgets", type=float, nargs="+", default=BUDGETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--lrs", type=float, nargs="+", default=LRS, help="the tuning grid")
    parser.add_argument(
        "--init-stds", type=float, nargs="+", default=INIT_STDS, help="the tuning grid"
    )
    parser.add_argument("--tuning-budget", type=float, default=TUNING_BUDGET)
    parser.add_argument("--lr", type=float, help="skip the tuning: train every run at this LR")
    parser.add_argument(
        "--init-std", type=float, help="with --lr: at this init std (default: the config's)"
    )
    parser.add_argument("--lanes", type=int, default=2, help="runs side by side (one per core)")
    parser.add_argument("--sweep-name", default=SWEEP)
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides for every run, e.g. corpus.dir=... for a smoke test on other data",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    run_study(parse_args(argv))


if __name__ == "__main__":
    main()
