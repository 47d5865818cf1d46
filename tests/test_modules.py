"""ZoneoutLSTM / ZoneoutLSTMCell: API, state_dicts, backend selection, bad input, determinism,
and every fused backend available on this machine against the reference through the modules."""
import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import zoneout_fused as zf
from zoneout_fused import ops
from zoneout_fused.testing import assert_all_three_way
from conftest import assert_close

# CI sets this so that a backend that failed to build fails the tests instead of skipping them.
REQUIRED = {name for name in os.environ.get("ZONEOUT_FUSED_REQUIRE_BACKENDS", "").split(",") if name}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = [name for name in ("cpu", "triton", "cuda")]


def _backend_or_skip(name, device=DEVICE):
    reason = ops.BACKENDS[name].unavailable_reason(torch.device(device))
    if reason is not None:
        if name in REQUIRED:
            pytest.fail(f"backend {name!r} is required here but unavailable: {reason}")
        pytest.skip(reason)


# ----------------------------------------------------------------------------- API
def test_parameters_and_state_dict_match_nn_lstm_both_ways():
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=3)
    lstm, model = nn.LSTM(4, 5, **kwargs), zf.ZoneoutLSTM(4, 5, **kwargs, zoneout_cell=0.5)
    assert [n for n, _ in lstm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(lstm.state_dict()) == list(model.state_dict())
    model.load_state_dict(lstm.state_dict())
    lstm.load_state_dict(model.state_dict())
    for (name, a), (_, b) in zip(lstm.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name


def test_same_initialisation_as_nn_lstm():
    torch.manual_seed(3)
    lstm = nn.LSTM(4, 5, num_layers=2)
    torch.manual_seed(3)
    model = zf.ZoneoutLSTM(4, 5, num_layers=2)
    for a, b in zip(lstm.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_cell_state_dict_matches_nn_lstm_cell():
    cell, model = nn.LSTMCell(4, 5), zf.ZoneoutLSTMCell(4, 5, zoneout_hidden=0.1)
    assert list(cell.state_dict()) == list(model.state_dict())
    model.load_state_dict(cell.state_dict())
    cell.load_state_dict(model.state_dict())


def test_from_lstm_copies_configuration_and_weights():
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True, dropout=0.1, bidirectional=True).eval()
    model = zf.ZoneoutLSTM.from_lstm(lstm, zoneout_cell=0.25, zoneout_hidden=0.05)
    assert (model.num_layers, model.batch_first, model.dropout, model.bidirectional) == (2, True, 0.1, True)
    assert not model.training and model.zoneout_cell == 0.25
    for a, b in zip(lstm.parameters(), model.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with pytest.raises(TypeError, match="lstm"):
        zf.ZoneoutLSTM.from_lstm(nn.GRU(3, 4))


def test_static_mode_keeps_its_key_in_the_state_dict():
    model = zf.ZoneoutLSTM(3, 4, mask_mode="static", zoneout_cell=0.5, zoneout_hidden=0.5)
    assert "static_seed" in model.state_dict()
    other = zf.ZoneoutLSTM(3, 4, mask_mode="static", zoneout_cell=0.5, zoneout_hidden=0.5)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.static_seed, model.static_seed)
    key = model.static_seed.clone()
    model.load_state_dict(nn.LSTM(3, 4).state_dict())  # an nn.LSTM state_dict has no key: keep ours
    assert torch.equal(model.static_seed, key)
    # the same mask for every example and every call
    x = torch.randn(6, 1, 3).expand(6, 5, 3)
    out1, _ = model(x)
    out2, _ = model(x)
    assert torch.equal(out1, out2)
    assert torch.equal(out1, out1[:, :1].expand_as(out1))


def test_repr_names_the_zoneout_settings():
    text = repr(zf.ZoneoutLSTM(3, 4, zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode="shared"))
    assert "zoneout_cell=0.5" in text and "mask_mode='shared'" in text


def test_available_backends():
    names = zf.available_backends("cpu")
    assert "reference" in names and "cuda" not in names
    assert set(names) <= set(ops.BACKENDS)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", ["zoneout_cell", "zoneout_hidden", "recurrent_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), float("inf")])
def test_probabilities_out_of_range(name, value):
    with pytest.raises(ValueError, match=name):
        zf.ZoneoutLSTM(3, 4, **{name: value})
    with pytest.raises(ValueError, match=name):
        zf.ZoneoutLSTMCell(3, 4, **{name: value})


