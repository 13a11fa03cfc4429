"""NonFiniteGuard: skipped steps leave the weights alone, a bad streak stops the run with the
last good checkpoint, spikes are reported, and every DDP rank takes the same decision."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch

from gptlab.data.datamodule import GPTDataModule
from gptlab.errors import TrainingDivergedError
from gptlab.training.callbacks.guards import NonFiniteGuard
from gptlab.training.lit_gpt import LitGPT
from tests.kit import TINY, cpu_trainer


class PoisonedGPT(LitGPT):
    """Multiplies the loss by `loss_factor[step]`, or sets one gradient entry to `grad_value[step]`,
    at the given optimizer steps (on the ranks in `ranks`); snapshots the weights after each step.
    """

    def __init__(self, loss_factor=None, grad_value=None, loss_offset=None, ranks=(0,), **kw):
        super().__init__(**kw)
        self.loss_factor = loss_factor or {}
        self.grad_value = grad_value or {}
        self.loss_offset = loss_offset or {}
        self.ranks = ranks
        self.snapshots = []

    def _poisoned(self, table):
        return self.global_rank in self.ranks and self.global_step in table

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self._poisoned(self.loss_factor):
            loss = loss * self.loss_factor[self.global_step]
        if self._poisoned(self.loss_offset):  # changes the value only, not the gradient
            loss = loss + self.loss_offset[self.global_step]
        return loss

    def on_after_backward(self):
        if self._poisoned(self.grad_value):
            self.model.wte.weight.grad[0, 0] = self.grad_value[self.global_step]

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.snapshots.append([p.detach().clone() for p in self.parameters()])


def fit(data_dir, max_steps, guard, ckpt_dir=None, extra_callbacks=(), devices=1, **poison):
    L.seed_everything(0)
    dm = GPTDataModule(str(data_dir), block_size=16, batch_size=4, val_windows=4)
    model = PoisonedGPT(
        model={**TINY, "vocab_size": dm.vocab_size},
        scheduler={"warmup_steps": 1, "max_steps": max_steps},
        **poison,
    )
    callbacks = [guard, *extra_callbacks]
    if ckpt_dir is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True
            )
        )
    trainer = cpu_trainer(
        max_steps=max_steps,
        strategy="ddp_spawn" if devices > 1 else "auto",
        devices=devices,
        limit_val_batches=0,
        enable_checkpointing=ckpt_dir is not None,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm)
    return model


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_non_finite_steps_are_skipped_and_spikes_reported(tiny_data_dir, caplog):
    guard = NonFiniteGuard(max_consecutive=2, spike_factor=3.0, spike_window=2)
    poison = {"loss_factor": {1: math.nan, 5: 10.0}, "grad_value": {3: math.inf}}
    with caplog.at_level(logging.WARNING, logger="gptlab.training.callbacks.guards"):
        model = fit(tiny_data_dir, 7, guard, **poison)
    snaps = model.snapshots
    assert len(snaps) == 7 and guard.skipped == 2 and guard.bad_streak == 0
    assert same(snaps[1], snaps[0]) and same(snaps[3], snaps[2])  # a NaN loss, an inf gradient
    assert not any(same(snaps[i], snaps[i - 1]) for i in (2, 4, 5, 6))  # training went on
    assert all(torch.isfinite(p).all() for p in snaps[-1])
    optimizer_steps = {int(s["step"]) for s in model.optimizers().optimizer.state.values()}
    assert optimizer_steps == {5}  # seven steps, two skipped: AdamW moments untouched by them
    assert "step 1: non-finite loss or gradient norm" in caplog.text
    assert "step 3: non-finite loss or gradient norm" in caplog.text
    assert guard.spikes == 1 and "step 5: loss spike" in caplog.text


def test_bad_streak_stops_the_run_and_keeps_the_last_good_weights(tiny_data_dir, tmp_path):
    guard = NonFiniteGuard(max_consecutive=3)
    bad = {2: math.nan, 3: math.inf, 4: math.nan}
    with pytest.raises(TrainingDivergedError, match=r"stopping at step 4: 3 steps in a row") as e:
        fit(tiny_data_dir, 10, guard, ckpt_dir=tmp_path, loss_factor=bad)
    last = tmp_path / "last.ckpt"
    assert str(last) in str(e.value)
    # Checkpoints written during the streak hold the weights after step 1, the last good one.
    after_step_1 = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], after_step_1[k]) for k in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())


class _SaveRankResult(L.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        skipped = [m.skipped for m in trainer.callbacks if isinstance(m, NonFiniteGuard)]
        result = {"params": pl_module.snapshots[-1], "skipped": skipped[0]}
        torch.save(result, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_every_ddp_rank_skips_when_one_rank_has_a_bad_loss(tiny_data_dir, tmp_path):
    # Rank 1 alone sees an infinite loss whose gradient is finite: only the all-reduced
    # decision keeps rank 0 from stepping while rank 1 skips (the replicas would drift apart).
    guard = NonFiniteGuard(max_consecutive=3)
    poison = {"loss_offset": {2: math.inf}, "ranks": (1,)}
    fit(tiny_data_dir, 4, guard, extra_callbacks=[_SaveRankResult(tmp_path)], devices=2, **poison)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["skipped"] == rank1["skipped"] == 1
    assert same(rank0["params"], rank1["params"])
