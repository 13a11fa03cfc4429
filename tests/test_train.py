"""Integration tests of the training path: Hydra composition, LitGPT, callbacks, checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.cli.train import train, validation_line
from gptlab.config import dataclass_from_dict
from gptlab.training.build import plain
from gptlab.training.callbacks.samples import SampleGenerationCallback
from gptlab.training.checkpoint import load_checkpoint, load_model
from gptlab.training.optim import SchedulerConfig, lr_factor
from tests.kit import tiny_run


def test_fast_dev_run_through_hydra(tiny_data_dir, tmp_path):
    results = train(tiny_run(tiny_data_dir, tmp_path, "debug=fast_dev_run"))
    assert results["step"] == 1
    assert math.isfinite(results["val_loss"])


def test_limit_debug_run_validates_twice_and_keeps_checkpoints(tiny_data_dir, tmp_path):
    cfg = tiny_run(tiny_data_dir, tmp_path, "debug=limit", "callbacks.samples=null")
    results = train(cfg)
    assert results["step"] == 20
    names = {p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")}
    assert "last.ckpt" in names and any(name.startswith("step000010") for name in names)


def test_profiler_debug_run_writes_where_the_time_goes(tiny_data_dir, tmp_path):
    cfg = tiny_run(tiny_data_dir, tmp_path, "debug=profiler", "callbacks.samples=null")
    assert train(cfg)["step"] == 30
    assert "run_training_batch" in (tmp_path / "fit-profile.txt").read_text()


def test_short_run_learns_logs_and_reloads(tiny_data_dir, tmp_path):
    cfg = tiny_run(
        tiny_data_dir,
        tmp_path,
        "trainer.max_steps=300",
        "trainer.val_check_interval=150",
        "scheduler.warmup_steps=5",
        "callbacks.samples.every_n_steps=150",
        "callbacks.samples.max_new_tokens=8",
        "callbacks.throughput.window=10",
    )
    results = train(cfg)
    assert results["step"] == 300
    # The model must learn more than token frequencies: below the data's unigram entropy.
    assert results["val_loss"] < results["unigram_entropy"] - 0.3
    assert results["tokens_per_sec"] > 0 and 0 < results["mfu"] < 1
    assert len(results["samples"]) == 3

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"loss/train", "loss/val", "loss/val_ppl", "perf/tokens_per_sec"} <= set(
        events.Tags()["scalars"]
    )
    assert any(tag.startswith("samples/") for tag in events.Tags()["tensors"])

    # The last checkpoint alone rebuilds the model and its tokenizer.
    model, tokenizer = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert tokenizer is not None and tokenizer.decode(tokenizer.encode("The end").ids) == "The end"
    idx = torch.tensor([tokenizer.encode("The function").ids])
    assert model(idx).shape == (1, idx.shape[1], model.config.vocab_size)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.n_embd=33", "n_embd"),
        ("model.position=rop", "rope"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("scheduler.warmup_steps=5000", "warmup_steps"),
    ],
)
def test_bad_values_fail_before_training(tiny_data_dir, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(tiny_run(tiny_data_dir, tmp_path, "debug=fast_dev_run", override))
    assert not (tmp_path / "checkpoints").exists()


def test_misspelt_key_and_group_fail_at_composition(tiny_data_dir, tmp_path):
    with pytest.raises(ConfigCompositionException, match="n_layr"):
        tiny_run(tiny_data_dir, tmp_path, "model.n_layr=3")
    with pytest.raises(ConfigCompositionException, match="nano"):  # lists the valid choices
        tiny_run(tiny_data_dir, tmp_path, "model=nanoo")


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = SchedulerConfig(name="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    assert lr_factor(500, cfg) == pytest.approx(0.1)


def test_samples_are_generated_once_per_step_under_gradient_accumulation():
    callback = SampleGenerationCallback(prompts=["The"], every_n_steps=2)
    generated_at = []
    sample = callback.on_scheduled_step

    def counting(trainer, pl_module):
        generated_at.append(trainer.global_step)
        sample(trainer, pl_module)

    callback.on_scheduled_step = counting
    no_tokenizer = SimpleNamespace(tokenizer_json=None)  # generation itself is skipped
    for step in (1, 1, 2, 2, 3, 3, 4, 4):  # two micro-batches per optimizer step
        callback.on_train_batch_end(SimpleNamespace(global_step=step), no_tokenizer, None, None, 0)
    callback.on_train_end(SimpleNamespace(global_step=4), no_tokenizer)
    assert generated_at == [2, 4]


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_every_scheduler_config_composes_to_its_schedule(tiny_data_dir, tmp_path, name):
    cfg = tiny_run(tiny_data_dir, tmp_path, f"scheduler={name}")
    config = dataclass_from_dict(SchedulerConfig, plain(cfg.scheduler), "scheduler")
    assert config.name == name and config.max_steps == cfg.trainer.max_steps


class FinalWeights(L.Callback):
    """Keeps a copy of the GPT's weights as they are when `fit` returns."""

    def on_fit_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.step = trainer.global_step


def test_a_run_ending_between_validations_validates_and_saves_its_final_weights(
    tiny_data_dir, tmp_path, capsys
):
    overrides = [
        "trainer.max_steps=7",
        "trainer.val_check_interval=5",
        "scheduler.warmup_steps=1",
        "callbacks.samples=null",
    ]
    final = FinalWeights()
    results = train(tiny_run(tiny_data_dir, tmp_path, *overrides), extra_callbacks=[final])
    assert (results["step"], results["val_step"]) == (7, 7)
    assert "the last validation" not in capsys.readouterr().out
    steps = sorted(p.name[:10] for p in (tmp_path / "checkpoints").glob("step*.ckpt"))
    assert steps == ["step000005", "step000007"]  # validated at the interval and at the end

    # last.ckpt holds the weights training ended with; every command that reads it gets them.
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == 7
    model, _ = load_model(last)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, final.weights[name]), name

    # Resuming the finished run trains nothing: the weights stay those of step 7.
    resumed = FinalWeights()
    resume_cfg = tiny_run(tiny_data_dir, tmp_path / "resumed", *overrides, f"ckpt_path={last}")
    assert train(resume_cfg, extra_callbacks=[resumed])["step"] == 7
    for name, tensor in resumed.weights.items():
        assert torch.equal(tensor, final.weights[name]), name


def test_the_report_says_which_step_its_validation_belongs_to():
    results = {"step": 5, "val_step": 3, "val_loss": 4.5, "val_acc": math.nan}
    results |= {"val_ppl": 90.0, "unigram_entropy": math.nan}
    assert validation_line(results).startswith("val loss at step 3 (the last validation) 4.5")
    assert validation_line(results | {"val_step": 5}).startswith("val loss 4.5000 nats/token")
    assert "no validation ran" in validation_line(results | {"val_step": None})
