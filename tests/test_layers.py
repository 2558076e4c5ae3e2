"""RMSNorm, RoPE (both pairings) and SwiGLU: properties and the transformers oracle."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from glm5_ref.layers import RMSNorm, SwiGLU, apply_rope, interleaved_to_half_split, rope_angles
from tests.strategies import batch_sizes, even_dims, odd_lengths, randn, seeds

positions_st = st.integers(min_value=0, max_value=200_000)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@given(seed=seeds, B=batch_sizes, T=odd_lengths, D=even_dims, interleaved=st.booleans())
def test_rope_preserves_norms(seed, B, T, D, interleaved):
    x = randn(seed, B, T, 3, D, dtype=torch.float64)
    pos = torch.randint(0, 200_000, (B, T), generator=torch.Generator().manual_seed(seed))
    y = apply_rope(x, pos, 1e6, interleaved)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-6)


@given(seed=seeds, D=even_dims, m=positions_st, n=positions_st, shift=positions_st, interleaved=st.booleans())
def test_rope_dot_product_depends_only_on_relative_position(seed, D, m, n, shift, interleaved):
    q, k = randn(seed, 1, 1, D, dtype=torch.float64), randn(seed + 1, 1, 1, D, dtype=torch.float64)

    def score(a, b):
        qa = apply_rope(q, torch.tensor([a]), 1e4, interleaved)
        kb = apply_rope(k, torch.tensor([b]), 1e4, interleaved)
        return (qa * kb).sum()

    # fp32 angles: positions up to 4e5 carry ~1e-2 rad of rounding, hence the tolerance
    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=0, atol=5e-2 * D)


@given(seed=seeds, B=batch_sizes, T=odd_lengths, D=even_dims)
def test_pairings_agree_up_to_a_fixed_permutation(seed, B, T, D):
    x = randn(seed, B, T, 2, D)
    pos = torch.arange(T) + seed % 1000
    P = interleaved_to_half_split(D)
    inter = apply_rope(x, pos, 1e6, interleaved=True)
    half = apply_rope(x[..., P], pos, 1e6, interleaved=False)
    torch.testing.assert_close(inter[..., P], half, rtol=0, atol=0)


def test_pairings_differ_without_the_permutation():
    x = randn(0, 1, 5, 8)
    pos = torch.arange(5)
    assert rel_err(apply_rope(x, pos, 1e4, True), apply_rope(x, pos, 1e4, False)) > 0.1


def test_rope_at_position_zero_is_identity_and_bf16_keeps_dtype():
    x = randn(1, 2, 1, 4, 16, dtype=torch.bfloat16)
    y = apply_rope(x, torch.zeros(1, dtype=torch.long), 1e6, True)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_rope_matches_transformers_interleaved_implementation():
    mod = pytest.importorskip("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa")
    B, T, H, D, theta = 2, 7, 3, 16, 1e6
    q, k = randn(3, B, H, T, D), randn(4, B, 1, T, D)
    pos = torch.arange(T) + 11
    cos, sin = rope_angles(pos, D, theta)  # (T, D/2)
    cos_hf, sin_hf = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]  # (1, T, D)
    q_hf, k_hf = mod.apply_rotary_pos_emb_interleave(q, k, cos_hf, sin_hf)
    # transformers returns the rotated vectors in half-split order (it permutes, then rotate_half)
    P = interleaved_to_half_split(D)
    q_ours = apply_rope(q.transpose(1, 2), pos, theta, interleaved=True).transpose(1, 2)
    k_ours = apply_rope(k.transpose(1, 2), pos, theta, interleaved=True).transpose(1, 2)
    torch.testing.assert_close(q_ours[..., P], q_hf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_ours[..., P], k_hf, rtol=1e-5, atol=1e-5)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="positions"):
        apply_rope(torch.zeros(2, 5, 8), torch.arange(4), 1e4, True)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.zeros(2, 5, 7), torch.arange(5), 1e4, True)


@given(seed=seeds, T=odd_lengths)
def test_rmsnorm_formula(seed, T):
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(randn(seed, 24))
    x = randn(seed + 1, 2, T, 24)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(norm(x), expected) < 1e-6


def test_rmsnorm_bf16_is_computed_in_fp32_and_bad_width_raises():
    norm = RMSNorm(64)
    x = randn(0, 3, 64) * 1000
    y = RMSNorm(64).bfloat16()(x.bfloat16())  # a bf16 model: weight and activations in bf16
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), norm(x)) < 1e-2
    with pytest.raises(ValueError, match="RMSNorm input"):
        norm(torch.zeros(3, 63))


@given(seed=seeds, T=odd_lengths)
def test_swiglu_formula(seed, T):
    torch.manual_seed(seed)
    ffn = SwiGLU(12, 20)
    x = randn(seed, T, 12)
    expected = (F.silu(x @ ffn.gate_proj.weight.T) * (x @ ffn.up_proj.weight.T)) @ ffn.down_proj.weight.T
    assert rel_err(ffn(x), expected) < 1e-6
    assert sorted(n for n, _ in ffn.named_parameters()) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]


@given(seed=seeds, D=even_dims, theta=st.sampled_from([10.0, 1e4, 1e6]), top=st.sampled_from([1, 900, 5000, 65535]),
       shape=st.sampled_from([(1,), (7,), (2, 5)]))
def test_cached_rope_table_gives_the_angles_bit_for_bit(seed, D, theta, top, shape):
    """The CPU's cached cos / sin tables (positions below ROPE_TABLE_MAX) equal the formula evaluated at the
    positions themselves, whatever the table's length; positions beyond the table and negative ones still work."""
    from glm5_ref.layers import ROPE_TABLE_MAX, _angles

    pos = torch.randint(0, top + 1, shape, generator=torch.Generator().manual_seed(seed))
    for p in (pos, pos + ROPE_TABLE_MAX, -pos):  # table, beyond it, negative: both formula paths
        cos, sin = rope_angles(p, D, theta)
        ref_cos, ref_sin = _angles(p, D, theta, torch.float64)
        assert cos.shape == sin.shape == (*shape, D // 2) and cos.dtype == torch.float32
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    cos = rope_angles(pos, D, theta)[0]
    cos[...] = 0  # what a caller gets is its own tensor: the cached table is untouched
    assert torch.equal(rope_angles(pos, D, theta)[0], _angles(pos, D, theta, torch.float64)[0])
