"""ZoneoutLSTM / ZoneoutLSTMCell as true drop-ins for nn.LSTM / nn.LSTMCell: second-order
gradients, torch's own exception types, tracing and export, autocast."""
import re

import pytest
import torch
from torch import nn

import zoneout_fused as zf
from zoneout_fused import masks, ops
from conftest import assert_close

CPU_BACKENDS = [name for name in ("reference", "cpu", "triton") if name in zf.available_backends("cpu")]


def _layer_inputs(seed=0, steps=3, batch=2, inputs=2, hidden=3):
    g = torch.Generator().manual_seed(seed)
    shapes = [(steps, batch, inputs), (batch, hidden), (batch, hidden), (4 * hidden, inputs), (4 * hidden, hidden),
              (4 * hidden,)]
    return [(torch.rand(*s, generator=g, dtype=torch.float64) - 0.5).requires_grad_() for s in shapes]


# ----------------------------------------------------------------------------- 1. double backward
# Both directions where a call is cheap; the Triton interpreter takes seconds a call, so one there
# (the double-backward path is the same for every backend: ops.differentiable_layer_backward).
GRADGRAD_CASES = [(b, d) for b in CPU_BACKENDS for d in ((0, 1) if b != "triton" else (1,))]


@pytest.mark.parametrize("backend, direction", GRADGRAD_CASES)
def test_gradgradcheck_with_zoneout(backend, direction):
    tensors = _layer_inputs(hidden=2) if backend == "triton" else _layer_inputs()
    lengths = torch.tensor([3, 2])
    seed = torch.tensor(987654321)

    def layer(*ts):
        return ops.BACKENDS[backend].layer(*ts, lengths, seed, 0, direction, 0.4, 0.3, 0.2, 0, True)

    assert torch.autograd.gradgradcheck(layer, tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_penalty_reaches_every_weight(backend):
    """The issue's example: nn.LSTM gives weight_hh_l0 a gradient here; so must every backend,
    and the same one as the reference (the same masks)."""
    grads = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        model = zf.ZoneoutLSTM(2, 3, backend=name, dtype=torch.float64, zoneout_cell=0.3, zoneout_hidden=0.2)
        x = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(1)
        g, = torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
        (g ** 2).sum().backward()
        grads[name] = [p.grad for p in model.parameters()]
    for actual, expected in zip(grads[backend], grads["reference"]):
        assert actual is not None and actual.abs().sum() > 0
        assert_close(actual, expected)


# ----------------------------------------------------------------------------- 3. traceable oracle
def test_tensor_seed_draws_the_int_seed_masks():
    counters = torch.arange(300)
    for seed in (0, 7, 2**32 + 5, 2**63 - 1, 2**63 + 11, 2**64 - 1):
        as_tensor = torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)
        for a, b in zip(masks.philox4x32_10(seed, counters, 1, 2, 0), masks.philox4x32_10(as_tensor, counters, 1, 2, 0)):
            assert torch.equal(a, b), seed
    with pytest.raises(ValueError, match="seed"):
        masks.philox4x32_10(torch.tensor([1, 2]), counters, 0, 0, 0)


def test_export_of_the_reference_with_projection():
    """auto picks the reference for proj_size > 0; nn.LSTM with proj_size exports, so must this."""
    torch.manual_seed(0)
    model = zf.ZoneoutLSTM(3, 4, proj_size=2, zoneout_cell=0.3, zoneout_hidden=0.1).eval()
    x = torch.randn(5, 2, 3)
    exported = torch.export.export(model, (x,))
    for a, e in zip(torch.utils._pytree.tree_leaves(exported.module()(x)), torch.utils._pytree.tree_leaves(model(x))):
        assert torch.equal(a, e)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_of_the_reference_cell(training):
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(3, 4, backend="reference", zoneout_cell=0.3, zoneout_hidden=0.2).train(training)
    x = torch.randn(2, 3)
    torch._dynamo.reset()
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    actual = compiled(x)
    torch.manual_seed(5)
    expected = cell(x)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------- 2. torch's exceptions
def _torch_error_samples(module_info_func):
    from torch.testing._internal import common_modules

    for dtype in (torch.float32, torch.float64):
        for sample in module_info_func(None, "cpu", dtype, False, True):
            yield common_modules.ModuleErrorEnum, sample


