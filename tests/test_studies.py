"""The study scripts of experiments/mup (LR transfer), experiments/schedules,
experiments/tokenizers and experiments/finetune: which runs a launch starts and a rerun skips,
and the analyses' numbers on run folders made by hand, checked against hand computations."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from experiments.finetune import analyze as finetune_analyze
from experiments.finetune import run as finetune_run
from experiments.launch import done_settings, products
from experiments.mup import transfer_analyze, transfer_run
from experiments.schedules import analyze as schedules_analyze
from experiments.schedules.run import branch_point, common, shorter_lengths
from experiments.tokenizers import analyze as tokenizers_analyze
from experiments.tokenizers import run as tokenizers_run
from tests.kit import compose_config, tiny_gpt, write_checkpoint, write_run_folder


def write_run(folder: Path, overrides: dict, results: dict | None = None, error=None):
    """A run folder as gptlab-train leaves it (write_run_folder), with a finished run's val
    losses in TensorBoard too."""
    write_run_folder(folder, [f"{k}={v}" for k, v in overrides.items()], results, error)
    if results is not None:
        writer = SummaryWriter(str(folder / "tensorboard"))
        writer.add_scalar("loss/val", results["val_loss"] + 1, 1)
        writer.add_scalar("loss/val", results["val_loss"], 2)
        writer.add_scalar("loss/train", results["val_loss"], 2)
        writer.close()


def test_a_rerun_skips_finished_and_failed_runs_only(tmp_path):
    write_run(tmp_path / "s_1" / "0", {"lr": "0.1", "seed": 1}, {"val_loss": 4.0})
    write_run(tmp_path / "s_1" / "1", {"lr": "0.1", "seed": 2}, error="diverged")
    write_run(tmp_path / "s_1" / "2", {"lr": "0.2", "seed": 1})  # killed: no results
    assert done_settings(tmp_path, ["lr", "seed"]) == {("0.1", "1"), ("0.1", "2")}


def test_missing_runs_become_few_sweeps():
    fresh = [(lr, seed) for lr in ("a", "b") for seed in ("1", "2")]
    assert products(fresh) == [(["a", "b"], ["1", "2"])]
    partial = [("b", "1"), ("a", "2"), ("b", "2")]  # seed 1 needs b only, seed 2 both
    assert products(partial) == [(["b"], ["1"]), (["a", "b"], ["2"])]
    assert products([]) == []


def parabola_losses(optimum: float, grid: list[float], offset: float) -> dict[float, list[float]]:
    """lr -> two seeds whose mean is exactly (log2 lr - optimum)^2 + offset."""
    return {2.0**x: [(x - optimum) ** 2 + offset - 0.01, (x - optimum) ** 2 + offset + 0.01]
            for x in grid}  # fmt: skip


def test_transfer_optimum_drift_and_wider_check_by_hand():
    grid = [-9.0, -8.0, -7.0, -6.0, -5.0]
    losses = {32: parabola_losses(-6.3, grid, 4.0), 64: parabola_losses(-7.6, grid, 3.9)}
    found = transfer_analyze.optima(losses)
    assert found[32].best == -6.0 and found[32].fitted == pytest.approx(-6.3)
    assert found[64].best == -8.0 and found[64].fitted == pytest.approx(-7.6)
    on_grid, fitted = transfer_analyze.drift(found)
    assert on_grid == pytest.approx(4.0) and fitted == pytest.approx(2**1.3)
    # Width 64 minus 32 at log2 lr x: (x+7.6)^2 - (x+6.3)^2 - 0.1 = 2.6x + 17.97: worse (> 0)
    # at x = -6 and -5 only, by 2.4 and 5.0, with sd 0.0141 a side: far past p = 0.05.
    _, tested, worse, significant = transfer_analyze.wider_table(losses)
    assert (tested, worse, significant) == (5, 2, 2)


def test_transfer_report_from_run_folders(tmp_path):
    grid = [-8.0, -7.0, -6.0]
    for p in ("sp", "mup"):
        for width, optimum in ((32, -7.0), (64, -7.0 if p == "mup" else -8.0)):
            for lr, seeds in parabola_losses(optimum, grid, 4.0).items():
                for seed, loss in enumerate(seeds, 1):
                    overrides = {"trainer.max_steps": 10, "model.n_embd": width}
                    overrides |= {"optimizer.lr": lr, "seed": seed}
                    folder = tmp_path / "mup_transfer" / p / f"w{width}" / f"{lr}-{seed}"
                    write_run(folder, overrides, {"val_loss": loss})
    write_run(tmp_path / "mup_transfer" / "sp" / "w32" / "lost", {"seed": 9}, error="diverged")
    for p in ("sp", "mup"):  # another base init std: its own study, 1 nat lower everywhere
        for width in (32, 64):
            for lr, seeds in parabola_losses(-6.0, grid, 3.0).items():
                for seed, loss in enumerate(seeds, 1):
                    overrides = {"trainer.max_steps": 10, "model.n_embd": width}
                    overrides |= {"optimizer.lr": lr, "seed": seed, "model.init_std": 0.05}
                    folder = tmp_path / "mup_transfer" / p / f"w{width}" / f"i{lr}-{seed}"
                    write_run(folder, overrides, {"val_loss": loss})
    out = tmp_path / "out"
    args = ["--log-dir", str(tmp_path), "--steps", "10", "--out-dir", str(out)]
    transfer_analyze.main([*args, "--init-std", "0.05"])
    text = (out / "transfer.md").read_text()
    assert "(10 steps of experiment=small_cpu, model.init_std=0.05)" in text
    assert "| 0.01562 | -6.0 | **3.000 ± 0.014 (n=2)** | **3.000 ± 0.014 (n=2)** |" in text
    transfer_analyze.main(args)
    text = (out / "transfer.md").read_text()
    assert "Not counted: 1 runs" in text and "diverged" in text
    sp, mup = text.split("## μP")
    assert "| 0.007812 | -7.0 | **4.000 ± 0.014 (n=2)** | 5.000 ± 0.014 (n=2) |" in sp
    assert "Drift of the optimal LR across widths (max / min): 2x on the grid" in sp
    assert "The optimum is at the grid's edge at width 64" in sp
    assert "Drift of the optimal LR across widths (max / min): 1x on the grid, 1x fitted" in mup
    assert (out / "transfer.png").stat().st_size > 10_000


def test_transfer_study_with_an_init_std_trains_its_own_runs(tmp_path, monkeypatch):
    root = tmp_path / "mup_transfer"
    done = {"trainer.max_steps": 10, "model.n_embd": 32, "optimizer.lr": 0.01, "seed": 1}
    write_run(root / "sp" / "w32" / "0", done, {"val_loss": 4.0})  # the default init std
    argv = ["--widths", "32", "64", "--lrs", "0.01", "--seeds", "1", "--steps", "10"]
    argv += ["--log-dir", str(tmp_path)]
    default = launched(transfer_run, monkeypatch, argv)
    assert [override(c, "model.n_embd") for c in default] == ["32", "64", "64"]  # sp 32 done
    assert not any(o.startswith("model.init_std") for c in default for o in c)
    tuned = launched(transfer_run, monkeypatch, [*argv, "--init-std", "0.05"])
    assert len(tuned) == 4 and all(override(c, "model.init_std") == "0.05" for c in tuned)
    composes(tuned[0], tmp_path)


def test_branch_points_and_the_validation_interval_that_keeps_them():
    args = argparse.Namespace(steps=1000)
    assert shorter_lengths(1000) == [500, 750]
    # WSD decays over its last 20%: 100 of 500 steps, 150 of 750.
    assert [branch_point(n, args) for n in (500, 750)] == [400, 600]
    assert "trainer.val_check_interval=200" in common(args)  # gcd(400, 600, 1000)
    with pytest.raises(SystemExit, match="too small"):
        shorter_lengths(1)


def test_schedules_report_from_run_folders(tmp_path):
    root = tmp_path / "schedules"

    def run(arm: str, length: int, seed: int, loss: float, wall: float, lr=None) -> None:
        overrides = {"trainer.max_steps": length, "seed": seed}
        if lr is not None:  # the LR scan's runs override it
            overrides["optimizer.lr"] = lr
        folder = root / arm / f"L{length}-s{seed}"
        write_run(folder, overrides, {"val_loss": loss, "wall_time_s": wall})
        (folder / ".hydra" / "config.yaml").write_text("optimizer:\n  lr: 0.003\n")

    cosine = {1: 4.00, 2: 4.02, 3: 4.04, 4: 4.01, 5: 4.03}  # mean 4.02, sd 0.0158
    for seed, loss in cosine.items():
        run("cosine", 1000, seed, loss, 600)
    for seed in (1, 2, 3):
        for length, wall in ((500, 300), (750, 450), (1000, 600)):
            run("wsd", length, seed, cosine[seed] + (1000 - length) / 500 + 0.001, wall)
        for length, wall, shift in ((500, 60, 0.0), (750, 90, 0.03 if seed == 2 else 0.0)):
            run("branch", length, seed, cosine[seed] + (1000 - length) / 500 + 0.001 + shift, wall)
    # The LR scan, seeds 1 and 2: both schedules are best at 0.006, cosine 0.1 below its 0.003
    # runs (mean 3.91) and WSD 0.001 above cosine there; cosine at 0.012 is worse.
    for seed in (1, 2):
        run("lr0.006/cosine", 1000, seed, cosine[seed] - 0.1, 600, lr=0.006)
        run("lr0.006/wsd", 1000, seed, cosine[seed] - 0.099, 600, lr=0.006)
        run("lr0.012/cosine", 1000, seed, cosine[seed] + 0.2, 600, lr=0.012)
    out = tmp_path / "out"
    schedules_analyze.main(["--log-dir", str(tmp_path), "--out-dir", str(out)])
    text = (out / "results.md").read_text()
    assert "| cosine | 0.003 | 4.0200 ± 0.0158 (n=5) |" in text
    assert "| cosine | 0.006 | 3.9100 ± 0.0141 (n=2) |" in text
    assert "| wsd | 0.003 | 4.0210 ± 0.0200 (n=3) |" in text
    assert "Best peak LR (lowest mean): cosine 0.006, WSD 0.006" in text
    assert "WSD at 0.006 vs cosine at 0.006: +0.0010 nats" in text
    assert "| 2 | 3.9210 | 3.9200 | +0.0010 |" in text  # best vs best, seed by seed
    assert "**4.0200 ± 0.0158 (n=5)**; range 0.0400" in text
    assert "| 2 | 4.0210 | 4.0200 | +0.0010 |" in text  # WSD vs cosine, seed by seed
    assert "**0.0000**, within the ±0.02 target" in text  # 500 steps: branches exact
    assert "**0.0300**, not within the ±0.02 target" in text  # 750 steps: seed 2 off by 0.03
    # Steps per seed: dedicated 500 + 750 + 1000 = 2250; stable 1000 + decays 100 + 150 = 1250.
    assert "dedicated runs train 2250 steps, one stable run and its branches 1250" in text
    assert "**44% fewer steps**" in text
    # Wall: dedicated 3 x (300 + 450 + 600) s = 67.5 min; branched 3 x (600 + 60 + 90) = 37.5.
    assert "dedicated 67.5 min, stable run and branches 37.5 min (44% less)" in text
    assert "| WSD vs cosine, 1000 steps |" in text
    assert (out / "curves.png").stat().st_size > 10_000


def launched(module, monkeypatch, argv: list[str]) -> list[list[str]]:
    """The gptlab-train commands a study's launcher runs (recorded, not run)."""
    commands: list[list[str]] = []
    monkeypatch.setattr(module, "gptlab_train", lambda overrides, log: commands.append(overrides))
    module.main(argv)
    return sorted(commands)


