"""Tests of glm5_ref.mla: the absorbed path against the expanded one, the latent cache against a full forward,
causality, key selection against a hand-written masked reference, gradients, bf16, RoPE pairing, errors, and
transformers' GlmMoeDsaAttention as an outside oracle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.layers import apply_rope, interleaved_to_half_split
from glm5_ref.mla import MLA, AttentionOutput, MLACache, allowed_keys, attention_core
from tests.strategies import batch_sizes, odd_lengths, randn, seeds, small_configs, with_changes

# fp64 comparisons between different code paths stop near 1e-7, not 1e-15: apply_rope (layers.py) rotates in
# fp32 whatever the input dtype, so last-bit differences of its inputs can round to different fp32 values.
FP64_TOL = 1e-6
EXPECTED_PARAMS = {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
                   "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_mla(config: GLM5Config, seed: int, dtype: torch.dtype = torch.float32) -> MLA:
    """An MLA whose weights are seeded and whose norm gains are not all ones (so a missing norm shows)."""
    torch.manual_seed(seed)
    m = MLA(config).to(dtype)
    with torch.no_grad():
        m.q_a_layernorm.weight.uniform_(0.5, 1.5)
        m.kv_a_layernorm.weight.uniform_(0.5, 1.5)
    return m


def random_key_indices(seed: int, B: int, T: int, start: int = 0, k: int = 4) -> torch.Tensor:
    """(B, T, k) random causal selections for queries at positions start..start+T-1, with -1 padding and
    repeats; some rows entirely -1."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(start, start + T)[None, :, None]  # (1, T, 1)
    idx = (torch.rand(B, T, k, generator=g) * (t + 1)).long()  # (B, T, k) in [0, t]
    idx = torch.where(torch.rand(B, T, k, generator=g) < 0.3, -1, idx)
    idx[:, ::5] = -1  # every fifth query attends to nothing
    return idx


# --- structure ------------------------------------------------------------------------------------------
def test_parameter_names_and_shapes_match_the_checkpoint():
    c = GLM5Config.tiny()
    m = MLA(c)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    H, N, P, V = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    assert shapes == {
        "q_a_proj.weight": (c.q_lora_rank, c.hidden_size), "q_a_layernorm.weight": (c.q_lora_rank,),
        "q_b_proj.weight": (H * (N + P), c.q_lora_rank),
        "kv_a_proj_with_mqa.weight": (c.kv_lora_rank + P, c.hidden_size),
        "kv_a_layernorm.weight": (c.kv_lora_rank,), "kv_b_proj.weight": (H * (N + V), c.kv_lora_rank),
        "o_proj.weight": (c.hidden_size, H * V),
    }
    assert set(shapes) == EXPECTED_PARAMS
    assert sum(p.numel() for p in m.parameters()) == c.param_breakdown()["attention"] // c.num_hidden_layers
    assert all(not hasattr(mod, "bias") or mod.bias is None for mod in m.modules())


def test_cache_holds_576_values_per_token_at_glm5_size():
    c = GLM5Config.glm5()
    cache = MLACache.for_config(c, batch_size=1, max_len=1, dtype=torch.bfloat16, device="meta")
    per_token = cache.latent.shape[-1] + cache.k_rope.shape[-1]
    assert per_token == 576 == c.kv_cache_values_per_token(include_indexer=False)
    assert per_token * 2 == 1152  # bytes per token per layer in bf16


# --- the two paths ----------------------------------------------------------------------------------------
@given(config=small_configs(), B=batch_sizes, T=odd_lengths, seed=seeds)
def test_absorbed_equals_expanded(config, B, T, seed):
    m = make_mla(config, seed)
    x = randn(seed, B, T, config.hidden_size)
    with torch.no_grad():
        expanded, absorbed = m(x), m(x, absorbed=True)
    assert rel(absorbed, expanded) < 1e-5


@given(config=small_configs(), B=batch_sizes, T=st.sampled_from([1, 5, 13, 63]), seed=seeds,
       absorbed=st.booleans(), data=st.data())
