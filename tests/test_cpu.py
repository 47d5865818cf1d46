"""The fused C++ CPU backend (zoneout_fused::cpu_layer_*) against the reference oracle.

Training-mode comparisons use the same seed on both sides: both regenerate the contract's
Philox masks, so outputs and every gradient must agree element for element, with tolerances
far too tight to hide one flipped mask bit.
"""
import math

import pytest
import torch
from torch import nn

import zoneout_fused as zf
from zoneout_fused import ops, reference
from conftest import assert_close

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


def assert_same_as_reference(tensors, dtype, **kwargs):
    y, c_n, grads = run(cpu_layer, tensors, **kwargs)
    y_ref, c_ref, grads_ref = run(reference.lstm_layer, tensors, **kwargs)
    assert_close(y, y_ref, dtype, msg="y")
    assert_close(c_n, c_ref, dtype, msg="c_n")
    for name, grad, grad_ref in zip(("x", "h0", "c0", "w_ih", "w_hh", "bias"), grads, grads_ref):
        if grad_ref is None:
            assert grad is None
            continue
        assert_close(grad, grad_ref, dtype, msg=f"grad of {name}")


# --------------------------------------------------------------------------------------
# Agreement with the reference.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mask_mode", MODES)
def test_matches_reference(mask_mode, direction, training, dtype):
    tensors = make_inputs(7, 3, 5, 37, dtype)  # odd T, H not a multiple of 32
    assert_same_as_reference(tensors, dtype, layer=1, direction=direction, zoneout_cell=0.35, zoneout_hidden=0.2,
                             mask_mode=mask_mode, training=training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask_mode", MODES)
def test_recurrent_dropout_matches_reference(mask_mode, training, dtype):
    tensors = make_inputs(6, 4, 3, 10, dtype)
    assert_same_as_reference(tensors, dtype, direction=1, zoneout_cell=0.25, zoneout_hidden=0.4,
                             recurrent_dropout=0.3, mask_mode=mask_mode, training=training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mask_mode", [0, 2, 3])
def test_lengths_match_reference(mask_mode, direction, dtype):
    tensors = make_inputs(7, 5, 4, 9, dtype)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    assert_same_as_reference(tensors, dtype, lengths=lengths, direction=direction, zoneout_cell=0.3,
                             zoneout_hidden=0.3, recurrent_dropout=0.1, mask_mode=mask_mode, training=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    (1, 1, 4, 6),     # T = 1, B = 1
    (1, 3, 2, 5),     # T = 1
    (63, 2, 3, 70),   # long odd T; H spans two mask chunks
    (5, 20, 3, 70),   # B*H above the parallel grain: several threads share a step
    (4, 1, 1, 1),     # H = 1, I = 1
], ids=lambda s: "T{}-B{}-I{}-H{}".format(*s))
def test_shapes_match_reference(shape, dtype):
    tensors = make_inputs(*shape, dtype=dtype)
    assert_same_as_reference(tensors, dtype, direction=0, zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode=0)
    assert_same_as_reference(tensors, dtype, direction=1, zoneout_cell=0.2, zoneout_hidden=0.3, mask_mode=1,
                             layer=2)


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
    y, c_n, grads = run(cpu_layer, strided, **kwargs)
    y_ref, c_ref, grads_ref = run(reference.lstm_layer, [x, h0, c0, w_ih, w_hh, bias], **kwargs)
    assert_close(y, y_ref, dtype)
    assert_close(c_n, c_ref, dtype)
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, dtype)
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


@pytest.mark.parametrize("path", [-1, 0, 1, 2])
def test_philox_words_match_header(path):
    """The CPU mask loop's vectorized Philox (AVX-512 / AVX2 specialisations of the header's
    philox4x32_10) is bit-identical to the header and to the Python oracle, including runs
    whose low counter word carries into the high word and chunk tails."""
    from zoneout_fused import _C  # noqa: F401  (registers the hook)
    from zoneout_fused import masks

    op = torch.ops.zoneout_fused._philox_words_cpu

    def as_int64(v):  # the schema's int is int64; the hook reinterprets it as uint64
        return v - 2**64 if v >= 2**63 else v

    checked = 0
    for seed in (0, 1, 0x123456789, 2**64 - 1, 0xDEADBEEFCAFEBABE):
        for first in (0, 5, 2**32 - 70, 2**33 + 3, 2**64 - 40):
            for c2, c3 in ((0, 0), (3, 0), (1, 2), (2**32 - 1, 2**32 - 1)):
                for n in (1, 15, 17, 64, 1000):
                    words = op(as_int64(seed), as_int64(first), c2, c3, n, path)
                    if words.numel() == 0:
                        pytest.skip(f"path {path} unavailable on this CPU")
                    assert torch.equal(words[0], words[1]), (seed, first, c2, c3, n)
                    checked += 1
    assert checked == 500
    words = op(42, 7, 1, 0, 777, path)
    counters = torch.arange(777, dtype=torch.int64) + 7
    expected = torch.stack(masks.philox4x32_10(42, counters, 0, 1, 0)[:3])
    assert torch.equal(words[0], expected)