@pytest.mark.parametrize("module, samples", [
    (zf.ZoneoutLSTM, "module_error_inputs_torch_nn_RNN_GRU"),      # nn.LSTM's test_errors samples
    (zf.ZoneoutLSTMCell, "module_error_inputs_torch_nn_LSTMCell"),
], ids=["ZoneoutLSTM", "ZoneoutLSTMCell"])
def test_torch_error_samples(module, samples):
    """PyTorch's own test_errors samples for nn.LSTM / nn.LSTMCell: the same exception type and a
    message matching torch's regex, at construction or in forward."""
    from torch.testing._internal import common_modules

    checked = 0
    for errors, sample in _torch_error_samples(getattr(common_modules, samples)):
        inputs = sample.module_error_input
        with pytest.raises(sample.error_type) as raised:
            model = module(*inputs.constructor_input.args, **inputs.constructor_input.kwargs)
            assert sample.error_on == errors.FORWARD_ERROR, "constructed without the expected error"
            model(*inputs.forward_input.args, **inputs.forward_input.kwargs)
        assert re.search(sample.error_regex, str(raised.value)), (sample.error_regex, str(raised.value))
        checked += 1
    assert checked >= 8


# ----------------------------------------------------------------------------- 6. autocast
def _autocast_runs(model_fn, x, device_type, dtype):
    """(output under autocast, its parameters' gradient dtypes) of model_fn's module fed by a Linear."""
    torch.manual_seed(0)
    linear = nn.Linear(x.shape[-1], 3).to(x.device)
    model = model_fn().to(x.device)
    with torch.autocast(device_type, dtype=dtype):
        features = linear(x)
        assert features.dtype == dtype
        out = model(features)
    first = out[0]
    first.float().sum().backward()
    return first, model


@pytest.mark.parametrize("kind", ["lstm", "cell"])
def test_autocast_cpu_bfloat16_like_nn(kind):
    """Under torch.autocast("cpu", bfloat16) a Linear's bf16 output feeds the layer, which runs in
    bf16 and returns bf16 as nn.LSTM does; float32 parameters get float32 gradients; and its
    error against a float64 run is within the bf16 three-way bound of nn's own."""
    from zoneout_fused.testing import assert_three_way

    x = torch.randn(6, 2, 4) if kind == "lstm" else torch.randn(2, 4)
    make = {"lstm": (lambda: zf.ZoneoutLSTM(3, 5, num_layers=2), lambda: nn.LSTM(3, 5, num_layers=2)),
            "cell": (lambda: zf.ZoneoutLSTMCell(3, 5), lambda: nn.LSTMCell(3, 5))}[kind]
    ours, model = _autocast_runs(make[0], x, "cpu", torch.bfloat16)
    theirs, nn_model = _autocast_runs(make[1], x, "cpu", torch.bfloat16)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    # The same model in float64, without autocast: both bf16 runs are judged against it.
    torch.manual_seed(0)
    linear = nn.Linear(x.shape[-1], 3).double()
    exact = make[1]().double()
    exact.load_state_dict(nn_model.state_dict())
    with torch.no_grad():
        expected = exact(linear(x.double()))[0]
    assert_three_way(ours.detach(), theirs.detach(), expected, f"{kind} output")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_autocast_cuda_runs_the_gpu_backends_in_the_autocast_dtype(dtype, backend):
    if backend != "auto" and backend not in zf.available_backends("cuda"):
        pytest.skip(f"{backend} not built here")
    x = torch.randn(6, 2, 4, device="cuda")
    out, model = _autocast_runs(lambda: zf.ZoneoutLSTM(3, 8, zoneout_cell=0.5, zoneout_hidden=0.05, backend=backend),
                                x, "cuda", dtype)
    assert out.dtype == dtype
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


# ----------------------------------------------------------------------------- 5. ONNX
class _Decoder(nn.Module):
    """A Tacotron-style decoder: two zoneout cells stepped over teacher-forced frames."""

    def __init__(self):
        super().__init__()
        self.cell1 = zf.ZoneoutLSTMCell(6, 8, zoneout_cell=0.1, zoneout_hidden=0.1)
        self.cell2 = zf.ZoneoutLSTMCell(8, 8, zoneout_cell=0.1, zoneout_hidden=0.1)
        self.project = nn.Linear(8, 6)

    def forward(self, frames):
        state1 = state2 = None
        outputs = []
        for t in range(frames.shape[0]):
            state1 = self.cell1(frames[t], state1)
            state2 = self.cell2(state1[0], state2)
            outputs.append(self.project(state2[0]))
        return torch.stack(outputs)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = zf.ZoneoutLSTM(6, 8, num_layers=2, bidirectional=True, zoneout_cell=0.5, zoneout_hidden=0.05)

    def forward(self, x):
        return self.lstm(x)[0]


class _GruEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = zf.ZoneoutGRU(6, 8, num_layers=2, bidirectional=True, zoneout_hidden=0.1)
        self.rnn = zf.ZoneoutRNN(16, 5, nonlinearity="relu", zoneout_hidden=0.1)

    def forward(self, x):
        return self.rnn(self.gru(x)[0])[0]


@pytest.mark.parametrize("model_cls", [_Decoder, _Encoder, _GruEncoder],
                         ids=["decoder-cells", "bidirectional-lstm", "gru-then-relu-rnn"])
