"""The Triton layer ops: `zoneout_fused::triton_layer_forward` / `triton_layer_backward` (LSTM) and
`zoneout_fused::triton_gru_rnn_layer_forward` / `triton_gru_rnn_layer_backward` (GRU, plain RNN).

Host side of one layer direction (schemas and shapes: zoneout_fused/ops.py's docstring):
    forward : xp = x W_ih^T + bias (one matmul), then one forward step kernel launch per step
    backward: one backward step kernel launch per step, then grad_h0 = direct + d_h[first] W_hh,
              grad_w_hh = d_h^T h_prev, grad_w_ih = d_x^T x, grad_x = d_x W_ih, grad_b = sum d_x (and
              sum d_h), each one matmul / reduction over all steps (no atomics: deterministic).
              d_x, d_h: the gradients of the input parts x W_ih^T + b_ih and of the recurrent parts
              h_{t-1} W_hh^T (+ b_hh); the LSTM's and the RNN's are one buffer (d_pre), the GRU's
              differ in the n row (the reset gate multiplies the recurrent part).
Per-step host work is one launch with a prebuilt argument list; only t, t_prev (and, in backward,
t_next) and the first/last-step flags change.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton

from .. import ops as _ops
from .. import reference as _reference
from . import gru_rnn_step
from .gru_rnn_step import gru_rnn_backward_step_kernel, gru_rnn_forward_step_kernel
from .lstm_step import choose_blocks, lstm_backward_step_kernel, lstm_forward_step_kernel

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_CELL_NAMES = {code: name for name, code in _reference.CELL_CODES.items() if name != "lstm"}
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


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (a no-op on CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _reads_seed_from_memory(seed: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the kernels load the seed from its tensor (a seed on x's GPU: never read on the host,
    so no sync, and a CUDA graph replays with the key the buffer holds) or take it by value (a CPU
    seed, read on the host as contract sec. 2 draws it). Tests swap this to run the load under the
    interpreter, where every tensor is on the CPU."""
    return seed.device.type != "cpu"


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


def _check(x, h0, c0, w_ih, w_hh, bias, lengths, seed, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
           mask_mode):
    _check_probabilities(zoneout_cell, zoneout_hidden, recurrent_dropout)
    _check_layer(x, (("h0", h0), ("c0", c0)), w_ih, w_hh, (("bias", bias),), 4, lengths, seed, direction, mask_mode)


def _check_probabilities(zoneout_cell, zoneout_hidden, recurrent_dropout):
    for name, value in (("zoneout_cell", zoneout_cell), ("zoneout_hidden", zoneout_hidden)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 <= recurrent_dropout < 1.0:
        raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout}")


def _check_gru_rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, direction, zoneout_hidden, recurrent_dropout,
                   mask_mode):
    if cell not in _CELL_NAMES:
        raise ValueError(f"cell must be a code in {sorted(_CELL_NAMES)} (1 gru, 2 rnn_tanh, 3 rnn_relu), got {cell}")
    # Contract sec. 4: "shared" ties a cell mask these cells do not have; the plain RNN has no gated
    # update for recurrent dropout to drop.
    if mask_mode == 1:
        raise ValueError("mask_mode 'shared' (1) ties the cell mask to the hidden mask: the GRU and RNN have no "
                         "cell state; use 'independent', 'timestep' or 'static'")
    if cell != gru_rnn_step.GRU and recurrent_dropout != 0.0:
        raise ValueError(f"recurrent_dropout must be 0 for the plain RNN (cell {_CELL_NAMES[cell]}: no gated "
                         f"update to drop), got {recurrent_dropout}")
    _check_probabilities(0.0, zoneout_hidden, recurrent_dropout)
    _check_layer(x, (("h0", h0),), w_ih, w_hh, (("b_ih", b_ih), ("b_hh", b_hh)), _reference.cell_rows(cell),
                 lengths, seed, direction, mask_mode)


