"""Task presets (the paper's settings), regularizer choices, models and the synthetic copy task."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ZoneoutGRU, ZoneoutLSTM, ZoneoutRNN

TASKS = ("copy", "char-ptb", "word-ptb", "text8", "pmnist")
DEFAULT_TASK = "copy"
CELLS = ("lstm", "gru", "rnn-tanh", "rnn-relu")
REGULARIZERS = ("none", "zoneout", "zoneout-shared", "zoneout-static", "stochastic-depth", "recurrent-dropout",
                "weight-noise", "norm-stabilizer")

# Every field of Config is a command-line option (--hidden-size for hidden_size, ...).
# A preset fills the fields its task needs; the command line overrides any of them.
PRESETS = {
    # Built-in long-memory task: see make_copy_batch. Small enough for a few minutes on 2 CPU cores
    # with the pure-PyTorch reference backend.
    # Zoneout lighter than the paper's language-model setting: a copy needs exact recall, and
    # z_c = 0.5 slows learning to a crawl at this budget (measured: 39% vs 99% accuracy).
    "copy": dict(hidden_size=128, layers=1, embed_size=16, lr=0.01, batch_size=32, optimizer="adam", clip=1.0,
                 regularizer="zoneout", zoneout_cell=0.15, zoneout_hidden=0.05, epochs=12, steps_per_epoch=50,
                 copy_symbols=8, copy_length=5, copy_delay=10, patience=0, forget_bias=1.0,
                 threads=1),  # tensors this small run slower on 2 intra-op threads than on 1 (measured)
    # Paper sec. 4.2: 1 layer of 1000 units, Adam lr 0.002, batch 32, sequences of 100, clip 1.
    # (--cell gru / rnn-tanh: CELL_PRESETS below adjust it.)
    "char-ptb": dict(hidden_size=1000, layers=1, embed_size=128, lr=0.002, batch_size=32, seq_len=100,
                     optimizer="adam", clip=1.0, regularizer="zoneout", zoneout_cell=0.5, zoneout_hidden=0.05,
                     epochs=50, patience=5),
    # Zaremba et al. (2014) large: 2 x 1500, dropout 0.65 on non-recurrent connections, SGD lr 1,
    # decay 1/1.15 per epoch after epoch 14, 55 epochs, clip 10 (global norm), batch 20, 35 steps,
    # uniform init +-0.04, loss summed over the 35 steps (mean over the batch) as in their code, so lr 1
    # and clip 10 mean what they meant there; zoneout z_c = 0.25, z_h = 0.025 on the recurrent connections on top.
    "word-ptb": dict(hidden_size=1500, layers=2, embed_size=1500, lr=1.0, batch_size=20, seq_len=35,
                     optimizer="sgd", clip=10.0, regularizer="zoneout", zoneout_cell=0.25, zoneout_hidden=0.025,
                     dropout=0.65, epochs=55, lr_decay=1 / 1.15, lr_decay_start=14, init_scale=0.04,
                     loss_reduction="sum-over-time", patience=0),
    # Paper: text8 as char-ptb but 1 x 2000 units, batch 128, sequences of 180 (Adam lr 0.001 as
    # Cooijmans et al.'s text8 setting, which the paper follows).
    "text8": dict(hidden_size=2000, layers=1, embed_size=128, lr=0.001, batch_size=128, seq_len=180,
                  optimizer="adam", clip=1.0, regularizer="zoneout", zoneout_cell=0.5, zoneout_hidden=0.05,
                  epochs=20, patience=3),
    # Paper sec. 4.1: 1 x 100, RMSProp lr 0.001 with decay (rho) 0.5, clip 1, shared masks z = 0.15.
    "pmnist": dict(hidden_size=100, layers=1, lr=0.001, rmsprop_alpha=0.5, batch_size=64, optimizer="rmsprop",
                   clip=1.0, regularizer="zoneout-shared", zoneout_cell=0.15, zoneout_hidden=0.15, epochs=150,
                   patience=10),
}


# The paper's char-PTB GRU and tanh-RNN runs (sec. 4.2): the LSTM's settings otherwise (our
# sequences are non-overlapping windows already), Adam lr 0.001 (GRU) and 0.0003 (tanh-RNN), and
# low zoneout probabilities on h (the paper reports z in 0.05-0.25; 0.05 chosen here). Applied on
# top of a task's preset when --cell names a non-LSTM cell and the task is char-ptb.
CELL_PRESETS = {
    ("char-ptb", "gru"): dict(lr=0.001, zoneout_cell=0.0, zoneout_hidden=0.05),
    ("char-ptb", "rnn-tanh"): dict(lr=0.0003, zoneout_cell=0.0, zoneout_hidden=0.05),
}


@dataclass
class Config:
    task: str = DEFAULT_TASK
    data_dir: str = "data"
    out_dir: Optional[str] = None
    no_download: bool = False
    # model
    cell: str = "lstm"             # lstm, gru, rnn-tanh, rnn-relu
    hidden_size: int = 64
    layers: int = 1
    embed_size: int = 128
    dropout: float = 0.0           # dropout on non-recurrent connections (embedding, between layers, output)
    forget_bias: float = 0.0       # added to the forget-gate bias at initialisation
    init_scale: float = 0.0        # > 0: uniform(-s, s) initialisation of every parameter (Zaremba)
    backend: str = "auto"
    # regularizer
    regularizer: str = "zoneout"
    zoneout_cell: float = 0.0
    zoneout_hidden: float = 0.0
    recurrent_dropout: float = 0.25
    stochastic_depth_p: float = 0.05
    weight_noise_sigma: float = 0.075
    norm_stabilizer_beta: float = 50.0
    # optimisation
    optimizer: str = "adam"
    lr: float = 0.001
    momentum: float = 0.0
    rmsprop_alpha: float = 0.99
    lr_decay: float = 1.0          # multiply lr by this after every epoch past epoch lr_decay_start
    lr_decay_start: int = 1
    clip: float = 0.0              # global gradient-norm clip (0: off)
    loss_reduction: str = "mean"   # "mean" over steps and examples, or "sum-over-time" (mean over examples)
    batch_size: int = 32
    seq_len: int = 100
    epochs: int = 10
    max_steps: int = 0             # stop after this many optimizer steps in all (0: no limit)
    steps_per_epoch: int = 0       # cap on the steps of an epoch (0: a full pass over the data)
    eval_every: int = 0            # also evaluate every N steps (0: only at the end of each epoch)
    eval_batches: int = 0          # cap on evaluation batches (0: the whole split)
    patience: int = 0              # early stopping: evaluations without improvement (0: off)
    # synthetic copy task
    copy_symbols: int = 8
    copy_length: int = 5
    copy_delay: int = 10
    eval_examples: int = 1024
    # run
    device: str = "cpu"
    seed: int = 0
    threads: int = 0
    checkpoint: Optional[str] = None
    resume: bool = False
    progress: bool = True
    plot: bool = True
    log_every: int = 10


def lstm_kwargs(cfg: Config) -> dict:
    """Keyword arguments of the recurrent layers (ZoneoutLSTM, ZoneoutGRU or ZoneoutRNN) for the
    chosen regularizer."""
    reg = cfg.regularizer
    if reg not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {reg!r}")
    if cfg.cell not in CELLS:
        raise ValueError(f"cell must be one of {CELLS}, got {cfg.cell!r}")
    kw = dict(zoneout_cell=0.0, zoneout_hidden=0.0, recurrent_dropout=0.0, mask_mode="independent",
              backend=cfg.backend)
    if reg in ("zoneout", "zoneout-shared", "zoneout-static"):
        kw.update(zoneout_cell=cfg.zoneout_cell, zoneout_hidden=cfg.zoneout_hidden,
                  mask_mode={"zoneout": "independent", "zoneout-shared": "shared",
                             "zoneout-static": "static"}[reg])
    elif reg == "stochastic-depth":
        # Stochastic depth in time: a whole example skips a step (c and h kept together).
        kw.update(zoneout_cell=cfg.stochastic_depth_p, zoneout_hidden=cfg.stochastic_depth_p, mask_mode="timestep")
    elif reg == "recurrent-dropout":
        kw.update(recurrent_dropout=cfg.recurrent_dropout)
    if cfg.cell != "lstm":  # one state: no cell zoneout (contract sec. 4)
        if kw["mask_mode"] == "shared":
            raise ValueError(f"--regularizer {reg} ties a cell mask to the hidden mask: it needs --cell lstm")
        if cfg.cell != "gru" and kw["recurrent_dropout"] > 0:
            raise ValueError("--regularizer recurrent-dropout needs a gated cell: --cell lstm or gru")
        del kw["zoneout_cell"]
        if cfg.cell != "gru":
            del kw["recurrent_dropout"]
    return kw


def recurrent_layer(cell: str, input_size: int, hidden_size: int, **kw) -> nn.Module:
    """One layer of the chosen cell kind."""
    if cell == "lstm":
        return ZoneoutLSTM(input_size, hidden_size, **kw)
    if cell == "gru":
        return ZoneoutGRU(input_size, hidden_size, **kw)
    return ZoneoutRNN(input_size, hidden_size, nonlinearity=cell[len("rnn-"):], **kw)


class RecurrentStack(nn.Module):
    """Stacked one-layer recurrent layers (ZoneoutLSTM, ZoneoutGRU or ZoneoutRNN): every layer's h
    sequence stays visible (for the norm stabilizer) and dropout sits between layers, on the
    non-recurrent connections only (Zaremba et al.). A layer's state is (h, c) for the LSTM, (h,)
    for the others."""

    def __init__(self, input_size: int, hidden_size: int, layers: int, dropout: float, forget_bias: float,
                 cell: str = "lstm", **lstm_kw):
        super().__init__()
        self.cell = cell
        self.layers = nn.ModuleList(
            recurrent_layer(cell, input_size if i == 0 else hidden_size, hidden_size, **lstm_kw)
            for i in range(layers))
        self.dropout = dropout
        self.hidden_size = hidden_size
        self.forget_bias = forget_bias

    def reset_forget_bias(self) -> None:
        if self.forget_bias and self.cell == "lstm":  # the other cells have no forget gate
            with torch.no_grad():
                for lstm in self.layers:
                    h = lstm.hidden_size
                    lstm.bias_hh_l0[h:2 * h] += self.forget_bias

    def forward(self, x, state=None):
        """x [T, B, I] -> (output [T, B, H], new state (a tuple per layer), list of h sequences per layer)."""
        new_state, sequences = [], []
        for i, layer in enumerate(self.layers):
            hx = None if state is None else tuple(s.unsqueeze(0) for s in state[i])
            if self.cell == "lstm":
                x, (h, c) = layer(x, hx)
                new_state.append((h[0], c[0]))
            else:
                x, h = layer(x, None if hx is None else hx[0])
                new_state.append((h[0],))
            sequences.append(x)
            if i < len(self.layers) - 1:
                x = F.dropout(x, self.dropout, self.training)
        return x, new_state, sequences


class LanguageModel(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, cfg.embed_size)
        self.rnn = RecurrentStack(cfg.embed_size, cfg.hidden_size, cfg.layers, cfg.dropout, cfg.forget_bias,
                                  cfg.cell, **lstm_kwargs(cfg))
        self.decoder = nn.Linear(cfg.hidden_size, vocab_size)
        self.dropout = cfg.dropout
        init_parameters(self, cfg)
        self.rnn.reset_forget_bias()

    def forward(self, tokens, state=None):
        """tokens [T, B] -> logits [T, B, V], state, h sequences."""
        x = F.dropout(self.embedding(tokens), self.dropout, self.training)
        y, state, sequences = self.rnn(x, state)
        return self.decoder(F.dropout(y, self.dropout, self.training)), state, sequences


class SequenceClassifier(nn.Module):
    """Reads a sequence and classifies it from the last hidden state (pMNIST: one pixel per step)."""

    def __init__(self, input_size: int, num_classes: int, cfg: Config):
        super().__init__()
        self.rnn = RecurrentStack(input_size, cfg.hidden_size, cfg.layers, cfg.dropout, cfg.forget_bias,
                                  cfg.cell, **lstm_kwargs(cfg))
        self.head = nn.Linear(cfg.hidden_size, num_classes)
        init_parameters(self, cfg)
        self.rnn.reset_forget_bias()

    def forward(self, x):
        """x [T, B, I] -> logits [B, C], h sequences."""
        y, _, sequences = self.rnn(x)
        return self.head(y[-1]), sequences


class CopyModel(nn.Module):
    """Copy task: embeds the symbols and predicts the recalled ones at the last `length` steps."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.length = cfg.copy_length
        self.embedding = nn.Embedding(cfg.copy_symbols + 2, cfg.embed_size)
        self.rnn = RecurrentStack(cfg.embed_size, cfg.hidden_size, cfg.layers, cfg.dropout, cfg.forget_bias,
                                  cfg.cell, **lstm_kwargs(cfg))
        self.head = nn.Linear(cfg.hidden_size, cfg.copy_symbols)
        init_parameters(self, cfg)
        self.rnn.reset_forget_bias()

    def forward(self, tokens):
        y, _, sequences = self.rnn(self.embedding(tokens))
        return self.head(y[-self.length:]), sequences


