"""ZoneoutLSTM and ZoneoutLSTMCell: drop-in nn.LSTM / nn.LSTMCell with zoneout (contract sec. 3).

They subclass torch's RNNBase / RNNCellBase, so parameters, their names, their initialisation
and state_dict keys are exactly nn.LSTM's / nn.LSTMCell's. The recurrence itself runs through
the layer op of zoneout_fused.ops, once per (layer, direction), on the chosen backend.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import reference
from .masks import MASK_MODE_CODES, MASK_MODES
from .ops import BACKEND_NAMES, BACKENDS, cpu_cell_step, resolve_backend
from .reference import CELL_CODES

_SEED_HIGH = 2**63 - 1
_UNUSED_SEED = torch.zeros((), dtype=torch.int64)


def _check_probability(name: str, value, *, allow_one: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value >= 0.0 and upper_ok):  # also rejects NaN
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_option(name: str, value):
    """A zoneout option, validated (the one place each rule lives)."""
    if name == "recurrent_dropout":
        return _check_probability(name, value, allow_one=False)
    if name in ("zoneout_cell", "zoneout_hidden"):
        return _check_probability(name, value)
    choices = MASK_MODES if name == "mask_mode" else BACKEND_NAMES
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class _ZoneoutOptions:
    """Validated zoneout settings shared by ZoneoutLSTM and ZoneoutLSTMCell.

    The options are public attributes: each is checked when assigned (in __init__ or later), so a
    forward call needs no check of its own (a cell is called once per frame: its fixed cost counts).
    """

    _OPTION_NAMES = ("zoneout_cell", "zoneout_hidden", "recurrent_dropout", "mask_mode", "backend")

    def __setattr__(self, name, value):
        if name in _ZoneoutOptions._OPTION_NAMES:
            value = _check_option(name, value)
        super().__setattr__(name, value)
        if name == "backend":
            self._load_backend_ops()

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._load_backend_ops()  # (another device or dtype may run another backend)
        return result

    def _load_backend_ops(self) -> None:
        """Loads the layer op that a forward on the parameters' device and dtype will run, now, while
        no compiler traces: loaded by the first forward under torch.compile, it put the extension's
        op registration and the backend caches into dynamo's trace, whose guards then failed on the
        second call and compiled the forward again. A backend that cannot run here is left to the
        forward, which raises the error with its message."""
        parameters = self.__dict__.get("_parameters", {}).values()
        weight = next((parameter for parameter in parameters if parameter is not None), None)
        if weight is None or torch.compiler.is_compiling():
            return
        cell = getattr(self, "_cell", "lstm")
        self.__dict__["_steps_on_cpu"] = False
        try:
            backend = resolve_backend(self.backend, weight.device, weight.dtype,
                                      projection=getattr(self, "proj_size", 0) > 0, cell=cell)
            backend.load(cell)
        except (RuntimeError, TypeError, ValueError, ImportError):
            return
        # A cell on the cpu backend steps in one C++ call (_fused_cell_step). (That backend runs
        # both CPU dtypes, so a parameter swapped for one of the other dtype still runs it; the
        # step itself declines every other device and dtype.)
        self.__dict__["_steps_on_cpu"] = isinstance(self, nn.RNNCellBase) and backend is BACKENDS["cpu"]

    def _set_zoneout_options(self, zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode, backend):
        self.zoneout_cell, self.zoneout_hidden, self.recurrent_dropout = zoneout_cell, zoneout_hidden, recurrent_dropout
        self.mask_mode, self.backend = mask_mode, backend

    def _layer_settings(self):
        """(z_c, z_h, p, mode code) for the layer op."""
        return self.zoneout_cell, self.zoneout_hidden, self.recurrent_dropout, MASK_MODE_CODES[self.mask_mode]

    def _fused_cell_step(self, input, hx):
        """A cell's step in one C++ call (csrc/cell_step.h) where the cpu backend runs it eagerly,
        else None: the step declines what it does not take (other devices and dtypes, autocast,
        tracers, modes, any argument nn.LSTMCell would reject), and the Python path runs."""
        if not self.__dict__.get("_steps_on_cpu") or torch.compiler.is_compiling():
            return None
        w_ih = _parameter_of(self, "weight_ih")
        bias_a, bias_b = self._step_biases(w_ih.dtype)
        return cpu_cell_step()(CELL_CODES[getattr(self, "_cell", "lstm")], input, hx, w_ih,
                               _parameter_of(self, "weight_hh"), bias_a, bias_b, *self._layer_settings(),
                               self.training)

    def _is_stochastic(self) -> bool:
        return self.training and (self.zoneout_cell > 0 or self.zoneout_hidden > 0 or self.recurrent_dropout > 0)

    def _draw_seed(self, device: torch.device) -> torch.Tensor:
        """One Philox key per training forward call, from torch's default CPU generator (like dropout).

        While a CUDA graph is captured (torch.cuda.graph, torch.compile(mode="reduce-overhead")) or
        torch.compile traces a CUDA model, it is drawn on the GPU by the CUDA generator instead
        (torch.manual_seed seeds that one too): a key read on the host would be baked into the graph,
        so every replay would reuse one set of masks, while a key drawn on the device by a
        capture-aware generator is new at every replay, and the kernels read it from memory."""
        if not self._is_stochastic():
            return _UNUSED_SEED  # no mask is drawn (one shared tensor: nothing writes to it)
        if device.type == "cuda" and (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
            return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=device)
        return torch.randint(0, _SEED_HIGH, (), dtype=torch.int64)

    def _zoneout_repr(self) -> str:
        cell = f", zoneout_cell={self.zoneout_cell}" if getattr(self, "_cell", "lstm") == "lstm" else ""
        return (f"{cell}, zoneout_hidden={self.zoneout_hidden}"
                + (f", recurrent_dropout={self.recurrent_dropout}" if self.recurrent_dropout else "")
                + (f", mask_mode={self.mask_mode!r}" if self.mask_mode != "independent" else "")
                + (f", backend={self.backend!r}" if self.backend != "auto" else ""))


def _check_state_tensor(name: str, tensor, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """A state's type, dtype and device. nn.LSTM leaves these to its kernels, which raise
    RuntimeError: so do we, with a message that names the argument."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise RuntimeError(f"{name} has dtype {tensor.dtype}, but the input and parameters compute in {dtype}")
    if tensor.device != weight.device:
        raise RuntimeError(f"{name} is on {tensor.device} but the parameters are on {weight.device}")