def override(command: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in command if o.startswith(f"{key}="))


def composes(command: list[str], tmp_path: Path) -> None:
    """The command's overrides, with the first value of each swept key, make a valid config."""
    single = [o.split(",")[0] for o in command if o != "-m" and not o.startswith("hydra.")]
    compose_config("train", single, tmp_path)


def test_tokenizer_study_launches_the_missing_runs_in_two_lanes(tmp_path, monkeypatch):
    argv = ["--log-dir", str(tmp_path)]
    fresh = launched(tokenizers_run, monkeypatch, argv)
    assert [(override(c, "tokenizer"), override(c, "seed")) for c in fresh] == [
        ("bpe,unigram", "1,2,3"), ("wordpiece,char", "1,2,3"),
    ]  # fmt: skip
    assert "trainer.max_steps=300" in fresh[0] and "model.n_embd=64" in fresh[0]
    composes(fresh[0], tmp_path)
    root = tmp_path / "tokenizers"
    for seed in (1, 2, 3):
        write_run(root / "a" / f"bpe{seed}", {"tokenizer": "bpe", "seed": seed,
                  "trainer.max_steps": 300}, {"val_loss": 4.0})  # fmt: skip
    write_run(root / "a" / "u1", {"tokenizer": "unigram", "seed": 1, "trainer.max_steps": 300},
              error="diverged")  # fmt: skip
    write_run(root / "a" / "u2", {"tokenizer": "unigram", "seed": 2, "trainer.max_steps": 30},
              {"val_loss": 5.0})  # another length: does not count  # fmt: skip
    rerun = launched(tokenizers_run, monkeypatch, argv)
    assert [(override(c, "tokenizer"), override(c, "seed")) for c in rerun] == [
        ("unigram", "2,3"), ("wordpiece,char", "1,2,3"),
    ]  # fmt: skip


