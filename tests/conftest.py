"""Shared test setup.

Without a GPU the Triton backend runs under the Triton interpreter; the variable must be set
before anything imports triton, which is why it is set here, at collection time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tight tolerances for float64 comparisons with the reference: there the reference is the
# truth. Comparisons in float32 and the 16-bit types use the three-way rule of
# zoneout_fused/testing.py instead, whose bound follows each machine's own rounding.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    if dtype not in TOLERANCES:
        raise TypeError(f"assert_close compares float64 results; use zoneout_fused/testing.py's three-way rule for {dtype}")
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype], msg=msg or None)


# --------------------------------------------------------------------------------------
# Instruction sets of the CPU kernels: tests marked @isa_param run once per copy of the
# kernels (zoneout_fused.cpu_isa) that this CPU can run; the others are skipped, and the
# end of the session says which ones this machine could not test.
# --------------------------------------------------------------------------------------
CPU_ISAS = ("scalar", "avx2", "avx512")
isa_param = pytest.mark.parametrize("isa", CPU_ISAS, indirect=True)


def _supported_isas():
    from zoneout_fused import cpu_isa

    try:
        return cpu_isa.supported_cpu_isas()
    except RuntimeError:  # the CPU extension is not built: test_cpu.py reports that itself
        return None


@pytest.fixture
def isa(request):
    from zoneout_fused import cpu_isa

    name = request.param
    if name not in (_supported_isas() or ()):
        pytest.skip(f"this CPU cannot run the {name} kernels")
    with cpu_isa.use_cpu_isa(name):
        yield name


def pytest_terminal_summary(terminalreporter):
    supported = _supported_isas()
    if supported is None:
        return
    missing = [name for name in CPU_ISAS if name not in supported]
    terminalreporter.write_line(
        f"CPU kernels tested with instruction sets: {', '.join(supported)}"
        + (f"; this machine cannot run (not tested here): {', '.join(missing)}" if missing else ""))


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