@pytest.mark.parametrize("name", ["zoneout_cell", "zoneout_hidden", "recurrent_dropout"])
def test_probabilities_of_wrong_type(name):
    for value in ("0.5", True, None, torch.tensor(0.5)):
        with pytest.raises(TypeError, match=name):
            zf.ZoneoutLSTM(3, 4, **{name: value})


def test_recurrent_dropout_of_one_is_rejected_and_zoneout_of_one_accepted():
    with pytest.raises(ValueError, match=r"recurrent_dropout must be in \[0, 1\)"):
        zf.ZoneoutLSTM(3, 4, recurrent_dropout=1.0)
    zf.ZoneoutLSTM(3, 4, zoneout_cell=1, zoneout_hidden=1.0)


def test_reassigned_options_are_checked_when_assigned():
    for model in (zf.ZoneoutLSTM(3, 4), zf.ZoneoutLSTMCell(3, 4)):
        with pytest.raises(ValueError, match="zoneout_hidden"):
            model.zoneout_hidden = 2.0
        with pytest.raises(TypeError, match="recurrent_dropout"):
            model.recurrent_dropout = "0.1"
        with pytest.raises(ValueError, match="mask_mode"):
            model.mask_mode = "sometimes"
        with pytest.raises(ValueError, match="backend"):
            model.backend = "tpu"
        model.zoneout_cell = 1  # a valid value is stored as a float
        assert model.zoneout_cell == 1.0 and isinstance(model.zoneout_cell, float)
        assert model.zoneout_hidden == 0.0 and model.mask_mode == "independent"


def test_unknown_mode_and_backend():
    with pytest.raises(ValueError, match="mask_mode"):
        zf.ZoneoutLSTM(3, 4, mask_mode="sometimes")
    with pytest.raises(ValueError, match="backend"):
        zf.ZoneoutLSTM(3, 4, backend="tpu")
    with pytest.raises(ValueError, match="mask_mode='static'"):
        zf.ZoneoutLSTMCell(3, 4, mask_mode="static")


