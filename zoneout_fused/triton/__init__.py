"""The Triton backend: per-step fused LSTM + zoneout kernels (lstm_step.py) and GRU / plain-RNN
kernels (gru_rnn_step.py), in-kernel Philox masks (masks.py), and the
zoneout_fused::triton_layer_{forward,backward} and triton_gru_rnn_layer_{forward,backward} ops
(layer.py).

Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set
before triton is imported; for tests only).
"""
from .layer import (gru_rnn_layer_forward, layer_forward, triton_gru_rnn_layer_backward,
                    triton_gru_rnn_layer_forward, triton_layer_backward, triton_layer_forward)

__all__ = ["layer_forward", "triton_layer_forward", "triton_layer_backward", "gru_rnn_layer_forward",
           "triton_gru_rnn_layer_forward", "triton_gru_rnn_layer_backward"]
