"""zoneout_fused: fused zoneout LSTMs (Krueger et al. 2017) with nn.LSTM's API."""
from .masks import MASK_MODES
from .ops import available_backends
from .nn import ZoneoutLSTM, ZoneoutLSTMCell

__all__ = ["ZoneoutLSTM", "ZoneoutLSTMCell", "available_backends", "MASK_MODES"]
__version__ = "0.1.0"
