"""What the GPU backends need before their first real run, checked where CI can (CPU, Triton
interpreter) and, on a GPU, for real: no host-to-device copy or stream sync per call."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import zoneout_fused as zf
from zoneout_fused import ops
from zoneout_fused.testing import assert_all_three_way
from conftest import forbid_host_sync

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = ops.BACKENDS["triton"].unavailable_reason(torch.device(DEVICE)) is None


@pytest.mark.skipif(not TRITON, reason="the Triton backend cannot run here")
def test_triton_params_are_made_once_not_per_call():
    """The kernels' [z_c, z_h, p, scale] buffer is cached per (device, values): a second forward and
    backward with the same settings copies nothing from the host."""
    from zoneout_fused.triton import layer as triton_layer

    model = zf.ZoneoutLSTM(3, 5, zoneout_cell=0.37, zoneout_hidden=0.11, backend="triton", device=DEVICE)
    x = torch.randn(4, 2, 3, device=DEVICE)
    model(x)[0].sum().backward()
    cached = dict(triton_layer._PARAMS_CACHE)
    created = []
    real_tensor = torch.tensor

    def counting_tensor(*args, **kwargs):
        created.append(kwargs.get("device"))
        return real_tensor(*args, **kwargs)

    triton_layer.torch.tensor = counting_tensor
    try:
        model(x)[0].sum().backward()
    finally:
        triton_layer.torch.tensor = real_tensor
    assert created == [] and triton_layer._PARAMS_CACHE == cached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="stream syncs can only be caught on a GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_stream_sync_in_forward_and_backward(backend, packed, cell):
    """torch.cuda.set_sync_debug_mode('error') raises on any call that waits for the GPU."""
    if backend not in zf.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    common = dict(num_layers=2, bidirectional=True, zoneout_hidden=0.05, backend=backend, device="cuda")
    model = {"lstm": lambda: zf.ZoneoutLSTM(8, 16, zoneout_cell=0.5, **common),
             "gru": lambda: zf.ZoneoutGRU(8, 16, recurrent_dropout=0.1, **common),
             "rnn": lambda: zf.ZoneoutRNN(8, 16, **common)}[cell]()
    x = torch.randn(6, 3, 8, device="cuda", requires_grad=True)
    inputs = pack_padded_sequence(x, torch.tensor([6, 4, 2]), enforce_sorted=False) if packed else x
    model(inputs)  # first call: compiles kernels and fills caches
    with forbid_host_sync():
        output, state = model(inputs)
        data = output.data if packed else output
        states = state if isinstance(state, tuple) else (state,)
        (data.sum() + sum(s.sum() for s in states)).backward()


def test_validation_kit_dry_run_without_a_gpu(tmp_path):
    """benchmarks/gpu/validate.sh degrades to a clear message (exit 0) where torch sees no GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kit runs for real: benchmarks/gpu/validate.sh")
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "validate.sh")], cwd=ROOT,
                            env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA GPU" in result.stdout
    assert (tmp_path / "environment.txt").read_text().strip()


@pytest.mark.skipif(not TRITON, reason="the Triton backend cannot run here")
def test_float32_products_follow_torch_tf32_policy():
    """float32 recurrent products use TF32 exactly where torch lets cuBLAS / cuDNN use it."""
    from zoneout_fused.triton.layer import float32_dot_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert float32_dot_precision(torch.float32, cuda) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert float32_dot_precision(torch.float32, cuda) == "tf32"
        assert float32_dot_precision(torch.float64, cuda) == "ieee"  # never for float64
        assert float32_dot_precision(torch.float32, cpu) == "ieee"  # the interpreter
    finally:
        torch.set_float32_matmul_precision(previous)


