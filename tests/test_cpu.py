"""The fused C++ CPU backend (zoneout_fused::cpu_layer_*) against the reference oracle.

Training-mode comparisons use the same seed on both sides: both regenerate the contract's
Philox masks, so outputs and every gradient must agree element for element: tightly in
float64, and by the three-way rule (zoneout_fused/testing.py) in float32, whose bound follows this
machine's rounding yet stays far too tight to hide one flipped mask bit. Every instruction-set
copy of the kernels this CPU can run is tested (the `isa` parameter); the session header says
which ones this machine cannot run. The agreement tests also run each time loop (`loop`: the
fused one of float32 sequences, and the per-step one).
"""
import math
import os

import pytest
import torch
from torch import nn

import zoneout_fused as zf
from zoneout_fused import cpu_isa, masks, ops, reference
from zoneout_fused.testing import assert_all_three_way, three_way_error
from conftest import (assert_close, assert_same_bits, isa_param, loop_param, reference_mismatch,
                      run_with_loop_layouts)

# CI always builds the extension: a missing build is a failure, not a skip.
_UNAVAILABLE = ops.BACKENDS["cpu"].unavailable_reason(torch.device("cpu"))
if _UNAVAILABLE is not None:
    raise RuntimeError(f"tests/test_cpu.py needs the CPU extension: {_UNAVAILABLE}")

FORWARD = torch.ops.zoneout_fused.cpu_layer_forward.default
BACKWARD = torch.ops.zoneout_fused.cpu_layer_backward.default
cpu_layer = ops.BACKENDS["cpu"].layer

MODES = (0, 1, 2, 3)  # independent, shared, timestep, static
DTYPES = (torch.float64, torch.float32)
SEED = 20240917


