"""What users run today instead of a fused zoneout LSTM: the benchmark's plain-PyTorch peers.

Tacotron 2 decoders (ESPnet, PaddleSpeech) and fairseq zone out `nn.LSTMCell`s in a Python loop,
drawing Bernoulli masks with torch's generator at every step and mixing old and new states;
evaluation mixes with the probabilities. `PlainZoneoutCell` is that cell, `SteppedCells` that
loop (time-major: every layer's cell at step t, then step t+1, as decoders step). Their masks come
from torch's generator, not the contract's Philox, so the benchmark checks them with zoneout off
(the same LSTM math as the reference) and times them with zoneout on.

A bidirectional layer cannot step time-major (each layer reads both directions' whole outputs):
`BidirectionalCells` runs it as users write it for a zoned-out bidirectional encoder, layer by layer,
a forward cell over t = 0..T-1 and a reverse cell over t = T-1..0, their outputs concatenated.

`SteppedCells` also steps `nn.LSTMCell` (the no-zoneout ceiling of a cell loop) and
`ZoneoutLSTMCell` for the benchmark's `decode` cases: the cell API called once per frame.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
from torch import nn


class PlainZoneoutCell(nn.Module):
    """A torch cell (nn.LSTMCell, nn.GRUCell, nn.RNNCell) plus per-step Bernoulli zoneout masks on
    its states, as users write it: c and h for the LSTM, h for the others."""

    def __init__(self, cell: nn.Module, zoneout_cell: float, zoneout_hidden: float):
        super().__init__()
        self.cell = cell
        self.zoneout_cell = zoneout_cell
        self.zoneout_hidden = zoneout_hidden

    @staticmethod
    def _mix(previous: torch.Tensor, new: torch.Tensor, z: float, training: bool) -> torch.Tensor:
        if not training:
            return z * previous + (1 - z) * new
        keep = torch.empty_like(new).bernoulli_(z)  # 1: the unit keeps its previous value
        return keep * previous + (1 - keep) * new

    def forward(self, x: torch.Tensor, hx):
        if not isinstance(self.cell, nn.LSTMCell):
            return self._mix(hx, self.cell(x, hx), self.zoneout_hidden, self.training)
        h, c = hx
        h_new, c_new = self.cell(x, (h, c))
        return (self._mix(h, h_new, self.zoneout_hidden, self.training),
                self._mix(c, c_new, self.zoneout_cell, self.training))


class SteppedCells(nn.Module):
    """A stack of cells run step by step over x [T, B, I], with the forward signature of the
    torch layer they come from: (output, (h_n, c_n)) for LSTM cells, (output, h_n) for the others."""

    def __init__(self, cells: list[nn.Module], lstm: bool = True):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.lstm = lstm

    def forward(self, x: torch.Tensor, hx=None):
        states = _layer_states(self.cells[0], len(self.cells), x, hx, self.lstm)
        outputs = []
        for t in range(x.shape[0]):
            layer_input = x[t]
            for layer, cell in enumerate(self.cells):
                states[layer] = cell(layer_input, states[layer])
                layer_input = states[layer][0] if self.lstm else states[layer]
            outputs.append(layer_input)
        return torch.stack(outputs), _final_states(states, self.lstm)


class BidirectionalCells(nn.Module):
    """Bidirectional layers of cells (cells[l] forward, reverse_cells[l] backward in time) run layer
    by layer over x [T, B, I], with the torch layer's forward signature; state k of hx and of the
    final states is layer k // 2's direction k % 2, as in nn.LSTM."""

    def __init__(self, cells: list[nn.Module], reverse_cells: list[nn.Module], lstm: bool = True):
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.reverse_cells = nn.ModuleList(reverse_cells)
        self.lstm = lstm

    def forward(self, x: torch.Tensor, hx=None):
        steps = x.shape[0]
        states = _layer_states(self.cells[0], 2 * len(self.cells), x, hx, self.lstm)
        layer_input = x
        for layer, directions in enumerate(zip(self.cells, self.reverse_cells)):
            outputs = []
            for direction, cell in enumerate(directions):
                index, output = 2 * layer + direction, [None] * steps
                for t in (range(steps) if direction == 0 else reversed(range(steps))):
                    states[index] = cell(layer_input[t], states[index])
                    output[t] = states[index][0] if self.lstm else states[index]
                outputs.append(torch.stack(output))
            layer_input = torch.cat(outputs, dim=2)
        return layer_input, _final_states(states, self.lstm)


def _layer_states(cell: nn.Module, count: int, x: torch.Tensor, hx, lstm: bool) -> list:
    """The `count` initial states of hx (zeros where None): (h, c) pairs for LSTM cells."""
    if hx is None:
        zeros = x.new_zeros(count, x.shape[1], _hidden_size(cell))
        hx = (zeros, zeros) if lstm else zeros
    return [(hx[0][k], hx[1][k]) if lstm else hx[k] for k in range(count)]


def _final_states(states: list, lstm: bool):
    if not lstm:
        return torch.stack(states)
    return torch.stack([h for h, _ in states]), torch.stack([c for _, c in states])


def _hidden_size(cell: nn.Module) -> int:
    return getattr(cell, "hidden_size", None) or cell.cell.hidden_size


def lstm_cells(module: nn.RNNBase, direction: int = 0) -> list[nn.Module]:
    """One torch cell per layer of an nn.LSTM / nn.GRU / nn.RNN (nn.LSTMCell, nn.GRUCell, nn.RNNCell
    with its nonlinearity), holding copies of direction `direction`'s weights."""
    if module.proj_size:
        raise ValueError("cell loops copy torch layers without projections")
    if direction not in ((0, 1) if module.bidirectional else (0,)):
        raise ValueError(f"direction {direction}: the layer has {1 + module.bidirectional} direction(s)")
    suffix = "_reverse" if direction == 1 else ""
    weight = module.weight_hh_l0
    cells = []
    for layer in range(module.num_layers):
        input_size = module.input_size if layer == 0 else module.hidden_size * (1 + module.bidirectional)
        kwargs = dict(bias=module.bias, device=weight.device, dtype=weight.dtype)
        if isinstance(module, nn.LSTM):
            cell = nn.LSTMCell(input_size, module.hidden_size, **kwargs)
        elif isinstance(module, nn.GRU):
            cell = nn.GRUCell(input_size, module.hidden_size, **kwargs)
        else:
            cell = nn.RNNCell(input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kwargs)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if module.bias else ()):
                getattr(cell, name).copy_(getattr(module, f"{name}_l{layer}{suffix}"))
        cells.append(cell)
    return cells


def canonical_parameter_name(name: str) -> str:
    """nn.LSTM's name of a parameter of any peer: cells.1.cell.weight_ih -> weight_ih_l1,
    reverse_cells.0.weight_hh -> weight_hh_l0_reverse."""
    match = re.fullmatch(r"(reverse_)?cells\.(\d+)\.(?:cell\.)?(\w+)", name)
    if match is None:
        return name
    return f"{match.group(3)}_l{match.group(2)}" + ("_reverse" if match.group(1) else "")
