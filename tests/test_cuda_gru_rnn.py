"""The CUDA backend's GRU / plain-RNN layer op (zoneout_fused::cuda_gru_rnn_layer_*) against the
reference (reference.gru_rnn_layer), element for element.

GPU only: every test is skipped, with the reason, where torch sees no CUDA device. Where a GPU
is present but the extension is not built, the tests fail (a missing build is a failure, not a
skip). The recurrent product always comes from cuBLAS here (the op has no fused variant).
Comparisons: float64 tightly (conftest.assert_close); float32 and the 16-bit types by the
three-way rule of zoneout_fused/testing.py, against a float64 reference on the same inputs
and masks (same seed).
"""
import os

import pytest
import torch

# cuBLAS under torch.use_deterministic_algorithms (the NaN-fill fixture) needs this before its
# first handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from zoneout_fused import ops, reference  # noqa: E402
from zoneout_fused.masks import MASK_MODE_CODES, MASK_MODES  # noqa: E402
from conftest import (DEVICE_SEED, assert_close, assert_device_seed_matches_cpu_seed,  # noqa: E402
                      assert_graph_replays_read_the_seed, forbid_host_sync, reference_mismatch)

# Where a GPU is present a missing build fails instead of skipping (conftest.cuda_extension).
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: the CUDA backend's kernels cannot run without one"),
              pytest.mark.usefixtures("cuda_extension")]

DEVICE = "cuda"
CELLS = ("gru", "rnn_tanh", "rnn_relu")
# "shared" differs from "independent" only in the cell mask, which these cells do not have.
MODES = tuple(mode for mode in MASK_MODES if mode != "shared")
GRAD_NAMES = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")




def cuda_gru_rnn_layer(*args):
    return ops.BACKENDS["cuda"].gru_rnn_layer(*args)


def rows(cell):
    return 3 if cell == "gru" else 1


def make_inputs(cell, steps, batch, inputs, hidden, dtype=torch.float32, *, bias=True, lengths=None):
    """Deterministic layer-op tensors, drawn in float64 on the CPU then cast (same values in every dtype)."""
    g = torch.Generator().manual_seed(steps * 1000 + batch * 100 + hidden + 7 * reference.CELL_CODES[cell])
    k = hidden ** -0.5
    gh = rows(cell) * hidden

    def draw(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s

    tensors = dict(x=draw(steps, batch, inputs), h0=draw(batch, hidden, s=0.5), w_ih=draw(gh, inputs, s=k),
                   w_hh=draw(gh, hidden, s=k), b_ih=draw(gh, s=k) if bias else None,
                   b_hh=draw(gh, s=k) if bias else None)
    tensors = {n: (t.to(device=DEVICE, dtype=dtype) if t is not None else None) for n, t in tensors.items()}
    tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64, device=DEVICE) if lengths is not None else None
    return tensors


def run(layer_fn, tensors, *, cell, seed=1234, layer=0, direction=0, zoneout_hidden=0.0, recurrent_dropout=0.0,
        mask_mode="independent", training=True, grads=True):
    """Forward, then gradients of a fixed random weighting of y; returns a dict of results.
    `seed`: an int (passed as a CPU tensor) or the seed tensor itself."""
    leaves = {n: tensors[n].detach().clone().requires_grad_(grads) if tensors[n] is not None else None
              for n in GRAD_NAMES}
    seed_tensor = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
    y = layer_fn(leaves["x"], leaves["h0"], leaves["w_ih"], leaves["w_hh"], leaves["b_ih"], leaves["b_hh"],
                 tensors["lengths"], seed_tensor, reference.CELL_CODES[cell], layer, direction, zoneout_hidden,
                 recurrent_dropout, MASK_MODE_CODES[mask_mode], training)
    out = {"y": y.detach()}
    if grads:
        # Loss weights rounded through bfloat16: the same values in every dtype under test.
        g = torch.Generator().manual_seed(7)
        w_y = torch.randn(y.shape, generator=g).to(torch.bfloat16).to(device=y.device, dtype=y.dtype)
        names = [n for n in GRAD_NAMES if leaves[n] is not None]
        for n, grad in zip(names, torch.autograd.grad((y * w_y).sum(), [leaves[n] for n in names])):
            out["grad_" + n] = grad
    return out


