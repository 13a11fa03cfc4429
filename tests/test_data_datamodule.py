"""GPTDataModule: random windows of the token stream, ranks, seeds, a fixed validation set, and
exact resume of the batch sequence through a Trainer."""

import random
import shutil

import lightning as L
import numpy as np
import pytest
import torch

from gptlab.data.datamodule import GPTDataModule, TrainBatches, ValBatches, sample_windows
from gptlab.data.prepare import prepare_dataset
from gptlab.data.shards import read_shard
from gptlab.errors import DataError, ShardError
from tests.kit import WORDS, cpu_trainer

BLOCK = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rng = random.Random(0)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(5, 30))) + "." for _ in range(300)]
    out_dir = tmp_path_factory.mktemp("datamodule") / "data"
    prepare_dataset(
        docs, out_dir, vocab_size=300, val_fraction=0.1, shard_tokens=1000, progress=False
    )
    return out_dir


@pytest.fixture
def dm(data_dir):
    datamodule = GPTDataModule(str(data_dir), block_size=BLOCK, batch_size=4, seed=7)
    datamodule.setup()
    return datamodule


def train_batches(dm, batch_size=4, seed=7, rank=0, world_size=1, start_batch=0):
    return TrainBatches(dm.train_shards, BLOCK, batch_size, seed, rank, world_size, start_batch)


def take(iterable, n):
    iterator = iter(iterable)
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def expected_windows(shards, flat, size):
    """Reference for the flat window numbering: walk the shards one by one."""
    rows = []
    for index in flat:
        for shard in shards:
            starts = shard.tokens - size + 1
            if index < starts:
                rows.append(np.asarray(read_shard(shard.path)[index : index + size]))
                break
            index -= starts
    return np.stack(rows)


def test_manifest_properties(dm, data_dir):
    assert dm.manifest["vocab_size"] == dm.vocab_size <= 300
    assert dm.tokenizer_path == data_dir / "tokenizer.json"
    assert len(dm.train_shards) > 3  # several shards, so windows meet shard boundaries


def test_train_batches_are_windows_of_the_stream(dm):
    dataset = train_batches(dm, batch_size=32)
    total = sum(shard.tokens - BLOCK for shard in dm.train_shards)
    assert dataset.windows.total == total
    for k in range(3):
        x, y = dataset.batch(k)
        assert x.shape == y.shape == (32, BLOCK)
        assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
        flat = sample_windows(7, dataset.samples(k), total)
        windows = expected_windows(dm.train_shards, flat, BLOCK + 1)
        np.testing.assert_array_equal(x.numpy(), windows[:, :-1])
        np.testing.assert_array_equal(y.numpy(), windows[:, 1:])


def test_sampling_covers_windows_uniformly():
    flat = sample_windows(0, range(100_000), 10)
    assert flat.min() == 0 and flat.max() == 9
    assert np.bincount(flat).min() > 9_500


def test_seed_determines_batches(dm):
    assert_same_batches(take(train_batches(dm), 3), take(train_batches(dm), 3))
    other = take(train_batches(dm, seed=8), 3)
    assert not all(
        torch.equal(a[0], b[0]) for a, b in zip(take(train_batches(dm), 3), other, strict=True)
    )


def test_ranks_partition_the_global_batch(dm):
    rank0, rank1 = (train_batches(dm, rank=r, world_size=2) for r in (0, 1))
    single = train_batches(dm, batch_size=8)
    for k in range(3):
        assert set(rank0.samples(k)).isdisjoint(rank1.samples(k))
        assert set(rank0.samples(k)) | set(rank1.samples(k)) == set(single.samples(k))
        x0, y0 = rank0.batch(k)
        x1, y1 = rank1.batch(k)
        x, y = single.batch(k)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    with pytest.raises(ValueError, match="rank must be in"):
        train_batches(dm, rank=2, world_size=2)


def test_workers_do_not_change_the_batch_sequence(data_dir):
    def first_batches(num_workers):
        dm = GPTDataModule(str(data_dir), BLOCK, batch_size=4, num_workers=num_workers, seed=7)
        return take(dm.train_dataloader(), 6), list(dm.val_dataloader())

    train0, val0 = first_batches(0)
    train2, val2 = first_batches(2)
    assert_same_batches(train0, train2)
    assert_same_batches(val0, val2)


def test_start_batch_resumes_the_same_sequence(dm):
    uninterrupted = take(train_batches(dm), 8)
    assert_same_batches(take(train_batches(dm, start_batch=5), 3), uninterrupted[5:])

    dm.advance(5)
    assert_same_batches(take(dm.train_dataloader(), 3), uninterrupted[5:])


def test_state_dict_round_trip_and_global_batch_conversion(dm, data_dir):
    dm.advance(6)
    state = dm.state_dict()
    assert state == {
        "batches_consumed": 6,
        "seed": 7,
        "world_size": 1,
        "batch_size": 4,
        "block_size": BLOCK,
        "manifest_sha": dm.manifest_sha,
    }
    with pytest.raises(DataError, match="global batch .* = 4 -> 8 x 1 = 8.*allow_data_change"):
        GPTDataModule(str(data_dir), BLOCK, batch_size=8, seed=7).load_state_dict(state)
    doubled = GPTDataModule(str(data_dir), BLOCK, batch_size=8, seed=7, allow_data_change=True)
    doubled.load_state_dict(state)  # same samples consumed, in batches twice as large
    assert doubled.batches_consumed == 3
    with pytest.raises(DataError, match="lacks keys"):
        doubled.load_state_dict({"batches_consumed": 1})


