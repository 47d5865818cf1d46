"""ZoneoutGRU / ZoneoutRNN and their cells (contract sec. 4): drop-in equality with torch's modules at
zoneout 0, the fused CPU backend against the reference element for element, the zoneout semantics
(evaluation is the expectation, z = 1 freezes h, empirical rates), and bad input.

The Triton and CUDA kernels have their own files (test_triton_gru_rnn.py, test_cuda_gru_rnn.py);
every fused backend available here also runs through the modules below.
"""
import math
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import zoneout_fused as zf
from zoneout_fused import masks, ops, reference
from conftest import (assert_close, assert_same_bits, isa_param, loop_param, reference_mismatch,
                      run_with_loop_layouts)

REQUIRED = {name for name in os.environ.get("ZONEOUT_FUSED_REQUIRE_BACKENDS", "").split(",") if name}
CELLS = {"gru": 1, "rnn_tanh": 2, "rnn_relu": 3}
MODES = (0, 2, 3)  # independent, timestep, static ("shared" is rejected for these cells)
SEED = 0x5EED_1234_ABCD  # above 2**32: both key words matter
RESULT_NAMES = ("y",) + tuple(f"grad of {name}" for name in ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"))


def _backend_or_skip(name, device="cpu"):
    reason = ops.BACKENDS[name].unavailable_reason(torch.device(device))
    if reason is None and name != "reference":
        reason = ops._gru_rnn_unavailable(ops.BACKENDS[name], torch.device(device))
    if reason is not None:
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required here but unavailable: {reason}")
        pytest.skip(reason)


def make_inputs(cell, steps, batch, inputs, hidden, dtype=torch.float64, bias=True, generator_seed=0):
    """x, h0, w_ih, w_hh, b_ih, b_hh with magnitudes that keep the gates off saturation."""
    rows = (3 if cell == "gru" else 1) * hidden
    g = torch.Generator().manual_seed(generator_seed)
    scale = 1.0 / math.sqrt(hidden)

    def rand(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1).mul(s).to(dtype)

    return [rand(steps, batch, inputs), rand(batch, hidden, s=0.5), rand(rows, inputs, s=2 * scale),
            rand(rows, hidden, s=2 * scale), rand(rows, s=scale) if bias else None,
            rand(rows, s=scale) if bias else None]


def run(layer_fn, cell, tensors, lengths=None, seed=SEED, layer=0, direction=0, zoneout_hidden=0.0,
        recurrent_dropout=0.0, mask_mode=0, training=True):
    """Forward + backward of a weighted sum of y; returns [y, grads of the six tensors]."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = layer_fn(*leaves, lengths, torch.tensor(seed, dtype=torch.int64), CELLS[cell], layer, direction,
                 zoneout_hidden, recurrent_dropout, mask_mode, training)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    (y * weight).sum().backward()
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_backend_matches_reference(backend, cell, tensors, **kwargs):
    """conftest.reference_mismatch of the backend's run against the reference's."""
    actual = run(ops.BACKENDS[backend].gru_rnn_layer, cell, tensors, **kwargs)
    error = reference_mismatch(actual, lambda ts: run(reference.gru_rnn_layer, cell, ts, **kwargs), tensors,
                               RESULT_NAMES)
    assert error is None, error


# ------------------------------------------------------------------ the CPU kernels vs the reference
@isa_param
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mask_mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
@loop_param
def test_cpu_matches_reference(cell, mask_mode, direction, training, dtype, isa, loop):
    _backend_or_skip("cpu")
    tensors = make_inputs(cell, 5, 3, 4, 270, dtype)  # H = 270: a 256-unit mask chunk and a ragged tail
    assert_backend_matches_reference("cpu", cell, tensors, zoneout_hidden=0.3, mask_mode=mask_mode,
                                     direction=direction, training=training, layer=1)


@isa_param
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("mask_mode", MODES)
@loop_param
def test_cpu_gru_recurrent_dropout_matches_reference(mask_mode, dtype, isa, loop):
    _backend_or_skip("cpu")
    tensors = make_inputs("gru", 4, 3, 5, 20, dtype)
    assert_backend_matches_reference("cpu", "gru", tensors, zoneout_hidden=0.2, recurrent_dropout=0.4,
                                     mask_mode=mask_mode)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_lengths_match_reference(cell, direction):
    _backend_or_skip("cpu")
    tensors = make_inputs(cell, 6, 4, 3, 9)
    assert_backend_matches_reference("cpu", cell, tensors, lengths=torch.tensor([6, 2, 0, 5]),
                                     zoneout_hidden=0.3, recurrent_dropout=0.2 if cell == "gru" else 0.0,
                                     direction=direction)


@loop_param
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_float32_lengths_and_no_bias_match_reference(cell, direction, loop):
    """The time loops of float32 sequences (the fused one forms the GRU's recurrent part from b_hh,
    or zero without biases) with ended sequences copied through; B = 14, H = 40: several row
    blocks and a partial tile."""
    _backend_or_skip("cpu")
    for bias in (True, False):
        tensors = make_inputs(cell, 6, 14, 3, 40, torch.float32, bias=bias)
        lengths = torch.tensor([6, 2, 1, 5, 6, 3, 4, 6, 1, 2, 5, 6, 3, 4])
        assert_backend_matches_reference("cpu", cell, tensors, lengths=lengths, zoneout_hidden=0.3,
                                         recurrent_dropout=0.2 if cell == "gru" else 0.0, direction=direction)


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_fused_loop_is_independent_of_the_layout(cell):
    """Every output of the fused loop's products is one FMA chain, whichever thread forms it: one and
    two threads, a step shared by units or by example rows (rows that stop early included)."""
    _backend_or_skip("cpu")
    from zoneout_fused import cpu_isa

    if cpu_isa.cpu_isa() == "scalar":
        pytest.skip("the fused loop needs the avx2 or avx512 kernels")
    tensors = make_inputs(cell, 7, 9, 5, 100, torch.float32)
    lengths = torch.tensor([7, 3, 7, 1, 5, 6, 2, 7, 4])
    for lens in (None, lengths):
        results = run_with_loop_layouts(lambda: run(ops.BACKENDS["cpu"].gru_rnn_layer, cell, tensors, lengths=lens,
                                                    zoneout_hidden=0.2))
        assert_same_bits(RESULT_NAMES, results)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 1, 2, 65), (2, 7, 1, 3)], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_awkward_shapes_and_no_bias(cell, shape):
    _backend_or_skip("cpu")
    for bias in (True, False):
        tensors = make_inputs(cell, *shape, bias=bias)
        assert_backend_matches_reference("cpu", cell, tensors, zoneout_hidden=0.5, mask_mode=0)


@pytest.mark.parametrize("mask_mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_cpu_gradcheck_training(cell, mask_mode):
    _backend_or_skip("cpu")
    tensors = [t.requires_grad_() for t in make_inputs(cell, 4, 3, 2, 3)]
    lengths, seed = torch.tensor([4, 2, 3]), torch.tensor(SEED)
    p = 0.3 if cell == "gru" else 0.0
    layer_fn = ops.BACKENDS["cpu"].gru_rnn_layer

    def fn(*ts):
        return layer_fn(*ts, lengths, seed, CELLS[cell], 0, 1, 0.4, p, mask_mode, True)

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_opcheck(cell):
    _backend_or_skip("cpu")
    forward = torch.ops.zoneout_fused.cpu_gru_rnn_layer_forward.default
    backward = torch.ops.zoneout_fused.cpu_gru_rnn_layer_backward.default
    x, h0, w_ih, w_hh, b_ih, b_hh = make_inputs(cell, 4, 3, 2, 5)
    lengths, seed = torch.tensor([4, 1, 3]), torch.tensor(SEED)
    scalars = (CELLS[cell], 0, 1, 0.3, 0.2 if cell == "gru" else 0.0, 0, True)
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
    torch.library.opcheck(forward, (*leaves, lengths, seed, *scalars))
    y, gates = forward(*leaves, lengths, seed, *scalars)
    torch.library.opcheck(backward, (torch.randn_like(y), *(t.detach() for t in leaves), lengths, seed, *scalars,
                                     y.detach(), gates.detach()))


@pytest.mark.parametrize("cell", CELLS)
def test_cpu_same_seed_same_bits(cell):
    _backend_or_skip("cpu")
    tensors = make_inputs(cell, 5, 3, 4, 6, torch.float32)
    layer_fn = ops.BACKENDS["cpu"].gru_rnn_layer
    args = (None, None, CELLS[cell], 0, 0, 0.5, 0.0, 0, True)
    first = layer_fn(*tensors, None, torch.tensor(7), *args[2:])
    again = layer_fn(*tensors, None, torch.tensor(7), *args[2:])
    other = layer_fn(*tensors, None, torch.tensor(8), *args[2:])
    assert torch.equal(first, again) and not torch.equal(first, other)


@pytest.mark.parametrize("case", ["cell", "shared", "dropout_rnn", "w_hh", "b_hh", "h0"])
def test_cpu_bad_arguments_name_the_problem(case):
    _backend_or_skip("cpu")
    cell = "rnn_tanh" if case == "dropout_rnn" else "gru"
    x, h0, w_ih, w_hh, b_ih, b_hh = make_inputs(cell, 2, 3, 2, 4)
    scalars = dict(cell=CELLS[cell], mode=0, p=0.0)
    match = {"cell": "cell must be", "shared": "shared", "dropout_rnn": "recurrent_dropout", "w_hh": "w_hh",
             "b_hh": "b_hh", "h0": "h0"}[case]
    if case == "cell":
        scalars["cell"] = 0
    elif case == "shared":
        scalars["mode"] = 1
    elif case == "dropout_rnn":
        scalars["p"] = 0.2
    elif case == "w_hh":
        w_hh = w_hh[:, :3]
    elif case == "b_hh":
        b_hh = b_hh[:5]
    else:
        h0 = h0.float()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.zoneout_fused.cpu_gru_rnn_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, None, torch.tensor(1),
                                                          scalars["cell"], 0, 0, 0.1, scalars["p"], scalars["mode"],
                                                          True)


# ------------------------------------------------------------------ drop-in: zoneout 0 is torch's module
BACKENDS_HERE = ["reference", "cpu", "triton"]


def _torch_and_zoneout(cell, backend, **kwargs):
    torch.manual_seed(0)
    if cell == "gru":
        module = nn.GRU(3, 5, **kwargs).double()
        return module, zf.ZoneoutGRU.from_gru(module, backend=backend)
    module = nn.RNN(3, 5, nonlinearity=cell[4:], **kwargs).double()
    return module, zf.ZoneoutRNN.from_rnn(module, backend=backend)


def _outputs_and_grads(module, x, h0):
    """Outputs, h_n and the gradients of the inputs and parameters (a packed input is taken as
    it is: its gradient reaches the leaf it was packed from)."""
    module.zero_grad()
    packed = isinstance(x, PackedSequence)
    if not packed:
        x = x.detach().clone().requires_grad_()
    h0 = h0.detach().clone().requires_grad_() if h0 is not None else None
    out, h_n = module(x, h0) if h0 is not None else module(x)
    data = out.data if packed else out
    weight = torch.linspace(-1, 1, data.numel(), dtype=data.dtype).view_as(data)
    ((data * weight).sum() + (h_n * h_n).sum()).backward()
    grads = ([] if packed else [x.grad]) + ([h0.grad] if h0 is not None else [])
    return [data, h_n] + grads + [p.grad.clone() for p in module.parameters()]


CONFIGS = {
    "plain": dict(kwargs={}, shape=(6, 4)),
    "2-layer-bidirectional-batch_first": dict(kwargs=dict(num_layers=2, bidirectional=True, batch_first=True),
                                              shape=(4, 6)),
    "unbatched": dict(kwargs=dict(num_layers=2), shape=(6,)),
    "no-bias": dict(kwargs=dict(bias=False, bidirectional=True), shape=(6, 4)),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_zero_zoneout_equals_torch_module(backend, cell, config):
    _backend_or_skip(backend)
    spec = CONFIGS[config]
    theirs, ours = _torch_and_zoneout(cell, backend, **spec["kwargs"])
    ours.zoneout_hidden = 0.0
    shape = spec["shape"]
    x = torch.randn(*shape, 3, dtype=torch.float64)
    layers = theirs.num_layers * (2 if theirs.bidirectional else 1)
    h0 = torch.randn(layers, *((shape[0] if theirs.batch_first else shape[1],) if len(shape) == 2 else ()), 5,
                     dtype=torch.float64)
    for state in (None, h0):
        expected = _outputs_and_grads(theirs, x, state)
        actual = _outputs_and_grads(ours, x, state)
        for a, e in zip(actual, expected):
            assert_close(a, e)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_zero_zoneout_equals_torch_module_packed(backend, cell):
    _backend_or_skip(backend)
    theirs, ours = _torch_and_zoneout(cell, backend, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([3, 5, 1]), enforce_sorted=False)
    expected = _outputs_and_grads(theirs, packed, None)
    actual = _outputs_and_grads(ours, packed, None)
    for a, e in zip(actual, expected):
        assert_close(a, e)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_zero_zoneout_cells_equal_torch_cells(backend, cell):
    _backend_or_skip(backend)
    torch.manual_seed(0)
    if cell == "gru":
        theirs = nn.GRUCell(3, 5).double()
        ours = zf.ZoneoutGRUCell(3, 5, dtype=torch.float64, backend=backend)
    else:
        theirs = nn.RNNCell(3, 5, nonlinearity=cell[4:]).double()
        ours = zf.ZoneoutRNNCell(3, 5, nonlinearity=cell[4:], dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs.state_dict())
    for batch_shape in ((4,), ()):
        x = torch.randn(*batch_shape, 3, dtype=torch.float64)
        h = torch.randn(*batch_shape, 5, dtype=torch.float64)
        results = []
        for module in (theirs, ours):
            module.zero_grad()
            xs, hs = x.clone().requires_grad_(), h.clone().requires_grad_()
            out = module(xs, hs)
            (out * out).sum().backward()
            results.append([out, xs.grad, hs.grad] + [p.grad for p in module.parameters()])
            assert module(x).shape == out.shape  # hx omitted: zeros
        for a, e in zip(*reversed(results)):
            assert_close(a, e)


def test_state_dicts_and_initialisation_are_torchs():
    for theirs, ours in ((nn.GRU(4, 5, num_layers=2, bidirectional=True),
                          zf.ZoneoutGRU(4, 5, num_layers=2, bidirectional=True, zoneout_hidden=0.1)),
                         (nn.RNN(4, 5, nonlinearity="relu"), zf.ZoneoutRNN(4, 5, nonlinearity="relu")),
                         (nn.GRUCell(4, 5), zf.ZoneoutGRUCell(4, 5)), (nn.RNNCell(4, 5), zf.ZoneoutRNNCell(4, 5))):
        assert list(theirs.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
    torch.manual_seed(3)
    a = nn.GRU(4, 5, num_layers=2)
    torch.manual_seed(3)
    b = zf.ZoneoutGRU(4, 5, num_layers=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_from_torch_copies_configuration():
    rnn = nn.RNN(3, 4, num_layers=2, nonlinearity="relu", batch_first=True, dropout=0.1, bidirectional=True).eval()
    model = zf.ZoneoutRNN.from_rnn(rnn, zoneout_hidden=0.2)
    assert (model.nonlinearity, model.num_layers, model.batch_first, model.dropout, model.bidirectional) == (
        "relu", 2, True, 0.1, True)
    assert not model.training and model.zoneout_hidden == 0.2
    with pytest.raises(TypeError, match="gru"):
        zf.ZoneoutGRU.from_gru(nn.LSTM(3, 4))
    with pytest.raises(TypeError, match="rnn"):
        zf.ZoneoutRNN.from_rnn(nn.GRU(3, 4))


# ------------------------------------------------------------------ zoneout semantics
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("cell", CELLS)
def test_evaluation_is_the_expectation(backend, cell):
    """One step in evaluation: h_1 = z h_0 + (1 - z) torch_cell(x, h_0)."""
    _backend_or_skip(backend)
    theirs, ours = _torch_and_zoneout(cell, backend)
    ours.zoneout_hidden = 0.3
    ours.eval()
    x, h0 = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    expected = 0.3 * h0 + 0.7 * theirs(x, h0)[1]
    assert_close(ours(x, h0)[1], expected)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("cell", CELLS)
def test_full_zoneout_freezes_h(backend, cell):
    _backend_or_skip(backend)
    _, ours = _torch_and_zoneout(cell, backend, bidirectional=True)
    ours.zoneout_hidden = 1.0
    x, h0 = torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    out, h_n = ours(x, h0)
    assert torch.equal(h_n, h0)
    assert torch.equal(out, torch.cat([h0[0].expand(4, 3, 5), h0[1].expand(4, 3, 5)], dim=2))


@pytest.mark.parametrize("mask_mode", ["independent", "timestep", "static"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_empirical_zoneout_rate(backend, mask_mode):
    """A unit keeps its previous h (bit for bit) at the rate z_h, and the masks are the LSTM's
    hidden masks for the same seed and position."""
    _backend_or_skip(backend)
    z, steps, batch, hidden = 0.3, 6, 64, 40
    x, h0, w_ih, w_hh, b_ih, b_hh = make_inputs("rnn_tanh", steps, batch, 3, hidden)
    code = masks.MASK_MODE_CODES[mask_mode]
    y = ops.BACKENDS[backend].gru_rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, None, torch.tensor(SEED), 2, 0, 0, z,
                                           0.0, code, True)
    previous = torch.cat([h0[None], y[:-1]])
    kept = y == previous
    _, m_h, _ = masks.sequence_masks(SEED, 0, 0, steps, batch, hidden, zoneout_cell=0.0, zoneout_hidden=z,
                                     mask_mode=mask_mode)
    assert torch.equal(kept, m_h)
    draws = {"independent": steps * batch * hidden, "timestep": steps * batch, "static": steps * hidden}[mask_mode]
    rate = kept.double().mean().item()
    assert abs(rate - z) < 5 * math.sqrt(z * (1 - z) / draws), rate


def test_gru_recurrent_dropout_rate_and_scale():
    """With dropout and no zoneout, h_1 = (1 - u) * d/(1-p) * n + u h_0 per unit: the dropped units
    are those whose h_1 equals u * h_0, at rate p."""
    p, batch, hidden = 0.25, 200, 50
    x, h0, w_ih, w_hh, b_ih, b_hh = make_inputs("gru", 1, batch, 3, hidden)
    y = reference.gru_rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, None, torch.tensor(SEED), 1, 0, 0, 0.0, p, 0, True)
    _, _, keep = masks.step_masks(SEED, 0, 0, 0, batch, hidden, zoneout_cell=0.0, zoneout_hidden=0.0,
                                  recurrent_dropout=p)
    theirs = nn.GRUCell(3, hidden).double()
    with torch.no_grad():
        for name, value in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
            getattr(theirs, name).copy_(value)
        u = torch.sigmoid(x[0] @ w_ih[hidden:2 * hidden].t() + b_ih[hidden:2 * hidden]
                          + h0 @ w_hh[hidden:2 * hidden].t() + b_hh[hidden:2 * hidden])
        plain = theirs(x[0], h0)
    n = (plain - u * h0) / (1 - u)
    expected = torch.where(keep, (1 - u) * n / (1 - p) + u * h0, u * h0)
    assert_close(y[0], expected.detach())
    rate = 1 - keep.double().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / keep.numel())


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("cell", CELLS)
def test_module_training_equals_reference_module(backend, cell):
    """Through the modules: same seed, the same masks on every backend (2 layers, bidirectional,
    packed, zoneout and recurrent dropout)."""
    _backend_or_skip(backend)
    _, ours = _torch_and_zoneout(cell, "reference", num_layers=2, bidirectional=True)
    ours.zoneout_hidden = 0.3
    if cell == "gru":
        ours.recurrent_dropout = 0.2
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False)
    results = []
    for name in ("reference", backend):
        ours.backend = name
        ours.zero_grad()
        torch.manual_seed(11)
        results.append(_outputs_and_grads(ours, packed, None))
    for a, e in zip(*reversed(results)):
        assert_close(a, e)


# ------------------------------------------------------------------ bad input
def test_bad_options_raise_naming_them():
    with pytest.raises(ValueError, match="shared"):
        zf.ZoneoutGRU(3, 4, mask_mode="shared")
    with pytest.raises(ValueError, match="shared"):
        zf.ZoneoutRNNCell(3, 4, mask_mode="shared")
    with pytest.raises(TypeError, match="recurrent_dropout"):
        zf.ZoneoutRNN(3, 4, recurrent_dropout=0.1)
    rnn = zf.ZoneoutRNN(3, 4)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        rnn.recurrent_dropout = 0.1
    with pytest.raises(ValueError, match="zoneout_cell"):
        zf.ZoneoutGRU(3, 4).zoneout_cell = 0.5
    with pytest.raises(ValueError, match="zoneout_hidden"):
        zf.ZoneoutGRU(3, 4, zoneout_hidden=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        zf.ZoneoutGRUCell(3, 4, recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="static"):
        zf.ZoneoutGRUCell(3, 4, mask_mode="static")
    with pytest.raises(ValueError, match="nonlinearity"):
        zf.ZoneoutRNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="mask_mode"):
        zf.ZoneoutGRU(3, 4, mask_mode="nope")


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_wrong_inputs_raise_what_torch_raises(kind):
    torch.manual_seed(0)
    theirs = nn.GRU(3, 4) if kind == "gru" else nn.RNN(3, 4)
    ours = zf.ZoneoutGRU(3, 4) if kind == "gru" else zf.ZoneoutRNN(3, 4)
    cases = [
        (torch.randn(5, 2, 7),),  # input_size
        (torch.randn(5, 2, 3), torch.randn(1, 2, 6)),  # hidden size
        (torch.randn(5, 2, 3), torch.randn(2, 4)),  # hx rank
        (torch.randn(5, 2, 3, 1),),  # input rank
        (torch.randn(5, 2, 3, dtype=torch.float64),),  # dtype
    ]
    for args in cases:
        with pytest.raises(Exception) as expected:
            theirs(*args)
        with pytest.raises(type(expected.value)):
            ours(*args)


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_cell_wrong_inputs_raise_what_torch_raises(kind):
    theirs = nn.GRUCell(3, 4) if kind == "gru" else nn.RNNCell(3, 4)
    ours = zf.ZoneoutGRUCell(3, 4) if kind == "gru" else zf.ZoneoutRNNCell(3, 4)
    cases = [
        ((torch.randn(2, 5),), "input_size"),
        ((torch.randn(2, 3), torch.randn(3, 4)), "batch size"),
        ((torch.randn(2, 3), torch.randn(2, 6)), "hidden_size"),
        ((torch.randn(2, 2, 3),), "1D or 2D"),
        ((torch.randn(2, 3), torch.randn(1, 2, 4)), "1D or 2D"),
    ]
    for args, match in cases:
        with pytest.raises(Exception) as expected:
            theirs(*args)
        with pytest.raises(type(expected.value), match=match):
            ours(*args)
    with pytest.raises(RuntimeError, match="dtype"):
        ours(torch.randn(2, 3, dtype=torch.float64))


def test_cpu_backend_rejects_half_precision_with_a_reason():
    with pytest.raises(TypeError, match="dtype"):
        zf.ZoneoutGRU(3, 4, backend="cpu", dtype=torch.bfloat16)(torch.randn(2, 1, 3, dtype=torch.bfloat16))


# ------------------------------------------------------------------ compile and script
@pytest.mark.parametrize("backend", ["cpu"])
def test_torch_compile_fullgraph(backend):
    _backend_or_skip(backend)
    torch.manual_seed(0)
    model = zf.ZoneoutGRU(3, 5, num_layers=2, zoneout_hidden=0.1, backend=backend, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    model.eval()
    assert_close(compiled(x)[0], model(x)[0])
    compiled(x)[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kind", ["gru", "rnn_relu"])
def test_cells_script(kind, tmp_path):
    torch.manual_seed(0)
    cell = (zf.ZoneoutGRUCell(3, 5, zoneout_hidden=0.2) if kind == "gru"
            else zf.ZoneoutRNNCell(3, 5, nonlinearity="relu", zoneout_hidden=0.2))
    scripted = torch.jit.script(cell)
    path = tmp_path / "cell.pt"
    torch.jit.save(scripted, path)
    loaded = torch.jit.load(path)
    x, h = torch.randn(2, 3), torch.randn(2, 5)
    cell.eval(), loaded.eval()
    # float32: the scripted step is the reference's; the module runs the cpu backend here
    exact = cell.double()(x.double(), h.double())
    cell.float()
    from zoneout_fused.testing import assert_three_way
    assert_three_way(loaded(x, h), cell(x, h).detach(), exact.detach(), "scripted step")