def test_tokenizer_report_from_run_folders(tmp_path, monkeypatch):
    # bits/byte over 3 seeds: bpe mean 2.43, unigram 2.34, wordpiece 2.35, each sd 0.03; char
    # has one finished run, and one that failed.
    bpb = {"bpe": [2.40, 2.43, 2.46], "unigram": [2.31, 2.34, 2.37],
           "wordpiece": [2.32, 2.35, 2.38], "char": [3.80]}  # fmt: skip
    root = tmp_path / "tokenizers"
    for kind, values in bpb.items():
        for seed, value in enumerate(values, 1):
            overrides = {"tokenizer": kind, "seed": seed, "trainer.max_steps": 300}
            write_run(root / "lane" / f"{kind}-{seed}", overrides, {"val_loss": value * 2})
    write_run(root / "lane" / "char-2", {"tokenizer": "char", "seed": 2,
              "trainer.max_steps": 300}, error="diverged")  # fmt: skip

    def fake_score(run):
        kind, seed = run.overrides["tokenizer"], int(run.overrides["seed"])
        value = bpb[kind][seed - 1]
        return tokenizers_analyze.Scores(bpb=value, loss=2 * value, vocab=4096, bytes_per_token=3.5)

    monkeypatch.setattr(tokenizers_analyze, "score_run", fake_score)
    out = tmp_path / "out"
    tokenizers_analyze.main(["--log-dir", str(tmp_path), "--out-dir", str(out)])
    text = (out / "results.md").read_text()
    assert "| bpe | 4096 | 3.50 | 2.430 ± 0.030 (n=3) | 4.860 ± 0.060 (n=3) |" in text
    assert "| char | 4096 | 3.50 | 3.800 ± nan (n=1) |" in text
    # unigram vs bpe: se = 0.03 sqrt(2/3), t = -0.09 / se = -3.674, df = 4: one-sided
    # p = 1/2 + 3/4 s (1 - s^2/3) with s = t / sqrt(4 + t^2) = 0.0107 (closed form for df = 4).
    unigram = next(line for line in text.splitlines() if line.startswith("| unigram vs bpe |"))
    assert unigram.endswith("| -3.67 (4.0) | 0.0213 | 0.0107 | a lower |")
    # wordpiece vs unigram: t = 0.01 / se = 0.408, s = 0.2: p = 1/2 + 3/4 0.2 (1 - 0.04/3) = 0.648.
    wordpiece = next(line for line in text.splitlines() if line.startswith("| wordpiece vs"))
    assert wordpiece.endswith("| 0.648 | within seed noise |")
    assert "Not tested (fewer than 2 finished runs a side): bpe vs char." in text
    assert "Not counted: 1 runs" in text and "diverged" in text
    assert (out / "curves.png").stat().st_size > 10_000


