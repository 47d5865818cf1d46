"""The Triton backend against the reference oracle, element for element (same seed, same masks).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); shapes are tiny so the file stays fast there.
With a GPU the same tests run the compiled kernels on CUDA, plus the 16-bit accuracy tests.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import zoneout_fused as zf
from zoneout_fused import masks, ops, reference
from zoneout_fused.testing import assert_all_three_way
from conftest import reference_mismatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_REASON = ops.BACKENDS["triton"].unavailable_reason(torch.device(DEVICE))
if _REASON is not None and "triton" in os.environ.get("ZONEOUT_FUSED_REQUIRE_BACKENDS", "").split(","):
    raise RuntimeError(f"backend 'triton' is required here but unavailable: {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

if _REASON is None:
    from zoneout_fused.triton import layer as triton_layer
    from zoneout_fused.triton.masks import step_masks_kernel

# float64 runs only under the interpreter (on GPU the backend offers float32/float16/bfloat16).
EXACT_DTYPES = [torch.float32] + ([torch.float64] if DEVICE == "cpu" else [])
MODES = list(masks.MASK_MODES)
SEED = 0x1234_5678_9ABC  # above 2**32: both key words matter
GRAD_NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "bias")


def _inputs(steps=4, batch=3, inputs=5, hidden=20, dtype=torch.float32, bias=True, generator_seed=0):
    """x, h0, c0, w_ih, w_hh, bias with values that keep the gates off saturation. H = 20 is not a
    multiple of the 16-wide tiles, so the masked edge tiles are exercised."""
    g = torch.Generator().manual_seed(generator_seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return [rand(steps, batch, inputs), rand(batch, hidden, scale=0.5), rand(batch, hidden, scale=0.5),
            rand(4 * hidden, inputs, scale=0.4), rand(4 * hidden, hidden, scale=0.3),
            rand(4 * hidden, scale=0.2) if bias else None]


def _run(layer_fn, tensors, lengths, seed, layer, direction, z_c, z_h, p, mode, training, grads=True):
    """Forward through layer_fn, backward from fixed weights on y and c_n; returns [y, c_n, *grads]."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    seed = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed)
    y, c_n = layer_fn(*leaves, lengths, seed, layer, direction, z_c, z_h, p,
                      masks.MASK_MODE_CODES[mode], training)
    if not grads:
        return [y.detach(), c_n.detach()]
    # float32 loss weights in every dtype: the float64 reference differentiates the same loss.
    weight_y = torch.linspace(-1, 1, y.numel(), device=y.device).to(y.dtype).view_as(y)
    weight_c = torch.linspace(1, -0.5, c_n.numel(), device=y.device).to(y.dtype).view_as(c_n)
    ((y * weight_y).sum() + (c_n * weight_c).sum()).backward()
    out = [y.detach(), c_n.detach()]
    for leaf in leaves:
        out.append(leaf.grad if leaf is not None else None)
    return out


def _triton(*args):
    return ops.BACKENDS["triton"].layer(*args)


RESULT_NAMES = ("y", "c_n") + tuple(f"grad_{n}" for n in GRAD_NAMES)


def _reference_error(actual, tensors, args, what=""):
    """None if `actual` (from _run on `tensors`, `args`) matches the reference, else why not
    (conftest.reference_mismatch)."""
    grads = len(actual) > 2
    names = [f"{what} {n}".strip() for n in RESULT_NAMES[:len(actual)]]
    return reference_mismatch(actual, lambda ts: _run(reference.lstm_layer, ts, *args, grads=grads), tensors, names)


def _assert_matches_reference(actual, tensors, args, what=""):
    error = _reference_error(actual, tensors, args, what)
    assert error is None, error


# ----------------------------------------------------------------------------- layer op vs reference
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", MODES)
def test_layer_matches_reference(mode, direction, training):
    """Every output and gradient, every mask mode, both directions, lengths, recurrent dropout."""
    tensors = _inputs()
    lengths = torch.tensor([4, 2, 3], device=DEVICE)
    args = (lengths, SEED, 1, direction, 0.4, 0.3, 0.2, mode, training)
    actual = _run(_triton, tensors, *args)
    _assert_matches_reference(actual, tensors, args, f"{mode} d={direction} training={training}")


