"""Newton-Schulz in Triton: a symmetric X X^T that computes one triangle of tiles, and the NS5 step on it.

Twin: ``glm5_ref.muon.newton_schulz`` (Keller Jordan's quintic iteration, coefficients (a, b, c) =
(3.4445, -4.7750, 2.0315)). One step on X (s, n), s = min(m, n) (tall matrices are transposed first):

    A = X X^T                  (s, s), symmetric                        -> xxt(X)
    B = b A + c A A            A A = A A^T because A is symmetric:       -> xxt(A, alpha=c, beta=b, C=A)
    X = a X + B X              a general product with an axpby epilogue -> matmul(B, X, alpha=1, beta=a, C=X)

Algorithm and tiling
    ``xxt``: the (s, s) output is cut into BLOCK x BLOCK tiles and only the T (T + 1) / 2 tiles on or below the
    diagonal are launched (T = ceil(s / BLOCK)); their (row, column) pairs come from a small int32 table. A
    program accumulates X[rows] X[cols]^T over the n columns in BLOCK_K steps in fp32, applies the epilogue
    alpha * acc + beta * C, and stores the tile at (i, j) and its transpose at (j, i) (C is read at both places,
    so C need not be exactly symmetric). Half the tiles, so about half the FLOPs of X @ X.T (the diagonal tiles
    are full: the saving is T (T - 1) / 2 of T^2 tiles). The result is exactly symmetric, which the second step
    relies on when it calls xxt(A) for A A.
    ``matmul``: a plain tiled GEMM (BLOCK_M x BLOCK_N tiles, grid also over a batch axis) with the same epilogue.
    Batched inputs (N, m, n) put the batch on grid axis 1.

FLOP and byte counts (one s x n matrix)
    xxt(X):            s^2 n FLOPs + the diagonal tiles' extra (vs 2 s^2 n for X @ X.T); bytes ~ (s n + s^2) e
    xxt(A, C=A):       s^3 FLOPs (vs 2 s^3)
    matmul(B, X):      2 s^2 n FLOPs
    NS5 step:          s^2 n + s^3 + 2 s^2 n = 3 s^2 n + s^3 (vs 4 s^2 n + 2 s^3 with plain GEMMs), so at
                       s = n the step needs 4 s^3 instead of 6 s^3: 0.67x the FLOPs. Intensity ~ s / 3 FLOP/B
                       in bf16: compute-bound for s >= ~1024 on an H100/H200.

Not handled: reading the strided transpose of a tall matrix without a copy (the wrapper copies X^T),
bf16 accumulation (the twin's bf16 matmuls also accumulate in fp32 and round the output), split-K for very
wide n, autotuning (BLOCK 64, BLOCK_K 32 untuned): GPU timings not yet measured.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import check_tensor, dot_precision, interpreting, next_pow2

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic (a, b, c), as the twin (a test holds them equal)



@triton.jit
def _xxt_kernel(x_ptr, c_ptr, out_ptr, ti_ptr, tj_ptr, M, Kd, alpha, beta,
                stride_xb, stride_xm, stride_cb, stride_cm, stride_ob, stride_om,
                HAS_C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
                CAST: tl.constexpr, PREC: tl.constexpr):
    tile, bat = tl.program_id(0), tl.program_id(1)
    ti = tl.load(ti_ptr + tile)
    tj = tl.load(tj_ptr + tile)  # tj <= ti: a tile on or below the diagonal
    r = ti * BLOCK + tl.arange(0, BLOCK)
    c = tj * BLOCK + tl.arange(0, BLOCK)
    x_base = x_ptr + bat.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK, BLOCK), tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_base + r[:, None] * stride_xm + k[None, :], mask=(r[:, None] < M) & (k[None, :] < Kd), other=0.0)
        b = tl.load(x_base + c[None, :] * stride_xm + k[:, None], mask=(c[None, :] < M) & (k[:, None] < Kd), other=0.0)
        if CAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc=acc, input_precision=PREC)  # (BLOCK, BLOCK) = X[r] X[c]^T
    out = acc * alpha
    acc_t = tl.trans(acc) * alpha  # the mirrored tile (j, i)
    ok = (r[:, None] < M) & (c[None, :] < M)
    ok_t = (c[:, None] < M) & (r[None, :] < M)
    if HAS_C:
        c_base = c_ptr + bat.to(tl.int64) * stride_cb
        out += beta * tl.load(c_base + r[:, None] * stride_cm + c[None, :], mask=ok, other=0.0).to(tl.float32)
        acc_t += beta * tl.load(c_base + c[:, None] * stride_cm + r[None, :], mask=ok_t, other=0.0).to(tl.float32)
    # a diagonal tile writes its lower half from acc and its strict upper half from acc^T: a dot product's
    # rounding need not be symmetric, and NS relies on A being exactly symmetric
    lim = tl.where(ti != tj, M, 0)  # off the diagonal: no constraint within the tile
    o_base = out_ptr + bat.to(tl.int64) * stride_ob
    tl.store(o_base + r[:, None] * stride_om + c[None, :], out.to(out_ptr.dtype.element_ty),
             mask=ok & (r[:, None] + lim >= c[None, :]))
    tl.store(o_base + c[:, None] * stride_om + r[None, :], acc_t.to(out_ptr.dtype.element_ty),
             mask=ok_t & (c[:, None] < r[None, :] + lim))


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, out_ptr, M, N, Kd, alpha, beta,
                   stride_ab, stride_am, stride_bb, stride_bk, stride_cb, stride_cm, stride_ob, stride_om,
                   HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   CAST: tl.constexpr, PREC: tl.constexpr):
    pid, bat = tl.program_id(0), tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    r = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = (pid % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_base = a_ptr + bat.to(tl.int64) * stride_ab
    b_base = b_ptr + bat.to(tl.int64) * stride_bb
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_base + r[:, None] * stride_am + k[None, :], mask=(r[:, None] < M) & (k[None, :] < Kd), other=0.0)
        b = tl.load(b_base + k[:, None] * stride_bk + c[None, :], mask=(k[:, None] < Kd) & (c[None, :] < N), other=0.0)
        if CAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc=acc, input_precision=PREC)
    ok = (r[:, None] < M) & (c[None, :] < N)
    out = acc * alpha
    if HAS_C:
        out += beta * tl.load(c_ptr + bat.to(tl.int64) * stride_cb + r[:, None] * stride_cm + c[None, :],
                              mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + bat.to(tl.int64) * stride_ob + r[:, None] * stride_om + c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=64)
def _lower_tiles(n_tiles: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(row tile, column tile) of every tile on or below the diagonal, int32."""
    ii, jj = torch.tril_indices(n_tiles, n_tiles)
    return ii.to(torch.int32).to(device), jj.to(torch.int32).to(device)