# ----------------------------------------------------------------------------- constants, bit for bit
def _probe_cell_state(backend, probe, value, c_prev, training):
    """One step of one layer whose gates are exactly i = 1, f = 0, g = 1 (or 0): infinite biases,
    zero weights. Then c = scale (recurrent dropout, training, every unit kept) or c = z * c_prev +
    (1 - z) * (i * g) (evaluation): the layer's constant itself, bit for bit."""
    hidden = 8
    g_bias = float("inf") if probe != "z" else 0.0
    bias = torch.tensor([float("inf")] * hidden + [-float("inf")] * hidden + [g_bias] * hidden + [0.0] * hidden)
    zeros = dict(x=torch.zeros(1, 1, 2), w_ih=torch.zeros(4 * hidden, 2), w_hh=torch.zeros(4 * hidden, hidden))
    z, p = (value, 0.0) if probe != "scale" else (0.0, value)
    _, c_n = ops.BACKENDS[backend].layer(zeros["x"], torch.zeros(1, hidden), torch.full((1, hidden), c_prev),
                                         zeros["w_ih"], zeros["w_hh"], bias, None, torch.tensor(0), 0, 0, z, 0.0, p, 0,
                                         training)
    return c_n


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in zf.available_backends("cpu")])
def test_constants_are_bit_identical_across_backends(backend):
    """The recurrent-dropout scale 1/(1-p) and the evaluation mix z, 1 - z have the same bits in the
    reference and every backend, for p, z = k/1000 (all 999 on the CPU kernels, every 37th under the
    slow Triton interpreter). Units that recurrent dropout drops show 0 on both sides (same masks)."""
    ks = range(1, 1000) if backend == "cpu" else range(1, 1000, 37)
    mismatches = []
    for k in ks:
        value = k / 1000
        for probe, c_prev, training in (("scale", 0.0, True), ("one_minus_z", 0.0, False), ("z", 1.0, False)):
            a = _probe_cell_state(backend, probe, value, c_prev, training)
            e = _probe_cell_state("reference", probe, value, c_prev, training)
            if not torch.equal(a, e):
                mismatches.append((probe, value, a[0, 0].item(), e[0, 0].item()))
    assert not mismatches, mismatches[:10]
    # The probe sees the constants themselves: e.g. the float32 rounding of 1/(1-p) computed in double.
    c = _probe_cell_state("reference", "scale", 0.3, 0.0, True)
    assert c.max().item() == torch.tensor(1 / 0.7, dtype=torch.float32).item()


# ----------------------------------------------------------------------------- CUDA graphs
def test_op_graphs_are_off_by_default_and_never_used_on_the_cpu():
    from zoneout_fused import graphs

    assert graphs.cuda_graphs_enabled() == (os.environ.get("ZONEOUT_FUSED_CUDA_GRAPHS", "0") == "1")
    previous = graphs.cuda_graphs_enabled()
    try:
        graphs.set_cuda_graphs(True)
        assert not graphs.wanted((torch.zeros(2, 1, 3),))
        with pytest.raises(TypeError, match="enabled"):
            graphs.set_cuda_graphs("yes")
    finally:
        graphs.set_cuda_graphs(previous)


def _gpu_model(backend, cell, **extra):
    if backend not in zf.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    torch.manual_seed(0)
    common = dict(zoneout_hidden=0.3, backend=backend, device="cuda", **extra)
    return {"lstm": lambda: zf.ZoneoutLSTM(8, 16, zoneout_cell=0.5, **common),
            "gru": lambda: zf.ZoneoutGRU(8, 16, recurrent_dropout=0.1, **common),
            "rnn": lambda: zf.ZoneoutRNN(8, 16, **common)}[cell]()