def make_inputs(steps, batch, inputs, hidden, dtype=torch.float64, bias=True, generator_seed=0):
    """x, h0, c0, w_ih, w_hh, bias with magnitudes that keep every gate away from saturation."""
    g = torch.Generator().manual_seed(generator_seed)
    scale = 1.0 / math.sqrt(hidden)

    def rand(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(s).to(dtype)

    return [rand(steps, batch, inputs), rand(batch, hidden, s=0.5), rand(batch, hidden, s=0.5),
            rand(4 * hidden, inputs, s=2 * scale), rand(4 * hidden, hidden, s=2 * scale),
            rand(4 * hidden, s=scale) if bias else None]


def run(layer_fn, tensors, lengths=None, seed=SEED, layer=0, direction=0, zoneout_cell=0.0, zoneout_hidden=0.0,
        recurrent_dropout=0.0, mask_mode=0, training=True):
    """Forward + backward of a weighted sum of y and c_n; returns (y, c_n, grads of the tensors)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y, c_n = layer_fn(*leaves, lengths, torch.tensor(seed, dtype=torch.int64), layer, direction, zoneout_cell,
                      zoneout_hidden, recurrent_dropout, mask_mode, training)
    g = torch.Generator().manual_seed(1)
    w_y = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    w_c = torch.randn(c_n.shape, generator=g, dtype=torch.float64).to(y.dtype)
    ((y * w_y).sum() + (c_n * w_c).sum()).backward()
    return y.detach(), c_n.detach(), [t.grad if t is not None else None for t in leaves]


RESULT_NAMES = ("y", "c_n") + tuple(f"grad of {name}" for name in ("x", "h0", "c0", "w_ih", "w_hh", "bias"))


def _flat(result):
    y, c_n, grads = result
    return [y, c_n, *grads]


def assert_same_as_reference(tensors, dtype, **kwargs):
    """conftest.reference_mismatch of the CPU backend's run against the reference's."""
    actual = _flat(run(cpu_layer, tensors, **kwargs))
    error = reference_mismatch(actual, lambda ts: _flat(run(reference.lstm_layer, ts, **kwargs)), tensors,
                               RESULT_NAMES)
    assert error is None, error


# --------------------------------------------------------------------------------------
# Agreement with the reference.
# --------------------------------------------------------------------------------------
@isa_param
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mask_mode", MODES)
@loop_param
def test_matches_reference(mask_mode, direction, training, dtype, isa, loop):
    tensors = make_inputs(7, 3, 5, 37, dtype)  # odd T, H not a multiple of 32
    assert_same_as_reference(tensors, dtype, layer=1, direction=direction, zoneout_cell=0.35, zoneout_hidden=0.2,
                             mask_mode=mask_mode, training=training)


@isa_param
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask_mode", MODES)
@loop_param
def test_recurrent_dropout_matches_reference(mask_mode, training, dtype, isa, loop):
    tensors = make_inputs(6, 4, 3, 37, dtype)  # whole 8- and 16-unit vectors and a tail (vector_math.h's rows)
    assert_same_as_reference(tensors, dtype, direction=1, zoneout_cell=0.25, zoneout_hidden=0.4,
                             recurrent_dropout=0.3, mask_mode=mask_mode, training=training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mask_mode", [0, 2, 3])
@loop_param
def test_lengths_match_reference(mask_mode, direction, dtype, loop):
    tensors = make_inputs(7, 5, 4, 37, dtype)  # whole 8- and 16-unit vectors and a tail
    lengths = torch.tensor([7, 3, 5, 1, 6])
    assert_same_as_reference(tensors, dtype, lengths=lengths, direction=direction, zoneout_cell=0.3,
                             zoneout_hidden=0.3, recurrent_dropout=0.1, mask_mode=mask_mode, training=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (1, 1, 4, 6),     # T = 1, B = 1
    (1, 3, 2, 5),     # T = 1
    (63, 2, 3, 270),  # long odd T; H spans two mask chunks (256 units) and a ragged tail
    (5, 20, 3, 70),   # B*H above the parallel grain: several threads share a step
    (4, 1, 1, 1),     # H = 1, I = 1
    (3, 13, 5, 520),  # AVX-512 fused forward: a recurrent panel past 128 KB (half tiles where "auto" takes them); a padded last tile
    (4, 6, 70, 104),  # the input gradient in column tiles of copied W_ih rows, the last zero-padded; the
                      # weight gradients' last column tiles narrower (AVX-512 grad W_hh: 64 + 40 in 3 vectors)
], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
@isa_param
@loop_param
def test_shapes_match_reference(shape, dtype, isa, loop):
    tensors = make_inputs(*shape, dtype=dtype)
    assert_same_as_reference(tensors, dtype, direction=0, zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode=0)
    assert_same_as_reference(tensors, dtype, direction=1, zoneout_cell=0.2, zoneout_hidden=0.3, mask_mode=1,
                             layer=2)


@isa_param
@loop_param
def test_long_sums_match_reference(isa, loop):
    """T*B = 3200 rows: the weight and bias gradients are sums over all of them, formed in depth chunks
    (25 here) through two column tiles from copied panel rows, and the bias gradient step by step in
    the fused backward; all within the three-way rule of the float32 reference."""
    tensors = make_inputs(100, 32, 64, 128, torch.float32)
    assert_same_as_reference(tensors, torch.float32, zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode=0)


@pytest.mark.parametrize("isa", ("avx2", "avx512"), indirect=True)  # the tile kernels' instruction sets
def test_long_sums_at_large_hidden_match_reference(isa):
    """At H = 1500 (word-PTB's size) each element of the input gradient and of each step's gradient
    reaching h_{t-1} sums 4H = 6000 products. In one float32 chain each they erred past the three-way
    rule (grad of h0 here by 2.2e-5 against a bound of 1.3e-5; the bench's word-ptb check, the input
    gradient, 3.50e-6 against 3.19e-6); the tile products add partial sums of kSumSteps steps."""
    tensors = make_inputs(3, 8, 256, 1500, torch.float32)
    with cpu_isa.use_cpu_loop("fused"):
        assert_same_as_reference(tensors, torch.float32, zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode=0)


@pytest.mark.parametrize("isa", ("avx2", "avx512"), indirect=True)  # the tile kernels' instruction sets
def test_packed_gradient_rows_match_reference(isa):
    """Weight gradients with 4H = 2600 rows and T*B = 320: on 1 and 2 threads a thread's rows of a
    depth chunk (102 steps for AVX-512, 204 for AVX2: see tiled_product) pass both instruction sets'
    TileKernels::pack_rows_bytes (1300 rows x 102 steps: 530 KB, past AVX-512's 512 KB), so
    tiled_product packs them, in several groups, while the h0 run's 40-step chunk (208 KB a thread on 2
    threads) stays under the AMD bounds, so there it is read in place (Intel CPUs pack from 64 KB);
    a padded last column tile (H = 650, I = 5). The same bits on 1 and 2 threads, and the three-way
    rule against the reference."""
    tensors = make_inputs(8, 40, 5, 650, torch.float32)
    results = run_with_loop_layouts(lambda: _flat(run(cpu_layer, tensors, zoneout_cell=0.5, zoneout_hidden=0.05)),
                                    layouts=((1, "units", "same"), (2, "units", "alternate")))
    assert_same_bits(RESULT_NAMES, results)
    with cpu_isa.use_cpu_loop("fused"):
        assert_same_as_reference(tensors, torch.float32, zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_bias_matches_reference(dtype):
    tensors = make_inputs(6, 3, 4, 8, dtype, bias=False)
    assert_same_as_reference(tensors, dtype, zoneout_cell=0.3, zoneout_hidden=0.3, training=True)
    assert_same_as_reference(tensors, dtype, direction=1, zoneout_cell=0.3, zoneout_hidden=0.3, training=False)


def test_grad_bias_is_returned_without_bias():
    x, h0, c0, w_ih, w_hh, _ = make_inputs(3, 2, 3, 4)
    seed = torch.tensor(SEED)
    y, c_n, c_seq, gates = FORWARD(x, h0, c0, w_ih, w_hh, None, None, seed, 0, 0, 0.2, 0.2, 0.0, 0, True)
    grads = BACKWARD(torch.ones_like(y), torch.ones_like(c_n), x, h0, c0, w_ih, w_hh, None, None, seed, 0, 0, 0.2,
                     0.2, 0.0, 0, True, y, c_seq, gates)
    assert grads[5].shape == (16,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    steps, batch, inputs, hidden = 5, 3, 4, 6
    x, h0, c0, w_ih, w_hh, bias = make_inputs(steps, batch, inputs, hidden, dtype)
    # Same values, strided layouts: batch-major x, transposed states, column-strided weights.
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    h0_nc = h0.t().contiguous().t()
    c0_nc = torch.stack([c0, c0], dim=2)[:, :, 0]
    w_ih_nc = torch.stack([w_ih, -w_ih], dim=2)[:, :, 0]
    w_hh_nc = w_hh.t().contiguous().t()
    bias_nc = torch.stack([bias, bias], dim=1)[:, 1]
    strided = [x_nc, h0_nc, c0_nc, w_ih_nc, w_hh_nc, bias_nc]
    assert not any(t.is_contiguous() for t in strided)
    kwargs = dict(direction=1, zoneout_cell=0.3, zoneout_hidden=0.2, recurrent_dropout=0.1, training=True)
    # The op makes its operands contiguous: the same bits as from contiguous copies.
    for name, a, b in zip(RESULT_NAMES, _flat(run(cpu_layer, strided, **kwargs)),
                          _flat(run(cpu_layer, [x, h0, c0, w_ih, w_hh, bias], **kwargs))):
        assert torch.equal(a, b), name
    assert_same_as_reference(strided, dtype, **kwargs)
    # A non-contiguous grad_y (e.g. from a transposed output) in the backward op itself.
    seed = torch.tensor(SEED)
    args = (x, h0, c0, w_ih, w_hh, bias, None, seed, 0, 0, 0.3, 0.2, 0.0, 0, True)
    y_op, c_n_op, c_seq, gates = FORWARD(*args)
    grad_y = torch.randn(batch, steps, hidden, dtype=dtype).transpose(0, 1)
    grad_c = torch.randn(batch, hidden, dtype=dtype)
    out_nc = BACKWARD(grad_y, grad_c, *args, y_op, c_seq, gates)
    out_c = BACKWARD(grad_y.contiguous(), grad_c, *args, y_op, c_seq, gates)
    for a, b in zip(out_nc, out_c):
        assert torch.equal(a, b)


def test_zero_zoneout_equals_nn_lstm():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, dtype=torch.float64)
    x = torch.randn(9, 4, 5, dtype=torch.float64)
    h0, c0 = torch.randn(2, 4, 7, dtype=torch.float64)
    tensors = [x, h0, c0, lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0]
    y, c_n, _ = run(cpu_layer, tensors, training=True)
    y_ref, (_, c_ref) = lstm(x, (h0[None], c0[None]))
    assert_close(y, y_ref.detach(), torch.float64)
    assert_close(c_n, c_ref[0].detach(), torch.float64)


def test_module_cpu_backend_matches_reference_backend():
    """ZoneoutLSTM(backend="cpu") end to end: two bidirectional layers, packed input."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, zoneout_cell=0.3, zoneout_hidden=0.1, dtype=torch.float64)
    fused = zf.ZoneoutLSTM(4, 6, backend="cpu", **kwargs)
    ref = zf.ZoneoutLSTM(4, 6, backend="reference", **kwargs)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    lengths = torch.tensor([7, 2, 5])
    results = []
    for module in (fused, ref):
        xi = x.clone().requires_grad_()
        packed = nn.utils.rnn.pack_padded_sequence(xi, lengths, enforce_sorted=False)
        torch.manual_seed(5)  # the same per-call seed for both
        out, (h_n, c_n) = module(packed)
        (out.data.sin().sum() + h_n.sum() + (c_n * c_n).sum()).backward()
        results.append([out.data, h_n, c_n, xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        assert_close(a.detach(), b.detach(), torch.float64)


# --------------------------------------------------------------------------------------
# Gradients, op registration, determinism.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_mode", MODES)
@pytest.mark.parametrize("direction", [0, 1])
def test_gradcheck_training(mask_mode, direction):
    tensors = [t.requires_grad_() for t in make_inputs(4, 3, 2, 3)]
    lengths = torch.tensor([4, 2, 3])
    seed = torch.tensor(SEED)

    def fn(*ts):
        return cpu_layer(*ts, lengths, seed, 0, direction, 0.4, 0.3, 0.2, mask_mode, True)

    assert torch.autograd.gradcheck(fn, tensors)


def test_gradcheck_eval_no_bias():
    tensors = [t.requires_grad_() for t in make_inputs(3, 2, 2, 3, bias=False)[:5]]
    seed = torch.tensor(0)

    def fn(*ts):
        return cpu_layer(*ts, None, None, seed, 0, 1, 0.4, 0.3, 0.2, 0, False)

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "bias+lengths+dropout"])
def test_opcheck(with_options):
    x, h0, c0, w_ih, w_hh, bias = make_inputs(4, 3, 2, 5)
    bias = bias if with_options else None
    lengths = torch.tensor([4, 1, 3]) if with_options else None
    seed = torch.tensor(SEED)
    scalars = (0, 1, 0.3, 0.2, 0.1 if with_options else 0.0, 0, True)
    forward_args = [t.requires_grad_() if t is not None else None for t in (x, h0, c0, w_ih, w_hh, bias)]
    torch.library.opcheck(FORWARD, (*forward_args, lengths, seed, *scalars))
    y, c_n, c_seq, gates = FORWARD(x, h0, c0, w_ih, w_hh, bias, lengths, seed, *scalars)
    backward_args = (torch.randn_like(y), torch.randn_like(c_n), x.detach(), h0.detach(), c0.detach(),
                     w_ih.detach(), w_hh.detach(), bias.detach() if bias is not None else None, lengths, seed,
                     *scalars, y.detach(), c_seq, gates)
    torch.library.opcheck(BACKWARD, backward_args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    tensors = make_inputs(9, 6, 5, 40, dtype)
    kwargs = dict(direction=1, zoneout_cell=0.5, zoneout_hidden=0.05, recurrent_dropout=0.1, training=True)
    first = run(cpu_layer, tensors, **kwargs)
    second = run(cpu_layer, tensors, **kwargs)
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)
    other = run(cpu_layer, tensors, seed=SEED + 1, **kwargs)
    assert not torch.equal(first[0], other[0]), "a different seed must draw different masks"


def test_saved_tensors():
    """c_seq is the zoned c_t, gates the activations, zero past a sequence's end; c_n a fresh copy."""
    x, h0, c0, w_ih, w_hh, bias = make_inputs(5, 2, 3, 4)
    lengths = torch.tensor([5, 2])
    y, c_n, c_seq, gates = FORWARD(x, h0, c0, w_ih, w_hh, bias, lengths, torch.tensor(3), 0, 0, 0.3, 0.3, 0.0, 0,
                                   True)
    assert torch.equal(c_n, c_seq[-1]) and c_n.data_ptr() != c_seq.data_ptr()
    assert torch.all(gates[2:, 1] == 0) and torch.all(gates[:, 0] != 0)
    assert torch.equal(y[2:, 1], y[1, 1].expand(3, 4)) and torch.equal(c_seq[2:, 1], c_seq[1, 1].expand(3, 4))
    assert gates.shape == (5, 2, 16) and c_seq.dtype == x.dtype


def test_nan_propagates():
    x, h0, c0, w_ih, w_hh, bias = make_inputs(6, 3, 4, 5)
    x[2, 1, 0] = float("nan")
    for training in (True, False):
        y, c_n, grads = run(cpu_layer, [x, h0, c0, w_ih, w_hh, bias], zoneout_cell=0.3, zoneout_hidden=0.3,
                            training=training)
        assert torch.isfinite(y[:2]).all() and torch.isfinite(y[:, [0, 2]]).all()
        assert torch.isnan(y[2:, 1]).all() and torch.isnan(c_n[1]).all()
        assert torch.isnan(grads[3]).any()  # grad of w_ih


# --------------------------------------------------------------------------------------
# Argument checking: errors name the argument, nothing crashes.
# --------------------------------------------------------------------------------------
def _forward_args():
    x, h0, c0, w_ih, w_hh, bias = make_inputs(4, 3, 2, 5)
    return dict(x=x, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, bias=bias, lengths=torch.tensor([4, 2, 1]),
                seed=torch.tensor(SEED), layer=0, direction=0, zoneout_cell=0.2, zoneout_hidden=0.2,
                recurrent_dropout=0.0, mask_mode=0, training=True)


BAD_FORWARD = {
    "x_2d": (dict(x=torch.zeros(4, 3)), "x"),
    "x_int": (dict(x=torch.zeros(4, 3, 2, dtype=torch.int64)), "x"),
    "x_half": (dict(x=torch.zeros(4, 3, 2, dtype=torch.float16)), "x"),
    "x_no_steps": (dict(x=torch.zeros(0, 3, 2, dtype=torch.float64)), "x"),
    "x_wrong_input_size": (dict(x=torch.zeros(4, 3, 7, dtype=torch.float64)), "w_ih"),
    "h0_shape": (dict(h0=torch.zeros(3, 4, dtype=torch.float64)), "h0"),
    "h0_dtype": (dict(h0=torch.zeros(3, 5, dtype=torch.float32)), "h0"),
    "c0_shape": (dict(c0=torch.zeros(2, 5, dtype=torch.float64)), "c0"),
    "w_ih_shape": (dict(w_ih=torch.zeros(19, 2, dtype=torch.float64)), "w_ih"),
    "w_hh_shape": (dict(w_hh=torch.zeros(20, 4, dtype=torch.float64)), "w_hh"),
    "w_hh_dtype": (dict(w_hh=torch.zeros(20, 5, dtype=torch.float32)), "w_hh"),
    "bias_shape": (dict(bias=torch.zeros(5, dtype=torch.float64)), "bias"),
    "lengths_dtype": (dict(lengths=torch.tensor([4.0, 2.0, 1.0])), "lengths"),
    "lengths_shape": (dict(lengths=torch.tensor([4, 2])), "lengths"),
    "lengths_too_long": (dict(lengths=torch.tensor([5, 2, 1])), "lengths"),
    "lengths_negative": (dict(lengths=torch.tensor([4, -1, 1])), "lengths"),
    "seed_dtype": (dict(seed=torch.tensor(1.0)), "seed"),
    "seed_shape": (dict(seed=torch.tensor([1, 2])), "seed"),
    "seed_negative": (dict(seed=torch.tensor(-3)), "seed"),
    "layer": (dict(layer=-1), "layer"),
    "direction": (dict(direction=2), "direction"),
    "mask_mode_high": (dict(mask_mode=4), "mask_mode"),
    "mask_mode_low": (dict(mask_mode=-1), "mask_mode"),
    "zoneout_cell": (dict(zoneout_cell=1.5), "zoneout_cell"),
    "zoneout_hidden": (dict(zoneout_hidden=-0.1), "zoneout_hidden"),
    "zoneout_hidden_nan": (dict(zoneout_hidden=float("nan")), "zoneout_hidden"),
    "recurrent_dropout_one": (dict(recurrent_dropout=1.0), "recurrent_dropout"),
}


@pytest.mark.parametrize("case", sorted(BAD_FORWARD))
def test_bad_forward_arguments(case):
    change, name = BAD_FORWARD[case]
    args = _forward_args()
    args.update(change)
    with pytest.raises((RuntimeError, ValueError), match=name):
        FORWARD(*args.values())


@pytest.mark.parametrize("name", ["grad_y", "grad_c_n", "y", "c_seq", "gates"])
def test_bad_backward_arguments(name):
    args = _forward_args()
    y, c_n, c_seq, gates = FORWARD(*args.values())
    saved = dict(grad_y=torch.ones_like(y), grad_c_n=torch.ones_like(c_n), y=y, c_seq=c_seq, gates=gates)
    saved[name] = saved[name][..., :-1]  # wrong last dimension
    with pytest.raises(RuntimeError, match=name):
        BACKWARD(saved["grad_y"], saved["grad_c_n"], *args.values(), saved["y"], saved["c_seq"], saved["gates"])


def test_full_zoneout_freezes_state():
    """z_c = z_h = 1 in training: h and c stay h0 and c0; all gradient flows straight to them."""
    x, h0, c0, w_ih, w_hh, bias = make_inputs(5, 2, 3, 4)
    y, c_n, grads = run(cpu_layer, [x, h0, c0, w_ih, w_hh, bias], zoneout_cell=1.0, zoneout_hidden=1.0)
    assert torch.equal(y, h0.expand(5, 2, 4)) and torch.equal(c_n, c0)
    assert torch.count_nonzero(grads[0]) == 0 and torch.count_nonzero(grads[3]) == 0


def _ulps(got, exact):
    """|got - exact| in units of the float32 spacing at |exact| (exact: float64)."""
    magnitude = exact.abs().float()
    spacing = (torch.nextafter(magnitude, torch.tensor(math.inf)) - magnitude).double()
    return (got.double() - exact).abs() / spacing


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_vector_math_accuracy(isa):
    """The element kernels' own vector exp / tanh / sigmoid (csrc/cpu/vector_math.h) against
    float64, in ulps of the float32 result: exp within 1 (|x| up to its clamp, 87.3 / 88.3), tanh
    and sigmoid within 3 everywhere, tanh included near 0 where a tanh built from exp cancels
    (torch's own float32 sigmoid is 2.2 ulps off there); NaN stays NaN, the saturated ends exact."""
    if isa not in cpu_isa.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    op = torch.ops.zoneout_fused._cpu_vector_math
    code = cpu_isa.CPU_ISAS.index(isa)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-100, 100, 200_000), torch.linspace(-1, 1, 100_000),
                   torch.linspace(-1e-3, 1e-3, 10_000), torch.randn(100_000, generator=g) * 5,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8])])
    x = x[: x.numel() // 16 * 16]
    exact = {0: torch.exp(x.double()), 1: torch.tanh(x.double()), 2: torch.sigmoid(x.double())}
    bound = {0: 1.0, 1: 3.0, 2: 3.0}
    in_range = {0: (x > -87.3) & (x < 88.3), 1: torch.ones_like(x, dtype=torch.bool),
                2: exact[2] >= torch.finfo(torch.float32).tiny}  # sigmoid: below that, denormal results
    for function in (0, 1, 2):
        got = op(x, function, code)
        assert got.shape == x.shape
        checked = in_range[function]
        errors = _ulps(got[checked], exact[function][checked])
        assert errors.max().item() <= bound[function], (function, x[checked][errors.argmax()].item())
    special = torch.tensor([math.nan, -math.nan, 1e4, -1e4, math.inf, -math.inf] + [0.0] * 10)
    tanh, sigmoid = op(special, 1, code), op(special, 2, code)
    assert torch.isnan(tanh[:2]).all() and torch.isnan(sigmoid[:2]).all() and torch.isnan(op(special, 0, code)[:2]).all()
    assert tanh[2:6].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert sigmoid[2].item() == 1.0 and sigmoid[4].item() == 1.0 and 0.0 <= sigmoid[3].item() < 1e-37
    assert tanh[6:].eq(0).all() and sigmoid[6:].eq(0.5).all()


def test_vector_operations_are_inlined():
    """The element kernels' vector types (vector_math.h: F32x16, F32x8) are meant to inline into the
    kernels compiled for their instruction set. Where the compiler leaves one out of line (a lambda
    or helper without the target attribute between them did), each operation becomes a call passing
    its vectors through memory: 3.5x slower, or wrong where a caller built for the baseline passes a
    512-bit vector. An out-of-line copy leaves its symbol in the extension; there must be none."""
    import importlib
    import shutil
    import subprocess

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed: the extension was not built here")
    path = importlib.import_module("zoneout_fused._C").__file__
    symbols = subprocess.run([nm, "-C", path], capture_output=True, text=True, check=True).stdout
    outlined = [line for line in symbols.splitlines() if "zoneout_cpu::F32x" in line]
    assert not outlined, outlined[:5]


@pytest.mark.parametrize("path", ["active"] + list(cpu_isa.CPU_ISAS))
def test_philox_words_match_header(path):
    """The CPU mask loop's vectorized Philox (AVX-512 / AVX2 specialisations of the header's
    philox4x32_10) is bit-identical to the header and to the Python oracle, including runs
    whose low counter word carries into the high word and chunk tails."""
    op = torch.ops.zoneout_fused._philox_words_cpu
    code = -1 if path == "active" else cpu_isa.CPU_ISAS.index(path)
    if path != "active" and path not in cpu_isa.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {path} kernels")

    def as_int64(v):  # the schema's int is int64; the hook reinterprets it as uint64
        return v - 2**64 if v >= 2**63 else v

    checked = 0
    for seed in (0, 1, 0x123456789, 2**64 - 1, 0xDEADBEEFCAFEBABE):
        for first in (0, 5, 2**32 - 70, 2**33 + 3, 2**64 - 40):
            for c2, c3 in ((0, 0), (3, 0), (1, 2), (2**32 - 1, 2**32 - 1)):
                for n in (1, 15, 17, 64, 1000):
                    words = op(as_int64(seed), as_int64(first), c2, c3, n, code)
                    assert words.numel() > 0, f"{path} reported unavailable"
                    assert torch.equal(words[0], words[1]), (seed, first, c2, c3, n)
                    checked += 1
    assert checked == 500
    words = op(42, 7, 1, 0, 777, code)
    counters = torch.arange(777, dtype=torch.int64) + 7
    expected = torch.stack(masks.philox4x32_10(42, counters, 0, 1, 0)[:3])
    assert torch.equal(words[0], expected)


# --------------------------------------------------------------------------------------
# Instruction sets: every copy of the kernels draws the oracle's masks bit for bit.
# --------------------------------------------------------------------------------------
@isa_param
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mask_mode", MODES)
@loop_param
def test_masks_bit_for_bit_on_each_isa(mask_mode, direction, dtype, isa, loop):
    """A zoned-out unit copies its previous state exactly (1 * prev + 0 * candidate), an updated
    one takes a candidate that differs from it, so the forward's outputs reveal the masks it drew:
    they must be the oracle's, every bit, on every instruction set. H = 150 spans full vector
    blocks, a chunk boundary (64) and a tail."""
    steps, batch, hidden = 5, 3, 150
    x, h0, c0, w_ih, w_hh, bias = make_inputs(steps, batch, 4, hidden, dtype)
    seed, layer, z_c, z_h = 987654321987, 2, 0.4, 0.3
    y, _, c_seq, _ = FORWARD(x, h0, c0, w_ih, w_hh, bias, None, torch.tensor(seed), layer, direction, z_c, z_h, 0.0,
                             mask_mode, True)
    mode = masks.MASK_MODES[mask_mode]
    m_c, m_h, _ = masks.sequence_masks(seed, layer, direction, steps, batch, hidden, zoneout_cell=z_c,
                                       zoneout_hidden=z_h, mask_mode=mode)
    order = list(range(steps)) if direction == 0 else list(range(steps - 1, -1, -1))
    h_prev, c_prev = h0, c0
    for t in order:
        assert torch.equal(y[t] == h_prev, m_h[t]), f"hidden mask differs at t={t} ({isa})"
        assert torch.equal(c_seq[t] == c_prev, m_c[t]), f"cell mask differs at t={t} ({isa})"
        h_prev, c_prev = y[t], c_seq[t]
    assert m_h.any() and (~m_h).any() and m_c.any() and (~m_c).any()


def test_isa_choice_is_checked_and_restored():
    supported = cpu_isa.supported_cpu_isas()
    assert supported[0] == "scalar" and cpu_isa.cpu_isa() == supported[-1]  # the best one by default
    with pytest.raises(ValueError, match="isa"):
        cpu_isa.set_cpu_isa("sse9")
    for name in cpu_isa.CPU_ISAS:
        if name not in supported:
            with pytest.raises(ValueError, match=name):
                cpu_isa.set_cpu_isa(name)
    with cpu_isa.use_cpu_isa("scalar"):
        assert cpu_isa.cpu_isa() == "scalar"
    assert cpu_isa.cpu_isa() == supported[-1]


def _python_with_environment(code: str, variable: str, value: str):
    """A fresh interpreter running `code` with the environment variable set: what it ran, printed
    and raised."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], env={**os.environ, variable: value}, capture_output=True,
                          text=True, timeout=120)


def _assert_setting_from_environment(code: str, variable: str, valid: dict, invalid: str, message: str):
    """Each valid value of the variable makes `code` print what `valid` says; the invalid one fails
    it with `message` in the error."""
    for value, expected in valid.items():
        result = _python_with_environment(code, variable, value)
        assert result.returncode == 0 and result.stdout.split() == [expected], result.stderr[-2000:]
    result = _python_with_environment(code, variable, invalid)
    assert result.returncode != 0 and message in result.stderr


def test_isa_from_the_environment():
    """ZONEOUT_FUSED_CPU_ISA picks the copy when the extension loads; a value this CPU cannot run
    fails the first kernel call with a message naming the variable."""
    code = ("import torch, zoneout_fused as zf; from zoneout_fused import cpu_isa; print(cpu_isa.cpu_isa()); "
            "zf.ZoneoutLSTM(2, 3, backend='cpu')(torch.randn(2, 1, 2))")
    _assert_setting_from_environment(code, "ZONEOUT_FUSED_CPU_ISA",
                                     {"scalar": "scalar", "auto": cpu_isa.supported_cpu_isas()[-1]}, "sse9",
                                     "ZONEOUT_FUSED_CPU_ISA=sse9")


# --------------------------------------------------------------------------------------
# The accuracy rule itself: tight enough to catch the bugs it is there for.
# --------------------------------------------------------------------------------------
def _three_way_failures(monkeypatch, **kwargs):
    """Runs the float32 cpu-vs-reference comparison with the reference's masks or math broken
    as kwargs say; returns the three-way rule's messages (empty when it passes)."""
    shape, settings = (9, 3, 4, 33), dict(zoneout_cell=0.5, zoneout_hidden=0.05, layer=1)
    settings.update(kwargs.pop("settings", {}))
    tensors = make_inputs(*shape, dtype=torch.float32)
    actual = _flat(run(cpu_layer, tensors, **settings))
    for name, value in kwargs.items():
        monkeypatch.setattr(reference, name, value)  # raises for a name the reference lacks
    same_dtype = _flat(run(reference.lstm_layer, tensors, **settings))
    exact = _flat(run(reference.lstm_layer, [t.double() for t in tensors], **settings))
    monkeypatch.undo()
    return [m for m in map(three_way_error, actual, same_dtype, exact, RESULT_NAMES) if m is not None]


def test_three_way_rule_passes_the_correct_kernel(monkeypatch):
    assert _three_way_failures(monkeypatch) == []


def test_three_way_rule_catches_one_flipped_mask_bit(monkeypatch):
    """One unit of h kept instead of updated at one step of 9 (or the other way round)."""
    real_masks = reference.span_masks  # the masks of positions first .. first + steps - 1
    for t_flip, which in ((0, 1), (4, 0), (8, 1)):
        def flipped(seed, layer, direction, first, steps, *args):
            out = list(real_masks(seed, layer, direction, first, steps, *args))
            if first <= t_flip < first + steps:
                out[which] = out[which].clone()
                out[which][t_flip - first, 1, 7] = ~out[which][t_flip - first, 1, 7]
            return tuple(out)

        failures = _three_way_failures(monkeypatch, span_masks=flipped)
        assert failures, f"a flipped {'hc'[which]} mask bit at t={t_flip} went unnoticed"


def test_three_way_rule_catches_a_wrong_derivative_sign(monkeypatch):
    """The forget gate's activation with the derivative's sign flipped (sigmoid(a) -> 1 - sigmoid(-a)
    is the same value; a custom function gives the same forward and a negated backward)."""

    class SignFlippedSigmoid(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            s = torch.sigmoid(a)
            ctx.save_for_backward(s)
            return s

        @staticmethod
        def backward(ctx, grad):
            s, = ctx.saved_tensors
            return -grad * s * (1 - s)

    calls = []

    def sigmoid(a):  # the reference calls sigmoid for i, f, o in that order: flip only f
        calls.append(1)
        return SignFlippedSigmoid.apply(a) if len(calls) % 3 == 2 else torch.sigmoid(a)

    fake_torch = type("torch_with_flipped_f", (), {"__getattr__": lambda self, name: getattr(torch, name),
                                                   "sigmoid": staticmethod(sigmoid)})()
    failures = _three_way_failures(monkeypatch, torch=fake_torch)
    assert calls, "the reference no longer calls torch.sigmoid: update this test"
    assert any("grad" in m for m in failures) and not any(m.startswith(("y ", "c_n ")) for m in failures)


def test_three_way_rule_catches_the_wrong_step_order(monkeypatch):
    """The reverse direction walked first-to-last: x[0] processed first (with the masks of the
    positions it would have had), instead of x[T-1]."""
    real_layer = reference.lstm_layer
    calls = []

    def forward_walk(x, *args):
        calls.append(args[8])  # direction
        y, c_n = real_layer(x.flip(0), *args)
        return y.flip(0), c_n

    failures = _three_way_failures(monkeypatch, settings=dict(direction=1), lstm_layer=forward_walk)
    assert calls and set(calls) == {1}
    assert any(m.startswith("y ") for m in failures) and any("grad of w_hh" in m for m in failures)


# --------------------------------------------------------------------------------------
# The products' engine (csrc/cpu/gemm.h): oneDNN's linear or ATen's mm, each checked against
# the reference in float32, for every cell kind, at shapes whose products are large enough to
# take the oneDNN path (all but the RNN's per-step product, which the size rule keeps on ATen);
# the profiler confirms which engine ran. The per-step loop: the fused one forms every product of
# a float32 sequence with the tile kernels.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", cpu_isa.CPU_GEMMS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_each_gemm_engine_matches_reference(engine, cell):
    if engine not in cpu_isa.supported_cpu_gemms():
        pytest.skip(f"this torch has no {engine} products")
    steps, batch, inputs, hidden = 3, 64, 192, 128  # products of >= 4M multiply-adds (the RNN's per step: fewer)
    rows = {"lstm": 4, "gru": 3, "rnn_tanh": 1}[cell] * hidden
    g = torch.Generator().manual_seed(3)

    def rand(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s

    x, h0, c0 = rand(steps, batch, inputs), rand(batch, hidden, s=0.5), rand(batch, hidden, s=0.5)
    w_ih, w_hh, b_ih, b_hh = rand(rows, inputs, s=0.1), rand(rows, hidden, s=0.1), rand(rows, s=0.1), rand(rows, s=0.1)
    seed = torch.tensor(SEED)
    if cell == "lstm":
        tensors = [x, h0, c0, w_ih, w_hh, b_ih + b_hh]

        def layer(fn, ts):
            return fn(*ts, None, seed, 0, 1, 0.3, 0.1, 0.1, 0, True)
        fused, oracle = ops.BACKENDS["cpu"].layer, reference.lstm_layer
    else:
        tensors = [x, h0, w_ih, w_hh, b_ih, b_hh]

        def layer(fn, ts):
            return fn(*ts, None, seed, {"gru": 1, "rnn_tanh": 2}[cell], 0, 1, 0.2,
                      0.1 if cell == "gru" else 0.0, 0, True)
        fused, oracle = ops.BACKENDS["cpu"].gru_rnn_layer, reference.gru_rnn_layer

    def results(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in tensors]
        out = layer(fn, leaves)
        outs = out if isinstance(out, tuple) else (out,)
        weights = [torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o).to(dtype) for o in outs]
        sum((o * w).sum() for o, w in zip(outs, weights)).backward()
        return [o.detach() for o in outs] + [leaf.grad for leaf in leaves]

    with cpu_isa.use_cpu_gemm(engine), cpu_isa.use_cpu_loop("steps"), torch.profiler.profile() as profile:
        actual = results(fused, torch.float32)
    used_onednn = any(event.name == "mkldnn::_linear_pointwise" for event in profile.events())
    assert used_onednn == (engine == "onednn")  # the engine asked for is the one that ran
    names = [f"result {k}" for k in range(len(actual))]
    assert_all_three_way(actual, results(oracle, torch.float32), results(oracle, torch.float64), names)


def test_gemm_engine_choice_is_checked_and_restored():
    before = cpu_isa.cpu_gemm()
    with pytest.raises(ValueError, match="engine"):
        cpu_isa.set_cpu_gemm("blas")
    with cpu_isa.use_cpu_gemm("aten"):
        assert cpu_isa.cpu_gemm() == "aten"
    assert cpu_isa.cpu_gemm() == before


@pytest.mark.parametrize("engine", cpu_isa.CPU_GEMMS)
def test_one_step_calls_copy_no_weight(engine):
    """A decoder cell's step (one row, one step) reads the weights in place: a transposed copy
    per call (W_ih^T for grad_x, W_hh^T for the recurrent gradient) made it 5x slower."""
    if engine not in cpu_isa.supported_cpu_gemms():
        pytest.skip(f"this torch has no {engine} products")
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(512, 1024, zoneout_cell=0.1, zoneout_hidden=0.1, backend="cpu")
    x = torch.randn(1, 512, requires_grad=True)
    weight_shapes = {(4096, 512), (4096, 1024), (512, 4096), (1024, 4096)}
    with cpu_isa.use_cpu_gemm(engine), torch.profiler.profile(record_shapes=True) as profile:
        h, c = cell(x)
        (h.sum() + c.sum()).backward()
    copies = [(e.name, e.input_shapes) for e in profile.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
              and any(tuple(shape) in weight_shapes for shape in e.input_shapes)]
    assert not copies, copies


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind, inputs, hidden", [
    ("lstm", 24, 40),      # outer products of kB: the BLAS forms them
    ("lstm", 512, 1024),   # 8 and 16 MB: streamed (csrc/cpu/gemm.cpp, kStreamedOuterBytes)
    ("gru", 512, 1024),    # 6 MB from the BLAS, 12 MB streamed
    ("rnn_tanh", 1024, 2048),
])
def test_one_row_weight_gradients_are_exact_outer_products(kind, inputs, hidden, threads):
    """A cell step at B=1 sums its weight gradients over one row: grad W_ih = outer(d_in, x) and
    grad W_hh = outer(d_rec, h), where d_in and d_rec are also the biases' gradients. Each entry is
    one rounded product, so whichever path forms them must give exactly torch.outer's bits."""
    make = {"lstm": zf.ZoneoutLSTMCell, "gru": zf.ZoneoutGRUCell, "rnn_tanh": zf.ZoneoutRNNCell}[kind]
    torch.manual_seed(0)
    cell = make(inputs, hidden, zoneout_hidden=0.1, backend="cpu")
    x, h = torch.randn(1, inputs), torch.randn(1, hidden)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with torch.profiler.profile(record_shapes=True) as profile:
            if kind == "lstm":
                h_next, c_next = cell(x, (h, torch.randn(1, hidden)))
                (h_next.sum() + 2 * c_next.sum()).backward()
            else:
                cell(x, h).sum().backward()
    finally:
        torch.set_num_threads(before)
    # The BLAS formed exactly the outer products below the streaming size ([rows, 1] x [1, width]).
    rows = cell.weight_ih.shape[0]
    blas_outer = {(tuple(e.input_shapes[0]), tuple(e.input_shapes[1])) for e in profile.events()
                  if e.name == "aten::mm" and len(e.input_shapes) >= 2 and list(e.input_shapes[0]) == [rows, 1]}
    expected = {((rows, 1), (1, width)) for width in (inputs, hidden) if rows * width * 4 < 8 << 20}
    assert blas_outer == expected
    assert torch.equal(cell.weight_ih.grad, torch.outer(cell.bias_ih.grad, x[0]))
    assert torch.equal(cell.weight_hh.grad, torch.outer(cell.bias_hh.grad, h[0]))
    assert cell.bias_ih.grad.abs().sum() > 0  # a gradient that flowed, not zeros equal by default


