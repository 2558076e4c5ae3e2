"""Sparse MLA attention forward in Triton: absorbed MLA over each query's top-k selected latents.

Twin: ``glm5_ref.mla.MLA.attend_gathered`` (the query side W^UK absorption and the W^UV output
projection stay in PyTorch; this kernel is the part between them). In FlashMLA's layout, with D = C + P
(576 = 512 + 64 at GLM-5 dims) and the values being the first C = d_v dims of the same cached rows:

    q   (B, T, H, D)   [ (W^UK)^T q^C ; q^R ] per head          kv (B, S, D)  [ c^KV ; k^R ] per cached token
    idx (B, T, K)      selected key positions, -1 = padding      sm_scale      1 / sqrt(d_nope + d_rope)
    s[h, k]  = sm_scale * q[b, t, h] . kv[b, idx[b, t, k]]                                     (scores)
    o[b,t,h] = sum_k softmax_k(s[h, :])[k] * kv[b, idx[b, t, k], :C]                          (B, T, H, C)
    lse      = logsumexp_k s[h, k]  (fp32; -inf for a query with no valid key, whose output is 0 like the twin)

Algorithm and tiling (FlashAttention-2 style online softmax, one query token per program)
    Grid (H / BLOCK_H, B * T, splits). All heads of a token share the same K selected rows (MQA form), so a
    program holds BLOCK_H heads' queries as a (BLOCK_H, C) and a (BLOCK_H, P) tile, walks the token's indices in
    blocks of BLOCK_K, gathers those rows once ((BLOCK_K, C) latents and (BLOCK_K, P) rope keys), computes the
    (BLOCK_H, BLOCK_K) scores with two tl.dot, updates the running max m, sum l and the (BLOCK_H, C) fp32
    accumulator, and reuses the gathered latents as values (a third tl.dot). Softmax in base 2 (exp2, scale
    pre-multiplied by log2 e). Padding (-1) and the ragged tail score -inf; m starts at a finite -1e30 so a row
    that sees no key never computes inf - inf.
    Prefill: T tokens x H / BLOCK_H programs, each over all K indices.
    Decode (T = 1): only B * H / BLOCK_H programs, too few for a GPU at small B, so the K indices are split
    over ``num_splits`` programs (split-KV / flash-decoding): each writes its normalised partial output and
    partial lse, and a log-sum-exp merge (PyTorch, B * H * C work) combines them.

FLOP and byte counts (B*T tokens, H heads, K selected, D = C + P)
    FLOPs = 2 B T H K (D + C)   (the FlashMLA count: tests/lib.py of FlashMLA, 2 s_q topk h_q (d_qk + d_v))
    bytes = B T K D e (gathered rows; re-read once per head block) + B T H D e (q) + B T H C e (o) + 8 B T K
    Arithmetic intensity ~ 2 H (D + C) / (D e) per gathered row = 2 * 128 * 1088 / 1152 ~ 242 FLOP/B for
    h_q = 128 in bf16 at BLOCK_H = H: above the H200 ridge (989 TF / 4.8 TB/s ~ 206), so prefill and
    128-head decode are compute-bound; with 16 heads it is memory-bound, and so would BLOCK_H = 16 be at
    128 heads if the 8 re-reads of each row came from HBM rather than L2. Notebook 09 draws the roofline.

Backward (the stretch goal): ``sparse_mla`` is differentiable. Its backward kernel recomputes each block's
probabilities from the saved lse (FlashAttention-2), keeps dq in registers and scatter-adds the gathered rows'
gradients (as keys and as values) into an fp32 (B, S, D) buffer with atomics, since many queries select the
same row. FLOPs ~ 2.5x the forward (scores, dp, dq, d(key), d(value)); the atomics are its weak spot on a GPU.

Not handled: glm5_ref's ``use_triton`` flag still trains through the PyTorch twin, FP8 KV (FlashMLA's 656-byte
layout), paged caches, attention sinks, per-token top-k lengths other than -1 padding. GPU tiling is untuned
(BLOCK_H = 16, BLOCK_K = 32 for C = 512): GPU timings not yet measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor, dot_precision, interpreting, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_mla_fwd_kernel(q_ptr, kv_ptr, idx_ptr, o_ptr, lse_ptr, T, H, S, K, C, P, k_per_split, qk_scale,
                           stride_qb, stride_qt, stride_qh, stride_kvb, stride_kvs, stride_ib, stride_it,
                           stride_ob, stride_ot, stride_os, stride_oh, stride_lb, stride_lt, stride_ls,
                           BLOCK_H: tl.constexpr, CP: tl.constexpr, PP: tl.constexpr, BLOCK_K: tl.constexpr,
                           CAST: tl.constexpr, PREC: tl.constexpr):
    pid_h, pid_bt, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, t = pid_bt // T, pid_bt % T
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, CP)
    p = tl.arange(0, PP)
    h_ok = h < H
    q_base = q_ptr + b * stride_qb + t * stride_qt + h[:, None] * stride_qh
    q_c = tl.load(q_base + c[None, :], mask=h_ok[:, None] & (c[None, :] < C), other=0.0)  # (BLOCK_H, CP)
    q_r = tl.load(q_base + C + p[None, :], mask=h_ok[:, None] & (p[None, :] < P), other=0.0)  # (BLOCK_H, PP)
    if CAST:
        q_c, q_r = q_c.to(tl.float32), q_r.to(tl.float32)

    m = tl.full((BLOCK_H,), -1.0e30, tl.float32)  # running max (base-2 logits), finite: no inf - inf
    l = tl.zeros((BLOCK_H,), tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_H, CP), tl.float32)  # running sum of p * latent
    kv_base = kv_ptr + b * stride_kvb
    k_lo = split * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + b * stride_ib + t * stride_it + kk, mask=kk < k_hi, other=-1)  # (BLOCK_K,)
        ok = idx >= 0
        rows = kv_base + tl.where(ok, idx, 0).to(tl.int64)[:, None] * stride_kvs
        lat = tl.load(rows + c[None, :], mask=ok[:, None] & (c[None, :] < C), other=0.0)  # (BLOCK_K, CP)
        rope = tl.load(rows + C + p[None, :], mask=ok[:, None] & (p[None, :] < P), other=0.0)  # (BLOCK_K, PP)
        if CAST:
            lat, rope = lat.to(tl.float32), rope.to(tl.float32)
        s = tl.dot(q_c, tl.trans(lat), input_precision=PREC)
        s = tl.dot(q_r, tl.trans(rope), acc=s, input_precision=PREC) * qk_scale  # (BLOCK_H, BLOCK_K), base 2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        pr = tl.exp2(s - m_new[:, None])  # (BLOCK_H, BLOCK_K); 0 for padding
        l = l * alpha + tl.sum(pr, axis=1)
        acc = tl.dot(pr.to(lat.dtype), lat, acc=acc * alpha[:, None], input_precision=PREC)  # values = latents
        m = m_new

    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]  # a row that saw no key: acc = 0 -> output 0
    lse = tl.where(has, (m + tl.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, float("-inf"))  # natural log
    o_base = o_ptr + b * stride_ob + t * stride_ot + split * stride_os
    tl.store(o_base + h[:, None] * stride_oh + c[None, :], out.to(o_ptr.dtype.element_ty),
             mask=h_ok[:, None] & (c[None, :] < C))
    tl.store(lse_ptr + b * stride_lb + t * stride_lt + split * stride_ls + h, lse, mask=h_ok)


def check_indices(indices: torch.Tensor, B: int, T: int, S: int, device) -> torch.Tensor:
    """(B, T, K) integer indices in [-1, S): return them as contiguous int32 (they are read K at a time)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices: expected a torch.Tensor, got {type(indices).__name__}")
    if indices.dim() != 3 or indices.shape[:2] != (B, T):
        raise ValueError(f"indices: expected shape ({B}, {T}, K), got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices: expected int32 or int64, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"indices: expected device {device}, got {indices.device}")
    if indices.numel() and (bool((indices < -1).any()) or bool((indices >= S).any())):
        raise ValueError(f"indices: expected values in [-1, {S - 1}] (-1 = padding), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return indices.to(torch.int32).contiguous()


def sparse_mla_fwd(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
                   num_splits: int = 1, block_h: int = 16, block_k: int | None = None, return_lse: bool = False,
                   validate: bool = True):
    """Sparse absorbed-MLA forward: q (B, T, H, D), kv (B, S, D), indices (B, T, K) -> o (B, T, H, d_v) in q's
    dtype (and lse (B, T, H) fp32 with ``return_lse``). The first d_v dims of kv rows are the values.

    num_splits > 1 splits each token's K indices over that many programs (decode); ``validate=False`` skips
    the host-side range check of the indices (a device sync) for hot loops.
    """
    check_tensor("q", q, 4)
    check_tensor("kv", kv, 3, dtypes=(q.dtype,))
    B, T, H, D = q.shape
    if kv.shape[0] != B or kv.shape[2] != D:
        raise ValueError(f"kv: expected shape ({B}, S, {D}) to match q {tuple(q.shape)}, got {tuple(kv.shape)}")
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 0 < d_v <= D:
        raise ValueError(f"d_v: expected an integer in [1, {D}] (the value part of the {D}-wide rows), got {d_v!r}")
    if not isinstance(sm_scale, (int, float)) or isinstance(sm_scale, bool) or not sm_scale > 0:
        raise ValueError(f"sm_scale: expected a positive number, got {sm_scale!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits: expected a positive integer, got {num_splits!r}")
    S = kv.shape[1]
    if validate:
        indices = check_indices(indices, B, T, S, q.device)
    else:
        indices = indices.to(torch.int32).contiguous()
    K = indices.shape[2]
    C, P = d_v, D - d_v
    CP, PP = next_pow2(C), next_pow2(P)
    BK = block_k or (32 if CP >= 256 else 64)
    BH = next_pow2(min(block_h, H))
    splits = max(1, min(num_splits, triton.cdiv(max(K, 1), BK)))
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), splits), BK) * BK  # whole blocks per split
    splits = triton.cdiv(max(K, 1), k_per_split)
    if splits == 1:
        o = torch.empty(B, T, 1, H, C, dtype=q.dtype, device=q.device)  # (B, T, 1, H, C)
    else:
        o = torch.empty(B, T, splits, H, C, dtype=torch.float32, device=q.device)  # partial outputs
    lse = torch.empty(B, T, splits, H, dtype=torch.float32, device=q.device)
    if B * T * H:
        grid = (triton.cdiv(H, BH), B * T, splits)
        _sparse_mla_fwd_kernel[grid](
            q, kv, indices, o, lse, T, H, S, K, C, P, k_per_split, sm_scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), indices.stride(0), indices.stride(1),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
            BLOCK_H=BH, CP=CP, PP=PP, BLOCK_K=BK, CAST=interpreting(), PREC=dot_precision(q.dtype))
    if splits == 1:
        out, lse_out = o[:, :, 0], lse[:, :, 0]  # (B, T, H, C), (B, T, H)
    else:
        out, lse_out = combine_splits(o, lse)
        out = out.to(q.dtype)
    return (out, lse_out) if return_lse else out


