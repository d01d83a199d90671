"""Shared test set-up: an isolated attnc cache, the Triton interpreter on CPU-only machines,
and the `gpu` marker skipped without CUDA."""
import os
import tempfile

os.environ.setdefault("ATTNC_CACHE_DIR", tempfile.mkdtemp(prefix="attnc-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