# --------------------------------------------------------------------------------------
# The fused time loop of float32 sequences (csrc/cpu/lstm_cpu.cpp): its own tile products, one
# parallel region; the agreement tests above run it through `loop`.
# --------------------------------------------------------------------------------------
def _fused_loop_runs():
    return cpu_isa.cpu_isa() != "scalar"  # its tile kernels exist for avx2 and avx512


@pytest.mark.parametrize("loop, hidden, fused", [("steps", 128, False), ("fused", 128, True), ("auto", 128, True),
                                                  ("fused", 520, True), ("auto", 520, False)])
def test_which_forward_loop_runs(loop, hidden, fused):
    """With oneDNN's products active, the per-step loop forms the input projection and each step's
    recurrent product through oneDNN; the fused one forms them all itself. "auto" runs the fused
    forward up to H = 512 only."""
    if "onednn" not in cpu_isa.supported_cpu_gemms() or not _fused_loop_runs():
        pytest.skip("needs oneDNN products and the avx2 or avx512 kernels")
    steps = 4
    x, h0, c0, w_ih, w_hh, bias = make_inputs(steps, 64, 192, hidden, torch.float32)  # products >= 4M multiply-adds
    with cpu_isa.use_cpu_gemm("onednn"), cpu_isa.use_cpu_loop(loop), torch.profiler.profile() as profile:
        FORWARD(x, h0, c0, w_ih, w_hh, bias, None, torch.tensor(SEED), 0, 0, 0.5, 0.05, 0.0, 0, True)
    products = sum(event.name == "mkldnn::_linear_pointwise" for event in profile.events())
    assert products == (0 if fused else 1 + steps)  # the projection, then one per step (h0 W_hh^T too)