AWKWARD_CASES = {
    "T1": dict(steps=1),  # T = 1: the first step is also the last
    "no-bias": dict(bias=False, lengths=None),
    "H7-B1-shared": dict(batch=1, hidden=7, z_c=0.5, z_h=0.5, mode="shared"),  # H < one tile
    "H33-dropout-only": dict(steps=3, hidden=33, z_c=0.0, z_h=0.0, p=0.3, mode="timestep"),  # 3 H tiles, no zoneout draw
    "length0": dict(steps=3, z_c=0.6, z_h=0.15, p=0.0, mode="independent", lengths=[0, 3, 1]),
    "no-zoneout": dict(steps=3, hidden=17, z_c=0.0, z_h=0.0, p=0.0),  # plain LSTM
}
# float64 (interpreter only) for a few: its 1e-10 tolerance sees formula differences of 1e-7 too.
AWKWARD_PARAMS = [pytest.param(case, torch.float32, id=f"{name}-float32") for name, case in AWKWARD_CASES.items()]
if torch.float64 in EXACT_DTYPES:
    AWKWARD_PARAMS += [pytest.param(AWKWARD_CASES[name], torch.float64, id=f"{name}-float64")
                       for name in ("T1", "no-bias", "length0")]


@pytest.mark.parametrize("case, dtype", AWKWARD_PARAMS)
def test_awkward_shapes_and_settings(case, dtype):
    case = dict(case)
    shape = {k: case.pop(k) for k in ("steps", "batch", "hidden", "bias") if k in case}
    tensors = _inputs(dtype=dtype, **shape)
    steps, batch = tensors[0].shape[:2]
    lengths = case.pop("lengths", [max(1, steps - b) for b in range(batch)])
    lengths = None if lengths is None else torch.tensor(lengths, device=DEVICE)
    settings = dict(z_c=0.3, z_h=0.2, p=0.1, mode="static")
    settings.update(case)
    for direction in (0, 1):
        args = (lengths, SEED, 0, direction, settings["z_c"], settings["z_h"], settings["p"], settings["mode"], True)
        _assert_matches_reference(_run(_triton, tensors, *args), tensors, args, f"direction {direction}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", MODES)
def test_seed_in_device_memory_draws_the_same_masks(mode, training, monkeypatch):
    """A seed the kernels load from its tensor (one on the GPU: no host read, so a CUDA graph replay
    draws from the key the buffer holds) gives the results of the same key passed by value, bit for
    bit. Under the interpreter every tensor is on the CPU: the load is forced there."""
    tensors = _inputs()
    lengths = torch.tensor([4, 2, 3], device=DEVICE)
    args = (lengths, SEED, 1, 1, 0.4, 0.3, 0.2, mode, training)
    by_value = _run(_triton, tensors, *args)
    loads = []
    if DEVICE == "cpu":
        monkeypatch.setattr(triton_layer, "_reads_seed_from_memory", lambda seed, x: loads.append(1) or True)
    device_seed = torch.tensor(SEED, device=DEVICE)
    in_memory = _run(_triton, tensors, lengths, device_seed, *args[2:])
    assert loads or DEVICE == "cuda"
    for name, a, b in zip(RESULT_NAMES, in_memory, by_value):
        assert torch.equal(a, b), name
    assert torch.equal(device_seed.cpu(), torch.tensor(SEED))  # read, never written


def test_seed_on_another_device_raises():
    x, h0, c0, w_ih, w_hh, bias = _inputs(steps=2, batch=2, inputs=3, hidden=5)
    # (Called below the op: a meta tensor among an op's arguments would send it to the fake kernel.)
    with pytest.raises(RuntimeError, match="seed must be on the CPU or on x's device"):
        triton_layer._check(x, h0, c0, w_ih, w_hh, bias, None, torch.tensor(SEED, device="meta"), 0, 0.1, 0.1, 0.0, 0)
    with pytest.raises(ValueError, match="seed must be a 0-dim int64"):
        _triton(x, h0, c0, w_ih, w_hh, bias, None, torch.tensor(1.5), 0, 0, 0.1, 0.1, 0.0, 0, True)