def _check_layer(x, states, w_ih, w_hh, biases, rows, lengths, seed, direction, mask_mode):
    """The checks both op families share. states: (name, tensor) pairs of [B, H] states; biases:
    (name, tensor or None) pairs of [rows*H] biases; rows: G, W_hh's rows per hidden unit."""
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, I], got shape {tuple(x.shape)}")
    steps, batch, inputs = x.shape
    if steps == 0:
        raise ValueError("x must have at least one time step")
    if w_hh.dim() != 2 or w_hh.shape[0] != rows * w_hh.shape[1]:
        raise ValueError(f"w_hh must be [{rows}H, H], got shape {tuple(w_hh.shape)}")
    hidden = w_hh.shape[1]
    if tuple(w_ih.shape) != (rows * hidden, inputs):
        raise ValueError(f"w_ih must be [{rows * hidden}, {inputs}], got shape {tuple(w_ih.shape)}")
    for name, state in states:
        if tuple(state.shape) != (batch, hidden):
            raise ValueError(f"{name} must be [{batch}, {hidden}], got shape {tuple(state.shape)}")
    for name, bias in biases:
        if bias is not None and tuple(bias.shape) != (rows * hidden,):
            raise ValueError(f"{name} must be [{rows * hidden}], got shape {tuple(bias.shape)}")
    for name, tensor in (*states, ("w_ih", w_ih), ("w_hh", w_hh), *biases):
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
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a 0-dim int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
    if seed.device.type != "cpu" and seed.device != x.device:
        raise RuntimeError(f"seed must be on the CPU or on x's device {x.device}, got {seed.device}")
    if direction not in (0, 1):
        raise ValueError(f"direction must be 0 or 1, got {direction}")
    if mask_mode not in (0, 1, 2, 3):
        raise ValueError(f"mask_mode must be a code in 0..3, got {mask_mode}")


class _Settings:
    """Everything both passes derive from the scalar arguments (one place, so they cannot disagree)."""

    def __init__(self, x, w_hh, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden,
                 recurrent_dropout, mask_mode, training):
        self.device = x.device
        self.steps, self.batch, _ = x.shape
        self.hidden = w_hh.shape[1]
        self.acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.state_dtype = _ops.state_dtype(x.dtype)
        self.seed_in_memory = _reads_seed_from_memory(seed, x)
        if self.seed_in_memory:
            self.seed = seed  # read by the kernels: no host sync, and a graph replay sees its current value
        else:
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
            SEED_IN_MEMORY=self.seed_in_memory,
            WIDE=x.dtype not in _SIXTEEN_BIT, PRECISION=float32_dot_precision(x.dtype, x.device),
            ACCURATE=x.is_cuda,  # libdevice exp/tanh on a GPU; the interpreter has only tl.exp
            BLOCK_B=self.block_b, BLOCK_H=self.block_h,
            BLOCK_K=self.block_k, num_warps=num_warps)

    def order(self):
        """Positions t in processing order (direction 1 runs t = T-1..0; counters use t itself)."""
        return range(self.steps - 1, -1, -1) if self.direction == 1 else range(self.steps)

    def previous(self, t):
        return t + 1 if self.direction == 1 else t - 1

    def first(self):
        """The first position processed (the step whose h_{t-1} is h0)."""
        return self.steps - 1 if self.direction == 1 else 0

    def last(self):
        """The last position processed (the step whose state is the final one)."""
        return 0 if self.direction == 1 else self.steps - 1

    def run_forward(self, kernel, head, **meta):
        """One launch per step in processing order: kernel[grid](*head, t, t_prev, B, H, FIRST=...)."""
        launch = kernel[self.grid]
        meta = {**meta, **self.meta}
        with _on_device(self.device):
            for index, t in enumerate(self.order()):
                launch(*head, t, self.previous(t), self.batch, self.hidden, FIRST=index == 0, **meta)

    def run_backward(self, kernel, head, **meta):
        """One launch per step in reverse processing order: kernel[grid](*head, t, t_prev, t_next, B, H,
        FIRST=..., LAST=...), t_next the step processed after t in the forward pass."""
        launch = kernel[self.grid]
        meta = {**meta, **self.meta}
        order = list(self.order())
        t_next = order[-1]  # unused at the first backward step (LAST)
        with _on_device(self.device):
            for index in range(self.steps - 1, -1, -1):
                t = order[index]
                launch(*head, t, self.previous(t), t_next, self.batch, self.hidden, FIRST=index == 0,
                       LAST=index == self.steps - 1, **meta)
                t_next = t


