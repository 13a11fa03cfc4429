"""Multi-process training on CPU (gloo), run through the CLI as a user would.

FSDP2 and tensor parallel are tested in test_sharded.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.training.checkpoint import load_model
from tests.kit import TINY_MODEL, run_script

STEPS = 6


def run_train(tmp_path: Path, name: str, *overrides: str) -> tuple[Path, str]:
    """Run gptlab-train in its own directory; returns that directory and the output."""
    cwd = tmp_path / name
    cwd.mkdir()
    args = [
        *TINY_MODEL,
        f"corpus.dir={tmp_path / 'data'}",
        f"trainer.max_steps={STEPS}",
        f"trainer.val_check_interval={STEPS}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "scheduler.warmup_steps=2",
        "data.loader.val_windows=64",
        "callbacks.samples.max_new_tokens=4",
        "+callbacks.recorder._target_=tests.kit.BatchRecorder",
        f"+callbacks.recorder.out_dir={cwd}",
        *overrides,
    ]
    proc = run_script("gptlab-train", *args, cwd=cwd, timeout=180)
    return cwd, proc.stdout + proc.stderr


@pytest.fixture
def prepared(tiny_data_dir: Path, tmp_path: Path) -> Path:
    (tmp_path / "data").symlink_to(tiny_data_dir)
    return tmp_path


@pytest.mark.slow
def test_two_rank_ddp_matches_one_rank_with_the_same_global_batch(prepared):
    ddp_dir, ddp_out = run_train(prepared, "ddp", "trainer=ddp_cpu", "data.loader.batch_size=4")
    one_dir, _ = run_train(prepared, "single", "trainer=cpu", "data.loader.batch_size=8")

    # Sample for sample: rank 0 gets the first half of each global batch, rank 1 the second.
    rank0, rank1 = (torch.load(ddp_dir / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(one_dir / "rank0.pt")
    assert rank0["inputs"].shape == (STEPS, 4, 32)
    assert not torch.equal(rank0["inputs"], rank1["inputs"])
    torch.testing.assert_close(torch.cat([rank0["inputs"], rank1["inputs"]], 1), single["inputs"])
    # The global loss (mean over the two halves) and the resulting weights agree in fp32.
    ddp_loss = (rank0["losses"] + rank1["losses"]) / 2
    torch.testing.assert_close(ddp_loss, single["losses"], rtol=1e-5, atol=1e-5)
    ddp_model, _ = load_model(next(ddp_dir.glob("logs/train/runs/*/checkpoints/last.ckpt")))
    one_model, _ = load_model(next(one_dir.glob("logs/train/runs/*/checkpoints/last.ckpt")))
    for p, q in zip(ddp_model.parameters(), one_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    ddp_val = scalars(ddp_dir, "loss/val")
    torch.testing.assert_close(ddp_val, scalars(one_dir, "loss/val"), rtol=1e-5, atol=1e-5)

    # One run directory, one log file, one TensorBoard event file, one report.
    (run,) = (ddp_dir / "logs" / "train" / "runs").iterdir()
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log"]
    assert len(list(run.glob("tensorboard/events.out.tfevents.*"))) == 1
    assert ddp_out.count("val loss") == 1 and ddp_out.count("--- sample ---") == 3


def scalars(run_root: Path, tag: str) -> torch.Tensor:
    (events_dir,) = run_root.glob("logs/train/runs/*/tensorboard")
    events = EventAccumulator(str(events_dir)).Reload()
    return torch.tensor([event.value for event in events.Scalars(tag)])


@pytest.mark.slow
def test_multirun_with_lightning_launched_ddp_is_refused(prepared):
    cwd = prepared / "multirun"
    cwd.mkdir()
    args = ["-m", "trainer=ddp_cpu", *TINY_MODEL, f"corpus.dir={prepared / 'data'}"]
    proc = run_script("gptlab-train", *args, cwd=cwd, timeout=120, check=False)
    assert proc.returncode != 0
    assert "multirun (-m) cannot start 2 DDP processes" in proc.stdout + proc.stderr