def combine_splits(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partials: o (B, T, N, H, C) normalised per split, lse (B, T, N, H) -> (B, T, H, C), (B, T, H).
    o = sum_n exp(lse_n - lse) o_n with lse = logsumexp_n lse_n; a head with no key anywhere stays 0 / -inf."""
    total = torch.logsumexp(lse, dim=2)  # (B, T, H); -inf where every split was empty
    w = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0)[:, :, None])  # (B, T, N, H); 0 for empty
    return (w[..., None] * o).sum(2), total


def flops_bytes(B: int, T: int, H: int, K: int, D: int = 576, C: int = 512, elem: int = 2,
                block_h: int | None = None) -> tuple[float, float]:
    """(FLOPs, bytes) of one call: FlashMLA's FLOP count; bytes with gathered rows read once per head block."""
    reads = -(-H // (block_h or H))
    return 2.0 * B * T * H * K * (D + C), float(B * T * (K * D * elem * reads + H * D * elem + H * C * elem + 4 * K))


def absorbed_sparse_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor,
                              k_rope: torch.Tensor, key_indices: torch.Tensor, w_uk: torch.Tensor,
                              w_uv: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``MLA.attend_gathered`` (mla.py) returns, (B, T, H, V), with the attention itself in the kernel:
    q_nope (B, T, H, N), q_rope (B, T, H, P), latent (B, S, C), k_rope (B, S, P), key_indices (B, T, K),
    w_uk (H, N, C), w_uv (H, V, C). The absorption and output projection are PyTorch einsums, as in the twin;
    the latent cache is concatenated to FlashMLA's (B, S, C + P) rows here (a real cache would store them so).
    Differentiable (through ``sparse_mla``'s Triton backward) when gradients are wanted."""
    q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)  # (B, T, H, C)
    q = torch.cat([q_lat, q_rope], dim=-1).contiguous()  # (B, T, H, C + P)
    kv = torch.cat([latent, k_rope], dim=-1).contiguous()  # (B, S, C + P)
    if torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad):
        o_lat = sparse_mla(q, kv, key_indices, float(scale), d_v=latent.shape[-1])  # with the Triton backward
    else:
        o_lat = sparse_mla_fwd(q, kv, key_indices, float(scale), d_v=latent.shape[-1],
                               num_splits=4 if q.shape[1] == 1 else 1)  # (B, T, H, C)
    return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, V)