def _parameter_of(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """module.<name> for a parameter, without nn.Module.__getattr__'s slow path (0.4 us a lookup,
    five lookups a decoder step); a parametrized or removed parameter falls back to getattr."""
    parameter = module._parameters.get(name)
    return parameter if parameter is not None else getattr(module, name)


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)  # (no dispatcher call when it already is)


def _backend_for(requested: str, device: torch.device, dtype: torch.dtype, projection: bool = False,
                 cell: str = "lstm"):
    """The backend to run. While torch.export traces the module (torch.onnx.export, ExecuTorch, ...)
    it is the reference, whatever was asked: the same function in plain torch ops, which exporters
    understand, where a fused backend would leave one opaque custom op in the graph."""
    if torch.compiler.is_exporting():
        return BACKENDS["reference"]
    return resolve_backend(requested, device, dtype, projection=projection, cell=cell)


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor) -> Optional[torch.dtype]:
    """Inside torch.autocast, the dtype the layer runs in, as nn.LSTM there: its input, states and
    weights cast to the autocast dtype, its outputs in that dtype. None outside autocast, or for
    tensors autocast leaves alone (float64, integers)."""
    if not torch._C._is_any_autocast_enabled():  # the common case, cheaply (as nn.RNNBase checks it)
        return None
    device_type = x.device.type
    eligible = (torch.float32, torch.float16, torch.bfloat16)
    if torch.is_autocast_enabled(device_type) and x.dtype in eligible and weight.dtype in eligible:
        return torch.get_autocast_dtype(device_type)
    return None


