"""Shared test setup.

Without a GPU the Triton backend runs under the Triton interpreter; the variable must be set
before anything imports triton, which is why it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# One tolerance table for comparisons of a backend against the reference in the same dtype:
# tight enough that a single flipped mask bit (an O(1) change) always fails.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=msg or None)


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def offline_data(monkeypatch):
    """No test downloads: downloads are switched off, urlopen fails loudly, and the project's
    real copies (../shared/data) are kept out of the data search path."""
    from zoneout_fused.train import data

    monkeypatch.setenv(data.OFFLINE_ENV, "1")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(data, "candidate_dirs", lambda data_dir, name: [data.Path(data_dir), data.Path(data_dir) / name])