def test_unavailable_backend_says_why():
    model = zf.ZoneoutLSTM(3, 4, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: .*CUDA tensors"):
        model(torch.randn(2, 1, 3))


def test_triton_on_cpu_without_interpreter_says_how(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in ops.BACKENDS["triton"].unavailable_reason(torch.device("cpu"))


@pytest.mark.parametrize("module", ["lstm", "cell"])
def test_wrong_inputs_raise_what_nn_raises(module):
    """Every bad input nn.LSTM / nn.LSTMCell reject raises the same exception type here, with a
    message naming the same thing (torch's own error samples: tests/test_dropin.py)."""
    if module == "lstm":
        ours, theirs = zf.ZoneoutLSTM(3, 4), nn.LSTM(3, 4)
        good, state = torch.randn(2, 1, 3), torch.zeros(1, 1, 4)
        bad_inputs = {"input_size": (torch.randn(2, 1, 5),), "rank": (torch.randn(1, 1, 1, 3),),
                      "dtype": (good.double(),), "integer dtype": (good.to(torch.int64),),
                      "state rank": (good, (torch.zeros(4), torch.zeros(4))),
                      "state size": (good, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
                      "cell state size": (good, (state, torch.zeros(1, 1, 5))),
                      "no steps": (torch.randn(0, 1, 3),)}
    else:
        ours, theirs = zf.ZoneoutLSTMCell(3, 4), nn.LSTMCell(3, 4)
        good, state = torch.randn(2, 3), torch.zeros(2, 4)
        bad_inputs = {"input_size": (torch.randn(2, 5),), "rank": (torch.randn(1, 1, 3),),
                      "dtype": (good.double(),), "state rank": (good, (torch.zeros(1, 2, 4), state)),
                      "state batch": (good, (torch.zeros(3, 4), torch.zeros(3, 4))),
                      "state size": (good, (torch.zeros(2, 5), state)), "one state": (good, (state,)),
                      "state dtype": (good, (state.double(), state))}
    theirs.load_state_dict(ours.state_dict())
    for what, args in bad_inputs.items():
        with pytest.raises(Exception) as expected:
            theirs(*args)
        with pytest.raises(Exception) as actual:
            ours(*args)
        assert type(actual.value) is type(expected.value), (what, actual.value, expected.value)


@pytest.mark.parametrize("module", ["lstm", "cell"])
def test_wrong_inputs_name_the_argument(module):
    model = zf.ZoneoutLSTM(3, 4) if module == "lstm" else zf.ZoneoutLSTMCell(3, 4)
    good = torch.randn(2, 1, 3) if module == "lstm" else torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="input_size"):
        model(torch.randn(*good.shape[:-1], 5))
    with pytest.raises(ValueError, match="Expected input to be"):
        model(torch.randn(1, 1, 1, 3))
    with pytest.raises((ValueError, RuntimeError), match="input"):
        model(good.double())
    with pytest.raises(TypeError, match="input must be a Tensor"):
        model(good.tolist())
    with pytest.raises(TypeError, match="hx"):
        model(good, torch.zeros(4))
    bad_state = torch.zeros(1, 2, 4) if module == "lstm" else torch.zeros(3, 4)
    with pytest.raises(RuntimeError, match=r"hidden\[?0\]?"):
        model(good, (bad_state, bad_state))
    state = torch.zeros(1, 1, 4) if module == "lstm" else torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match=r"hx\[0\] \(h_0\) has dtype torch.float64"):
        model(good, (state.double(), state))


def test_lstm_state_shapes_checked():
    model = zf.ZoneoutLSTM(3, 4, num_layers=2, proj_size=2)
    x = torch.randn(5, 3, 3)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 3, 2\), got \[2, 3, 4\]"):
        model(x, (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 3, 4\), got \[2, 3, 2\]"):
        model(x, (torch.zeros(2, 3, 2), torch.zeros(2, 3, 2)))
    with pytest.raises(RuntimeError, match="sequence length"):
        model(torch.randn(0, 3, 3))


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bits_new_seed_new_masks():
    model = zf.ZoneoutLSTM(3, 8, num_layers=2, zoneout_cell=0.5, zoneout_hidden=0.3, recurrent_dropout=0.2)
    x = torch.randn(6, 4, 3)
    torch.manual_seed(5)
    a = model(x)[0]
    torch.manual_seed(5)
    b = model(x)[0]
    c = model(x)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_no_zoneout_draws_no_seed():
    """z = 0 and p = 0 consume no random numbers, so dropout between layers matches nn.LSTM's."""
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=3, dropout=0.5, dtype=torch.float64)
    model = zf.ZoneoutLSTM.from_lstm(lstm, backend="reference")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.manual_seed(1)
    expected = lstm(x)[0]
    torch.manual_seed(1)
    actual = model(x)[0]
    assert_close(actual, expected)


