"""One op per layer direction, backend selection, and autograd for the fused backends.

Every backend computes one layer direction of a zoneout LSTM with the same signature
(the "layer op"); ZoneoutLSTM calls it once per (layer, direction), ZoneoutLSTMCell with T = 1:

    layer(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction,
          zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode, training) -> (y, c_n)

    x        [T, B, I]  time-major layer input (float32/float64; float16/bfloat16 on GPU)
    h0, c0   [B, H]     initial states, same dtype and device as x
    w_ih     [4H, I], w_hh [4H, H]; rows i, f, g, o as in torch.nn.LSTM
    bias     [4H] or None: b_ih + b_hh (the module adds them; their gradients are equal)
    lengths  [B] int64 on x's device, or None: steps t >= lengths[b] leave example b's state
             untouched (both directions, t being the position in the input)
    seed     0-dim int64 CPU tensor: the Philox key (contract sec. 2); ignored in evaluation
    layer, direction (0 forward, 1 reverse), mask_mode (masks.MASK_MODE_CODES): ints
    zoneout_cell, zoneout_hidden, recurrent_dropout: floats; training: bool
    y        [T, B, H]  the zoned h_t (frozen state past a sequence's end); h_n is y[-1]
             for direction 0 and y[0] for direction 1
    c_n      [B, H]     the final zoned cell state

The compiled backends expose it as a pair of torch ops, `zoneout_fused::{name}_layer_forward`
returning (y, c_n, c_seq, gates) and `zoneout_fused::{name}_layer_backward`; this module
attaches the autograd formula and fake (meta) kernels to them, so torch.compile sees one
opaque op per direction. Forward schema (backward appends grads and saved tensors):

    {name}_layer_forward(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? bias,
        Tensor? lengths, Tensor seed, int layer, int direction, float zoneout_cell,
        float zoneout_hidden, float recurrent_dropout, int mask_mode, bool training)
        -> (Tensor y, Tensor c_n, Tensor c_seq, Tensor gates)
    {name}_layer_backward(Tensor grad_y, Tensor grad_c_n, Tensor x, Tensor h0, Tensor c0,
        Tensor w_ih, Tensor w_hh, Tensor? bias, Tensor? lengths, Tensor seed, int layer,
        int direction, float zoneout_cell, float zoneout_hidden, float recurrent_dropout,
        int mask_mode, bool training, Tensor y, Tensor c_seq, Tensor gates)
        -> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh,
            Tensor grad_bias)

    c_seq [T, B, H] (zoned c_t) and gates [T, B, 4H] (activations i, f, g, o; zero past a
    sequence's end) are saved for backward, in float32 for float16/bfloat16 inputs, else in
    x's dtype; they are not differentiable. grad_bias is [4H] even when bias is None.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reference

LAYER_FORWARD_FIELDS = ("x", "h0", "c0", "w_ih", "w_hh", "bias", "lengths", "seed", "layer", "direction",
                        "zoneout_cell", "zoneout_hidden", "recurrent_dropout", "mask_mode", "training")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved cell states and gates: float32 for the 16-bit types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------
# Autograd and fake kernels for a fused backend's (forward, backward) op pair.
# --------------------------------------------------------------------------------------
def register_layer_op_pair(forward_op_name: str, backward_op_name: str) -> None:
    """Attach fake kernels and the autograd formula to `zoneout_fused::*_layer_forward/backward`."""

    @torch.library.register_fake(forward_op_name)
    def _forward_fake(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction, zoneout_cell,
                      zoneout_hidden, recurrent_dropout, mask_mode, training):
        steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        saved = state_dtype(x.dtype)
        return (x.new_empty(steps, batch, hidden), x.new_empty(batch, hidden),
                x.new_empty(steps, batch, hidden, dtype=saved), x.new_empty(steps, batch, 4 * hidden, dtype=saved))

    @torch.library.register_fake(backward_op_name)
    def _backward_fake(grad_y, grad_c_n, x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction,
                       zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode, training, y, c_seq, gates):
        # The ops return contiguous gradients whatever the inputs' strides.
        return tuple(t.new_empty(t.shape) for t in (x, h0, c0, w_ih, w_hh)) + (w_hh.new_empty(w_hh.shape[0]),)

    backward_op = _resolve_op(backward_op_name)

    def setup_context(ctx, inputs, output):
        y, _, c_seq, gates = output
        ctx.mark_non_differentiable(c_seq, gates)
        # No zero tensors for the outputs nobody differentiates (c_seq, gates, often c_n):
        # backward treats a None gradient as zero itself.
        ctx.set_materialize_grads(False)
        tensors = inputs[:8]  # x, h0, c0, w_ih, w_hh, bias, lengths, seed
        ctx.has_bias = inputs[5] is not None
        ctx.has_lengths = inputs[6] is not None
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in tensors), y, c_seq, gates)
        ctx.scalars = inputs[8:]

    def backward(ctx, grad_y, grad_c_n, _grad_c_seq, _grad_gates):
        x, h0, c0, w_ih, w_hh, bias, lengths, seed, y, c_seq, gates = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        lengths = lengths if ctx.has_lengths else None
        grad_y = torch.zeros_like(y) if grad_y is None else grad_y.contiguous()
        grad_c_n = torch.zeros_like(h0) if grad_c_n is None else grad_c_n.contiguous()
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            grads = differentiable_layer_backward(grad_y, grad_c_n, (x, h0, c0, w_ih, w_hh, bias), lengths, seed,
                                                  ctx.scalars, ctx.needs_input_grad[:6])
        else:
            grads = backward_op(grad_y, grad_c_n, x, h0, c0, w_ih, w_hh, bias, lengths, seed, *ctx.scalars,
                                y, c_seq, gates)
        grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias = grads
        return (grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias if ctx.has_bias else None,
                None, None, None, None, None, None, None, None, None)

    torch.library.register_autograd(forward_op_name, backward, setup_context=setup_context)


def differentiable_layer_backward(grad_y, grad_c_n, tensors, lengths, seed, scalars, needs_grad):
    """(grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias) as differentiable functions of
    the layer's inputs and of grad_y, grad_c_n: what backward with create_graph=True needs
    (gradient penalties, meta-learning, second-order gradients).

    The fused backward ops are not differentiable, so the layer is run again by the reference,
    which draws the same masks from the same seed (the same function, to rounding), and
    differentiated with create_graph. Only then: a plain backward stays on the fused op.
    """
    with torch.enable_grad():
        y, c_n = reference.lstm_layer(*tensors, lengths, seed, *scalars)
        wanted = [t for t, need in zip(tensors, needs_grad) if t is not None and need]
        found = iter(torch.autograd.grad((y, c_n), wanted, (grad_y, grad_c_n), create_graph=True, allow_unused=True))
    grads = []
    for t, need in zip(tensors, needs_grad):
        grad = next(found) if (t is not None and need) else None
        grads.append(torch.zeros_like(t) if grad is None and t is not None and need else grad)
    return tuple(grads)


def _autograd_idle(args) -> bool:
    """True when autograd has nothing to record for a layer op call with these arguments."""
    if torch.compiler.is_compiling():
        return False  # let the compiler see the op as registered
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _resolve_op(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _op_layer(forward_op_name: str) -> Callable:
    forward_op = _resolve_op(forward_op_name)

    def layer(*args):
        if _autograd_idle(args):
            # Nothing to differentiate (no_grad, inference): skip the autograd kernel, a Python
            # function that would cost a step of a decoder's cell more than the step itself
            # (measured at B=1, I=H=16: 36 us a call through it, 18 us below it).
            with torch._C._AutoDispatchBelowAutograd():
                y, c_n, _, _ = forward_op(*args)
        else:
            y, c_n, _, _ = forward_op(*args)
        return y, c_n

    return layer


# --------------------------------------------------------------------------------------
# Backends.
# --------------------------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    # Returns None when the backend can run on `device`, else the reason it cannot and how to fix it.
    unavailable_reason: Callable[[torch.device], Optional[str]]
    # The layer op (signature in the module docstring); resolved lazily so imports stay cheap.
    load_layer: Callable[[], Callable]
    dtypes: Callable[[torch.device], tuple]
    supports_projection: bool = False

    _layer: Optional[Callable] = None

    def layer(self, *args):
        if self._layer is None:
            self._layer = self.load_layer()
        return self._layer(*args)


# Why each compiled extension failed to import ("" once it imported); filled on first use.
_EXTENSION_ERRORS: dict = {}
_HOW_TO_BUILD = {
    "cpu": "build it with `pip install --no-build-isolation -e .` from the source tree",
    "cuda": ("it builds when torch has CUDA and nvcc is found: `pip install --no-build-isolation -e .` "
             "(ZONEOUT_FUSED_FORCE_CUDA=1 to insist)"),
}


def _load_extension(backend: str) -> Optional[str]:
    """Import the extension of a compiled backend once, registering autograd for its ops.

    Returns None on success, else why it failed and how to build it.
    """
    if backend not in _EXTENSION_ERRORS:
        module = {"cpu": "_C", "cuda": "_C_cuda"}[backend]
        try:
            importlib.import_module(f"{__package__}.{module}")  # registers zoneout_fused::{backend}_layer_*
            register_layer_op_pair(f"zoneout_fused::{backend}_layer_forward",
                                   f"zoneout_fused::{backend}_layer_backward")
            _EXTENSION_ERRORS[backend] = ""
        except ImportError as error:
            _EXTENSION_ERRORS[backend] = (f"the extension zoneout_fused.{module} is not built ({error}); "
                                          + _HOW_TO_BUILD[backend])
    return _EXTENSION_ERRORS[backend] or None


def _cpu_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cpu":
        return f"backend 'cpu' runs on CPU tensors only, got device {device}"
    return _load_extension("cpu")


def _cuda_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"backend 'cuda' runs on CUDA tensors only, got device {device}"
    return _load_extension("cuda")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "backend 'triton' needs the triton package: `pip install triton`"
    if device.type == "cpu" and not triton_interpreter_enabled():
        return ("backend 'triton' runs on CUDA tensors; on CPU only under the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton)")
    if device.type not in ("cpu", "cuda"):
        return f"backend 'triton' does not run on device {device}"
    try:
        from .triton import layer_forward  # noqa: F401
    except ImportError as error:
        return f"the Triton backend failed to import: {error}"
    return None


def _compiled_layer(backend: str) -> Callable[[], Callable]:
    """Loader of a compiled backend's layer op: imports its extension first (once)."""

    def load():
        error = _load_extension(backend)
        if error is not None:
            raise RuntimeError(error)
        return _op_layer(f"zoneout_fused::{backend}_layer_forward")

    return load