class _ZoneoutRNNBase(_ZoneoutOptions, nn.RNNBase):
    """What ZoneoutLSTM, ZoneoutGRU and ZoneoutRNN share: nn.RNNBase's parameters and input forms
    (packed, batch_first, unbatched, multi-layer, bidirectional, inter-layer dropout), the static
    mask key, and the loop over (layer, direction) that calls the backend's layer op. A subclass
    says how its states look (_initial_states, _final_states) and runs one direction (_run_direction).
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                 dropout: float, bidirectional: bool, proj_size: int, device, dtype, zoneout_options: tuple):
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device=device, dtype=dtype)
        self._set_zoneout_options(*zoneout_options)
        if self.mask_mode == "static":
            # One mask per step for every example and batch: its key is part of the model.
            self.register_buffer("static_seed", torch.randint(0, _SEED_HIGH, (), dtype=torch.int64))

    @classmethod
    def _from_torch(cls, module: nn.RNNBase, extra_args: dict, zoneout_kwargs: dict):
        """A copy of a torch recurrent layer's configuration and weights, with zoneout."""
        weight = module.weight_ih_l0
        copy = cls(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                   bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                   bidirectional=module.bidirectional, device=weight.device, dtype=weight.dtype, **extra_args,
                   **zoneout_kwargs)
        copy.load_state_dict(module.state_dict(), strict=False)
        copy.train(module.training)
        return copy

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        # The static key is read on the host by every call: keep it on the CPU.
        if "static_seed" in self._buffers and self._buffers["static_seed"].device.type != "cpu":
            self._buffers["static_seed"] = self._buffers["static_seed"].cpu()
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A torch module's state_dict has no static key: keep this module's own.
        if prefix + "static_seed" in missing_keys:
            missing_keys.remove(prefix + "static_seed")

    def flatten_parameters(self) -> None:
        # No cuDNN here: the parameters stay separate tensors (as nn.LSTM's are on CPU).
        return

    def extra_repr(self) -> str:
        return super().extra_repr() + self._zoneout_repr()

    def _parameter(self, name: str, layer: int, direction: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """A layer direction's parameter in `dtype` (a differentiable cast under autocast); None
        for a bias of a module without biases."""
        if name.startswith("bias") and not self.bias:
            return None
        suffix = "_reverse" if direction == 1 else ""
        return _as_dtype(getattr(self, f"{name}_l{layer}{suffix}"), dtype)

    def forward(self, input, hx=None):
        # Input errors torch's module checks raise what it raises (type and message); the checks
        # it leaves to its kernels raise RuntimeError naming the argument.
        packed = isinstance(input, PackedSequence)
        weight = self.weight_ih_l0
        lengths = None
        if packed:
            self.check_input(input.data, input.batch_sizes)  # nn.RNNBase's dtype, rank and input_size checks
            x, lengths = pad_packed_sequence(input)  # [T, B, I], examples in the caller's order
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
            self.check_input(x, None)
        if x.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if x.device != weight.device:
            raise RuntimeError(f"input is on {x.device} but the parameters are on {weight.device}")
        dtype = _autocast_dtype(x, weight) or x.dtype  # (check_input saw to the dtype outside autocast)
        x = x.to(dtype)
        batch = x.shape[1]
        directions = 2 if self.bidirectional else 1
        states = self._initial_states(hx, batched, batch, directions, x)

        backend = _backend_for(self.backend, x.device, dtype, projection=self.proj_size > 0, cell=self._cell)
        seed = self.static_seed if self.mask_mode == "static" else self._draw_seed(x.device)
        if lengths is not None and lengths.device != x.device:
            # pad_packed_sequence's lengths live on the CPU: an asynchronous copy from pinned memory
            # (a pageable one would wait for the GPU stream on every call).
            lengths = lengths.pin_memory().to(x.device, non_blocking=True) if x.is_cuda else lengths.to(x.device)
        training = self.training

        layer_input = x.contiguous()
        h_n, other_n = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                y, others = self._run_direction(backend, layer_input, [state[index] for state in states], lengths,
                                                seed, layer, direction, dtype, training)
                outputs.append(y)
                h_n.append(y[-1] if direction == 0 else y[0])
                other_n.append(others)
            layer_output = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and training and layer < self.num_layers - 1:
                layer_output = F.dropout(layer_output, self.dropout, training=True)
            layer_input = layer_output
        output = layer_input
        final = [torch.stack(h_n)] + [torch.stack(column) for column in zip(*other_n)]

        if packed:
            sorted_indices = input.sorted_indices
            if sorted_indices is not None:
                output = output.index_select(1, sorted_indices)
            # The sorted lengths from batch_sizes (always on the CPU): no copy back from the device.
            sorted_lengths = (input.batch_sizes.unsqueeze(0) > torch.arange(output.shape[1]).unsqueeze(1)).sum(1)
            repacked = pack_padded_sequence(output, sorted_lengths, enforce_sorted=True)
            output = PackedSequence(repacked.data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        elif not batched:
            output = output.squeeze(1)
            final = [state.squeeze(1) for state in final]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, self._final_states(final)

    def _check_initial_state(self, name: str, state, expected: tuple, index: int, batched: bool, x) -> torch.Tensor:
        """One initial state, checked as torch checks it, unsqueezed when unbatched, in x's dtype."""
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
        if not batched:
            state = state.unsqueeze(1)
        self.check_hidden_size(state, expected, f"Expected hidden[{index}] size {{}}, got {{}}"
                               if self._cell == "lstm" else "Expected hidden size {}, got {}")
        if torch.is_autocast_enabled(x.device.type) and x.dtype != self.weight_ih_l0.dtype:
            state = state.to(x.dtype)  # autocast: the states follow the input
        _check_state_tensor(name, state, self.weight_ih_l0, x.dtype)
        return state.contiguous()


class ZoneoutLSTM(_ZoneoutRNNBase):
    """nn.LSTM with zoneout on the cell and hidden states (Krueger et al. 2017).

    Arguments before `*` are nn.LSTM's. zoneout_cell / zoneout_hidden are the probabilities that
    a unit keeps its previous c / h at a step (the paper's z_c, z_h; its best: 0.5, 0.05);
    recurrent_dropout drops the candidate update i*g (Semeniuta et al. 2016); mask_mode is one of
    "independent", "shared", "timestep" (stochastic depth in time), "static" (one mask per step
    fixed at construction); backend one of "auto", "reference", "cpu", "triton", "cuda".
    In evaluation the masks are replaced by their expectations.
    """

    _cell = "lstm"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, zoneout_cell: float = 0.0, zoneout_hidden: float = 0.0,
                 recurrent_dropout: float = 0.0, mask_mode: str = "independent", backend: str = "auto"):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype,
                         (zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode, backend))

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, **zoneout_kwargs) -> "ZoneoutLSTM":
        """A ZoneoutLSTM with `lstm`'s configuration and a copy of its weights."""
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"lstm must be a torch.nn.LSTM, got {type(lstm).__name__}")
        return cls._from_torch(lstm, {"proj_size": lstm.proj_size}, zoneout_kwargs)

    def _run_direction(self, backend, layer_input, states, lengths, seed, layer, direction, dtype, training):
        h0, c0 = states
        get = lambda name: self._parameter(name, layer, direction, dtype)  # noqa: E731
        bias = get("bias_ih") + get("bias_hh") if self.bias else None
        args = (layer_input, h0, c0, get("weight_ih"), get("weight_hh"), bias, lengths, seed, layer, direction,
                self.zoneout_cell, self.zoneout_hidden, self.recurrent_dropout, MASK_MODE_CODES[self.mask_mode],
                training)
        y, c_last = backend.layer(*args, get("weight_hr")) if self.proj_size > 0 else backend.layer(*args)
        return y, (c_last,)

    def _final_states(self, final):
        h_n, c_n = final
        return h_n, c_n

    def _initial_states(self, hx, batched, batch, directions, x):
        """(h_0, c_0) as [layers * directions, B, H] in x's dtype, checked as nn.LSTM checks them."""
        count = self.num_layers * directions
        out_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            return (x.new_zeros(count, batch, out_size), x.new_zeros(count, batch, self.hidden_size))
        if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        for name, state in (("hx[0] (h_0)", h0), ("hx[1] (c_0)", c0)):
            if not isinstance(state, torch.Tensor):
                raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
        rank = 3 if batched else 2
        if h0.dim() != rank or c0.dim() != rank:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx and cx should also be {rank}-D but got "
                               f"({h0.dim()}-D, {c0.dim()}-D) tensors")
        return (self._check_initial_state("hx[0] (h_0)", h0, (count, batch, out_size), 0, batched, x),
                self._check_initial_state("hx[1] (c_0)", c0, (count, batch, self.hidden_size), 1, batched, x))


