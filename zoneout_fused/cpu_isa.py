"""Which instruction set the C++ CPU kernels run, and which engine their matrix products use.

The CPU extension holds one copy of its element kernels and vectorized Philox per instruction
set (baseline x86-64 "scalar", "avx2", "avx512") and runs the best one this CPU has. The
environment variable ZONEOUT_FUSED_CPU_ISA (auto, scalar, avx2, avx512; read when the extension
loads) or `set_cpu_isa` picks another, e.g. to test every copy on one machine. The copies draw
bit-identical masks; their results differ only by rounding (FMA contraction, vector math).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

CPU_ISAS = ("scalar", "avx2", "avx512")


def _ops():
    from .ops import _load_extension

    error = _load_extension("cpu")
    if error is not None:
        raise RuntimeError(error)
    return torch.ops.zoneout_fused


def _code(argument: str, choices: tuple, value: str) -> int:
    """The extension's code of `value`, one of a setting's `choices`; ValueError naming `argument`."""
    if value not in choices:
        raise ValueError(f"{argument} must be one of {choices}, got {value!r}")
    return choices.index(value)


def supported_cpu_isas() -> list[str]:
    """The instruction sets this CPU (and build) can run, slowest first."""
    ops = _ops()
    return [isa for code, isa in enumerate(CPU_ISAS) if ops._cpu_isa_supported(code)]


def cpu_isa() -> str:
    """The instruction set the CPU kernels run now."""
    return CPU_ISAS[_ops()._cpu_isa()]


def set_cpu_isa(isa: str) -> str:
    """Makes the CPU kernels run `isa`; returns the previous one. Raises ValueError if this CPU
    cannot run it."""
    code = _code("isa", CPU_ISAS, isa)
    ops = _ops()
    if not ops._cpu_isa_supported(code):
        raise ValueError(f"isa={isa!r} cannot run on this CPU; supported: {supported_cpu_isas()}")
    return CPU_ISAS[ops._set_cpu_isa(code)]


@contextlib.contextmanager
def _using(set_choice, value: str) -> Iterator[None]:
    """Makes `value` the choice `set_choice` sets for the block, then restores the previous one."""
    previous = set_choice(value)
    try:
        yield
    finally:
        set_choice(previous)


def use_cpu_isa(isa: str) -> contextlib.AbstractContextManager:
    """Runs the block's CPU kernels with `isa`, then restores the previous choice."""
    return _using(set_cpu_isa, isa)


# The engine of the CPU kernels' matrix products (csrc/cpu/gemm.h): "onednn" (the default where
# torch has it: oneDNN's linear, the library nn.LSTM runs on; float32 products of at least 2-4M
# multiply-adds, see csrc/cpu/gemm.cpp) or "aten" (torch.mm: the BLAS torch was built with). The environment
# variable ZONEOUT_FUSED_CPU_GEMM (auto, onednn, aten) is read when the extension loads.
CPU_GEMMS = ("aten", "onednn")


def supported_cpu_gemms() -> list[str]:
    ops = _ops()
    return [name for code, name in enumerate(CPU_GEMMS) if ops._cpu_gemm_supported(code)]


def cpu_gemm() -> str:
    return CPU_GEMMS[_ops()._cpu_gemm()]


def set_cpu_gemm(engine: str) -> str:
    """Makes the CPU kernels' products run on `engine`; returns the previous one."""
    code = _code("engine", CPU_GEMMS, engine)
    if engine not in supported_cpu_gemms():
        raise ValueError(f"engine={engine!r} is not available in this torch; supported: {supported_cpu_gemms()}")
    return CPU_GEMMS[_ops()._set_cpu_gemm(code)]


def use_cpu_gemm(engine: str) -> contextlib.AbstractContextManager:
    """Runs the block's CPU products on `engine`, then restores the previous choice."""
    return _using(set_cpu_gemm, engine)


def _named_setting(name: str, choices: tuple, makes: str, runs: str):
    """(get, set, use) of one of the fused loop's named settings (csrc/cpu/setting.h, read through the
    extension's _cpu_<name> / _set_cpu_<name> ops): get() is the choice now, one of `choices`; set(value)
    makes `value` the choice ("Makes <makes>"), raising ValueError naming `name` for another value, and
    returns the previous one; use(value) is a context for the block ("Runs <runs>")."""

    def get() -> str:
        return choices[getattr(_ops(), f"_cpu_{name}")()]

    def set_(value: str) -> str:
        return choices[getattr(_ops(), f"_set_cpu_{name}")(_code(name, choices, value))]

    def use(value: str) -> contextlib.AbstractContextManager:
        return _using(set_, value)

    for function, verb in ((get, ""), (set_, "set_"), (use, "use_")):
        function.__name__ = function.__qualname__ = f"{verb}cpu_{name}"
    set_.__doc__ = f"Makes {makes}; returns the previous choice."
    use.__doc__ = f"Runs {runs}, then restores the previous choice."
    return get, set_, use


