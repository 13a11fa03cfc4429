"""Exact resume: RNG states and plain data in checkpoints, refused resumes, `ckpt_path=last`,
and atomic checkpoint writes (full disk, kill during a save)."""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import lightning as L
import numpy as np
import pytest
import torch

from gptlab.data.datamodule import GPTDataModule
from gptlab.errors import CheckpointWriteError, DataError
from gptlab.model import GPT, GPTConfig
from gptlab.training.callbacks.guards import NonFiniteGuard
from gptlab.training.checkpoint import (
    RNG_KEY,
    TOKENIZER_KEY,
    AtomicCheckpointIO,
    find_last_checkpoint,
    read_pretrained,
    write_run_record,
)
from gptlab.training.lit_gpt import LitGPT
from tests.kit import TINY, cpu_trainer

BLOCK = 16
MODEL = TINY | {"block_size": BLOCK, "dropout": 0.1}


class DrawingGPT(LitGPT):
    """Records, at every training step, one draw of each RNG and the loss."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.draws = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.draws.append((random.random(), np.random.rand(), torch.rand(1).item(), loss.item()))
        return loss


def datamodule(data_dir, **changes):
    options = {"block_size": BLOCK, "batch_size": 4, "seed": 3, "val_windows": 4, **changes}
    return GPTDataModule(str(data_dir), **options)


def fit(data_dir, ckpt_dir, max_steps, ckpt_path=None):
    L.seed_everything(0)
    dm = datamodule(data_dir)
    model = DrawingGPT(
        model={**MODEL, "vocab_size": dm.vocab_size},
        scheduler={"warmup_steps": 1, "max_steps": 6},
    )
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    trainer = cpu_trainer(
        max_steps=max_steps,
        limit_val_batches=0,
        callbacks=[checkpoints],
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    return model


def test_resume_continues_losses_rngs_and_weights_exactly(tiny_data_dir, tmp_path):
    full = fit(tiny_data_dir, tmp_path / "full", 6)
    part = fit(tiny_data_dir, tmp_path / "part", 3)  # killed after step 3, last checkpoint at 2
    resumed = fit(tiny_data_dir, tmp_path / "resumed", 6, ckpt_path=tmp_path / "part/step=2.ckpt")
    assert part.draws == full.draws[:3]
    assert resumed.draws == full.draws[2:]  # Python, NumPy and torch draws, and the losses
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    checkpoint = torch.load(tmp_path / "part/step=2.ckpt", weights_only=True)
    assert checkpoint["GPTDataModule"]["batches_consumed"] == 2
    assert {"optimizer_states", "lr_schedulers", "loops", "hyper_parameters"} <= set(checkpoint)
    (rng,) = checkpoint[RNG_KEY]  # one entry per rank
    assert {"torch", "python", "numpy"} <= set(rng)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": 4}, "seed 3 -> 4"),
        ({"block_size": 8}, "block_size 16 -> 8"),
        ({"batch_size": 2}, r"global batch .* 4 x 1 = 4 -> 2 x 1 = 2"),
        ({"world_size": 2}, r"global batch .* 4 x 1 = 4 -> 4 x 2 = 8"),
        ({"manifest_sha": "0" * 64}, r"manifest.json sha256 '000000000000' -> "),
    ],
)
def test_resume_on_another_data_stream_is_refused_unless_allowed(tiny_data_dir, changes, message):
    saved = datamodule(tiny_data_dir)
    saved.advance(5)
    state = saved.state_dict()
    if "manifest_sha" in changes:
        state["manifest_sha"] = changes.pop("manifest_sha")
    world_size = changes.pop("world_size", 1)
    for allowed in (False, True):
        dm = datamodule(tiny_data_dir, allow_data_change=allowed, **changes)
        dm.rank_and_world_size = lambda: (0, world_size)  # noqa: B023
        if not allowed:
            with pytest.raises(DataError, match=f"{message}.*allow_data_change=true"):
                dm.load_state_dict(state)
        else:
            dm.load_state_dict(state)
            samples = 5 * 4  # the position is kept in samples, rounded up to whole batches
            per_batch = dm.batch_size * world_size
            assert dm.batches_consumed == -(-samples // per_batch)


@pytest.mark.parametrize(("world_size", "batch_size"), [(2, 2), (4, 1)])
def test_resume_on_another_world_size_with_the_same_global_batch_continues(
    tiny_data_dir, world_size, batch_size
):
    saved = datamodule(tiny_data_dir)  # 1 rank x 4 samples
    saved.advance(5)
    dm = datamodule(tiny_data_dir, batch_size=batch_size)
    dm.rank_and_world_size = lambda: (0, world_size)
    dm.load_state_dict(saved.state_dict())
    assert dm.batches_consumed == 5  # global batch 5 starts at sample 20 either way


def test_resume_of_another_model_is_refused_before_loading_weights():
    saved = {**MODEL, "vocab_size": 300}
    model = LitGPT(model={**saved, "n_embd": 64, "dropout": 0.0})
    # dropout may differ, n_embd may not
    with pytest.raises(ValueError, match="model.n_embd: 64 here, 32 in the checkpoint"):
        model.on_load_checkpoint({"hyper_parameters": {"model": saved}})
    with pytest.raises(ValueError, match="not a gptlab-train checkpoint"):
        model.on_load_checkpoint({"state_dict": {}})


def test_checkpoints_keep_the_names_that_older_checkpoints_were_written_with(tmp_path):
    """Checkpoints pickle no classes (weights_only), so moving a module breaks none of them; but
    Lightning stores the state of callbacks and of the data module under their class names, and
    gptlab adds two keys of its own. These are the names in checkpoints written before the
    package was reorganised: renaming any of them would leave older checkpoints' state behind."""
    assert NonFiniteGuard().state_key == "NonFiniteGuard"
    assert GPTDataModule.__qualname__ == "GPTDataModule"
    assert (TOKENIZER_KEY, RNG_KEY) == ("gptlab_tokenizer_json", "gptlab_rng_states")

    gpt = GPT(GPTConfig(**{**MODEL, "vocab_size": 300}))
    older = {  # the keys read_pretrained reads, as an older gptlab-train wrote them
        "hyper_parameters": {"model": gpt.config.to_dict(), "optimizer": {}, "scheduler": {}},
        "state_dict": {f"model.{k}": v for k, v in gpt.state_dict().items()},
        "gptlab_tokenizer_json": "{}",
    }
    torch.save(older, tmp_path / "older.ckpt")
    pretrained = read_pretrained(tmp_path / "older.ckpt")
    assert pretrained.config == gpt.config and pretrained.tokenizer_json == "{}"
    for name, tensor in gpt.state_dict().items():
        assert torch.equal(pretrained.state_dict[name], tensor)


