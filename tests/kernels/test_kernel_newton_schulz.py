"""kernels.newton_schulz against its twin glm5_ref.muon.newton_schulz (CPU: Triton interpreter)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_utils import DEVICE, DTYPES, TOL, randn, rel

from glm5_ref.muon import Muon
from glm5_ref.muon import newton_schulz as ns_twin
from glm5_kernels.newton_schulz import NS_COEFFICIENTS, matmul, newton_schulz, ns5_step, xxt


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.sampled_from([(), (3,)]), m=st.sampled_from([1, 13, 37, 70]), n=st.sampled_from([5, 33, 53]),
       epilogue=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_xxt_equals_x_xt(nan_empty, batch, m, n, epilogue, dtype, seed):
    X = randn(seed, *batch, m, n, dtype=dtype)
    ref = X.double() @ X.double().mT
    if epilogue:
        C = randn(seed + 1, *batch, m, m, dtype=dtype)
        A = xxt(X, alpha=0.5, beta=-2.0, C=C, block=16, block_k=16)
        ref = 0.5 * ref - 2.0 * C.double()
    else:
        A = xxt(X, block=16, block_k=16)
        assert torch.equal(A, A.mT)  # exactly symmetric: each tile written once, mirrored
    assert A.shape == (*batch, m, m) and A.dtype == dtype
    assert rel(A, ref) < TOL[dtype]


@settings(max_examples=4, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.sampled_from([3, 29]), k=st.sampled_from([7, 40]), n=st.sampled_from([5, 33]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_matmul_epilogue(nan_empty, m, k, n, dtype, seed):
    A, B, C = randn(seed, m, k, dtype=dtype), randn(seed + 1, k, n, dtype=dtype), randn(seed + 2, m, n, dtype=dtype)
    out = matmul(A, B, alpha=1.5, beta=0.25, C=C, block_m=16, block_n=16, block_k=16)
    assert rel(out, 1.5 * A.double() @ B.double() + 0.25 * C.double()) < TOL[dtype]


@pytest.mark.parametrize("shape", [(19, 45), (45, 19), (2, 24, 24), (1, 7)])
def test_newton_schulz_equals_twin(nan_empty, shape):
    G = randn(sum(shape), *shape)
    out = newton_schulz(G)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert rel(out, ns_twin(G)) < 1e-5
    s = torch.linalg.svdvals(out.double())
    assert float(s.min()) > 0.3 and float(s.max()) < 1.3  # NS5's band around 1 (twin: the same matrix)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_newton_schulz_low_precision(dtype):
    G = randn(4, 21, 50)
    assert rel(newton_schulz(G, dtype=dtype), ns_twin(G, dtype=dtype)) < 10 * TOL[dtype]


def test_ns5_step_is_the_quintic():
    X = randn(5, 9, 14) / 10
    a, b, c = NS_COEFFICIENTS
    A = X @ X.T
    assert rel(ns5_step(X, a, b, c), a * X + (b * A + c * A @ A) @ X) < 1e-5


def test_use_triton_flags(monkeypatch):
    """newton_schulz(use_triton=True) and Muon(use_triton=True) run the kernels and equal the twin."""
    import glm5_kernels.newton_schulz as kns
    calls = []
    real = kns.newton_schulz
    monkeypatch.setattr(kns, "newton_schulz", lambda *a, **k: calls.append(1) or real(*a, **k))
    G = randn(6, 17, 30)
    assert rel(ns_twin(G, use_triton=True), ns_twin(G)) < 1e-5 and len(calls) == 1
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(12, 20, device=DEVICE)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs):
        p.grad = q.grad = torch.randn_like(p)
    Muon(ps, lr=0.1, use_triton=True).step()
    Muon(qs, lr=0.1).step()
    assert len(calls) == 2  # the two (12, 20) matrices go through one batched call
    assert all(rel(p, q) < 1e-5 for p, q in zip(ps, qs))


def test_bad_inputs():
    with pytest.raises(ValueError, match="G"):
        newton_schulz(torch.randn(5, device=DEVICE))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(randn(0, 4, 6), steps=-1)
    with pytest.raises(ValueError, match="X"):
        xxt(randn(0, 2, 3, 4, 5))
    with pytest.raises(TypeError, match="X"):
        xxt(randn(0, 4, 5).double())
    with pytest.raises(ValueError, match="C"):
        xxt(randn(0, 4, 5), C=randn(1, 5, 5))
    with pytest.raises(ValueError, match="B"):
        matmul(randn(0, 4, 5), randn(1, 4, 5))
    with pytest.raises(ValueError, match="contiguous"):
        xxt(randn(0, 6, 4).T)


def test_kernel_and_twin_share_the_quintic_coefficients():
    """The kernel module keeps its own copy (it imports nothing of glm5_ref): the two must stay equal."""
    import glm5_kernels.newton_schulz as kns
    from glm5_ref.muon import NS_COEFFICIENTS

    assert kns.NS_COEFFICIENTS == NS_COEFFICIENTS