def init_parameters(model: nn.Module, cfg: Config) -> None:
    if cfg.init_scale > 0:
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-cfg.init_scale, cfg.init_scale)


def make_copy_batch(batch: int, symbols: int, length: int, delay: int, generator=None):
    """The copy task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016), short form.

    Input: `length` random symbols in 1..symbols, then `delay` blanks (0) with a go marker
    (symbols + 1) on the last blank, then `length` blanks; the model must output the symbols
    during those last `length` steps. Chance: cross-entropy ln(symbols), accuracy 1/symbols.
    Returns tokens [length + delay + length, B] and targets [length, B] (in 0..symbols-1).
    """
    seq = torch.randint(0, symbols, (length, batch), generator=generator)
    tokens = torch.zeros(2 * length + delay, batch, dtype=torch.long)
    tokens[:length] = seq + 1
    tokens[length + delay - 1] = symbols + 1
    return tokens, seq


def norm_stabilizer_penalty(sequences, initial=None) -> torch.Tensor:
    """mean_t (||h_t|| - ||h_{t-1}||)^2 over steps and examples, summed over layers
    (Krueger & Memisevic 2015); `initial` [layers] of h_0 [B, H] joins the first difference."""
    total = 0.0
    for i, h in enumerate(sequences):
        norms = h.norm(dim=-1)  # [T, B]
        if initial is not None:
            norms = torch.cat([initial[i].norm(dim=-1).unsqueeze(0), norms])
        if norms.shape[0] > 1:
            total = total + (norms[1:] - norms[:-1]).pow(2).mean()
    return torch.as_tensor(total)


