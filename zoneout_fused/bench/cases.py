"""Benchmark shapes: the paper's experiments (Krueger et al. 2017, sec. 4) and small CPU cases.

Each `--config` name maps to one or more cases. Input sizes the paper leaves open (it feeds
embeddings) are set to I = H, as an embedding of the hidden size would give.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SWEEP_HIDDEN = (64, 128, 256, 512)


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    # Zoneout settings the paper used for this task; None: the command line's (default 0.5 / 0.05).
    zoneout_cell: Optional[float] = None
    zoneout_hidden: Optional[float] = None
    mask_mode: Optional[str] = None
    note: str = ""
    # True: the cell API stepped `steps` times (an autoregressive decoder), not a sequence layer.
    cell: bool = False

    def shape_fields(self) -> dict:
        return dict(batch=self.batch, steps=self.steps, input_size=self.input_size,
                    hidden_size=self.hidden_size, num_layers=self.num_layers, bidirectional=self.bidirectional)

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def describe(self) -> str:
        return (f"{self.name}: B={self.batch} T={self.steps} I={self.input_size} H={self.hidden_size}"
                f" layers={self.num_layers}" + (" bidirectional" if self.bidirectional else "")
                + (" cell stepped T times" if self.cell else "")
                + (f" ({self.note})" if self.note else ""))


CONFIGS: dict[str, tuple[Case, ...]] = {
    # Hidden from --help: the test suite's micro case (2 layers, so the layer loop is exercised).
    "tiny": (Case("tiny", batch=3, steps=5, input_size=4, hidden_size=8, num_layers=2),),
    "tiny-bi": (Case("tiny-bi", batch=3, steps=5, input_size=4, hidden_size=8, num_layers=2, bidirectional=True),),
    "tiny-decode": (Case("tiny-decode", batch=2, steps=3, input_size=4, hidden_size=8, zoneout_cell=0.1,
                         zoneout_hidden=0.1, cell=True),),
    # The CPU targets; about a minute on 2 cores with the default repeats.
    "small": (Case("small-h256", batch=32, steps=100, input_size=64, hidden_size=256),
              Case("small-h128", batch=64, steps=50, input_size=32, hidden_size=128)),
    "char-ptb": (Case("char-ptb", batch=32, steps=100, input_size=1000, hidden_size=1000,
                      note="I=H (embedding input)"),),
    "word-ptb": (Case("word-ptb", batch=20, steps=35, input_size=1500, hidden_size=1500, num_layers=2,
                      note="I=H (embedding input)"),),
    "text8": (Case("text8", batch=128, steps=180, input_size=2000, hidden_size=2000,
                   note="I=H (embedding input)"),),
    # The paper's pMNIST model zones out c and h with one shared mask, z = 0.15.
    "pmnist": (Case("pmnist", batch=100, steps=784, input_size=1, hidden_size=100, zoneout_cell=0.15,
                    zoneout_hidden=0.15, mask_mode="shared", note="shared mask, z_c = z_h = 0.15"),),
    # Time per step against hidden size, fixed B, T, I (the plot's input).
    "sweep": tuple(Case(f"sweep-h{h}", batch=32, steps=50, input_size=64, hidden_size=h) for h in SWEEP_HIDDEN),
    # Encoders of TTS models: Tacotron 2's (a bidirectional LSTM of 256 units a direction over 512
    # convolution features, zoneout 0.1 on c and h) and a 2-layer one.
    "encoder": (Case("encoder-1x256-bi", batch=32, steps=100, input_size=512, hidden_size=256, bidirectional=True,
                     zoneout_cell=0.1, zoneout_hidden=0.1, note="Tacotron 2 encoder"),
                Case("encoder-2x256-bi", batch=32, steps=100, input_size=256, hidden_size=256, num_layers=2,
                     bidirectional=True, zoneout_cell=0.1, zoneout_hidden=0.1)),
    # Autoregressive decoding (Tacotron 2's decoder cell: I=512 from the prenet and attention
    # context, H=1024, zoneout 0.1 on c and h): ZoneoutLSTMCell called once per frame; and a cell
    # so small (B=1, I=H=16) that its time is the fixed cost of a call (checks, seed, dispatch).
    "decode": tuple(Case(f"decode-b{b}", batch=b, steps=20, input_size=512, hidden_size=1024, zoneout_cell=0.1,
                         zoneout_hidden=0.1, cell=True, note="Tacotron 2 decoder cell")
                    for b in (1, 32))
              + (Case("decode-fixed-cost", batch=1, steps=20, input_size=16, hidden_size=16, zoneout_cell=0.1,
                      zoneout_hidden=0.1, cell=True, note="a call's fixed cost"),),
}
PAPER_CONFIGS = ("char-ptb", "word-ptb", "text8", "pmnist")
PUBLIC_CONFIGS = ("small",) + PAPER_CONFIGS + ("sweep", "encoder", "decode", "all")


def cases_for(config: str) -> list[Case]:
    if config == "all":
        return [case for name in ("small",) + PAPER_CONFIGS + ("sweep", "encoder", "decode") for case in CONFIGS[name]]
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; choose from {PUBLIC_CONFIGS}")
    return list(CONFIGS[config])