def test_auto_loop_above_the_forward_limit_matches_reference():
    """Above H = 512 "auto" pairs the per-step forward with the fused backward."""
    tensors = make_inputs(3, 2, 3, 520, torch.float32)
    with cpu_isa.use_cpu_loop("auto"):
        assert_same_as_reference(tensors, torch.float32, direction=1, zoneout_cell=0.5, zoneout_hidden=0.05)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("shape, lengths", [((9, 20, 6, 100), None), ((6, 5, 3, 37), [6, 2, 5, 1, 4])], ids=str)
def test_fused_loop_is_independent_of_the_layout(shape, lengths, direction):
    """Each output of a tile product is one FMA chain over the depth, whichever thread forms it: one
    and two threads, a step shared by units or by example rows, give the same bits (H = 100: a
    partial tile and a partial backward panel; the bias gradient's step sums, which a split by rows
    forms after the loop; H = 37 with lengths: rows that stop early)."""
    if not _fused_loop_runs():
        pytest.skip("the fused loop needs the avx2 or avx512 kernels")
    tensors = make_inputs(*shape, torch.float32)
    lengths = None if lengths is None else torch.tensor(lengths)
    results = run_with_loop_layouts(lambda: _flat(run(cpu_layer, tensors, lengths=lengths, direction=direction,
                                                      zoneout_cell=0.5, zoneout_hidden=0.05,
                                                      recurrent_dropout=0.1)))
    assert_same_bits(RESULT_NAMES, results)