class _HiddenStateOptions(_ZoneoutOptions):
    """The zoneout options of the GRU and RNN modules and cells: contract sec. 4's rules checked
    whenever an option is assigned, as _ZoneoutOptions checks the ranges."""

    def __setattr__(self, name, value):
        if name in ("mask_mode", "recurrent_dropout") and "_parameters" in self.__dict__:
            _check_hidden_state_options(value if name == "mask_mode" else getattr(self, "mask_mode", "independent"),
                                        value if name == "recurrent_dropout" else getattr(self, "recurrent_dropout", 0.0),
                                        self._cell == "gru")
        if name == "zoneout_cell" and "_parameters" in self.__dict__ and value != 0.0:
            raise ValueError(f"{type(self).__name__} has no cell state: zoneout_cell must stay 0, got {value!r}")
        super().__setattr__(name, value)


class _ZoneoutHiddenStateRNN(_HiddenStateOptions, _ZoneoutRNNBase):
    """ZoneoutGRU and ZoneoutRNN: one state h, zoned out with zoneout_hidden (contract sec. 4)."""

    def __init__(self, mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
                 dtype, zoneout_hidden, recurrent_dropout, mask_mode, backend):
        # (sec. 4's rules are checked as the options are assigned: _HiddenStateOptions)
        super().__init__(mode, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0,
                         device, dtype, (0.0, zoneout_hidden, recurrent_dropout, mask_mode, backend))

    def _run_direction(self, backend, layer_input, states, lengths, seed, layer, direction, dtype, training):
        get = lambda name: self._parameter(name, layer, direction, dtype)  # noqa: E731
        y = backend.gru_rnn_layer(layer_input, states[0], get("weight_ih"), get("weight_hh"), get("bias_ih"),
                                  get("bias_hh"), lengths, seed, CELL_CODES[self._cell], layer, direction,
                                  self.zoneout_hidden, self.recurrent_dropout, MASK_MODE_CODES[self.mask_mode],
                                  training)
        return y, ()

    def _final_states(self, final):
        return final[0]

    def _initial_states(self, hx, batched, batch, directions, x):
        """(h_0,) as [layers * directions, B, H] in x's dtype, checked as nn.GRU / nn.RNN check it."""
        count = self.num_layers * directions
        if hx is None:
            return (x.new_zeros(count, batch, self.hidden_size),)
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx must be a Tensor, got {type(hx).__name__}")
        rank = 3 if batched else 2
        if hx.dim() != rank:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(f"For {kind} input, hx should also be {rank}-D but got {hx.dim()}-D tensor")
        return (self._check_initial_state("hx", hx, (count, batch, self.hidden_size), 0, batched, x),)


