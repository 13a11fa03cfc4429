"""The token shard file format: a fixed 64-byte header followed by the raw token ids.

All integers are little-endian.

======  =====  ======================================================================
offset  bytes  field
======  =====  ======================================================================
0       8      magic ``b"GPTLABTK"``
8       4      format version, uint32 (currently 1)
12      4      dtype code, uint32: the token itemsize, 2 = uint16, 4 = uint32
16      8      token count N, uint64
24      8      vocab size, uint64 (every token id is < vocab size)
32      32     zero padding
64      N * s  N token ids of itemsize s
======  =====  ======================================================================

uint16 is used when the vocab size is at most 65536, otherwise uint32. A shard holds at
least one token. The file length must be exactly 64 + N * itemsize, which catches truncation.
Readers get a read-only ``np.memmap``, so shards larger than memory stream from disk.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.errors import ShardError
from gptlab.fileio import atomic_write, fsync_directory

MAGIC = b"GPTLABTK"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, token count, vocab size
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    num_tokens: int
    vocab_size: int


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that can hold every id of a `vocab_size` vocabulary."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in 1..2**32, got {vocab_size}")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


def write_shard(path: str | Path, tokens: np.ndarray | Sequence[int], vocab_size: int) -> None:
    """Write `tokens` to `path` atomically, checking every id is in [0, vocab_size)."""
    dtype = dtype_for_vocab(vocab_size)
    array = np.asarray(tokens)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{path}: a shard needs a non-empty 1-D token array, got shape {array.shape}"
        )
    if array.dtype.kind not in "iu":
        raise ValueError(f"{path}: token ids must be integers, got dtype {array.dtype}")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{path}: token ids must be in [0, {vocab_size}) for vocab_size {vocab_size}, "
            f"got min {low}, max {high}"
        )
    with atomic_write(path) as f:
        f.write(_header(array.size, vocab_size))
        f.write(np.ascontiguousarray(array, dtype=dtype).data)


def _header(num_tokens: int, vocab_size: int) -> bytes:
    itemsize = dtype_for_vocab(vocab_size).itemsize
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, itemsize, num_tokens, vocab_size)
    return header.ljust(HEADER_SIZE, b"\0")


class ShardBuilder:
    """A shard written token by token: ``<final name>.partial`` grows until `finish` gives it
    its header and final name in one rename, so a shard never exists half-written under its
    final name.

    `tokens` is how many tokens the partial file holds. After a crash, `resume` reopens the
    partial file at the length a journal recorded (bytes written after that are dropped).
    """

    def __init__(self, path: str | Path, vocab_size: int, tokens: int = 0) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.tokens = tokens
        mode = "r+b" if tokens else "wb"
        self.file = self.partial.open(mode)
        if tokens:
            self.file.truncate(HEADER_SIZE + tokens * self.dtype.itemsize)
            self.file.seek(0, 2)
        else:
            self.file.write(bytes(HEADER_SIZE))  # the header is written by `finish`

    @classmethod
    def resume(cls, path: str | Path, vocab_size: int, tokens: int) -> ShardBuilder:
        """Reopen the partial file of `path`; a ShardError if it holds fewer than `tokens`."""
        partial = Path(f"{path}.partial")
        needed = HEADER_SIZE + tokens * dtype_for_vocab(vocab_size).itemsize
        if tokens and (not partial.is_file() or partial.stat().st_size < needed):
            raise ShardError(f"{partial}: holds fewer than the {tokens} tokens recorded")
        return cls(path, vocab_size, tokens)

    def append(self, tokens: np.ndarray) -> None:
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise ValueError(
                f"{self.path}: token ids must be < vocab_size {self.vocab_size}, "
                f"got {int(tokens.max())}"
            )
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.tokens += tokens.size

    def flush(self) -> None:
        """Push what was appended to the OS, so it survives the death of this process."""
        self.file.flush()

    def finish(self) -> None:
        """Write the header, sync and rename the partial file to the shard's final name."""
        if not self.tokens:
            raise ValueError(f"{self.path}: a shard needs at least one token")
        self.file.seek(0)
        self.file.write(_header(self.tokens, self.vocab_size))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        fsync_directory(self.path.parent)

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink(missing_ok=True)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and validate the header of shard `path`, including the file length."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard file {path} does not exist")
    with path.open("rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or not raw.startswith(MAGIC):
        raise ShardError(f"{path}: not a gptlab shard (bad magic; expected {MAGIC!r} header)")
    _, version, dtype_code, num_tokens, vocab_size = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: unknown shard format version {version} (this gptlab reads {FORMAT_VERSION})"
        )
    if dtype_code not in _DTYPES:
        raise ShardError(f"{path}: unknown dtype code {dtype_code} (expected one of 2, 4)")
    if num_tokens == 0:
        raise ShardError(f"{path}: header says the shard holds no tokens")
    dtype = _DTYPES[dtype_code]
    size = path.stat().st_size
    if size != HEADER_SIZE + num_tokens * dtype.itemsize:
        held = (size - HEADER_SIZE) // dtype.itemsize
        raise ShardError(
            f"{path}: truncated or corrupt: header says {num_tokens} tokens, file holds {held}"
        )
    return ShardHeader(version, dtype, num_tokens, vocab_size)


def read_shard(path: str | Path) -> np.memmap:
    """Memory-map the tokens of shard `path` read-only as a 1-D array (dtype from the header)."""
    header = read_header(path)
    return np.memmap(
        path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.num_tokens,)
    )