def _as_batch(name: str, t: torch.Tensor) -> torch.Tensor:
    check_tensor(name, t, t.dim() if isinstance(t, torch.Tensor) and t.dim() in (2, 3) else 2)
    return t[None] if t.dim() == 2 else t  # (N, rows, cols)


def xxt(X: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, C: torch.Tensor | None = None,
        block: int = 64, block_k: int = 32) -> torch.Tensor:
    """alpha X X^T + beta C for X (m, n) or (N, m, n), computing only the tiles on or below the diagonal."""
    Xb = _as_batch("X", X)
    B, M, Kd = Xb.shape
    if C is not None:
        Cb = _as_batch("C", C)
        if Cb.shape != (B, M, M) or C.dtype != X.dtype:
            raise ValueError(f"C: expected {X.dtype} of shape {tuple(X.shape[:-1]) + (M,)}, got {C.dtype} "
                             f"{tuple(C.shape)}")
    out = torch.empty(B, M, M, dtype=X.dtype, device=X.device)  # (N, m, m)
    if B and M:
        BL, BK = next_pow2(block), next_pow2(min(block_k, max(Kd, 1)))
        ti, tj = _lower_tiles(triton.cdiv(M, BL), str(X.device))
        Cb = Cb if C is not None else Xb
        _xxt_kernel[(ti.shape[0], B)](Xb, Cb, out, ti, tj, M, Kd, float(alpha), float(beta),
                                       Xb.stride(0), Xb.stride(1), Cb.stride(0), Cb.stride(1),
                                       out.stride(0), out.stride(1), HAS_C=C is not None, BLOCK=BL, BLOCK_K=BK,
                                       CAST=interpreting(), PREC=dot_precision(X.dtype))
    return out if X.dim() == 3 else out[0]


