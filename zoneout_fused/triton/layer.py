"""The Triton layer op: `zoneout_fused::triton_layer_forward` / `triton_layer_backward`.

Host side of one layer direction (schema and shapes: zoneout_fused/ops.py's docstring):
    forward : xp = x W_ih^T + bias (one matmul), then one lstm_forward_step_kernel launch per step
    backward: one lstm_backward_step_kernel launch per step, then grad_h0 = direct + d_pre[first] W_hh,
              grad_w_hh = d_pre^T h_prev, grad_w_ih = d_pre^T x, grad_x = d_pre W_ih, grad_bias =
              sum d_pre, each one matmul / reduction over all steps (no atomics: deterministic).
Per-step host work is one launch with a prebuilt argument list; only t, t_prev (and, in backward,
t_next) and the first/last-step flags change.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from .. import ops as _ops
from .lstm_step import choose_blocks, lstm_backward_step_kernel, lstm_forward_step_kernel

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Allocator of every buffer the kernels must fill completely; tests swap in a NaN-filling one
# so that an element a kernel skips shows up as NaN.
_empty = torch.empty


# The kernels read [z_c, z_h, p, scale] from a float64 device buffer (exact z in a float64
# layer; Triton would pass Python floats as float32). One buffer per (device, values), made on
# first use: a per-call torch.tensor(..., device=cuda) would copy from pageable host memory,
# which waits for the stream on every forward and backward and is illegal under graph capture.
_PARAMS_CACHE: dict = {}


def _params(device: torch.device, values: tuple) -> torch.Tensor:
    key = (device, values)
    if key not in _PARAMS_CACHE:
        _PARAMS_CACHE[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return _PARAMS_CACHE[key]


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's (a no-op on CPU)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def float32_dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """The recurrent product's input precision, by torch's float32 policy as cuBLAS and cuDNN follow
    it: "tf32" on a GPU where torch allows TF32 for float32 matmuls (torch.backends.cuda.matmul.
    allow_tf32, or torch.set_float32_matmul_precision("high" / "medium")), else "ieee"."""
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    allowed = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
    return "tf32" if allowed else "ieee"


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(x, h0, c0, w_ih, w_hh, bias, lengths, seed, direction, mask_mode):
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    steps, batch, inputs = x.shape
    if steps == 0:
        raise ValueError("x must have at least one time step")
    if w_hh.dim() != 2 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"w_hh must be [4H, H], got shape {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if tuple(w_ih.shape) != (4 * hidden, inputs):
        raise ValueError(f"w_ih must be [{4 * hidden}, {inputs}], got shape {tuple(w_ih.shape)}")
    for name, state in (("h0", h0), ("c0", c0)):
        if tuple(state.shape) != (batch, hidden):
            raise ValueError(f"{name} must be [{batch}, {hidden}], got shape {tuple(state.shape)}")
    if bias is not None and tuple(bias.shape) != (4 * hidden,):
        raise ValueError(f"bias must be [{4 * hidden}], got shape {tuple(bias.shape)}")
    for name, tensor in (("h0", h0), ("c0", c0), ("w_ih", w_ih), ("w_hh", w_hh), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {tensor.dtype}")
        if tensor.device != x.device:
            raise RuntimeError(f"{name} is on {tensor.device} but x is on {x.device}")
    if x.dtype not in _ops.BACKENDS["triton"].dtypes(x.device):
        raise TypeError(f"backend 'triton' does not support dtype {x.dtype} on {x.device.type}")
    if lengths is not None:
        if lengths.dtype != torch.int64 or tuple(lengths.shape) != (batch,):
            raise ValueError(f"lengths must be an int64 tensor of shape [{batch}], got {lengths.dtype} "
                             f"{tuple(lengths.shape)}")
        if lengths.device != x.device:
            raise RuntimeError(f"lengths is on {lengths.device} but x is on {x.device}")
    if seed.numel() != 1:
        raise ValueError("seed must be a 0-dim int64 tensor")
    if direction not in (0, 1):
        raise ValueError(f"direction must be 0 or 1, got {direction}")
    if mask_mode not in (0, 1, 2, 3):
        raise ValueError(f"mask_mode must be a code in 0..3, got {mask_mode}")


class _Settings:
    """Everything both passes derive from the scalar arguments (one place, so they cannot disagree)."""

    def __init__(self, x, w_hh, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden,
                 recurrent_dropout, mask_mode, training):
        self.steps, self.batch, _ = x.shape
        self.hidden = w_hh.shape[1]
        self.acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.state_dtype = _ops.state_dtype(x.dtype)
        self.seed = int(seed)
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        self.key2 = 2 * int(layer) + int(direction)
        self.direction = int(direction)
        training = bool(training)
        scale = 1.0 / (1.0 - recurrent_dropout) if training else 1.0
        self.params = _params(x.device, (float(zoneout_cell), float(zoneout_hidden), float(recurrent_dropout),
                                          float(scale)))
        self.lengths = lengths
        self.block_b, self.block_h, self.block_k, num_warps = choose_blocks(self.batch, self.hidden, x.device)
        self.grid = (triton.cdiv(self.batch, self.block_b), triton.cdiv(self.hidden, self.block_h))
        self.meta = dict(
            HAS_LENGTHS=lengths is not None, MODE=int(mask_mode), TRAINING=training,
            DRAW_ZONEOUT=training and (zoneout_cell > 0.0 or zoneout_hidden > 0.0),
            HAS_DROPOUT=training and recurrent_dropout > 0.0, ACC=_tl_acc(x.dtype),
            WIDE=x.dtype not in _SIXTEEN_BIT, PRECISION=float32_dot_precision(x.dtype, x.device),
            ACCURATE=x.is_cuda,  # libdevice exp/tanh on a GPU; the interpreter has only tl.exp
            BLOCK_B=self.block_b, BLOCK_H=self.block_h,
            BLOCK_K=self.block_k, num_warps=num_warps)

    def order(self):
        """Positions t in processing order (direction 1 runs t = T-1..0; counters use t itself)."""
        return range(self.steps - 1, -1, -1) if self.direction == 1 else range(self.steps)

    def previous(self, t):
        return t + 1 if self.direction == 1 else t - 1


def _lengths_arg(lengths, like):
    return lengths if lengths is not None else like  # any pointer: never read without HAS_LENGTHS


@torch.library.custom_op("zoneout_fused::triton_layer_forward", mutates_args=())
def triton_layer_forward(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor,
                         w_hh: torch.Tensor, bias: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                         seed: torch.Tensor, layer: int, direction: int, zoneout_cell: float,
                         zoneout_hidden: float, recurrent_dropout: float, mask_mode: int,
                         training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, h0, c0, w_ih, w_hh, bias, lengths, seed, direction, mask_mode)
    s = _Settings(x, w_hh, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
                  mask_mode, training)
    T, B, H = s.steps, s.batch, s.hidden
    x, h0, c0, w_ih, w_hh = (tensor.contiguous() for tensor in (x, h0, c0, w_ih, w_hh))

    # The input projection of every step at once; for 16-bit inputs in their dtype (fp32
    # accumulation in cuBLAS), then kept in float32 like the rest of the step's arithmetic.
    xp = torch.matmul(x.reshape(T * B, -1), w_ih.t())
    if bias is not None:
        xp = xp + bias
    xp = xp.to(s.acc_dtype).reshape(T, B, 4 * H).contiguous()

    y = _empty(T, B, H, dtype=x.dtype, device=x.device)
    c_seq = _empty(T, B, H, dtype=s.state_dtype, device=x.device)
    gates = _empty(T, B, 4 * H, dtype=s.state_dtype, device=x.device)
    head = (xp, w_hh, h0, c0, y, c_seq, gates, _lengths_arg(lengths, xp), s.params, s.seed, s.key2)
    kernel = lstm_forward_step_kernel[s.grid]
    with _on_device(x):
        for index, t in enumerate(s.order()):
            kernel(*head, t, s.previous(t), B, H, FIRST=index == 0, **s.meta)
    t_last = 0 if s.direction == 1 else T - 1
    c_n = c_seq[t_last].to(x.dtype, copy=True)  # a copy: outputs must not alias each other
    return y, c_n, c_seq, gates


@torch.library.custom_op("zoneout_fused::triton_layer_backward", mutates_args=())
def triton_layer_backward(grad_y: torch.Tensor, grad_c_n: torch.Tensor, x: torch.Tensor, h0: torch.Tensor,
                          c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: Optional[torch.Tensor],
                          lengths: Optional[torch.Tensor], seed: torch.Tensor, layer: int, direction: int,
                          zoneout_cell: float, zoneout_hidden: float, recurrent_dropout: float, mask_mode: int,
                          training: bool, y: torch.Tensor, c_seq: torch.Tensor, gates: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    _check(x, h0, c0, w_ih, w_hh, bias, lengths, seed, direction, mask_mode)
    s = _Settings(x, w_hh, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
                  mask_mode, training)
    T, B, H = s.steps, s.batch, s.hidden
    x, h0, c0, w_ih, w_hh, y, c_seq, gates, grad_y = (
        tensor.contiguous() for tensor in (x, h0, c0, w_ih, w_hh, y, c_seq, gates, grad_y))

    d_pre = _empty(T, B, 4 * H, dtype=s.acc_dtype, device=x.device)
    dh = torch.zeros(B, H, dtype=s.acc_dtype, device=x.device)  # direct term m_h * dh from step t_next
    dc = grad_c_n.to(s.acc_dtype, copy=True).contiguous()
    head = (grad_y, w_hh, c0, c_seq, gates, d_pre, dh, dc, _lengths_arg(lengths, d_pre), s.params, s.seed, s.key2)
    kernel = lstm_backward_step_kernel[s.grid]
    order = list(s.order())
    t_next = order[-1]  # unused at the first backward step (LAST)
    with _on_device(x):
        for index in range(T - 1, -1, -1):
            t = order[index]
            kernel(*head, t, s.previous(t), t_next, B, H, FIRST=index == 0, LAST=index == T - 1, **s.meta)
            t_next = t
    t_first = order[0]

    # After the loop: every big product over all steps at once. 16-bit inputs: operands in
    # their dtype (tensor cores, fp32 accumulation), as in the recurrent product.
    op_dtype = x.dtype
    d_flat = d_pre.reshape(T * B, 4 * H)
    d_op = d_flat.to(op_dtype)
    if T > 1:  # h_{t-1} of every step, in the order of d_pre's rows
        h_prev = torch.cat([y[1:], h0[None]]) if s.direction == 1 else torch.cat([h0[None], y[:-1]])
    else:
        h_prev = h0[None]
    grad_w_hh = (d_op.t() @ h_prev.reshape(T * B, H)).to(w_hh.dtype)
    grad_w_ih = (d_op.t() @ x.reshape(T * B, -1)).to(w_ih.dtype)
    grad_x = (d_op @ w_ih).reshape(x.shape).to(x.dtype)
    grad_bias = d_flat.sum(0).to(w_hh.dtype)
    grad_h0 = (dh + (d_pre[t_first].to(op_dtype) @ w_hh).to(s.acc_dtype)).to(h0.dtype)
    grad_c0 = dc.to(c0.dtype, copy=True)
    return grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias


_ops.register_layer_op_pair("zoneout_fused::triton_layer_forward", "zoneout_fused::triton_layer_backward")


def layer_forward(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden,
                  recurrent_dropout, mask_mode, training):
    """The layer op (zoneout_fused.ops's signature) on Triton kernels: returns (y, c_n)."""
    y, c_n, _, _ = torch.ops.zoneout_fused.triton_layer_forward(
        x, h0, c0, w_ih, w_hh, bias, lengths, seed, int(layer), int(direction), float(zoneout_cell),
        float(zoneout_hidden), float(recurrent_dropout), int(mask_mode), bool(training))
    return y, c_n