def test_ckpt_path_last_is_the_newest_run_of_the_same_name(tmp_path):
    runs = tmp_path / "train" / "runs"

    def run(folder, name, mtime=None):
        checkpoints = runs / folder / "checkpoints"
        checkpoints.mkdir(parents=True)
        write_run_record(runs / folder, name, checkpoints, resumed_from=None)
        if mtime is not None:
            (checkpoints / "last.ckpt").write_bytes(b"")
            os.utime(checkpoints / "last.ckpt", (mtime, mtime))
        return checkpoints / "last.ckpt"

    run("a1", "exp", mtime=100)
    newest_exp = run("a2", "exp", mtime=200)
    run("a3", "exp")  # killed before its first checkpoint
    newest = run("b", "other", mtime=300)
    assert find_last_checkpoint(tmp_path, "train", "exp") == newest_exp
    assert find_last_checkpoint(tmp_path, "train") == newest  # any run (gptlab-generate)
    with pytest.raises(
        FileNotFoundError, match=f"no last.ckpt of a run named 'nope' under {runs.parent}"
    ):
        find_last_checkpoint(tmp_path, "train", "nope")


class _DiskFullAfter(io.FileIO):
    """A file on a disk that fills up after `room` bytes."""

    room = 2000

    def write(self, data):
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _fail_fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_gives_clear_error_removes_temp_and_keeps_previous(tmp_path, monkeypatch, where):
    checkpoint_io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint({"weights": torch.zeros(100)}, path)
    if where == "write":
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _DiskFullAfter(fd, "wb"))
    else:
        monkeypatch.setattr(os, "fsync", _fail_fsync)
    with pytest.raises(
        CheckpointWriteError, match=f"cannot write checkpoint {path}: no space"
    ) as e:
        checkpoint_io.save_checkpoint({"weights": torch.ones(10_000)}, path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp file left
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.zeros(100))


_SAVE_THEN_HANG = """
import io, os, sys, time, torch
from gptlab.training.checkpoint import AtomicCheckpointIO

path, marker = sys.argv[1:]
AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(100)}, path)

class SlowDisk(io.FileIO):
    def write(self, data):
        written = super().write(data)
        open(marker, "w").close()  # some of the new checkpoint is on disk: kill me now
        time.sleep(60)
        return written

os.fdopen = lambda fd, mode: SlowDisk(fd, "wb")
AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(100_000)}, path)
"""


@pytest.mark.slow
def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    path, marker = tmp_path / "last.ckpt", tmp_path / "writing"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_SAVE_THEN_HANG), str(path), str(marker)]
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (temp,) = tmp_path.glob(".last.ckpt.*.tmp")  # the torn write, under another name
    assert temp.stat().st_size > 0
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.zeros(100))

    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "writing"]  # cleaned up
