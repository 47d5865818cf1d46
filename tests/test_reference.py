"""The reference backend against torch.nn.LSTM / nn.LSTMCell and against the paper's equations."""
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import zoneout_fused as zf
from zoneout_fused import masks, reference
from conftest import assert_close

DTYPE = torch.float64


def _grads(module, *tensors):
    return [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in tensors]


def _run(module, x, hx, packed_lengths=None):
    """Forward + backward through output, h_n and c_n; returns the outputs (gradients stay in .grad)."""
    inputs = x if packed_lengths is None else pack_padded_sequence(x, packed_lengths, enforce_sorted=False,
                                                                    batch_first=module.batch_first)
    output, (h_n, c_n) = module(inputs, hx)
    data = output if packed_lengths is None else output.data
    weights = [torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t) for t in (data, h_n, c_n)]
    loss = sum((t * w).sum() for t, w in zip((data, h_n, c_n), weights))
    loss.backward()
    return (data.detach(), h_n.detach(), c_n.detach())


LSTM_CASES = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, batch_first=True),
    dict(num_layers=2, proj_size=3),
    dict(num_layers=1, bias=False),
    dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
]


@pytest.mark.parametrize("case", LSTM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("form", ["plain", "hx", "packed", "unbatched"])
def test_zero_zoneout_equals_nn_lstm(case, form):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, dtype=DTYPE, **case)
    model = zf.ZoneoutLSTM.from_lstm(lstm, backend="reference")
    steps, batch = 7, 4
    directions = 2 if case.get("bidirectional") else 1
    out_size = case.get("proj_size") or 6
    shape = (batch, steps, 5) if case.get("batch_first") else (steps, batch, 5)
    lengths = torch.tensor([7, 3, 5, 1]) if form == "packed" else None
    if form == "unbatched":
        shape = (steps, 5)
    x1 = torch.randn(*shape, dtype=DTYPE, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    states = []
    if form == "hx":
        h0 = torch.randn(case["num_layers"] * directions, batch, out_size, dtype=DTYPE)
        c0 = torch.randn(case["num_layers"] * directions, batch, 6, dtype=DTYPE)
        states = [(h0.clone().requires_grad_(), c0.clone().requires_grad_()),
                  (h0.clone().requires_grad_(), c0.clone().requires_grad_())]
    expected = _run(lstm, x1, states[0] if states else None, lengths)
    actual = _run(model, x2, states[1] if states else None, lengths)
    for a, e in zip(actual, expected):
        assert_close(a, e)
    for a, e in zip(_grads(model, x2, *(states[1] if states else ())), _grads(lstm, x1, *(states[0] if states else ()))):
        assert_close(a, e)


@pytest.mark.parametrize("unbatched", [False, True])
def test_zero_zoneout_cell_equals_nn_lstm_cell(unbatched):
    torch.manual_seed(0)
    cell = nn.LSTMCell(5, 6, dtype=DTYPE)
    model = zf.ZoneoutLSTMCell(5, 6, dtype=DTYPE, backend="reference")
    model.load_state_dict(cell.state_dict())
    x = torch.randn(*(() if unbatched else (3,)), 5, dtype=DTYPE)
    hx = (torch.randn(*(() if unbatched else (3,)), 6, dtype=DTYPE),) * 2
    for a, e in zip(model(x, hx), cell(x, hx)):
        assert_close(a, e)
    for a, e in zip(model(x), cell(x)):
        assert_close(a, e)


def _cell_pieces(seed=0):
    torch.manual_seed(seed)
    lstm_cell = nn.LSTMCell(4, 8, dtype=DTYPE)
    x = torch.randn(6, 4, dtype=DTYPE)
    h0, c0 = torch.randn(6, 8, dtype=DTYPE), torch.randn(6, 8, dtype=DTYPE)
    h_candidate, c_candidate = lstm_cell(x, (h0, c0))  # the ordinary, un-zoned LSTM update
    return lstm_cell, x, h0, c0, h_candidate, c_candidate


def _layer(lstm_cell, x, h0, c0, seed, training, z_c, z_h, mode="independent", p=0.0):
    return reference.lstm_layer(x.unsqueeze(0), h0, c0, lstm_cell.weight_ih, lstm_cell.weight_hh,
                                lstm_cell.bias_ih + lstm_cell.bias_hh, None, torch.tensor(seed), 0, 0, z_c, z_h, p,
                                masks.MASK_MODE_CODES[mode], training)


@pytest.mark.parametrize("mode", ["independent", "shared", "timestep", "static"])
def test_training_step_applies_oracle_masks(mode):
    """One step: c = m_c c0 + (1 - m_c) c~, h = m_h h0 + (1 - m_h) o tanh(c~) (un-zoned c~)."""
    lstm_cell, x, h0, c0, h_candidate, c_candidate = _cell_pieces()
    m_c, m_h, _ = masks.step_masks(42, 0, 0, 0, 6, 8, zoneout_cell=0.5, zoneout_hidden=0.5, mask_mode=mode)
    y, c1 = _layer(lstm_cell, x, h0, c0, 42, True, 0.5, 0.5, mode)
    assert_close(c1, torch.where(m_c, c0, c_candidate))
    assert_close(y[0], torch.where(m_h, h0, h_candidate))
    assert m_c.any() and (~m_c).any() and m_h.any() and (~m_h).any()


def test_eval_is_the_expectation():
    lstm_cell, x, h0, c0, h_candidate, c_candidate = _cell_pieces()
    y, c1 = _layer(lstm_cell, x, h0, c0, 0, False, 0.5, 0.3)
    assert_close(c1, 0.5 * c0 + 0.5 * c_candidate)
    assert_close(y[0], 0.3 * h0 + 0.7 * h_candidate)


def test_eval_matches_the_mean_of_training_draws():
    """Averaging one step over many training draws approaches the evaluation output."""
    torch.manual_seed(1)
    model = zf.ZoneoutLSTMCell(3, 5, dtype=DTYPE, zoneout_cell=0.4, zoneout_hidden=0.2, backend="reference")
    x = torch.randn(1, 3, dtype=DTYPE).expand(20000, 3)
    hx = (torch.randn(1, 5, dtype=DTYPE).expand(20000, 5), torch.randn(1, 5, dtype=DTYPE).expand(20000, 5))
    h_train, c_train = model(x, hx)
    model.eval()
    h_eval, c_eval = model(x[:1], (hx[0][:1], hx[1][:1]))
    # standard error of a mean of 20,000 Bernoulli mixtures of O(1) values is < 0.01
    torch.testing.assert_close(h_train.mean(0, keepdim=True), h_eval, rtol=0, atol=0.02)
    torch.testing.assert_close(c_train.mean(0, keepdim=True), c_eval, rtol=0, atol=0.02)
    assert (h_train.std(0) > 0.01).any()  # the draws really were random


def test_recurrent_dropout_scales_the_kept_update():
    lstm_cell, x, h0, c0, _, _ = _cell_pieces()
    _, _, keep = masks.step_masks(9, 0, 0, 0, 6, 8, zoneout_cell=0.0, zoneout_hidden=0.0, recurrent_dropout=0.25)
    gates = (x @ lstm_cell.weight_ih.T + lstm_cell.bias_ih + h0 @ lstm_cell.weight_hh.T + lstm_cell.bias_hh)
    i, f, g, o = gates.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c_expected = f * c0 + keep.to(DTYPE) / 0.75 * i * g
    y, c1 = _layer(lstm_cell, x, h0, c0, 9, True, 0.0, 0.0, p=0.25)
    assert_close(c1, c_expected)
    assert_close(y[0], o * torch.tanh(c_expected))
    assert (~keep).any()


@pytest.mark.parametrize("training", [True, False])
def test_full_zoneout_freezes_the_state(training):
    torch.manual_seed(0)
    model = zf.ZoneoutLSTM(3, 4, num_layers=2, bidirectional=True, zoneout_cell=1.0, zoneout_hidden=1.0,
                           backend="reference", dtype=DTYPE).train(training)
    x = torch.randn(5, 2, 3, dtype=DTYPE)
    h0, c0 = torch.randn(4, 2, 4, dtype=DTYPE), torch.randn(4, 2, 4, dtype=DTYPE)
    output, (h_n, c_n) = model(x, (h0, c0))
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    assert torch.equal(output[:, :, :4], h0[2].expand(5, 2, 4))


def test_full_cell_zoneout_freezes_only_c():
    torch.manual_seed(0)
    model = zf.ZoneoutLSTM(3, 4, zoneout_cell=1.0, backend="reference", dtype=DTYPE)
    x = torch.randn(5, 2, 3, dtype=DTYPE)
    h0, c0 = torch.zeros(1, 2, 4, dtype=DTYPE), torch.randn(1, 2, 4, dtype=DTYPE)
    output, (h_n, c_n) = model(x, (h0, c0))
    assert torch.equal(c_n, c0)
    assert not torch.equal(h_n, h0)


def test_nan_input_propagates_without_crash():
    model = zf.ZoneoutLSTM(3, 4, zoneout_cell=0.5, zoneout_hidden=0.05, backend="reference")
    x = torch.randn(4, 2, 3)
    x[1, 0, 0] = float("nan")
    output, (h_n, c_n) = model(x)
    assert torch.isnan(output[1:, 0]).any() and torch.isfinite(output[:, 1]).all()
    assert torch.isfinite(output[0]).all()


@pytest.mark.parametrize("mode", ["independent", "timestep", "static"])
@pytest.mark.parametrize("direction", [0, 1])
def test_gradcheck_with_zoneout(mode, direction):
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 4, 2, 3, 3
    tensors = [torch.randn(steps, batch, inputs), torch.randn(batch, hidden), torch.randn(batch, hidden),
               torch.randn(4 * hidden, inputs), torch.randn(4 * hidden, hidden), torch.randn(4 * hidden)]
    tensors = [t.to(DTYPE).requires_grad_() for t in tensors]
    lengths = torch.tensor([4, 2])

    def layer(x, h0, c0, w_ih, w_hh, bias):
        return reference.lstm_layer(x, h0, c0, w_ih, w_hh, bias, lengths, torch.tensor(5), 1, direction, 0.5, 0.3,
                                    0.2, masks.MASK_MODE_CODES[mode], True)

    assert torch.autograd.gradcheck(layer, tensors)


@pytest.mark.parametrize("mode", [0, 2, 3])
@pytest.mark.parametrize("direction", [0, 1])
def test_masks_drawn_in_spans_match_one_span(monkeypatch, mode, direction):
    """The reference draws its masks a span of steps at a time (masks.span_steps; at test sizes one
    span covers every step). Spans of 1, 3 and 4 steps out of 10, walked forward and backward, give
    the same bits as one span: each step gets the masks of its own position."""
    torch.manual_seed(0)
    steps, batch, hidden, inputs = 10, 3, 5, 4
    x = torch.randn(steps, batch, inputs, dtype=DTYPE)
    h0, c0 = torch.randn(batch, hidden, dtype=DTYPE), torch.randn(batch, hidden, dtype=DTYPE)
    w_ih, w_hh = torch.randn(4 * hidden, inputs, dtype=DTYPE), torch.randn(4 * hidden, hidden, dtype=DTYPE)
    w_gru_ih, w_gru_hh = w_ih[: 3 * hidden], w_hh[: 3 * hidden]
    seed = masks.seed_tensor(77)

    def run():
        lstm = reference.lstm_layer(x, h0, c0, w_ih, w_hh, None, None, seed, 1, direction, 0.5, 0.3, 0.2, mode, True)
        gru = reference.gru_rnn_layer(x, h0, w_gru_ih, w_gru_hh, None, None, None, seed, 1, 1, direction, 0.3, 0.2,
                                      mode, True)
        return lstm + (gru,)

    assert masks.span_steps(batch, hidden) >= steps
    whole = run()
    for span in (1, 3, 4):
        monkeypatch.setattr(reference, "span_steps", lambda batch, hidden, span=span: span)
        for got, expected in zip(run(), whole):
            assert torch.equal(got, expected), span
