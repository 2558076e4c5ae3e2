"""kernels.moe_gemm against torch._grouped_mm and its twin glm5_ref.moe.MoE (CPU: Triton interpreter)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import DEVICE, DTYPES, TOL, randn, rel

from glm5_ref.config import GLM5Config
from glm5_ref.moe import MoE
from glm5_kernels.moe_gemm import grouped_gemm, moe_experts, swiglu_gate_up, tile_table


def segments(seed: int, S: int, E: int) -> torch.Tensor:
    """Random segment ends (E,) int32 summing to S, with empty experts likely."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, E, (S,), generator=g), minlength=E)
    if E > 2:
        counts[1] += counts[0]
        counts[0] = 0  # an expert with no token
    return counts.cumsum(0).to(torch.int32).to(DEVICE)


def per_segment(x, w, offs):
    """The definition of a grouped GEMM, in float64: one matmul per expert segment."""
    starts = [0] + offs[:-1].tolist()
    return torch.cat([x[a:b].double() @ w[e].double().T for e, (a, b) in enumerate(zip(starts, offs.tolist()))])


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(S=st.sampled_from([1, 13, 63]), Kd=st.sampled_from([5, 24, 37]), N=st.sampled_from([3, 17, 40]),
       E=st.sampled_from([1, 3, 7]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_grouped_gemm_equals_per_segment(nan_empty, S, Kd, N, E, dtype, seed):
    x, w = randn(seed, S, Kd, dtype=dtype), randn(seed + 1, E, N, Kd, dtype=dtype)
    offs = segments(seed, S, E)
    y = grouped_gemm(x, w, offs, block_m=16, block_n=16, block_k=16)
    assert y.shape == (S, N) and y.dtype == dtype
    assert rel(y, per_segment(x, w, offs)) < TOL[dtype]


def test_grouped_gemm_equals_torch_grouped_mm():
    gmm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if gmm is None:
        pytest.skip("this torch has no grouped GEMM")
    x, w = randn(0, 50, 32), randn(1, 5, 48, 32)
    offs = segments(2, 50, 5)
    assert rel(grouped_gemm(x, w, offs), gmm(x, w.transpose(1, 2), offs=offs)) < 1e-5


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(S=st.sampled_from([7, 41]), d=st.sampled_from([12, 20]), I=st.sampled_from([5, 16]), E=st.sampled_from([2, 5]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_swiglu_and_experts(nan_empty, S, d, I, E, dtype, seed):
    x = randn(seed, S, d, dtype=dtype)
    gate_up, down = randn(seed + 1, E, 2 * I, d, dtype=dtype), randn(seed + 2, E, d, I, dtype=dtype)
    g = torch.rand(S, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    offs = segments(seed, S, E)
    gu = per_segment(x, gate_up, offs)  # (S, 2I) float64
    h_ref = F.silu(gu[:, :I]) * gu[:, I:] * g.double()[:, None]
    h = swiglu_gate_up(x, gate_up, offs, g, block_m=16, block_n=16, block_k=16)
    assert h.dtype == dtype and rel(h, h_ref) < TOL[dtype]
    ys = moe_experts(x, gate_up, down, offs, g, block_m=16, block_n=16, block_k=16)
    assert rel(ys, per_segment(h_ref.to(dtype), down, offs)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_use_triton_equals_twin(dtype, monkeypatch):
    """MoE(use_triton=True) under no_grad equals impl="grouped" and "loop"; with gradients it falls back."""
    import glm5_kernels.moe_gemm
    calls = []
    real = glm5_kernels.moe_gemm.moe_experts
    monkeypatch.setattr(glm5_kernels.moe_gemm, "moe_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = dataclasses.replace(GLM5Config.tiny(), hidden_size=20, moe_intermediate_size=12, n_routed_experts=6,
                              num_experts_per_tok=2)
    torch.manual_seed(0)
    m = MoE(cfg).to(device=DEVICE, dtype=dtype)
    x = randn(3, 2, 9, 20, dtype=dtype)
    with torch.no_grad():
        ref = m(x, impl="loop")
        y = m(x, use_triton=True)
    assert calls and rel(y, ref) < TOL[dtype]
    n = len(calls)
    y = m(x, use_triton=True)  # gradients wanted: the PyTorch path (the kernels have no backward)
    y.float().sum().backward()
    assert len(calls) == n and m.experts[0].down_proj.weight.grad is not None


def test_tile_table_covers_every_row_once():
    offs = torch.tensor([0, 5, 5, 40, 41], dtype=torch.int32)
    e, lo, hi = tile_table(offs, 41, 16)
    covered = torch.zeros(41, dtype=torch.long)
    for ee, a, b in zip(e.tolist(), lo.tolist(), hi.tolist()):
        covered[a:b] += 1
        if b > a:
            assert (offs[ee - 1] if ee else 0) <= a and b <= offs[ee]  # a tile stays inside its expert
    assert bool((covered == 1).all())


def test_bad_inputs():
    x, w = randn(0, 10, 8), randn(1, 3, 6, 8)
    offs = torch.tensor([3, 7, 10], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="offs"):
        grouped_gemm(x, w, offs.long())
    with pytest.raises(ValueError, match="offs"):
        grouped_gemm(x, w, torch.tensor([3, 7, 9], dtype=torch.int32, device=DEVICE))  # does not end at 10
    with pytest.raises(ValueError, match="offs"):
        grouped_gemm(x, w, torch.tensor([7, 3, 10], dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="w"):
        grouped_gemm(x, w.half(), offs)
    with pytest.raises(ValueError, match="w"):
        grouped_gemm(x, randn(1, 3, 6, 7), offs)
    with pytest.raises(ValueError, match="contiguous"):
        grouped_gemm(randn(0, 8, 10).T, w, offs)
    with pytest.raises(ValueError, match="gate_up"):
        swiglu_gate_up(x, randn(1, 3, 5, 8), offs)
    with pytest.raises(TypeError, match="gate_weight"):
        swiglu_gate_up(x, randn(1, 3, 6, 8), offs, torch.ones(10, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="down"):
        moe_experts(x, randn(1, 3, 6, 8), randn(2, 3, 8, 4), offs)