def test_val_set_is_fixed_evenly_spaced_and_split_across_ranks(dm):
    full = ValBatches(dm.val_shards, BLOCK, batch_size=4, max_windows=10**6)
    tokens = dm.val_shards[0].tokens
    assert len(dm.val_shards) == 1 and len(full.flat) == (tokens - 1) // BLOCK
    np.testing.assert_array_equal(full.flat, np.arange(len(full.flat)) * BLOCK)  # stride BLOCK
    stream = np.asarray(read_shard(dm.val_shards[0].path))
    x, y = torch.cat([b[0] for b in full]), torch.cat([b[1] for b in full])
    np.testing.assert_array_equal(x.numpy().ravel(), stream[: len(full.flat) * BLOCK])
    np.testing.assert_array_equal(
        y.numpy()[:, -1], stream[BLOCK : (len(full.flat) + 1) * BLOCK : BLOCK]
    )

    chosen = ValBatches(dm.val_shards, BLOCK, batch_size=4, max_windows=10)
    assert len(chosen.flat) == 10 and len(chosen) == 3
    assert chosen.flat[0] == 0 and chosen.flat[-1] > full.flat[-1] * 0.8  # spans the stream
    assert_same_batches(list(chosen), list(chosen))  # same every epoch

    ranks = [ValBatches(dm.val_shards, BLOCK, 4, 10, rank=r, world_size=3) for r in range(3)]
    assert [len(r.flat) for r in ranks] == [3, 3, 3]  # equal, so DDP ranks stay in step
    assert set().union(*(set(r.flat) for r in ranks)) == set(chosen.flat[:9])
    assert sum(len(r.flat) for r in ranks) == len(set().union(*(set(r.flat) for r in ranks)))


def test_too_little_val_data(data_dir):
    dm = GPTDataModule(str(data_dir), block_size=900, batch_size=4)  # train shards hold 1000
    with pytest.raises(DataError, match=r"val split has \d+ tokens.*block_size \+ 1 = 901"):
        dm.setup()


def test_check_vocab(dm, data_dir):
    dm.check_vocab(dm.vocab_size)
    dm.check_vocab(dm.vocab_size + 64)  # a padded model vocabulary is fine
    with pytest.raises(ValueError, match=rf"{data_dir}.*vocab_size {dm.vocab_size}.*is 100"):
        dm.check_vocab(100)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="run gptlab-prepare"):
        GPTDataModule(str(tmp_path), block_size=BLOCK, batch_size=4)


def test_changed_tokenizer_or_shard_is_detected(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / "train" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardError, match="shard_00000.bin"):
        GPTDataModule(str(copy), block_size=BLOCK, batch_size=4).setup()

    with (copy / "tokenizer.json").open("a") as f:
        f.write("\n")
    with pytest.raises(DataError, match=r"tokenizer\.json has sha256 .*different tokenizer"):
        GPTDataModule(str(copy), block_size=BLOCK, batch_size=4)


class _Recorder(L.LightningModule):
    """A bigram model that records the batches it trains on."""

    def __init__(self, vocab_size):
        super().__init__()
        self.logits = torch.nn.Embedding(vocab_size, vocab_size)
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x.clone())
        return torch.nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log(
            "val_loss", torch.nn.functional.cross_entropy(self.logits(x).flatten(0, 1), y.flatten())
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(data_dir, max_steps, ckpt_dir, ckpt_path=None, **trainer_options):
    dm = GPTDataModule(str(data_dir), BLOCK, batch_size=4, seed=7, val_windows=8)
    model = _Recorder(dm.vocab_size)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        ckpt_dir, every_n_train_steps=2, save_top_k=-1
    )
    trainer = cpu_trainer(
        max_steps=max_steps,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        callbacks=[checkpoints],
        **trainer_options,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return dm, model


def test_trainer_counts_batches_and_resumes_exactly(data_dir, tmp_path):
    dm, full = _fit(data_dir, 5, tmp_path / "full")
    # Validation and sanity-check batches are not counted.
    assert len(full.seen) == dm.batches_consumed == 5

    _, first = _fit(data_dir, 2, tmp_path / "resume")
    checkpoint = tmp_path / "resume" / "epoch=0-step=2.ckpt"
    assert torch.load(checkpoint, weights_only=False)["GPTDataModule"]["batches_consumed"] == 2
    dm, second = _fit(data_dir, 5, tmp_path / "resume", ckpt_path=str(checkpoint))
    assert (len(first.seen), len(second.seen), dm.batches_consumed) == (2, 3, 5)
    assert torch.equal(torch.stack(first.seen + second.seen), torch.stack(full.seen))

    # Short epochs re-iterate the loader; each epoch continues the stream.
    _, epochs = _fit(data_dir, 5, tmp_path / "epochs", limit_train_batches=2)
    assert torch.equal(torch.stack(epochs.seen), torch.stack(full.seen))
