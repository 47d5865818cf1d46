"""The CUDA backend (zoneout_fused._C_cuda) against the reference, element for element.

GPU only: every test is skipped, with the reason, where torch sees no CUDA device. Where a GPU
is present but the extension is not built, the tests fail (a missing build is a failure, not a
skip). Both ways of forming the recurrent product are tested: the fused step kernels and cuBLAS
(ZONEOUT_FUSED_CUDA_RECURRENCE=fused / cublas).
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

# cuBLAS under torch.use_deterministic_algorithms (the NaN-fill fixture) needs this before its
# first handle is made.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import zoneout_fused as zf  # noqa: E402
from zoneout_fused import ops, reference  # noqa: E402
from zoneout_fused.masks import MASK_MODE_CODES, MASK_MODES  # noqa: E402
from zoneout_fused.testing import assert_all_three_way  # noqa: E402
from conftest import (DEVICE_SEED, assert_device_seed_matches_cpu_seed,  # noqa: E402
                      assert_graph_replays_read_the_seed, forbid_host_sync, reference_mismatch)

# Where a GPU is present a missing build fails instead of skipping (conftest.cuda_extension).
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU: the CUDA backend's kernels cannot run without one"),
              pytest.mark.usefixtures("cuda_extension")]

DEVICE = "cuda"
RECURRENCES = ("fused", "cublas")

# Comparisons with the reference: float64 tightly; float32 and the 16-bit types by the
# three-way rule of zoneout_fused/testing.py (against a float64 reference on the same inputs and masks).


@pytest.fixture(params=RECURRENCES)
def recurrence(request, monkeypatch):
    """Runs the test once with the fused recurrent product and once with cuBLAS."""
    monkeypatch.setenv("ZONEOUT_FUSED_CUDA_RECURRENCE", request.param)
    return request.param




def cuda_layer(*args):
    return ops.BACKENDS["cuda"].layer(*args)


def make_inputs(steps, batch, inputs, hidden, dtype=torch.float32, *, bias=True, lengths=None, scale=1.0):
    """Deterministic layer-op tensors, drawn in float64 on the CPU then cast (same values in every dtype)."""
    g = torch.Generator().manual_seed(steps * 1000 + batch * 100 + hidden)
    k = hidden ** -0.5

    def draw(*shape, s=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * s

    tensors = dict(x=draw(steps, batch, inputs, s=scale), h0=draw(batch, hidden, s=0.5), c0=draw(batch, hidden),
                   w_ih=draw(4 * hidden, inputs, s=k), w_hh=draw(4 * hidden, hidden, s=k),
                   bias=draw(4 * hidden, s=k) if bias else None)
    tensors = {n: (t.to(device=DEVICE, dtype=dtype) if t is not None else None) for n, t in tensors.items()}
    tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64, device=DEVICE) if lengths is not None else None
    return tensors


GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "bias")


def run(layer_fn, tensors, *, seed=1234, layer=0, direction=0, zoneout_cell=0.0, zoneout_hidden=0.0,
        recurrent_dropout=0.0, mask_mode="independent", training=True, grads=True):
    """Forward, then gradients of a fixed random weighting of y and c_n; returns a dict of results.
    `seed`: an int (passed as a CPU tensor) or the seed tensor itself."""
    leaves = {n: tensors[n].detach().clone().requires_grad_(grads) if tensors[n] is not None else None
              for n in GRAD_NAMES}
    seed_tensor = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)
    y, c_n = layer_fn(leaves["x"], leaves["h0"], leaves["c0"], leaves["w_ih"], leaves["w_hh"], leaves["bias"],
                      tensors["lengths"], seed_tensor, layer, direction, zoneout_cell, zoneout_hidden,
                      recurrent_dropout, MASK_MODE_CODES[mask_mode], training)
    out = {"y": y.detach(), "c_n": c_n.detach()}
    if grads:
        # Loss weights rounded through bfloat16: the same values in every dtype under test.
        g = torch.Generator().manual_seed(7)
        w_y = torch.randn(y.shape, generator=g).to(torch.bfloat16).to(device=y.device, dtype=y.dtype)
        w_c = torch.randn(c_n.shape, generator=g).to(torch.bfloat16).to(device=y.device, dtype=y.dtype)
        loss = (y * w_y).sum() + (c_n * w_c).sum()
        names = [n for n in GRAD_NAMES if leaves[n] is not None]
        for n, grad in zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])):
            out["grad_" + n] = grad
    return out


def assert_matches_reference(actual, tensors, **kwargs):
    """`actual` (run() of the CUDA backend) against run() of the reference on `tensors`
    (conftest.reference_mismatch)."""
    assert all(a.dtype == tensors["x"].dtype for a in actual.values())
    error = reference_mismatch(actual, lambda ts: run(reference.lstm_layer, ts, **kwargs), tensors, list(actual))
    assert error is None, error


def to_float64(tensors):
    return {n: (t.to(torch.float64) if t is not None and t.is_floating_point() else t) for n, t in tensors.items()}


# --------------------------------------------------------------------------------------
# Element for element against the reference (same seed, same masks)
# --------------------------------------------------------------------------------------
CASES = [
    # (steps, batch, inputs, hidden, lengths, bias)
    (7, 4, 5, 6, None, True),
    (1, 3, 4, 5, None, True),             # T = 1
    (9, 1, 3, 37, None, False),           # B = 1, odd H, no bias
    (6, 5, 4, 7, [6, 2, 0, 5, 1], True),  # lengths, one empty sequence
    (63, 3, 2, 33, [63, 40, 1], True),    # odd T, H not a multiple of 32
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}B{c[1]}I{c[2]}H{c[3]}" + ("L" if c[4] else ""))
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", MASK_MODES)
def test_matches_reference_training(case, direction, mode, recurrence, nan_fill):
    steps, batch, inputs, hidden, lengths, bias = case
    tensors = make_inputs(steps, batch, inputs, hidden, lengths=lengths, bias=bias)
    kwargs = dict(seed=2024 + direction, layer=1, direction=direction, zoneout_cell=0.3, zoneout_hidden=0.2,
                  mask_mode=mode)
    assert_matches_reference(run(cuda_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", ["independent", "timestep"])
def test_matches_reference_recurrent_dropout(direction, mode, recurrence, nan_fill):
    tensors = make_inputs(11, 4, 3, 9, lengths=[11, 7, 3, 10])
    kwargs = dict(seed=99, direction=direction, zoneout_cell=0.1, zoneout_hidden=0.15, recurrent_dropout=0.3,
                  mask_mode=mode)
    assert_matches_reference(run(cuda_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("direction", [0, 1])
def test_matches_reference_eval(direction, recurrence, nan_fill):
    tensors = make_inputs(8, 3, 4, 10, lengths=[8, 5, 2])
    kwargs = dict(direction=direction, zoneout_cell=0.25, zoneout_hidden=0.5, recurrent_dropout=0.2,
                  mask_mode="shared", training=False)
    assert_matches_reference(run(cuda_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("training", [True, False])
def test_matches_reference_float64(direction, training, recurrence, nan_fill):
    # Probabilities not representable in float32: ZoneoutParams holds doubles, so the float64
    # evaluation expectation and 1/(1-p) are the reference's to the last bit.
    tensors = make_inputs(10, 3, 4, 6, torch.float64, lengths=[10, 4, 7])
    kwargs = dict(seed=5, direction=direction, zoneout_cell=0.15, zoneout_hidden=0.1, recurrent_dropout=0.3,
                  training=training)
    assert_matches_reference(run(cuda_layer, tensors, **kwargs), tensors, **kwargs)


@pytest.mark.parametrize("zoneout", [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0)])
def test_full_zoneout_freezes_state(zoneout, recurrence):
    tensors = make_inputs(5, 2, 3, 4)
    kwargs = dict(zoneout_cell=zoneout[0], zoneout_hidden=zoneout[1], grads=False)
    out = run(cuda_layer, tensors, **kwargs)
    assert_matches_reference(out, tensors, **kwargs)
    if zoneout[1] == 1.0:
        assert torch.equal(out["y"], tensors["h0"].expand_as(out["y"]))
    if zoneout[0] == 1.0:
        assert torch.equal(out["c_n"], tensors["c0"])


def test_pmnist_shape_both_recurrences(monkeypatch):
    """pMNIST-like shape (H=100, B=100, I=1; T cut to 50), both ways of forming the recurrent product."""
    tensors = make_inputs(50, 100, 1, 100)
    kwargs = dict(zoneout_cell=0.15, zoneout_hidden=0.15, mask_mode="shared")
    for mode in RECURRENCES:
        monkeypatch.setenv("ZONEOUT_FUSED_CUDA_RECURRENCE", mode)
        assert_matches_reference(run(cuda_layer, tensors, **kwargs), tensors, **kwargs)


def test_large_hidden_falls_back_to_cublas(monkeypatch):
    """H above the fused kernels' limit: 'fused' silently uses cuBLAS and still matches."""
    monkeypatch.setenv("ZONEOUT_FUSED_CUDA_RECURRENCE", "fused")
    tensors = make_inputs(3, 2, 4, 300)
    kwargs = dict(zoneout_cell=0.2, zoneout_hidden=0.1)
    assert_matches_reference(run(cuda_layer, tensors, **kwargs), tensors, **kwargs)