def test_incremental_decode_equals_full_forward(config, B, T, seed, absorbed, data):
    m = make_mla(config, seed, torch.float64)
    x = randn(seed, B, T, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)  # (B, T, D), expanded, no cache
        cache = MLACache.for_config(config, B, T + 2, dtype=torch.float64)
        p = data.draw(st.integers(0, T), label="prefill")
        chunks = [(0, p)] if p else []
        while p < T:  # then single tokens and small chunks
            size = data.draw(st.sampled_from([1, 1, 2, 3, 8]), label="chunk")
            chunks.append((p, min(T, p + size)))
            p = chunks[-1][1]
        for a, b in chunks:
            out = m(x[:, a:b], cache=cache, absorbed=absorbed)
            for t in range(a, b):  # position by position
                assert rel(out[:, t - a], full[:, t]) < FP64_TOL, (a, b, t)
        assert cache.length == T


def test_explicit_positions_with_a_cache_and_per_row_positions():
    c = GLM5Config.tiny()
    m = make_mla(c, 0, torch.float64)
    x = randn(1, 2, 6, c.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = m(x, positions=torch.arange(6).expand(2, 6))  # (B, T) positions
        cache = MLACache.for_config(c, 2, 6, dtype=torch.float64)
        m(x[:, :4], positions=torch.arange(4), cache=cache, absorbed=True)
        last = m(x[:, 4:], positions=torch.tensor([[4, 5], [4, 5]]), cache=cache, absorbed=True)
    assert rel(last, full[:, 4:]) < FP64_TOL


def test_truncate_rolls_back_speculative_tokens():
    c = GLM5Config.tiny()
    m = make_mla(c, 1, torch.float64)
    x = randn(2, 1, 8, c.hidden_size, dtype=torch.float64)
    draft = randn(3, 1, 3, c.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = MLACache.for_config(c, 1, 16, dtype=torch.float64)
        m(x[:, :5], cache=cache, absorbed=True)
        m(draft, cache=cache, absorbed=True)  # three draft tokens, all rejected
        cache.truncate(5)
        out = m(x[:, 5:], cache=cache, absorbed=True)
    assert rel(out, full[:, 5:]) < FP64_TOL


@given(config=small_configs(), T=st.sampled_from([2, 5, 13]), seed=seeds, absorbed=st.booleans(), data=st.data())
def test_causality(config, T, seed, absorbed, data):
    m = make_mla(config, seed, torch.float64)
    x = randn(seed, 2, T, config.hidden_size, dtype=torch.float64)
    j = data.draw(st.integers(1, T - 1), label="changed position")
    x2 = x.clone()
    x2[:, j:] = randn(seed + 1, 2, T - j, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        y, y2 = m(x, absorbed=absorbed), m(x2, absorbed=absorbed)
    torch.testing.assert_close(y2[:, :j], y[:, :j], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, j:], y[:, j:])


# --- key selection (the interface DSA uses) ----------------------------------------------------------------
@given(config=small_configs(), B=batch_sizes, T=odd_lengths, seed=seeds, absorbed=st.booleans())
def test_selecting_all_causal_keys_equals_dense_exactly(config, B, T, seed, absorbed):
    m = make_mla(config, seed)
    x = randn(seed, B, T, config.hidden_size)
    t = torch.arange(T)
    every = torch.where(t[None, :] <= t[:, None], t[None, :], -1)  # (T, T): key s if s <= t else -1
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    idx = torch.cat([every[:, perm], torch.full((T, 2), -1)], dim=-1).expand(B, T, T + 2)  # shuffled + padding
    with torch.no_grad():
        assert torch.equal(m(x, key_indices=idx, absorbed=absorbed), m(x, absorbed=absorbed))


def reference_selected_attention(m: MLA, x: torch.Tensor, key_indices: torch.Tensor) -> torch.Tensor:
    """MLA written out by hand from the weights, with a loop over (batch, query) and the selected keys."""
    c = m.config
    B, T, _ = x.shape
    H, N, P, V = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim

    def rms(h, w):
        return w * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)

    pos = torch.arange(T)
    q = (rms(x @ m.q_a_proj.weight.T, m.q_a_layernorm.weight) @ m.q_b_proj.weight.T).view(B, T, H, N + P)
    q_nope, q_rope = q[..., :N], apply_rope(q[..., N:], pos, c.rope_theta, c.rope_interleave)
    kv_a = x @ m.kv_a_proj_with_mqa.weight.T
    latent = rms(kv_a[..., :c.kv_lora_rank], m.kv_a_layernorm.weight)
    k_rope = apply_rope(kv_a[..., c.kv_lora_rank:], pos, c.rope_theta, c.rope_interleave)  # (B, T, P)
    kv = (latent @ m.kv_b_proj.weight.T).view(B, T, H, N + V)
    k_nope, v = kv[..., :N], kv[..., N:]
    out = torch.zeros(B, T, H, V, dtype=x.dtype)
    selections = key_indices.tolist()
    for b in range(B):
        for t in range(T):
            keys = sorted({s for s in selections[b][t] if 0 <= s <= t})
            if not keys:
                continue  # nothing selected: zeros
            s = torch.tensor(keys)
            logits = (torch.einsum("hn,khn->hk", q_nope[b, t], k_nope[b, s])
                      + torch.einsum("hp,kp->hk", q_rope[b, t], k_rope[b, s])) / math.sqrt(N + P)
            out[b, t] = torch.einsum("hk,khv->hv", logits.softmax(-1), v[b, s])
    return out.reshape(B, T, H * V) @ m.o_proj.weight.T


@given(config=small_configs(), B=batch_sizes, T=st.sampled_from([1, 5, 13, 31]), seed=seeds,
       absorbed=st.booleans(), prefill=st.integers(0, 30))
def test_random_selection_equals_masked_reference(config, B, T, seed, absorbed, prefill):
    m = make_mla(config, seed, torch.float64)
    x = randn(seed, B, T, config.hidden_size, dtype=torch.float64)
    idx = random_key_indices(seed, B, T)
    ref = reference_selected_attention(m, x, idx)
    with torch.no_grad():
        assert rel(m(x, key_indices=idx, absorbed=absorbed), ref) < FP64_TOL
        # the same selection, decoded through a cache after a prefill of p tokens
        p = min(prefill, T - 1)
        cache = MLACache.for_config(config, B, T, dtype=torch.float64)
        head = m(x[:, :p], cache=cache, key_indices=idx[:, :p], absorbed=absorbed) if p else x[:, :0]
        tail = m(x[:, p:], cache=cache, key_indices=idx[:, p:], absorbed=absorbed)
    assert rel(torch.cat([head, tail], 1), ref) < FP64_TOL


def test_a_query_with_nothing_selected_gives_zeros_and_finite_gradients():
    c = GLM5Config.tiny()
    m = make_mla(c, 2)
    x = randn(4, 2, 5, c.hidden_size).requires_grad_()
    idx = torch.full((2, 5, 3), -1)
    idx[:, 3, 0] = 1  # only query 3 attends (to key 1)
    for absorbed in (False, True):
        y = m(x, key_indices=idx, absorbed=absorbed)
        assert torch.equal(y[:, [0, 1, 2, 4]], torch.zeros_like(y[:, [0, 1, 2, 4]]))
        y.square().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in [x, *m.parameters()])