def _assert_each_choice_gives_the_same_bits(shape, use_setting, choices, checked):
    """The fused loop's results under each of a setting's choices (use_setting(choice) a context) are the same
    bits, and those of `checked` (a choice "auto" may not take on this CPU) match the reference."""
    tensors = make_inputs(*shape, torch.float32)
    results = {}
    for choice in choices:
        with cpu_isa.use_cpu_loop("fused"), use_setting(choice):
            results[choice] = _flat(run(cpu_layer, tensors, zoneout_cell=0.5, zoneout_hidden=0.05,
                                        recurrent_dropout=0.1))
    assert_same_bits(RESULT_NAMES, results)
    with cpu_isa.use_cpu_loop("fused"), use_setting(checked):
        assert_same_as_reference(tensors, torch.float32, zoneout_cell=0.5, zoneout_hidden=0.05)


@pytest.mark.parametrize("isa", ("avx2", "avx512"), indirect=True)  # the tile kernels' instruction sets
@pytest.mark.parametrize("shape", [(6, 13, 5, 100), (3, 13, 5, 520)], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_forward_panels_whole_or_half_give_the_same_bits(shape, isa):
    """The fused forward forms a tile's products over all its gate vectors at once, or over half of them
    at a time in twice the example rows (cpu_panels: "auto" takes halves for large panels, on some CPUs
    only): each output is the same FMA chain either way. H = 100: a padded last tile; H = 520: past
    AVX-512's 128 KB panels; B = 13: a short last row block in both."""
    _assert_each_choice_gives_the_same_bits(shape, cpu_isa.use_cpu_panels, cpu_isa.CPU_PANELS, checked="half")


@pytest.mark.parametrize("isa", ("avx2", "avx512"), indirect=True)  # the tile kernels' instruction sets
@pytest.mark.parametrize("shape", [(5, 13, 70, 100), (3, 6, 512, 36), (3, 5, 530, 20)],
                         ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_forward_input_part_in_loop_or_first_gives_the_same_bits(shape, isa):
    """The fused LSTM forward forms each step's input part in its time loop, in the same chains as the
    recurrent part, or as one projection of all steps first, whose stored sums those chains then continue
    (cpu_input: "auto" takes the projection for wide inputs, on some CPUs only): the same FMA chains either
    way. I = 512: the widest input the projection takes; I = 530: wider, so it stays in the loop."""
    _assert_each_choice_gives_the_same_bits(shape, cpu_isa.use_cpu_input, cpu_isa.CPU_INPUTS, checked="first")


# The named settings of the fused loop (csrc/cpu/setting.h, NamedSetting): (name, its choices, an
# invalid one, its environment variable).
NAMED_SETTINGS = [("loop", cpu_isa.CPU_LOOPS, "unrolled", "ZONEOUT_FUSED_CPU_LOOP"),
                  ("split", cpu_isa.CPU_SPLITS, "columns", "ZONEOUT_FUSED_CPU_SPLIT"),
                  ("panels", cpu_isa.CPU_PANELS, "quarter", "ZONEOUT_FUSED_CPU_PANELS"),
                  ("input", cpu_isa.CPU_INPUTS, "last", "ZONEOUT_FUSED_CPU_INPUT"),
                  ("order", cpu_isa.CPU_ORDERS, "reversed", "ZONEOUT_FUSED_CPU_ORDER")]


@pytest.mark.parametrize("name, choices, invalid, variable", NAMED_SETTINGS, ids=[s[0] for s in NAMED_SETTINGS])
def test_named_setting_is_checked_and_restored(name, choices, invalid, variable):
    get, set_, use = (getattr(cpu_isa, f"{verb}cpu_{name}") for verb in ("", "set_", "use_"))
    before = get()
    assert before == "auto"  # the default
    with pytest.raises(ValueError, match=name):
        set_(invalid)
    with pytest.raises(RuntimeError, match=f"{name} must be one of 0 \\({choices[0]}\\)"):
        getattr(torch.ops.zoneout_fused, f"_set_cpu_{name}")(len(choices))  # past the extension's own check
    for choice in choices:
        with use(choice):
            assert get() == choice
        assert get() == before


@pytest.mark.parametrize("name, choices, invalid, variable", NAMED_SETTINGS, ids=[s[0] for s in NAMED_SETTINGS])
def test_named_setting_from_the_environment(name, choices, invalid, variable):
    code = f"from zoneout_fused import cpu_isa; print(cpu_isa.cpu_{name}())"
    _assert_setting_from_environment(code, variable, {**{choice: choice for choice in choices}, "": "auto"}, invalid,
                                     f"{variable} must be one of {', '.join(choices)}")


@pytest.mark.parametrize("name, choices, invalid, variable", NAMED_SETTINGS, ids=[s[0] for s in NAMED_SETTINGS])
def test_invalid_setting_fails_a_layer_call_with_an_exception(name, choices, invalid, variable):
    """A layer's first read of a setting from the environment may come deep in the kernels: an
    invalid value raises there as a Python RuntimeError naming the variable, never from inside a
    parallel region, where it would abort the process (as the panels setting once did)."""
    if name != "loop" and not _fused_loop_runs():
        pytest.skip("only the fused loop reads it, and it needs the avx2 or avx512 kernels")
    code = ("import torch, zoneout_fused as zf\n"
            "m = zf.ZoneoutLSTM(2, 3, backend='cpu'); x = torch.randn(4, 2, 2, requires_grad=True)\n"
            "try:\n"
            "    m(x)[0].sum().backward()\n"
            "except RuntimeError as error:\n"
            "    print('raised', str(error).splitlines()[0])\n")
    result = _python_with_environment(code, variable, invalid)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"raised {variable} must be one of {', '.join(choices)}"), result.stdout


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_backward_results_do_not_share_the_reused_buffer(cell):
    """Backward keeps its pre-activation gradients in a per-thread buffer reused across calls:
    no result it returns may be a view of it, or the next call would overwrite it."""
    steps, batch, inputs, hidden = 5, 3, 4, 20
    g = torch.Generator().manual_seed(11)
    x, h0, c0 = (torch.randn(steps, batch, inputs, generator=g), torch.randn(batch, hidden, generator=g),
                 torch.randn(batch, hidden, generator=g))
    rows = (4 if cell == "lstm" else 3) * hidden
    w_ih, w_hh, b = (torch.randn(rows, inputs, generator=g) * 0.3, torch.randn(rows, hidden, generator=g) * 0.3,
                     torch.randn(rows, generator=g) * 0.1)
    seed = torch.tensor(SEED)
    if cell == "lstm":
        y, c_n, c_seq, gates = FORWARD(x, h0, c0, w_ih, w_hh, b, None, seed, 0, 0, 0.3, 0.1, 0.0, 0, True)

        def backward(grad_y):
            return BACKWARD(grad_y, torch.zeros_like(c_n), x, h0, c0, w_ih, w_hh, b, None, seed, 0, 0, 0.3, 0.1, 0.0,
                            0, True, y, c_seq, gates)
    else:
        gru_forward = torch.ops.zoneout_fused.cpu_gru_rnn_layer_forward.default
        gru_backward = torch.ops.zoneout_fused.cpu_gru_rnn_layer_backward.default
        y, gates = gru_forward(x, h0, w_ih, w_hh, b, b, None, seed, 1, 0, 0, 0.1, 0.0, 0, True)

        def backward(grad_y):
            return gru_backward(grad_y, x, h0, w_ih, w_hh, b, b, None, seed, 1, 0, 0, 0.1, 0.0, 0, True, y, gates)
    first = backward(torch.randn(y.shape, generator=g))
    kept = [t.clone() for t in first]
    second = backward(torch.randn(y.shape, generator=g))
    assert all(torch.equal(a, b) for a, b in zip(first, kept))  # unchanged by the second call
    assert not any(torch.equal(a, b) for a, b in zip(first, second))


# --------------------------------------------------------------------------------------
# The C++ autograd kernel of the cpu ops (csrc/layer_autograd.h).
# --------------------------------------------------------------------------------------
GRU_RNN_OPS = {"lstm": (cpu_layer, reference.lstm_layer),
               "gru": (ops.BACKENDS["cpu"].gru_rnn_layer, reference.gru_rnn_layer)}


def _layer_args(cell, bias=True, bias_hh_only=False):
    """(tensors, scalars) of a small float64 training call of the LSTM or GRU layer op, lengths given."""
    g = torch.Generator().manual_seed(5)
    rows = (4 if cell == "lstm" else 3) * 3

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x, h0, c0 = randn(4, 2, 2), randn(2, 3), randn(2, 3)
    w_ih, w_hh = randn(rows, 2, scale=0.4), randn(rows, 3, scale=0.4)
    b1, b2 = randn(rows, scale=0.2), randn(rows, scale=0.2)
    lengths, seed = torch.tensor([4, 2]), torch.tensor(SEED)
    if cell == "lstm":
        return [x, h0, c0, w_ih, w_hh, b1 if bias else None], (lengths, seed, 0, 1, 0.4, 0.3, 0.2, 0, True)
    biases = [None if bias_hh_only or not bias else b1, b2 if bias else None]
    return [x, h0, w_ih, w_hh, *biases], (lengths, seed, 1, 0, 1, 0.3, 0.2, 0, True)


def _outputs(cell, layer_fn, tensors, scalars):
    result = layer_fn(*tensors, *scalars)
    return list(result) if cell == "lstm" else [result]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_autograd_is_recorded_in_cpp(cell, monkeypatch):
    """The node is the C++ one; a plain backward calls the fused backward op, create_graph=True the
    reference's differentiable backward (through the Python callable the extension holds)."""
    layer_fn, _ = GRU_RNN_OPS[cell]
    tensors, scalars = _layer_args(cell)
    leaves = [t.clone().requires_grad_() for t in tensors]
    outputs = _outputs(cell, layer_fn, leaves, scalars)
    assert all("zoneout_autograd::LayerOp" in output.grad_fn.name() for output in outputs)
    calls = []
    original = ops.differentiable_layer_backward
    monkeypatch.setattr(ops, "differentiable_layer_backward", lambda *args: calls.append(1) or original(*args))
    with torch.profiler.profile() as profile:
        torch.autograd.grad(outputs[0].sum(), leaves[0], retain_graph=True)
    backward_name = f"zoneout_fused::cpu_{'layer' if cell == 'lstm' else 'gru_rnn_layer'}_backward"
    assert sum(event.name == backward_name for event in profile.events()) == 1 and not calls
    (grad_x,) = torch.autograd.grad(outputs[0].sum(), leaves[0], create_graph=True)
    assert calls == [1] and grad_x.requires_grad


@pytest.mark.parametrize("output", [0, 1], ids=["y alone", "c_n alone"])
def test_gradient_of_one_output(output):
    """An output no loss reaches gets no gradient tensor (materialize_grads off): the kernel fills
    in zeros; the gradients equal the reference's."""
    tensors, scalars = _layer_args("lstm")
    grads = {}
    for name, layer_fn in (("cpu", cpu_layer), ("reference", reference.lstm_layer)):
        leaves = [t.clone().requires_grad_() for t in tensors]
        (layer_fn(*leaves, *scalars)[output] ** 2).sum().backward()
        grads[name] = [leaf.grad for leaf in leaves]
    for actual, expected in zip(grads["cpu"], grads["reference"]):
        assert_close(actual, expected)


@pytest.mark.parametrize("cell, bias, bias_hh_only", [("lstm", False, False), ("gru", True, True),
                                                       ("gru", False, False)])
def test_double_backward_with_absent_inputs(cell, bias, bias_hh_only):
    """create_graph=True with a bias absent: the kernel maps each given input to its gradient (an
    absent one has no autograd edge), and only inputs that require grad get one."""
    tensors, scalars = _layer_args(cell, bias, bias_hh_only)
    results = {}
    for name, layer_fn in zip(("cpu", "reference"), GRU_RNN_OPS[cell]):
        leaves = [t.clone().requires_grad_(k != 1) if t is not None else None for k, t in enumerate(tensors)]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        first = torch.autograd.grad(_outputs(cell, layer_fn, leaves, scalars)[0].pow(2).sum(), wanted,
                                    create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), wanted)
        results[name] = [*first, *second]
    assert len(results["cpu"]) == len(results["reference"])
    for actual, expected in zip(results["cpu"], results["reference"]):
        assert_close(actual.detach(), expected.detach())