class ZoneoutGRU(_ZoneoutHiddenStateRNN):
    """nn.GRU with zoneout on the hidden state (Krueger et al. 2017, contract sec. 4).

    Arguments before `*` are nn.GRU's; parameters and state_dict are nn.GRU's. zoneout_hidden is
    the probability that a unit keeps its previous h at a step; recurrent_dropout drops the
    candidate n (Semeniuta et al. 2016); mask_mode "independent", "timestep" or "static" ("shared"
    ties a cell mask the GRU does not have); backend as for ZoneoutLSTM. Evaluation uses the
    expectation; zoneout_hidden = 0 is exactly nn.GRU.
    """

    _cell = "gru"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, zoneout_hidden: float = 0.0, recurrent_dropout: float = 0.0,
                 mask_mode: str = "independent", backend: str = "auto"):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         device, dtype, zoneout_hidden, recurrent_dropout, mask_mode, backend)

    @classmethod
    def from_gru(cls, gru: nn.GRU, **zoneout_kwargs) -> "ZoneoutGRU":
        """A ZoneoutGRU with `gru`'s configuration and a copy of its weights."""
        if not isinstance(gru, nn.GRU):
            raise TypeError(f"gru must be a torch.nn.GRU, got {type(gru).__name__}")
        return cls._from_torch(gru, {}, zoneout_kwargs)


class ZoneoutRNN(_ZoneoutHiddenStateRNN):
    """nn.RNN (Elman, tanh or relu) with zoneout on the hidden state (contract sec. 4).

    Arguments before `*` are nn.RNN's (nonlinearity "tanh" or "relu"); parameters and state_dict
    are nn.RNN's. zoneout_hidden, mask_mode and backend as for ZoneoutGRU; there is no
    recurrent_dropout (no gated update to drop). zoneout_hidden = 0 is exactly nn.RNN.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "tanh",
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 device=None, dtype=None, *, zoneout_hidden: float = 0.0, mask_mode: str = "independent",
                 backend: str = "auto"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self._cell = f"rnn_{nonlinearity}"
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", input_size, hidden_size, num_layers,
                         bias, batch_first, dropout, bidirectional, device, dtype, zoneout_hidden, 0.0, mask_mode,
                         backend)
        self.nonlinearity = nonlinearity

    @classmethod
    def from_rnn(cls, rnn: nn.RNN, **zoneout_kwargs) -> "ZoneoutRNN":
        """A ZoneoutRNN with `rnn`'s configuration (nonlinearity included) and a copy of its weights."""
        if not isinstance(rnn, nn.RNN):
            raise TypeError(f"rnn must be a torch.nn.RNN, got {type(rnn).__name__}")
        return cls._from_torch(rnn, {"nonlinearity": rnn.nonlinearity}, zoneout_kwargs)


