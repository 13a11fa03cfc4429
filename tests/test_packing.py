"""Sequence packing for SFT: GPT.forward(segments=...) computes each packed document exactly as
if it were alone, and SFTDataModule(packing=True) packs whole examples into rows."""

from __future__ import annotations

import math

import pytest
import torch

from gptlab.cli.train import train
from gptlab.data.tokenizer import eot_id, load_tokenizer
from gptlab.finetune.base import IGNORE_INDEX
from gptlab.finetune.sft import (
    PAD_SEGMENT,
    LitSFT,
    SFTDataModule,
    collate,
    collate_packed,
    encode,
    pack,
)
from gptlab.model import ATTENTION_BACKENDS, GPT, POSITIONS, segment_positions
from tests.kit import FT_GPT, TINY, finetune_config, tiny_config, tiny_gpt

LENGTHS = [5, 3, 7]  # three documents in a row of 16: the last position is padding


def packed_row(seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Documents (1, n) each, and a row (1, 16) holding them in order, with its segment ids."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, TINY["vocab_size"], (1, n), generator=g) for n in LENGTHS]
    row = torch.cat([*docs, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    segments = torch.tensor([[i for i, n in enumerate(LENGTHS) for _ in range(n)] + [-1]])
    return docs, row, segments


@pytest.mark.parametrize("attention", sorted(ATTENTION_BACKENDS))
@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("window", [None, 3])
def test_packed_documents_equal_documents_run_alone(attention, position, window):
    """A wrong mask (attending across documents) or wrong positions (not restarting) would change
    every document after the first."""
    model = tiny_gpt(n_kv_heads=2, attention=attention, position=position, sliding_window=window)
    # Two rows with different layouts: per-row positions and masks must not mix rows.
    docs_a, row_a, seg_a = packed_row(1)
    docs_b, row_b, seg_b = packed_row(2)
    row_b, seg_b, docs_b = row_b.flip(1), seg_b.flip(1), [d.flip(1) for d in docs_b[::-1]]
    with torch.no_grad():
        packed = model(torch.cat([row_a, row_b]), segments=torch.cat([seg_a, seg_b]))
        alone_a = torch.cat([model(d) for d in docs_a], dim=1)  # (1, 15, V)
        alone_b = torch.cat([model(d) for d in docs_b], dim=1)
    torch.testing.assert_close(packed[0, :15], alone_a[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[1, 1:], alone_b[0], atol=1e-5, rtol=0)


def test_segment_positions_restart_and_segments_are_checked():
    segments = torch.tensor([[7, 7, 7, 2, 2, -1], [0, 1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])
    assert torch.equal(segment_positions(segments), expected)
    model = GPT(tiny_config(n_kv_heads=2))
    idx = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="kv_cache"):
        model(idx, model.new_kv_cache(), segments=segments)
    with pytest.raises(ValueError, match=r"shape of idx \(2, 6\)"):
        model(idx, segments=segments[:, :5])


def test_pack_keeps_examples_whole_and_in_order_without_overlap():
    items = [([i] * n, [i] * n) for i, n in enumerate([4, 6, 3, 8, 1, 1, 10, 2])]
    rows = pack(items, max_length=10)
    assert [item for row in rows for item in row] == items  # whole, in order, none lost
    assert all(sum(len(x) for x, _ in row) <= 10 for row in rows)
    assert [len(row) for row in rows] == [2, 1, 3, 1, 1]  # a row ends where the next would not fit

    x, y, segments = collate_packed(rows[:3], pad_id=99)
    assert x.shape == (3, 10)
    for b, row in enumerate(rows[:3]):
        used = sum(len(ex) for ex, _ in row)
        # Each token sits in exactly one place: row b is its examples back to back, then padding.
        assert x[b, :used].tolist() == sum((ex for ex, _ in row), [])
        assert y[b, :used].tolist() == sum((t for _, t in row), [])
        ids = [i for i, (ex, _) in enumerate(row) for _ in ex]
        assert segments[b, :used].tolist() == ids
        assert (x[b, used:] == 99).all() and (y[b, used:] == IGNORE_INDEX).all()
        assert (segments[b, used:] == PAD_SEGMENT).all()


@pytest.fixture(scope="module")
def items(tiny_data_dir):
    tokenizer = load_tokenizer(tiny_data_dir / "tokenizer.json")
    eot = eot_id(tokenizer)
    examples = [
        [("Say hi.\n", False), ("hi", True)],
        [("Tell me a long story.\n", False), ("Once upon a time.", True)],
        [("### User:\nName a colour.\n\n### Assistant:\n", False), ("Blue.", True)],
    ]
    return [encode(segments, tokenizer, eot, 64) for segments in examples], eot


def test_per_token_loss_is_the_same_packed_or_padded(items):
    items, eot = items
    lit = LitSFT(FT_GPT).eval()
    padded = collate(items, pad_id=eot)
    packed = collate_packed(pack(items, 64), pad_id=eot)
    assert packed[0].size(0) < padded[0].size(0)  # two examples share a row
    with torch.no_grad():
        loss_padded, count_padded = lit.response_loss(padded)
        loss_packed, count_packed = lit.response_loss(packed)
        per_token_padded = torch.nn.functional.cross_entropy(
            lit.model(padded[0]).transpose(1, 2), padded[1], reduction="none"
        )
        per_token_packed = torch.nn.functional.cross_entropy(
            lit.model(packed[0], segments=packed[2]).transpose(1, 2), packed[1], reduction="none"
        )
        unpacked = lit.response_loss(packed[:2])[0]  # no segments: documents see each other
    real = padded[1] != IGNORE_INDEX
    torch.testing.assert_close(
        per_token_packed[packed[1] != IGNORE_INDEX], per_token_padded[real], atol=1e-5, rtol=0
    )
    assert count_packed == count_padded == real.sum()
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=0)
    assert not torch.allclose(unpacked, loss_padded, atol=1e-4)  # the segments matter


def test_packing_shortens_the_epoch_and_keeps_every_target(tiny_data_dir):
    def module(packing: bool) -> SFTDataModule:
        data = SFTDataModule(
            max_length=256,
            batch_size=8,
            tokenizer_path=str(tiny_data_dir / "tokenizer.json"),
            packing=packing,
        )
        data.setup()
        return data

    padded, packed = module(False), module(True)
    for loader in ("train_dataloader", "val_dataloader"):
        batches = {
            name: list(getattr(m, loader)()) for name, m in [("pad", padded), ("pack", packed)]
        }
        assert len(batches["pack"]) < len(batches["pad"])
        targets = [sum(int((b[1] != IGNORE_INDEX).sum()) for b in batches[k]) for k in batches]
        assert targets[0] == targets[1]
        assert all(b[0].size(1) <= 256 and len(b) == 3 for b in batches["pack"])


def test_packed_sft_runs_end_to_end(tiny_data_dir, tmp_path):
    cfg = finetune_config(
        tmp_path,
        tiny_data_dir,
        "sft",
        "debug=fast_dev_run",
        "model.block_size=128",
        "finetune_data.loader.packing=true",
    )
    results = train(cfg)
    # A freshly initialised model guesses about uniformly over the 512 tokens of tiny_data_dir:
    # the mean over the response tokens of the packed rows is near ln(512).
    assert results["step"] == 1 and abs(results["val_loss"] - math.log(512)) < 0.1