# --------------------------------------------------------------------------------------
# The pool of forward outputs (csrc/cpu/lstm_cpu.cpp, pooled_empty).
# --------------------------------------------------------------------------------------
POOLED_BYTES = torch.ops.zoneout_fused._cpu_pooled_bytes.default
GRU_FORWARD = torch.ops.zoneout_fused.cpu_gru_rnn_layer_forward.default


def _pooled_forward(cell, seed):
    """A fused forward whose outputs are large enough to be pooled (y: 320 KB), lengths given."""
    g = torch.Generator().manual_seed(3)
    steps, batch, inputs, hidden = 40, 32, 8, 64
    rows = (4 if cell == "lstm" else 3) * hidden
    x, h0, c0 = (torch.randn(steps, batch, inputs, generator=g), torch.randn(batch, hidden, generator=g),
                 torch.randn(batch, hidden, generator=g))
    w_ih, w_hh, b = (torch.randn(rows, inputs, generator=g) * 0.3, torch.randn(rows, hidden, generator=g) * 0.2,
                     torch.randn(rows, generator=g) * 0.1)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    if cell == "lstm":
        return FORWARD(x, h0, c0, w_ih, w_hh, b, lengths, torch.tensor(seed), 0, 1, 0.3, 0.1, 0.1, 0, True)
    return GRU_FORWARD(x, h0, w_ih, w_hh, b, b, lengths, torch.tensor(seed), 1, 0, 1, 0.1, 0.1, 0, True)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_forward_outputs_reuse_freed_buffers(cell):
    """Freed outputs' buffers serve the next call; live outputs never share one; and nothing a
    reused buffer held shows in the new results (the freed ones are filled with NaN first)."""
    if not _fused_loop_runs():
        pytest.skip("the pooled outputs are the fused loop's")
    expected = [t.clone() for t in _pooled_forward(cell, SEED + 1)]
    first = _pooled_forward(cell, SEED)
    second = _pooled_forward(cell, SEED)
    first_buffers = {t.data_ptr() for t in first}
    assert first_buffers.isdisjoint(t.data_ptr() for t in second)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for t in first:
        t.fill_(float("nan"))
    before = POOLED_BYTES()
    del first
    assert POOLED_BYTES() > before
    third = _pooled_forward(cell, SEED + 1)
    assert {t.data_ptr() for t in third} & first_buffers  # reused
    for name, actual, wanted in zip(("y", "c_n", "c_seq", "gates") if cell == "lstm" else ("y", "gates"), third,
                                    expected):
        assert torch.equal(actual, wanted), name