def _lengths_arg(lengths, like):
    return lengths if lengths is not None else like  # any pointer: never read without HAS_LENGTHS


def _input_projection(x, w_ih, bias, s):
    """xp = x W_ih^T + bias of every step at once, [T, B, G*H] in the accumulation dtype. For 16-bit
    inputs in their dtype (fp32 accumulation in cuBLAS), then kept in float32 like the rest of the
    step's arithmetic."""
    xp = torch.matmul(x.reshape(s.steps * s.batch, -1), w_ih.t())
    if bias is not None:
        xp = xp + bias
    return xp.to(s.acc_dtype).reshape(s.steps, s.batch, -1).contiguous()


# After the backward loop: every big product over all steps at once. 16-bit inputs: operands in
# their dtype (tensor cores, fp32 accumulation), as in the recurrent product.
def _input_grads(d_x, x, w_ih):
    """(grad_x, grad_w_ih, grad_b_ih) from d_x [T, B, G*H], the gradient of the input parts xp."""
    d_flat = d_x.reshape(-1, d_x.shape[-1])
    d_op = d_flat.to(x.dtype)
    grad_x = (d_op @ w_ih).reshape(x.shape).to(x.dtype)
    grad_w_ih = (d_op.t() @ x.reshape(d_flat.shape[0], -1)).to(w_ih.dtype)
    return grad_x, grad_w_ih, d_flat.sum(0).to(w_ih.dtype)


def _recurrent_grads(d_h, dh_direct, y, h0, w_hh, s):
    """(grad_h0, grad_w_hh) from d_h [T, B, G*H], the gradient of the recurrent parts h_{t-1} W_hh^T,
    and dh_direct, the direct term the first processed step left for h0."""
    T, B, H = s.steps, s.batch, s.hidden
    if T > 1:  # h_{t-1} of every step, in the order of d_h's rows
        h_prev = torch.cat([y[1:], h0[None]]) if s.direction == 1 else torch.cat([h0[None], y[:-1]])
    else:
        h_prev = h0[None]
    d_op = d_h.reshape(T * B, -1).to(y.dtype)
    grad_w_hh = (d_op.t() @ h_prev.reshape(T * B, H)).to(w_hh.dtype)
    grad_h0 = (dh_direct + (d_h[s.first()].to(y.dtype) @ w_hh).to(s.acc_dtype)).to(h0.dtype)
    return grad_h0, grad_w_hh


@torch.library.custom_op("zoneout_fused::triton_layer_forward", mutates_args=())
def triton_layer_forward(x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_ih: torch.Tensor,
                         w_hh: torch.Tensor, bias: Optional[torch.Tensor], lengths: Optional[torch.Tensor],
                         seed: torch.Tensor, layer: int, direction: int, zoneout_cell: float,
                         zoneout_hidden: float, recurrent_dropout: float, mask_mode: int,
                         training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, h0, c0, w_ih, w_hh, bias, lengths, seed, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
           mask_mode)
    s = _Settings(x, w_hh, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
                  mask_mode, training)
    T, B, H = s.steps, s.batch, s.hidden
    x, h0, c0, w_ih, w_hh = (tensor.contiguous() for tensor in (x, h0, c0, w_ih, w_hh))
    xp = _input_projection(x, w_ih, bias, s)
    y = _empty(T, B, H, dtype=x.dtype, device=x.device)
    c_seq = _empty(T, B, H, dtype=s.state_dtype, device=x.device)
    gates = _empty(T, B, 4 * H, dtype=s.state_dtype, device=x.device)
    s.run_forward(lstm_forward_step_kernel,
                  (xp, w_hh, h0, c0, y, c_seq, gates, _lengths_arg(lengths, xp), s.params, s.seed, s.key2))
    c_n = c_seq[s.last()].to(x.dtype, copy=True)  # a copy: outputs must not alias each other
    return y, c_n, c_seq, gates


