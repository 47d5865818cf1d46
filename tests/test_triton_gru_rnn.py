"""The Triton GRU / plain-RNN layer op against the reference oracle, element for element (same seed,
same masks): y and the gradients of x, h0, w_ih, w_hh, b_ih and b_hh, for each cell (gru, rnn_tanh,
rnn_relu).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); shapes are tiny so the file stays fast there.
There the comparisons run in float64 with conftest's tight tolerances, and float32 by the three-way
rule; on a GPU (no float64 Triton kernels) the same tests compare float32 by the three-way rule.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from zoneout_fused import masks, ops, reference
import test_triton
from conftest import assert_close, reference_mismatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = ops.BACKENDS["triton"].unavailable_reason(torch.device(DEVICE))
if _REASON is not None and "triton" in os.environ.get("ZONEOUT_FUSED_REQUIRE_BACKENDS", "").split(","):
    raise RuntimeError(f"backend 'triton' is required here but unavailable: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

if _REASON is None:
    from zoneout_fused.triton import layer as triton_layer

CELLS = ("gru", "rnn_tanh", "rnn_relu")
MODES = ("independent", "timestep", "static")  # "shared" ties a cell mask these cells lack: rejected
# The dtype of the element-for-element tests: float64 under the interpreter (tight tolerances),
# float32 on a GPU, where the backend has no float64 kernels (the three-way rule).
EXACT_DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
SEED = 0x1234_5678_9ABC  # above 2**32: both key words matter
RESULT_NAMES = ("y", "grad_x", "grad_h0", "grad_w_ih", "grad_w_hh", "grad_b_ih", "grad_b_hh")
FORWARD_FIELDS = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "lengths", "seed", "cell", "layer", "direction",
                  "zoneout_hidden", "recurrent_dropout", "mask_mode", "training")


def _rows(cell):
    return 3 if cell == "gru" else 1


def _inputs(cell, steps=4, batch=3, inputs=5, hidden=20, dtype=EXACT_DTYPE, bias=True, generator_seed=0):
    """x, h0, w_ih, w_hh, b_ih, b_hh with values that keep the gates off saturation. H = 20 is not a
    multiple of the 16-wide tiles, so the masked edge tiles are exercised."""
    g = torch.Generator().manual_seed(generator_seed)
    rows = _rows(cell)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return [rand(steps, batch, inputs), rand(batch, hidden, scale=0.5), rand(rows * hidden, inputs, scale=0.4),
            rand(rows * hidden, hidden, scale=0.3), rand(rows * hidden, scale=0.2) if bias else None,
            rand(rows * hidden, scale=0.2) if bias else None]


def _call(layer_fn, tensors, lengths, seed, cell, layer, direction, z_h, p, mode, training):
    seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed)
    return layer_fn(*tensors, lengths, seed, reference.CELL_CODES[cell], layer, direction, z_h, p,
                    masks.MASK_MODE_CODES[mode], training)


def _run(layer_fn, tensors, *args):
    """Forward through layer_fn, backward from fixed weights on y; returns [y, *grads] (None for no bias)."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = _call(layer_fn, leaves, *args)
    # float32 loss weights in every dtype: the float64 reference differentiates the same loss.
    weight = torch.linspace(-1, 1, y.numel(), device=y.device).to(y.dtype).view_as(y)
    (y * weight).sum().backward()
    return [y.detach()] + [leaf.grad if leaf is not None else None for leaf in leaves]


def _triton(*args):
    return ops.BACKENDS["triton"].gru_rnn_layer(*args)


def _reference_error(actual, tensors, args):
    """None if `actual` (from _run on `tensors`, `args`) matches the reference, else why not
    (conftest.reference_mismatch)."""
    return reference_mismatch(actual, lambda ts: _run(reference.gru_rnn_layer, ts, *args), tensors, RESULT_NAMES)


def _assert_matches_reference(tensors, args, what=""):
    error = _reference_error(_run(_triton, tensors, *args), tensors, args)
    assert error is None, f"{what}: {error}"


def _dropout(cell, p=0.2):
    return p if cell == "gru" else 0.0  # the plain RNN has no recurrent dropout