def test_wrong_seed_fails_the_comparison():
    """The tolerances can fail: masks from another seed (or layer) differ in O(1) elements."""
    tensors = _inputs()
    args = (None, SEED, 0, 0, 0.3, 0.3, 0.0, "independent", True)
    actual = _run(_triton, tensors, *args, grads=False)
    assert _reference_error(actual, tensors, args) is None
    for wrong in [(None, SEED + 1) + args[2:], (None, SEED, 1) + args[3:]]:
        assert _reference_error(actual, tensors, wrong) is not None, wrong


def test_full_zoneout_freezes_the_state():
    tensors = _inputs()
    for training in (True, False):
        y, c_n = _run(_triton, tensors, None, SEED, 0, 0, 1.0, 1.0, 0.0, "independent", training, grads=False)
        assert torch.equal(y, tensors[1].expand_as(y)) and torch.equal(c_n, tensors[2])


def test_every_output_element_is_written(monkeypatch):
    """Fresh buffers filled with NaN: an element a kernel skips would surface in some output."""
    def nan_empty(*shape, **kwargs):
        return torch.full(shape, float("nan"), **kwargs)

    monkeypatch.setattr(triton_layer, "_empty", nan_empty)
    tensors = _inputs(hidden=21)
    lengths = torch.tensor([4, 1, 3], device=DEVICE)
    for direction in (0, 1):
        args = (lengths, SEED, 0, direction, 0.4, 0.3, 0.2, "independent", True)
        _assert_matches_reference(_run(_triton, tensors, *args), tensors, args)
        leaves = [t.detach() for t in tensors]
        forward = torch.ops.zoneout_fused.triton_layer_forward(*leaves, lengths, torch.tensor(SEED), 0, direction,
                                                               0.4, 0.3, 0.2, 0, True)
        for name, tensor in zip(("y", "c_n", "c_seq", "gates"), forward):
            assert not tensor.isnan().any(), name


def test_non_contiguous_inputs():
    x, h0, c0, w_ih, w_hh, bias = _inputs()
    x_strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, [B, T, I] memory
    w_strided = w_hh.t().contiguous().t()
    assert not x_strided.is_contiguous() and not w_strided.is_contiguous()
    args = (None, SEED, 0, 1, 0.3, 0.2, 0.1, "independent", True)
    actual = _run(_triton, [x_strided, h0, c0, w_ih, w_strided, bias], *args)
    _assert_matches_reference(actual, [x, h0, c0, w_ih, w_hh, bias], args)


