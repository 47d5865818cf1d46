"""The benchmark: check every backend against the reference, then time it beside its peers.

For each case and dtype one torch.nn.LSTM is built with a fixed seed; every peer gets a copy
of its weights (ZoneoutLSTM.from_lstm), so all of them run the same model on the same input:

    plain-loop           what users write today: nn.LSTMCell + Bernoulli masks per step (loops.py)
    plain-loop-compiled  the same under torch.compile
    nn.LSTM              torch's LSTM without zoneout (oneDNN / cuDNN): the speed ceiling
    reference            ZoneoutLSTM(backend="reference"): the readable Python loop (the oracle)
    reference-compiled   the same module under torch.compile (a compile failure becomes an error row)
    cpu / triton / cuda  the fused backends available for the device

Cell cases (`--config decode`) step the cell API once per frame instead: plain-loop's cell,
nn.LSTMCell (the ceiling) and ZoneoutLSTMCell on each backend (with --cell gru / rnn-*: nn.GRUCell or
nn.RNNCell and ZoneoutGRUCell or ZoneoutRNNCell).

Check: before anything is timed, each peer's output, h_n, c_n and the gradients of the input
and of every weight are compared with the reference's on the same input under the same
torch.manual_seed (so the same zoneout masks are drawn), by the three-way rule against the
reference in float64. nn.LSTM is compared with the reference at zoneout 0, and so is the plain
loop, built with zoneout off (its masks come from torch's generator). A peer that mismatches or
fails is reported, not timed.

Floor: beside each case, the time of the matrix products the case needs (the input projection,
one recurrent product per step, and in backward their gradients), measured on the same device in
the same run with the fastest product engine there (torch.mm; on CPU also oneDNN's linear): what
no implementation can beat.

Timing: "eval" is the forward in evaluation mode without autograd; "fwd" the training-mode
forward (masks drawn, autograd graph recorded, as in training); "fwd+bwd" adds backward from a
fixed output gradient. The peers run round-robin, one
call each per repeat in an order that changes from round to round (round_order), so load changes
on a shared machine hit them all alike and no peer always follows the same one; the figure is the
median. CPU calls are timed with time.perf_counter, CUDA calls with
CUDA events.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..graphs import cuda_graphs
from ..nn import ZoneoutGRU, ZoneoutGRUCell, ZoneoutLSTM, ZoneoutLSTMCell, ZoneoutRNN, ZoneoutRNNCell
from ..ops import BACKENDS
from ..reference import CELL_CODES, cell_rows
from ..testing import three_way_error
from .cases import PUBLIC_CONFIGS, Case, cases_for
from .loops import BidirectionalCells, PlainZoneoutCell, SteppedCells, canonical_parameter_name, lstm_cells
from .memory import PeakMemory, pin_heap_thresholds

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
MODES = ("eval", "fwd", "fwd+bwd")
DEFAULT_MODES = {False: ("fwd", "fwd+bwd"), True: ("eval", "fwd", "fwd+bwd")}  # by Case.cell
FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
# What users would otherwise run first (the plain loop with zoneout, eager and compiled, and
# torch's own layer without zoneout: the ceiling), then the oracle and the fused backends.
BASE_PEERS = ("plain-loop", "plain-loop-compiled", "nn.LSTM", "reference", "reference-compiled")
# "<backend>+graphs": the GPU backend with its layer ops replayed as CUDA graphs (zoneout_fused/graphs.py).
GRAPHED_PEERS = ("triton+graphs", "cuda+graphs")
ALL_PEERS = BASE_PEERS + ("nn.LSTMCell", "cpu", "triton", "cuda") + GRAPHED_PEERS
# Peers of the cell cases (`decode`): the cell API stepped once per frame.
CELL_PEERS = ("plain-loop", "nn.LSTMCell", "reference")
# --cell: the recurrent layer benchmarked, and the no-zoneout ceiling ("vs nn.LSTM" columns) of its
# sequence cases (torch's layer) and of its cell cases (torch's cell); any of these names asks for it.
RNN_CELLS = ("lstm", "gru", "rnn-tanh", "rnn-relu")
SEQUENCE_BASELINES = {"lstm": "nn.LSTM", "gru": "nn.GRU", "rnn-tanh": "nn.RNN", "rnn-relu": "nn.RNN"}
CELL_BASELINES = {"lstm": "nn.LSTMCell", "gru": "nn.GRUCell", "rnn-tanh": "nn.RNNCell", "rnn-relu": "nn.RNNCell"}
BASELINE_NAMES = ("nn.LSTM", "nn.LSTMCell", "nn.GRU", "nn.GRUCell", "nn.RNN", "nn.RNNCell")


def baseline_name(rnn_cell: str, cell_case: bool) -> str:
    return (CELL_BASELINES if cell_case else SEQUENCE_BASELINES)[rnn_cell]


def torch_layer(rnn_cell: str, case: Case) -> nn.RNNBase:
    """The case's torch layer of the --cell kind (its weights are every peer's)."""
    shape = dict(num_layers=case.num_layers, bidirectional=case.bidirectional)
    if rnn_cell == "lstm":
        return nn.LSTM(case.input_size, case.hidden_size, **shape)
    if rnn_cell == "gru":
        return nn.GRU(case.input_size, case.hidden_size, **shape)
    return nn.RNN(case.input_size, case.hidden_size, nonlinearity=rnn_cell[len("rnn-"):], **shape)

# The check: every output and gradient of a peer against the reference run in float64 on the
# same inputs and masks (they are drawn in float32 whatever the dtype). float64 peers: normalised
# max error (max |a - b| / max |b|) at most FLOAT64_TOLERANCE; the other dtypes: the three-way
# rule of zoneout_fused.testing, whose bound follows the reference's own error in that dtype.
# One flipped mask bit moves a state by O(z) = O(0.1..1) of its size, far above either.
FLOAT64_TOLERANCE = 1e-9

# Above this much work (B*T*H*(I+H) per layer, summed) the CPU check runs on the first
# CHECK_STEPS_LARGE steps only: the Python reference takes minutes at the paper's sizes, and
# the per-step code of every backend is the same at step 8 as at step 800.
CHECK_WORK_LIMIT_CPU = 5e8
CHECK_STEPS_LARGE = 8

DEFAULT_REPEATS = {"cpu": 5, "cuda": 20}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
# A cold inductor compile of the unrolled time loop takes about a minute per 50 steps of fwd+bwd
# on the 2-core machine (reference-compiled and plain-loop-compiled alike); inductor's on-disk cache
# makes a rerun of the same shapes take seconds.
DEFAULT_COMPILE_TIMEOUT = {"cpu": 300.0, "cuda": 600.0}
# Inductor options of reference-compiled.
# - fallback_random: the zoneout seed is drawn with torch.randint inside forward; inductor's own
#   RNG would draw another one than eager under the same torch.manual_seed, so other masks.
# - realize_opcount_threshold=4 (default 30), before torch 2.13 only: those inductors' lowering of
#   the mask oracle's Philox chains grew exponentially with the chain (T=2, B=3, H=8 had not
#   finished after 600 s; 34 s with the option). torch 2.13 compiles that case in 11-14 s without
#   it, and the option slowed the compiled loop there (B=32 T=50 H=256 fwd+bwd: 44 ms a call with
#   it, 38 ms without). The GPU machine's torch 2.11 keeps it: untested there without.
COMPILE_OPTIONS = {"fallback_random": True}
if tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 13):
    COMPILE_OPTIONS["realize_opcount_threshold"] = 4


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------
@dataclass
class Peer:
    """A contender: build(layer, zoneout_kwargs) returns a module with the forward of the torch
    layer it copies (nn.LSTM's, nn.GRU's or nn.RNN's)."""

    name: str
    build: Callable[[nn.LSTM, dict], nn.Module]
    zoneout: bool = True  # False: it has no zoneout, and is checked against the reference at z = 0
    unavailable: Optional[str] = None  # why it cannot run here (reported as a row)
    # Its masks come from torch's generator, not the contract's Philox: it is checked built with
    # zoneout off against the reference at z = 0 (the same LSTM math), and timed with zoneout on.
    check_without_zoneout: bool = False
    compiled: bool = False  # torch.compile'd: its first call runs under --compile-timeout


def _zoneout_module(layer: nn.RNNBase, zoneout_kwargs: dict, backend: str) -> nn.Module:
    """ZoneoutLSTM / ZoneoutGRU / ZoneoutRNN with a copy of a torch layer's weights."""
    if isinstance(layer, nn.LSTM):
        return ZoneoutLSTM.from_lstm(layer, backend=backend, **zoneout_kwargs)
    if isinstance(layer, nn.GRU):
        return ZoneoutGRU.from_gru(layer, backend=backend, **zoneout_kwargs)
    return ZoneoutRNN.from_rnn(layer, backend=backend, **zoneout_kwargs)


def _compiled(module: nn.Module, **options) -> nn.Module:
    # A fresh dynamo cache per case: guards from earlier shapes would otherwise pile up to the
    # recompile limit, after which torch.compile silently runs eager code.
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False, **options)


