"""kernels.indexer against its twins glm5_ref.dsa.Indexer.scores and select_topk (CPU: Triton interpreter)."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import DEVICE, DTYPES, TOL, randn, rel

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention, DSACache, Indexer, select_topk
from glm5_kernels.indexer import indexer_scores, indexer_topk


def twin(J: int, I: int) -> Indexer:
    return Indexer(dataclasses.replace(GLM5Config.tiny(), index_n_heads=J, index_head_dim=I)).to(DEVICE)


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), T=st.sampled_from([1, 5, 13]), extra=st.sampled_from([0, 7, 30]),
       J=st.sampled_from([1, 3, 5]), I=st.sampled_from([8, 13, 24]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_scores_equal_twin(nan_empty, B, T, extra, J, I, dtype, seed):
    S = T + extra
    q, k, w = randn(seed, B, T, J, I, dtype=dtype), randn(seed + 1, B, S, I, dtype=dtype), randn(seed + 2, B, T, J)
    out = indexer_scores(q, k, w, block_s=16)
    assert out.shape == (B, T, S) and out.dtype == torch.float32
    assert rel(out, twin(J, I).scores(q, k, w)) < TOL[dtype]


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), T=st.sampled_from([1, 3, 11]), extra=st.sampled_from([0, 5, 21]),
       J=st.sampled_from([1, 3]), I=st.sampled_from([8, 13]), topk=st.sampled_from([1, 4, 7, 17, 33]),
       block_s=st.sampled_from([16, 128]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_topk_equals_select_topk(nan_empty, B, T, extra, J, I, topk, block_s, dtype, seed):
    """Same scores -> the same indices, bit for bit (order, ties to the latest key, -1 padding), for prefill
    (start = 0) and for queries at the end of a longer cache (start = S - T, decode when T = 1)."""
    S = T + extra
    q, k, w = randn(seed, B, T, J, I, dtype=dtype), randn(seed + 1, B, S, I, dtype=dtype), randn(seed + 2, B, T, J)
    if seed % 2:
        w[..., 0] = 0.0  # more exact ties (scores of exactly 0)
        q = -q.abs()
    for start in sorted({0, S - T}):
        kk = k[:, :start + T]  # prefill: keys up to the last query
        kq = min(topk, start + T)
        idx = indexer_topk(q, kk, w, kq, start=start, block_s=block_s)  # 16: chunks scored in pieces
        ref = select_topk(indexer_scores(q, kk, w), torch.arange(start, start + T, device=DEVICE), kq)
        assert idx.dtype == torch.int64 and torch.equal(idx, ref)
        # and against the twin's own scores: the picked keys carry the twin's top-k scores
        sc = twin(J, I).scores(q, kk, w)
        ref_twin = select_topk(sc, torch.arange(start, start + T, device=DEVICE), kq)
        assert torch.equal(idx < 0, ref_twin < 0)
        got = sc.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, 0)
        want = sc.gather(-1, ref_twin.clamp_min(0)).masked_fill(ref_twin < 0, 0)
        assert rel(got, want) < TOL[dtype] or torch.equal(got, want)


@pytest.mark.parametrize("T,S,topk", [(1, 70, 40), (6, 45, 33)])
def test_topk_chunks_scored_in_pieces(nan_empty, T, S, topk):
    """block_s < next_pow2(topk): each chunk is scored in pieces through the scratch buffer (the GPU layout)."""
    q, k, w = randn(7, 2, T, 3, 16), randn(8, 2, S, 16), randn(9, 2, T, 3)
    ref = select_topk(indexer_scores(q, k, w), torch.arange(S - T, S, device=DEVICE), topk)
    assert torch.equal(indexer_topk(q, k, w, topk, start=S - T, block_s=16), ref)


def test_dsa_use_triton_selects_what_the_twin_selects(monkeypatch):
    """DSAAttention's use_triton (fused indexer top-k + sparse MLA kernel) in a cached prefill + decode."""
    import glm5_kernels.indexer
    import glm5_kernels.sparse_mla
    calls = []
    for mod, name in ((glm5_kernels.indexer, "indexer_topk"), (glm5_kernels.sparse_mla, "absorbed_sparse_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    cfg = dataclasses.replace(GLM5Config.tiny(), index_topk=5)
    torch.manual_seed(0)
    m = DSAAttention(cfg).to(DEVICE).eval()
    x = torch.randn(2, 11, cfg.hidden_size, device=DEVICE)
    with torch.no_grad():
        outs = []
        sels = []
        for flag in (False, True):
            cache = DSACache.for_config(cfg, 2, 16, device=DEVICE)
            r1 = m.attend(x[:, :9], positions=torch.arange(9, device=DEVICE), cache=cache, absorbed=True,
                          sparse_impl="gathered", use_triton=flag)
            y2 = m(x[:, 9:10], positions=torch.arange(9, 10, device=DEVICE), cache=cache, absorbed=True,
                   sparse_impl="gathered", use_triton=flag)
            outs.append((r1.out, y2))
            sels.append(r1.key_indices)
        assert rel(outs[1][0], outs[0][0]) < 1e-5 and rel(outs[1][1], outs[0][1]) < 1e-5
    assert calls.count("indexer_topk") == 2 and calls.count("absorbed_sparse_attention") == 2  # the kernels ran
    res = m.attend(x, indexer_loss=True, use_triton=True)  # training: the PyTorch path (the kernels have no backward)
    res.out.sum().backward()
    assert torch.isfinite(res.indexer_loss) and m.kv_b_proj.weight.grad is not None
    assert sels[1].shape[-1] == cfg.index_topk and torch.equal(sels[0], sels[1])


def test_bad_inputs():
    q, k, w = randn(0, 1, 4, 2, 8), randn(1, 1, 9, 8), randn(2, 1, 4, 2)
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, 10)  # more than the 9 keys
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, 0)
    with pytest.raises(ValueError, match="start"):
        indexer_topk(q, k, w, 3, start=6)  # queries 6..9 but only keys 0..8
    with pytest.raises(TypeError, match="keys"):
        indexer_scores(q, k.half(), w)
    with pytest.raises(TypeError, match="weights"):
        indexer_scores(q, k, w.half())
    with pytest.raises(ValueError, match="contiguous"):
        indexer_scores(q.transpose(1, 2).contiguous().transpose(1, 2), k, w)
    with pytest.raises(ValueError, match="keys"):
        indexer_scores(q, randn(1, 1, 9, 7), w)
    with pytest.raises(TypeError, match="q"):
        indexer_scores(q.long(), k, w)
    if DEVICE == "cpu":
        with pytest.raises(TypeError, match="bf16"):
            indexer_scores(q.bfloat16(), k.bfloat16(), w)