def test_deterministic_bitwise():
    tensors = _inputs()
    args = (torch.tensor([4, 2, 3], device=DEVICE), SEED, 0, 0, 0.4, 0.3, 0.2, "independent", True)
    first, second = _run(_triton, tensors, *args), _run(_triton, tensors, *args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(DEVICE != "cpu", reason="float64 runs under the interpreter only")
@pytest.mark.parametrize("mode", ["independent", "static"])
def test_gradcheck_float64(mode):
    tensors = [t.detach().requires_grad_() if t is not None else None
               for t in _inputs(steps=3, batch=2, inputs=2, hidden=3, dtype=torch.float64)]
    lengths = torch.tensor([3, 2])

    def fn(*leaves):
        return _triton(*leaves, lengths, torch.tensor(SEED), 0, 1, 0.4, 0.3, 0.2, masks.MASK_MODE_CODES[mode], True)

    assert torch.autograd.gradcheck(fn, tuple(tensors), fast_mode=True)


def test_opcheck():
    x, h0, c0, w_ih, w_hh, bias = _inputs(steps=2, batch=2, inputs=3, hidden=5)
    lengths = torch.tensor([2, 1], device=DEVICE)
    scalars = (torch.tensor(SEED), 0, 1, 0.3, 0.2, 0.1, 0, True)
    forward_args = (x.requires_grad_(), h0, c0, w_ih, w_hh, bias, lengths, *scalars)
    torch.library.opcheck(torch.ops.zoneout_fused.triton_layer_forward.default, forward_args)
    y, c_n, c_seq, gates = torch.ops.zoneout_fused.triton_layer_forward(*(a.detach() if isinstance(a, torch.Tensor)
                                                                         else a for a in forward_args))
    backward_args = (torch.randn_like(y), torch.randn_like(c_n), x.detach(), h0, c0, w_ih, w_hh, bias, lengths,
                     *scalars, y, c_seq, gates)
    torch.library.opcheck(torch.ops.zoneout_fused.triton_layer_backward.default, backward_args)


def test_bad_arguments_raise():
    x, h0, c0, w_ih, w_hh, bias = _inputs(steps=2, batch=2, inputs=3, hidden=5)
    good = [x, h0, c0, w_ih, w_hh, bias, None, torch.tensor(SEED), 0, 0, 0.1, 0.1, 0.0, 0, True]

    def call(**changes):
        args = list(good)
        for name, value in changes.items():
            args[ops.LAYER_FORWARD_FIELDS.index(name)] = value
        return _triton(*args)

    with pytest.raises(ValueError, match="h0"):
        call(h0=h0[:1])
    with pytest.raises(ValueError, match="w_ih"):
        call(w_ih=w_ih[:, :2])
    with pytest.raises(TypeError, match="c0"):
        call(c0=c0.double() if c0.dtype != torch.float64 else c0.float())
    with pytest.raises(ValueError, match="lengths"):
        call(lengths=torch.tensor([1, 2, 3], device=DEVICE))
    with pytest.raises(ValueError, match="seed"):
        call(seed=torch.tensor(-5))
    with pytest.raises(ValueError, match="mask_mode"):
        call(mask_mode=7)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        call(recurrent_dropout=1.0)
    with pytest.raises(ValueError, match="zoneout_cell"):
        call(zoneout_cell=-0.5)


# ----------------------------------------------------------------------------- the in-kernel masks
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("step", [0, 3, 80_000_000])  # the last puts n above 2**32 (high counter word)
@pytest.mark.parametrize("seed_in_memory", [False, True])
def test_kernel_masks_equal_the_oracle(mode, step, seed_in_memory):
    batch, hidden, layer, direction = 3, 20, 2, 1
    z_c, z_h, p = 0.5, 0.25, 0.3
    out = [torch.empty(batch, hidden, dtype=torch.float32, device=DEVICE) for _ in range(3)]
    params = torch.tensor([z_c, z_h, p, 1.0 / (1.0 - p)], dtype=torch.float64, device=DEVICE)
    import triton.language as tl
    seed = torch.tensor(SEED, device=DEVICE) if seed_in_memory else SEED  # loaded by the kernel, or by value
    step_masks_kernel[(1, 2)](*out, params, seed, 2 * layer + direction, step, batch, hidden,
                              MODE=masks.MASK_MODE_CODES[mode], TRAINING=True, DRAW_ZONEOUT=True, HAS_DROPOUT=True,
                              ACC=tl.float32, SEED_IN_MEMORY=seed_in_memory, BLOCK_B=16, BLOCK_H=16)
    m_c, m_h, keep = masks.step_masks(SEED, layer, direction, step, batch, hidden, zoneout_cell=z_c,
                                      zoneout_hidden=z_h, recurrent_dropout=p, mask_mode=mode, device=DEVICE)
    assert torch.equal(out[0], m_c.float())
    assert torch.equal(out[1], m_h.float())
    assert torch.equal(out[2], keep.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))
    assert 0 < m_c.sum() < m_c.numel() or mode in ("timestep", "static")


# ----------------------------------------------------------------------------- the modules
def _module_pair(dtype, **kwargs):
    torch.manual_seed(0)
    ref = zf.ZoneoutLSTM(backend="reference", dtype=dtype, device=DEVICE, **kwargs)
    fused = zf.ZoneoutLSTM(backend="triton", dtype=dtype, device=DEVICE, **kwargs)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mode", ["independent", "static"])