def _compiled_reference(lstm: nn.LSTM, zoneout_kwargs: dict) -> nn.Module:
    return _compiled(_zoneout_module(lstm, zoneout_kwargs, "reference"), options=COMPILE_OPTIONS)


def _plain_loop(layer: nn.RNNBase, zoneout_kwargs: dict) -> nn.Module:
    def zoned_out(direction: int) -> list[nn.Module]:
        return [PlainZoneoutCell(cell, zoneout_kwargs.get("zoneout_cell", 0.0), zoneout_kwargs["zoneout_hidden"])
                for cell in lstm_cells(layer, direction)]

    lstm = isinstance(layer, nn.LSTM)
    if layer.bidirectional:
        return BidirectionalCells(zoned_out(0), zoned_out(1), lstm=lstm)
    return SteppedCells(zoned_out(0), lstm=lstm)


def _zoneout_cells(layer: nn.RNNBase, zoneout_kwargs: dict, backend: str) -> nn.Module:
    """The layer's zoneout cells (ZoneoutLSTMCell, ZoneoutGRUCell or ZoneoutRNNCell) stepped over the input."""
    cells = []
    for cell in lstm_cells(layer):
        options = dict(bias=cell.bias, backend=backend, device=cell.weight_hh.device, dtype=cell.weight_hh.dtype,
                       **zoneout_kwargs)
        if isinstance(cell, nn.LSTMCell):
            zoneout_cell = ZoneoutLSTMCell(cell.input_size, cell.hidden_size, **options)
        elif isinstance(cell, nn.GRUCell):
            zoneout_cell = ZoneoutGRUCell(cell.input_size, cell.hidden_size, **options)
        else:
            zoneout_cell = ZoneoutRNNCell(cell.input_size, cell.hidden_size, nonlinearity=cell.nonlinearity, **options)
        zoneout_cell.load_state_dict(cell.state_dict())
        cells.append(zoneout_cell)
    return SteppedCells(cells, lstm=isinstance(layer, nn.LSTM))


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float], what: str):
    """Raises CompileTimeout in the main thread after `seconds` (SIGALRM; no limit elsewhere).

    torch.compile unrolls the reference's Python time loop: at T = 100 on 2 cores inductor
    takes minutes, at T = 784 far longer, so its compile gets a budget and becomes an error row.
    """
    usable = (seconds and seconds > 0 and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CompileTimeout(f"{what} took longer than {seconds:g} s (--compile-timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _lstm_copy(lstm: nn.LSTM, zoneout_kwargs: dict) -> nn.LSTM:
    module = copy.deepcopy(lstm)
    module.flatten_parameters()  # cuDNN wants one weight buffer (a no-op on CPU)
    return module


class _WithCudaGraphs(nn.Module):
    """A fused backend's module whose layer ops replay CUDA graphs; `_orig_mod` is where the check
    finds the parameters, as in a torch.compile wrapper."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args):
        with cuda_graphs(True):
            return self._orig_mod(*args)


def fused_peer(name: str, device: torch.device, cell: bool = False) -> Peer:
    backend = name.removesuffix("+graphs")
    if backend == "triton" and device.type == "cpu":
        reason = "Triton runs on CPU only under its interpreter (TRITON_INTERPRET=1), which is never benchmarked"
    else:
        reason = BACKENDS[backend].unavailable_reason(device)
    if reason is None and name in GRAPHED_PEERS and device.type != "cuda":
        reason = "CUDA graphs need a GPU"
    wrap = _WithCudaGraphs if name in GRAPHED_PEERS else (lambda module: module)
    if cell:
        return Peer(name, lambda lstm, zkw: wrap(_zoneout_cells(lstm, zkw, backend)), unavailable=reason)
    return Peer(name, lambda lstm, zkw: wrap(_zoneout_module(lstm, zkw, backend)), unavailable=reason)


def select_peers(device: torch.device, requested: Optional[list[str]],
                 extra_peers: Optional[dict[str, Peer]] = None, cell: bool = False,
                 rnn_cell: str = "lstm") -> list[Peer]:
    """The peers of a sequence case (cell=False) or a cell case, in the order of `requested`
    (default: all for the device); names that do not apply to the kind of case are left out.
    rnn_cell: the --cell kind of the sequence cases (its torch layer is the ceiling)."""
    if cell:
        torch_cells = CELL_BASELINES[rnn_cell]
        builders = {
            "plain-loop": Peer("plain-loop", _plain_loop, check_without_zoneout=True),
            torch_cells: Peer(torch_cells, lambda layer, zkw: SteppedCells(lstm_cells(layer),
                                                                           lstm=isinstance(layer, nn.LSTM)),
                              zoneout=False),
            "reference": Peer("reference", lambda layer, zkw: _zoneout_cells(layer, zkw, "reference")),
        }
        default = CELL_PEERS
    else:
        builders = {
            "plain-loop": Peer("plain-loop", _plain_loop, check_without_zoneout=True),
            "plain-loop-compiled": Peer("plain-loop-compiled", lambda lstm, zkw: _compiled(_plain_loop(lstm, zkw)),
                                        check_without_zoneout=True, compiled=True),
            SEQUENCE_BASELINES[rnn_cell]: Peer(SEQUENCE_BASELINES[rnn_cell], _lstm_copy, zoneout=False),
            "reference": Peer("reference", lambda lstm, zkw: _zoneout_module(lstm, zkw, "reference")),
            "reference-compiled": Peer("reference-compiled", _compiled_reference, compiled=True),
        }
        default = BASE_PEERS
    names = list(requested) if requested else list(default) + list(FUSED_BACKENDS.get(device.type, ()))
    peers = []
    for name in names:
        if name in BASELINE_NAMES:
            name = baseline_name(rnn_cell, cell)
        if name in builders:
            peers.append(builders[name])
        elif name in ("cpu", "triton", "cuda") + GRAPHED_PEERS:
            peers.append(fused_peer(name, device, cell))
        elif name not in ALL_PEERS + BASELINE_NAMES:
            raise ValueError(f"unknown backend {name!r}; choose from {ALL_PEERS}")
    peers += list((extra_peers or {}).values())
    return peers


# ---------------------------------------------------------------------------------------------
# Check against the reference
# ---------------------------------------------------------------------------------------------
def _base_module(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)  # torch.compile's wrapper keeps the original here


def forward_backward(module: nn.Module, x: torch.Tensor, grads: tuple, seed: int) -> dict:
    """Output, final states and all gradients of one seeded training step (the check's data)."""
    x = x.detach().clone().requires_grad_(True)
    base = _base_module(module)
    for parameter in base.parameters():
        parameter.grad = None
    torch.manual_seed(seed)  # the zoneout seed is drawn from here: same seed, same masks
    output, state = module(x)
    states = state if isinstance(state, tuple) else (state,)  # (h_n, c_n) of an LSTM, h_n otherwise
    torch.autograd.backward((output,) + states, grads[:1 + len(states)])
    tensors = {"output": output, "grad_input": x.grad}
    tensors.update(zip(("h_n", "c_n"), states))
    tensors.update({f"grad_{canonical_parameter_name(name)}": p.grad for name, p in base.named_parameters()})
    return {name: t.detach() for name, t in tensors.items()}


def compare(actual: dict, exact: dict, same_dtype: Optional[dict] = None) -> tuple[bool, float, str]:
    """(agrees, worst normalised error against the float64 reference, where / why not).

    `exact` is the reference in float64; `same_dtype` the reference in the peer's dtype (None for
    float64 peers, which are held to FLOAT64_TOLERANCE)."""
    worst, worst_name, failures = 0.0, "", []
    for name, want in exact.items():
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            return False, float("inf"), f"{name}: missing or shape {None if got is None else tuple(got.shape)}" \
                                        f" != {tuple(want.shape)}"
        if not torch.isfinite(got).all():
            return False, float("inf"), f"{name}: non-finite values"
        error = ((got.double().cpu() - want.double().cpu()).abs().max()
                 / want.double().abs().max().clamp_min(1e-6)).item()
        if error > worst:
            worst, worst_name = error, name
        if same_dtype is None:
            if error > FLOAT64_TOLERANCE:
                failures.append(f"{name}: normalised error {error:.2e} > {FLOAT64_TOLERANCE:g}")
        else:
            message = three_way_error(got, same_dtype[name], want, name)
            if message is not None:
                failures.append(message)
    if failures:
        return False, worst, "; ".join(failures)
    return True, worst, worst_name


def check_steps_for(case: Case, device: torch.device, override: Optional[int]) -> int:
    if override:
        return min(override, case.steps)
    if device.type == "cpu":
        work = (case.batch * case.steps * case.hidden_size * (case.input_size + case.hidden_size) * case.num_layers
                * case.directions)
        if work > CHECK_WORK_LIMIT_CPU:
            return min(CHECK_STEPS_LARGE, case.steps)
    return case.steps


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def round_order(peers: int, repeat: int) -> list[int]:
    """The order in which round `repeat` calls the peers (indices into the list of peers).

    The rounds cycle through a Williams design (a Latin square balanced for neighbours): over
    `peers` rounds (2 * `peers` where that is odd) every peer runs in every position, and right
    after each other peer, equally often. Rotating one order, as before, kept every peer behind the
    same neighbour in every round."""
    first = [0] + [(k + 1) // 2 if k % 2 else peers - k // 2 for k in range(1, peers)]  # 0, 1, n-1, 2, n-2, ...
    row = repeat % (2 * peers if peers % 2 else peers)
    order = [(index + row) % peers for index in first]
    return order[::-1] if row >= peers else order


def make_step(module: nn.Module, x: torch.Tensor, grad_output: torch.Tensor, mode: str):
    """(prepare, step): prepare clears gradients outside the timed region; step is one call."""
    params = list(_base_module(module).parameters())
    x = x.detach().clone().requires_grad_(True)  # the input of a model with an embedding needs its grad

    def prepare():
        module.train(mode != "eval")
        for parameter in params:
            parameter.grad = None
        x.grad = None

    if mode == "eval":
        def step():
            with torch.no_grad():
                module(x)  # evaluation: the masks' expectations, no graph
    elif mode == "fwd":
        def step():
            module(x)  # training forward; the graph is freed on return, inside the timed region
    else:
        def step():
            output, _ = module(x)
            output.backward(grad_output)
    return prepare, step


def matmul_shapes(case: Case, mode: str, rnn_cell: str = "lstm") -> list[tuple[int, int, int, int]]:
    """(count, m, k, n): the matrix products [m, k] @ [k, n] of one call of `mode`, per layer.

    Sequence layers: one input projection over all steps, one recurrent product per step; in
    backward one product per step for the gradient reaching h_{t-1}, then the input and weight
    gradients over all steps; a bidirectional layer's twice, its upper layers' inputs 2H wide. Cells
    (decode): both products at every step, and their gradients."""
    T, B, H = case.steps, case.batch, case.hidden_size
    G = cell_rows(CELL_CODES[rnn_cell.replace("-", "_")]) * H  # rows of W_ih, W_hh
    shapes = []
    for layer in range(case.num_layers * case.directions):
        I = case.input_size if layer < case.directions else case.directions * H
        if case.cell:
            shapes += [(T, B, I, G), (T, B, H, G)]
            if mode == "fwd+bwd":
                shapes += [(T, B, G, I), (T, B, G, H), (T, G, B, I), (T, G, B, H)]
        else:
            shapes += [(1, T * B, I, G), (T, B, H, G)]
            if mode == "fwd+bwd":
                shapes += [(T, B, G, H), (1, T * B, G, I), (1, G, T * B, I), (1, G, T * B, H)]
    return shapes


def _product_engines(dtype: torch.dtype, device: torch.device) -> list:
    """Ways to form a [m, k] @ [k, n] product here, each (name, make(a, b, out) -> call): torch.mm
    (cuBLAS, or the CPU BLAS torch was built with), and on CPU in float32 oneDNN's linear, which
    the cpu backend uses for large products (csrc/cpu/gemm.h) and which beats MKL's mm on AMD CPUs."""
    engines = [("mm", lambda a, b, out: (lambda: torch.mm(a, b, out=out)))]
    onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if device.type == "cpu" and dtype == torch.float32 and onednn is not None:
        def make(a, b, out):
            w = b.t().contiguous()
            return lambda: onednn(a, w, None, "none", [], "")
        engines.append(("onednn", make))
    return engines


def matmul_floor_ms(case: Case, dtype: torch.dtype, device: torch.device, modes, repeats: int,
                    rnn_cell: str = "lstm") -> dict:
    """mode -> milliseconds of the case's matrix products (per distinct shape, the median of
    `repeats` timed calls of the fastest product engine available: torch.mm, or on CPU oneDNN's
    linear; times their count): the floor no implementation beats."""
    medians: dict = {}
    floors = {}
    engines = _product_engines(dtype, device)
    for mode in modes:
        total = 0.0
        for count, m, k, n in matmul_shapes(case, mode, rnn_cell):
            if (m, k, n) not in medians:
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                out = torch.empty(m, n, device=device, dtype=dtype)
                calls = max(1, min(count, 50))  # time `calls` back-to-back products, as a step loop runs them
                best = None
                for _, make in engines:
                    product = make(a, b, out)
                    product()
                    times = [_timed_call(lambda: [product() for _ in range(calls)], device) / calls
                             for _ in range(max(3, repeats))]
                    best = min(best, statistics.median(times)) if best is not None else statistics.median(times)
                medians[(m, k, n)] = best
            total += count * medians[(m, k, n)]
        floors[mode] = total
    return floors


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------
@dataclass
class PeerState:
    peer: Peer
    module: Optional[nn.Module] = None
    check: str = "pending"  # ok | reference | mismatch | error | unavailable
    check_error: Optional[float] = None
    check_detail: str = ""
    error: Optional[str] = None
    times: dict = field(default_factory=dict)  # mode -> [ms]
    errors: dict = field(default_factory=dict)  # mode -> message (a failure while timing)
    peak_mb: dict = field(default_factory=dict)
    memory_errors: dict = field(default_factory=dict)
    first_call_s: Optional[float] = None  # the check's seeded fwd+bwd call: includes torch.compile's work


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def modes_for(case: Case, opts) -> tuple:
    return tuple(opts.modes) if opts.modes else DEFAULT_MODES[case.cell]


def zoneout_kwargs_for(case: Case, opts) -> dict:
    """The zoneout options of the case's modules: the command line's, else the case's, else the
    defaults (LSTM z_c = 0.5, z_h = 0.05; GRU / RNN z_h = 0.1, the GRU-RNN issue's setting); only
    the options the --cell kind has."""
    rnn_cell = getattr(opts, "cell", "lstm")
    if rnn_cell != "lstm":
        kwargs = dict(zoneout_hidden=opts.zoneout_hidden if opts.zoneout_hidden is not None else 0.1,
                      mask_mode=opts.mask_mode or "independent")
        if rnn_cell == "gru":
            kwargs["recurrent_dropout"] = opts.recurrent_dropout
        return kwargs
    return dict(zoneout_cell=opts.zoneout_cell if opts.zoneout_cell is not None else
                (case.zoneout_cell if case.zoneout_cell is not None else 0.5),
                zoneout_hidden=opts.zoneout_hidden if opts.zoneout_hidden is not None else
                (case.zoneout_hidden if case.zoneout_hidden is not None else 0.05),
                recurrent_dropout=opts.recurrent_dropout,
                mask_mode=opts.mask_mode or case.mask_mode or "independent")


def without_zoneout(zoneout_kwargs: dict) -> dict:
    return {k: (0.0 if k in ("zoneout_cell", "zoneout_hidden", "recurrent_dropout") else v)
            for k, v in zoneout_kwargs.items()}


class CaseData:
    """One case's model and data on a device, and the check of a module against the reference."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device, *, seed: int = 0,
                 zoneout_kwargs: dict, check_steps: Optional[int] = None, rnn_cell: str = "lstm"):
        self.case, self.dtype, self.device, self.seed = case, dtype, device, seed
        self.zoneout_kwargs = zoneout_kwargs
        torch.manual_seed(seed)
        # The torch layer every peer copies (named lstm for history; an nn.GRU / nn.RNN for --cell).
        self.lstm = torch_layer(rnn_cell, case).to(device=device, dtype=dtype)
        self.lstm.train()
        self.x = torch.randn(case.steps, case.batch, case.input_size, device=device, dtype=dtype)
        self.grad_output = torch.randn(case.steps, case.batch, case.directions * case.hidden_size, device=device,
                                       dtype=dtype)
        state_shape = (case.num_layers * case.directions, case.batch, case.hidden_size)
        self.grad_h = torch.randn(state_shape, device=device, dtype=dtype)
        self.grad_c = torch.randn(state_shape, device=device, dtype=dtype)
        self.check_steps = check_steps_for(case, device, check_steps)
        self._expected: dict = {}

    def _check_inputs(self, dtype: torch.dtype):
        steps = self.check_steps
        return (self.x[:steps].to(dtype),
                tuple(g.to(dtype) for g in (self.grad_output[:steps], self.grad_h, self.grad_c)))

    def expected(self, zoneout: bool, dtype: torch.dtype) -> dict:
        """The reference's tensors in `dtype` on the case's inputs, cached per (zoneout on/off, dtype)."""
        if (zoneout, dtype) not in self._expected:
            kwargs = self.zoneout_kwargs if zoneout else without_zoneout(self.zoneout_kwargs)
            lstm = copy.deepcopy(self.lstm).to(dtype)
            if self.case.cell:
                reference = _zoneout_cells(lstm, kwargs, "reference")
            else:
                reference = _zoneout_module(lstm, kwargs, "reference")
            # The case's own values (in self.dtype), cast: float64 sees exactly the peer's inputs.
            x, grads = self._check_inputs(self.dtype)
            x, grads = x.to(dtype), tuple(g.to(dtype) for g in grads)
            self._expected[(zoneout, dtype)] = forward_backward(reference, x, grads, self.seed + 1)
        return self._expected[(zoneout, dtype)]

    def check(self, peer: Peer, module: nn.Module) -> tuple[bool, float, str]:
        """(agrees with the reference, worst normalised error, a one-line description)."""
        x, grads = self._check_inputs(self.dtype)
        got = forward_backward(module, x, grads, self.seed + 1)
        zoneout = peer.zoneout and not peer.check_without_zoneout
        same_dtype = None if self.dtype == torch.float64 else self.expected(zoneout, self.dtype)
        ok, worst, where = compare(got, self.expected(zoneout, torch.float64), same_dtype)
        detail = (f"max err {worst:.2e} ({where}) over {self.check_steps}/{self.case.steps} steps"
                  + ("" if zoneout else ", vs reference at zoneout 0"))
        return ok, worst, detail


def run_case(case: Case, dtype: torch.dtype, device: torch.device, peers: list[Peer], opts,
             memory: PeakMemory, progress) -> list[PeerState]:
    data = CaseData(case, dtype, device, seed=opts.seed, zoneout_kwargs=zoneout_kwargs_for(case, opts),
                    check_steps=opts.check_steps, rnn_cell=getattr(opts, "cell", "lstm"))
    x, grad_output = data.x, data.grad_output
    states = [PeerState(peer) for peer in peers]
    for state in states:
        peer = state.peer
        if peer.unavailable:
            state.check, state.error = "unavailable", peer.unavailable
            continue
        if peer.compiled and peer.name in opts.compile_timed_out:
            # Spend the budget once per run: where inductor cannot lower the unrolled loop in time
            # for one case it will not for the next (on the 2-core dev machine not even at T=2).
            state.check, state.error = "error", f"skipped: {opts.compile_timed_out[peer.name]}"
            continue
        try:
            state.module = peer.build(data.lstm, data.zoneout_kwargs)
            checked = (peer.build(data.lstm, without_zoneout(data.zoneout_kwargs)) if peer.check_without_zoneout
                       else state.module)
        except Exception as error:  # noqa: BLE001  (any failure becomes a row, not a crash)
            state.check, state.error = "error", f"build failed: {_short(error)}"
            continue
        if peer.name == "reference":
            state.check, state.check_detail = "reference", "the oracle"
            continue
        compiled = peer.compiled
        try:
            started = time.perf_counter()
            with time_limit(opts.compile_timeout if compiled else None, f"torch.compile of {peer.name}"):
                ok, state.check_error, state.check_detail = data.check(peer, checked)
                if compiled and ok and (data.check_steps < case.steps or checked is not state.module):
                    # The timed shape or module compiles again: do it here, inside the budget.
                    prepare, step = make_step(state.module, x, grad_output, "fwd+bwd")
                    prepare()
                    step()
            # For compiled peers this is mostly compile time.
            state.first_call_s = time.perf_counter() - started
        except BaseException as error:  # noqa: BLE001  (CompileTimeout may surface wrapped by dynamo)
            if isinstance(error, KeyboardInterrupt):
                raise
            timed_out = isinstance(error, CompileTimeout) or "CompileTimeout" in repr(error)
            if timed_out:  # dynamo wraps our exception; its first line would not say what happened
                message = f"compile timed out: torch.compile of {peer.name} took longer than {opts.compile_timeout:g} s"
            else:
                message = f"{'compile or run failed' if compiled else 'check run failed'}: {_short(error)}"
            state.check, state.error = "error", message
            state.module = None
            if compiled:
                torch._dynamo.reset()
                if timed_out:
                    opts.compile_timed_out[peer.name] = (
                        f"torch.compile timed out on {case.name} (T={case.steps}) after "
                        f"{opts.compile_timeout:g} s; --compile-timeout to allow more")
            continue
        state.check = "ok" if ok else "mismatch"
        if peer.name == "reference-compiled":
            state.check_detail += f"; inductor options {COMPILE_OPTIONS}"
        if not ok:
            state.error = f"output/gradients differ from the reference: {state.check_detail}"
            state.module = None
    del data._expected

    timed = [s for s in states if s.module is not None]
    for mode in modes_for(case, opts):
        calls = {s.peer.name: make_step(s.module, x, grad_output, mode) for s in timed}
        live = list(timed)

        def run_one(state, timing: bool):
            prepare, step = calls[state.peer.name]
            prepare()
            try:
                if timing:
                    state.times.setdefault(mode, []).append(_timed_call(step, device))
                else:
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
            except Exception as error:  # noqa: BLE001  (e.g. out of memory at a big config)
                state.errors[mode] = _short(error)
                live.remove(state)

        for _ in range(opts.warmup):
            for state in list(live):
                run_one(state, timing=False)
        done = 0
        for repeat in range(opts.repeats):
            # A round's order varies so that no peer always runs right after the same neighbour
            # (a cell step after the reference's loop finds its caches cold).
            order = [live[k] for k in round_order(len(live), repeat)] if live else []
            for state in order:
                run_one(state, timing=True)
                progress.update(1)
                done += 1
        # Calls that did not happen (failed check or run) still count as done for the bar.
        progress.update(sum(1 for s in states if not s.peer.unavailable) * opts.repeats - done)
        for state in live:
            prepare, step = calls[state.peer.name]
            prepare()
            try:
                state.peak_mb[mode] = memory.measure(step)
            except Exception as error:  # noqa: BLE001  (the timings stand; only the memory figure is lost)
                state.peak_mb[mode] = None
                state.memory_errors[mode] = _short(error)
        del calls
    return states


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = None
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def git_commit() -> tuple[Optional[str], Optional[bool]]:
    """(HEAD of the source tree, whether tracked files other than results and prose differ from
    it), or (None, None). Results and markdown are left out: a run that follows another in the same
    tree (which rewrote a results file) measures the same code."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)*.md"], capture_output=True,
                               timeout=10).returncode != 0
        return head or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_instruction_sets() -> str:
    """The vector instruction sets the CPU peers run: our kernels' (ZONEOUT_FUSED_CPU_ISA), ATen's
    (ATEN_CPU_CAPABILITY) and oneDNN's ceiling (ONEDNN_MAX_CPU_ISA), e.g. all three limited to AVX2 on
    an AVX-512 machine to measure the AVX2 code paths side by side."""
    try:
        from .. import cpu_isa
        ours = cpu_isa.cpu_isa()
    except RuntimeError:  # the CPU extension is not built
        ours = "unavailable"
    aten = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "best"
    return f"zoneout_fused {ours}, ATen {aten}, oneDNN {onednn}"


def environment(device: torch.device, memory: PeakMemory, heap: Optional[str] = None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit, dirty = git_commit()
    return dict(device=device_name(device), device_type=device.type, torch=torch.__version__,
                triton=triton_version, cuda=torch.version.cuda if device.type == "cuda" else None,
                commit=commit, commit_dirty=dirty, python=platform.python_version(),
                threads=torch.get_num_threads() if device.type == "cpu" else None,
                instruction_sets=cpu_instruction_sets() if device.type == "cpu" else None,
                peak_mem_method=memory.method, heap=heap,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def paired_quartiles(peer_times: list[float], times: list[float]) -> Optional[list[float]]:
    """[lower quartile, median, upper quartile] of peer_times[r] / times[r] over the rounds r, or None.

    The repeats are interleaved, so index r of two peers' times is the same round: a slow phase of
    the machine slows both calls of a round, and the spread of these ratios shows what is left.
    Lists of different lengths (a peer failed part-way) have no pairing."""
    if len(times) < 2 or len(peer_times) != len(times) or min(times) <= 0:
        return None
    return statistics.quantiles([p / t for p, t in zip(peer_times, times)], n=4, method="inclusive")


def case_records(case: Case, group: str, dtype_name: str, states: list[PeerState], env: dict, opts,
                 floors: Optional[dict] = None) -> list[dict]:
    """One record per (peer, mode). speedup_vs_nn_lstm is against the case's no-zoneout ceiling
    (torch's layer, or its cell for cell cases); floor_ms is the case's matrix products alone."""
    zkw = zoneout_kwargs_for(case, opts)
    rnn_cell = getattr(opts, "cell", "lstm")
    steps = check_steps_for(case, torch.device(opts.device), opts.check_steps)
    modes = modes_for(case, opts)
    floors = floors or {}
    medians = {(s.peer.name, mode): statistics.median(s.times[mode])
               for s in states for mode in modes if s.times.get(mode) and mode not in s.errors}
    records = []
    for state in states:
        for mode in modes:
            median = medians.get((state.peer.name, mode))
            times = state.times.get(mode, []) if median is not None else []
            baseline = baseline_name(rnn_cell, case.cell)
            ref, lstm = medians.get(("reference", mode)), medians.get((baseline, mode))
            plain = medians.get(("plain-loop", mode))
            baseline_times = next((b.times.get(mode, []) for b in states
                                   if b.peer.name == baseline and (baseline, mode) in medians), [])
            floor = floors.get(mode)
            records.append(dict(
                env, config=case.name, group=group, backend=state.peer.name, mode=mode, dtype=dtype_name,
                median_ms=median, min_ms=min(times) if times else None,
                ms_per_step=median / case.steps if median is not None else None,
                times_ms=[round(t, 4) for t in times], repeats=len(times), warmup=opts.warmup,
                peak_mem_mb=state.peak_mb.get(mode) if median is not None else None,
                peak_mem_error=state.memory_errors.get(mode),
                speedup_vs_reference=ref / median if (ref and median) else None,
                speedup_vs_nn_lstm=lstm / median if (lstm and median) else None,
                speedup_vs_nn_lstm_rounds=paired_quartiles(baseline_times, times) if lstm else None,
                speedup_vs_plain_loop=plain / median if (plain and median) else None,
                floor_ms=floor, floor_fraction=floor / median if (floor and median) else None,
                baseline=baseline, cell=case.cell, rnn_cell=rnn_cell,
                check=state.check, check_max_err=state.check_error, check_steps=steps,
                check_detail=state.check_detail, check_call_s=state.first_call_s, error=state.errors.get(mode) or state.error,
                zoneout=state.peer.zoneout, **case.shape_fields(), **zkw))
    return records


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m zoneout_fused.bench",
        description="Times the zoneout LSTM backends against the reference loop, the reference under "
                    "torch.compile and torch.nn.LSTM, after checking each against the reference.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    # "tiny", "tiny-bi" and "tiny-decode" are accepted but not advertised: the test suite's micro cases.
    parser.add_argument("--config", default="small", choices=PUBLIC_CONFIGS + ("tiny", "tiny-bi", "tiny-decode"),
                        metavar="{" + ",".join(PUBLIC_CONFIGS) + "}",
                        help="shapes: small (the CPU targets), the paper's char-ptb, word-ptb, text8, pmnist, "
                             "sweep (H in 64..512 at B=32 T=50 I=64, for the plot), encoder (bidirectional TTS "
                             "encoder LSTMs, 1 and 2 layers), or all")
    parser.add_argument("--cell", default="lstm", choices=RNN_CELLS,
                        help="the recurrent layer: lstm (default), gru, rnn-tanh or rnn-relu, beside torch's "
                             "nn.GRU / nn.RNN (decode: the cells, beside nn.GRUCell / nn.RNNCell; GRU/RNN "
                             "default z_h = 0.1)")
    parser.add_argument("--dtype", default="float32",
                        help="comma list of " + ", ".join(DTYPES) + " (default float32)")
    parser.add_argument("--backends", default="all",
                        help="comma list of " + ", ".join(ALL_PEERS) + "; default all for the device")
    parser.add_argument("--modes", default=None,
                        help="comma list of eval, fwd, fwd+bwd (default: fwd,fwd+bwd; decode: all three)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per backend and mode (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls first (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--zoneout-cell", type=float, default=None,
                        help="z_c (default 0.5; pmnist: 0.15, the paper's)")
    parser.add_argument("--zoneout-hidden", type=float, default=None,
                        help="z_h (default 0.05; pmnist: 0.15, the paper's)")
    parser.add_argument("--recurrent-dropout", type=float, default=0.0)
    parser.add_argument("--mask-mode", default=None, choices=("independent", "shared", "timestep", "static"),
                        help="default independent (pmnist: shared)")
    parser.add_argument("--check-steps", type=int, default=None,
                        help="steps the check runs (default: all, or the first 8 for large CPU cases)")
    parser.add_argument("--compile-timeout", type=float, default=None,
                        help="seconds the first call of a compiled peer (its compile) may take before it is "
                             "reported as an error (default: 300 on CPU, 600 on CUDA; 0: no limit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--default-heap", action="store_true",
                        help="CPU: leave glibc's heap thresholds to move with the run's history (by default "
                             "they are pinned, so that no peer's time depends on what ran before it)")
    parser.add_argument("--json", default=None, metavar="PATH", help='write {"records": [...]} here')
    parser.add_argument("--markdown", default=None, metavar="PATH", help="write the table as markdown here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    opts = parser.parse_args(argv)

    if opts.cell != "lstm":
        if opts.zoneout_cell is not None:
            parser.error(f"--zoneout-cell: --cell {opts.cell} has no cell state")
        if opts.mask_mode == "shared":
            parser.error(f"--mask-mode shared ties a cell mask the {opts.cell} does not have")
        if opts.cell != "gru" and opts.recurrent_dropout:
            parser.error("--recurrent-dropout needs a gated cell: --cell lstm or gru")
    opts.dtypes = [d.strip() for d in opts.dtype.split(",") if d.strip()]
    for name in opts.dtypes:
        if name not in DTYPES:
            parser.error(f"--dtype: unknown dtype {name!r}; choose from {tuple(DTYPES)}")
    opts.backend_list = None if opts.backends == "all" else [b.strip() for b in opts.backends.split(",") if b.strip()]
    for name in opts.backend_list or ():
        if name not in ALL_PEERS + BASELINE_NAMES:
            parser.error(f"--backends: unknown backend {name!r}; choose from {ALL_PEERS}")
    opts.modes = [m.strip() for m in opts.modes.split(",") if m.strip()] if opts.modes else None
    for mode in opts.modes or ():
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r}; choose from {MODES}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    opts.repeats = DEFAULT_REPEATS[opts.device] if opts.repeats is None else opts.repeats
    opts.warmup = DEFAULT_WARMUP[opts.device] if opts.warmup is None else opts.warmup
    opts.compile_timed_out = {}  # peer name -> why: set by the first case whose compile runs out of time
    if opts.compile_timeout is None:
        opts.compile_timeout = DEFAULT_COMPILE_TIMEOUT[opts.device]
    if opts.repeats < 1 or opts.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return opts


def main(argv=None, *, extra_peers: Optional[dict[str, Peer]] = None) -> list[dict]:
    """Runs the benchmark; returns the records (also written to --json). extra_peers: for tests."""
    from . import report  # here, so `python -m zoneout_fused.bench.report` finds it unimported

    opts = parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    cases = cases_for(opts.config)
    peers_of = {cell: select_peers(device, opts.backend_list, extra_peers, cell, opts.cell)
                for cell in {c.cell for c in cases}}
    if any(p.compiled for peers in peers_of.values() for p in peers) and opts.warmup < 1:
        opts.warmup = 1  # a compiled peer's first call at the timed shape compiles
    heap = None
    if device.type == "cpu":
        heap = "default (--default-heap)" if opts.default_heap else pin_heap_thresholds()
    memory = PeakMemory(device)
    env = environment(device, memory, heap)

    from tqdm.auto import tqdm

    total = sum(len(opts.dtypes) * len(modes_for(case, opts)) * opts.repeats
                * sum(1 for p in peers_of[case.cell] if not p.unavailable) for case in cases)
    records = []
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit "
          f"{(env['commit'] or 'unknown')[:12]}{' (modified)' if env['commit_dirty'] else ''}  "
          f"threads {env['threads']}")
    if env.get("instruction_sets"):
        print(f"instruction sets: {env['instruction_sets']}")
    print(f"peak memory: {memory.method}")
    if heap is not None:
        print(f"heap: {heap}")
    with tqdm(total=total, desc="timing", unit="call", disable=opts.quiet, leave=False) as progress:
        for case in cases:
            for dtype_name in opts.dtypes:
                progress.set_postfix_str(f"{case.name} {dtype_name}")
                states = run_case(case, DTYPES[dtype_name], device, peers_of[case.cell], opts, memory, progress)
                floors = matmul_floor_ms(case, DTYPES[dtype_name], device, modes_for(case, opts), opts.repeats,
                                         opts.cell)
                case_records_ = case_records(case, opts.config, dtype_name, states, env, opts, floors)
                for record in case_records_:  # a loaded machine explains noisy figures
                    record["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
                records += case_records_
                progress.clear()
                print(report.text_table(case, dtype_name, case_records_, zoneout_kwargs_for(case, opts)), flush=True)
    if opts.json:
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(opts.json, "w") as out:
            json.dump({"records": records}, out, indent=1)
            out.write("\n")
        print(f"wrote {len(records)} records to {opts.json}")
    if opts.markdown:
        with open(opts.markdown, "w") as out:
            out.write(report.markdown(records))
        print(f"wrote {opts.markdown}")
    return records
