"""zoneout_fused: fused zoneout LSTMs, GRUs and RNNs (Krueger et al. 2017) with torch.nn's API."""
from .masks import MASK_MODES
from .ops import available_backends
from .nn import ZoneoutGRU, ZoneoutGRUCell, ZoneoutLSTM, ZoneoutLSTMCell, ZoneoutRNN, ZoneoutRNNCell

__all__ = ["ZoneoutLSTM", "ZoneoutLSTMCell", "ZoneoutGRU", "ZoneoutGRUCell", "ZoneoutRNN", "ZoneoutRNNCell",
           "available_backends", "MASK_MODES"]
__version__ = "0.1.0"