def test_module_multilayer_bidirectional_packed(mode, training):
    dtype = torch.float32
    # Inter-layer dropout draws the same elements in float32 and float64 on the CPU, not on CUDA,
    # where the float64 reference of the three-way rule would then see other dropout masks.
    dropout = 0.2 if DEVICE == "cpu" else 0.0
    ref, fused = _module_pair(dtype, input_size=3, hidden_size=18, num_layers=2, bidirectional=True, dropout=dropout,
                              zoneout_cell=0.4, zoneout_hidden=0.2, recurrent_dropout=0.1, mask_mode=mode)
    if mode == "static":
        assert torch.equal(ref.static_seed, fused.static_seed)
    x = torch.randn(4, 3, 3, dtype=dtype, device=DEVICE)
    hx = tuple(torch.randn(4, 3, 18, dtype=dtype, device=DEVICE) for _ in range(2))
    lengths = torch.tensor([2, 4, 3])
    results = []
    for model in (fused, ref, copy.deepcopy(ref).double()):  # backend, reference in float32 and in float64
        model.train(training)
        model_dtype = next(model.parameters()).dtype
        x_ = x.to(model_dtype).clone().requires_grad_()
        hx_ = tuple(h.to(model_dtype).clone().requires_grad_() for h in hx)
        torch.manual_seed(7)  # the same per-call seed and inter-layer dropout for all
        output, (h_n, c_n) = model(pack_padded_sequence(x_, lengths, enforce_sorted=False), hx_)
        weights = torch.linspace(-1, 1, output.data.numel(), device=DEVICE).to(model_dtype).view_as(output.data)
        ((output.data * weights).sum() + (h_n * 0.5).sum() - (c_n * 0.25).sum()).backward()
        results.append([t.detach() for t in [output.data, h_n, c_n, x_.grad, *(h.grad for h in hx_),
                                             *(p.grad for p in model.parameters())]])
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [f"grad {n}" for n, _ in ref.named_parameters()]
    assert_all_three_way(*results, names)


def test_cell_matches_reference():
    torch.manual_seed(0)
    cells = [zf.ZoneoutLSTMCell(3, 19, zoneout_cell=0.5, zoneout_hidden=0.3, recurrent_dropout=0.2, backend=name,
                                device=DEVICE) for name in ("triton", "reference")]
    cells[0].load_state_dict(cells[1].state_dict())
    cells.append(copy.deepcopy(cells[1]).double())
    x = torch.randn(2, 3, device=DEVICE)
    outputs = []
    for cell in cells:  # backend, reference in float32 and in float64
        torch.manual_seed(2)
        h, c = cell(x.to(cell.weight_ih.dtype))
        (h.sum() + 2 * c.sum()).backward()
        outputs.append([t.detach() for t in [h, c, *(p.grad for p in cell.parameters())]])
    assert_all_three_way(*outputs, ["h", "c"] + [f"grad {n}" for n, _ in cells[1].named_parameters()])


