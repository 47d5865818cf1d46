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
    seed     0-dim int64 tensor: the Philox key (contract sec. 2), on the CPU (read on the host) or
             on x's GPU (read by the kernels, never by the host: what CUDA graphs need); ignored in
             evaluation
    layer, direction (0 forward, 1 reverse), mask_mode (masks.MASK_MODE_CODES): ints
    zoneout_cell, zoneout_hidden, recurrent_dropout: floats; training: bool
    y        [T, B, H]  the zoned h_t (frozen state past a sequence's end); h_n is y[-1]
             for direction 0 and y[0] for direction 1
    c_n      [B, H]     the final zoned cell state

The compiled backends expose it as a pair of torch ops, `zoneout_fused::{name}_layer_forward`
returning (y, c_n, c_seq, gates) and `zoneout_fused::{name}_layer_backward`; this module
attaches fake (meta) kernels to them, and the autograd formula unless the extension has its own
(the cpu ops' is C++: csrc/layer_autograd.h), so torch.compile sees one opaque op per direction.
Forward schema (backward appends grads and saved tensors):

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

The GRU and the plain RNN (contract sec. 4) have a second layer op of the same shape, with the
hidden state only, the two biases kept apart (nn.GRU's b_hn sits inside the reset product) and a
cell code (reference.CELL_CODES: 1 gru, 2 rnn_tanh, 3 rnn_relu):

    gru_rnn_layer(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction,
                  zoneout_hidden, recurrent_dropout, mask_mode, training) -> y

    w_ih [G*H, I], w_hh [G*H, H], b_ih, b_hh [G*H] or None, with G = 3 (rows r, z, n) for the
    GRU and 1 for the RNN; recurrent_dropout is 0 for the RNN. The compiled ops:

    {name}_gru_rnn_layer_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih,
        Tensor? b_hh, Tensor? lengths, Tensor seed, int cell, int layer, int direction,
        float zoneout_hidden, float recurrent_dropout, int mask_mode, bool training)
        -> (Tensor y, Tensor gates)
    {name}_gru_rnn_layer_backward(Tensor grad_y, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh,
        Tensor? b_ih, Tensor? b_hh, Tensor? lengths, Tensor seed, int cell, int layer,
        int direction, float zoneout_hidden, float recurrent_dropout, int mask_mode,
        bool training, Tensor y, Tensor gates)
        -> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih,
            Tensor grad_b_hh)

    gates: the GRU's [T, B, 4H] = (r, u, n, hp_n) with hp_n = h_{t-1} W_hn^T + b_hn; the RNN's
    [T, B, H] = the candidate h~ (its derivative follows from it); zero past a sequence's end,
    state dtype as above. grad_b_ih, grad_b_hh are [G*H] even when the biases are None. The
    per-element math is csrc/zoneout_lstm.h's gru_forward/gru_backward/rnn_forward/rnn_backward.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import graphs, reference

LAYER_FORWARD_FIELDS = ("x", "h0", "c0", "w_ih", "w_hh", "bias", "lengths", "seed", "layer", "direction",
                        "zoneout_cell", "zoneout_hidden", "recurrent_dropout", "mask_mode", "training")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved cell states and gates: float32 for the 16-bit types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# --------------------------------------------------------------------------------------
# Autograd and fake kernels for a fused backend's (forward, backward) op pair.
#
# Both families of layer ops (the LSTM's and the GRU/RNN's) have the same shape: 8 tensor
# inputs (6 differentiable ones, then lengths and seed), scalars, outputs of which some are
# differentiable and some saved for backward; the backward op takes the differentiable
# outputs' gradients, the forward inputs and the saved outputs, and returns the 6 gradients.
# A LayerOpFamily says which is which; one registration serves both.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerOpFamily:
    name: str
    differentiable_outputs: tuple  # indices of the forward outputs that carry gradients
    saved_outputs: tuple  # indices of the forward outputs the backward op takes
    bias_inputs: int  # how many of the 6 differentiable inputs are biases (last, after W_hh)
    forward_fake: Callable  # (inputs...) -> fake outputs
    reference: Callable  # (tensors[6], lengths, seed, scalars) -> the differentiable outputs


def _lstm_forward_fake(x, h0, c0, w_ih, w_hh, bias, lengths, seed, layer, direction, zoneout_cell,
                       zoneout_hidden, recurrent_dropout, mask_mode, training):
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    saved = state_dtype(x.dtype)
    return (x.new_empty(steps, batch, hidden), x.new_empty(batch, hidden),
            x.new_empty(steps, batch, hidden, dtype=saved), x.new_empty(steps, batch, 4 * hidden, dtype=saved))


def _gru_rnn_forward_fake(x, h0, w_ih, w_hh, b_ih, b_hh, lengths, seed, cell, layer, direction, zoneout_hidden,
                          recurrent_dropout, mask_mode, training):
    steps, batch, _ = x.shape
    hidden = w_hh.shape[1]
    return (x.new_empty(steps, batch, hidden),
            x.new_empty(steps, batch, reference.saved_columns(cell) * hidden, dtype=state_dtype(x.dtype)))


def _lstm_reference(tensors, lengths, seed, scalars):
    return reference.lstm_layer(*tensors, lengths, seed, *scalars)


def _gru_rnn_reference(tensors, lengths, seed, scalars):
    return (reference.gru_rnn_layer(*tensors, lengths, seed, *scalars),)


LSTM_OPS = LayerOpFamily("layer", (0, 1), (0, 2, 3), 1, _lstm_forward_fake, _lstm_reference)
GRU_RNN_OPS = LayerOpFamily("gru_rnn_layer", (0,), (0, 1), 2, _gru_rnn_forward_fake, _gru_rnn_reference)


def register_layer_op_pair(forward_op_name: str, backward_op_name: str, family: LayerOpFamily = LSTM_OPS) -> None:
    """Attach fake kernels and the autograd formula to `zoneout_fused::*_forward/backward`.

    The cpu extension's forward ops carry their autograd kernel in C++ (csrc/layer_autograd.h: the
    same formula without a Python autograd Function's 10 us a call); it calls back into
    differentiable_layer_backward for create_graph=True. The others get it from here."""
    torch.library.register_fake(forward_op_name)(family.forward_fake)

    @torch.library.register_fake(backward_op_name)
    def _backward_fake(*args):
        # The ops return contiguous gradients whatever the inputs' strides; the bias gradients
        # (the last family.bias_inputs inputs of the 6) are [G*H] (W_hh's rows) even without a bias.
        tensors = args[len(family.differentiable_outputs):][:6]
        shaped = tensors[:6 - family.bias_inputs]
        w_hh = shaped[-1]
        return (tuple(t.new_empty(t.shape) for t in shaped)
                + tuple(w_hh.new_empty(w_hh.shape[0]) for _ in range(family.bias_inputs)))

    setup_context, backward = _layer_autograd(family, _resolve_op(backward_op_name))
    _FAMILIES[forward_op_name] = family
    if torch._C._dispatch_has_kernel_for_dispatch_key(forward_op_name, "AutogradCPU"):
        _CPP_AUTOGRAD.add(forward_op_name)
    else:
        torch.library.register_autograd(forward_op_name, backward, setup_context=setup_context)
    _AUTOGRAD[forward_op_name] = (setup_context, backward)


# The layer ops whose autograd kernel is csrc/layer_autograd.h's (the cpu extension's).
_CPP_AUTOGRAD: set = set()

# forward op name -> its LayerOpFamily, as registered.
_FAMILIES: dict = {}


# forward op name -> (setup_context, backward): the autograd formula of each registered layer op
# in Python, registered with the op unless it has the C++ one, and used by _layer_function's eager
# and CUDA-graph paths.
_AUTOGRAD: dict = {}


# Saved in place of an absent input (lengths, a bias): one shared tensor, never written to.
_ABSENT = torch.empty(0)


def _layer_autograd(family: LayerOpFamily, backward_op):
    """(setup_context, backward) of a layer op pair."""

    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*(o for k, o in enumerate(output) if k not in family.differentiable_outputs))
        # No zero tensors for the outputs nobody differentiates (often c_n): backward makes them.
        ctx.set_materialize_grads(False)
        tensors = inputs[:8]  # 6 differentiable inputs, lengths, seed
        ctx.present = tuple(t is not None for t in tensors)
        ctx.save_for_backward(*(t if t is not None else _ABSENT for t in tensors),
                              *(output[k] for k in family.saved_outputs))
        ctx.output_like = [(output[k].shape, output[k].dtype, output[k].device) for k in family.differentiable_outputs]
        ctx.scalars = inputs[8:]

    def backward(ctx, *grad_outputs):
        saved = ctx.saved_tensors
        tensors = [t if present else None for t, present in zip(saved[:8], ctx.present)]
        grads_out = []
        for k, (shape, dtype, device) in zip(family.differentiable_outputs, ctx.output_like):
            grad = grad_outputs[k]
            grads_out.append(torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad.contiguous())
        lengths, seed = tensors[6], tensors[7]
        if torch.is_grad_enabled():  # create_graph=True: the gradient itself must be differentiable
            grads = differentiable_layer_backward(family, grads_out, tensors[:6], lengths, seed, ctx.scalars,
                                                  ctx.needs_input_grad[:6])
        else:
            args = (*grads_out, *tensors, *ctx.scalars, *saved[8:])
            grads = graphs.call(backward_op, args) if getattr(ctx, "graphed", False) else backward_op(*args)
        grads = [g if present else None for g, present in zip(grads, ctx.present[:6])]
        return tuple(grads) + (None,) * (2 + len(ctx.scalars))

    return setup_context, backward