def test_pool_keeps_at_most_64_mb():
    """Freed outputs beyond the pool's 64 MB go back to the system."""
    if not _fused_loop_runs():
        pytest.skip("the pooled outputs are the fused loop's")
    x, h0, c0, w_ih, w_hh, bias = make_inputs(100, 64, 8, 512, torch.float32)  # gates 52 MB, y and c_seq 13 MB
    outputs = FORWARD(x, h0, c0, w_ih, w_hh, bias, None, torch.tensor(SEED), 0, 0, 0.3, 0.1, 0.0, 0, True)
    del outputs
    assert 0 < POOLED_BYTES() <= 64 << 20


def test_empty_cache_frees_the_pool():
    if not _fused_loop_runs():
        pytest.skip("the pooled outputs are the fused loop's")
    outputs = _pooled_forward("lstm", SEED)
    del outputs
    assert POOLED_BYTES() > 0
    cpu_isa.empty_cache()
    assert POOLED_BYTES() == 0
    again = _pooled_forward("lstm", SEED)  # the kernels run on after it (fresh buffers)
    assert all(torch.isfinite(t).all() for t in again)


def test_pooled_outputs_save_load_and_copy(tmp_path):
    """The pool's tensors (from_blob storage) work where torch's own do: save/load, deepcopy, numpy."""
    import copy

    outputs = _pooled_forward("lstm", SEED)
    torch.save(list(outputs), tmp_path / "outputs.pt")
    for saved, loaded in zip(outputs, torch.load(tmp_path / "outputs.pt")):
        assert torch.equal(saved, loaded)
    y = outputs[0]
    assert torch.equal(copy.deepcopy(y), y)
    assert y.numpy().ctypes.data == y.data_ptr()