def test_torch_compile_sees_one_op():
    torch.manual_seed(0)
    model = zf.ZoneoutLSTM(3, 5, zoneout_cell=0.5, zoneout_hidden=0.05, backend="triton", device=DEVICE).eval()
    x = torch.randn(4, 2, 3, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    expected = model(x)[0]
    actual = compiled(x)[0]
    assert torch.equal(actual, expected)  # the same opaque op on the same inputs
    actual.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- GPU code without a GPU
_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import glob, os, re, subprocess, sys, tempfile
    import triton, triton.language as tl
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from zoneout_fused.triton import lstm_step

    def build(fn, types, consts, num_warps):
        sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
        return triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps)).asm["ptx"]

    def spill_bytes(ptx):
        # Triton's own ptxas (the one that accepts its PTX version) with -v: spill stores per thread.
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "kernel.ptx")
            open(path, "w").write(ptx)
            for ptxas in sorted(glob.glob(os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas*"))):
                run = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
                                     capture_output=True, text=True)
                if run.returncode == 0:
                    return max(int(n) for n in re.findall(r"(\\d+) bytes spill stores", run.stdout + run.stderr))
        sys.exit("no bundled ptxas assembles this PTX")

    # The tiles choose_blocks picks for the paper's shapes on an H100 (132 SMs), and the largest it allows.
    shapes = [(32, 1000), (20, 1500), (128, 2000), (100, 100), (512, 4096), (64, 2048)]
    tiles = sorted({lstm_step.blocks_for(b, h, 132) for b, h in shapes} | {(64, 32, 32, 8)})
    assert all(bb * bh <= lstm_step.MAX_TILE for bb, bh, _, _ in tiles), tiles
    spills = []
    # The seed by value (fp32 builds) and loaded from device memory (bf16 builds): both variants compile.
    for x, wide, in_memory in (("*fp32", True, False), ("*bf16", False, True)):
        seed = "*i64" if in_memory else "i64"
        for block_b, block_h, block_k, warps in tiles:
            common = dict(HAS_LENGTHS=True, MODE=0, TRAINING=True, DRAW_ZONEOUT=True, HAS_DROPOUT=True,
                          ACC=tl.float32, SEED_IN_MEMORY=in_memory, WIDE=wide, PRECISION="ieee", ACCURATE=True,
                          BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k)
            forward = build(lstm_step.lstm_forward_step_kernel,
                  dict(xp_ptr="*fp32", w_hh_ptr=x, h0_ptr=x, c0_ptr=x, y_ptr=x, c_seq_ptr="*fp32",
                       gates_ptr="*fp32", lengths_ptr="*i64", params_ptr="*fp64", seed=seed, key2="i32", t="i32",
                       t_prev="i32", B="i32", H="i32"), dict(FIRST=False, **common), warps)
            backward = build(lstm_step.lstm_backward_step_kernel,
                  dict(grad_y_ptr=x, w_hh_ptr=x, c0_ptr=x, c_seq_ptr="*fp32", gates_ptr="*fp32",
                       d_pre_ptr="*fp32", dh_ptr="*fp32", dc_ptr="*fp32", lengths_ptr="*i64", params_ptr="*fp64",
                       seed=seed, key2="i32", t="i32", t_prev="i32", t_next="i32", B="i32", H="i32"),
                  dict(FIRST=False, LAST=False, **common), warps)
            for name, ptx in (("forward", forward), ("backward", backward)):
                spilled = spill_bytes(ptx)
                if spilled:
                    spills.append(f"{name} {x} {block_b}x{block_h}: {spilled} bytes spilled")
    print("\\n".join(spills) if spills else "compiled without spills")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU every test above compiles the kernels")
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter skips Triton's compiler; compile the step kernels to sm_90a (no GPU needed)
    so that code the interpreter accepts but the compiler rejects fails here, and so does a tile
    choice that spills registers (checked with ptxas -v, as .ci/nvcc_check.sh does for CUDA)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "compiled without spills" in result.stdout, result.stdout + result.stderr[-3000:]


# ----------------------------------------------------------------------------- 16-bit on the GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16/bfloat16 Triton kernels need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("direction", [0, 1])
@pytest.mark.parametrize("mode", ["independent", "timestep"])
def test_16bit_three_way_accuracy(dtype, direction, mode):
    # A paper-sized hidden layer (not a multiple of the tiles) over enough steps to accumulate error.
    tensors64 = _inputs(steps=35, batch=20, inputs=64, hidden=300, dtype=torch.float64)
    lengths = torch.randint(1, 36, (20,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    args = (lengths, SEED, 0, direction, 0.5, 0.05, 0.1, mode, True)
    low = [t.to(dtype) if t is not None else None for t in tensors64]
    actual = _run(_triton, low, *args)
    assert all(a.dtype == dtype for a in actual)
    _assert_matches_reference(actual, low, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only")
def test_float32_uses_ieee_products_on_the_gpu():
    """TF32 in the recurrent product would miss the float32 tolerance at this size."""
    tensors = _inputs(steps=20, batch=32, inputs=64, hidden=257)
    args = (None, SEED, 0, 0, 0.5, 0.05, 0.0, "independent", True)
    _assert_matches_reference(_run(_triton, tensors, *args), tensors, args)