# ----------------------------------------------------------------------------- fused backends
def _pair(backend, dtype, **kwargs):
    torch.manual_seed(0)
    reference = zf.ZoneoutLSTM(backend="reference", dtype=dtype, device=DEVICE, **kwargs)
    fused = zf.ZoneoutLSTM(backend=backend, dtype=dtype, device=DEVICE, **kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _with_float64_copy(fused, reference):
    """(fused, reference), plus the reference in float64 when they compute in a rounding dtype."""
    models = (fused, reference)
    if next(reference.parameters()).dtype != torch.float64:
        models += (copy.deepcopy(reference).double(),)
    return models


def _assert_agree(results, names):
    """results: per model of _with_float64_copy, its tensors in the order of names."""
    if len(results) == 2:  # float64: the reference is the truth
        for name, a, e in zip(names, *results):
            assert_close(a, e, torch.float64, msg=name)
    else:
        assert_all_three_way(*results, names)


MODULE_CASES = [
    dict(zoneout_cell=0.5, zoneout_hidden=0.05),
    dict(zoneout_cell=0.3, zoneout_hidden=0.3, mask_mode="shared", num_layers=2, bidirectional=True),
    dict(zoneout_cell=0.2, zoneout_hidden=0.4, mask_mode="timestep", recurrent_dropout=0.25, batch_first=True),
    dict(zoneout_cell=0.5, zoneout_hidden=0.5, mask_mode="static", num_layers=2, bias=False),
    dict(recurrent_dropout=0.3, bidirectional=True),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_module_equals_reference(backend, case, packed, training):
    _backend_or_skip(backend)
    dtype = torch.float64 if backend != "triton" or DEVICE == "cpu" else torch.float32
    reference, fused = _pair(backend, dtype, input_size=3, hidden_size=5, **case)
    reference.train(training), fused.train(training)
    batch_first = case.get("batch_first", False)
    x = torch.randn(*((3, 4) if batch_first else (4, 3)), 3, dtype=dtype, device=DEVICE)  # T=4, B=3
    directions = 2 if case.get("bidirectional") else 1
    hx = tuple(torch.randn(case.get("num_layers", 1) * directions, 3, 5, dtype=dtype, device=DEVICE)
               for _ in range(2))
    results = []
    for model in _with_float64_copy(fused, reference):
        model.train(training)
        x_ = x.to(next(model.parameters()).dtype).clone().requires_grad_()
        hx_ = tuple(h.to(x_.dtype).clone().requires_grad_() for h in hx)
        inputs = pack_padded_sequence(x_, torch.tensor([4, 2, 3]), enforce_sorted=False,
                                      batch_first=batch_first) if packed else x_
        torch.manual_seed(11)
        output, (h_n, c_n) = model(inputs, hx_)
        output = output.data if packed else output
        weights = torch.linspace(-1, 1, output.numel(), dtype=dtype, device=DEVICE).to(output.dtype)
        loss = (output * weights.view_as(output)).sum()
        (loss + (h_n * 0.5).sum() + (c_n * 0.25).sum()).backward()
        results.append([t.detach() for t in [output, h_n, c_n, x_.grad, *(h.grad for h in hx_),
                                             *(p.grad for p in model.parameters())]])
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [n for n, _ in reference.named_parameters()]
    _assert_agree(results, names)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("unbatched", [False, True])
def test_fused_cell_equals_reference(backend, unbatched):
    _backend_or_skip(backend)
    dtype = torch.float64 if backend != "triton" or DEVICE == "cpu" else torch.float32
    torch.manual_seed(0)
    cells = [zf.ZoneoutLSTMCell(3, 6, zoneout_cell=0.5, zoneout_hidden=0.3, backend=name, dtype=dtype,
                                device=DEVICE) for name in ("reference", backend)]
    cells[1].load_state_dict(cells[0].state_dict())
    x = torch.randn(*(() if unbatched else (4,)), 3, dtype=dtype, device=DEVICE)
    outputs = []
    for cell in _with_float64_copy(cells[1], cells[0]):
        torch.manual_seed(2)
        outputs.append([t.detach() for t in cell(x.to(cell.weight_ih.dtype))])
    _assert_agree(outputs, ["h", "c"])


def test_auto_picks_the_fastest_built_backend():
    picked = ops.resolve_backend("auto", torch.device("cpu"), torch.float32)
    assert picked.name == zf.available_backends("cpu")[0]
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32, projection=True).name == "reference"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float16).name == "reference"


def test_explicit_backend_rejects_what_it_cannot_do():
    _backend_or_skip("cpu", "cpu")
    with pytest.raises(TypeError, match="dtype"):
        zf.ZoneoutLSTM(3, 4, backend="cpu", dtype=torch.bfloat16)(torch.randn(2, 1, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="proj_size"):
        zf.ZoneoutLSTM(3, 4, proj_size=2, backend="cpu")(torch.randn(2, 1, 3))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_compile_fullgraph(backend):
    if backend != "reference":
        _backend_or_skip(backend, "cpu")
    torch.manual_seed(0)
    model = zf.ZoneoutLSTM(3, 5, num_layers=2, zoneout_cell=0.5, zoneout_hidden=0.05, backend=backend,
                           dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=(backend != "reference"))
    model.eval()
    expected = model(x)[0]
    actual = compiled(x)[0]
    assert_close(actual, expected)
    actual.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", FUSED)
def test_no_grad_calls_skip_autograd_with_the_same_bits(backend):
    """Without anything to differentiate the op runs below autograd (a cell step's fixed cost):
    the same bits as the recorded call, and no graph."""
    _backend_or_skip(backend)
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(3, 5, zoneout_cell=0.3, zoneout_hidden=0.2, backend=backend, device=DEVICE)
    x = torch.randn(2, 3, device=DEVICE)
    torch.manual_seed(1)
    recorded = cell(x)
    with torch.no_grad():
        torch.manual_seed(1)
        free = cell(x)
    assert all(r.grad_fn is not None for r in recorded) and all(f.grad_fn is None for f in free)
    assert all(torch.equal(r, f) for r, f in zip(recorded, free))


# The cell modules on the cpu backend step in one C++ call (csrc/cell_step.h) and fall back to
# their Python path for whatever that call declines. Both must give the same bits.
_CELLS = {"lstm": (zf.ZoneoutLSTMCell, dict(zoneout_cell=0.3, zoneout_hidden=0.2, recurrent_dropout=0.1), 2),
          "gru": (zf.ZoneoutGRUCell, dict(zoneout_hidden=0.3, recurrent_dropout=0.2), 1),
          "rnn_tanh": (zf.ZoneoutRNNCell, dict(zoneout_hidden=0.3), 1)}


def _counting_cell_step(monkeypatch):
    """Counts the calls of the one-call step that it took (returned a result) and declined."""
    step = ops.cpu_cell_step()
    counts = {"taken": 0, "declined": 0}

    def counted(*args):
        result = step(*args)
        counts["declined" if result is None else "taken"] += 1
        return result

    monkeypatch.setattr(ops, "_CPU_CELL_STEP", [counted])
    return counts


def _step_results(cell, x, states, dtype):
    """Outputs of two steps (given states, then none), the gradients of a weighted sum of them with
    respect to the input, states and parameters, and the generator's next draw."""
    outputs = []
    for hx in (states[0] if len(states) == 1 else tuple(states), None):
        result = cell(x, hx)
        outputs += list(result) if isinstance(result, tuple) else [result]
    loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=dtype).view_as(t)).sum() for t in outputs)
    leaves = [t for t in (x, *states, *cell.parameters()) if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves) if torch.is_grad_enabled() else []
    return [t.detach() for t in outputs] + list(grads) + [torch.randint(0, 2**62, (4,))]