# --------------------------------------------------------------------------------------
# 16-bit dtypes: three-way accuracy
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", [0, 1])
def test_low_precision_three_way(dtype, direction, recurrence):
    low = make_inputs(20, 8, 6, 24, dtype, lengths=[20, 19, 3, 11, 20, 1, 7, 15])
    kwargs = dict(seed=11, direction=direction, zoneout_cell=0.15, zoneout_hidden=0.1, recurrent_dropout=0.1)
    assert_matches_reference(run(cuda_layer, low, **kwargs), low, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_saves_float32_state(dtype):
    t = make_inputs(4, 2, 3, 5, dtype)
    y, c_n, c_seq, gates = torch.ops.zoneout_fused.cuda_layer_forward(
        t["x"], t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["bias"], None, torch.tensor(3), 0, 0, 0.1, 0.1, 0.0, 0,
        True)
    assert (y.dtype, c_n.dtype, c_seq.dtype, gates.dtype) == (dtype, dtype, torch.float32, torch.float32)
    assert c_seq.shape == (4, 2, 5) and gates.shape == (4, 2, 20)


def test_float16_pre_activation_gradients_do_not_underflow(recurrence):
    """d_pre, d_pre W_hh and the products stay in float32 for 16-bit inputs: with grad_y scaled
    by 2**-22 every pre-activation gradient (~1e-8) lies below float16's smallest subnormal, yet
    the bias and W_ih gradients (sums over T*B = 16384 of them) must be the unscaled ones times
    2**-22, to float16 rounding. Rounded to float16 each step, d_pre would flush to zero."""
    steps, batch, inputs, hidden = 64, 256, 4, 32
    g = torch.Generator().manual_seed(5)
    x = torch.full((steps, batch, inputs), 2.0)
    h0 = c0 = torch.zeros(batch, hidden)
    w_ih = torch.rand(4 * hidden, inputs, generator=g) * 0.1
    w_hh = torch.rand(4 * hidden, hidden, generator=g) * 0.1
    bias = torch.rand(4 * hidden, generator=g) * 0.1
    tensors = [t.to(DEVICE, torch.float16) for t in (x, h0, c0, w_ih, w_hh, bias)]
    grads = {}
    for scale in (1.0, 2.0 ** -22):
        leaves = [t.clone().requires_grad_() for t in tensors]
        y, _ = cuda_layer(*leaves, None, torch.tensor(3), 0, 0, 0.0, 0.0, 0.0, 0, True)
        y.backward(torch.full_like(y, scale))
        grads[scale] = [leaves[3].grad.float(), leaves[5].grad.float()]  # W_ih, bias
    for name, small, full in zip(("grad_w_ih", "grad_bias"), grads[2.0 ** -22], grads[1.0]):
        normal = full.abs() * 2.0 ** -22 > 1e-4  # both results float16 normals: comparable to rounding
        assert normal.sum() >= 16, name  # enough comparable elements
        torch.testing.assert_close(small[normal] * 2.0 ** 22, full[normal], rtol=2e-3, atol=0, msg=name)


# --------------------------------------------------------------------------------------
# Gradients, op registration, determinism
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", ["independent", "static"])
@pytest.mark.parametrize("lengths", [None, [3, 1]], ids=["full", "lengths"])
def test_gradcheck_float64(direction, mode, lengths, recurrence):
    t = make_inputs(3, 2, 3, 4, torch.float64, lengths=lengths)
    names = [n for n in GRAD_NAMES if t[n] is not None]
    leaves = [t[n].detach().clone().requires_grad_() for n in names]
    seed = torch.tensor(31, dtype=torch.int64)

    def layer(*args):
        return cuda_layer(*args, t["lengths"], seed, 0, direction, 0.3, 0.3, 0.2, MASK_MODE_CODES[mode], True)

    assert torch.autograd.gradcheck(layer, leaves)


def _opcheck_args(requires_grad):
    t = make_inputs(4, 3, 2, 5, lengths=[4, 2, 3])
    leaves = {n: t[n].detach().clone().requires_grad_(requires_grad) for n in GRAD_NAMES}
    return [leaves["x"], leaves["h0"], leaves["c0"], leaves["w_ih"], leaves["w_hh"], leaves["bias"], t["lengths"],
            torch.tensor(8, dtype=torch.int64), 0, 1, 0.2, 0.3, 0.1, MASK_MODE_CODES["independent"], True]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad):
    torch.library.opcheck(torch.ops.zoneout_fused.cuda_layer_forward.default, _opcheck_args(requires_grad))


