"""GPTDataModule: batches of token windows streamed from prepared shards via memory maps.

Training stream
---------------
Training data is infinite and a pure function of the seed. Global sample ``g`` is the window
of ``block_size + 1`` tokens with flat index ``h(seed, g) mod n``, where the n valid window
starts are enumerated over all train shards (a window never crosses a shard boundary) and
``h`` is the SplitMix64 hash: a counter-based generator, so there is no state to carry.

Global batch ``k`` holds samples ``[k*B*W, (k+1)*B*W)`` (B = per-rank batch size,
W = world size) and rank ``r`` takes ``[k*B*W + r*B, k*B*W + (r+1)*B)``. Hence:

* ranks never overlap, and W ranks with batch B see exactly what one rank with batch W*B sees;
* the dataset yields whole batches (the DataLoader has ``batch_size=None``). With n workers,
  worker ``w`` makes batches ``start + w, start + w + n, ...`` and the DataLoader's
  round-robin restores the order ``start, start + 1, ...``, so neither batch content nor
  order depends on ``num_workers``;
* resuming is starting at ``k = batches_consumed``.

Counting consumed batches
-------------------------
``batches_consumed`` counts training batches handed to the model. Under a Lightning
``Trainer`` (``trainer.fit(model, datamodule=dm)``) it advances by itself: the
``on_before_batch_transfer`` hook runs once per training batch, before ``training_step``.
A checkpoint saved after batch k therefore records k + 1 and the resumed run starts with
batch k + 1; a new epoch (with ``limit_train_batches``) also continues where the last one
stopped. Without a Trainer, call ``advance()`` once per batch used. ``state_dict`` /
``load_state_dict`` carry the count through Lightning checkpoints (Lightning stores it under the
checkpoint key ``"GPTDataModule"`` and hands it back on ``fit(ckpt_path=...)``).

A resume continues the stream only if it is the same stream: ``load_state_dict`` refuses a
checkpoint whose seed, global batch (per-rank batch size x data-parallel ranks), block size or
data manifest differs, unless the datamodule was built with ``allow_data_change=True``. The
world size alone may change (elastic resume: 2 ranks x 4 samples continue as 1 rank x 8).

The DataLoaders get their own ``torch.Generator``: creating a loader iterator then never draws
from the global torch RNG, which belongs to the model (dropout) and is restored on resume.

Validation set
--------------
Non-overlapping windows (stride ``block_size``) over the val shards, at most ``val_windows``
of them evenly spaced over the whole val stream, the same every epoch. Rank r takes windows
``r::W``, cut to the same number per rank: DDP ranks must run equally many steps, or a
collective operation (such as a buffer broadcast) would wait forever.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gptlab.data.prepare import MANIFEST_NAME, load_manifest
from gptlab.data.shards import read_header, read_shard
from gptlab.data.tokenizer import file_sha256
from gptlab.errors import DataError, ShardError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_STATE_KEYS = ("batches_consumed", "seed", "world_size", "batch_size", "block_size", "manifest_sha")


@dataclass(frozen=True)
class ShardSpan:
    """A shard file and the number of tokens it holds."""

    path: Path
    tokens: int


def sample_windows(seed: int, samples: Sequence[int], num_windows: int) -> np.ndarray:
    """Flat window indices in [0, num_windows) of the global sample indices `samples`.

    Sample g maps to output g of a SplitMix64 generator keyed by `seed`, reduced modulo
    `num_windows` (the bias is below num_windows / 2**64, i.e. nil).
    """
    key = _mix64(np.array([seed], dtype=np.uint64) + _GAMMA)
    counters = np.asarray(samples, dtype=np.uint64) + np.uint64(1)
    return (_mix64(key + counters * _GAMMA) % np.uint64(num_windows)).astype(np.int64)


def _mix64(z: np.ndarray) -> np.ndarray:
    # SplitMix64 finaliser; uint64 array arithmetic wraps modulo 2**64 as intended.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _Windows:
    """All windows of `size` tokens that fit inside one shard, numbered across the shards.

    Memory maps are opened on first use, i.e. inside each DataLoader worker, and are never
    pickled (a pickled memmap would copy the whole shard).
    """

    def __init__(self, shards: list[ShardSpan], size: int) -> None:
        self.paths = [shard.path for shard in shards]
        self.size = size
        counts = np.array([max(0, shard.tokens - size + 1) for shard in shards], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts
        self.total = int(self.ends[-1]) if len(shards) else 0
        self._maps: list[np.memmap] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def gather(self, flat: np.ndarray) -> np.ndarray:
        """The windows with flat indices `flat`, as an int64 array (len(flat), size)."""
        if self._maps is None:
            self._maps = [read_shard(path) for path in self.paths]
        shard = np.searchsorted(self.ends, flat, side="right")
        offsets = flat - self.starts[shard]
        out = np.empty((len(flat), self.size), dtype=np.int64)
        for row, (s, offset) in enumerate(zip(shard, offsets, strict=True)):
            out[row] = self._maps[s][offset : offset + self.size]
        return out


def _to_batch(windows: np.ndarray) -> Batch:
    # Contiguous copies: callers may .view() the targets, which fails on strided slices.
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


def _worker_slot() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _check_slot(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


class TrainBatches(IterableDataset):
    """Infinite stream of training batches (x, y) for one rank, starting at batch `start_batch`.

    x and y are int64 tensors (batch_size, block_size) and y is x shifted by one token.
    """

    def __init__(
        self,
        shards: list[ShardSpan],
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ) -> None:
        _check_slot(rank, world_size)
        self.windows = _Windows(shards, block_size + 1)
        if self.windows.total == 0:
            raise DataError(_too_short("train", shards, block_size))
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch

    def samples(self, k: int) -> range:
        """The global sample indices that make up this rank's part of global batch `k`."""
        first = (k * self.world_size + self.rank) * self.batch_size
        return range(first, first + self.batch_size)

    def batch(self, k: int) -> Batch:
        """This rank's part of global batch `k`."""
        flat = sample_windows(self.seed, self.samples(k), self.windows.total)
        return _to_batch(self.windows.gather(flat))

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_slot()
        k = self.start_batch + worker
        while True:
            yield self.batch(k)
            k += num_workers