@pytest.mark.parametrize("kind", list(_CELLS))
@pytest.mark.parametrize("training", [True, False])
def test_cpu_cell_step_in_one_call_has_the_python_paths_bits(monkeypatch, kind, training):
    """The same outputs, gradients and generator state after (the seed drawn as torch.randint
    draws it) as the module's Python path, batched and not, float32 and float64, with and without
    states, with grad (inputs and parameters differentiated) and under no_grad."""
    _backend_or_skip("cpu", "cpu")
    cls, options, state_count = _CELLS[kind]
    counts = _counting_cell_step(monkeypatch)
    for batched, dtype, grad in [(b, d, g) for b in (True, False) for d in (torch.float32, torch.float64)
                                 for g in (True, False)]:
        torch.manual_seed(0)
        cell = cls(7, 5, backend="cpu", dtype=dtype, **options).train(training)
        lead = (3,) if batched else ()
        x = torch.randn(*lead, 7, dtype=dtype, requires_grad=grad)
        states = [torch.randn(*lead, 5, dtype=dtype, requires_grad=grad) for _ in range(state_count)]
        results = []
        for one_call in (True, False):
            cell.__dict__["_steps_on_cpu"] = one_call
            torch.manual_seed(5)
            taken = counts["taken"]
            with torch.set_grad_enabled(grad):
                results.append(_step_results(cell, x, states, dtype))
            assert counts["taken"] - taken == (2 if one_call else 0)
        assert len(results[0]) == len(results[1])
        for index, (fused, python) in enumerate(zip(*results)):
            assert torch.equal(fused, python), (kind, batched, dtype, grad, index)
    assert counts["declined"] == 0


class _RecordingMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def test_cpu_cell_step_declines_what_the_python_path_must_handle(monkeypatch):
    """Autocast, a torch-function mode, a tensor subclass, the JIT tracer, inputs of the wrong shape
    or dtype and weights of the wrong shape are left to the Python path (which raises torch's errors,
    or the op's, for the bad ones)."""
    _backend_or_skip("cpu", "cpu")
    counts = _counting_cell_step(monkeypatch)
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(4, 3, zoneout_cell=0.2, zoneout_hidden=0.1)  # (auto: the cpu backend here)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    cell(x, (h, h))
    assert counts == {"taken": 1, "declined": 0}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cell(x)[0].dtype == torch.bfloat16
    with _RecordingMode():
        cell(x)
    cell(x.as_subclass(_Subclass))
    torch.jit.trace(cell, (x,), check_trace=False)
    assert counts == {"taken": 1, "declined": 4}
    with pytest.raises(RuntimeError, match="input has inconsistent input_size"):
        cell(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="hidden0 has inconsistent hidden_size"):
        cell(x, (torch.randn(2, 4), h))
    with pytest.raises(RuntimeError, match="Input batch size 2 doesn't match hidden1 batch size 3"):
        cell(x, (h, torch.randn(3, 3)))
    with pytest.raises(RuntimeError, match="dtype"):
        cell(x.double())
    with pytest.raises(RuntimeError, match="two hidden states"):
        cell(x, (h, h, h))
    cell.weight_hh = nn.Parameter(torch.randn(12, 4))  # H = 3 elsewhere: the op's own check fires
    with pytest.raises(RuntimeError, match="w_hh"):
        cell(x)
    assert counts == {"taken": 1, "declined": 10}


