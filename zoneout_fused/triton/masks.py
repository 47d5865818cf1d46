"""Zoneout / recurrent-dropout masks regenerated inside Triton kernels (contract sec. 2).

`element_masks` is the one in-kernel copy of the mask contract; the forward and backward step
kernels both call it, so the masks are drawn twice and never stored. `step_masks_kernel` writes
one step's multipliers to memory so tests can compare them with zoneout_fused.masks.step_masks.
"""
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

# Mask-mode codes (zoneout_fused.masks.MASK_MODE_CODES) and their Philox streams.
INDEPENDENT, SHARED, TIMESTEP, STATIC = 0, 1, 2, 3


@triton.jit
def _philox_uniforms(seed, n, key2, STREAM: tl.constexpr):
    """u0, u1, u2 for 64-bit counters n: Philox4x32-10 on (n lo, n hi, key2, STREAM)."""
    zero = (n * 0).to(tl.uint32)
    lo = (n & 0xFFFFFFFF).to(tl.uint32)
    hi = (n >> 32).to(tl.uint32)
    r0, r1, r2, _ = tl.philox(seed, lo, hi, zero + key2.to(tl.uint32), zero + STREAM)
    return uint_to_uniform_float(r0), uint_to_uniform_float(r1), uint_to_uniform_float(r2)


@triton.jit
def element_masks(seed, key2, t, b, j, B, H, params_ptr,
                  MODE: tl.constexpr, TRAINING: tl.constexpr, DRAW_ZONEOUT: tl.constexpr,
                  HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr):
    """(keep_cell, keep_hidden, update_scale), each [BLOCK_B, BLOCK_H] in ACC.

    b: [BLOCK_B, 1] int64 example indices, j: [1, BLOCK_H] int64 unit indices, t: the position
    in the input. params_ptr -> float64 [z_c, z_h, p, scale] with scale = 1/(1-p) in training and
    1 in evaluation; probabilities are compared as float32 roundings, mixed in ACC (exact z in
    float64). DRAW_ZONEOUT = training and (z_c > 0 or z_h > 0): with z = 0 no u < 0 ever holds,
    so the draw is skipped without changing any mask. seed: the Philox key by value, or with
    SEED_IN_MEMORY a pointer to it (an int64 on the device, read only when a mask is drawn: a CUDA
    graph replay then draws from whatever key the buffer holds).
    """
    z_cell = tl.load(params_ptr + 0)
    z_hidden = tl.load(params_ptr + 1)
    p_drop = tl.load(params_ptr + 2)
    scale = tl.load(params_ptr + 3).to(ACC)
    zero = ((b + j) * 0).to(ACC)
    # Evaluation: the masks' expectations, nothing drawn. Training overwrites them below.
    keep_cell = zero + z_cell.to(ACC)
    keep_hidden = zero + z_hidden.to(ACC)
    update_scale = zero + scale
    if TRAINING:
        keep_cell = zero
        keep_hidden = zero
        t64 = t.to(tl.int64)
        n_elem = (t64 * B + b) * H + j  # contract: n = (t*B + b)*H + j, 64-bit
        if DRAW_ZONEOUT or HAS_DROPOUT:
            if SEED_IN_MEMORY:
                key = tl.load(seed)
            else:
                key = seed
        if MODE == 0 or MODE == 1:
            if DRAW_ZONEOUT or HAS_DROPOUT:
                u0, u1, u2 = _philox_uniforms(key, n_elem, key2, 0)
                if MODE == 1:
                    u1 = u0
                if DRAW_ZONEOUT:
                    keep_cell = tl.where(u0 < z_cell.to(tl.float32), 1.0, 0.0).to(ACC) + zero
                    keep_hidden = tl.where(u1 < z_hidden.to(tl.float32), 1.0, 0.0).to(ACC) + zero
                if HAS_DROPOUT:
                    update_scale = tl.where(u2 >= p_drop.to(tl.float32), scale, 0.0).to(ACC) + zero
        else:
            if DRAW_ZONEOUT:
                # One uniform per (step, example) or per (step, unit): draw on the small block, broadcast.
                if MODE == 2:
                    u0, _, _ = _philox_uniforms(key, t64 * B + b, key2, 1)
                else:
                    u0, _, _ = _philox_uniforms(key, t64 * H + j, key2, 2)
                keep_cell = tl.where(u0 < z_cell.to(tl.float32), 1.0, 0.0).to(ACC) + zero
                keep_hidden = tl.where(u0 < z_hidden.to(tl.float32), 1.0, 0.0).to(ACC) + zero
            if HAS_DROPOUT:  # recurrent dropout always uses the stream-0, per-element counter
                _, _, u2 = _philox_uniforms(key, n_elem, key2, 0)
                update_scale = tl.where(u2 >= p_drop.to(tl.float32), scale, 0.0).to(ACC) + zero
    return keep_cell, keep_hidden, update_scale


@triton.jit(do_not_specialize=["seed", "key2", "t"])
def step_masks_kernel(keep_cell_ptr, keep_hidden_ptr, scale_ptr, params_ptr, seed, key2, t, B, H,
                      MODE: tl.constexpr, TRAINING: tl.constexpr, DRAW_ZONEOUT: tl.constexpr,
                      HAS_DROPOUT: tl.constexpr, ACC: tl.constexpr, SEED_IN_MEMORY: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Writes one step's [B, H] multipliers (for tests of the in-kernel mask contract)."""
    b = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)[:, None]
    j = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :]
    keep_cell, keep_hidden, update_scale = element_masks(seed, key2, t, b, j, B, H, params_ptr, MODE, TRAINING,
                                                         DRAW_ZONEOUT, HAS_DROPOUT, ACC, SEED_IN_MEMORY)
    inside = (b < B) & (j < H)
    offs = b * H + j
    tl.store(keep_cell_ptr + offs, keep_cell, mask=inside)
    tl.store(keep_hidden_ptr + offs, keep_hidden, mask=inside)
    tl.store(scale_ptr + offs, update_scale, mask=inside)
