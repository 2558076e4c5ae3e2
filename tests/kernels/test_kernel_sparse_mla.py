"""kernels.sparse_mla against its twin glm5_ref.mla.MLA.attend_gathered (CPU: Triton interpreter)."""

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import DEVICE, DTYPES, TOL, randn, rel

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_kernels.sparse_mla import absorbed_sparse_attention, combine_splits, sparse_mla, sparse_mla_fwd


def random_indices(seed: int, B: int, T: int, S: int, K: int, start: int) -> torch.Tensor:
    """(B, T, K) causal key positions for queries at start..start+T-1, -1 padding where fewer than K exist,
    one query fully padded, and the valid ones in random order (the kernel must not assume sorted indices)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        for t in range(T):
            n = start + t + 1
            perm = torch.randperm(n, generator=g)[:K]
            rows.append(torch.cat([perm, torch.full((K - perm.numel(),), -1, dtype=torch.long)]))
    idx = torch.stack(rows).view(B, T, K)
    idx[-1, 0] = -1  # a query that sees nothing: output 0, lse -inf
    return idx.to(DEVICE)


def naive(q, kv, idx, scale, d_v):
    """Dense-masked reference in float64: scores over all S keys, -inf outside the selection."""
    B, T, H, D = q.shape
    s = torch.einsum("bthd,bsd->bths", q.double(), kv.double()) * scale  # (B, T, H, S)
    sel = torch.zeros(B, T, kv.shape[1] + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, torch.where(idx >= 0, idx, kv.shape[1]), True)
    s = s.masked_fill(~sel[:, :, None, :-1], float("-inf"))
    lse = torch.logsumexp(s, -1)  # (B, T, H)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("bths,bsc->bthc", p, kv[..., :d_v].double()), lse


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), T=st.sampled_from([1, 3, 7]), start=st.sampled_from([0, 5, 20]),
       H=st.sampled_from([1, 3, 5]), d_v=st.sampled_from([8, 13]), P=st.sampled_from([2, 6]),
       K=st.sampled_from([1, 5, 19]), splits=st.sampled_from([1, 3]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_kernel_equals_naive(nan_empty, B, T, start, H, d_v, P, K, splits, dtype, seed):
    S = start + T
    D = d_v + P
    q, kv = randn(seed, B, T, H, D, dtype=dtype), randn(seed + 1, B, S, D, dtype=dtype)
    idx = random_indices(seed, B, T, S, K, start)
    scale = 1 / math.sqrt(D)
    out, lse = sparse_mla_fwd(q, kv, idx, scale, d_v=d_v, num_splits=splits, block_k=16, return_lse=True)
    ref, ref_lse = naive(q, kv, idx, scale, d_v)
    assert out.shape == (B, T, H, d_v) and out.dtype == dtype and lse.dtype == torch.float32
    assert rel(out, ref) < TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool((out[-1, 0] == 0).all())
    fin = torch.isfinite(ref_lse)
    assert rel(lse[fin], ref_lse[fin]) < TOL[dtype]


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.sampled_from([1, 5]), K=st.sampled_from([3, 11]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_equals_attend_gathered(nan_empty, T, K, dtype, seed):
    """The absorbed wrapper (einsums + kernel) equals DSAAttention.attend_gathered, the PyTorch twin."""
    cfg = dataclasses.replace(GLM5Config.tiny(), num_attention_heads=3, kv_lora_rank=13, qk_nope_head_dim=5,
                              v_head_dim=7)
    torch.manual_seed(seed)
    m = DSAAttention(cfg).to(device=DEVICE, dtype=dtype)
    B, S = 2, 17
    start = S - T
    idx = random_indices(seed, B, T, S, K, start)
    args = (randn(seed, B, T, 3, 5, dtype=dtype), randn(seed + 1, B, T, 3, cfg.qk_rope_head_dim, dtype=dtype),
            randn(seed + 2, B, S, 13, dtype=dtype), randn(seed + 3, B, S, cfg.qk_rope_head_dim, dtype=dtype))
    with torch.no_grad():
        ref = m.attend_gathered(*args, torch.arange(start, S, device=DEVICE), idx)[0]
        w_uk, w_uv = m.absorbed_weights()
        out = absorbed_sparse_attention(*args, idx, w_uk, w_uv, m.scale)
    assert out.dtype == dtype and rel(out, ref) < TOL[dtype]


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.sampled_from([1, 4]), H=st.sampled_from([2, 17]), K=st.sampled_from([5, 23]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_backward_equals_autograd_of_naive(nan_empty, T, H, K, dtype, seed):
    """sparse_mla's Triton backward: dq and dkv (keys and values, scatter-added over queries) vs float64
    autograd through the dense-masked reference."""
    B, S, d_v, P = 2, 19, 13, 4
    q = randn(seed, B, T, H, d_v + P, dtype=dtype).requires_grad_()
    kv = randn(seed + 1, B, S, d_v + P, dtype=dtype).requires_grad_()
    idx = random_indices(seed, B, T, S, K, S - T)
    o = sparse_mla(q, kv, idx, 0.3, d_v=d_v, block_k=16)
    do = randn(seed + 2, *o.shape, dtype=dtype)
    dq, dkv = torch.autograd.grad(o, (q, kv), do)
    q64, kv64 = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    dq64, dkv64 = torch.autograd.grad(naive(q64, kv64, idx, 0.3, d_v)[0], (q64, kv64), do.double())
    assert dq.dtype == dtype and dkv.dtype == dtype
    assert rel(dq, dq64) < TOL[dtype] and rel(dkv, dkv64) < TOL[dtype]


def test_backward_through_absorbed_equals_attend_gathered():
    """Gradients of the whole absorbed path (einsums + kernel) equal those of the twin, weights included."""
    cfg = dataclasses.replace(GLM5Config.tiny(), num_attention_heads=3, kv_lora_rank=13, qk_nope_head_dim=5,
                              v_head_dim=7)
    torch.manual_seed(0)
    m = DSAAttention(cfg).to(DEVICE)
    B, T, S, K = 2, 4, 15, 6
    idx = random_indices(3, B, T, S, K, S - T)
    args = [randn(i, *shape).requires_grad_() for i, shape in
            enumerate([(B, T, 3, 5), (B, T, 3, cfg.qk_rope_head_dim), (B, S, 13), (B, S, cfg.qk_rope_head_dim)])]
    grads = []
    for use_kernel in (False, True):
        m.zero_grad()
        if use_kernel:
            w_uk, w_uv = m.absorbed_weights()
            out = absorbed_sparse_attention(*args, idx, w_uk, w_uv, m.scale)
        else:
            out = m.attend_gathered(*args, torch.arange(S - T, S, device=DEVICE), idx)[0]
        g = torch.autograd.grad((out * randn(9, *out.shape)).sum(), [*args, m.kv_b_proj.weight])
        grads.append(g)
    assert all(rel(a, b) < 1e-5 for a, b in zip(grads[1], grads[0]))


def test_splits_equal_one_pass():
    """Split-KV decode (partials + log-sum-exp merge) equals the single pass; empty splits are harmless."""
    q, kv = randn(0, 2, 1, 4, 24), randn(1, 2, 70, 24)
    idx = random_indices(2, 2, 1, 70, 50, 69)
    idx[0, 0, 10:] = -1  # the later splits of this row see only padding
    one = sparse_mla_fwd(q, kv, idx, 0.2, d_v=16, block_k=16)
    for n in (2, 4):
        assert rel(sparse_mla_fwd(q, kv, idx, 0.2, d_v=16, num_splits=n, block_k=16), one) < 1e-6
    o = torch.zeros(1, 1, 2, 1, 3)
    lse = torch.full((1, 1, 2, 1), float("-inf"))
    out, tot = combine_splits(o, lse)
    assert bool((out == 0).all()) and bool(torch.isinf(tot).all())


def test_bad_inputs():
    q, kv, idx = randn(0, 1, 2, 2, 12), randn(1, 1, 9, 12), torch.zeros(1, 2, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="indices"):
        sparse_mla_fwd(q, kv, idx + 9, 0.1, d_v=8)  # out of range: only 9 keys
    with pytest.raises(ValueError, match="indices"):
        sparse_mla_fwd(q, kv, idx - 2, 0.1, d_v=8)
    with pytest.raises(TypeError, match="indices"):
        sparse_mla_fwd(q, kv, idx.float(), 0.1, d_v=8)
    with pytest.raises(ValueError, match="indices"):
        sparse_mla_fwd(q, kv, idx[:, :1], 0.1, d_v=8)
    with pytest.raises(TypeError, match="kv"):
        sparse_mla_fwd(q, kv.half(), idx, 0.1, d_v=8)
    with pytest.raises(ValueError, match="kv"):
        sparse_mla_fwd(q, randn(1, 1, 9, 10), idx, 0.1, d_v=8)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_mla_fwd(q, randn(1, 1, 12, 9).transpose(1, 2), idx, 0.1, d_v=8)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla_fwd(q, kv, idx, 0.1, d_v=13)
    with pytest.raises(ValueError, match="sm_scale"):
        sparse_mla_fwd(q, kv, idx, 0.0, d_v=8)
    with pytest.raises(ValueError, match="indices"):
        sparse_mla(q, kv, idx + 9, 0.1, d_v=8)
    with pytest.raises(ValueError, match="d_v"):
        sparse_mla(q, kv, idx, 0.1, d_v=0)
    with pytest.raises(ValueError, match="num_splits"):
        sparse_mla_fwd(q, kv, idx, 0.1, d_v=8, num_splits=0)
    if DEVICE == "cpu":
        with pytest.raises(TypeError, match="bf16"):
            sparse_mla_fwd(q.bfloat16(), kv.bfloat16(), idx, 0.1, d_v=8)
