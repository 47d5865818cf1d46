"""The mask oracle against triton.language.philox (run by the interpreter on CPU) and
against the contract's statistical promises."""
import pytest
import torch

from zoneout_fused import masks

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _philox_kernel(out_ptr, uniform_ptr, seed, c0_ptr, c1_ptr, c2, c3, N: tl.constexpr):
    offsets = tl.arange(0, N)
    c0 = tl.load(c0_ptr + offsets).to(tl.uint32)
    c1 = tl.load(c1_ptr + offsets).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + c2, zero + c3)
    tl.store(out_ptr + 0 * N + offsets, r0.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 1 * N + offsets, r1.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 2 * N + offsets, r2.to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + 3 * N + offsets, r3.to(tl.int64) & 0xFFFFFFFF)
    u = tl.random.uint_to_uniform_float(r0)
    tl.store(uniform_ptr + offsets, u)


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seed", [0, 1, 0xFFFFFFFF, 2**32, 12345678901234567, 2**63 - 1])
@pytest.mark.parametrize("keys", [(0, 0), (3, 1), (5, 2)])
def test_philox_bit_identical_to_triton(seed, keys):
    n = 64
    generator = torch.Generator().manual_seed(seed % 1000)
    c0 = torch.randint(0, 2**32, (n,), dtype=torch.int64, generator=generator)
    c1 = torch.randint(0, 4, (n,), dtype=torch.int64, generator=generator)
    c0[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    device = _device()
    # int32 storage holds the uint32 bit patterns the kernel reads.
    c0_i32 = torch.where(c0 >= 2**31, c0 - 2**32, c0).to(torch.int32).to(device)
    c1_i32 = c1.to(torch.int32).to(device)
    words_out = torch.zeros(4 * n, dtype=torch.int64, device=device)
    uniforms = torch.zeros(n, dtype=torch.float32, device=device)
    _philox_kernel[(1,)](words_out, uniforms, seed, c0_i32, c1_i32, keys[0], keys[1], N=n)
    words = masks.philox4x32_10(seed, c0, c1, keys[0], keys[1])
    for k in range(4):
        assert torch.equal(words_out[k * n:(k + 1) * n].cpu(), words[k]), f"word r{k} differs"
    assert torch.equal(uniforms.cpu(), masks.uint32_to_uniform(words[0]))


def test_uniforms_in_unit_interval():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = masks.uint32_to_uniform(words)
    assert u.dtype == torch.float32
    assert (u >= 0).all() and (u <= 1).all()
    assert u[0] == 0 and u[-1] == 0  # 0 and ~(-1) both map to 0


def test_philox_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        masks.philox4x32_10(-1, 0, 0, 0, 0)


SHAPE = dict(batch=50, hidden=200)


def _masks(mode, seed=7, t=3, layer=0, direction=0, z_c=0.3, z_h=0.6, p=0.0):
    return masks.step_masks(seed, layer, direction, t, SHAPE["batch"], SHAPE["hidden"], zoneout_cell=z_c,
                            zoneout_hidden=z_h, recurrent_dropout=p, mask_mode=mode)


@pytest.mark.parametrize("mode", masks.MASK_MODES)
def test_rates_match_probabilities(mode):
    # Average over many steps so per-example / per-unit modes have enough draws:
    # 40 steps x 10,000 elements; 5 standard deviations of the rate estimate.
    m_c, m_h, keep = masks.sequence_masks(11, 1, 1, 40, SHAPE["batch"], SHAPE["hidden"], zoneout_cell=0.3,
                                          zoneout_hidden=0.6, recurrent_dropout=0.2, mask_mode=mode)
    draws = {"independent": m_c.numel(), "shared": m_c.numel(), "timestep": 40 * SHAPE["batch"],
             "static": 40 * SHAPE["hidden"]}[mode]
    for observed, z in ((m_c, 0.3), (m_h, 0.6), (~keep, 0.2)):
        n = m_c.numel() if observed is not m_c and observed is not m_h else draws
        bound = 5 * (z * (1 - z) / n) ** 0.5
        assert abs(observed.double().mean().item() - z) < bound


def test_independent_masks_are_uncorrelated():
    m_c, m_h, keep = masks.sequence_masks(3, 0, 0, 20, 50, 200, zoneout_cell=0.5, zoneout_hidden=0.5,
                                          recurrent_dropout=0.5, mask_mode="independent")
    n = m_c.numel()
    for a, b in ((m_c, m_h), (m_c, keep), (m_h, keep)):
        # P(a and b) = 0.25 for independent fair coins; 5 standard deviations.
        joint = (a & b).double().mean().item()
        assert abs(joint - 0.25) < 5 * (0.25 * 0.75 / n) ** 0.5


def test_shared_mask_nests_hidden_in_cell():
    m_c, m_h, _ = _masks("shared", z_c=0.6, z_h=0.3)
    assert (m_h & ~m_c).sum() == 0  # u < 0.3 implies u < 0.6
    assert (m_c & ~m_h).sum() > 0
    m_c, m_h, _ = _masks("shared", z_c=0.4, z_h=0.4)
    assert torch.equal(m_c, m_h)


def test_timestep_mask_is_per_example():
    m_c, m_h, _ = _masks("timestep", z_c=0.5, z_h=0.5)
    assert torch.equal(m_c, m_c[:, :1].expand_as(m_c))
    assert 0 < m_c[:, 0].sum() < SHAPE["batch"]


def test_static_mask_is_shared_by_examples():
    m_c, _, _ = _masks("static", z_c=0.5)
    assert torch.equal(m_c, m_c[:1].expand_as(m_c))
    assert 0 < m_c[0].sum() < SHAPE["hidden"]


@pytest.mark.parametrize("mode", ["timestep", "static"])
def test_recurrent_dropout_draws_per_element_in_every_mode(mode):
    _, _, keep = _masks(mode, p=0.5)
    _, _, keep_independent = _masks("independent", p=0.5)
    assert torch.equal(keep, keep_independent)


def test_masks_depend_on_seed_layer_direction_step():
    base = _masks("independent")[0]
    assert torch.equal(base, _masks("independent")[0])
    for changed in (dict(seed=8), dict(layer=1), dict(direction=1), dict(t=4)):
        assert not torch.equal(base, _masks("independent", **changed)[0]), changed


def test_counter_high_word_used_for_large_sequences():
    # n = (t*B + b)*H + j >= 2**32 must reach the second counter word, not wrap.
    batch, hidden = 1, 2**20
    t = 2**12  # n = t * H = 2**32 exactly at j = 0
    u0, _, _ = masks.step_uniforms(5, 0, 0, t, batch, hidden, "independent")
    words = masks.philox4x32_10(5, 0, 1, 0, 0)
    assert u0[0, 0] == masks.uint32_to_uniform(words[0])
    assert u0[0, 0] != masks.step_uniforms(5, 0, 0, 0, batch, hidden, "independent")[0][0, 0]