def _last_folded_word_below(z32: torch.Tensor) -> int:
    """The largest folded word x in [0, 2^31) with the oracle's uint32_to_uniform(x) < z32, -1 if
    none: a bisection on the oracle itself (its uniform never decreases in x)."""
    below = lambda x: bool(masks.uint32_to_uniform(torch.tensor([x]))[0] < z32)  # noqa: E731
    if not below(0):
        return -1
    lo, hi = 0, 2**31
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if below(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("z", [0.0, 1e-9, 0.05, 0.1, 0.15, 0.3, 0.4, 0.5, 0.9, 0.999999, 1.0, 1.5])
def test_mask_words_keep_exactly_below_z(isa, z):
    """The CPU mask rows keep a unit where its folded Philox word is at most a bound found once per
    call, instead of forming each uniform (lstm_cpu.cpp, folded_word_at_most; select_by_word on
    vectors). At the edge of the oracle's uniform < z, both words of each side (top bit clear, and
    set: the same folded value) must come out as the oracle says: an off-by-one in the bound or the
    compare, or a wrong fold, flips masks too rarely for the random-mask tests to see."""
    if isa not in cpu_isa.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    z32 = torch.tensor(z, dtype=torch.float32)
    edge = _last_folded_word_below(z32)
    folded = [x for x in (edge - 1, edge, edge + 1, edge + 2, 0, 1, 2**31 - 1) if 0 <= x < 2**31]
    words = torch.tensor(folded + [2**32 - 1 - x for x in folded], dtype=torch.int64)  # x and ~x
    g = torch.Generator().manual_seed(0)
    words = torch.cat([words, torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64)])
    words = torch.cat([words, words[: (-words.numel()) % 16]])  # a whole number of vectors
    got = torch.ops.zoneout_fused._cpu_keep_by_word(words, z, cpu_isa.CPU_ISAS.index(isa))
    expected = (masks.uint32_to_uniform(words) < z32).float()
    assert torch.equal(got, expected), words[got != expected].tolist()
    if 0.0 < z < 1.0:  # both sides of the edge are among the words
        assert expected.min() == 0.0 and expected.max() == 1.0
