"""Token shards (gptlab.data.shards): the header layout, round trips, every corrupt or
out-of-vocabulary case named, and atomic writes."""

import struct

import numpy as np
import pytest

from gptlab.data.shards import (
    HEADER_SIZE,
    MAGIC,
    read_header,
    read_shard,
    write_shard,
)
from gptlab.errors import ShardError


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(300, np.uint16), (65536, np.uint16), (65537, np.uint32)]
)
def test_round_trip(tmp_path, vocab_size, dtype):
    tokens = np.array([0, 1, vocab_size - 1, 7, 7], dtype=np.int64)
    path = tmp_path / "shard.bin"
    write_shard(path, tokens, vocab_size)

    header = read_header(path)
    assert (header.version, header.num_tokens, header.vocab_size) == (1, 5, vocab_size)
    assert header.dtype == np.dtype(dtype)
    data = read_shard(path)
    assert isinstance(data, np.memmap)
    assert data.dtype == np.dtype(dtype) and data.shape == (5,)
    np.testing.assert_array_equal(data, tokens)
    assert path.stat().st_size == HEADER_SIZE + 5 * np.dtype(dtype).itemsize


def test_header_layout_is_little_endian_and_padded(tmp_path):
    path = tmp_path / "shard.bin"
    write_shard(path, [3, 4], vocab_size=10)
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    assert struct.unpack("<IIQQ", raw[8:32]) == (1, 2, 2, 10)
    assert raw[32:64] == bytes(32)
    assert raw[64:] == b"\x03\x00\x04\x00"


def test_accepts_python_sequence(tmp_path):
    write_shard(tmp_path / "s.bin", [5, 6, 7], vocab_size=8)
    assert read_shard(tmp_path / "s.bin").tolist() == [5, 6, 7]


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "shard.bin"
    write_shard(path, np.arange(10), vocab_size=10)
    return path


def test_bad_magic(shard):
    _corrupt(shard, 0, b"NOTASHRD")
    with pytest.raises(ShardError, match=r"shard\.bin.*bad magic"):
        read_shard(shard)


def test_unknown_version(shard):
    _corrupt(shard, 8, struct.pack("<I", 99))
    with pytest.raises(ShardError, match=r"shard\.bin.*version 99"):
        read_shard(shard)


def test_unknown_dtype_code(shard):
    _corrupt(shard, 12, struct.pack("<I", 8))
    with pytest.raises(ShardError, match=r"shard\.bin.*dtype code 8"):
        read_shard(shard)


def test_truncated(shard):
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ShardError, match=r"shard\.bin.*header says 10 tokens, file holds 8"):
        read_shard(shard)


def test_shard_error_is_a_value_error():
    assert issubclass(ShardError, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_shard(tmp_path / "nope.bin")


@pytest.mark.parametrize("tokens", [[0, 10], [-1, 3]])
def test_token_out_of_vocab(tmp_path, tokens):
    with pytest.raises(ValueError, match=r"bad\.bin.*\[0, 10\)"):
        write_shard(tmp_path / "bad.bin", tokens, vocab_size=10)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tokens", [[], [[1, 2]], [0.5, 1.0]])
def test_rejects_empty_nested_or_float_tokens(tmp_path, tokens):
    with pytest.raises(ValueError, match=r"bad\.bin"):
        write_shard(tmp_path / "bad.bin", tokens, vocab_size=10)


def test_atomic_write_leaves_no_temp_files_and_keeps_old_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "shard.bin"
    write_shard(path, [1, 2, 3], vocab_size=10)
    write_shard(path, [4, 5], vocab_size=10)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("gptlab.fileio.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_shard(path, [9, 9, 9, 9], vocab_size=10)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"]
    assert read_shard(path).tolist() == [4, 5]
