"""The oracle: one layer direction of a zoneout LSTM in plain, readable PyTorch.

Paper-exact (Krueger et al. 2017, sec. 3; contract sec. 1) and slow: a Python loop over time
steps with autograd through ordinary torch ops. Masks come from the mask oracle
(zoneout_fused.masks), so every fused backend must agree with this element for element,
in training mode too. Signature: the layer op of zoneout_fused.ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .masks import span_masks, span_steps


def lstm_layer(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
               bias: Optional[torch.Tensor], lengths: Optional[torch.Tensor], seed: torch.Tensor, layer: int,
               direction: int, zoneout_cell: float, zoneout_hidden: float, recurrent_dropout: float,
               mask_mode: int, training: bool, w_hr: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Runs one layer direction over x [T, B, I]; returns (y [T, B, H_out], c_n [B, H]).

    w_hr [H_out, H] is nn.LSTM's projection (proj_size > 0): h~_t = (o * tanh(c~_t)) W_hr^T.
    The hidden mask then uses the first H_out units' uniforms of the [B, H] draw.
    Plain torch ops only, seed a tensor: it traces, exports, compiles and scripts.
    """
    steps, batch = x.shape[0], x.shape[1]
    hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
    x_projection = torch.matmul(x, w_ih.t())
    if bias is not None:
        x_projection = x_projection + bias
    h, c = h0, c0
    # Evaluation's z rounded to the states' dtype, so that 1 - z is formed in that dtype: the same
    # bits as every kernel's 1 - m (a Python float would give float32(1 - z), an ulp off at times).
    # (torch.full, not torch.tensor: under TorchScript the latter rounds a float through float32.)
    expected_cell = torch.full((), zoneout_cell, dtype=c0.dtype, device=c0.device)
    expected_hidden = torch.full((), zoneout_hidden, dtype=h0.dtype, device=h0.device)
    no_dropout = torch.ones((), dtype=c0.dtype, device=c0.device)
    span = span_steps(batch, hidden)
    span_first = -1  # the masks of positions span_first .. + span - 1 (none drawn yet)
    drawn_cell = torch.empty(0, dtype=torch.bool)
    drawn_hidden = torch.empty(0, dtype=torch.bool)
    drawn_keep = torch.empty(0, dtype=torch.bool)
    outputs: List[torch.Tensor] = []
    for s in range(steps):
        t = steps - 1 - s if direction == 1 else s  # the position in the input
        pre = x_projection[t] + torch.matmul(h, w_hh.t())
        pre_i, pre_f, pre_g, pre_o = pre.chunk(4, dim=1)
        i, f, g, o = torch.sigmoid(pre_i), torch.sigmoid(pre_f), torch.tanh(pre_g), torch.sigmoid(pre_o)
        if training:
            if span_first < 0 or t // span != span_first // span:
                span_first = t // span * span
                drawn_cell, drawn_hidden, drawn_keep = span_masks(
                    seed, layer, direction, span_first, min(span, steps - span_first), batch, hidden, zoneout_cell,
                    zoneout_hidden, recurrent_dropout, mask_mode, x.device)
            m_c, m_h, keep = drawn_cell[t - span_first], drawn_hidden[t - span_first], drawn_keep[t - span_first]
            keep_cell = m_c.to(c.dtype)
            keep_hidden = m_h[:, : h.shape[1]].to(h.dtype)
            update_scale = keep.to(c.dtype) * (1.0 / (1.0 - recurrent_dropout))
        else:  # evaluation: the masks' expectations
            keep_cell, keep_hidden, update_scale = expected_cell, expected_hidden, no_dropout
        c_candidate = f * c + update_scale * (i * g)
        h_candidate = o * torch.tanh(c_candidate)  # from the un-zoned candidate (paper sec. 3.2)
        if w_hr is not None:
            h_candidate = torch.matmul(h_candidate, w_hr.t())
        c_next = keep_cell * c + (1 - keep_cell) * c_candidate
        h_next = keep_hidden * h + (1 - keep_hidden) * h_candidate
        if lengths is not None:  # past a sequence's end its state stays as it was
            active = (t < lengths).unsqueeze(1)
            c_next = torch.where(active, c_next, c)
            h_next = torch.where(active, h_next, h)
        h, c = h_next, c_next
        outputs.append(h)
    if direction == 1:
        outputs.reverse()  # back to input order
    return torch.stack(outputs), c