def test_opcheck_backward():
    args = _opcheck_args(False)
    y, c_n, c_seq, gates = torch.ops.zoneout_fused.cuda_layer_forward(*args)
    grad_y, grad_c_n = torch.randn_like(y), torch.randn_like(c_n)
    torch.library.opcheck(torch.ops.zoneout_fused.cuda_layer_backward.default,
                          [grad_y, grad_c_n, *args, y, c_seq, gates])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(dtype, recurrence):
    tensors = make_inputs(30, 64, 8, 48, dtype, lengths=[30 - i % 31 for i in range(64)])
    kwargs = dict(seed=77, direction=1, zoneout_cell=0.2, zoneout_hidden=0.2, recurrent_dropout=0.1)
    first, second = run(cuda_layer, tensors, **kwargs), run(cuda_layer, tensors, **kwargs)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between identical runs"


def test_different_seeds_differ():
    tensors = make_inputs(5, 4, 3, 8)
    a = run(cuda_layer, tensors, seed=1, zoneout_cell=0.5, zoneout_hidden=0.5, grads=False)
    b = run(cuda_layer, tensors, seed=2, zoneout_cell=0.5, zoneout_hidden=0.5, grads=False)
    assert not torch.equal(a["y"], b["y"])


def test_non_contiguous_inputs(recurrence):
    t = make_inputs(6, 3, 4, 5)
    strided = dict(t)
    strided["x"] = t["x"].transpose(0, 1).contiguous().transpose(0, 1)  # same values, [B, T, I] storage
    strided["w_hh"] = t["w_hh"].t().contiguous().t()
    kwargs = dict(zoneout_cell=0.2, zoneout_hidden=0.3)
    assert not strided["x"].is_contiguous()
    assert_matches_reference(run(cuda_layer, strided, **kwargs), t, **kwargs)


