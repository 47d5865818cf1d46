"""What users run today instead of a fused zoneout LSTM: the benchmark's plain-PyTorch peers.

Tacotron 2 decoders (ESPnet, PaddleSpeech) and fairseq zone out `nn.LSTMCell`s in a Python loop,
drawing Bernoulli masks with torch's generator at every step and mixing old and new states;
evaluation mixes with the probabilities. `PlainZoneoutCell` is that cell, `SteppedCells` that
loop (time-major: every layer's cell at step t, then step t+1, as decoders step). Their masks come
from torch's generator, not the contract's Philox, so the benchmark checks them with zoneout off
(the same LSTM math as the reference) and times them with zoneout on.

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
        hidden = _hidden_size(self.cells[0])
        if hx is None:
            zeros = x.new_zeros(len(self.cells), x.shape[1], hidden)
            hx = (zeros, zeros) if self.lstm else zeros
        if self.lstm:
            states = [(hx[0][layer], hx[1][layer]) for layer in range(len(self.cells))]
        else:
            states = [hx[layer] for layer in range(len(self.cells))]
        outputs = []
        for t in range(x.shape[0]):
            layer_input = x[t]
            for layer, cell in enumerate(self.cells):
                states[layer] = cell(layer_input, states[layer])
                layer_input = states[layer][0] if self.lstm else states[layer]
            outputs.append(layer_input)
        if not self.lstm:
            return torch.stack(outputs), torch.stack(states)
        h_n = torch.stack([h for h, _ in states])
        c_n = torch.stack([c for _, c in states])
        return torch.stack(outputs), (h_n, c_n)


def _hidden_size(cell: nn.Module) -> int:
    return getattr(cell, "hidden_size", None) or cell.cell.hidden_size


def lstm_cells(module: nn.RNNBase) -> list[nn.Module]:
    """One torch cell per layer of a unidirectional nn.LSTM / nn.GRU / nn.RNN (nn.LSTMCell,
    nn.GRUCell, nn.RNNCell with its nonlinearity), holding copies of its weights."""
    if module.bidirectional or module.proj_size:
        raise ValueError("cell loops copy unidirectional torch layers without projections")
    weight = module.weight_hh_l0
    cells = []
    for layer in range(module.num_layers):
        input_size = module.input_size if layer == 0 else module.hidden_size
        kwargs = dict(bias=module.bias, device=weight.device, dtype=weight.dtype)
        if isinstance(module, nn.LSTM):
            cell = nn.LSTMCell(input_size, module.hidden_size, **kwargs)
        elif isinstance(module, nn.GRU):
            cell = nn.GRUCell(input_size, module.hidden_size, **kwargs)
        else:
            cell = nn.RNNCell(input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kwargs)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if module.bias else ()):
                getattr(cell, name).copy_(getattr(module, f"{name}_l{layer}"))
        cells.append(cell)
    return cells


def canonical_parameter_name(name: str) -> str:
    """nn.LSTM's name of a parameter of any peer: cells.1.cell.weight_ih -> weight_ih_l1."""
    match = re.fullmatch(r"cells\.(\d+)\.(?:cell\.)?(\w+)", name)
    return f"{match.group(2)}_l{match.group(1)}" if match else name