def test_attention_core_shared_and_per_head_values_agree():
    scores = randn(5, 2, 3, 4, 6)  # (B, H, T, S)
    values = randn(6, 2, 6, 7)  # (B, S, V)
    shared, none = attention_core(scores, values, torch.arange(2, 6))
    per_head, _ = attention_core(scores, values[:, :, None].expand(-1, -1, 3, -1), torch.arange(2, 6))
    assert none is None
    assert rel(shared, per_head) < 1e-6
    assert allowed_keys(torch.arange(3), 3).tolist() == [[[True, False, False], [True, True, False], [True] * 3]]


# --- gradients and precision ------------------------------------------------------------------------------
@given(config=small_configs(), B=batch_sizes, T=st.sampled_from([1, 5, 13]), seed=seeds, select=st.booleans())
def test_gradients_of_both_paths_agree(config, B, T, seed, select):
    m = make_mla(config, seed)
    x = randn(seed, B, T, config.hidden_size)
    idx = random_key_indices(seed, B, T) if select else None
    target = randn(seed + 1, B, T, config.hidden_size)
    grads = []
    for absorbed in (False, True):
        m.zero_grad()
        xg = x.clone().requires_grad_()
        (m(xg, absorbed=absorbed, key_indices=idx) * target).sum().backward()
        grads.append([xg.grad] + [p.grad.clone() for p in m.parameters()])
    for g_expanded, g_absorbed in zip(*grads):
        if g_expanded.norm() > 0:
            assert rel(g_absorbed, g_expanded) < 1e-5
        else:
            assert g_absorbed.norm() < FP64_TOL