@torch.library.custom_op("zoneout_fused::triton_layer_backward", mutates_args=())
def triton_layer_backward(grad_y: torch.Tensor, grad_c_n: torch.Tensor, x: torch.Tensor, h0: torch.Tensor,
                          c0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias: Optional[torch.Tensor],
                          lengths: Optional[torch.Tensor], seed: torch.Tensor, layer: int, direction: int,
                          zoneout_cell: float, zoneout_hidden: float, recurrent_dropout: float, mask_mode: int,
                          training: bool, y: torch.Tensor, c_seq: torch.Tensor, gates: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor]:
    _check(x, h0, c0, w_ih, w_hh, bias, lengths, seed, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
           mask_mode)
    s = _Settings(x, w_hh, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden, recurrent_dropout,
                  mask_mode, training)
    T, B, H = s.steps, s.batch, s.hidden
    x, h0, c0, w_ih, w_hh, y, c_seq, gates, grad_y = (
        tensor.contiguous() for tensor in (x, h0, c0, w_ih, w_hh, y, c_seq, gates, grad_y))

    d_pre = _empty(T, B, 4 * H, dtype=s.acc_dtype, device=x.device)
    dh = torch.zeros(B, H, dtype=s.acc_dtype, device=x.device)  # direct term m_h * dh from step t_next
    dc = grad_c_n.to(s.acc_dtype, copy=True).contiguous()
    s.run_backward(lstm_backward_step_kernel,
                   (grad_y, w_hh, c0, c_seq, gates, d_pre, dh, dc, _lengths_arg(lengths, d_pre), s.params, s.seed,
                    s.key2))
    grad_x, grad_w_ih, grad_bias = _input_grads(d_pre, x, w_ih)
    grad_h0, grad_w_hh = _recurrent_grads(d_pre, dh, y, h0, w_hh, s)
    grad_c0 = dc.to(c0.dtype, copy=True)
    return grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias


_ops.register_layer_op_pair("zoneout_fused::triton_layer_forward", "zoneout_fused::triton_layer_backward")
# As the compiled backends' ops are called: below autograd when nothing needs a gradient, by graph
# replay when CUDA graphs are on (zoneout_fused/graphs.py).
_lstm_layer = _ops._op_layer("zoneout_fused::triton_layer_forward")


def layer_forward(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction, zoneout_cell, zoneout_hidden,
                  recurrent_dropout, mask_mode, training):
    """The layer op (zoneout_fused.ops's signature) on Triton kernels: returns (y, c_n)."""
    return _lstm_layer(x, h0, c0, w_ih, w_hh, bias, lengths, seed, int(layer), int(direction), float(zoneout_cell),
                       float(zoneout_hidden), float(recurrent_dropout), int(mask_mode), bool(training))


# ---------------------------------------------------------------------------------------------
# The GRU / plain-RNN layer op (gru_rnn_step.py's kernels; schema in zoneout_fused/ops.py).
# ---------------------------------------------------------------------------------------------
def _gru_rnn_settings(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction, zoneout_hidden,
                      recurrent_dropout, mask_mode, training):
    _check_gru_rnn(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, direction, zoneout_hidden, recurrent_dropout,
                   mask_mode)
    # The LSTM's masks with z_c = 0: the hidden mask m_h and the dropout scale of the candidate n.
    return _Settings(x, w_hh, lengths, seed, layer, direction, 0.0, zoneout_hidden, recurrent_dropout, mask_mode,
                     training)