_INFERENCE_THEN_RECORDED = """
import torch, zoneout_fused as zf
for cell in (zf.ZoneoutLSTMCell(3, 4, zoneout_cell=0.2, zoneout_hidden=0.1).eval(),
             zf.ZoneoutGRUCell(3, 4, zoneout_hidden=0.1).eval()):
    for bias in (cell.bias_ih, cell.bias_hh):
        bias.requires_grad_(False)
    x = torch.randn(2, 3)
    with torch.inference_mode():
        expected = cell(x)
    recorded = cell(x.clone().requires_grad_())
    expected, recorded = [r if isinstance(r, tuple) else (r,) for r in (expected, recorded)]
    recorded[0].sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(expected, recorded))
print("ok")
"""


def test_steps_under_inference_mode_leave_nothing_that_autograd_cannot_save():
    """A cell stepped first under torch.inference_mode, then recorded by autograd (frozen biases, an
    input that needs its gradient): nothing made in inference mode reaches the recorded step, whose
    node would fail to save it: the one-call step's shared seed of evaluation steps (made on a
    process's first such step, hence a fresh interpreter) and the cell's kept bias sum."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _INFERENCE_THEN_RECORDED], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["ok"], result.stderr[-2000:]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cell_bias_sum_follows_every_change_of_the_biases(backend):
    """Under no_grad the cell keeps b_ih + b_hh between calls: an in-place update, a loaded
    state_dict or a new dtype must still reach the next step (as for nn.LSTMCell)."""
    _backend_or_skip(backend, "cpu")
    torch.manual_seed(0)
    cell = zf.ZoneoutLSTMCell(3, 4, zoneout_cell=0.2, zoneout_hidden=0.3, backend=backend,
                              dtype=torch.float64).eval()
    plain = nn.LSTMCell(3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad():
        for change in (lambda: None, lambda: cell.bias_hh.add_(0.5), lambda: cell.load_state_dict(plain.state_dict()),
                       lambda: cell.bias_ih.mul_(-2.0)):
            change()
            h, c = cell(x)
            plain.load_state_dict(cell.state_dict())
            h_plain, c_plain = plain(x)
            # evaluation: z * previous (zero) + (1 - z) * nn.LSTMCell's step
            assert_close(c, 0.8 * c_plain)
            assert_close(h, 0.7 * h_plain)
        cell.float()
        h, _ = cell(x.float())
        assert h.dtype == torch.float32


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind", ["lstm", "lstm-cell", "gru"])
def test_torch_compile_does_not_compile_again(monkeypatch, backend, kind):
    """The module loads its backend's op when built (and when moved), so the first call under
    torch.compile finds it loaded, as it does the backend caches: dynamo compiles each frame once.
    Loaded inside the first trace, they made the guards fail and the second call compile again."""
    if backend != "reference":
        _backend_or_skip(backend, "cpu")
    from torch._dynamo.testing import CompileCounter

    monkeypatch.setattr(ops.BACKENDS[backend], "_layer", None)  # as in a fresh process
    monkeypatch.setattr(ops.BACKENDS[backend], "_gru_rnn_layer", None)
    monkeypatch.setattr(ops, "_RESOLVED", {})
    torch.manual_seed(0)
    options = dict(zoneout_hidden=0.1, backend=backend)
    model = {"lstm": lambda: zf.ZoneoutLSTM(3, 5, zoneout_cell=0.5, **options),
             "lstm-cell": lambda: zf.ZoneoutLSTMCell(3, 5, zoneout_cell=0.5, **options),
             "gru": lambda: zf.ZoneoutGRU(3, 5, **options)}[kind]()
    x = torch.randn(4, 2, 3) if kind != "lstm-cell" else torch.randn(2, 3)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    compiled(x)
    frames = counter.frame_count
    assert frames >= 1
    for _ in range(2):
        compiled(x)
    assert counter.frame_count == frames
    torch._dynamo.reset()
