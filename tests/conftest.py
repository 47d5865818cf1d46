"""Shared test setup.

Without a GPU the Triton backend runs under the Triton interpreter; the variable must be set
before anything imports triton, which is why it is set here, at collection time.
"""
import contextlib
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


@contextlib.contextmanager
def forbid_host_sync():
    """Within the block, any CUDA call that waits for the GPU raises (torch's sync debug mode)."""
    torch.cuda.synchronize()  # what came before may wait; only the block is checked
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# A Philox key with both 32-bit halves nonzero, for the tests of a seed read from GPU memory.
DEVICE_SEED = 2 ** 40 + 12345


def assert_device_seed_matches_cpu_seed(run_with_seed, device):
    """run_with_seed(seed, grads=...) -> dict of results. The seed DEVICE_SEED in `device` memory
    gives every result bit for bit as the same value on the CPU, and is really read there: the next
    value draws other masks."""
    on_cpu = run_with_seed(DEVICE_SEED, grads=True)
    on_device = run_with_seed(torch.tensor(DEVICE_SEED, device=device), grads=True)
    assert on_device.keys() == on_cpu.keys()
    for name in on_cpu:
        assert torch.equal(on_device[name], on_cpu[name]), f"{name}: device seed differs from the CPU seed"
    other = run_with_seed(torch.tensor(DEVICE_SEED + 1, device=device), grads=False)
    assert not torch.equal(other["y"], on_cpu["y"])


def assert_graph_replays_read_the_seed(forward, seed, eager):
    """A CUDA graph captured from forward() (-> dict of float64 outputs, y among them; it reads the
    GPU seed buffer `seed`) draws fresh masks from the buffer's value at each replay: each replay
    equals eager(value) (-> the same outputs uncaptured with that seed), a replay with the same value
    repeats its bits, and another value draws other masks."""
    side = torch.cuda.Stream()  # warm-up off the capture, as torch.cuda.graph's documentation asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = forward()
    replayed = {}
    for value in (5, DEVICE_SEED, 5):
        seed.fill_(value)
        graph.replay()
        expected = eager(value)
        for name, output in captured.items():
            # float64, tightly: any mask drawn from another seed is an O(1) difference.
            assert_close(output, expected[name], torch.float64, msg=f"{name}, seed {value}")
        if value in replayed:
            assert torch.equal(captured["y"], replayed[value]), "a replay with the same seed differs"
        replayed[value] = captured["y"].clone()
    assert not torch.equal(replayed[5], replayed[DEVICE_SEED])


def as_float64(tensors):
    """The floating tensors of a tensor, list, tuple or dict cast to float64 (others unchanged)."""
    if isinstance(tensors, dict):
        return {name: as_float64(t) for name, t in tensors.items()}
    if isinstance(tensors, (list, tuple)):
        return type(tensors)(as_float64(t) for t in tensors)
    if isinstance(tensors, torch.Tensor) and tensors.is_floating_point():
        return tensors.double()
    return tensors


def reference_mismatch(actual, run_reference, tensors, names):
    """None if the results `actual` (a sequence in the order of `names`, or a dict) match
    run_reference(tensors), else why not: in float64 tightly (TOLERANCES), in the other dtypes by
    the three-way rule (zoneout_fused/testing.py) against run_reference on float64 copies of the
    same inputs (same seed, same masks). The comparison every backend's tests share."""
    expected = run_reference(tensors)
    if isinstance(actual, dict):
        if actual.keys() != expected.keys():
            return f"results {sorted(actual)} vs reference {sorted(expected)}"
        actual, expected = list(actual.values()), list(expected.values())
    actual, expected = list(actual), list(expected)
    for name, a, e in zip(names, actual, expected):
        if (a is None) != (e is None) or (e is not None and (a.dtype != e.dtype or a.shape != e.shape)):
            return f"{name}: {a} vs reference {e}"
    dtype = next(e.dtype for e in expected if e is not None)
    from zoneout_fused.testing import assert_all_three_way

    try:
        if dtype == torch.float64:
            for name, a, e in zip(names, actual, expected):
                if e is not None:
                    assert_close(a, e, torch.float64, msg=name)
        else:
            exact = run_reference(as_float64(tensors))
            exact = list(exact.values()) if isinstance(exact, dict) else list(exact)
            assert_all_three_way(actual, expected, exact, names)
    except AssertionError as error:
        return str(error)
    return None


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


# The CPU kernels' time loops (zoneout_fused.cpu_isa.CPU_LOOPS): tests marked @loop_param run
# with each; "fused" applies to float32 sequences on the avx2 / avx512 kernels, the others run
# "steps" under either choice.
loop_param = pytest.mark.parametrize("loop", ("steps", "fused"), indirect=True)


@pytest.fixture
def loop(request):
    from zoneout_fused import cpu_isa

    with cpu_isa.use_cpu_loop(request.param):
        yield request.param


# The fused CPU loop's layouts of a step's work: (torch threads, how a step is shared between them,
# zoneout_fused.cpu_isa.CPU_SPLITS, the order a thread takes its weight panels in, CPU_ORDERS). One thread
# by units is the plain serial loop; two by units meet at a barrier each step; two by rows run their
# example rows apart; one by rows takes every row. Two of them take the panels last first every other step.
LOOP_LAYOUTS = ((1, "units", "same"), (2, "units", "alternate"), (2, "rows", "same"), (1, "rows", "alternate"))


def run_with_loop_layouts(run, layouts=LOOP_LAYOUTS) -> dict:
    """{layout: run()} for each layout, the fused CPU time loop chosen; the thread count, the
    split and the order are restored after. The results must be the same bits whatever the layout."""
    from zoneout_fused import cpu_isa

    threads = torch.get_num_threads()
    results = {}
    try:
        for count, split, order in layouts:
            torch.set_num_threads(count)
            with cpu_isa.use_cpu_loop("fused"), cpu_isa.use_cpu_split(split), cpu_isa.use_cpu_order(order):
                results[(count, split, order)] = run()
    finally:
        torch.set_num_threads(threads)
    return results


def assert_same_bits(names, results: dict) -> None:
    """Every run in `results` ({layout: list of tensors or None, named by `names`}) equals the first,
    bit for bit."""
    (first_layout, first), *others = results.items()
    for layout, result in others:
        for name, a, b in zip(names, first, result):
            assert (a is None and b is None) or torch.equal(a, b), (name, first_layout, layout)


def pytest_terminal_summary(terminalreporter):
    supported = _supported_isas()
    if supported is None:
        return
    missing = [name for name in CPU_ISAS if name not in supported]
    terminalreporter.write_line(
        f"CPU kernels tested with instruction sets: {', '.join(supported)}"
        + (f"; this machine cannot run (not tested here): {', '.join(missing)}" if missing else ""))


@pytest.fixture(scope="module")
def cuda_extension():
    """The CUDA extension, imported once; where torch sees a GPU a missing build fails the tests
    that use this fixture (without a GPU they skip on their own)."""
    if torch.cuda.is_available():
        from zoneout_fused import ops

        reason = ops._load_extension("cuda")
        if reason is not None:
            pytest.fail(reason)


@pytest.fixture
def nan_fill():
    """Fresh torch allocations (at::empty included) are filled with NaN, so an output element a
    kernel forgets to write fails the comparison (fla's trick, via torch's deterministic mode;
    cuBLAS then needs CUBLAS_WORKSPACE_CONFIG set before its first handle, as the GPU test files do)."""
    previous = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)
    torch.utils.deterministic.fill_uninitialized_memory = fill


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