def to_float64(tensors):
    return {n: (t.to(torch.float64) if t is not None and t.is_floating_point() else t) for n, t in tensors.items()}


def assert_matches_reference(actual, tensors, **kwargs):
    """`actual` (run() of the CUDA backend) against run() of the reference on `tensors`
    (conftest.reference_mismatch)."""
    assert all(a.dtype == tensors["x"].dtype for a in actual.values())
    error = reference_mismatch(actual, lambda ts: run(reference.gru_rnn_layer, ts, **kwargs), tensors, list(actual))
    assert error is None, error


# --------------------------------------------------------------------------------------
# Element for element against the reference (same seed, same masks)
# --------------------------------------------------------------------------------------
CASES = [
    # (steps, batch, inputs, hidden, lengths, bias)
    (7, 4, 5, 6, None, True),
    (1, 3, 4, 5, None, True),              # T = 1
    (9, 1, 3, 37, None, False),            # B = 1, odd H, no bias
    (6, 5, 4, 7, [6, 2, 0, 5, 1], True),   # lengths, one empty sequence
    (40, 3, 2, 101, [40, 25, 1], True),    # B*H = 303: more than one block of threads
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}B{c[1]}I{c[2]}H{c[3]}" + ("L" if c[4] else "")
                         + ("" if c[5] else "nobias"))
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_training(cell, mode, direction, case, nan_fill):
    steps, batch, inputs, hidden, lengths, bias = case
    tensors = make_inputs(cell, steps, batch, inputs, hidden, lengths=lengths, bias=bias)
    kwargs = dict(cell=cell, seed=2024 + direction, layer=1, direction=direction, zoneout_hidden=0.25,
                  mask_mode=mode)
    assert_matches_reference(run(cuda_gru_rnn_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_gru_recurrent_dropout(mode, direction, nan_fill):
    tensors = make_inputs("gru", 11, 4, 3, 9, lengths=[11, 7, 3, 10])
    kwargs = dict(cell="gru", seed=99, direction=direction, zoneout_hidden=0.15, recurrent_dropout=0.3,
                  mask_mode=mode)
    assert_matches_reference(run(cuda_gru_rnn_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_eval(cell, direction, nan_fill):
    tensors = make_inputs(cell, 8, 3, 4, 10, lengths=[8, 5, 2])
    kwargs = dict(cell=cell, direction=direction, zoneout_hidden=0.5,
                  recurrent_dropout=0.2 if cell == "gru" else 0.0, training=False)
    assert_matches_reference(run(cuda_gru_rnn_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_reference_float64(cell, direction, training, bias, nan_fill):
    # Probabilities not representable in float32: ZoneoutParams holds doubles, so the float64
    # evaluation expectation and 1/(1-p) are the reference's to the last bit.
    tensors = make_inputs(cell, 10, 3, 4, 6, torch.float64, lengths=[10, 4, 7], bias=bias)
    kwargs = dict(cell=cell, seed=5, direction=direction, zoneout_hidden=0.1,
                  recurrent_dropout=0.3 if cell == "gru" else 0.0, training=training)
    assert_matches_reference(run(cuda_gru_rnn_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("cell", CELLS)
def test_full_zoneout_freezes_state(cell):
    tensors = make_inputs(cell, 5, 2, 3, 4)
    kwargs = dict(cell=cell, zoneout_hidden=1.0, grads=False)
    out = run(cuda_gru_rnn_layer, tensors, **kwargs)
    assert_matches_reference(out, tensors, **kwargs)
    assert torch.equal(out["y"], tensors["h0"].expand_as(out["y"]))


# --------------------------------------------------------------------------------------
# 16-bit dtypes: three-way accuracy, float32 saved values
# --------------------------------------------------------------------------------------
# rnn_relu is left out of the 16-bit comparison: its derivative jumps at 0, and a pre-activation
# within a 16-bit rounding of 0 may take either side in the backend and in the float64
# reference, an O(1) difference in its gradient that no rounding bound covers. float32 and
# float64 test it above.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_low_precision_three_way(cell, direction, dtype, nan_fill):
    low = make_inputs(cell, 20, 8, 6, 24, dtype, lengths=[20, 19, 3, 11, 20, 1, 7, 15])
    kwargs = dict(cell=cell, seed=11, direction=direction, zoneout_hidden=0.1,
                  recurrent_dropout=0.1 if cell == "gru" else 0.0)
    assert_matches_reference(run(cuda_gru_rnn_layer, low, **kwargs), low, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("cell", CELLS)
def test_saved_gates_dtype_and_layout(cell, dtype):
    t = make_inputs(cell, 4, 2, 3, 5, dtype, lengths=[4, 2])
    y, gates = torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(
        t["x"], t["h0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], t["lengths"], torch.tensor(3),
        reference.CELL_CODES[cell], 0, 0, 0.1, 0.0, 0, True)
    state = ops.state_dtype(dtype)
    assert (y.dtype, gates.dtype) == (dtype, state)
    assert y.shape == (4, 2, 5) and gates.shape == (4, 2, (4 if cell == "gru" else 1) * 5)
    assert torch.all(gates[2:, 1] == 0), "gates past a sequence's end must be zero"
    if cell == "gru" and dtype == torch.float64:
        # (r, u, n, hp_n): hp_n = h_{t-1} W_hn^T + b_hn at the first step (h_{t-1} = h0).
        hp_n = t["h0"] @ t["w_hh"][10:].t() + t["b_hh"][10:]
        assert_close(gates[0, :, 15:], hp_n, torch.float64)


# --------------------------------------------------------------------------------------
# Gradients, op registration, determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [None, [3, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("mode", ["independent", "static"])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell, direction, mode, lengths):
    t = make_inputs(cell, 3, 2, 3, 4, torch.float64, lengths=lengths)
    names = [n for n in GRAD_NAMES if t[n] is not None]
    leaves = [t[n].detach().clone().requires_grad_() for n in names]
    seed = torch.tensor(31, dtype=torch.int64)
    dropout = 0.2 if cell == "gru" else 0.0

    def layer(*args):
        return cuda_gru_rnn_layer(*args, t["lengths"], seed, reference.CELL_CODES[cell], 0, direction, 0.3, dropout,
                                  MASK_MODE_CODES[mode], True)

    assert torch.autograd.gradcheck(layer, leaves)


def test_gradcheck_float64_no_bias():
    t = make_inputs("gru", 4, 2, 3, 4, torch.float64, bias=False, lengths=[4, 2])
    leaves = [t[n].detach().clone().requires_grad_() for n in ("x", "h0", "w_ih", "w_hh")]
    seed = torch.tensor(5, dtype=torch.int64)

    def layer(x, h0, w_ih, w_hh):
        return cuda_gru_rnn_layer(x, h0, w_ih, w_hh, None, None, t["lengths"], seed, 1, 0, 1, 0.3, 0.2, 0, True)

    assert torch.autograd.gradcheck(layer, leaves)


def test_double_backward_matches_reference():
    """create_graph=True goes through the reference (ops.differentiable_layer_backward)."""
    t = make_inputs("gru", 5, 2, 3, 4, torch.float64, lengths=[5, 3])
    results = []
    for layer_fn in (cuda_gru_rnn_layer, reference.gru_rnn_layer):
        x = t["x"].detach().clone().requires_grad_()
        w_hh = t["w_hh"].detach().clone().requires_grad_()
        y = layer_fn(x, t["h0"], t["w_ih"], w_hh, t["b_ih"], t["b_hh"], t["lengths"], torch.tensor(9), 1, 0, 0,
                     0.2, 0.1, 0, True)
        (grad_x,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (penalty_grad,) = torch.autograd.grad(grad_x.pow(2).sum(), w_hh)
        results.append(penalty_grad)
    assert_close(results[0], results[1], torch.float64)


def _opcheck_args(cell, requires_grad, bias=True):
    t = make_inputs(cell, 4, 3, 2, 5, lengths=[4, 2, 3], bias=bias)
    leaves = {n: (t[n].detach().clone().requires_grad_(requires_grad) if t[n] is not None else None)
              for n in GRAD_NAMES}
    return [leaves["x"], leaves["h0"], leaves["w_ih"], leaves["w_hh"], leaves["b_ih"], leaves["b_hh"],
            t["lengths"], torch.tensor(8, dtype=torch.int64), reference.CELL_CODES[cell], 0, 1, 0.3,
            0.1 if cell == "gru" else 0.0, MASK_MODE_CODES["independent"], True]


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_forward(cell, requires_grad):
    torch.library.opcheck(torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward.default,
                          _opcheck_args(cell, requires_grad))


def test_opcheck_forward_no_bias():
    torch.library.opcheck(torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward.default,
                          _opcheck_args("gru", True, bias=False))


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_backward(cell):
    args = _opcheck_args(cell, False)
    y, gates = torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*args)
    torch.library.opcheck(torch.ops.zoneout_fused.cuda_gru_rnn_layer_backward.default,
                          [torch.randn_like(y), *args, y, gates])


@pytest.mark.parametrize("cell", CELLS)
def test_empty_sequence(cell):
    """T = 0: empty outputs, zero gradients of the shapes the fake kernels promise."""
    args = _opcheck_args(cell, False)
    args[0] = args[0][:0]
    y, gates = torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*args)
    assert y.shape == (0, 3, 5) and gates.shape == (0, 3, (4 if cell == "gru" else 1) * 5)
    grads = torch.ops.zoneout_fused.cuda_gru_rnn_layer_backward(torch.zeros_like(y), *args, y, gates)
    expected_shapes = [args[0].shape, args[1].shape, args[2].shape, args[3].shape, (args[3].shape[0],),
                       (args[3].shape[0],)]
    assert [tuple(g.shape) for g in grads] == [tuple(s) for s in expected_shapes]
    assert all(torch.all(g == 0) for g in grads[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cell", CELLS)
def test_deterministic(cell, dtype):
    tensors = make_inputs(cell, 30, 64, 8, 48, dtype, lengths=[30 - i % 31 for i in range(64)])
    kwargs = dict(cell=cell, seed=77, direction=1, zoneout_hidden=0.2, recurrent_dropout=0.1 if cell == "gru" else 0.0)
    first, second = run(cuda_gru_rnn_layer, tensors, **kwargs), run(cuda_gru_rnn_layer, tensors, **kwargs)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between identical runs"


def test_different_seeds_differ():
    tensors = make_inputs("gru", 5, 4, 3, 8)
    a = run(cuda_gru_rnn_layer, tensors, cell="gru", seed=1, zoneout_hidden=0.5, grads=False)
    b = run(cuda_gru_rnn_layer, tensors, cell="gru", seed=2, zoneout_hidden=0.5, grads=False)
    assert not torch.equal(a["y"], b["y"])


@pytest.mark.parametrize("cell", CELLS)
def test_non_contiguous_inputs(cell):
    t = make_inputs(cell, 6, 3, 4, 5)
    strided = dict(t)
    strided["x"] = t["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, [B, T, I] storage
    strided["w_hh"] = t["w_hh"].t().contiguous().t()
    strided["h0"] = t["h0"].t().contiguous().t()
    assert not strided["x"].is_contiguous()
    kwargs = dict(cell=cell, zoneout_hidden=0.3)
    assert_matches_reference(run(cuda_gru_rnn_layer, strided, **kwargs), t, **kwargs)


# --------------------------------------------------------------------------------------
# Argument checks: each message names the argument
# --------------------------------------------------------------------------------------
def _forward_args(cell="gru", **overrides):
    t = make_inputs(cell, 3, 2, 4, 5)
    args = dict(x=t["x"], h0=t["h0"], w_ih=t["w_ih"], w_hh=t["w_hh"], b_ih=t["b_ih"], b_hh=t["b_hh"], lengths=None,
                seed=torch.tensor(1), cell=reference.CELL_CODES[cell], layer=0, direction=0, zoneout_hidden=0.1,
                recurrent_dropout=0.0, mask_mode=0, training=True)
    args.update(overrides)
    return list(args.values())


# Bad values are built lazily: collection must not touch CUDA on a machine without it.
# (cell, argument, bad value, error); the GRU has H = 5, so 15 rows.
BAD_ARGUMENTS = [
    ("gru", "x", lambda: torch.zeros(3, 2, 4), RuntimeError),                 # CPU tensor
    ("gru", "x", lambda: torch.zeros(3, 2, device=DEVICE), RuntimeError),     # wrong rank
    ("gru", "cell", lambda: 0, ValueError),                                   # the LSTM's code
    ("gru", "cell", lambda: 4, ValueError),
    ("gru", "w_hh", lambda: torch.zeros(20, 5, device=DEVICE), RuntimeError),  # LSTM-shaped
    ("gru", "w_ih", lambda: torch.zeros(15, 3, device=DEVICE), RuntimeError),
    ("gru", "w_ih", lambda: torch.zeros(15, 4, device=DEVICE, dtype=torch.float64), TypeError),
    ("gru", "h0", lambda: torch.zeros(2, 6, device=DEVICE), RuntimeError),
    ("gru", "b_ih", lambda: torch.zeros(14, device=DEVICE), RuntimeError),
    ("gru", "b_hh", lambda: torch.zeros(15, device=DEVICE, dtype=torch.float64), TypeError),
    ("gru", "lengths", lambda: torch.tensor([3, 1], device=DEVICE, dtype=torch.int32), TypeError),
    ("gru", "lengths", lambda: torch.tensor([3, 1]), RuntimeError),         # lengths on the CPU
    ("gru", "seed", lambda: torch.tensor(1, device=DEVICE, dtype=torch.int32), TypeError),  # on the GPU, int32
    ("rnn_relu", "seed", lambda: torch.tensor([1, 2], device=DEVICE), RuntimeError),  # on the GPU, two values
    ("gru", "direction", lambda: 2, ValueError),
    ("gru", "mask_mode", lambda: 4, ValueError),
    ("gru", "zoneout_hidden", lambda: 1.5, ValueError),
    ("gru", "recurrent_dropout", lambda: 1.0, ValueError),
    ("rnn_tanh", "recurrent_dropout", lambda: 0.1, ValueError),             # the RNN has none
    ("rnn_relu", "recurrent_dropout", lambda: 0.1, ValueError),
    ("rnn_tanh", "w_hh", lambda: torch.zeros(15, 5, device=DEVICE), RuntimeError),  # GRU-shaped
    ("rnn_tanh", "b_hh", lambda: torch.zeros(15, device=DEVICE), RuntimeError),
]


@pytest.mark.parametrize("cell,name,make_value,error", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_rejects_bad_arguments(cell, name, make_value, error):
    with pytest.raises(error, match=name):
        torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*_forward_args(cell, **{name: make_value()}))


def test_backward_rejects_bad_saved_gates():
    args = _forward_args("gru")
    y, gates = torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*args)
    with pytest.raises(RuntimeError, match="gates"):
        torch.ops.zoneout_fused.cuda_gru_rnn_layer_backward(torch.ones_like(y), *args, y, gates[..., :5])


# --------------------------------------------------------------------------------------
# seed on the GPU: the kernels load it (never read on the host), so a CUDA graph replay
# draws with whatever value the buffer holds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_device_seed_matches_cpu_seed(cell, direction, mode, dtype, nan_fill):
    """Outputs and every gradient bit for bit as with the same value on the CPU (the backward op
    gets the device seed back from autograd's saved tensors)."""
    tensors = make_inputs(cell, 9, 4, 3, 10, dtype, lengths=[9, 5, 1, 8])
    kwargs = dict(cell=cell, layer=1, direction=direction, zoneout_hidden=0.3,
                  recurrent_dropout=0.25 if cell == "gru" else 0.0, mask_mode=mode)
    assert_device_seed_matches_cpu_seed(
        lambda seed, grads: run(cuda_gru_rnn_layer, tensors, seed=seed, grads=grads, **kwargs), DEVICE)


@pytest.mark.parametrize("cell", CELLS)
def test_device_seed_no_host_sync(cell):
    """Forward and backward ops with a device seed in training mode never synchronize with the host."""
    args = _forward_args(cell, seed=torch.tensor(DEVICE_SEED, device=DEVICE), zoneout_hidden=0.3,
                         recurrent_dropout=0.2 if cell == "gru" else 0.0)
    torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*args)  # first call outside: cuBLAS handle, workspace
    with forbid_host_sync():
        y, gates = torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*args)
        torch.ops.zoneout_fused.cuda_gru_rnn_layer_backward(torch.ones_like(y), *args, y, gates)


@pytest.mark.parametrize("cell", CELLS)
def test_device_seed_cuda_graph_replay(cell):
    """A captured forward draws fresh masks from the seed buffer's value at each replay."""
    tensors = make_inputs(cell, 6, 3, 4, 8, torch.float64, lengths=[6, 2, 4])
    kwargs = dict(cell=cell, zoneout_hidden=0.3, recurrent_dropout=0.2 if cell == "gru" else 0.0)
    seed = torch.tensor(1, device=DEVICE)

    def forward():
        return {"y": cuda_gru_rnn_layer(tensors["x"], tensors["h0"], tensors["w_ih"], tensors["w_hh"],
                                        tensors["b_ih"], tensors["b_hh"], tensors["lengths"], seed,
                                        reference.CELL_CODES[cell], 0, 0, kwargs["zoneout_hidden"],
                                        kwargs["recurrent_dropout"], MASK_MODE_CODES["independent"], True)}

    assert_graph_replays_read_the_seed(
        forward, seed, lambda value: run(cuda_gru_rnn_layer, tensors, seed=value, grads=False, **kwargs))


@pytest.mark.parametrize("cell", CELLS)
def test_eval_ignores_device_seed(cell, nan_fill):
    """Evaluation draws nothing: a device seed holding garbage changes nothing (never dereferenced)."""
    tensors = make_inputs(cell, 8, 3, 4, 10, lengths=[8, 5, 2])
    kwargs = dict(cell=cell, zoneout_hidden=0.5, recurrent_dropout=0.2 if cell == "gru" else 0.0, training=False)
    garbage = torch.tensor(torch.iinfo(torch.int64).min + 12345, device=DEVICE)
    on_cpu = run(cuda_gru_rnn_layer, tensors, seed=0, **kwargs)
    on_gpu = run(cuda_gru_rnn_layer, tensors, seed=garbage, **kwargs)
    for name in on_cpu:
        assert torch.equal(on_gpu[name], on_cpu[name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a seed on a GPU other than x's")
@pytest.mark.parametrize("cell", CELLS)
def test_seed_on_another_gpu_rejected(cell):
    with pytest.raises(RuntimeError, match=r"seed.*cuda:0.*cuda:1"):
        torch.ops.zoneout_fused.cuda_gru_rnn_layer_forward(*_forward_args(cell, seed=torch.tensor(1, device="cuda:1")))
