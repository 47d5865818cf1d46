"""One time step of a zoneout GRU or plain-RNN layer direction: the forward and backward step kernels.

Both mirror csrc/zoneout_lstm.h element for element (gru_forward / gru_backward, rnn_forward /
rnn_backward): the same formulas in the same order, masks regenerated from (seed, counter) in both
passes by the LSTM's `element_masks` with z_c = 0 (only the hidden mask and, for the GRU, the
recurrent-dropout scale of the candidate n are used). The CELL constexpr picks the cell
(reference.CELL_CODES: 1 gru, 2 rnn_tanh, 3 rnn_relu); G = 3 gate rows (r, u, n) for the GRU, 1
for the RNN.

Forward, one launch per step, grid (B tiles, H tiles), as lstm_step.py: a program owns examples b
of its B tile and units j of its H tile, and forms all G recurrent parts of those units,
    hp[b, q*H + j] = sum_k h_{t-1}[b, k] W_hh[q*H + j, k] (+ b_hh[q*H + j])
with xp = x W_ih^T + b_ih one torch matmul before the time loop. b_hh is added in the kernel, not
folded into xp: nn.GRU's b_hn sits inside the reset product r * hp_n.

Backward, one launch per step. The gradient of step t's recurrent parts is d_h[t] ([B, G*H]: the
GRU's (d_r, d_u, d_hp_n = d_n * r), the RNN's d_pre); that of its input parts is d_x[t] (the GRU's
(d_r, d_u, d_n), for the RNN the same buffer as d_h). The step-t program first finishes the
previous launch's product for its tile,
    dh_t[b, j] = direct[b, j] + sum_k d_h[t_next][b, k] W_hh[k, j] + grad_y[t, b, j]
then does the element backward of step t and writes d_x[t], d_h[t] and the direct term
(GRU: m_h dh + (1 - m_h) u dh; RNN: m_h dh) into the [B, H] buffer it alone owns.
"""
import triton
import triton.language as tl

from .tiles import _previous_state, _recurrent_grad, _recurrent_operands, _recurrent_row, _sigmoid, _tanh, _tile
from ..reference import CELL_CODES
from .masks import element_masks

# Cell codes (reference.CELL_CODES); the kernels' CELL constexpr.
GRU, RNN_TANH, RNN_RELU = CELL_CODES["gru"], CELL_CODES["rnn_tanh"], CELL_CODES["rnn_relu"]