# Cell kinds of the layer ops (csrc/zoneout_lstm.h's CellKind): the LSTM, and the hidden-state
# cells that gru_rnn_layer runs.
CELL_CODES = {"lstm": 0, "gru": 1, "rnn_tanh": 2, "rnn_relu": 3}


def cell_rows(cell: int) -> int:
    """G: rows of W_ih / W_hh per hidden unit (the header's cell_rows)."""
    return 4 if cell == 0 else (3 if cell == 1 else 1)


def saved_columns(cell: int) -> int:
    """Columns of the saved gates per hidden unit: (i, f, g, o) for the LSTM, (r, u, n, hp_n) for the
    GRU, h~ for the RNN (the header's cell_saved)."""
    return 4 if cell <= 1 else 1


def gru_rnn_layer(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                  seed: torch.Tensor, cell: int, layer: int, direction: int, zoneout_hidden: float,
                  recurrent_dropout: float, mask_mode: int, training: bool) -> torch.Tensor:
    """Runs one GRU (cell 1) or plain-RNN (2: tanh, 3: relu) layer direction over x [T, B, I];
    returns y [T, B, H], the zoned h_t (contract sec. 4).

    Weights and biases are nn.GRU's / nn.RNN's (GRU rows r, z, n; b_hn inside the reset
    product). The hidden mask is the LSTM's for the same seed and position; recurrent dropout
    (GRU only) drops the candidate n. Plain torch ops, seed a tensor: it traces and scripts.
    """
    steps, batch = x.shape[0], x.shape[1]
    hidden = h0.shape[1]
    x_projection = torch.matmul(x, w_ih.t())
    if b_ih is not None:
        x_projection = x_projection + b_ih
    h = h0
    expected_hidden = torch.full((), zoneout_hidden, dtype=h0.dtype, device=h0.device)
    no_dropout = torch.ones((), dtype=h0.dtype, device=h0.device)
    span = span_steps(batch, hidden)
    span_first = -1  # the masks of positions span_first .. + span - 1 (none drawn yet)
    drawn_hidden = torch.empty(0, dtype=torch.bool)
    drawn_keep = torch.empty(0, dtype=torch.bool)
    outputs: List[torch.Tensor] = []
    for s in range(steps):
        t = steps - 1 - s if direction == 1 else s  # the position in the input
        h_projection = torch.matmul(h, w_hh.t())
        if b_hh is not None:
            h_projection = h_projection + b_hh
        if training:
            if span_first < 0 or t // span != span_first // span:
                span_first = t // span * span
                _, drawn_hidden, drawn_keep = span_masks(seed, layer, direction, span_first,
                                                       min(span, steps - span_first), batch, hidden, 0.0,
                                                       zoneout_hidden, recurrent_dropout, mask_mode, x.device)
            m_h, keep = drawn_hidden[t - span_first], drawn_keep[t - span_first]
            keep_hidden = m_h.to(h.dtype)
            update_scale = keep.to(h.dtype) * (1.0 / (1.0 - recurrent_dropout))
        else:  # evaluation: the mask's expectation
            keep_hidden, update_scale = expected_hidden, no_dropout
        if cell == 1:
            x_r, x_u, x_n = x_projection[t].chunk(3, dim=1)
            h_r, h_u, h_n = h_projection.chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            u = torch.sigmoid(x_u + h_u)
            n = torch.tanh(x_n + r * h_n)
            h_candidate = (1 - u) * (update_scale * n) + u * h
        else:
            pre = x_projection[t] + h_projection
            h_candidate = torch.relu(pre) if cell == 3 else torch.tanh(pre)
        h_next = keep_hidden * h + (1 - keep_hidden) * h_candidate
        if lengths is not None:  # past a sequence's end the state stays as it was
            h_next = torch.where((t < lengths).unsqueeze(1), h_next, h)
        h = h_next
        outputs.append(h)
    if direction == 1:
        outputs.reverse()
    return torch.stack(outputs)