# --------------------------------------------------------------------------------------
# Modules on the CUDA backend, argument checks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True])
def test_module_matches_reference_backend(packed):
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, zoneout_cell=0.1, zoneout_hidden=0.2, mask_mode="independent")
    cuda_model = zf.ZoneoutLSTM(5, 8, backend="cuda", device=DEVICE, **kwargs)
    ref_model = zf.ZoneoutLSTM(5, 8, backend="reference", device=DEVICE, **kwargs)
    ref_model.load_state_dict(cuda_model.state_dict())
    x = torch.randn(7, 4, 5, device=DEVICE)
    lengths = torch.tensor([7, 3, 5, 1])
    outputs = []
    for model in (cuda_model, ref_model, copy.deepcopy(ref_model).double()):  # reference in float32 and float64
        x_ = x.to(next(model.parameters()).dtype)
        inputs = torch.nn.utils.rnn.pack_padded_sequence(x_, lengths, enforce_sorted=False) if packed else x_
        torch.manual_seed(123)  # same seed draw for all
        output, (h_n, c_n) = model(inputs)
        data = output.data if packed else output
        (data.sum() + h_n.sum() + c_n.sum()).backward()
        outputs.append([t.detach() for t in [data, h_n, c_n] + [p.grad for p in model.parameters()]])
    names = ["output", "h_n", "c_n"] + [f"grad {n}" for n, _ in ref_model.named_parameters()]
    assert_all_three_way(*outputs, names)


def test_cell_on_cuda_backend():
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(4, 6, backend="cuda", device=DEVICE, zoneout_cell=0.3, zoneout_hidden=0.3)
    ref = zf.ZoneoutLSTMCell(4, 6, backend="reference", device=DEVICE, zoneout_cell=0.3, zoneout_hidden=0.3)
    ref.load_state_dict(cell.state_dict())
    x = torch.randn(3, 4, device=DEVICE)
    outputs = []
    for model in (cell, ref, copy.deepcopy(ref).double()):
        torch.manual_seed(5)
        outputs.append(model(x.to(model.weight_ih.dtype)))
    assert_all_three_way(*outputs, ["h", "c"])


