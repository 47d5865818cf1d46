"""The mask oracle: the contract's Philox4x32-10 masks in plain torch integer ops.

Every backend (reference, C++ CPU, Triton, CUDA) regenerates the same masks from
``(seed, counter)``; this module is the readable definition they are tested against
(contract sec. 2). 32-bit words are held in int64 tensors so that no operation
overflows: products are split into 16-bit halves.
"""
from __future__ import annotations

from typing import Tuple

import torch

MASK_MODES = ("independent", "shared", "timestep", "static")
# Integer codes passed to the compiled ops; index into MASK_MODES.
MASK_MODE_CODES = {name: code for code, name in enumerate(MASK_MODES)}

# The Philox4x32 constants (Salmon et al. 2011, as in triton.language.philox) and tl.rand's
# int32 -> [0, 1) scale live as literals inside the functions below: TorchScript, which compiles
# them for the scripted modules, cannot read module-level Python numbers.


def _mul_hi_lo(a: torch.Tensor, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product a * m, a holding uint32 values."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    p_lo = a_lo * m  # < 2**48
    p_hi = a_hi * m  # < 2**48
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & 0xFFFFFFFF
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi, lo


def _philox_rounds(seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                   c3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ten rounds, key = (seed & 0xffffffff, seed >> 32) of a 0-dim int64 seed (its 64 bits: the
    shift is arithmetic, the mask keeps exactly the high word). Scriptable: the core of every
    function below, in eager code, traced code and TorchScript alike."""
    u32 = 0xFFFFFFFF
    k0, k1 = seed & u32, (seed >> 32) & u32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, 0xCD9E8D57)  # round multipliers
        hi_a, lo_a = _mul_hi_lo(c0, 0xD2511F53)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & u32  # key schedule (Weyl constants)
        k1 = (k1 + 0xBB67AE85) & u32
    return c0, c1, c2, c3


def seed_tensor(seed) -> torch.Tensor:
    """A seed as the 0-dim int64 tensor of its 64 bits (an int in [0, 2**64), or such a tensor)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise ValueError(f"seed must be a 0-dim int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
        return seed
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)


def philox4x32_10(seed, c0, c1, c2, c3):
    """Philox4x32 with 10 rounds, key = (seed & 0xffffffff, seed >> 32).

    seed: an int in [0, 2**64), or a 0-dim int64 tensor (its 64 bits, so that tracing and
    torch.compile see no data-dependent Python int). Counters are int64 tensors (or ints) holding
    uint32 values; returns four int64 tensors holding uint32 values, bit-identical to
    ``triton.language.philox(seed, c0, c1, c2, c3)``.
    """
    seed = seed_tensor(seed)
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    return _philox_rounds(seed, c0, c1, c2, c3)


def uint32_to_uniform(r: torch.Tensor) -> torch.Tensor:
    """triton.language.rand's conversion: int32(r), ~x if negative, times 2**-31 in float32."""
    x = torch.where(r >= 2**31, r - 2**32, r)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def span_uniforms(seed: torch.Tensor, layer: int, direction: int, first: int, steps: int, batch: int, hidden: int,
                  mode: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The uniforms (u0, u1, u2), each [steps, batch, hidden] float32, of positions first .. first +
    steps - 1, with a tensor seed and a mode code (MASK_MODE_CODES): scriptable. The counters of
    all the steps at once: one Philox over the span instead of one per step."""
    stream = 0 if mode <= 1 else mode - 1  # independent, shared: 0; timestep: 1; static: 2
    t = torch.arange(first, first + steps, dtype=torch.int64, device=device).view(steps, 1, 1)
    b = torch.arange(batch, dtype=torch.int64, device=device).view(1, batch, 1)
    j = torch.arange(hidden, dtype=torch.int64, device=device).view(1, 1, hidden)
    if mode == 2:
        n = (t * batch + b) + 0 * j
    elif mode == 3:
        n = (t * hidden + j) + 0 * b
    else:
        n = (t * batch + b) * hidden + j
    r0, r1, r2, _ = _philox_rounds(seed, n & 0xFFFFFFFF, n >> 32, torch.full_like(n, 2 * layer + direction),
                                   torch.full_like(n, stream))
    return uint32_to_uniform(r0), uint32_to_uniform(r1), uint32_to_uniform(r2)


def uniforms(seed: torch.Tensor, layer: int, direction: int, t: int, batch: int, hidden: int, mode: int,
             device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """step_uniforms with a tensor seed and a mode code (MASK_MODE_CODES): scriptable."""
    u0, u1, u2 = span_uniforms(seed, layer, direction, t, 1, batch, hidden, mode, device)
    return u0[0], u1[0], u2[0]


def span_masks(seed: torch.Tensor, layer: int, direction: int, first: int, steps: int, batch: int, hidden: int,
               zoneout_cell: float, zoneout_hidden: float, recurrent_dropout: float, mode: int,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m_c, m_h, keep), each a [steps, batch, hidden] bool tensor, of positions first .. first +
    steps - 1, with a tensor seed and a mode code: scriptable (the contract's masks, sec. 2)."""
    z_c = torch.tensor(zoneout_cell, dtype=torch.float32)
    z_h = torch.tensor(zoneout_hidden, dtype=torch.float32)
    u0, u1, u2 = span_uniforms(seed, layer, direction, first, steps, batch, hidden, mode, device)
    if mode == 0:
        m_c, m_h = u0 < z_c, u1 < z_h
    else:  # shared, timestep, static: one uniform for both states
        m_c, m_h = u0 < z_c, u0 < z_h
    if recurrent_dropout > 0.0:
        # Recurrent dropout always draws per (step, example, unit) from the stream-0 counter.
        if mode > 1:
            u2 = span_uniforms(seed, layer, direction, first, steps, batch, hidden, 0, device)[2]
        keep = u2 >= torch.tensor(recurrent_dropout, dtype=torch.float32)
    else:
        keep = torch.ones(steps, batch, hidden, dtype=torch.bool, device=device)
    return m_c, m_h, keep


def masks(seed: torch.Tensor, layer: int, direction: int, t: int, batch: int, hidden: int, zoneout_cell: float,
          zoneout_hidden: float, recurrent_dropout: float, mode: int,
          device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """step_masks with a tensor seed and a mode code: scriptable."""
    m_c, m_h, keep = span_masks(seed, layer, direction, t, 1, batch, hidden, zoneout_cell, zoneout_hidden,
                                recurrent_dropout, mode, device)
    return m_c[0], m_h[0], keep[0]


def span_steps(batch: int, hidden: int) -> int:
    """Steps per span of masks the reference draws at once at this [batch, hidden] (at least one).

    A span holds up to 2**20 elements (a few int64 temporaries of 8 MB; the number is a literal, as
    TorchScript reads no module-level numbers). Under torch.compile each span is one Philox in the
    graph, where one Philox per step made inductor's compile 2.5 times as slow (B=32 T=50 H=256
    fwd+bwd, cold, 2 cores: 153 s against about 60 s)."""
    return max(1, 1048576 // max(1, batch * hidden))


def step_uniforms(seed, layer: int, direction: int, t: int, batch: int, hidden: int, mask_mode: str,
                  device=None):
    """The uniforms (u0, u1, u2), each [batch, hidden] float32, for time step ``t``.

    ``t`` is the position in the input (not the processing order), ``batch`` is B of the whole
    [T, B, H] sequence. Mode "timestep" gives one uniform per example, "static" one per unit
    shared by every example; both broadcast to [batch, hidden].
    """
    return uniforms(seed_tensor(seed), layer, direction, t, batch, hidden, MASK_MODE_CODES[mask_mode],
                    torch.device(device or "cpu"))


def step_masks(seed, layer: int, direction: int, t: int, batch: int, hidden: int, *,
               zoneout_cell: float, zoneout_hidden: float, recurrent_dropout: float = 0.0,
               mask_mode: str = "independent", device=None):
    """Training-mode masks for step ``t``: (m_c, m_h, keep), each a [batch, hidden] bool tensor.

    m = True means the unit zones out (keeps its previous value); keep = False means recurrent
    dropout drops the unit's candidate update. Comparisons are in float32, as in every kernel.
    """
    return masks(seed_tensor(seed), layer, direction, t, batch, hidden, float(zoneout_cell), float(zoneout_hidden),
                 float(recurrent_dropout), MASK_MODE_CODES[mask_mode], torch.device(device or "cpu"))


def sequence_masks(seed, layer: int, direction: int, steps: int, batch: int, hidden: int, **kwargs):
    """step_masks for every step, stacked to [steps, batch, hidden] (for tests and inspection)."""
    per_step = [step_masks(seed, layer, direction, t, batch, hidden, **kwargs) for t in range(steps)]
    return tuple(torch.stack(ms) for ms in zip(*per_step))
