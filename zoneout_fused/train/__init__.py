"""Training programs for zoneout_fused: `python -m zoneout_fused.train --help`.

Tasks: a built-in copy task (default, no download), char-ptb, word-ptb, text8, pmnist with the
paper's settings as presets, regularizer baselines, and the gradient-flow experiment of the paper's
Figure 6 (`python -m zoneout_fused.train.gradient_flow`).
"""
from .cli import main, resolve_config
from .data import DataError
from .tasks import PRESETS, REGULARIZERS, TASKS, Config

__all__ = ["main", "resolve_config", "DataError", "PRESETS", "REGULARIZERS", "TASKS", "Config"]
