"""The benchmark program on a micro case: its records, and that its correctness check can fail."""
import json

import pytest
import torch

import zoneout_fused as zf
from zoneout_fused import cpu_isa
from zoneout_fused.bench import Peer, main

REQUIRED_FIELDS = ("device", "torch", "triton", "commit", "config", "backend", "mode", "dtype", "median_ms",
                   "peak_mem_mb", "batch", "steps", "input_size", "hidden_size", "num_layers", "check",
                   "zoneout_cell", "zoneout_hidden", "speedup_vs_reference", "speedup_vs_nn_lstm")


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


class _WrongGradient(zf.ZoneoutLSTM):
    """Right values, gradients 1 % off: only the gradient half of the check can see it."""

    def forward(self, input, hx=None):
        output, state = super().forward(input, hx)
        return _ScaleGradient.apply(output), state


def _wrong_masks(lstm, zoneout_kwargs):
    # Half the cell zoneout rate: other masks, an O(1) change in the states.
    kwargs = dict(zoneout_kwargs, zoneout_cell=zoneout_kwargs["zoneout_cell"] / 2)
    return zf.ZoneoutLSTM.from_lstm(lstm, backend="reference", **kwargs)


def _wrong_gradient(lstm, zoneout_kwargs):
    return _WrongGradient.from_lstm(lstm, backend="reference", **zoneout_kwargs)


def test_bench_records_and_check(tmp_path):
    fused = [name for name in ("cpu",) if name in zf.available_backends("cpu")]
    backends = ["plain-loop", "reference", "nn.LSTM", "triton"] + fused  # triton: an "unavailable" row on CPU
    path, table = tmp_path / "tiny.json", tmp_path / "tiny.md"
    threads = torch.get_num_threads()
    records = main(["--device", "cpu", "--config", "tiny", "--backends", ",".join(backends), "--repeats", "2",
                    "--warmup", "0", "--json", str(path), "--markdown", str(table), "--quiet"],
                   extra_peers={"wrong-masks": Peer("wrong-masks", _wrong_masks),
                                "wrong-gradient": Peer("wrong-gradient", _wrong_gradient)})
    assert torch.get_num_threads() == threads

    written = json.loads(path.read_text())["records"]
    assert written == json.loads(json.dumps(records))
    by_key = {(r["backend"], r["mode"]): r for r in written}
    expected_keys = {(b, m) for b in backends + ["wrong-masks", "wrong-gradient"] for m in ("fwd", "fwd+bwd")}
    assert set(by_key) == expected_keys and len(written) == len(expected_keys)

    for record in written:
        assert all(field in record for field in REQUIRED_FIELDS), set(REQUIRED_FIELDS) - set(record)
        assert record["config"] == "tiny" and record["dtype"] == "float32" and record["device_type"] == "cpu"
        assert (record["batch"], record["steps"], record["input_size"], record["hidden_size"],
                record["num_layers"]) == (3, 5, 4, 8, 2)
        assert (record["zoneout_cell"], record["zoneout_hidden"]) == (0.5, 0.05)
        assert record["torch"] == torch.__version__
        # Which instruction sets the CPU peers ran: ours, ATen's, oneDNN's ceiling.
        assert record["instruction_sets"].startswith(f"zoneout_fused {cpu_isa.cpu_isa() if fused else 'unavailable'}")
        assert f"ATen {torch.backends.cpu.get_cpu_capability()}" in record["instruction_sets"]

    for backend in ["plain-loop", "reference", "nn.LSTM"] + fused:
        for mode in ("fwd", "fwd+bwd"):
            record = by_key[(backend, mode)]
            assert record["check"] == ("reference" if backend == "reference" else "ok"), record
            assert record["median_ms"] > 0 and record["repeats"] == 2 and len(record["times_ms"]) == 2
            assert record["error"] is None
            assert record["speedup_vs_reference"] > 0 and record["speedup_vs_nn_lstm"] > 0
            assert record["speedup_vs_plain_loop"] > 0 and record["baseline"] == "nn.LSTM"
            assert 0 < record["floor_ms"] and record["floor_fraction"] == record["floor_ms"] / record["median_ms"]
            # Round by round against nn.LSTM: the two calls of each repeat paired (2 rounds here).
            rounds = record["speedup_vs_nn_lstm_rounds"]
            lstm_times = by_key[("nn.LSTM", mode)]["times_ms"]
            low, high = sorted(lstm / ours for lstm, ours in zip(lstm_times, record["times_ms"]))
            rounding = 1e-4 / min(lstm_times + record["times_ms"])  # times_ms: 4 decimals; rounds: exact times
            assert rounds == pytest.approx([(3 * low + high) / 4, (low + high) / 2, (low + 3 * high) / 4],
                                           rel=rounding)
    assert by_key[("nn.LSTM", "fwd")]["speedup_vs_nn_lstm_rounds"] == [1.0, 1.0, 1.0]
    assert by_key[("wrong-masks", "fwd")]["speedup_vs_nn_lstm_rounds"] is None  # not timed
    assert by_key[("reference", "fwd+bwd")]["speedup_vs_reference"] == 1.0
    assert by_key[("plain-loop", "fwd+bwd")]["speedup_vs_plain_loop"] == 1.0
    assert by_key[("reference", "fwd")]["floor_ms"] < by_key[("reference", "fwd+bwd")]["floor_ms"]
    # The plain loop draws its masks from torch's generator: checked with zoneout off, timed with it on.
    assert "zoneout 0" in by_key[("nn.LSTM", "fwd")]["check_detail"]
    assert "zoneout 0" in by_key[("plain-loop", "fwd")]["check_detail"]
    assert by_key[("triton", "fwd")]["check"] == "unavailable" and by_key[("triton", "fwd")]["median_ms"] is None

    # The check fails for wrong masks and for wrong gradients alone, and nothing wrong is timed.
    for backend, culprit in (("wrong-masks", None), ("wrong-gradient", "grad_")):
        for mode in ("fwd", "fwd+bwd"):
            record = by_key[(backend, mode)]
            assert record["check"] == "mismatch", record
            assert record["median_ms"] is None and record["times_ms"] == [] and record["peak_mem_mb"] is None
            assert record["check_max_err"] > 1e-3
            assert "differ from the reference" in record["error"]
        if culprit:
            assert culprit in by_key[(backend, "fwd")]["check_detail"]

    markdown = table.read_text()
    assert "| backend |" in markdown and "wrong-masks" in markdown and "**tiny**" in markdown
    assert "instruction sets: zoneout_fused" in markdown
    rounds = by_key[("reference", "fwd")]["speedup_vs_nn_lstm_rounds"]
    assert f"reference fwd {rounds[0]:.2f}-{rounds[2]:.2f}" in markdown and "round by round" in markdown


