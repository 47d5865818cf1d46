"""Triton helpers every step kernel shares (lstm_step.py, gru_rnn_step.py): the element
functions (accurate exp / sigmoid / tanh), a program's tile of [B, H], h_{t-1}'s pointer, and the
recurrent products (forward: h_{t-1} W_hh^T for one gate row of the tile; backward: the
gradient reaching h_{t-1} through W_hh, the whole reduction for the tile).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    # On a GPU tl.exp lowers to ex2.approx; libdevice's expf/exp are accurate to an ulp or two,
    # like the CUDA backend's and the reference's. The interpreter runs tl.exp (numpy's).
    if ACCURATE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _sigmoid(x, ACCURATE: tl.constexpr):
    return 1.0 / (1.0 + _exp(-x, ACCURATE))


@triton.jit
def _tanh(x, ACCURATE: tl.constexpr):
    if ACCURATE:  # libdevice's tanhf/tanh: relative accuracy near 0 too
        return libdevice.tanh(x)
    else:
        # The interpreter has no tanh: this form never overflows (exp of a non-positive number);
        # its absolute error is a few ulp of 1 (relative precision is lost near 0).
        e = tl.exp(-2.0 * tl.abs(x))
        r = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -r, r)


@triton.jit
def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's examples b [BB, 1] and units j [1, BH] (int64), and their bounds masks."""
    b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None]
    j = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :]
    in_b = b < B
    in_j = j < H
    return b, j, in_b, in_j, in_b & in_j


@triton.jit
def _previous_state(h0_ptr, y_ptr, t_prev, B, H, FIRST: tl.constexpr):
    """Pointer to h_{t-1} [B, H]: h0 at the first processed step, else y[t_prev]."""
    if FIRST:
        return h0_ptr
    else:
        return y_ptr + t_prev.to(tl.int64) * B * H


@triton.jit
def _recurrent_operands(h_prev_ptr, b, in_b, in_j, k0, H, BLOCK_K: tl.constexpr):
    """For the block of k from k0 of h_{t-1} W_hh^T: the h_{t-1} tile [BB, BK], the k indices as a
    column [BK, 1] (for _recurrent_row's W_hh^T tiles) and those tiles' bounds mask."""
    rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
    k_row = rk[None, :]  # [1, BK]
    k_col = rk[:, None]  # [BK, 1]
    h_tile = tl.load(h_prev_ptr + b * H + k_row, mask=in_b & (k_row < H), other=0.0)
    return h_tile, k_col, (k_col < H) & in_j


@triton.jit
def _dot(a, b, acc, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    if WIDE:  # float32/float64 operands: PRECISION is torch's float32 matmul policy ("ieee" or "tf32")
        return tl.dot(a, b, acc, input_precision=PRECISION)
    else:  # 16-bit weights: the other operand rounded to their dtype for the tensor cores, fp32 accumulation
        return tl.dot(a.to(b.dtype), b, acc)


@triton.jit
def _recurrent_row(acc, h_tile, w_hh_ptr, q, j, k_col, w_mask, H, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + h_tile @ (W_hh^T tile [BK, BH] of gate row q: W_hh[q*H + j, k])."""
    w = tl.load(w_hh_ptr + (q * H + j) * H + k_col, mask=w_mask, other=0.0)
    return _dot(h_tile, w, acc, WIDE, PRECISION)


@triton.jit
def _recurrent_grad(d_next, w_hh_ptr, b, j, in_b, in_j, K, H, ACC: tl.constexpr, WIDE: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """d_next [B, K] @ W_hh [K, H] for this tile: the gradient reaching h_{t-1} through the recurrent
    parts (K = G*H, the whole reduction)."""
    acc = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k_row = k0 + rk[None, :]
        k_col = k0 + rk[:, None]
        d_tile = tl.load(d_next + b * K + k_row, mask=in_b & (k_row < K), other=0.0)
        w_tile = tl.load(w_hh_ptr + k_col * H + j, mask=(k_col < K) & in_j, other=0.0)
        acc = _dot(d_tile, w_tile, acc, WIDE, PRECISION)
    return acc