# The time loop of float32 sequences (csrc/cpu/lstm_cpu.h): "fused" (one parallel region for the
# whole sequence, each thread forming its part of the recurrent product (see CPU_SPLITS) with the
# extension's own AVX2/AVX-512 tile kernels straight into its element pass; in backward the weight
# gradients by the same kernels), "steps" (per step, one oneDNN / ATen product, then a parallel
# element pass: what float64, the scalar instruction set and single-step calls always run) or
# "auto" (the default: fused, except the forward above hidden size 512, where oneDNN's products
# are faster). The environment variable ZONEOUT_FUSED_CPU_LOOP (auto, fused, steps) is read when
# the extension loads.
CPU_LOOPS = ("steps", "fused", "auto")

cpu_loop, set_cpu_loop, use_cpu_loop = _named_setting(
    "loop", CPU_LOOPS, makes="float32 sequences run the time loop `value`",
    runs="the block's CPU sequences with the time loop `value`")


# How the fused loop shares each step between threads (csrc/cpu/lstm_cpu.h): "units" (each thread
# forms its units' columns for every example row; a barrier per step), "rows" (each thread runs its own
# example rows through every step, every unit; no barrier, but each thread reads all of the weights
# each step) or "auto" (the default: rows where the weights are small beside a thread's rows (a bound
# that is higher for AVX-512, and on a Zen 4 for both instruction sets) and, on Intel CPUs, whose L3
# feeds a core more slowly, fit in 3/4 of a core's L2). The
# results are the same bits either way. The environment variable ZONEOUT_FUSED_CPU_SPLIT (auto, units,
# rows) is read at first use.
CPU_SPLITS = ("units", "rows", "auto")

cpu_split, set_cpu_split, use_cpu_split = _named_setting(
    "split", CPU_SPLITS, makes="the fused loop share its steps between threads by `value`",
    runs="the block's fused loops with the split `value`")


# How the fused forward forms the products of a tile of units whose panel (its columns of W_hh, one
# vector a gate) is large (csrc/cpu/lstm_cpu.h): "whole" (all the tile's gate vectors at once), "half"
# (half of them at a time, in twice the example rows; at every size, for the LSTM's four gates) or "auto"
# (the default: halves from 128 KB of panel a tile under AVX-512, except on a Zen 4). The results are the
# same bits either way. The environment variable ZONEOUT_FUSED_CPU_PANELS (auto, whole, half) is read at
# first use.
CPU_PANELS = ("whole", "half", "auto")

cpu_panels, set_cpu_panels, use_cpu_panels = _named_setting(
    "panels", CPU_PANELS, makes="the fused forward form its tiles' products by `value`",
    runs="the block's fused forwards with the panels `value`")


# Where the fused LSTM forward forms each step's input part x_t W_ih^T (csrc/cpu/lstm_cpu.h): "loop" (in
# the time loop, in the same FMA chains as the step's recurrent part), "first" (as one projection of all
# steps before the loop, where the input is at most 512 wide; wider inputs stay in the loop) or "auto" (the
# default: first on Intel CPUs where the input's weights come to half a core's L2 a thread). The results
# are the same bits either way. The environment variable ZONEOUT_FUSED_CPU_INPUT (auto, loop, first) is
# read at first use.
CPU_INPUTS = ("loop", "first", "auto")

cpu_input, set_cpu_input, use_cpu_input = _named_setting(
    "input", CPU_INPUTS, makes="the fused LSTM forward form its input part `value`",
    runs="the block's fused LSTM forwards with the input part `value`")


# The order in which the fused loops take each thread's columns of the weights (csrc/cpu/lstm_cpu.h): "same"
# (first to last every step), "alternate" (last first every other step, so that a step begins with those
# the last one ended with, still in the caches) or "auto" (the default: alternate where a thread's share
# overflows 3/4 of a core's L2, on Intel CPUs). The results are the same bits either way. The environment
# variable ZONEOUT_FUSED_CPU_ORDER (auto, same, alternate) is read at first use.
CPU_ORDERS = ("same", "alternate", "auto")

cpu_order, set_cpu_order, use_cpu_order = _named_setting(
    "order", CPU_ORDERS, makes="the fused loops take their weight panels in the order `value`",
    runs="the block's fused loops with the order `value`")


def empty_cache() -> None:
    """Frees the memory the CPU kernels keep between calls (like torch.cuda.empty_cache): freed
    forward outputs kept for the next call's outputs (up to 64 MB: reused, their pages need not be
    faulted in again) and the calling thread's scratch buffers (up to 64 MB each: packed weights,
    the backward's pre-activation gradients)."""
    _ops()._cpu_empty_cache()