@given(config=small_configs(), T=st.sampled_from([1, 5, 63]), seed=seeds, absorbed=st.booleans())
def test_bf16_is_within_1e2_of_fp32(config, T, seed, absorbed):
    m = make_mla(config, seed)
    x = randn(seed, 2, T, config.hidden_size)
    m16 = copy.deepcopy(m).to(torch.bfloat16)
    with torch.no_grad():
        y32 = m(x, absorbed=absorbed)
        y16 = m16(x.bfloat16(), absorbed=absorbed)
        cache = MLACache.for_config(config, 2, T, dtype=torch.bfloat16)  # prefill, then the last two one by one
        steps = [(0, max(T - 2, 1))] + [(t, t + 1) for t in range(max(T - 2, 1), T)]
        y16_cached = torch.cat([m16(x[:, a:b].bfloat16(), cache=cache, absorbed=absorbed) for a, b in steps], 1)
    assert y16.dtype == torch.bfloat16
    assert rel(y16, y32) < 1e-2
    assert rel(y16_cached, y32) < 1e-2


# --- RoPE ---------------------------------------------------------------------------------------------
@given(config=st.one_of(small_configs(qk_rope_head_dim=4, index_head_dim=4),  # with one pair (d_r = 2) the
                        small_configs(qk_rope_head_dim=6, index_head_dim=9)),  # two pairings coincide
       seed=seeds)
def test_rope_pairing_flag_matters_and_is_a_permutation_of_the_rope_rows(config, seed):
    inter = make_mla(with_changes(config, rope_interleave=True), seed)
    half = make_mla(with_changes(config, rope_interleave=False), seed)  # the same weights
    x = randn(seed, 2, 7, config.hidden_size)
    with torch.no_grad():
        assert rel(half(x), inter(x)) > 1e-3
        # permuting the rope rows of q_b and kv_a turns one pairing into the other: outputs agree again
        H, N, P = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
        perm = interleaved_to_half_split(P)
        q_rows = half.q_b_proj.weight.view(H, N + P, -1)  # (H, N + P, R)
        q_rows[:, N:] = q_rows[:, N:][:, perm].clone()
        kv_rows = half.kv_a_proj_with_mqa.weight  # (C + P, D)
        kv_rows[config.kv_lora_rank:] = kv_rows[config.kv_lora_rank:][perm].clone()
        assert rel(half(x), inter(x)) < 1e-5
        assert rel(half(x, absorbed=True), inter(x)) < 1e-5


@given(config=small_configs(), seed=seeds, shift=st.integers(1, 100))
def test_rope_acts_only_on_the_rope_dims(config, seed, shift):
    m = make_mla(config, seed)
    x = randn(seed, 1, 4, config.hidden_size)
    p0, p1 = torch.arange(4), torch.arange(4) + shift
    with torch.no_grad():
        c_q = m.q_latent(x)
        (n0, r0), (n1, r1) = m.project_q(c_q, p0), m.project_q(c_q, p1)
        (l0, k0), (l1, k1) = m.project_kv_latent(x, p0), m.project_kv_latent(x, p1)
    assert torch.equal(n0, n1) and torch.equal(l0, l1)  # nope dims and latent: position-free
    assert not torch.allclose(r0, r1) and not torch.allclose(k0, k1)  # rope dims: rotated
    torch.testing.assert_close(r0.norm(dim=-1), r1.norm(dim=-1))  # rotations keep norms
    torch.testing.assert_close(k0.norm(dim=-1), k1.norm(dim=-1))


def test_absorption_breaks_if_rope_were_applied_to_the_latent_keys():
    """Why RoPE is decoupled: rotating k^C = W^UK c_s by position s means (W^UK)^T q no longer works."""
    g = torch.Generator().manual_seed(0)
    C, N, S = 8, 6, 5
    w_uk, q, c = torch.randn(N, C, generator=g), torch.randn(1, N, generator=g), torch.randn(S, C, generator=g)
    pos = torch.arange(S)
    k = apply_rope((c @ w_uk.T)[None], pos, 10_000.0, True)[0]  # (S, N): RoPE on the expanded keys
    true_logits = k @ q[0]
    absorbed = c @ (w_uk.T @ q[0])  # what folding W^UK into the query would give
    assert rel(absorbed, true_logits) > 1e-2
    assert rel(c @ (w_uk.T @ q[0]), (c @ w_uk.T) @ q[0]) < 1e-6  # without RoPE the fold is exact