def _training_calls(model, x, calls=3):
    """Outputs and parameter gradients of `calls` training steps from torch.manual_seed(1)."""
    torch.manual_seed(1)
    results = []
    for _ in range(calls):
        model.zero_grad(set_to_none=True)
        y = model(x)[0]
        (y * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        results.append([y.detach().clone()] + [p.grad.clone() for p in model.parameters()])
    return results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_op_graph_replays_equal_the_uncaptured_ops(backend, cell):
    """With ZONEOUT_FUSED_CUDA_GRAPHS on, each call replays captured forward and backward ops: the
    same outputs and gradients bit for bit, new masks at every call (each call's own seed), no sync."""
    from zoneout_fused import graphs

    model = _gpu_model(backend, cell, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 8, device="cuda")
    eager = _training_calls(model, x)
    previous = graphs.cuda_graphs_enabled()
    graphs.clear_cuda_graphs()
    try:
        graphs.set_cuda_graphs(True)
        replayed = _training_calls(model, x)
        assert len(graphs._GRAPHS) == 8  # (forward, backward) x 2 layers x 2 directions
        for step, (a, e) in enumerate(zip(replayed, eager)):
            for k, (u, v) in enumerate(zip(a, e)):
                assert torch.equal(u, v), (step, k)
        assert not torch.equal(replayed[0][0], replayed[1][0])  # a new seed, new masks
        with forbid_host_sync():
            _training_calls(model, x, calls=1)
    finally:
        graphs.set_cuda_graphs(previous)
        graphs.clear_cuda_graphs()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_captured_by_the_user_draws_new_masks_at_every_replay(backend, cell):
    """A forward + backward captured with torch.cuda.graph: the module draws its seed on the GPU while
    capturing, so each replay takes a new key; each replay equals an uncaptured run with that key."""
    model = _gpu_model(backend, cell)
    x = torch.randn(5, 3, 8, device="cuda")
    seeds = []
    draw = model._draw_seed
    model._draw_seed = lambda device: seeds.append(draw(device)) or seeds[-1]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(x)[0].sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = model(x)[0]
        y.sum().backward()
    captured_seed = seeds[-1]
    assert captured_seed.is_cuda
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append((y.clone(), captured_seed.clone(), model.weight_hh_l0.grad.clone()))
    assert replays[0][1].item() != replays[1][1].item()
    assert not torch.equal(replays[0][0], replays[1][0])
    for y_replay, seed, grad in replays:
        # The reference with that key, in float32 and float64 (the three-way rule): one mask drawn
        # from another key moves y by O(1), far outside the bound.
        same_dtype, exact = (_reference_step(model, x, seed.cpu(), dtype) for dtype in (torch.float32, torch.float64))
        assert_all_three_way([y_replay, grad], same_dtype, exact, ["y", "grad_weight_hh_l0"])


def _reference_step(model, x, seed, dtype):
    """(y, grad of weight_hh_l0) of one training step of a copy of `model` on the reference backend,
    in `dtype`, with the masks of `seed`."""
    reference = copy.deepcopy(model).to(dtype)
    reference.backend = "reference"
    reference._draw_seed = lambda device: seed
    reference.zero_grad(set_to_none=True)  # (deepcopy copies the captured gradients too)
    y = reference(x.to(dtype))[0]
    y.sum().backward()
    return [y.detach(), reference.weight_hh_l0.grad]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_training_step_runs_under_reduce_overhead(backend):
    """torch.compile(mode="reduce-overhead") trains through the layer ops without skipping CUDA
    graphs, and the masks change from step to step."""
    from torch._dynamo.utils import counters

    model = _gpu_model(backend, "lstm", num_layers=2)
    x = torch.randn(5, 3, 8, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda inputs: model(inputs)[0], mode="reduce-overhead")
    outputs = []
    for _ in range(4):
        y = step(x)
        y.sum().backward()
        outputs.append(y.detach().clone())
    assert not torch.equal(outputs[-1], outputs[-2])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in zf.available_backends("cpu")])
def test_graph_replay_path_keeps_the_autograd_formula(backend, cell, monkeypatch):
    """A replayed call runs the forward op inside an autograd Function and its backward op through
    graphs.call too: outputs and gradients equal the registered op's bit for bit. Capture needs a
    GPU, so here graphs.call runs the op directly (the GPU tests above replay real graphs)."""
    from zoneout_fused import graphs

    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, zoneout_hidden=0.3, backend=backend)
    model = zf.ZoneoutLSTM(3, 5, zoneout_cell=0.5, **kwargs) if cell == "lstm" else zf.ZoneoutGRU(3, 5, **kwargs)
    x = torch.randn(4, 2, 3, requires_grad=True)

    def step():
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        x.grad = None
        y = model(x)[0]
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in model.parameters()]

    expected = step()
    replayed_ops = []
    monkeypatch.setattr(graphs, "wanted", lambda args: True)
    monkeypatch.setattr(graphs, "call", lambda op, args: replayed_ops.append(op.name()) or tuple(op(*args)))
    actual = step()
    assert sorted(set(replayed_ops)) == sorted(f"zoneout_fused::{backend}_{ops_name}_{kind}"
                                               for ops_name in [{"lstm": "layer", "gru": "gru_rnn_layer"}[cell]]
                                               for kind in ("forward", "backward"))
    assert len(replayed_ops) == 8  # forward and backward of 2 layers x 2 directions
    for k, (a, e) in enumerate(zip(actual, expected)):
        assert torch.equal(a, e), k
