"""experiments/tensorboard_views/render.py writes what TensorBoard would show for a real run."""

from __future__ import annotations

import sys

from experiments.tensorboard_views import render
from gptlab.cli.train import train
from tests.kit import tiny_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_render_writes_curves_attention_maps_and_samples(tiny_data_dir, tmp_path, monkeypatch):
    overrides = [
        "data.loader.batch_size=8",
        "callbacks=diagnostics",
        "callbacks.attention_diagnostics.prompt_tokens=16",
        "callbacks.samples.every_n_steps=2",
        "callbacks.samples.max_new_tokens=4",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "scheduler.warmup_steps=1",
    ]
    run_dir, out = tmp_path / "run", tmp_path / "views"
    train(tiny_run(tiny_data_dir, run_dir, *overrides))
    monkeypatch.setattr(sys, "argv", ["render.py", str(run_dir), str(out)])
    render.main()

    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    maps = sorted(p.name for p in out.glob("attention_layer_*.png"))
    assert maps == ["attention_layer_0.png", "attention_layer_1.png"]
    assert all((out / name).read_bytes().startswith(PNG_MAGIC) for name in maps)
    samples = (out / "samples.md").read_text()
    assert "### samples/0 (step 4)" in samples