def differentiable_layer_backward(family: LayerOpFamily, grad_outputs, tensors, lengths, seed, scalars, needs_grad):
    """The 6 input gradients as differentiable functions of the layer's inputs and of the output
    gradients: what backward with create_graph=True needs (gradient penalties, meta-learning,
    second-order gradients).

    The fused backward ops are not differentiable, so the layer is run again by the reference,
    which draws the same masks from the same seed (the same function, to rounding), and
    differentiated with create_graph. Only then: a plain backward stays on the fused op.
    """
    with torch.enable_grad():
        outputs = family.reference(tensors, lengths, seed, scalars)
        wanted = [t for t, need in zip(tensors, needs_grad) if t is not None and need]
        found = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, allow_unused=True))
    grads = []
    for t, need in zip(tensors, needs_grad):
        grad = next(found) if (t is not None and need) else None
        grads.append(torch.zeros_like(t) if grad is None and t is not None and need else grad)
    return tuple(grads)


def _differentiable_backward_for_cpp(forward_op_name, grad_outputs, tensors, lengths, seed, scalars, needs_grad):
    """differentiable_layer_backward for the C++ autograd kernel (csrc/layer_autograd.h)."""
    return differentiable_layer_backward(_FAMILIES[forward_op_name], grad_outputs, tensors, lengths, seed, scalars,
                                         needs_grad)


