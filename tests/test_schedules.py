"""Learning-rate schedules: the warmup-stable-decay shape by hand, and a decay branched off a
stable-phase checkpoint, which must train exactly as a dedicated run of that length."""

from __future__ import annotations

import pytest
import torch

from gptlab.cli.train import train
from gptlab.training.checkpoint import load_model
from gptlab.training.optim import SchedulerConfig, lr_factor
from tests.kit import tiny_run


def wsd(**kw) -> SchedulerConfig:
    values = dict(name="wsd", warmup_steps=10, max_steps=110, min_lr_ratio=0.1, decay_steps=20)
    return SchedulerConfig(**(values | kw))


@pytest.mark.parametrize(
    ("shape", "halfway"),  # 0.1 + 0.9 x the remaining share at half the decay, by hand
    [("linear", 0.55), ("cosine", 0.55), ("sqrt", 0.1 + 0.9 * (1 - 0.5**0.5))],
)
def test_wsd_warms_up_holds_the_peak_then_decays_in_its_shape(shape, halfway):
    cfg = wsd(decay_shape=shape)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert [lr_factor(s, cfg) for s in (9, 10, 50, 89, 90)] == [1.0] * 5
    assert lr_factor(100, cfg) == pytest.approx(halfway)
    assert lr_factor(95, cfg) > lr_factor(100, cfg) > lr_factor(105, cfg)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_wsd_decay_defaults_to_a_fraction_of_the_run():
    cfg = wsd(decay_steps=None, decay_fraction=0.25, max_steps=200)
    assert cfg.wsd_decay_steps == 50
    assert lr_factor(149, cfg) == 1.0 and lr_factor(150, cfg) == 1.0 > lr_factor(151, cfg)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"decay_steps": 101}, r"decay_steps=101 must be in \[1, max_steps - warmup_steps = 100\]"),
        ({"decay_shape": "exp"}, "choose one of: linear, cosine, sqrt"),
        ({"decay_fraction": 0}, r"decay_fraction=0 must be in \(0, 1\]"),
    ],
)
def test_bad_wsd_settings_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        wsd(**values)


def final_weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_model(checkpoint)[0].state_dict()


def test_a_decay_branched_from_a_stable_checkpoint_equals_a_dedicated_run(tiny_data_dir, tmp_path):
    common = [
        "data.loader.batch_size=4",
        "scheduler=wsd",
        "scheduler.warmup_steps=2",
        "callbacks.samples=null",
        "callbacks.model_checkpoint.save_top_k=-1",  # keep every stable-phase checkpoint
        "trainer.val_check_interval=4",
    ]
    # One long run: stable until step 16, then its own decay.
    long_run = ["trainer.max_steps=20", "scheduler.decay_steps=4"]
    train(tiny_run(tiny_data_dir, tmp_path / "stable", *common, *long_run))
    (branch_point,) = (tmp_path / "stable" / "checkpoints").glob("step000008-*.ckpt")
    # A decay of 3 steps branched off its step-8 checkpoint, and a dedicated 11-step run.
    short = ["trainer.max_steps=11", "scheduler.decay_steps=3"]
    branched = f"ckpt_path={branch_point}"
    train(tiny_run(tiny_data_dir, tmp_path / "branch", *common, *short, branched))
    train(tiny_run(tiny_data_dir, tmp_path / "dedicated", *common, *short))
    branch = final_weights(tmp_path / "branch" / "checkpoints" / "last.ckpt")
    dedicated = final_weights(tmp_path / "dedicated" / "checkpoints" / "last.ckpt")
    stable = final_weights(tmp_path / "stable" / "checkpoints" / "last.ckpt")
    for name, tensor in dedicated.items():
        assert torch.equal(branch[name], tensor), name
    assert any(not torch.equal(stable[n], t) for n, t in dedicated.items())


def test_a_decay_branched_from_a_step_checkpoint_equals_a_dedicated_run(tiny_data_dir, tmp_path):
    """Branch points off the validation grid: CheckpointAtSteps saves after step 7 (of 2
    accumulated micro-batches each), and the branch resumed there trains bit-identically."""
    common = [
        "data.loader.batch_size=2",
        "trainer.accumulate_grad_batches=2",
        "scheduler=wsd",
        "scheduler.warmup_steps=2",
        "callbacks.samples=null",
    ]
    stable = ["trainer.max_steps=20", "scheduler.decay_steps=4", "trainer.val_check_interval=40"]
    steps = "callbacks.step_checkpoints.steps=[5,7]"
    train(tiny_run(tiny_data_dir, tmp_path / "stable", *common, *stable, steps))
    saved = sorted(p.name for p in (tmp_path / "stable" / "checkpoints").glob("step??????.ckpt"))
    assert saved == ["step000005.ckpt", "step000007.ckpt"]
    at_7 = tmp_path / "stable" / "checkpoints" / "step000007.ckpt"
    assert torch.load(at_7, weights_only=True)["global_step"] == 7
    # A 9-step run decays over its last 2 steps, from step 7 on.
    short = ["trainer.max_steps=9", "scheduler.decay_steps=2", "trainer.val_check_interval=18"]
    results = {
        name: train(tiny_run(tiny_data_dir, tmp_path / name, *common, *short, *extra))
        for name, extra in (("branch", [f"ckpt_path={at_7}"]), ("dedicated", []))
    }
    assert results["branch"]["val_loss"] == results["dedicated"]["val_loss"]
    assert results["branch"]["val_step"] == 9
    branch = final_weights(tmp_path / "branch" / "checkpoints" / "last.ckpt")
    dedicated = final_weights(tmp_path / "dedicated" / "checkpoints" / "last.ckpt")
    for name, tensor in dedicated.items():
        assert torch.equal(branch[name], tensor), name
    longer = final_weights(tmp_path / "stable" / "checkpoints" / "last.ckpt")
    assert any(not torch.equal(longer[n], t) for n, t in dedicated.items())