def test_paired_quartiles_pair_the_rounds():
    """The per-round speedup's quartiles pair index r of both lists (the same round), not sorted
    times; nothing where the rounds do not pair."""
    from zoneout_fused.bench.runner import paired_quartiles

    peer = [10.0, 20.0, 10.0, 20.0, 10.0]
    ours = [5.0, 20.0, 10.0, 10.0, 20.0]  # ratios 2, 1, 1, 2, 0.5
    assert paired_quartiles(peer, ours) == [1.0, 1.0, 2.0]
    # Sorted separately (medians 15 and 15) the ratio would read 1 whatever the pairing.
    assert paired_quartiles([10.0, 20.0], [20.0, 10.0]) == [0.5 + 0.25 * 1.5, 1.25, 2.0 - 0.25 * 1.5]
    assert paired_quartiles(peer, ours[:4]) is None  # a peer failed part-way
    assert paired_quartiles([1.0], [1.0]) is None


@pytest.mark.parametrize("peers", range(1, 9))
def test_round_order_balances_neighbours(peers):
    """Over one period of rounds every peer runs in every position and right after every other peer
    equally often, and the period repeats; a rotated single order (each peer always behind the same
    one) fails the neighbour count."""
    from collections import Counter

    from zoneout_fused.bench.runner import round_order

    period = 2 * peers if peers % 2 else peers
    rows = [round_order(peers, repeat) for repeat in range(period)]
    assert all(sorted(row) == list(range(peers)) for row in rows)
    positions = Counter((place, peer) for row in rows for place, peer in enumerate(row))
    assert len(positions) == peers * peers and len(set(positions.values())) == 1
    neighbours = Counter((row[k], row[k + 1]) for row in rows for k in range(peers - 1))
    assert len(neighbours) == peers * (peers - 1) and len(set(neighbours.values())) <= 1
    assert [round_order(peers, repeat) for repeat in range(period, 2 * period)] == rows