def test_onnx_export_runs_in_onnxruntime(model_cls, tmp_path):
    """Eval-mode models export with torch.onnx.export (the reference's plain ops are traced, whatever
    the backend) and onnxruntime gives the eager outputs: within the float32 three-way bound."""
    import onnxruntime  # README's test command installs onnx, onnxscript and onnxruntime

    from zoneout_fused.testing import assert_three_way

    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(4, 2, 6)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(str(path))
    actual = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        same_dtype = model(x)
        exact = model.double()(x.double())
    assert_three_way(actual, same_dtype, exact, "onnxruntime output")


# ----------------------------------------------------------------------------- 4. TorchScript
@pytest.mark.parametrize("mask_mode", ["independent", "shared", "timestep"])
def test_cells_script_save_and_load(mask_mode, tmp_path):
    """torch.jit.script of ZoneoutLSTMCell, as of nn.LSTMCell: the scripted cell (the reference step
    in plain ops) gives the eager cell's outputs, with the same masks for the same seed in training,
    and survives torch.jit.save / load."""
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(3, 5, zoneout_cell=0.4, zoneout_hidden=0.3, recurrent_dropout=0.2,
                              mask_mode=mask_mode, dtype=torch.float64)
    scripted = torch.jit.script(cell)
    torch.jit.save(scripted, str(tmp_path / "cell.pt"))
    loaded = torch.jit.load(str(tmp_path / "cell.pt"))
    x, hx = torch.randn(4, 3, dtype=torch.float64), (torch.randn(4, 5, dtype=torch.float64),) * 2
    for training in (True, False):
        outputs = []
        for module in (cell, scripted, loaded):
            module.train(training)
            torch.manual_seed(7)
            outputs.append(module(x, hx))
        for other in outputs[1:]:
            for a, e in zip(other, outputs[0]):
                assert_close(a, e)
    unbatched = scripted(x[0], (hx[0][0], hx[1][0]))
    assert unbatched[0].shape == (5,) and unbatched[1].shape == (5,)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cells_see_parametrized_and_functionally_swapped_weights(kind):
    """The cells read their parameters without nn.Module's __getattr__ (a fixed cost per step), but
    a parametrization (weight_norm) and torch.func.functional_call still reach them, as in torch's
    cells: the results equal nn.LSTMCell / nn.GRUCell given the same effective weights."""
    torch.manual_seed(0)
    zoneout_cls, torch_cls = {"lstm": (zf.ZoneoutLSTMCell, nn.LSTMCell), "gru": (zf.ZoneoutGRUCell, nn.GRUCell)}[kind]
    cell, plain = zoneout_cls(3, 4, dtype=torch.float64), torch_cls(3, 4, dtype=torch.float64)
    plain.load_state_dict(cell.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    nn.utils.parametrizations.weight_norm(cell, "weight_hh")
    nn.utils.parametrizations.weight_norm(plain, "weight_hh")
    with torch.no_grad():  # a norm other than the initial one, so the parametrization changes the weight
        cell.parametrizations.weight_hh.original0.mul_(2.0)
        plain.parametrizations.weight_hh.original0.mul_(2.0)
    assert_close(cell(x)[0] if kind == "lstm" else cell(x), plain(x)[0] if kind == "lstm" else plain(x),
                 torch.float64)
    swapped = {"weight_ih": torch.randn(cell.weight_ih.shape, dtype=torch.float64),
               "bias_ih": torch.randn(cell.bias_ih.shape, dtype=torch.float64)}
    ours = torch.func.functional_call(cell, swapped, (x,))
    theirs = torch.func.functional_call(plain, swapped, (x,))
    assert_close(ours[0] if kind == "lstm" else ours, theirs[0] if kind == "lstm" else theirs, torch.float64)


def test_cell_bias_swapped_in_per_call_under_no_grad_is_never_stale():
    """The cell keeps b_ih + b_hh between no-grad calls. A bias swapped in for one call, then freed,
    can leave the next one at its address with version 0 again: each must still be used. (NumPy
    memory rewritten in place makes that happen deterministically.)"""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    cell, plain = zf.ZoneoutLSTMCell(3, 4, dtype=torch.float64), nn.LSTMCell(3, 4, dtype=torch.float64)
    plain.load_state_dict(cell.state_dict())
    x = torch.randn(2, 3, dtype=torch.float64)
    memory = np.zeros(16)
    with torch.no_grad():
        for step in range(3):
            memory[:] = step  # same address, a new tensor at version 0 each step
            swapped = {"bias_ih": torch.from_numpy(memory)}
            ours = torch.func.functional_call(cell, swapped, (x,))[0]
            theirs = torch.func.functional_call(plain, swapped, (x,))[0]
            assert_close(ours, theirs, torch.float64)
