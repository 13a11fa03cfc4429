"""experiments/ablations/task_scores.py: rankings, noise calls and scoring a (fake) sweep."""

from __future__ import annotations

import math

import pytest
from torch.utils.tensorboard import SummaryWriter

from experiments.ablations.task_scores import (
    LOSS,
    Variant,
    ranking_line,
    report,
    score_sweep,
    spearman,
    within_noise,
)
from gptlab.data.prepare import load_manifest
from tests.kit import tiny_gpt, write_checkpoint, write_run_folder


def test_spearman_of_hand_rankings():
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1)
    # No ties: 1 - 6 sum(d^2) / (n (n^2 - 1)) with one swapped pair, d^2 = 1 + 1.
    assert spearman([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 3.0, 4.0]) == pytest.approx(1 - 6 * 2 / 60)
    # Ties share ranks: y ranks (1.5, 1.5, 3); Pearson of (1, 2, 3) and (1.5, 1.5, 3) = sqrt(3)/2.
    assert spearman([1.0, 2.0, 3.0], [0.0, 0.0, 5.0]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(spearman([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))  # all tied: no ranking


def test_neighbours_are_called_resolved_only_beyond_two_standard_errors():
    a = Variant("a", {LOSS: [1.0, 1.1, 1.2]})  # mean 1.1, sd 0.1
    b = Variant("b", {LOSS: [1.2, 1.3, 1.4]})  # 0.2 apart; 2 se = 2 sqrt(2 * 0.01 / 3) = 0.163
    c = Variant("c", {LOSS: [1.25, 1.35, 1.45]})  # 0.05 from b
    assert not within_noise(a, b, LOSS) and within_noise(b, c, LOSS)
    assert ranking_line([c, a, b], LOSS, higher_is_better=False) == "a > b ~ c"
    single = Variant("d", {LOSS: [0.5]})  # one seed: no sd, never resolved
    assert within_noise(single, a, LOSS)
    zeros = [Variant(name, {LOSS: [0.0, 0.0, 0.0]}) for name in ("e", "f")]
    assert within_noise(*zeros, LOSS)  # equal means with no spread are a tie, not resolved


def test_a_sweep_is_scored_per_variant_and_seed(tiny_data_dir, tmp_path):
    vocab = load_manifest(tiny_data_dir)["vocab_size"]
    tokenizer_json = (tiny_data_dir / "tokenizer.json").read_text()
    for job, (width, seed) in enumerate([(16, 1), (16, 2), (32, 1), (32, 2)]):
        job_dir = tmp_path / str(job)
        write_run_folder(job_dir, [f"model.n_embd={width}", f"seed={seed}"])
        with SummaryWriter(job_dir / "tensorboard") as writer:
            writer.add_scalar("loss/val", 5.0 + width / 100 + seed / 1000, 10)
        model = tiny_gpt(seed, vocab_size=vocab, block_size=32, n_embd=width)
        (job_dir / "checkpoints").mkdir()
        write_checkpoint(
            job_dir / "checkpoints" / "last.ckpt", model, tokenizer_json, tiny_data_dir
        )
    variants = score_sweep(tmp_path)
    assert [v.name for v in variants] == ["16", "32"]
    for v in variants:
        assert v.values[LOSS] == pytest.approx([5.0 + int(v.name) / 100 + s / 1000 for s in (1, 2)])
        assert all(len(values) == 2 for values in v.values.values())
        assert all(0 <= x <= 1 for x in v.values["cloze acc_norm"])
        assert all(x > 0 and math.isfinite(x) for x in v.values["last-word bits/byte"])
    text = report("fake", tmp_path, variants)
    assert "| 16 | 5.1615 ± 0.0007 |" in text and "- val loss: 16 > 32" in text
