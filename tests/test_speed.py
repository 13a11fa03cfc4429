"""Speed options: compile, activation checkpointing, precision, global batch in tokens,
Muon paired with AdamW, and the FSDP preset (run on CPU processes in test_sharded.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from gptlab.cli.train import train
from gptlab.model import GPT
from gptlab.training.checkpoint import load_checkpoint, load_model
from gptlab.training.lit_gpt import LitGPT, next_token_loss
from gptlab.training.muon import MuonWithAdamW, hidden_matrices
from gptlab.training.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler
from gptlab.training.parallel import ShardedStrategy
from gptlab.training.speed import (
    accumulation_for_tokens,
    check_optimizer_strategy,
    set_global_batch,
)
from tests.kit import TINY, compose_config, cpu_trainer, tiny_config, tiny_run

# Short runs: no progress bar, few validation windows, no text samples.
QUICK = [
    "trainer.enable_progress_bar=false",
    "data.loader.val_windows=32",
    "scheduler.warmup_steps=1",
    "callbacks.samples=null",
]


def batch(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, TINY["vocab_size"], (size, TINY["block_size"] + 1))
    return tokens[:, :-1], tokens[:, 1:]


# ----------------------------------------------------------------------------- global batch


def test_global_batch_tokens_sets_accumulation():
    assert accumulation_for_tokens(8192, batch_size=4, block_size=256, world_size=2) == 4
    with pytest.raises(ValueError, match=r"multiple of .* 4 x 256 x 2 = 2048"):
        accumulation_for_tokens(3000, batch_size=4, block_size=256, world_size=2)
    with pytest.raises(ValueError, match="global_batch_tokens"):
        accumulation_for_tokens("8192", batch_size=4, block_size=256, world_size=2)

    trainer = cpu_trainer(devices=1)
    data = SimpleNamespace(batch_size=8, block_size=32)
    set_global_batch(trainer, 1024, data)
    assert trainer.accumulate_grad_batches == 4
    with pytest.raises(ValueError, match="not both"):
        set_global_batch(trainer, 1024, data)


# ----------------------------------------------------------------------------- activation ckpt


def test_activation_checkpointing_keeps_gradients_and_keys():
    torch.manual_seed(0)
    plain = LitGPT(model=TINY)
    checkpointed = LitGPT(model=TINY, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.configure_model()
    checkpointed.configure_model()  # Lightning may call it again: must not wrap twice
    assert all(isinstance(block, CheckpointWrapper) for block in checkpointed.model.blocks)
    assert not isinstance(
        checkpointed.model.blocks[0]._checkpoint_wrapped_module, CheckpointWrapper
    )
    assert list(checkpointed.state_dict()) == list(plain.state_dict())

    x, y = batch()
    for module in (plain, checkpointed):
        next_token_loss(module(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_switches_must_be_booleans():
    with pytest.raises(ValueError, match="compile='yes' must be true or false"):
        LitGPT(model=TINY, compile="yes")


# ----------------------------------------------------------------------------- Muon


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = GPT(tiny_config(bias=True, tie_weights=False))
    optimizer = build_optimizer(model, OptimizerConfig(name="muon", lr=0.01))
    assert isinstance(optimizer, MuonWithAdamW)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    blocks = {id(p) for p in model.blocks.parameters() if p.ndim == 2}
    assert muon == blocks and len(blocks) == 4 * TINY["n_layer"]  # c_attn, c_proj, c_fc, c_proj
    assert not muon & adamw and muon | adamw == {id(p) for p in model.parameters()}
    for kept_on_adamw in (model.wte.weight, model.lm_head.weight, model.blocks[0].attn.c_attn.bias):
        assert id(kept_on_adamw) in adamw
    assert len(optimizer.param_groups) == 3  # Muon's group, AdamW's decay and no-decay groups


def test_muon_with_adamw_steps_both_follows_schedule_and_resumes():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    config = OptimizerConfig(name="muon", lr=0.01)
    optimizer = build_optimizer(model, config)
    schedule = SchedulerConfig(name="linear", warmup_steps=2, max_steps=10)
    scheduler = build_scheduler(optimizer, schedule)
    x, y = batch()

    def step() -> None:
        optimizer.zero_grad()
        next_token_loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()

    before = [p.detach().clone() for p in model.parameters()]
    step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    assert all(moved)  # every parameter, on either optimizer, was updated
    # The warmup schedule reached both inner optimizers: 2/2 of the peak after one step.
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(0.01)
    assert len(optimizer.state) == len(before)  # momentum buffers of both, seen as one

    # A copy restored from the state dicts continues exactly like the original.
    twin = GPT(tiny_config())
    twin.load_state_dict(model.state_dict())
    twin_optimizer = build_optimizer(twin, config)
    twin_scheduler = build_scheduler(twin_optimizer, schedule)  # Lightning's resume order
    # A deep copy, as a checkpoint file is: the state dict holds the live momentum tensors.
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    twin_scheduler.load_state_dict(scheduler.state_dict())
    step()
    twin_optimizer.zero_grad()
    next_token_loss(twin(x), y).backward()
    twin_optimizer.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="optimizer.name=adamw"):
        twin_optimizer.load_state_dict(build_optimizer(twin, OptimizerConfig()).state_dict())
    # Checkpoints written before the state dict became the standard one hold both inner states.
    old_format = {"muon": optimizer.muon.state_dict(), "adamw": optimizer.adamw.state_dict()}
    twin_optimizer.load_state_dict(copy.deepcopy(old_format))
    assert len(twin_optimizer.state) == len(before)
    for p, q in zip(optimizer.param_groups, twin_optimizer.param_groups, strict=True):
        assert p["lr"] == q["lr"]


def test_adamw_is_fused_unless_gradients_arrive_scaled():
    model = GPT(tiny_config())
    assert build_optimizer(model, OptimizerConfig()).defaults["fused"]  # CPU too: the fastest
    scaled = build_optimizer(model, OptimizerConfig(), grad_scaler=True)  # 16-mixed
    assert not scaled.defaults["fused"] and scaled.defaults["foreach"]


def test_muon_config_is_validated():
    with pytest.raises(ValueError, match="muon_lr_adjust='orig'.*match_rms_adamw, original"):
        OptimizerConfig(name="muon", muon_lr_adjust="orig")
    with pytest.raises(ValueError, match="muon_momentum"):
        OptimizerConfig(name="muon", muon_momentum=1.0)
    assert len(hidden_matrices(GPT(tiny_config()))) == 8


def test_muon_trains_through_lightning_and_resumes(tiny_data_dir, tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    common = [*QUICK, "optimizer=muon", "trainer.val_check_interval=2"]
    first = train(tiny_run(tiny_data_dir, tmp_path, *common, "trainer.max_steps=2"))
    assert first["step"] == 2
    resumed = train(
        tiny_run(tiny_data_dir, tmp_path, *common, "trainer.max_steps=4", f"ckpt_path={last}")
    )
    assert resumed["step"] == 4 and resumed["val_loss"] < first["val_loss"]
    states = load_checkpoint(last)["optimizer_states"]
    assert len(states[0]["param_groups"]) == 3  # Muon's hidden matrices, AdamW's two groups


# ----------------------------------------------------------------------------- through train()


def test_compile_checkpointing_bf16_and_global_batch_through_train(
    tiny_data_dir, tmp_path, monkeypatch
):
    # Inductor takes minutes on 2 cores; the eager backend exercises the same wrapping in seconds.
    compiled = []
    original = torch.nn.Module.compile

    def eager_compile(module, **kwargs):
        compiled.append(type(module).__name__)
        original(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    cfg = tiny_run(
        tiny_data_dir,
        tmp_path,
        *QUICK[:-1],  # keep the samples: generation must work on the compiled model
        "compile=true",
        "activation_checkpointing=true",
        "trainer.precision=bf16-mixed",
        "global_batch_tokens=1024",  # 2 micro-batches of 16 x 32 tokens
        "trainer.max_steps=2",
        "trainer.val_check_interval=4",  # counts micro-batches: after optimizer step 2
        "callbacks.samples.max_new_tokens=4",
    )
    results = train(cfg)
    assert compiled == ["GPT"] and results["step"] == 2 and len(results["samples"]) == 3

    path = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint(path)
    assert checkpoint["GPTDataModule"]["batches_consumed"] == 4  # accumulation of 2
    keys = list(checkpoint["state_dict"])
    assert not [k for k in keys if "_orig_mod" in k or "_checkpoint_wrapped" in k]
    model, _ = load_model(path)
    assert (
        isinstance(model.blocks[0], torch.nn.Module)
        and model(torch.tensor([[1, 2]])).isfinite().all()
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("global_batch_tokens=1000", "global_batch_tokens=1000 must be a positive multiple"),
        ("trainer.precision=17", "precision"),
        ("compile=maybe", "Error merging override compile=maybe"),  # the schema: a bool
    ],
)
def test_bad_speed_options_fail_before_training(tiny_data_dir, tmp_path, override, message):
    with pytest.raises(Exception, match=message):
        train(tiny_run(tiny_data_dir, tmp_path, "debug=fast_dev_run", override))


# ----------------------------------------------------------------------------- FSDP preset


def test_fsdp_preset_is_fsdp2_and_only_the_first_fsdp_refuses_muon(tmp_path):
    cfg = compose_config("train", ["trainer=fsdp"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ShardedStrategy) and strategy.tensor_parallel_size == 1
    assert cfg.trainer.precision == "bf16-mixed"
    check_optimizer_strategy("muon", strategy)  # FSDP2 keeps whole matrices as DTensors
    with pytest.raises(ValueError, match="optimizer=muon does not work with trainer.strategy=fsdp"):
        check_optimizer_strategy("muon", FSDPStrategy())
    with pytest.raises(ValueError, match="tensor_parallel_size=2: .* orthogonalise separately"):
        check_optimizer_strategy("muon", ShardedStrategy(tensor_parallel_size=2))
