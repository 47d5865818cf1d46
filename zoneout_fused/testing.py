"""The one accuracy rule for comparisons in a rounding dtype (house style's three-way rule),
used by the tests and by the benchmark's check of every peer before it is timed.

Two float32 computations of the same recurrence agree only as well as their summation orders
allow, and those differ between machines (BLAS kernels, FMA contraction, vector width). So a
backend's result in dtype D is not compared with the reference in D, but both are compared
with the reference run in float64 on the same inputs (cast up) and the same masks (same seed):

    err(backend) <= k * err(reference in D) + atol * scale,    scale = max |float64 result|

with err the largest absolute difference from the float64 result. The bound moves with the
machine's own rounding, so it holds on any CPU or GPU; it stays far below what one flipped
mask bit, one wrong derivative sign or a wrong step order do to a result (an O(0.01-1)
change of O(1) values: tests/test_cpu.py::test_three_way_rule_catches_one_flipped_mask_bit).
float64 comparisons stay tight (conftest.TOLERANCES): there the reference is the truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ThreeWay:
    k: float     # how many times the same-dtype reference's error the backend may make
    atol: float  # slack relative to the result's scale, for results the reference gets exactly


# One table for every backend and test. float32: k = 4 because a backend may round each of
# its recurrent steps differently from the reference (FMA, blocked sums), and 2**-19 ~ 2e-6 of
# the scale absorbs results the float32 reference happens to get exactly. The 16-bit types
# keep the saved states and products in float32, so their error is the inputs' rounding.
THREE_WAY = {
    torch.float32: ThreeWay(k=4.0, atol=2.0 ** -19),
    torch.float16: ThreeWay(k=2.0, atol=1e-3),
    torch.bfloat16: ThreeWay(k=2.0, atol=1e-2),
}


def three_way_error(actual: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, name: str = "") -> str | None:
    """None if `actual` passes the rule, else a message with the worst element's numbers."""
    dtype = actual.dtype
    if dtype not in THREE_WAY:
        raise ValueError(f"{name}: no three-way tolerance for {dtype} (float64 compares tightly)")
    if actual.shape != exact.shape or same_dtype.shape != exact.shape:
        return f"{name}: shapes differ: {tuple(actual.shape)}, {tuple(same_dtype.shape)}, {tuple(exact.shape)}"
    exact = exact.detach().double().cpu()
    diff = (actual.detach().double().cpu() - exact).abs()
    diff_ref = (same_dtype.detach().double().cpu() - exact).abs()
    if not torch.isfinite(exact).all():
        raise ValueError(f"{name}: the float64 reference is not finite")
    if diff.numel() == 0:
        return None
    err = diff.nan_to_num(float("inf")).max().item()
    err_ref = diff_ref.max().item()
    scale = exact.abs().max().item()
    rule = THREE_WAY[dtype]
    bound = rule.k * err_ref + rule.atol * scale
    if err <= bound:
        return None
    worst = tuple(int(i) for i in torch.unravel_index(diff.nan_to_num(float("inf")).argmax(), diff.shape))
    return (f"{name} ({dtype}): error {err:.3e} > bound {bound:.3e} = {rule.k:g} * reference error {err_ref:.3e}"
            f" + {rule.atol:.2e} * scale {scale:.3g}; worst element {worst}: backend {actual[worst].item():.9g},"
            f" float64 reference {exact[worst].item():.9g}, {dtype} reference {same_dtype[worst].item():.9g}"
            f" (its error there {diff_ref[worst].item():.3e})")


def assert_three_way(actual, same_dtype, exact, name: str = "") -> None:
    message = three_way_error(actual, same_dtype, exact, name)
    assert message is None, message


def assert_all_three_way(actual, same_dtype, exact, names) -> None:
    """Every result of a run (sequences of tensors in the order of `names`); None must match None."""
    actual, same_dtype, exact, names = list(actual), list(same_dtype), list(exact), list(names)
    assert len(actual) == len(same_dtype) == len(exact) == len(names), (len(actual), len(exact), names)
    failures = []
    for a, s, e, name in zip(actual, same_dtype, exact, names):
        if e is None:
            assert a is None and s is None, f"{name}: expected no result"
            continue
        message = three_way_error(a, s, e, name)
        if message is not None:
            failures.append(message)
    assert not failures, "\n".join(failures)