class WeightNoise:
    """Gaussian weight noise (Graves 2011): added to every weight matrix before the forward pass of a
    training step, removed after the backward pass (so the gradient is taken at the noisy point)."""

    def __init__(self, model: nn.Module, sigma: float):
        self.params = [p for p in model.parameters() if p.dim() >= 2]
        self.sigma = sigma
        self.noise = None

    def add(self) -> None:
        if self.sigma <= 0:
            return
        with torch.no_grad():
            self.noise = [torch.randn_like(p) * self.sigma for p in self.params]
            for p, n in zip(self.params, self.noise):
                p.add_(n)

    def remove(self) -> None:
        if self.noise is None:
            return
        with torch.no_grad():
            for p, n in zip(self.params, self.noise):
                p.sub_(n)
        self.noise = None


METRIC_NAMES = {"copy": "error", "char-ptb": "bpc", "text8": "bpc", "word-ptb": "perplexity", "pmnist": "error"}


def metric_from_nats(task: str, nats: float) -> float:
    """The reported metric from a mean cross-entropy in nats (language-model tasks)."""
    if METRIC_NAMES[task] == "bpc":
        return nats / math.log(2)
    if METRIC_NAMES[task] == "perplexity":
        return math.exp(min(nats, 50.0))
    raise ValueError(task)