def _forward_args(**overrides):
    t = make_inputs(3, 2, 4, 5)
    args = dict(x=t["x"], h0=t["h0"], c0=t["c0"], w_ih=t["w_ih"], w_hh=t["w_hh"], bias=t["bias"], lengths=None,
                seed=torch.tensor(1), layer=0, direction=0, zoneout_cell=0.1, zoneout_hidden=0.1,
                recurrent_dropout=0.0, mask_mode=0, training=True)
    args.update(overrides)
    return list(args.values())


# Bad values are built lazily: collection must not touch CUDA on a machine without it.
BAD_ARGUMENTS = [
    ("x", lambda: torch.zeros(3, 2, 4), RuntimeError),                       # CPU tensor
    ("x", lambda: torch.zeros(3, 2, device=DEVICE), RuntimeError),           # wrong rank
    ("h0", lambda: torch.zeros(2, 6, device=DEVICE), RuntimeError),          # wrong H
    ("c0", lambda: torch.zeros(2, 5, device=DEVICE, dtype=torch.float64), TypeError),
    ("w_ih", lambda: torch.zeros(20, 3, device=DEVICE), RuntimeError),
    ("bias", lambda: torch.zeros(19, device=DEVICE), RuntimeError),
    ("lengths", lambda: torch.tensor([3, 1], device=DEVICE, dtype=torch.int32), TypeError),
    ("lengths", lambda: torch.tensor([3, 1]), RuntimeError),                 # lengths on the CPU
    ("seed", lambda: torch.tensor(1, device=DEVICE, dtype=torch.int32), TypeError),  # on the GPU, int32
    ("seed", lambda: torch.tensor([1, 2], device=DEVICE), RuntimeError),    # on the GPU, two values
    ("direction", lambda: 2, ValueError),
    ("mask_mode", lambda: 4, ValueError),
    ("zoneout_cell", lambda: 1.5, ValueError),
    ("zoneout_hidden", lambda: -0.1, ValueError),
    ("recurrent_dropout", lambda: 1.0, ValueError),
]


@pytest.mark.parametrize("name,make_value,error", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_rejects_bad_arguments(name, make_value, error):
    with pytest.raises(error, match=name):
        torch.ops.zoneout_fused.cuda_layer_forward(*_forward_args(**{name: make_value()}))


# --------------------------------------------------------------------------------------
# seed on the GPU: the kernels load it (never read on the host), so a CUDA graph replay
# draws with whatever value the buffer holds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,mode", [(torch.float32, mode) for mode in MASK_MODES]
                         + [(torch.float64, "independent"), (torch.bfloat16, "timestep")])
@pytest.mark.parametrize("direction", [0, 1])
def test_device_seed_matches_cpu_seed(dtype, mode, direction, recurrence, nan_fill):
    """Outputs and every gradient bit for bit as with the same value on the CPU (the backward op
    gets the device seed back from autograd's saved tensors)."""
    tensors = make_inputs(9, 4, 3, 10, dtype, lengths=[9, 5, 1, 8])
    kwargs = dict(layer=1, direction=direction, zoneout_cell=0.3, zoneout_hidden=0.2, recurrent_dropout=0.25,
                  mask_mode=mode)
    assert_device_seed_matches_cpu_seed(lambda seed, grads: run(cuda_layer, tensors, seed=seed, grads=grads, **kwargs),
                                        DEVICE)


def test_device_seed_no_host_sync():
    """Forward and backward ops with a device seed in training mode never synchronize with the host."""
    args = _forward_args(seed=torch.tensor(DEVICE_SEED, device=DEVICE), recurrent_dropout=0.2)
    torch.ops.zoneout_fused.cuda_layer_forward(*args)  # first call outside: cuBLAS handle, workspace
    with forbid_host_sync():
        y, c_n, c_seq, gates = torch.ops.zoneout_fused.cuda_layer_forward(*args)
        torch.ops.zoneout_fused.cuda_layer_backward(torch.ones_like(y), torch.ones_like(c_n), *args, y, c_seq, gates)


