"""`python -m zoneout_fused.bench`: times every backend against the reference, the reference under
torch.compile and torch.nn.LSTM, after checking each against the reference (see runner.py).

`python -m zoneout_fused.bench.plot`: time per step against hidden size from a --json result.
"""
from .cases import CONFIGS, Case, cases_for
from .runner import Peer, main

__all__ = ["CONFIGS", "Case", "Peer", "cases_for", "main"]