# --- errors -----------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    c = GLM5Config.tiny()
    m = MLA(c)
    D = c.hidden_size
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(1, 3, D + 1))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(3, D))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(1, 0, D))
    with pytest.raises(ValueError, match="positions: expected shape"):
        m(torch.randn(2, 3, D), positions=torch.arange(4))
    with pytest.raises(ValueError, match="positions: expected shape"):
        m(torch.randn(2, 3, D), positions=torch.zeros(3, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions: expected an integer"):
        m(torch.randn(2, 3, D), positions=torch.arange(3.0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.randn(1, 3, D), positions=torch.arange(3) + c.max_position_embeddings - 2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.randn(1, 3, D), positions=torch.arange(3) - 1)
    cache = MLACache.for_config(c, 1, 4)
    m(torch.randn(1, 2, D), cache=cache)
    with pytest.raises(ValueError, match="positions: with a cache of length 2"):
        m(torch.randn(1, 1, D), positions=torch.tensor([3]), cache=cache)  # past the cache
    with pytest.raises(ValueError, match="positions: with a cache of length 2"):
        m(torch.randn(1, 1, D), positions=torch.tensor([0]), cache=cache)  # already cached
    with pytest.raises(ValueError, match="overflow"):
        m(torch.randn(1, 3, D), cache=cache)
    assert cache.length == 2  # a refused call leaves the cache as it was
    with pytest.raises(ValueError, match="cache: expected"):
        m(torch.randn(2, 1, D), cache=cache)
    with pytest.raises(ValueError, match="cache: expected"):
        MLA(with_changes(c, kv_lora_rank=c.kv_lora_rank + 1))(torch.randn(1, 1, D), cache=cache)


def test_bad_key_indices_raise():
    c = GLM5Config.tiny()
    m = MLA(c)
    x = torch.randn(2, 4, c.hidden_size)
    good = torch.zeros(2, 4, 3, dtype=torch.long)
    m(x, key_indices=good)
    for bad, match in [(good[0], "shape"), (good[:, :3], "shape"), (good.float(), "integer dtype"),
                       (good.bool(), "integer dtype"), (good - 2, r"\[-1, t\]"),
                       (good + torch.tensor([0, 0, 0, 4])[None, :, None], r"\[-1, t\]")]:
        for absorbed in (False, True):
            with pytest.raises(ValueError, match=f"key_indices: .*{match}"):
                m(x, key_indices=bad, absorbed=absorbed)
    cache = MLACache.for_config(c, 2, 8)
    with pytest.raises(ValueError, match="key_indices"):
        m(x, cache=cache, key_indices=good + 3)  # the query at position 0 may not select key 3
    assert cache.length == 0  # refused before the cache was touched
    m(x, cache=cache, key_indices=good)
    with pytest.raises(ValueError, match="key_indices"):
        m(x[:, :1], cache=cache, key_indices=torch.full((2, 1, 2), 5))  # position 4 may not select key 5
    assert cache.length == 4


def test_cache_errors():
    cache = MLACache(2, 4, kv_lora_rank=3, rope_dim=2)
    lat, kr = torch.zeros(2, 3, 3), torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="start_pos"):
        cache.append(lat, kr, start_pos=1)
    s_lat, s_kr = cache.append(lat, kr, start_pos=0)
    assert s_lat.shape == (2, 3, 3) and s_kr.shape == (2, 3, 2) and cache.length == 3
    with pytest.raises(ValueError, match="overflow"):
        cache.append(lat[:, :2], kr[:, :2], start_pos=3)
    with pytest.raises(ValueError, match="latent"):
        cache.append(torch.zeros(1, 1, 3), kr[:1, :1], start_pos=3)  # wrong batch
    with pytest.raises(ValueError, match="latent"):
        cache.append(torch.zeros(2, 1, 4), kr[:, :1], start_pos=3)  # wrong width
    with pytest.raises(ValueError, match="k_rope"):
        cache.append(lat[:, :1], torch.zeros(2, 1, 3), start_pos=3)
    for bad in (-1, 4, 1.5):
        with pytest.raises(ValueError, match="truncate"):
            cache.truncate(bad)
    cache.truncate(1)
    assert cache.length == 1
    cache.truncate(0)
    with pytest.raises(ValueError, match="max_len"):
        MLACache(1, 0, 3, 2)


# --- outside oracle: transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("preset,T", [("tiny", 1), ("tiny", 5), ("tiny", 63), ("classroom", 63)])
def test_matches_transformers_glm_moe_dsa_attention(preset, T):
    """Dense regime (T <= index_topk): HF's indexer is present but selects every key."""
    hf_mod = pytest.importorskip("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa")
    from transformers.models.glm_moe_dsa.configuration_glm_moe_dsa import GlmMoeDsaConfig

    c = with_changes(GLM5Config.preset(preset), index_topk=64)
    hf_config = GlmMoeDsaConfig(**c.to_hf())
    hf_config._attn_implementation = "eager"
    ours = make_mla(c, 7)
    theirs = hf_mod.GlmMoeDsaAttention(hf_config, layer_idx=0).eval()
    result = theirs.load_state_dict(ours.state_dict(), strict=False)  # copied by name: no renaming
    assert result.unexpected_keys == [] and all(k.startswith("indexer.") for k in result.missing_keys)
    for norm in (theirs.q_a_layernorm, theirs.kv_a_layernorm):  # HF builds these with eps 1e-6 (see mla.py)
        norm.variance_epsilon = c.rms_norm_eps
    B = 2
    x = randn(T, B, T, c.hidden_size)
    position_ids = torch.arange(T)[None].expand(B, T)
    cos_sin = hf_mod.GlmMoeDsaRotaryEmbedding(hf_config)(x, position_ids)
    mask = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        expected, _, topk = theirs(x, cos_sin, mask, position_ids=position_ids)
        assert topk.shape == (B, T, T)  # every key selected: dense
        assert rel(ours(x), expected) < 1e-4
        assert rel(ours(x, absorbed=True), expected) < 1e-4


def every_other_key(B, start, T):
    """A stand-in for DSA's selection: each query keeps the even keys and itself, (B, T, S), -1 = padding."""
    t = torch.arange(start, start + T)[:, None]  # (T, 1)
    s = torch.arange(start + T)[None]  # (1, S)
    return torch.where((s <= t) & ((s % 2 == 0) | (s == t)), s, -1).expand(B, -1, -1)


@pytest.mark.parametrize("sparse_impl", ["masked", "gathered"])
def test_key_indices_are_the_whole_sparse_interface_and_no_state_survives(sparse_impl):
    c = GLM5Config.tiny()
    m = MLA(c)
    x = randn(5, 2, 7, c.hidden_size)
    state_before = set(vars(m))
    with torch.no_grad():
        full = m.attend(x, key_indices=every_other_key(2, 0, 7))
        assert isinstance(full, AttentionOutput) and torch.equal(full.out, m(x, key_indices=every_other_key(2, 0, 7)))
        assert full.probs is None and torch.equal(full.key_indices, every_other_key(2, 0, 7))
        cache = MLACache.for_config(c, 2, 7)
        stepped = [m(x[:, :4], cache=cache, absorbed=True, key_indices=every_other_key(2, 0, 4))]
        for t in range(4, 7):
            res = m.attend(x[:, t:t + 1], cache=cache, absorbed=True, key_indices=every_other_key(2, t, 1),
                           sparse_impl=sparse_impl)
            stepped.append(res.out)
    assert rel(torch.cat(stepped, dim=1), full.out) < 1e-5
    assert rel(full.out, m(x)) > 1e-3  # the selection changed the output
    assert set(vars(m)) == state_before  # nothing new kept on the module between calls


@given(config=small_configs(), T=st.sampled_from([1, 5, 13]), seed=seeds, select=st.booleans())
def test_return_probs_agree_between_paths_and_are_distributions(config, T, seed, select):
    m = make_mla(config, seed)
    x = randn(seed, 2, T, config.hidden_size)
    idx = random_key_indices(seed, 2, T) if select else None
    with torch.no_grad():
        res_e = m.attend(x, key_indices=idx, return_probs=True)
        res_a = m.attend(x, key_indices=idx, absorbed=True, return_probs=True)
        out_e, probs_e, probs_a = res_e.out, res_e.probs, res_a.probs
        assert torch.equal(out_e, m(x, key_indices=idx))
    H = config.num_attention_heads
    assert probs_e.shape == probs_a.shape == (2, H, T, T)
    assert rel(probs_a, probs_e) < 1e-5
    allowed = allowed_keys(torch.arange(T), T, idx, batch_size=2)[:, None]  # (B|1, 1, T, S)
    assert torch.equal(probs_e * ~allowed, torch.zeros_like(probs_e))  # nothing outside the allowed keys
    row_sums = probs_e.sum(-1)  # (B, H, T): 1, or 0 for a query with nothing allowed
    expected = allowed.any(-1).expand_as(row_sums).float()
    torch.testing.assert_close(row_sums, expected, rtol=0, atol=1e-5)