def _check_hidden_state_options(mask_mode: str, recurrent_dropout: float, gru: bool) -> None:
    """Contract sec. 4's rules for the GRU and the RNN."""
    if mask_mode == "shared":
        raise ValueError("mask_mode='shared' ties the cell mask to the hidden mask, and the GRU and RNN have no "
                         "cell state: use 'independent', 'timestep' or 'static'")
    if not gru and recurrent_dropout != 0.0:
        raise ValueError(f"recurrent_dropout must be 0 for ZoneoutRNN (the plain RNN has no gated update to drop), "
                         f"got {recurrent_dropout!r}")


class ZoneoutLSTMCell(_ZoneoutOptions, nn.RNNCellBase):
    """nn.LSTMCell with zoneout: one step, fresh masks at every call in training.

    Masks are drawn as for step 0 of a one-step sequence with a new seed per call; mask_mode
    "static" is rejected (a cell cannot know which step it is at).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 zoneout_cell: float = 0.0, zoneout_hidden: float = 0.0, recurrent_dropout: float = 0.0,
                 mask_mode: str = "independent", backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        if mask_mode == "static":
            raise ValueError("mask_mode='static' needs the step index: use ZoneoutLSTM for it, "
                             "not ZoneoutLSTMCell")
        self._set_zoneout_options(zoneout_cell, zoneout_hidden, recurrent_dropout, mask_mode, backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._zoneout_repr()

    def forward(self, input: torch.Tensor,
                hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, hx)
        return self._forward(input, hx)

    def _scripted_forward(self, input: torch.Tensor,
                          hx: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Under torch.jit.script: the reference step (plain ops, the oracle's masks), as the fused
        backends are not scriptable; the same function, to rounding."""
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h0 = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
            c0 = torch.zeros_like(h0)
        else:
            h0, c0 = hx[0], hx[1]
            if not batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
        bias_ih, bias_hh = self.bias_ih, self.bias_hh
        bias: Optional[torch.Tensor] = None
        if bias_ih is not None and bias_hh is not None:
            bias = bias_ih + bias_hh
        stochastic = self.training and (self.zoneout_cell > 0 or self.zoneout_hidden > 0 or self.recurrent_dropout > 0)
        seed = torch.randint(0, 9223372036854775807, (), dtype=torch.int64) if stochastic else torch.zeros((), dtype=torch.int64)  # 2**63 - 1 (_SEED_HIGH): TorchScript reads no module-level numbers
        mode = 0 if self.mask_mode == "independent" else (1 if self.mask_mode == "shared" else 2)
        y, c1 = reference.lstm_layer(x.unsqueeze(0), h0, c0, self.weight_ih, self.weight_hh, bias, None, seed, 0, 0,
                                     self.zoneout_cell, self.zoneout_hidden, self.recurrent_dropout, mode,
                                     self.training)
        h1 = y[0]
        if not batched:
            h1, c1 = h1.squeeze(0), c1.squeeze(0)
        return h1, c1

    @torch.jit.unused
    def _summed_bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """b_ih + b_hh in `dtype`. Where nothing differentiates it (inference, a decoder stepping
        under no_grad) the sum is kept until a bias changes (its version counter moves): the add
        was a tenth of a small cell's step."""
        if not self.bias:
            return None
        b_ih, b_hh = _parameter_of(self, "bias_ih"), _parameter_of(self, "bias_hh")
        # (Nor is a sum made under torch.inference_mode kept: a later step that autograd records would
        # save it, and an inference tensor cannot be saved.)
        if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
                or (torch.is_grad_enabled() and (b_ih.requires_grad or b_hh.requires_grad))):
            return _as_dtype(b_ih, dtype) + _as_dtype(b_hh, dtype)
        key = (b_ih.data_ptr(), b_hh.data_ptr(), b_ih._version, b_hh._version, dtype)
        cached = self.__dict__.get("_bias_sum")
        # The biases themselves are held and compared too: a tensor swapped in for one call
        # (functional_call) and freed could leave a new one at its address with the same version.
        if cached is None or cached[0] != key or cached[1] is not b_ih or cached[2] is not b_hh:
            cached = (key, b_ih, b_hh, _as_dtype(b_ih, dtype) + _as_dtype(b_hh, dtype))
            self.__dict__["_bias_sum"] = cached
        return cached[3]

    @torch.jit.unused
    def _step_biases(self, dtype: torch.dtype) -> tuple:
        """The bias arguments of the layer op: the summed bias, and None."""
        return self._summed_bias(dtype), None

    @torch.jit.unused
    def _forward(self, input: torch.Tensor,
                 hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        fused = self._fused_cell_step(input, hx)
        if fused is not None:
            return fused
        # nn.LSTMCell's checks, types and messages (its kernel's RuntimeErrors included).
        _check_cell_input(self, input)
        if hx is not None:
            if not isinstance(hx, (tuple, list)):
                raise TypeError(f"hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
            for index, state in enumerate(hx):
                if not isinstance(state, torch.Tensor):
                    raise TypeError(f"hx[{index}] must be a Tensor, got {type(state).__name__}")
                if state.dim() not in (1, 2):
                    raise ValueError(f"{type(self).__name__}: Expected hx[{index}] to be 1D or 2D, "
                                     f"got {state.dim()}D instead")
            if len(hx) != 2:
                raise RuntimeError("lstm_cell expects two hidden states")
        x, (h0, c0), batched, dtype = _cell_step_inputs(self, input, None if hx is None else list(hx),
                                                        ("hx[0] (h_0)", "hx[1] (c_0)"))
        z_c, z_h, p, mode = self._layer_settings()
        backend = _backend_for(self.backend, x.device, dtype)
        w_ih = _as_dtype(_parameter_of(self, "weight_ih"), dtype)
        w_hh = _as_dtype(_parameter_of(self, "weight_hh"), dtype)
        bias, _ = self._step_biases(dtype)
        y, c1 = backend.layer(x.unsqueeze(0).contiguous(), h0, c0, w_ih, w_hh, bias, None,
                              self._draw_seed(x.device), 0, 0, z_c, z_h, p, mode, self.training)
        h1 = y[0]
        if not batched:
            h1, c1 = h1.squeeze(0), c1.squeeze(0)
        return h1, c1


def _check_cell_input(cell: nn.RNNCellBase, input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ValueError(f"{type(cell).__name__}: Expected input to be 1D or 2D, got {input.dim()}D instead")


def _cell_step_inputs(cell: nn.RNNCellBase, input: torch.Tensor, states: Optional[list], names: tuple):
    """(x [B, I], states [B, H] each, batched, dtype) for one cell step: the shape, device and dtype
    checks torch's cells make (their kernels' RuntimeErrors, same messages), autocast applied,
    missing states zero, all contiguous."""
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)
    batch = x.shape[0]
    if x.shape[1] != cell.input_size:
        raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {cell.input_size}")
    if states is not None:
        states = [state if batched else state.unsqueeze(0) for state in states]
        for index, state in enumerate(states):
            if state.shape[0] != batch:
                raise RuntimeError(f"Input batch size {batch} doesn't match hidden{index} batch size "
                                   f"{state.shape[0]}")
            if state.shape[1] != cell.hidden_size:
                raise RuntimeError(f"hidden{index} has inconsistent hidden_size: got {state.shape[1]}, "
                                   f"expected {cell.hidden_size}")
    weight = _parameter_of(cell, "weight_ih")
    if x.device != weight.device:
        raise RuntimeError(f"input is on {x.device} but the parameters are on {weight.device}")
    dtype = _autocast_dtype(x, weight)
    if dtype is None and x.dtype != weight.dtype:
        raise RuntimeError(f"input has dtype {x.dtype} but the parameters have {weight.dtype}: convert the "
                           f"input (input.to({weight.dtype})) or the cell (cell.to({x.dtype}))")
    dtype = dtype or x.dtype
    x = _as_dtype(x, dtype)
    if states is None:
        zeros = x.new_zeros(batch, cell.hidden_size)
        return x, [zeros] * len(names), batched, dtype
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type):
        states = [state.to(dtype) for state in states]
    for name, state in zip(names, states):
        _check_state_tensor(name, state, weight, dtype)
    return x, [state.contiguous() for state in states], batched, dtype


class _ZoneoutHiddenStateCell(_HiddenStateOptions, nn.RNNCellBase):
    """ZoneoutGRUCell and ZoneoutRNNCell: one step of ZoneoutGRU / ZoneoutRNN, fresh masks at every
    call in training (drawn as for step 0 of a one-step sequence with a new seed per call)."""

    def __init__(self, input_size, hidden_size, bias, num_chunks, device, dtype, zoneout_hidden, recurrent_dropout,
                 mask_mode, backend):
        super().__init__(input_size, hidden_size, bias, num_chunks=num_chunks, device=device, dtype=dtype)
        if mask_mode == "static":
            raise ValueError(f"mask_mode='static' needs the step index: use {type(self).__name__[:-4]} for it, "
                             f"not {type(self).__name__}")
        self.cell_code = CELL_CODES[self._cell]  # (an instance attribute: TorchScript reads it)
        self._set_zoneout_options(0.0, zoneout_hidden, recurrent_dropout, mask_mode, backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._zoneout_repr()

    def forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input, hx)
        return self._forward(input, hx)

    def _scripted_forward(self, input: torch.Tensor, hx: Optional[torch.Tensor]) -> torch.Tensor:
        """Under torch.jit.script: the reference step, as for ZoneoutLSTMCell."""
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h0 = torch.zeros(x.shape[0], self.hidden_size, dtype=x.dtype, device=x.device)
        else:
            h0 = hx if batched else hx.unsqueeze(0)
        stochastic = self.training and (self.zoneout_hidden > 0 or self.recurrent_dropout > 0)
        seed = torch.randint(0, 9223372036854775807, (), dtype=torch.int64) if stochastic else torch.zeros((), dtype=torch.int64)  # 2**63 - 1 (_SEED_HIGH)
        mode = 0 if self.mask_mode == "independent" else 2
        y = reference.gru_rnn_layer(x.unsqueeze(0), h0, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                                    None, seed, self.cell_code, 0, 0, self.zoneout_hidden, self.recurrent_dropout, mode,
                                    self.training)
        h1 = y[0]
        return h1 if batched else h1.squeeze(0)

    @torch.jit.unused
    def _step_biases(self, dtype: torch.dtype) -> tuple:
        """The bias arguments of the layer op: b_ih and b_hh (None where the cell has no bias)."""
        b_ih, b_hh = _parameter_of(self, "bias_ih"), _parameter_of(self, "bias_hh")
        return (None if b_ih is None else _as_dtype(b_ih, dtype)), (None if b_hh is None else _as_dtype(b_hh, dtype))

    @torch.jit.unused
    def _forward(self, input: torch.Tensor, hx: Optional[torch.Tensor] = None) -> torch.Tensor:
        fused = self._fused_cell_step(input, hx)
        if fused is not None:
            return fused
        # torch's GRUCell / RNNCell checks, types and messages.
        _check_cell_input(self, input)
        if hx is not None:
            if not isinstance(hx, torch.Tensor):
                raise TypeError(f"hx must be a Tensor, got {type(hx).__name__}")
            if hx.dim() not in (1, 2):
                raise ValueError(f"{type(self).__name__}: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        x, (h0,), batched, dtype = _cell_step_inputs(self, input, None if hx is None else [hx], ("hx",))
        backend = _backend_for(self.backend, x.device, dtype, cell=self._cell)
        w_ih = _as_dtype(_parameter_of(self, "weight_ih"), dtype)
        w_hh = _as_dtype(_parameter_of(self, "weight_hh"), dtype)
        y = backend.gru_rnn_layer(x.unsqueeze(0).contiguous(), h0, w_ih, w_hh, *self._step_biases(dtype), None,
                                  self._draw_seed(x.device), self.cell_code, 0, 0,
                                  self.zoneout_hidden, self.recurrent_dropout, MASK_MODE_CODES[self.mask_mode],
                                  self.training)
        h1 = y[0]
        return h1 if batched else h1.squeeze(0)


class ZoneoutGRUCell(_ZoneoutHiddenStateCell):
    """nn.GRUCell with zoneout on h (and optional recurrent dropout on the candidate n)."""

    _cell = "gru"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 zoneout_hidden: float = 0.0, recurrent_dropout: float = 0.0, mask_mode: str = "independent",
                 backend: str = "auto"):
        super().__init__(input_size, hidden_size, bias, 3, device, dtype, zoneout_hidden, recurrent_dropout,
                         mask_mode, backend)


class ZoneoutRNNCell(_ZoneoutHiddenStateCell):
    """nn.RNNCell (tanh or relu) with zoneout on h."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh",
                 device=None, dtype=None, *, zoneout_hidden: float = 0.0, mask_mode: str = "independent",
                 backend: str = "auto"):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        self._cell = f"rnn_{nonlinearity}"
        super().__init__(input_size, hidden_size, bias, 1, device, dtype, zoneout_hidden, 0.0, mask_mode, backend)
        self.nonlinearity = nonlinearity