def test_a_tokenizer_run_is_scored_on_its_data(tiny_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    write_run_folder(run_dir, ["tokenizer=bpe", "seed=1"], {"val_loss": 6.0})
    (run_dir / "checkpoints").mkdir()
    model = tiny_gpt(vocab_size=512, block_size=32)
    write_checkpoint(run_dir / "checkpoints" / "last.ckpt", model, None, tiny_data_dir)
    (run,) = tokenizers_analyze.load_runs(tmp_path)
    scores = tokenizers_analyze.score_run(run)
    assert scores.vocab == 512
    # An untrained model is near uniform: about ln 512 nats per token, and bits per byte are
    # those nats in bits, spread over the bytes of a token.
    assert scores.loss == pytest.approx(math.log(512), rel=0.05)
    assert scores.bpb == pytest.approx(scores.loss / math.log(2) / scores.bytes_per_token, rel=0.05)


def test_finetune_study_launches_each_settings_missing_seeds(tmp_path, monkeypatch):
    pretrained = tmp_path / "pre.ckpt"
    pretrained.write_bytes(b"")
    argv = ["--log-dir", str(tmp_path), "--init-from", str(pretrained)]
    fresh = launched(finetune_run, monkeypatch, argv)
    assert len(fresh) == 7 and all(override(c, "seed") == "1,2,3" for c in fresh)
    assert all(override(c, "finetune_data.loader.split_seed") == "1337" for c in fresh)
    starts = sorted(override(c, "init_from") for c in fresh)
    assert starts == [str(pretrained.resolve())] * 5 + ["null", "null"]
    for command in fresh:
        composes(command, tmp_path)
    for seed in (1, 2):
        folder = tmp_path / "finetune" / "classify_full" / "sweep" / str(seed)
        write_run_folder(folder, ["experiment=classify", f"seed={seed}"], {"val_acc": 0.9})
    rerun = launched(finetune_run, monkeypatch, argv)
    assert sorted(override(c, "seed") for c in rerun) == ["1,2,3"] * 6 + ["3"]


def test_finetune_report_from_run_folders(tmp_path):
    root = tmp_path / "finetune"
    pretrained = "init_from=/x/pre.ckpt"

    def run(setting: str, seed: int, acc: float = 0.0, acc_100: float = 0.0, loss: float = 0.7):
        folder = root / setting / "sweep" / str(seed)
        start = "init_from=null" if "scratch" in setting else pretrained
        write_run_folder(folder, [start, f"seed={seed}"], {"val_acc": acc, "val_loss": loss})
        writer = SummaryWriter(str(folder / "tensorboard"))
        writer.add_scalar("accuracy/val", acc_100, 99)  # Lightning's step for "after 100"
        writer.add_scalar("accuracy/val", acc_100 - 0.5, 199)
        writer.add_scalar("accuracy/val", acc, 299)
        writer.close()

    for seed in (1, 2, 3):
        run("classify_full", seed, acc=0.89 + 0.01 * seed, acc_100=0.88 + 0.01 * seed)
        run("classify_lora", seed, acc=0.86 + 0.01 * seed)
        run("classify_scratch", seed, acc=0.885 + 0.01 * seed, acc_100=0.85 + 0.01 * seed)
        run("sft_full", seed, loss=3.67 + 0.01 * seed)
        run("sft_lora", seed, loss=3.59 + 0.01 * seed)
        run("sft_scratch", seed, loss=5.44 + 0.01 * seed)
    run("classify_freeze3", 1, acc=0.84)
    write_run_folder(root / "classify_freeze3" / "sweep" / "2", ["seed=2"], error="diverged")
    out = tmp_path / "out"
    finetune_analyze.main(["--log-dir", str(tmp_path), "--out-dir", str(out)])
    text = (out / "results.md").read_text()
    assert "pretrained checkpoint: `/x/pre.ckpt`." in text
    full = "| classify_full | 90.000 ± 1.000 (n=3) | 91.000 ± 1.000 (n=3) | 0.700 ± 0.000 (n=3) |"
    assert full in text
    assert "| classify_freeze3 | 0.000 ± nan (n=1) | 84.000 ± nan (n=1) |" in text
    assert "| sft_lora | 3.610 ± 0.010 (n=3) |" in text

    def row(name: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))

    # Each side's sd is the same (1 point, or 0.01 nats), so df = 4 and, with s = t / sqrt(4 +
    # t^2), the one-sided p = 1/2 + 3/4 s (1 - s^2/3). LoRA 3 points below full: t = -3 /
    # sqrt(2/3) = -3.674, p = 0.0107; from scratch 0.5 below: t = -0.612, p = 0.287.
    assert row("classify val acc: LoRA vs full").endswith("| 0.0107 | a lower |")
    assert row("classify val acc @100: from scratch vs pretrained full").endswith("| a lower |")
    scratch = row("classify val acc: from scratch vs pretrained full")
    assert scratch.endswith("| 0.287 | within seed noise |")
    # SFT, LoRA 0.08 below full: t = -0.08 / (0.01 sqrt(2/3)) = -9.80, s^2 = 96/100: p = 0.000304.
    assert row("SFT val loss: LoRA vs full").endswith("| 0.000304 | a lower |")
    assert "Not tested (fewer than 2 finished runs a side): classify val acc: freeze 3" in text
    assert "Not counted: 1 runs" in text and "diverged" in text