# ----------------------------------------------------------------------------- layer op vs reference
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_training_matches_reference(cell, mode, direction):
    """y and every gradient, every mask mode, both directions, lengths, recurrent dropout (GRU)."""
    tensors = _inputs(cell, steps=3)
    lengths = torch.tensor([3, 1, 2], device=DEVICE)
    _assert_matches_reference(tensors, (lengths, SEED, cell, 1, direction, 0.3, _dropout(cell), mode, True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", CELLS)
def test_seed_in_device_memory_draws_the_same_masks(cell, mode, monkeypatch):
    """A seed the kernels load from its tensor (on the GPU; forced under the interpreter) gives the
    results of the same key passed by value, bit for bit (test_triton.py has the LSTM's)."""
    tensors = _inputs(cell, steps=3)
    lengths = torch.tensor([3, 1, 2], device=DEVICE)
    args = (cell, 1, 1, 0.3, _dropout(cell), mode, True)
    by_value = _run(_triton, tensors, lengths, SEED, *args)
    loads = []
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_layer, "_reads_seed_from_memory", lambda seed, x: loads.append(1) or True)
    in_memory = _run(_triton, tensors, lengths, torch.tensor(SEED, device=DEVICE), *args)
    assert loads or DEVICE == "cuda"
    for name, a, b in zip(RESULT_NAMES, in_memory, by_value):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("cell", CELLS)
def test_evaluation_matches_reference(cell, direction):
    tensors = _inputs(cell, steps=3)
    lengths = torch.tensor([2, 3, 1], device=DEVICE)
    _assert_matches_reference(tensors, (lengths, SEED, cell, 0, direction, 0.3, _dropout(cell), "independent", False))


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU every comparison above is float32 already")
@pytest.mark.parametrize("cell", CELLS)
def test_float32_three_way(cell):
    tensors = _inputs(cell, dtype=torch.float32)
    lengths = torch.tensor([4, 2, 3], device=DEVICE)
    _assert_matches_reference(tensors, (lengths, SEED, cell, 2, 1, 0.25, _dropout(cell), "static", True))


AWKWARD_CASES = {
    "T1": dict(steps=1),  # the first step is also the last
    "B1-H7": dict(steps=3, batch=1, hidden=7, lengths=[2]),  # H below one tile
    "H33": dict(steps=3, hidden=33, mode="timestep"),  # 3 H tiles, 2 K blocks in the backward product
    "no-bias": dict(steps=3, bias=False, lengths=None),
    "length0": dict(steps=3, lengths=[0, 3, 1], mode="independent"),  # an empty sequence
    # Recurrent dropout without a zoneout draw (the RNN without either is nn.RNN: test_without_zoneout_equals_torch).
    "GRU-dropout-only": dict(steps=3, z_h=0.0),
}
AWKWARD_PARAMS = [pytest.param(cell, case, id=f"{cell}-{case}") for cell in CELLS for case in AWKWARD_CASES
                  if cell == "gru" or not case.startswith("GRU")]


@pytest.mark.parametrize("cell, case", AWKWARD_PARAMS)
def test_awkward_shapes_and_settings(cell, case):
    settings = dict(AWKWARD_CASES[case])
    shape = {k: settings.pop(k) for k in ("steps", "batch", "hidden", "bias") if k in settings}
    tensors = _inputs(cell, **shape)
    steps, batch = tensors[0].shape[:2]
    lengths = settings.pop("lengths", [max(1, steps - b) for b in range(batch)])
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    z_h, mode = settings.pop("z_h", 0.4), settings.pop("mode", "static")
    for direction in (0, 1):
        _assert_matches_reference(tensors, (lengths, SEED, cell, 0, direction, z_h, _dropout(cell, 0.3), mode, True),
                                  f"direction {direction}")


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs under the interpreter only")
@pytest.mark.parametrize("cell", CELLS)
def test_without_zoneout_equals_torch(cell):
    """z_h = 0, no dropout: exactly nn.GRU / nn.RNN (a check independent of the reference)."""
    torch.manual_seed(0)
    module = (torch.nn.GRU(5, 20) if cell == "gru" else
              torch.nn.RNN(5, 20, nonlinearity=cell.split("_")[1])).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    weights = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    expected, _ = module(x, h0[None])
    actual = _call(_triton, [x, h0, *weights], None, SEED, cell, 0, 0, 0.0, 0.0, "independent", True)
    assert_close(actual, expected)
    weight = torch.linspace(-1, 1, expected.numel(), dtype=torch.float64).view_as(expected)
    leaves = [x, h0, *weights]
    for a, e in zip(torch.autograd.grad((actual * weight).sum(), leaves),
                    torch.autograd.grad((expected * weight).sum(), leaves)):
        assert_close(a, e)


def test_wrong_seed_fails_the_comparison():
    """The comparison can fail: the masks of another seed differ in O(1) elements of y and of
    every gradient; and a cell's output is not another cell's."""
    tensors = _inputs("gru", dtype=EXACT_DTYPE)
    args = (None, SEED, "gru", 0, 0, 0.4, 0.2, "independent", True)
    actual = _run(_triton, tensors, *args)
    assert _reference_error(actual, tensors, args) is None
    error = _reference_error(actual, tensors, (None, SEED + 1, *args[2:]))
    assert error is not None and "y" in error
    rnn = _inputs("rnn_tanh")
    relu = _run(_triton, rnn, None, SEED, "rnn_relu", 0, 0, 0.4, 0.0, "independent", True)
    assert _reference_error(relu, rnn, (None, SEED, "rnn_tanh", 0, 0, 0.4, 0.0, "independent", True)) is not None


@pytest.mark.parametrize("cell", ["gru", "rnn_relu"])
def test_every_output_element_is_written(cell, monkeypatch):
    """Buffers come from a NaN-filling allocator: an element a kernel skips would surface."""
    def nan_empty(*shape, **kwargs):
        return torch.full(shape, float("nan"), **kwargs)

    monkeypatch.setattr(triton_layer, "_empty", nan_empty)
    tensors = _inputs(cell, hidden=21)
    lengths = torch.tensor([4, 1, 3], device=DEVICE)
    for direction in (0, 1):
        args = (lengths, SEED, cell, 0, direction, 0.4, _dropout(cell), "independent", True)
        _assert_matches_reference(tensors, args, f"direction {direction}")
        y, gates = _call(torch.ops.zoneout_fused.triton_gru_rnn_layer_forward, tensors, *args)
        assert not y.isnan().any() and not gates.isnan().any()
        assert gates.shape == (4, 3, (4 if cell == "gru" else 1) * 21)
        assert (gates[1:, 1] == 0).all() and (gates[3, 2] == 0).all()  # zero past a sequence's end
        assert (gates[3, 0] != 0).any() and (gates[0, 1] != 0).any()  # and only there (relu: h~ = 0 at times)


def test_non_contiguous_inputs():
    x, h0, w_ih, w_hh, b_ih, b_hh = _inputs("gru")
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [B, T, I] memory
    w_strided = w_hh.t().contiguous().t()
    assert not x_strided.is_contiguous() and not w_strided.is_contiguous()
    args = (None, SEED, "gru", 0, 1, 0.3, 0.1, "independent", True)
    actual = _run(_triton, [x_strided, h0, w_ih, w_strided, b_ih, b_hh], *args)
    error = _reference_error(actual, [x, h0, w_ih, w_hh, b_ih, b_hh], args)
    assert error is None, error


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs under the interpreter only")
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_float64(cell):
    tensors = [t.detach().requires_grad_() for t in _inputs(cell, steps=2, batch=2, inputs=2, hidden=3)]
    lengths = torch.tensor([2, 1])

    def fn(*leaves):
        return _call(_triton, leaves, lengths, SEED, cell, 0, 1, 0.4, _dropout(cell), "independent", True)

    assert torch.autograd.gradcheck(fn, tuple(tensors), fast_mode=True)


@pytest.mark.parametrize("cell", ["gru", "rnn_tanh"])
def test_opcheck(cell):
    x, h0, w_ih, w_hh, b_ih, b_hh = _inputs(cell, steps=2, batch=2, inputs=3, hidden=5)
    lengths = torch.tensor([2, 1], device=DEVICE)
    scalars = (torch.tensor(SEED), reference.CELL_CODES[cell], 0, 1, 0.3, _dropout(cell), 0, True)
    forward_args = (x.requires_grad_(), h0, w_ih, w_hh, b_ih, b_hh, lengths, *scalars)
    torch.library.opcheck(torch.ops.zoneout_fused.triton_gru_rnn_layer_forward.default, forward_args)
    if cell == "gru":
        y, gates = torch.ops.zoneout_fused.triton_gru_rnn_layer_forward(
            *(a.detach() if isinstance(a, torch.Tensor) else a for a in forward_args))
        backward_args = (torch.randn_like(y), x.detach(), h0, w_ih, w_hh, None, b_hh, lengths, *scalars, y, gates)
        torch.library.opcheck(torch.ops.zoneout_fused.triton_gru_rnn_layer_backward.default, backward_args)


def test_bad_arguments_raise():
    x, h0, w_ih, w_hh, b_ih, b_hh = _inputs("gru", steps=2, batch=2, inputs=3, hidden=5)
    good = [x, h0, w_ih, w_hh, b_ih, b_hh, None, torch.tensor(SEED), 1, 0, 0, 0.1, 0.1, 0, True]

    def call(**changes):
        args = list(good)
        for name, value in changes.items():
            args[FORWARD_FIELDS.index(name)] = value
        return _triton(*args)

    call()  # the good arguments run
    other = torch.float32 if x.dtype == torch.float64 else torch.float64
    with pytest.raises(ValueError, match="cell"):
        call(cell=0)  # the LSTM has its own op
    with pytest.raises(ValueError, match="cell"):
        call(cell=4)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        call(cell=2, w_ih=w_ih[:5], w_hh=w_hh[:5], b_ih=None, b_hh=None)
    with pytest.raises(ValueError, match="mask_mode 'shared'"):
        call(mask_mode=1)
    with pytest.raises(ValueError, match="mask_mode"):
        call(mask_mode=7)
    with pytest.raises(ValueError, match=r"w_hh must be \[1H, H\]"):
        call(cell=3, recurrent_dropout=0.0)  # GRU weights for an RNN
    with pytest.raises(ValueError, match="h0"):
        call(h0=h0[:1])
    with pytest.raises(ValueError, match="w_ih"):
        call(w_ih=w_ih[:, :2])
    with pytest.raises(ValueError, match="b_hh"):
        call(b_hh=b_hh[:5])
    with pytest.raises(TypeError, match="b_ih"):
        call(b_ih=b_ih.to(other))
    with pytest.raises(ValueError, match="lengths"):
        call(lengths=torch.tensor([1, 2, 3], device=DEVICE))
    with pytest.raises(ValueError, match="seed"):
        call(seed=torch.tensor(-5))
    with pytest.raises(ValueError, match="direction"):
        call(direction=2)
    with pytest.raises(ValueError, match="zoneout_hidden"):
        call(zoneout_hidden=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        call(recurrent_dropout=1.0)


# ----------------------------------------------------------------------------- GPU code without a GPU
# The compile-and-count-spills preamble (build, spill_bytes) of test_triton.py's LSTM check, reused.
_LSTM_TILES = "# The tiles choose_blocks picks"
assert _LSTM_TILES in test_triton._COMPILE_FOR_HOPPER, "test_triton.py's compile script changed: update this file"
_COMPILE_FOR_HOPPER = test_triton._COMPILE_FOR_HOPPER.split(_LSTM_TILES)[0] + textwrap.dedent("""
    from zoneout_fused.triton import gru_rnn_step

    # The largest tile choose_blocks allows (the GRU's products are smaller than the LSTM's 4 rows).
    block_b, block_h, block_k, warps = 64, 32, 32, 8
    assert block_b * block_h <= lstm_step.MAX_TILE
    spills = []
    # The RNN's products are the GRU's with one row: its 16-bit build adds nothing.
    # The seed by value (fp32 builds) and loaded from device memory (bf16): both variants compile.
    for cell, x, wide in ((gru_rnn_step.GRU, "*fp32", True), (gru_rnn_step.GRU, "*bf16", False),
                          (gru_rnn_step.RNN_RELU, "*fp32", True)):
        in_memory = not wide
        seed = "*i64" if in_memory else "i64"
        common = dict(CELL=cell, FIRST=False, HAS_LENGTHS=True, MODE=0, TRAINING=True, DRAW_ZONEOUT=True,
                      HAS_DROPOUT=cell == gru_rnn_step.GRU, ACC=tl.float32, SEED_IN_MEMORY=in_memory, WIDE=wide,
                      PRECISION="ieee", ACCURATE=True, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k)
        forward = build(gru_rnn_step.gru_rnn_forward_step_kernel,
              dict(xp_ptr="*fp32", w_hh_ptr=x, b_hh_ptr=x, h0_ptr=x, y_ptr=x, gates_ptr="*fp32",
                   lengths_ptr="*i64", params_ptr="*fp64", seed=seed, key2="i32", t="i32", t_prev="i32",
                   B="i32", H="i32"), dict(HAS_B_HH=True, **common), warps)
        backward = build(gru_rnn_step.gru_rnn_backward_step_kernel,
              dict(grad_y_ptr=x, w_hh_ptr=x, h0_ptr=x, y_ptr=x, gates_ptr="*fp32", d_x_ptr="*fp32",
                   d_h_ptr="*fp32", dh_ptr="*fp32", lengths_ptr="*i64", params_ptr="*fp64", seed=seed,
                   key2="i32", t="i32", t_prev="i32", t_next="i32", B="i32", H="i32"),
              dict(LAST=False, **common), warps)
        for name, ptx in (("forward", forward), ("backward", backward)):
            spilled = spill_bytes(ptx)
            if spilled:
                spills.append(f"cell {cell} {name} {x}: {spilled} bytes spilled")
    print("\\n".join(spills) if spills else "compiled without spills")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every test above compiles the kernels")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter skips Triton's compiler: compile the GRU and RNN step kernels to sm_90a (no GPU
    needed) at the largest tile, so that code the interpreter accepts but the compiler rejects fails
    here, and so does a register spill (ptxas -v)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "compiled without spills" in result.stdout, result.stdout + result.stderr[-3000:]