def matmul(A: torch.Tensor, B: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, C: torch.Tensor | None = None,
           block_m: int = 64, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """alpha A B + beta C for A (m, k), B (k, n) (or batched (N, ...)); C like the output."""
    Ab, Bb = _as_batch("A", A), _as_batch("B", B)
    if Bb.dtype != Ab.dtype or Bb.shape[0] != Ab.shape[0] or Bb.shape[1] != Ab.shape[2]:
        raise ValueError(f"B: expected {A.dtype} of shape {tuple(A.shape[:-2]) + (A.shape[-1], 'n')}, got "
                         f"{B.dtype} {tuple(B.shape)}")
    N, M, Kd = Ab.shape
    Nc = Bb.shape[2]
    if C is not None:
        Cb = _as_batch("C", C)
        if Cb.shape != (N, M, Nc) or C.dtype != A.dtype:
            raise ValueError(f"C: expected {A.dtype} of shape {(N, M, Nc)}, got {C.dtype} {tuple(C.shape)}")
    out = torch.empty(N, M, Nc, dtype=A.dtype, device=A.device)
    if N and M and Nc:
        BM, BN, BK = next_pow2(block_m), next_pow2(block_n), next_pow2(min(block_k, max(Kd, 1)))
        Cb = Cb if C is not None else out
        grid = (triton.cdiv(M, BM) * triton.cdiv(Nc, BN), N)
        _matmul_kernel[grid](Ab, Bb, Cb, out, M, Nc, Kd, float(alpha), float(beta),
                             Ab.stride(0), Ab.stride(1), Bb.stride(0), Bb.stride(1), Cb.stride(0), Cb.stride(1),
                             out.stride(0), out.stride(1), HAS_C=C is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                             CAST=interpreting(), PREC=dot_precision(A.dtype))
    return out if A.dim() == 3 else out[0]


def ns5_step(X: torch.Tensor, a: float, b: float, c: float, **blocks) -> torch.Tensor:
    """One quintic Newton-Schulz step X -> a X + (b A + c A A) X with A = X X^T (X wide: rows <= columns)."""
    A = xxt(X, **blocks)  # (.., s, s), exactly symmetric
    Bm = xxt(A, alpha=c, beta=b, C=A, **blocks)  # b A + c A A^T = b A + c A A
    return matmul(Bm, X, alpha=1.0, beta=a, C=X)  # a X + B X


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """As ``glm5_ref.muon.newton_schulz`` (same arguments), with each step in the kernels above."""
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        raise ValueError(f"newton_schulz G: expected a matrix or a batch of matrices, got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0 or len(coefficients) != 3:
        raise ValueError(f"newton_schulz: expected steps >= 0 and coefficients (a, b, c), got {steps!r}, "
                         f"{coefficients!r}")
    dtype = dtype if dtype is not None else (torch.bfloat16 if G.is_cuda else torch.float32)
    a, b, c = coefficients
    m, n = G.shape[-2:]
    X = G.to(dtype).reshape(-1, m, n)  # (N, m, n)
    if m > n:  # tall: work on the transpose (the Gram matrix is the small one)
        X = X.mT
    X = (X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)).contiguous()
    for _ in range(steps):
        X = ns5_step(X, a, b, c)
    if m > n:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def flops_bytes(s: int, n: int, elem: int = 2, block: int = 64) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) of xxt(X) for X (s, n) as launched (diagonal tiles full) and of one NS5 step."""
    T = -(-s // block)
    frac = T * (T + 1) / 2 / (T * T)  # fraction of the s x s tiles computed
    xxt_f = 2.0 * s * s * n * frac
    step_f = xxt_f + 2.0 * s ** 3 * frac + 2.0 * s * s * n
    return {"xxt": (xxt_f, float((s * n + s * s) * elem)),
            "ns5_step": (step_f, float((3 * s * n + 4 * s * s) * elem))}