def test_device_seed_cuda_graph_replay(recurrence):
    """A captured forward draws fresh masks from the seed buffer's value at each replay."""
    tensors = make_inputs(6, 3, 4, 8, torch.float64, lengths=[6, 2, 4])
    kwargs = dict(zoneout_cell=0.3, zoneout_hidden=0.3, recurrent_dropout=0.2)
    seed = torch.tensor(1, device=DEVICE)

    def forward():
        y, c_n = cuda_layer(tensors["x"], tensors["h0"], tensors["c0"], tensors["w_ih"], tensors["w_hh"],
                            tensors["bias"], tensors["lengths"], seed, 0, 0, kwargs["zoneout_cell"],
                            kwargs["zoneout_hidden"], kwargs["recurrent_dropout"], MASK_MODE_CODES["independent"],
                            True)
        return {"y": y, "c_n": c_n}

    assert_graph_replays_read_the_seed(
        forward, seed, lambda value: run(cuda_layer, tensors, seed=value, grads=False, **kwargs))


def test_eval_ignores_device_seed(recurrence, nan_fill):
    """Evaluation draws nothing: a device seed holding garbage changes nothing (never dereferenced)."""
    tensors = make_inputs(8, 3, 4, 10, lengths=[8, 5, 2])
    kwargs = dict(zoneout_cell=0.25, zoneout_hidden=0.5, recurrent_dropout=0.2, training=False)
    garbage = torch.tensor(torch.iinfo(torch.int64).min + 12345, device=DEVICE)
    on_cpu = run(cuda_layer, tensors, seed=0, **kwargs)
    on_gpu = run(cuda_layer, tensors, seed=garbage, **kwargs)
    for name in on_cpu:
        assert torch.equal(on_gpu[name], on_cpu[name]), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: a seed on a GPU other than x's")
def test_seed_on_another_gpu_rejected():
    with pytest.raises(RuntimeError, match=r"seed.*cuda:0.*cuda:1"):
        torch.ops.zoneout_fused.cuda_layer_forward(*_forward_args(seed=torch.tensor(1, device="cuda:1")))


def test_opcheck_forward_device_seed():
    args = _opcheck_args(True)
    args[7] = torch.tensor(8, device=DEVICE)
    torch.library.opcheck(torch.ops.zoneout_fused.cuda_layer_forward.default, args)


# --------------------------------------------------------------------------------------
# compute-sanitizer: memory errors and shared-memory races in the step kernels
# --------------------------------------------------------------------------------------
SANITIZER_SCRIPT = textwrap.dedent("""
    import os
    import torch
    from zoneout_fused import ops
    from zoneout_fused.masks import MASK_MODE_CODES
    assert ops._load_extension("cuda") is None
    layer = ops.BACKENDS["cuda"].layer
    for recurrence in ("fused", "cublas"):
        os.environ["ZONEOUT_FUSED_CUDA_RECURRENCE"] = recurrence
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for direction in (0, 1):
                T, B, I, H = 5, 6, 3, 37
                x = torch.randn(T, B, I, device="cuda", dtype=dtype, requires_grad=True)
                h0 = torch.randn(B, H, device="cuda", dtype=dtype, requires_grad=True)
                c0 = torch.randn(B, H, device="cuda", dtype=dtype, requires_grad=True)
                w_ih = torch.randn(4 * H, I, device="cuda", dtype=dtype, requires_grad=True)
                w_hh = torch.randn(4 * H, H, device="cuda", dtype=dtype, requires_grad=True)
                bias = torch.randn(4 * H, device="cuda", dtype=dtype, requires_grad=True)
                lengths = torch.tensor([5, 1, 0, 3, 5, 2], device="cuda")
                y, c_n = layer(x, h0, c0, w_ih, w_hh, bias, lengths, torch.tensor(3), 0, direction, 0.2, 0.2, 0.1,
                               MASK_MODE_CODES["independent"], True)
                (y.float().sum() + c_n.float().sum()).backward()
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool, tmp_path):
    script = tmp_path / "fwd_bwd.py"
    script.write_text(SANITIZER_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees
    # out-of-bounds accesses to the exact byte.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + sys.path), PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    result = subprocess.run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "97", sys.executable,
                             str(script)], capture_output=True, text=True, env=env, timeout=900)
    report = result.stdout[-6000:] + result.stderr[-6000:]
    assert result.returncode == 0, f"compute-sanitizer --tool {tool} failed:\n{report}"
    assert "sanitizer script done" in result.stdout, report
    assert re.search(r"ERROR SUMMARY: 0 errors|RACECHECK SUMMARY: 0 hazards", result.stdout + result.stderr), report
