"""CUDA graphs of the GPU backends' layer ops: one replay per op call instead of one launch per step.

Per step, a layer direction costs the host a kernel launch (Triton: 10-17 us of argument binding)
or a GEMM dispatch plus a launch (CUDA), so at B=32, H=1000 the GPU waits for the host. With graphs
on, each call of a GPU layer op, forward or backward, replays a CUDA graph of the whole op:
- captured on the first call for its key (the op, the tensors' shapes, dtypes and devices, the
  scalar arguments, torch's float32 matmul policy and the CUDA recurrence setting), from static
  input buffers, after one warm-up call outside the capture (Triton compiles, cuBLAS makes its
  handle);
- later calls copy their inputs into those buffers, replay, and return clones of the outputs,
  which the next replay overwrites.
The seed enters as an int64 buffer on the GPU, which the kernels read, set with fill_ (the value
travels as a kernel argument: no copy from host memory, no sync). So every replay draws the masks of
its own call's seed, and results equal the uncaptured op's bit for bit.

Off by default: `ZONEOUT_FUSED_CUDA_GRAPHS=1`, `set_cuda_graphs(True)` or `with cuda_graphs():` turns
it on; a call whose forward replayed a graph replays its backward too. It becomes the
default once a GPU run has shown it correct and faster (benchmarks/gpu/validate.sh measures both).
Never used on the CPU, inside an outer capture or while torch.compile traces: those capture or
compile the op themselves. Graphs stay cached, each with its static buffers, in one memory pool per
device; `clear_cuda_graphs()` frees them (after a change of shapes, or to give the memory back).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

_enabled = os.environ.get("ZONEOUT_FUSED_CUDA_GRAPHS", "0") == "1"
_GRAPHS: dict = {}
_POOLS: dict = {}


def set_cuda_graphs(enabled: bool) -> None:
    """Turn the replay of captured layer ops on or off (process-wide)."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


def cuda_graphs_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def cuda_graphs(enabled: bool = True):
    """Within the block, layer ops replay graphs (or not); the backward of a call follows its forward."""
    previous = _enabled
    set_cuda_graphs(enabled)
    try:
        yield
    finally:
        set_cuda_graphs(previous)


def clear_cuda_graphs() -> None:
    """Drop every captured graph with its buffers (the memory returns to torch's allocator)."""
    _GRAPHS.clear()
    _POOLS.clear()


def wanted(args) -> bool:
    """Whether a layer op call with these arguments (x first) replays a graph."""
    return (_enabled and args[0].is_cuda and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


@dataclass
class _CapturedOp:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # static buffers (None and scalars as passed)
    outputs: tuple

    def load(self, args) -> None:
        for static, arg in zip(self.inputs, args):
            if isinstance(arg, torch.Tensor):
                _set(static, arg)


def _set(static: torch.Tensor, arg: torch.Tensor) -> None:
    if arg.device.type == "cpu":  # the seed: a kernel argument, not a copy from pageable memory
        static.fill_(arg.item())
    else:
        static.copy_(arg)


def _static_like(arg, device: torch.device):
    if not isinstance(arg, torch.Tensor):
        return arg
    # Contiguous whatever the caller's strides (every op makes its inputs contiguous); a CPU seed
    # becomes a buffer on the GPU.
    static = torch.empty(arg.shape, dtype=arg.dtype, device=device)
    _set(static, arg)
    return static


def _key(op, args) -> tuple:
    signature = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
    policy = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision(),
              os.environ.get("ZONEOUT_FUSED_CUDA_RECURRENCE", "auto"))
    return (op, signature, policy)


def _capture(op: Callable, args) -> _CapturedOp:
    device = args[0].device
    inputs = [_static_like(a, device) for a in args]
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        op(*inputs)  # warm-up: compilation and library handles happen outside the capture
    current.wait_stream(side)
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    # One pool for all graphs of a device: replays never overlap (one stream order), and every
    # output is cloned right after its replay, before another graph can reuse its memory.
    with torch.cuda.device(device), torch.cuda.graph(graph, pool=_POOLS[device], capture_error_mode="thread_local"):
        outputs = op(*inputs)
    return _CapturedOp(graph, inputs, tuple(outputs))


def call(op: Callable, args) -> tuple:
    """op(*args) by replaying its graph (captured on the first call with this key)."""
    key = _key(op, args)
    captured = _GRAPHS.get(key)
    if captured is None:
        captured = _GRAPHS[key] = _capture(op, args)
    else:
        captured.load(args)
    captured.graph.replay()
    return tuple(out.clone() for out in captured.outputs)