# --- backward (the stretch goal) ---------------------------------------------------------------------
@triton.jit
def _sparse_mla_bwd_kernel(q_ptr, kv_ptr, idx_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dkv_ptr, T, H, K, C, P, sm_scale,
                           stride_qb, stride_qt, stride_qh, stride_kvb, stride_kvs, stride_ib, stride_it,
                           stride_ob, stride_ot, stride_oh, stride_lb, stride_lt,
                           BLOCK_H: tl.constexpr, CP: tl.constexpr, PP: tl.constexpr, BLOCK_K: tl.constexpr,
                           CAST: tl.constexpr, PREC: tl.constexpr):
    """One (head block, token) program: recompute p = exp(s - lse) block by block (FlashAttention-2 backward),
    accumulate dq in registers, and scatter-add the gathered rows' gradients into dkv (fp32) with atomics:
    several queries (and head blocks) select the same cached row."""
    pid_h, pid_bt = tl.program_id(0), tl.program_id(1)
    b, t = pid_bt // T, pid_bt % T
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    c = tl.arange(0, CP)
    p = tl.arange(0, PP)
    h_ok = h < H
    mc = h_ok[:, None] & (c[None, :] < C)
    mp = h_ok[:, None] & (p[None, :] < P)
    q_base = q_ptr + b * stride_qb + t * stride_qt + h[:, None] * stride_qh
    q_c = tl.load(q_base + c[None, :], mask=mc, other=0.0)  # (BLOCK_H, CP)
    q_r = tl.load(q_base + C + p[None, :], mask=mp, other=0.0)  # (BLOCK_H, PP)
    o_off = b * stride_ob + t * stride_ot + h[:, None] * stride_oh + c[None, :]
    do = tl.load(do_ptr + o_off, mask=mc, other=0.0)  # (BLOCK_H, CP)
    o = tl.load(o_ptr + o_off, mask=mc, other=0.0).to(tl.float32)
    if CAST:
        q_c, q_r, do = q_c.to(tl.float32), q_r.to(tl.float32), do.to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o, axis=1)  # (BLOCK_H,) = rowsum(dO * O)
    lse = tl.load(lse_ptr + b * stride_lb + t * stride_lt + h, mask=h_ok, other=float("-inf"))
    lse = tl.where(lse > float("-inf"), lse, 0.0)  # a query with no key: every p below is masked to 0 anyway
    dq_c = tl.zeros((BLOCK_H, CP), tl.float32)
    dq_r = tl.zeros((BLOCK_H, PP), tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    dkv_base = dkv_ptr + b * stride_kvb
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + b * stride_ib + t * stride_it + kk, mask=kk < K, other=-1)
        ok = idx >= 0
        row = tl.where(ok, idx, 0).to(tl.int64)[:, None] * stride_kvs
        lat = tl.load(kv_base + row + c[None, :], mask=ok[:, None] & (c[None, :] < C), other=0.0)  # (BLOCK_K, CP)
        rope = tl.load(kv_base + row + C + p[None, :], mask=ok[:, None] & (p[None, :] < P), other=0.0)
        if CAST:
            lat, rope = lat.to(tl.float32), rope.to(tl.float32)
        s = tl.dot(q_c, tl.trans(lat), input_precision=PREC)
        s = tl.dot(q_r, tl.trans(rope), acc=s, input_precision=PREC) * sm_scale  # (BLOCK_H, BLOCK_K)
        pr = tl.where(ok[None, :] & h_ok[:, None], tl.exp(s - lse[:, None]), 0.0)  # the forward's probabilities
        dp = tl.dot(do, tl.trans(lat), input_precision=PREC)  # dL/dp: the values are the latents
        ds = pr * (dp - delta[:, None]) * sm_scale  # dL/d(q . row), softmax backward with the scale folded in
        dq_c = tl.dot(ds.to(lat.dtype), lat, acc=dq_c, input_precision=PREC)
        dq_r = tl.dot(ds.to(rope.dtype), rope, acc=dq_r, input_precision=PREC)
        dlat = tl.dot(tl.trans(ds).to(q_c.dtype), q_c, input_precision=PREC)  # (BLOCK_K, CP) as a key
        dlat = tl.dot(tl.trans(pr).to(do.dtype), do, acc=dlat, input_precision=PREC)  # ... and as a value
        drope = tl.dot(tl.trans(ds).to(q_r.dtype), q_r, input_precision=PREC)  # (BLOCK_K, PP)
        tl.atomic_add(dkv_base + row + c[None, :], dlat, mask=ok[:, None] & (c[None, :] < C))
        tl.atomic_add(dkv_base + row + C + p[None, :], drope, mask=ok[:, None] & (p[None, :] < P))
    dq_base = dq_ptr + b * stride_qb + t * stride_qt + h[:, None] * stride_qh
    tl.store(dq_base + c[None, :], dq_c.to(dq_ptr.dtype.element_ty), mask=mc)
    tl.store(dq_base + C + p[None, :], dq_r.to(dq_ptr.dtype.element_ty), mask=mp)