def test_decode_steps_the_cell_api(tmp_path):
    """The cell cases: eval, fwd and fwd+bwd of the cell stepped once per frame, against nn.LSTMCell."""
    fused = [name for name in ("cpu",) if name in zf.available_backends("cpu")]
    records = main(["--device", "cpu", "--config", "tiny-decode", "--repeats", "2", "--warmup", "0", "--quiet",
                    "--markdown", str(tmp_path / "decode.md")])
    by_key = {(r["backend"], r["mode"]): r for r in records}
    backends = ["plain-loop", "nn.LSTMCell", "reference"] + fused
    assert set(by_key) == {(b, m) for b in backends for m in ("eval", "fwd", "fwd+bwd")}
    for record in records:
        assert record["cell"] and record["baseline"] == "nn.LSTMCell" and record["floor_ms"] > 0
        assert record["check"] == ("reference" if record["backend"] == "reference" else "ok"), record
        assert record["median_ms"] > 0 and record["speedup_vs_nn_lstm"] > 0
    assert "vs nn.LSTMCell eval" in (tmp_path / "decode.md").read_text()


def test_decode_steps_gru_and_rnn_cells_beside_torchs(tmp_path):
    """--cell gru / rnn-tanh with the cell cases: ZoneoutGRUCell / ZoneoutRNNCell stepped once per
    frame beside nn.GRUCell / nn.RNNCell (the ceiling) and the plain cell loop, each checked."""
    fused = [name for name in ("cpu",) if name in zf.available_backends("cpu")]
    for cell, baseline in (("gru", "nn.GRUCell"), ("rnn-tanh", "nn.RNNCell")):
        records = main(["--device", "cpu", "--config", "tiny-decode", "--cell", cell, "--repeats", "1", "--warmup",
                        "0", "--quiet", "--markdown", str(tmp_path / f"{cell}.md")])
        by_key = {(r["backend"], r["mode"]): r for r in records}
        backends = ["plain-loop", baseline, "reference"] + fused
        assert set(by_key) == {(b, m) for b in backends for m in ("eval", "fwd", "fwd+bwd")}
        for record in records:
            assert record["cell"] and record["baseline"] == baseline and record["rnn_cell"] == cell
            assert record["check"] == ("reference" if record["backend"] == "reference" else "ok"), record
            assert record["zoneout_hidden"] == 0.1 and "zoneout_cell" not in record
        assert f"vs {baseline} eval" in (tmp_path / f"{cell}.md").read_text()


def test_matmul_floor_counts_every_product():
    """The floor's shapes: fwd is the input projection plus one recurrent product per step;
    fwd+bwd adds the gradient products (the same flops as forward, twice)."""
    from zoneout_fused.bench.cases import Case
    from zoneout_fused.bench.runner import matmul_shapes

    def flops(case, mode):
        return sum(2 * count * m * k * n for count, m, k, n in matmul_shapes(case, mode))

    for cell in (False, True):
        case = Case("c", batch=3, steps=5, input_size=4, hidden_size=8, num_layers=2, cell=cell)
        # T=5, B=3, 4H=32; layer inputs I=4, then H=8: x W_ih^T and h W_hh^T at every step
        per_layer = [2 * 5 * 3 * layer_input * 32 + 2 * 5 * 3 * 8 * 32 for layer_input in (4, 8)]
        assert flops(case, "fwd") == flops(case, "eval") == sum(per_layer)
        assert flops(case, "fwd+bwd") == 3 * flops(case, "fwd")


def _gru_wrong_masks(gru, zoneout_kwargs):
    kwargs = dict(zoneout_kwargs, zoneout_hidden=zoneout_kwargs["zoneout_hidden"] / 2)
    return zf.ZoneoutGRU.from_gru(gru, backend="reference", **kwargs)


def test_bench_cell_option_runs_gru_and_rnn_beside_torch(tmp_path):
    """--cell: the sequence configs with ZoneoutGRU / ZoneoutRNN beside nn.GRU / nn.RNN and the
    plain GRUCell / RNNCell loop; the check still catches wrong masks."""
    fused = [name for name in ("cpu",) if name in zf.available_backends("cpu")]
    for cell, baseline in (("gru", "nn.GRU"), ("rnn-relu", "nn.RNN")):
        extra = {"wrong-masks": Peer("wrong-masks", _gru_wrong_masks)} if cell == "gru" else {}
        records = main(["--device", "cpu", "--config", "tiny", "--cell", cell, "--backends",
                        ",".join(["plain-loop", "reference", "nn.LSTM"] + fused), "--repeats", "1", "--warmup", "0",
                        "--quiet"], extra_peers=extra)
        by_backend = {r["backend"]: r for r in records if r["mode"] == "fwd+bwd"}
        assert set(by_backend) == {"plain-loop", "reference", baseline, *fused, *extra}
        for name in ["plain-loop", baseline] + fused:
            assert by_backend[name]["check"] == "ok", by_backend[name]["check_detail"]
            assert by_backend[name]["baseline"] == baseline and by_backend[name]["rnn_cell"] == cell
        assert by_backend[baseline]["speedup_vs_nn_lstm"] == 1.0
        if extra:
            assert by_backend["wrong-masks"]["check"] == "mismatch"
        record = by_backend["reference"]
        assert record["zoneout_hidden"] == 0.1 and "zoneout_cell" not in record