def _autograd_idle(args) -> bool:
    """True when autograd has nothing to record for a layer op call with these arguments."""
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _resolve_op(qualified_name: str):
    namespace, name = qualified_name.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _op_layer(forward_op_name: str, family: LayerOpFamily = LSTM_OPS) -> Callable:
    """The Python layer function over a compiled forward op: returns its differentiable outputs,
    (y, c_n) for the LSTM, y for the GRU/RNN."""
    forward_op = _resolve_op(forward_op_name)
    wanted = family.differentiable_outputs
    cpp_autograd = forward_op_name in _CPP_AUTOGRAD

    def layer(*args):
        if graphs.wanted(args):
            outputs = _layer_function(forward_op_name, forward_op, graphed=True).apply(*args)
        elif cpp_autograd or torch.compiler.is_compiling():
            # The op as registered: the compiler sees it so; a C++ autograd kernel costs little.
            outputs = forward_op(*args)
        elif _autograd_idle(args):
            # Nothing to differentiate (no_grad, inference): skip the autograd kernel, a Python
            # function that would cost a step of a decoder's cell more than the step itself
            # (measured at B=1, I=H=16: 36 us a call through it, 18 us below it).
            with torch._C._AutoDispatchBelowAutograd():
                outputs = forward_op(*args)
        else:
            # Eager with autograd: the registered formula in an autograd Function of our own. The
            # op's autograd kernel would spend 44 us a call re-parsing its schema (torch's
            # fill_defaults), four times a small cell step.
            outputs = _layer_function(forward_op_name, forward_op, graphed=False).apply(*args)
        return outputs[0] if len(wanted) == 1 else tuple(outputs[k] for k in wanted)

    return layer


