"""The test session's environment (offline, caches of its own) and the shared fixtures; the
helpers test modules share are in tests/kit.py."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from gptlab.data.prepare import prepare_dataset
from tests.kit import TINY_RUN, small_english_documents

# Tests never download: Hugging Face libraries fail fast instead of reaching for the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Measured CPU matmul peaks (for MFU) are cached per machine; tests keep theirs to themselves.
os.environ["GPTLAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="gptlab-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPTLAB_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real English prepared once per session, with the vocabulary the tiny runs' model has."""
    out_dir = tmp_path_factory.mktemp("data") / "tiny"
    vocab_size = TINY_RUN["vocab_size"]
    prepare_dataset(small_english_documents(), out_dir, vocab_size=vocab_size, progress=False)
    return out_dir