class _SparseMLA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, indices, sm_scale, d_v, block_h, block_k):
        idx = check_indices(indices, q.shape[0], q.shape[1], kv.shape[1], q.device)
        o, lse = sparse_mla_fwd(q, kv, idx, sm_scale, d_v, block_h=block_h, block_k=block_k, return_lse=True,
                                validate=False)
        ctx.save_for_backward(q, kv, idx, o, lse)
        ctx.cfg = (sm_scale, d_v, block_h, block_k)
        return o

    @staticmethod
    def backward(ctx, do):
        q, kv, idx, o, lse = ctx.saved_tensors
        sm_scale, d_v, block_h, block_k = ctx.cfg
        do = do.contiguous()
        B, T, H, D = q.shape
        dq = torch.empty_like(q)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)  # fp32: atomics accumulate here
        CP, PP = next_pow2(d_v), next_pow2(D - d_v)
        BK = block_k or (32 if CP >= 256 else 64)
        BH = next_pow2(min(block_h, H))
        if B * T * H:
            _sparse_mla_bwd_kernel[(triton.cdiv(H, BH), B * T)](
                q, kv, idx, o, do, lse, dq, dkv, T, H, idx.shape[2], d_v, D - d_v, sm_scale,
                q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), idx.stride(0), idx.stride(1),
                o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                BLOCK_H=BH, CP=CP, PP=PP, BLOCK_K=BK, CAST=interpreting(), PREC=dot_precision(q.dtype))
        return dq, dkv.to(kv.dtype), None, None, None, None, None


def sparse_mla(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float, d_v: int = 512,
               block_h: int = 16, block_k: int | None = None) -> torch.Tensor:
    """Differentiable sparse MLA: ``sparse_mla_fwd`` forward, a Triton backward for q and kv (the stretch goal of
    issue #11). Backward FLOPs ~2.5x the forward's (recomputed scores, dq, d(key), d(value), dp); the row
    gradients go to an fp32 (B, S, D) buffer with atomic adds. Not used by glm5_ref's flags (forward only)."""
    check_tensor("q", q, 4)
    check_tensor("kv", kv, 3, dtypes=(q.dtype,))
    if kv.shape[0] != q.shape[0] or kv.shape[2] != q.shape[3]:
        raise ValueError(f"kv: expected shape ({q.shape[0]}, S, {q.shape[3]}) to match q, got {tuple(kv.shape)}")
    if isinstance(d_v, bool) or not isinstance(d_v, int) or not 0 < d_v <= q.shape[3]:
        raise ValueError(f"d_v: expected an integer in [1, {q.shape[3]}], got {d_v!r}")
    return _SparseMLA.apply(q.contiguous(), kv, indices, float(sm_scale), d_v, block_h, block_k)