_FUNCTIONS: dict = {}


def _layer_function(forward_op_name: str, forward_op, graphed: bool) -> type:
    """An autograd Function running a layer op with the op's own autograd formula (_AUTOGRAD):
    the op below autograd, or (graphed) by replaying its CUDA graph (graphs.py), in which case its
    backward replays the backward op's graph too."""
    key = (forward_op_name, graphed)
    if key not in _FUNCTIONS:
        setup_context, backward = _AUTOGRAD[forward_op_name]

        class LayerOp(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                if graphed:
                    outputs = graphs.call(forward_op, inputs)
                else:
                    with torch._C._AutoDispatchBelowAutograd():
                        outputs = forward_op(*inputs)
                setup_context(ctx, inputs, outputs)
                ctx.graphed = graphed
                return outputs

            @staticmethod
            def backward(ctx, *grad_outputs):
                return backward(ctx, *grad_outputs)

        _FUNCTIONS[key] = LayerOp
    return _FUNCTIONS[key]


# --------------------------------------------------------------------------------------
# Backends.
# --------------------------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    # Returns None when the backend can run on `device`, else the reason it cannot and how to fix it.
    unavailable_reason: Callable[[torch.device], Optional[str]]
    # The layer ops (signatures in the module docstring); resolved lazily so imports stay cheap.
    load_layer: Callable[[], Callable]
    dtypes: Callable[[torch.device], tuple]
    supports_projection: bool = False
    load_gru_rnn_layer: Optional[Callable[[], Callable]] = None

    _layer: Optional[Callable] = None
    _gru_rnn_layer: Optional[Callable] = None

    def load(self, cell: str = "lstm") -> None:
        """Loads the layer op of `cell`'s kind ("lstm", or a GRU/RNN kind) if it is not yet."""
        if cell == "lstm":
            if self._layer is None:
                self._layer = self.load_layer()
        elif self._gru_rnn_layer is None:
            self._gru_rnn_layer = self.load_gru_rnn_layer()

    def layer(self, *args):
        self.load("lstm")
        return self._layer(*args)

    def gru_rnn_layer(self, *args):
        self.load("gru")
        return self._gru_rnn_layer(*args)


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
            extension = importlib.import_module(f"{__package__}.{module}")  # registers zoneout_fused::{backend}_layer_*
            if hasattr(extension, "_set_differentiable_backward"):
                extension._set_differentiable_backward(_differentiable_backward_for_cpp)
            register_layer_op_pair(f"zoneout_fused::{backend}_layer_forward",
                                   f"zoneout_fused::{backend}_layer_backward")
            if hasattr(torch.ops.zoneout_fused, f"{backend}_gru_rnn_layer_forward"):
                register_layer_op_pair(f"zoneout_fused::{backend}_gru_rnn_layer_forward",
                                       f"zoneout_fused::{backend}_gru_rnn_layer_backward", GRU_RNN_OPS)
            _EXTENSION_ERRORS[backend] = ""
        except ImportError as error:
            _EXTENSION_ERRORS[backend] = (f"the extension zoneout_fused.{module} is not built ({error}); "
                                          + _HOW_TO_BUILD[backend])
    return _EXTENSION_ERRORS[backend] or None


_CPU_CELL_STEP: list = []  # (filled once: a decoder asks at every step)


def cpu_cell_step() -> Optional[Callable]:
    """The cpu extension's cell step in one call (csrc/cell_step.h), or None where it is not built."""
    if not _CPU_CELL_STEP:
        built = _load_extension("cpu") is None
        _CPU_CELL_STEP.append(importlib.import_module(f"{__package__}._C")._cell_step if built else None)
    return _CPU_CELL_STEP[0]


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


def _compiled_layer(backend: str, family: LayerOpFamily = LSTM_OPS) -> Callable[[], Callable]:
    """Loader of a compiled backend's layer op: imports its extension first (once)."""

    def load():
        error = _load_extension(backend)
        if error is not None:
            raise RuntimeError(error)
        return _op_layer(f"zoneout_fused::{backend}_{family.name}_forward", family)

    return load


def _load_triton_layer():
    from .triton import layer_forward
    return layer_forward


def _load_triton_gru_rnn_layer():
    from .triton import gru_rnn_layer_forward
    return gru_rnn_layer_forward


def _float_dtypes(device: torch.device) -> tuple:
    if device.type == "cuda":
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    return (torch.float32, torch.float64)


BACKENDS = {
    "reference": Backend("reference", lambda device: None, lambda: reference.lstm_layer,
                         lambda device: (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                         supports_projection=True, load_gru_rnn_layer=lambda: reference.gru_rnn_layer),
    "cpu": Backend("cpu", _cpu_unavailable, _compiled_layer("cpu"),
                   lambda device: (torch.float32, torch.float64),
                   load_gru_rnn_layer=_compiled_layer("cpu", GRU_RNN_OPS)),
    "triton": Backend("triton", _triton_unavailable, _load_triton_layer,
                      lambda device: ((torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda"
                                      else (torch.float32, torch.float64)),
                      load_gru_rnn_layer=_load_triton_gru_rnn_layer),
    "cuda": Backend("cuda", _cuda_unavailable, _compiled_layer("cuda"), _float_dtypes,
                    load_gru_rnn_layer=_compiled_layer("cuda", GRU_RNN_OPS)),
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


def _gru_rnn_unavailable(backend: Backend, device: torch.device) -> Optional[str]:
    """Why `backend` (available on `device`) has no GRU/RNN op here, or None: an extension built
    from older sources has only the LSTM's."""
    if backend.name in ("cpu", "cuda") and not hasattr(torch.ops.zoneout_fused, f"{backend.name}_gru_rnn_layer_forward"):
        return (f"the {backend.name} extension was built without the GRU/RNN kernels; rebuild it: "
                + _HOW_TO_BUILD[backend.name])
    return None


# resolve_backend's answers: a backend's availability does not change once its extension has
# loaded (or failed to), and a decoder cell asks the same question at every step.
_RESOLVED: dict = {}


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, *, projection: bool = False,
                    cell: str = "lstm") -> Backend:
    """The Backend to run for (device, dtype, cell kind); raises a RuntimeError saying why one cannot."""
    key = (requested, device, dtype, projection, cell)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _RESOLVED[key] = _resolve_backend(requested, device, dtype, projection, cell)
    return backend


def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, projection: bool,
                     cell: str) -> Backend:
    if requested not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {requested!r}")
    if requested == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            backend = BACKENDS[name]
            if (backend.unavailable_reason(device) is None and dtype in backend.dtypes(device)
                    and (backend.supports_projection or not projection)
                    and (cell == "lstm" or _gru_rnn_unavailable(backend, device) is None)):
                return backend
        return BACKENDS["reference"]
    backend = BACKENDS[requested]
    reason = backend.unavailable_reason(device)
    if reason is None and cell != "lstm":
        reason = _gru_rnn_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} is not available: {reason}")
    if dtype not in backend.dtypes(device):
        raise TypeError(f"backend={requested!r} does not support dtype {dtype} on {device.type}; "
                        f"supported: {backend.dtypes(device)}")
    if projection and not backend.supports_projection:
        raise ValueError(f"backend={requested!r} does not support proj_size > 0; use backend='reference' or 'auto'")
    return backend
