"""Shared test set-up: an isolated attnc cache, the Triton interpreter on CPU-only machines,
and the `gpu` marker skipped without CUDA."""
import os
import tempfile

os.environ.setdefault("ATTNC_CACHE_DIR", tempfile.mkdtemp(prefix="attnc-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def kernel_env(monkeypatch, tmp_path_factory):
    """For kernel tests: the Triton interpreter without CUDA; on a GPU one kernel config per formula
    (autotuning every case would take minutes); a cache folder shared by the session's kernel tests.
    Kernel test modules use it with `pytestmark = pytest.mark.usefixtures("kernel_env")`."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.setenv("ATTNC_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnc-cache"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