def test_bench_cell_option_rejects_what_the_cell_lacks(capsys):
    import pytest
    for argv in (["--cell", "rnn-tanh", "--recurrent-dropout", "0.1"], ["--cell", "gru", "--mask-mode", "shared"],
                 ["--cell", "gru", "--zoneout-cell", "0.5"]):
        with pytest.raises(SystemExit):
            main(argv + ["--device", "cpu"])


def test_cpu_peak_memory_counts_pooled_outputs():
    """The cpu backend keeps freed outputs for its next call (cpu_isa.empty_cache); the RSS-based
    peak must still count a call's outputs (gates, y, c_seq: 4.9 MB here), not read near 0."""
    from zoneout_fused.bench.memory import PeakMemory

    memory = PeakMemory(torch.device("cpu"))
    if not memory.available or "cpu" not in zf.available_backends("cpu"):
        pytest.skip(memory.method)
    model = zf.ZoneoutLSTM(64, 128, backend="cpu", zoneout_cell=0.5).train()
    x = torch.randn(50, 32, 64)
    with torch.no_grad():
        model(x)  # fills the pool
        assert memory.measure(lambda: model(x)) >= 4.5


def test_bench_bidirectional_case(tmp_path):
    """A 2-layer bidirectional case (the encoder config's kind): every peer runs it, checked against
    the reference (the plain loop, layer by layer in both directions, at zoneout 0) and timed, and the
    floor counts both directions' products, the upper layer's 2H-wide input included."""
    from zoneout_fused.bench.cases import CONFIGS
    from zoneout_fused.bench.runner import matmul_shapes

    fused = [name for name in ("cpu",) if name in zf.available_backends("cpu")]
    records = main(["--device", "cpu", "--config", "tiny-bi", "--backends", ",".join(["plain-loop", "reference",
                    "nn.LSTM"] + fused), "--repeats", "2", "--warmup", "0", "--quiet"])
    by_key = {(r["backend"], r["mode"]): r for r in records}
    for backend in ["plain-loop", "nn.LSTM"] + fused:
        record = by_key[(backend, "fwd+bwd")]
        assert record["check"] == "ok" and record["median_ms"] > 0 and record["bidirectional"], record
    assert "zoneout 0" in by_key[("plain-loop", "fwd")]["check_detail"]

    case = CONFIGS["tiny-bi"][0]
    shapes = matmul_shapes(case, "fwd")
    assert len(shapes) == 2 * 2 * 2  # (projection, recurrent) x 2 directions x 2 layers
    assert [k for _, _, k, _ in shapes[::2]] == [4, 4, 16, 16]  # the upper layer reads both directions


@pytest.mark.parametrize("kind", [torch.nn.LSTM, torch.nn.GRU])
def test_bidirectional_cells_compute_the_torch_layer(kind):
    """The plain loop's bidirectional form, run with torch's own cells (copies of each direction's
    weights), gives nn.LSTM's / nn.GRU's outputs and final states, in nn.LSTM's state order."""
    from zoneout_fused.bench.loops import BidirectionalCells, lstm_cells

    torch.manual_seed(0)
    layer = kind(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    lstm = kind is torch.nn.LSTM
    loop = BidirectionalCells(lstm_cells(layer, 0), lstm_cells(layer, 1), lstm=lstm)
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    hx = torch.randn(4, 3, 7, dtype=torch.float64)
    hx = (hx, torch.randn(4, 3, 7, dtype=torch.float64)) if lstm else hx
    torch.testing.assert_close(loop(x, hx), layer(x, hx))
    with pytest.raises(ValueError, match="direction"):
        lstm_cells(kind(5, 7), direction=1)


def test_bench_pins_the_heap_thresholds():
    """Without pinning, glibc's mmap threshold follows the process's history, and a peer's large
    temporaries could be faulted in afresh on every call in one run and not in the next."""
    from zoneout_fused.bench.memory import pin_heap_thresholds

    said = pin_heap_thresholds()
    if said.startswith("default"):
        pytest.skip(said)
    import resource

    def call():
        buffer = torch.empty(8 << 20, dtype=torch.uint8)  # 8 MB: above glibc's default threshold
        buffer.fill_(1)  # touch every page
        del buffer

    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 5 * (8 << 20) // 4096 // 4