@torch.library.custom_op("zoneout_fused::triton_gru_rnn_layer_forward", mutates_args=())
def triton_gru_rnn_layer_forward(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                                 b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor],
                                 lengths: Optional[torch.Tensor], seed: torch.Tensor, cell: int, layer: int,
                                 direction: int, zoneout_hidden: float, recurrent_dropout: float, mask_mode: int,
                                 training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    s = _gru_rnn_settings(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction, zoneout_hidden,
                          recurrent_dropout, mask_mode, training)
    T, B, H = s.steps, s.batch, s.hidden
    x, h0, w_ih, w_hh = (tensor.contiguous() for tensor in (x, h0, w_ih, w_hh))
    xp = _input_projection(x, w_ih, b_ih, s)
    y = _empty(T, B, H, dtype=x.dtype, device=x.device)
    gates = _empty(T, B, _reference.saved_columns(cell) * H, dtype=s.state_dtype, device=x.device)
    b_hh_arg = b_hh.contiguous() if b_hh is not None else xp  # any pointer: never read without HAS_B_HH
    s.run_forward(gru_rnn_forward_step_kernel,
                  (xp, w_hh, b_hh_arg, h0, y, gates, _lengths_arg(lengths, xp), s.params, s.seed, s.key2),
                  CELL=int(cell), HAS_B_HH=b_hh is not None)
    return y, gates


@torch.library.custom_op("zoneout_fused::triton_gru_rnn_layer_backward", mutates_args=())
def triton_gru_rnn_layer_backward(grad_y: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor,
                                  w_hh: torch.Tensor, b_ih: Optional[torch.Tensor], b_hh: Optional[torch.Tensor],
                                  lengths: Optional[torch.Tensor], seed: torch.Tensor, cell: int, layer: int,
                                  direction: int, zoneout_hidden: float, recurrent_dropout: float, mask_mode: int,
                                  training: bool, y: torch.Tensor, gates: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    s = _gru_rnn_settings(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction, zoneout_hidden,
                          recurrent_dropout, mask_mode, training)
    T, B, H = s.steps, s.batch, s.hidden
    x, h0, w_ih, w_hh, y, gates, grad_y = (
        tensor.contiguous() for tensor in (x, h0, w_ih, w_hh, y, gates, grad_y))

    rows = _reference.cell_rows(cell)
    # d_h: gradient of the recurrent parts; d_x: of the input parts (the GRU's differ in the n row,
    # d_hp_n = d_n * r; the RNN's are the same buffer).
    d_h = _empty(T, B, rows * H, dtype=s.acc_dtype, device=x.device)
    d_x = _empty(T, B, rows * H, dtype=s.acc_dtype, device=x.device) if cell == gru_rnn_step.GRU else d_h
    dh = torch.zeros(B, H, dtype=s.acc_dtype, device=x.device)  # direct term from step t_next
    s.run_backward(gru_rnn_backward_step_kernel,
                   (grad_y, w_hh, h0, y, gates, d_x, d_h, dh, _lengths_arg(lengths, d_h), s.params, s.seed, s.key2),
                   CELL=int(cell))
    grad_x, grad_w_ih, grad_b_ih = _input_grads(d_x, x, w_ih)
    grad_h0, grad_w_hh = _recurrent_grads(d_h, dh, y, h0, w_hh, s)
    # The RNN's bias gradients are equal; a copy, since outputs must not alias each other.
    grad_b_hh = grad_b_ih.clone() if d_x is d_h else d_h.reshape(T * B, rows * H).sum(0).to(w_hh.dtype)
    return grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh


_ops.register_layer_op_pair("zoneout_fused::triton_gru_rnn_layer_forward",
                            "zoneout_fused::triton_gru_rnn_layer_backward", _ops.GRU_RNN_OPS)
_gru_rnn_layer = _ops._op_layer("zoneout_fused::triton_gru_rnn_layer_forward", _ops.GRU_RNN_OPS)


def gru_rnn_layer_forward(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction, zoneout_hidden,
                          recurrent_dropout, mask_mode, training):
    """The GRU / plain-RNN layer op (zoneout_fused.ops's signature) on Triton kernels: returns y."""
    return _gru_rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, int(cell), int(layer), int(direction),
                          float(zoneout_hidden), float(recurrent_dropout), int(mask_mode), bool(training))