def _load_triton_layer():
    from .triton import layer_forward
    return layer_forward


def _float_dtypes(device: torch.device) -> tuple:
    if device.type == "cuda":
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64)


BACKENDS = {
    "reference": Backend("reference", lambda device: None, lambda: reference.lstm_layer,
                         lambda device: (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                         supports_projection=True),
    "cpu": Backend("cpu", _cpu_unavailable, _compiled_layer("cpu"),
                   lambda device: (torch.float32, torch.float64)),
    "triton": Backend("triton", _triton_unavailable, _load_triton_layer,
                      lambda device: ((torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda"
                                      else (torch.float32, torch.float64))),
    "cuda": Backend("cuda", _cuda_unavailable, _compiled_layer("cuda"), _float_dtypes),
}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)

# "auto" tries these in order; the Triton interpreter is for tests, never picked on CPU.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


def available_backends(device="cpu") -> list[str]:
    """Backends that can run on `device` in this installation, fastest first."""
    device = torch.device(device)
    names = list(_AUTO_ORDER.get(device.type, ("reference",)))
    names += [name for name in BACKENDS if name not in names]
    return [name for name in names if BACKENDS[name].unavailable_reason(device) is None]


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, *, projection: bool = False) -> Backend:
    """The Backend to run for (device, dtype); raises a RuntimeError saying why one cannot."""
    if requested not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {requested!r}")
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            backend = BACKENDS[name]
            if (backend.unavailable_reason(device) is None and dtype in backend.dtypes(device)
                    and (backend.supports_projection or not projection)):
                return backend
        return BACKENDS["reference"]
    backend = BACKENDS[requested]
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} is not available: {reason}")
    if dtype not in backend.dtypes(device):
        raise TypeError(f"backend={requested!r} does not support dtype {dtype} on {device.type}; "
                        f"supported: {backend.dtypes(device)}")
    if projection and not backend.supports_projection:
        raise ValueError(f"backend={requested!r} does not support proj_size > 0; use backend='reference' or 'auto'")
    return backend