class ValBatches(IterableDataset):
    """The fixed validation batches of one rank (see the module docstring)."""

    def __init__(
        self,
        shards: list[ShardSpan],
        block_size: int,
        batch_size: int,
        max_windows: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_slot(rank, world_size)
        self.windows = _Windows(shards, block_size + 1)
        candidates = np.concatenate(
            [
                start + np.arange((s.tokens - 1) // block_size) * block_size
                for start, s in zip(self.windows.starts, shards, strict=True)
            ]
        )
        chosen = min(max_windows, len(candidates))
        per_rank = chosen // world_size
        if per_rank == 0:
            raise DataError(
                f"val split has {len(candidates)} windows of block_size + 1 = {block_size + 1} "
                f"tokens, fewer than the {world_size} ranks; use more val data or a smaller "
                "block_size"
            )
        # i * len // chosen is strictly increasing, so the chosen windows are distinct.
        evenly_spaced = candidates[np.arange(chosen) * len(candidates) // chosen]
        self.flat = evenly_spaced[rank::world_size][:per_rank]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.flat) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker_slot()
        for j in range(worker, len(self), num_workers):
            flat = self.flat[j * self.batch_size : (j + 1) * self.batch_size]
            yield _to_batch(self.windows.gather(flat))


def _too_short(split: str, shards: list[ShardSpan], block_size: int) -> str:
    total = sum(shard.tokens for shard in shards)
    longest = max((shard.tokens for shard in shards), default=0)
    return (
        f"{split} split has {total} tokens (longest shard {longest}); a window needs "
        f"block_size + 1 = {block_size + 1} tokens inside one shard. Use a smaller block_size "
        "or prepare more data (or larger shards)"
    )


class GPTDataModule(L.LightningDataModule):
    """Train and val batches from a directory made by `gptlab.data.prepare.prepare_dataset`.

    See the module docstring for the sampling design, resume and DDP behaviour.
    """

    def __init__(
        self,
        data_dir: str,
        block_size: int,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 1337,
        val_windows: int = 512,
        pin_memory: bool = False,
        allow_data_change: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("val_windows", val_windows),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_workers < 0 or seed < 0:
            raise ValueError(f"num_workers and seed must be >= 0, got {num_workers} and {seed}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        self.manifest_sha = file_sha256(self.data_dir / MANIFEST_NAME)
        self.tokenizer_path = self.data_dir / self.manifest["tokenizer"]["file"]
        self._check_tokenizer()
        self.vocab_size = int(self.manifest["vocab_size"])
        self.eot_id = int(self.manifest["eot_id"])
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_windows = val_windows
        self.pin_memory = pin_memory
        self.allow_data_change = allow_data_change
        self.batches_consumed = 0
        self._train_dataset: TrainBatches | None = None
        self.train_shards: list[ShardSpan] = []
        self.val_shards: list[ShardSpan] = []

    def _check_tokenizer(self) -> None:
        if not self.tokenizer_path.is_file():
            raise FileNotFoundError(
                f"{self.tokenizer_path} (listed in {self.data_dir / MANIFEST_NAME}) is missing; "
                "re-run gptlab-prepare"
            )
        expected = self.manifest["tokenizer"]["sha256"]
        actual = file_sha256(self.tokenizer_path)
        if actual != expected:
            raise DataError(
                f"{self.tokenizer_path} has sha256 {actual[:12]}..., but "
                f"{self.data_dir / MANIFEST_NAME} expects {expected[:12]}...: the shards were "
                "made with a different tokenizer; re-run gptlab-prepare"
            )

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer the shards were made with, as the JSON text a checkpoint carries."""
        return self.tokenizer_path.read_text(encoding="utf-8")

    def check_vocab(self, model_vocab_size: int) -> None:
        """Fail unless every token id in the data is a valid input/output of the model.

        A larger model vocabulary (e.g. padded to a multiple of 64) is fine.
        """
        if model_vocab_size < self.vocab_size:
            raise ValueError(
                f"the data in {self.data_dir} has vocab_size {self.vocab_size} "
                f"({self.tokenizer_path.name}), but the model's vocab_size is "
                f"{model_vocab_size}; set the model's vocab_size to at least {self.vocab_size}"
            )

    def setup(self, stage: str | None = None) -> None:
        """Check the shards against the manifest and that both splits fit a window."""
        if self.train_shards:
            return
        self.train_shards = self._shards("train")
        self.val_shards = self._shards("val")
        for split, shards in (("train", self.train_shards), ("val", self.val_shards)):
            if max(shard.tokens for shard in shards) < self.block_size + 1:
                raise DataError(_too_short(split, shards, self.block_size))

    def _shards(self, split: str) -> list[ShardSpan]:
        spans = []
        for entry in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / entry["file"]
            header = read_header(path)
            if (header.num_tokens, header.vocab_size) != (entry["tokens"], self.vocab_size):
                raise ShardError(
                    f"{path}: holds {header.num_tokens} tokens of vocab {header.vocab_size}, but "
                    f"{MANIFEST_NAME} says {entry['tokens']} of vocab {self.vocab_size}; the data "
                    "directory was modified, re-run gptlab-prepare"
                )
            spans.append(ShardSpan(path, header.num_tokens))
        return spans

    def rank_and_world_size(self) -> tuple[int, int]:
        """The data-parallel rank and size (the ranks of a tensor-parallel group share their
        batches): from the attached Trainer, else an initialised torch.distributed, else (0, 1)."""
        if self.trainer is not None:
            sampler = self.trainer.distributed_sampler_kwargs  # None on a single device
            if sampler is not None:
                return sampler["rank"], sampler["num_replicas"]
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world_size = self.rank_and_world_size()
        self._train_dataset = TrainBatches(
            self.train_shards,
            self.block_size,
            self.batch_size,
            self.seed,
            rank,
            world_size,
            start_batch=self.batches_consumed,
        )
        return DataLoader(
            self._train_dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=self._loader_generator(),
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        rank, world_size = self.rank_and_world_size()
        dataset = ValBatches(
            self.val_shards, self.block_size, self.batch_size, self.val_windows, rank, world_size
        )
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=self._loader_generator(),
        )

    def _loader_generator(self) -> torch.Generator:
        # Only seeds the loader workers (whose datasets draw no random numbers); what matters is
        # that it is not the global generator, see the module docstring.
        return torch.Generator().manual_seed(self.seed)

    def advance(self, n_batches: int = 1) -> None:
        """Record that `n_batches` more training batches were used (automatic under a Trainer)."""
        self._set_batches_consumed(self.batches_consumed + n_batches)

    def _set_batches_consumed(self, count: int) -> None:
        self.batches_consumed = count
        # Each new iteration of the loader (a new epoch, e.g. with limit_train_batches)
        # starts here, so it continues the stream instead of repeating it. Running
        # iterators are unaffected: they copied their start when they began.
        if self._train_dataset is not None:
            self._train_dataset.start_batch = count

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this once per batch it is about to run, in the main process;
        # prefetched but unused batches never get here.
        if self.trainer is not None and self.trainer.training:
            self.advance()
        return batch

    def state_dict(self) -> dict[str, Any]:
        _, world_size = self.rank_and_world_size()
        return {
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "world_size": world_size,
            "batch_size": self.batch_size,
            "block_size": self.block_size,
            "manifest_sha": self.manifest_sha,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume after the samples consumed so far; refuse a different stream (see the module
        docstring) unless `allow_data_change`.

        The position is kept in samples: another world size with the same global batch (B * W)
        continues exactly; with `allow_data_change`, a changed global batch resumes at the first
        global batch holding no sample trained on.
        """
        missing = [key for key in _STATE_KEYS if key not in state_dict]
        if missing:
            raise DataError(f"datamodule state from the checkpoint lacks keys {missing}")
        _, world_size = self.rank_and_world_size()
        samples = (
            state_dict["batches_consumed"] * state_dict["batch_size"] * state_dict["world_size"]
        )
        per_batch = self.batch_size * world_size
        changes = self._stream_changes(state_dict, world_size)
        if samples % per_batch:
            changes.append(
                f"{samples} samples consumed is not a multiple of the global batch {per_batch}"
            )
        if changes and not self.allow_data_change:
            raise DataError(
                "the checkpoint was trained on a different data stream: "
                + "; ".join(changes)
                + ". Resuming would not continue it. Restore the old settings, or pass "
                "resume.allow_data_change=true (GPTDataModule(allow_data_change=True)) to "
                "resume anyway, from the first global batch holding no sample trained on"
            )
        if changes:
            log.warning("resuming the data stream with changes: %s", "; ".join(changes))
        self._set_batches_consumed(-(-samples // per_batch))  # round up: never repeat a sample

    def _stream_changes(self, state_dict: dict[str, Any], world_size: int) -> list[str]:
        """What differs between a saved stream state and this datamodule at `world_size`."""
        now = {"seed": self.seed, "block_size": self.block_size, "manifest_sha": self.manifest_sha}
        # Elastic: the per-rank batch and the number of ranks may change together, as long as
        # each global batch holds the same samples (resuming 2 ranks x 4 as 1 rank x 8).
        saved_global = state_dict["batch_size"] * state_dict["world_size"]
        changes = []
        if saved_global != self.batch_size * world_size:
            changes.append(
                "global batch (data.loader.batch_size x data-parallel ranks) "
                f"{state_dict['batch_size']} x {state_dict['world_size']} = {saved_global} -> "
                f"{self.batch_size} x {world_size} = {self.batch_size * world_size}"
            )
        for key, value in now.items():
            saved = state_dict[key]
            if saved != value:
                if key == "manifest_sha":  # the data directory was re-prepared or replaced
                    key, saved, value = "manifest.json sha256", saved[:12], value[:12]
                changes.append(f"{key} {saved!r} -> {value!r}")
        return changes
