"""pytest-benchmark suite over the same cases and peers as `python -m zoneout_fused.bench`.

    pytest benchmarks/test_bench_lstm.py --benchmark-only                     # small, on CPU
    ZF_BENCH_CONFIG=sweep pytest benchmarks/ --benchmark-json=out.json       # another config
    ZF_BENCH_DEVICE=cuda ZF_BENCH_CONFIG=char-ptb pytest benchmarks/         # on a GPU
    (also ZF_BENCH_DTYPE, ZF_BENCH_ROUNDS, ZF_BENCH_COMPILE_TIMEOUT: seconds before
    reference-compiled is skipped; inductor can take many minutes on the unrolled loop)

Not collected by CI (`pytest tests`). Every peer is checked against the reference before it is
timed (the bench's check: same weights, same seed, output and all gradients); a mismatch fails
the test instead of producing a number. The bench program interleaves peers round-robin; here
pytest-benchmark times one test at a time, so on a busy machine prefer the program's figures.
"""
import os

import pytest
import torch

from zoneout_fused.bench.cases import cases_for
from zoneout_fused.bench.runner import (DEFAULT_COMPILE_TIMEOUT, DTYPES, MODES, CaseData, make_step,
                                        select_peers, time_limit)

DEVICE = torch.device(os.environ.get("ZF_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
CONFIG = os.environ.get("ZF_BENCH_CONFIG", "small")
DTYPE = DTYPES[os.environ.get("ZF_BENCH_DTYPE", "float32")]
ROUNDS = int(os.environ.get("ZF_BENCH_ROUNDS", "5" if DEVICE.type == "cpu" else "20"))
COMPILE_TIMEOUT = float(os.environ.get("ZF_BENCH_COMPILE_TIMEOUT", DEFAULT_COMPILE_TIMEOUT[DEVICE.type]))
ZONEOUT = dict(zoneout_cell=0.5, zoneout_hidden=0.05, recurrent_dropout=0.0, mask_mode="independent")

CASES = cases_for(CONFIG)
PEERS = select_peers(DEVICE, None)


@pytest.fixture(scope="module")
def case_data():
    """One CaseData per case, built on first use, so the reference check runs once per case."""
    cache = {}

    def get(case):
        if case.name not in cache:
            zoneout = dict(ZONEOUT)
            for key in ("zoneout_cell", "zoneout_hidden", "mask_mode"):  # the paper's per-task settings
                if getattr(case, key) is not None:
                    zoneout[key] = getattr(case, key)
            cache[case.name] = CaseData(case, DTYPE, DEVICE, zoneout_kwargs=zoneout)
        return cache[case.name]

    return get


@pytest.fixture(scope="module")
def checked_modules(case_data):
    cache, skipped = {}, {}

    def get(case, peer):
        key = (case.name, peer.name)
        if key in skipped:
            pytest.skip(skipped[key])
        if key not in cache:
            data = case_data(case)
            module = peer.build(data.lstm, data.zoneout_kwargs)
            compiled = peer.name == "reference-compiled"
            try:
                # torch.compile unrolls the reference's time loop and can take very long: a budget.
                with time_limit(COMPILE_TIMEOUT if compiled else None, "torch.compile of the reference"):
                    ok, _, detail = data.check(peer, module) if peer.name != "reference" else (True, 0, "")
                    if compiled and data.check_steps < case.steps:  # compile the timed shape too
                        prepare, step = make_step(module, data.x, data.grad_output, "fwd+bwd")
                        prepare()
                        step()
            except Exception as error:
                if compiled and "CompileTimeout" in repr(error):
                    skipped[key] = f"{type(error).__name__}: {error}".splitlines()[0]
                    pytest.skip(skipped[key])
                raise
            if not ok:
                pytest.fail(f"{peer.name} differs from the reference on {case.name}: {detail}")
            cache[key] = module
        return cache[key]

    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.name)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lstm(benchmark, case_data, checked_modules, case, peer, mode):
    if peer.unavailable:
        pytest.skip(peer.unavailable)
    data = case_data(case)
    module = checked_modules(case, peer)
    prepare, step = make_step(module, data.x, data.grad_output, mode)
    if DEVICE.type == "cuda":
        inner = step

        def step():
            inner()
            torch.cuda.synchronize(DEVICE)

    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(dict(backend=peer.name, mode=mode, dtype=str(DTYPE).replace("torch.", ""),
                                     device=str(DEVICE), **case.shape_fields(), **data.zoneout_kwargs))
    # setup= clears gradients outside the timed call; one warm-up round (compiles reference-compiled).
    benchmark.pedantic(step, setup=prepare, rounds=ROUNDS, warmup_rounds=1, iterations=1)
