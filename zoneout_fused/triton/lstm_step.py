"""One time step of a zoneout LSTM layer direction: the forward and backward step kernels.

Both mirror csrc/zoneout_lstm.h element for element (cell_forward / cell_backward): the same
formulas in the same order, masks regenerated from (seed, counter) in both passes.

Forward, one launch per step, grid (B tiles, H tiles). A program owns examples b in its B tile
and hidden units j in its H tile, and computes all four gate columns (i, f, g, o) of those units:
    pre[b, g*H + j] = xp[t, b, g*H + j] + sum_k h_{t-1}[b, k] W_hh[g*H + j, k]
so the pointwise LSTM + zoneout math needs nothing from other programs. xp = x W_ih^T + bias is one
big matmul done in torch before the time loop.

Backward, also one launch per step (not two). dh_t needs d_pre[t+1] @ W_hh over all 4H columns,
which a single program cannot produce for its own tile in the same launch as d_pre[t+1] itself.
So the step-t program first finishes the previous step's product for its tile,
    dh_t[b, j] = direct[b, j] + sum_k d_pre[t_next][b, k] W_hh[k, j]     (d_pre[t_next] complete:
                                                                          the previous launch wrote it)
then does the pointwise backward of step t and writes d_pre[t] (its 4 gate columns), dc_{t-1} and
the direct term m_h * dh_t into [B, H] buffers it alone owns (in place, no races). The product
for the first step's h_{t-1} (= grad_h0) is one small torch matmul after the loop. A two-launch
scheme (pointwise, then dot) would move the same bytes and pay twice the launch latency.

Block sizes: see `choose_blocks`.
"""
import math

import torch
import triton
import triton.language as tl
from .masks import element_masks
from .tiles import _previous_state, _recurrent_grad, _recurrent_operands, _recurrent_row, _sigmoid, _tanh, _tile