@triton.jit
def _hidden_masks(seed, key2, t, b, j, in_b, B, H, params_ptr, lengths_ptr, HAS_LENGTHS: tl.constexpr,
                  MODE: tl.constexpr, TRAINING: tl.constexpr, DRAW_ZONEOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    """(keep_hidden, update_scale, active): element_masks' hidden mask and dropout scale (params hold
    z_c = 0), and whether t lies inside each example's sequence (all true without HAS_LENGTHS)."""
    _, keep_hidden, update_scale = element_masks(seed, key2, t, b, j, B, H, params_ptr, MODE, TRAINING,
                                                 DRAW_ZONEOUT, HAS_DROPOUT, ACC, SEED_IN_MEMORY)
    if HAS_LENGTHS:
        active = t.to(tl.int64) < tl.load(lengths_ptr + b, mask=in_b, other=0)
    else:
        active = b >= 0
    return keep_hidden, update_scale, active


@triton.jit
def _three_columns(row_ptr, H, inside, ACC: tl.constexpr):
    """Columns 0, 1, 2 (r, u, n) of this tile from rows of q*H + j, as ACC."""
    return (tl.load(row_ptr + 0 * H, mask=inside, other=0.0).to(ACC),
            tl.load(row_ptr + 1 * H, mask=inside, other=0.0).to(ACC),
            tl.load(row_ptr + 2 * H, mask=inside, other=0.0).to(ACC))


@triton.jit
def _with_bias(acc, b_hh_ptr, q, j, in_j, H, HAS_B_HH: tl.constexpr, ACC: tl.constexpr):
    if HAS_B_HH:
        return acc + tl.load(b_hh_ptr + q * H + j, mask=in_j, other=0.0).to(ACC)
    else:
        return acc


@triton.jit(do_not_specialize=["seed", "key2", "t", "t_prev"])
def gru_rnn_forward_step_kernel(
        xp_ptr,  # [T, B, G*H] ACC: x W_ih^T + b_ih
        w_hh_ptr,  # [G*H, H] x's dtype
        b_hh_ptr,  # [G*H] x's dtype (unused without HAS_B_HH)
        h0_ptr,  # [B, H] x's dtype
        y_ptr,  # [T, B, H] x's dtype (zoned h_t)
        gates_ptr,  # [T, B, 4H] GRU (r, u, n, hp_n) / [T, B, H] RNN (h~), state dtype
        lengths_ptr,  # [B] int64 (unused without HAS_LENGTHS)
        params_ptr,  # float64 [0, z_h, p, scale]
        seed, key2, t, t_prev, B, H,
        CELL: tl.constexpr, FIRST: tl.constexpr, HAS_B_HH: tl.constexpr, HAS_LENGTHS: tl.constexpr,
        MODE: tl.constexpr, TRAINING: tl.constexpr, DRAW_ZONEOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
        ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
        ACCURATE: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    IS_GRU: tl.constexpr = CELL == 1  # GRU (the literal codes: jit code reads no module-level ints)
    b, j, in_b, in_j, inside = _tile(B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    h_prev_ptr = _previous_state(h0_ptr, y_ptr, t_prev, B, H, FIRST)

    # Recurrent parts of this j tile's G gate rows (row 0 is the RNN's only one; r, u, n for the GRU).
    acc_0 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc_1 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc_2 = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        h_tile, k_col, w_mask = _recurrent_operands(h_prev_ptr, b, in_b, in_j, k0, H, BLOCK_K)
        acc_0 = _recurrent_row(acc_0, h_tile, w_hh_ptr, 0, j, k_col, w_mask, H, WIDE, PRECISION)
        if IS_GRU:
            acc_1 = _recurrent_row(acc_1, h_tile, w_hh_ptr, 1, j, k_col, w_mask, H, WIDE, PRECISION)
            acc_2 = _recurrent_row(acc_2, h_tile, w_hh_ptr, 2, j, k_col, w_mask, H, WIDE, PRECISION)

    h_prev = tl.load(h_prev_ptr + b * H + j, mask=inside, other=0.0).to(ACC)
    keep_hidden, update_scale, active = _hidden_masks(seed, key2, t, b, j, in_b, B, H, params_ptr, lengths_ptr,
                                                      HAS_LENGTHS, MODE, TRAINING, DRAW_ZONEOUT, HAS_DROPOUT, ACC,
                                                      SEED_IN_MEMORY)
    if IS_GRU:
        three_h = 3 * H
        x_r, x_u, x_n = _three_columns(xp_ptr + t64 * B * three_h + b * three_h + j, H, inside, ACC)
        hp_r = _with_bias(acc_0, b_hh_ptr, 0, j, in_j, H, HAS_B_HH, ACC)
        hp_u = _with_bias(acc_1, b_hh_ptr, 1, j, in_j, H, HAS_B_HH, ACC)
        hp_n = _with_bias(acc_2, b_hh_ptr, 2, j, in_j, H, HAS_B_HH, ACC)
        # gru_forward of zoneout_lstm.h
        gate_r = _sigmoid(x_r + hp_r, ACCURATE)
        gate_u = _sigmoid(x_u + hp_u, ACCURATE)
        gate_n = _tanh(x_n + gate_r * hp_n, ACCURATE)
        h_candidate = (1.0 - gate_u) * (update_scale * gate_n) + gate_u * h_prev
        h_next = keep_hidden * h_prev + (1.0 - keep_hidden) * h_candidate
        if HAS_LENGTHS:  # past a sequence's end: state copied through, gates zero
            h_next = tl.where(active, h_next, h_prev)
            gate_r = tl.where(active, gate_r, 0.0)
            gate_u = tl.where(active, gate_u, 0.0)
            gate_n = tl.where(active, gate_n, 0.0)
            hp_n = tl.where(active, hp_n, 0.0)
        four_h = 4 * H
        gates_row = gates_ptr + t64 * B * four_h + b * four_h + j
        gate_ty = gates_ptr.dtype.element_ty
        tl.store(gates_row + 0 * H, gate_r.to(gate_ty), mask=inside)
        tl.store(gates_row + 1 * H, gate_u.to(gate_ty), mask=inside)
        tl.store(gates_row + 2 * H, gate_n.to(gate_ty), mask=inside)
        tl.store(gates_row + 3 * H, hp_n.to(gate_ty), mask=inside)
    else:
        # rnn_forward of zoneout_lstm.h: pre = (x W_ih^T + b_ih) + (h W_hh^T + b_hh)
        x_pre = tl.load(xp_ptr + t64 * B * H + b * H + j, mask=inside, other=0.0).to(ACC)
        pre = x_pre + _with_bias(acc_0, b_hh_ptr, 0, j, in_j, H, HAS_B_HH, ACC)
        if CELL == 3:  # RNN_RELU
            h_candidate = tl.where(pre > 0.0, pre, 0.0)
        else:
            h_candidate = _tanh(pre, ACCURATE)
        h_next = keep_hidden * h_prev + (1.0 - keep_hidden) * h_candidate
        if HAS_LENGTHS:
            h_next = tl.where(active, h_next, h_prev)
            h_candidate = tl.where(active, h_candidate, 0.0)
        tl.store(gates_ptr + t64 * B * H + b * H + j, h_candidate.to(gates_ptr.dtype.element_ty), mask=inside)
    tl.store(y_ptr + t64 * B * H + b * H + j, h_next.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=["seed", "key2", "t", "t_prev", "t_next"])
def gru_rnn_backward_step_kernel(
        grad_y_ptr,  # [T, B, H] x's dtype
        w_hh_ptr,  # [G*H, H] x's dtype
        h0_ptr,  # [B, H] x's dtype
        y_ptr,  # [T, B, H] x's dtype (h_{t-1} of the GRU's update gate)
        gates_ptr,  # [T, B, 4H] / [T, B, H] state dtype
        d_x_ptr,  # [T, B, G*H] ACC: gradient of the input parts (GRU only; the RNN's is d_h)
        d_h_ptr,  # [T, B, G*H] ACC: gradient of the recurrent parts (written at t, read at t_next)
        dh_ptr,  # [B, H] ACC in/out: in, the direct term from step t_next; out, this step's
        lengths_ptr, params_ptr,
        seed, key2, t, t_prev, t_next, B, H,
        CELL: tl.constexpr,
        FIRST: tl.constexpr,  # t is the first processed step: h_{t-1} is h0
        LAST: tl.constexpr,  # t is the last processed step: no later step feeds dh through W_hh
        HAS_LENGTHS: tl.constexpr, MODE: tl.constexpr, TRAINING: tl.constexpr, DRAW_ZONEOUT: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr, WIDE: tl.constexpr,
        PRECISION: tl.constexpr,
        ACCURATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    IS_GRU: tl.constexpr = CELL == 1  # GRU (the literal codes: jit code reads no module-level ints)
    ROWS: tl.constexpr = 3 if IS_GRU else 1
    b, j, in_b, in_j, inside = _tile(B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    g_h = ROWS * H
    tile = b * H + j

    # dh_t = direct term + d_h[t_next] @ W_hh + grad_y[t] (in the LSTM backward's order).
    dh = tl.load(dh_ptr + tile, mask=inside, other=0.0).to(ACC)
    if not LAST:
        dh += _recurrent_grad(d_h_ptr + t_next.to(tl.int64) * B * g_h, w_hh_ptr, b, j, in_b, in_j, g_h, H, ACC,
                              WIDE, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    dh += tl.load(grad_y_ptr + t64 * B * H + tile, mask=inside, other=0.0).to(ACC)
    # Past a sequence's end (not active) the step is the identity on h.
    keep_hidden, update_scale, active = _hidden_masks(seed, key2, t, b, j, in_b, B, H, params_ptr, lengths_ptr,
                                                      HAS_LENGTHS, MODE, TRAINING, DRAW_ZONEOUT, HAS_DROPOUT, ACC,
                                                      SEED_IN_MEMORY)

    d_row = t64 * B * g_h + b * g_h + j
    if IS_GRU:
        four_h = 4 * H
        gates_row = gates_ptr + t64 * B * four_h + b * four_h + j
        gate_r, gate_u, gate_n = _three_columns(gates_row, H, inside, ACC)
        hp_n = tl.load(gates_row + 3 * H, mask=inside, other=0.0).to(ACC)
        h_prev_ptr = _previous_state(h0_ptr, y_ptr, t_prev, B, H, FIRST)
        h_prev = tl.load(h_prev_ptr + tile, mask=inside, other=0.0).to(ACC)
        # gru_backward of zoneout_lstm.h
        dh_candidate = (1.0 - keep_hidden) * dh
        dn = dh_candidate * (1.0 - gate_u) * update_scale
        du = dh_candidate * (h_prev - update_scale * gate_n)
        d_n = dn * (1.0 - gate_n * gate_n)
        d_r = d_n * hp_n * gate_r * (1.0 - gate_r)
        d_u = du * gate_u * (1.0 - gate_u)
        d_hp_n = d_n * gate_r
        dh_prev_direct = keep_hidden * dh + dh_candidate * gate_u
        if HAS_LENGTHS:
            dh_prev_direct = tl.where(active, dh_prev_direct, dh)
            d_n = tl.where(active, d_n, 0.0)
            d_r = tl.where(active, d_r, 0.0)
            d_u = tl.where(active, d_u, 0.0)
            d_hp_n = tl.where(active, d_hp_n, 0.0)
        tl.store(d_x_ptr + d_row + 0 * H, d_r, mask=inside)
        tl.store(d_x_ptr + d_row + 1 * H, d_u, mask=inside)
        tl.store(d_x_ptr + d_row + 2 * H, d_n, mask=inside)
        tl.store(d_h_ptr + d_row + 0 * H, d_r, mask=inside)
        tl.store(d_h_ptr + d_row + 1 * H, d_u, mask=inside)
        tl.store(d_h_ptr + d_row + 2 * H, d_hp_n, mask=inside)
    else:
        # rnn_backward of zoneout_lstm.h, the activation's derivative from the saved h~
        candidate = tl.load(gates_ptr + t64 * B * H + tile, mask=inside, other=0.0).to(ACC)
        if CELL == 3:  # RNN_RELU
            activation_grad = tl.where(candidate > 0.0, 1.0, 0.0).to(ACC)
        else:
            activation_grad = 1.0 - candidate * candidate
        d_pre = (1.0 - keep_hidden) * dh * activation_grad
        dh_prev_direct = keep_hidden * dh
        if HAS_LENGTHS:
            dh_prev_direct = tl.where(active, dh_prev_direct, dh)
            d_pre = tl.where(active, d_pre, 0.0)
        tl.store(d_h_ptr + d_row, d_pre, mask=inside)
    tl.store(dh_ptr + tile, dh_prev_direct, mask=inside)