@triton.jit(do_not_specialize=["seed", "key2", "t", "t_prev"])
def lstm_forward_step_kernel(
        xp_ptr,  # [T, B, 4H] ACC: x W_ih^T + bias
        w_hh_ptr,  # [4H, H] x's dtype
        h0_ptr, c0_ptr,  # [B, H] x's dtype
        y_ptr,  # [T, B, H] x's dtype (zoned h_t)
        c_seq_ptr,  # [T, B, H] state dtype (zoned c_t)
        gates_ptr,  # [T, B, 4H] state dtype (i, f, g, o)
        lengths_ptr,  # [B] int64 (unused without HAS_LENGTHS)
        params_ptr,  # float64 [z_c, z_h, p, scale]
        seed, key2, t, t_prev, B, H,
        FIRST: tl.constexpr, HAS_LENGTHS: tl.constexpr, MODE: tl.constexpr, TRAINING: tl.constexpr,
        DRAW_ZONEOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr,
        WIDE: tl.constexpr,
        PRECISION: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr):
    b, j, in_b, in_j, inside = _tile(B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    h_prev_ptr = _previous_state(h0_ptr, y_ptr, t_prev, B, H, FIRST)
    c_prev_ptr = _previous_state(c0_ptr, c_seq_ptr, t_prev, B, H, FIRST)

    # Recurrent product for the four gate columns of this j tile (fp32/fp64 accumulation).
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    for k0 in range(0, H, BLOCK_K):
        h_tile, k_col, w_mask = _recurrent_operands(h_prev_ptr, b, in_b, in_j, k0, H, BLOCK_K)
        acc_i = _recurrent_row(acc_i, h_tile, w_hh_ptr, 0, j, k_col, w_mask, H, WIDE, PRECISION)
        acc_f = _recurrent_row(acc_f, h_tile, w_hh_ptr, 1, j, k_col, w_mask, H, WIDE, PRECISION)
        acc_g = _recurrent_row(acc_g, h_tile, w_hh_ptr, 2, j, k_col, w_mask, H, WIDE, PRECISION)
        acc_o = _recurrent_row(acc_o, h_tile, w_hh_ptr, 3, j, k_col, w_mask, H, WIDE, PRECISION)

    four_h = 4 * H
    xp_row = xp_ptr + t64 * B * four_h + b * four_h + j
    pre_i = acc_i + tl.load(xp_row + 0 * H, mask=inside, other=0.0).to(ACC)
    pre_f = acc_f + tl.load(xp_row + 1 * H, mask=inside, other=0.0).to(ACC)
    pre_g = acc_g + tl.load(xp_row + 2 * H, mask=inside, other=0.0).to(ACC)
    pre_o = acc_o + tl.load(xp_row + 3 * H, mask=inside, other=0.0).to(ACC)
    gate_i = _sigmoid(pre_i, ACCURATE)
    gate_f = _sigmoid(pre_f, ACCURATE)
    gate_g = _tanh(pre_g, ACCURATE)
    gate_o = _sigmoid(pre_o, ACCURATE)

    h_prev = tl.load(h_prev_ptr + b * H + j, mask=inside, other=0.0).to(ACC)
    c_prev = tl.load(c_prev_ptr + b * H + j, mask=inside, other=0.0).to(ACC)
    keep_cell, keep_hidden, update_scale = element_masks(seed, key2, t, b, j, B, H, params_ptr, MODE, TRAINING,
                                                         DRAW_ZONEOUT, HAS_DROPOUT, ACC, SEED_IN_MEMORY)
    c_candidate = gate_f * c_prev + update_scale * (gate_i * gate_g)
    h_candidate = gate_o * _tanh(c_candidate, ACCURATE)  # from the un-zoned candidate (paper sec. 3.2)
    c_next = keep_cell * c_prev + (1.0 - keep_cell) * c_candidate
    h_next = keep_hidden * h_prev + (1.0 - keep_hidden) * h_candidate
    if HAS_LENGTHS:  # past a sequence's end: state copied through, gates zero
        length = tl.load(lengths_ptr + b, mask=in_b, other=0)
        active = t64 < length
        c_next = tl.where(active, c_next, c_prev)
        h_next = tl.where(active, h_next, h_prev)
        gate_i = tl.where(active, gate_i, 0.0)
        gate_f = tl.where(active, gate_f, 0.0)
        gate_g = tl.where(active, gate_g, 0.0)
        gate_o = tl.where(active, gate_o, 0.0)

    state_offs = t64 * B * H + b * H + j
    tl.store(y_ptr + state_offs, h_next.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(c_seq_ptr + state_offs, c_next.to(c_seq_ptr.dtype.element_ty), mask=inside)
    gates_row = gates_ptr + t64 * B * four_h + b * four_h + j
    gate_ty = gates_ptr.dtype.element_ty
    tl.store(gates_row + 0 * H, gate_i.to(gate_ty), mask=inside)
    tl.store(gates_row + 1 * H, gate_f.to(gate_ty), mask=inside)
    tl.store(gates_row + 2 * H, gate_g.to(gate_ty), mask=inside)
    tl.store(gates_row + 3 * H, gate_o.to(gate_ty), mask=inside)


@triton.jit(do_not_specialize=["seed", "key2", "t", "t_prev", "t_next"])
def lstm_backward_step_kernel(
        grad_y_ptr,  # [T, B, H] x's dtype
        w_hh_ptr,  # [4H, H] x's dtype
        c0_ptr,  # [B, H] x's dtype
        c_seq_ptr,  # [T, B, H] state dtype
        gates_ptr,  # [T, B, 4H] state dtype
        d_pre_ptr,  # [T, B, 4H] ACC: gradient of the pre-activations (written at t, read at t_next)
        dh_ptr,  # [B, H] ACC in/out: in, m_h*dh direct term from step t_next; out, this step's
        dc_ptr,  # [B, H] ACC in/out: gradient reaching c_t; out, c_{t-1}
        lengths_ptr, params_ptr,
        seed, key2, t, t_prev, t_next, B, H,
        FIRST: tl.constexpr,  # t is the first processed step: c_{t-1} is c0
        LAST: tl.constexpr,  # t is the last processed step: no later step feeds dh through W_hh
        HAS_LENGTHS: tl.constexpr, MODE: tl.constexpr, TRAINING: tl.constexpr, DRAW_ZONEOUT: tl.constexpr,
        HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr, WIDE: tl.constexpr,
        PRECISION: tl.constexpr,
        ACCURATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    b, j, in_b, in_j, inside = _tile(B, H, BLOCK_B, BLOCK_H)
    t64 = t.to(tl.int64)
    four_h = 4 * H
    tile = b * H + j

    # dh_t = direct term + d_pre[t_next] @ W_hh (the whole 4H reduction, for this tile).
    dh = tl.load(dh_ptr + tile, mask=inside, other=0.0).to(ACC)
    if not LAST:
        dh += _recurrent_grad(d_pre_ptr + t_next.to(tl.int64) * B * four_h, w_hh_ptr, b, j, in_b, in_j, four_h, H,
                              ACC, WIDE, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K)
    dh += tl.load(grad_y_ptr + t64 * B * H + tile, mask=inside, other=0.0).to(ACC)
    dc = tl.load(dc_ptr + tile, mask=inside, other=0.0).to(ACC)

    gates_row = gates_ptr + t64 * B * four_h + b * four_h + j
    gate_i = tl.load(gates_row + 0 * H, mask=inside, other=0.0).to(ACC)
    gate_f = tl.load(gates_row + 1 * H, mask=inside, other=0.0).to(ACC)
    gate_g = tl.load(gates_row + 2 * H, mask=inside, other=0.0).to(ACC)
    gate_o = tl.load(gates_row + 3 * H, mask=inside, other=0.0).to(ACC)
    if FIRST:
        c_prev = tl.load(c0_ptr + tile, mask=inside, other=0.0).to(ACC)
    else:
        c_prev = tl.load(c_seq_ptr + t_prev.to(tl.int64) * B * H + tile, mask=inside, other=0.0).to(ACC)
    keep_cell, keep_hidden, update_scale = element_masks(seed, key2, t, b, j, B, H, params_ptr, MODE, TRAINING,
                                                         DRAW_ZONEOUT, HAS_DROPOUT, ACC, SEED_IN_MEMORY)

    # cell_backward of zoneout_lstm.h: c~ recomputed from the saved gates and c_{t-1}.
    c_candidate = gate_f * c_prev + update_scale * (gate_i * gate_g)
    tanh_c = _tanh(c_candidate, ACCURATE)
    dh_candidate = (1.0 - keep_hidden) * dh
    dc_candidate = (1.0 - keep_cell) * dc + dh_candidate * gate_o * (1.0 - tanh_c * tanh_c)
    d_update = dc_candidate * update_scale
    dc_prev = keep_cell * dc + gate_f * dc_candidate
    dh_prev_direct = keep_hidden * dh
    d_pre_i = d_update * gate_g * gate_i * (1.0 - gate_i)
    d_pre_f = dc_candidate * c_prev * gate_f * (1.0 - gate_f)
    d_pre_g = d_update * gate_i * (1.0 - gate_g * gate_g)
    d_pre_o = dh_candidate * tanh_c * gate_o * (1.0 - gate_o)
    if HAS_LENGTHS:  # past a sequence's end the step is the identity on (h, c)
        length = tl.load(lengths_ptr + b, mask=in_b, other=0)
        active = t64 < length
        dc_prev = tl.where(active, dc_prev, dc)
        dh_prev_direct = tl.where(active, dh_prev_direct, dh)
        d_pre_i = tl.where(active, d_pre_i, 0.0)
        d_pre_f = tl.where(active, d_pre_f, 0.0)
        d_pre_g = tl.where(active, d_pre_g, 0.0)
        d_pre_o = tl.where(active, d_pre_o, 0.0)

    d_row = d_pre_ptr + t64 * B * four_h + b * four_h + j
    tl.store(d_row + 0 * H, d_pre_i, mask=inside)
    tl.store(d_row + 1 * H, d_pre_f, mask=inside)
    tl.store(d_row + 2 * H, d_pre_g, mask=inside)
    tl.store(d_row + 3 * H, d_pre_o, mask=inside)
    tl.store(dh_ptr + tile, dh_prev_direct, mask=inside)
    tl.store(dc_ptr + tile, dc_prev, mask=inside)


# ---------------------------------------------------------------------------------------------
# Block sizes.
# ---------------------------------------------------------------------------------------------
_SM_COUNT = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_blocks(batch: int, hidden: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps) for one step's [B, H] x [H, 4H] product.

    Not timed (no GPU was available when this was written): a reasoned first guess, to be
    replaced by measurements. A step moves W_hh (4H x H) once per B tile and h_{t-1} (B x H)
    once per H tile, and does little arithmetic, so at the paper's sizes it is latency- and
    bandwidth-bound, and the first aim is to give every SM a program. tl.dot needs tiles of at
    least 16, so the candidates are BLOCK_B, BLOCK_H in {16, 32, 64} (BLOCK_B up to 128 for
    B >= 128); we take the pair that puts the most programs on the SMs (capped at the SM count),
    then the largest tile, then the largest BLOCK_B (W_hh, 4H^2 values, is re-read once per B
    tile; h_{t-1}, B*H values, once per H tile, so B tiles cost more). On an H100 (132 SMs):
        char-PTB  B=32,  H=1000: 16 x 16 -> 2 x 63  = 126 programs
        word-PTB  B=20,  H=1500: 16 x 16 -> 2 x 94  = 188 (32 x 16 would give 94)
        text8     B=128, H=2000: 64 x 16 -> 2 x 125 = 250
        pMNIST    B=100, H=100 : 16 x 16 -> 7 x 7   = 49 (tiny: latency-bound whatever we pick)
    BLOCK_K = 32 and num_warps = 8 for tiles of 1024 elements or more. Tiles are capped at 2048
    elements (MAX_TILE): compiled for sm_90a (Triton 3.9's ptxas, BLOCK_K = 32), 128 x 32 and 64 x 64
    spill 116-428 bytes per thread at 255 registers in float32 and bfloat16, forward and backward,
    while every tile up to 2048 elements (128 x 16, 64 x 32) stays at <= 212 registers with no spill
    (tests/test_triton.py compiles the tiles this picks and fails on any spill). The same blocks
    serve the backward product (K = 4H). Under the interpreter the blocks only change how many numpy
    calls run, so there they are the smallest legal tiles (H not a multiple of them exercises the edge
    masks) with BLOCK_K covering small H in one iteration.
    """
    if device.type != "cuda":
        return 16, 16, min(64, max(16, triton.next_power_of_2(hidden))), 4
    return blocks_for(batch, hidden, _sm_count(device))


MAX_TILE = 2048  # BLOCK_B * BLOCK_H above this spills on sm_90a (see choose_blocks)


def blocks_for(batch: int, hidden: int, sms: int) -> tuple[int, int, int, int]:
    """choose_blocks on a GPU with `sms` multiprocessors."""
    b_options = [16, 32, 64] + ([128] if batch >= 128 else [])
    best = None
    for block_b in b_options:
        if block_b > max(16, triton.next_power_of_2(batch)):
            continue
        for block_h in (16, 32, 64):
            if block_h > max(16, triton.next_power_of_2(hidden)) or block_b * block_h > MAX_TILE:
                continue
            programs = math.ceil(batch / block_b) * math.ceil(hidden / block_h)
            score = (min(programs, sms), block_b * block_h, block_b)
            if best is None or score > best[0]:
                best = (score, block_b, block_h)
    _, block_b, block_h = best
    return block_b, block_h, 32, (8 if block_b * block_h >= 1024 else 4)
