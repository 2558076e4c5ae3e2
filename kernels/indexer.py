"""The lightning indexer in Triton: fused q.k, ReLU and weighted head sum, then a per-query top-k.

Twin: ``glm5_ref.dsa.Indexer.scores`` (scores) and ``glm5_ref.dsa.select_topk`` (causal top-k, ties to the most
recent key, -1 padding). With q (B, T, J, I) indexer queries, k (B, S, I) indexer keys (one per token, shared by
the J heads), w (B, T, J) fp32 head weights and a queries' absolute positions start .. start + T - 1:

    I[b, t, s] = sum_j w[b, t, j] * ReLU(q[b, t, j] . k[b, s] / sqrt(I))          (DeepSeek-V3.2 eq. 1)
    idx[b, t]  = TopK_{s <= start + t} I[b, t, s]                                   k = topk

Algorithm and tiling
    ``indexer_scores``: grid (T / BLOCK_T, S / BLOCK_S, B). A program loads BLOCK_T queries as one
    (BLOCK_T * J, I) tile (all heads of a query stacked: one tl.dot serves every head), the (BLOCK_S, I) keys,
    computes the (BLOCK_T * J, BLOCK_S) logits, ReLU, multiplies by the head weights and sums the J rows of
    each query: (BLOCK_T, BLOCK_S) fp32 scores, written out. No causal mask (as the twin).
    ``indexer_topk``: the same scores, never written to memory. Grid (T / BLOCK_T, B). A program walks the keys
    of its queries in chunks of KP = next_pow2(topk) (only up to its last query's position: causal skipping)
    and keeps, per query, a running top-KP buffer sorted in descending order. A chunk is merged with one
    bitonic step: sort the chunk ascending, take the elementwise max with the descending buffer (the KP
    largest of the union, as a bitonic sequence), sort that descending (``_sort_rows``: tl.sort's bitonic
    network with min/max compare-and-swap). Scores are ranked by one int64 key,
    (order-preserving int32 of the fp32 bits) << 32 | position, exactly ``glm5_ref.dsa.ranking_key``, so ties go
    to the most recent key and the same scores give the same indices bit for bit. Future keys score -inf
    and come out as -1, as in the twin. Within a chunk the keys are scored BLOCK_S at a time (a (BLOCK_T * J,
    KP) fp32 logit tile would not fit in registers for KP = 2048); their int64 keys go to the program's slice
    of a global scratch buffer (B T KP int64, L2-resident) and the whole chunk is read back for the merge.
    Prefill: BLOCK_T queries per program share each key chunk. Decode (T = 1, a long cache): one program per
    row, so B programs; the loop over a 32K-128K cache is the work (a split over S with a final merge would
    add parallelism at small B: not done).

FLOP and byte counts (per layer; J heads of width I, S keys, T queries)
    FLOPs  = 2 T S J I (the dot products; ReLU and weighted sum add 2 T S J, top-k compares ~T S log2(KP)^2/2).
             With causal skipping in prefill (start = 0) the dots are about half: T (T + 1) J I.
    bytes  = scores kernel: T J I e + S I e per query block (keys re-read once per BLOCK_T queries) + 4 T S out;
             top-k kernel: the same reads, 8 T topk out, no scores written.
    Decode (T = 1): 2 S J I FLOPs against S I e bytes, an intensity of 2 J / e = 32 FLOP/B for GLM-5's J = 32
    in bf16: below the H200 ridge (~206 FLOP/B), so decode is memory-bound (performance_anchors.md section 7).

Not handled: FP8 keys/queries with block scales (DeepGEMM's fp8_mqa_logits; the twin's ``fp8`` simulation),
the Hadamard rotation, a split over S for small-batch decode, per-row cache lengths, a backward (the top-k
is not differentiable and the indexer's KL loss uses the scores of the PyTorch twin). KP = next_pow2(topk)
keys per chunk is large for topk = 2048 (register pressure on a GPU: GPU timings not yet measured).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.standard import _indicator, _log2

from ._common import check_tensor, dot_precision, interpreting, next_pow2


@triton.jit
def _cas(x, flip, i: tl.constexpr):
    """Compare-and-swap along the i-th innermost axis of a [2] * n hypercube: the left element gets the min
    (the max where ``flip``). tl.sort does this with an xor-sum reduction, which Triton's interpreter runs as a
    Python loop per element; min/max reductions run as numpy calls there (the whole top-k kernel ran 3.5x
    faster in the interpreter on one test shape) and compile to the same kind of reduction on a GPU. Uses
    triton.language.standard's private _indicator and _log2 (Triton 3.9, pinned)."""
    n_dims: tl.constexpr = _log2(x.numel)
    lo = tl.min(x, axis=n_dims - 1 - i, keep_dims=True)
    hi = tl.max(x, axis=n_dims - 1 - i, keep_dims=True)
    return tl.where((flip ^ _indicator(n_dims, i)).to(tl.int1), hi, lo)


@triton.jit
def _bitonic_stage(x, stage: tl.constexpr, order: tl.constexpr):
    if order == 2:  # alternating directions, by the stage's bit of the position
        flip = _indicator(_log2(x.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        x = _cas(x, flip, stage - 1 - i)
    return x


@triton.jit
def _sort_rows(x, descending: tl.constexpr):
    """Bitonic sort of each row of a 2-D power-of-two tile along its last axis (as tl.sort, see _cas)."""
    log_n: tl.constexpr = _log2(x.shape[1])
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_n + 1):
        h = _bitonic_stage(h, i, 2 if i < log_n else descending)
    return tl.reshape(h, x.shape)


@triton.jit
def _scores_tile(q, k_ptr, w, kb, s0, S, I, stride_ks, scale,
                 BLOCK_T: tl.constexpr, JP: tl.constexpr, IP: tl.constexpr, BS: tl.constexpr,
                 CAST: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_T, BS) fp32 scores of a query tile q (BLOCK_T*JP, IP) against keys s0 .. s0 + BS of batch kb."""
    s = s0 + tl.arange(0, BS)
    i = tl.arange(0, IP)
    kt = tl.load(k_ptr + kb + s[:, None] * stride_ks + i[None, :], mask=(s[:, None] < S) & (i[None, :] < I),
                 other=0.0)  # (BS, IP)
    if CAST:
        kt = kt.to(tl.float32)
    logits = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale  # (BLOCK_T*JP, BS), fp32, / sqrt(I)
    weighted = tl.maximum(logits, 0.0) * w[:, None]  # ReLU, then the head weight of each row
    return tl.sum(tl.reshape(weighted, (BLOCK_T, JP, BS)), axis=1)  # (BLOCK_T, BS): sum over heads


@triton.jit
def _load_queries(q_ptr, w_ptr, b, t0, T, J, I, stride_qb, stride_qt, stride_wb,
                  BLOCK_T: tl.constexpr, JP: tl.constexpr, IP: tl.constexpr, CAST: tl.constexpr):
    """The (BLOCK_T*JP, IP) query tile (row = query * JP + head) and its (BLOCK_T*JP,) head weights."""
    r = tl.arange(0, BLOCK_T * JP)
    tt, jj = t0 + r // JP, r % JP  # query and head of each stacked row
    i = tl.arange(0, IP)
    row_ok = (tt < T) & (jj < J)
    q = tl.load(q_ptr + b * stride_qb + tt[:, None] * stride_qt + jj[:, None] * I + i[None, :],
                mask=row_ok[:, None] & (i[None, :] < I), other=0.0)
    if CAST:
        q = q.to(tl.float32)
    w = tl.load(w_ptr + b * stride_wb + tt * J + jj, mask=row_ok, other=0.0)  # fp32
    return q, w


@triton.jit
def _indexer_scores_kernel(q_ptr, k_ptr, w_ptr, out_ptr, T, S, J, I, scale,
                           stride_qb, stride_qt, stride_kb, stride_ks, stride_wb, stride_ob, stride_ot,
                           BLOCK_T: tl.constexpr, JP: tl.constexpr, IP: tl.constexpr, BS: tl.constexpr,
                           CAST: tl.constexpr, PREC: tl.constexpr):
    pid_t, pid_s, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, s0 = pid_t * BLOCK_T, pid_s * BS
    q, w = _load_queries(q_ptr, w_ptr, b, t0, T, J, I, stride_qb, stride_qt, stride_wb,
                         BLOCK_T, JP, IP, CAST)
    sc = _scores_tile(q, k_ptr, w, b * stride_kb, s0, S, I, stride_ks, scale, BLOCK_T, JP, IP, BS, CAST, PREC)
    t = t0 + tl.arange(0, BLOCK_T)
    s = s0 + tl.arange(0, BS)
    tl.store(out_ptr + b * stride_ob + t[:, None] * stride_ot + s[None, :], sc,
             mask=(t[:, None] < T) & (s[None, :] < S))


@triton.jit
def _chunk_keys(q, k_ptr, w, kb, s0, S, I, stride_ks, scale, qpos,
                BLOCK_T: tl.constexpr, JP: tl.constexpr, IP: tl.constexpr, BS: tl.constexpr,
                CAST: tl.constexpr, PREC: tl.constexpr):
    """(BLOCK_T, BS) int64 ranking keys of keys s0 .. s0 + BS: ``glm5_ref.dsa.ranking_key``."""
    sc = _scores_tile(q, k_ptr, w, kb, s0, S, I, stride_ks, scale, BLOCK_T, JP, IP, BS, CAST, PREC)
    s = s0 + tl.arange(0, BS)
    sc = tl.where(s[None, :] <= qpos[:, None], sc, float("-inf"))  # future keys: -inf, as select_topk
    bits = sc.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # int32 ordered like the floats
    key = (bits.to(tl.int64) << 32) + s[None, :].to(tl.int64)  # unique, ties -> the later key
    return tl.where(s[None, :] < S, key, -9223372036854775808)  # past the end: never picked


@triton.jit
def _indexer_topk_kernel(q_ptr, k_ptr, w_ptr, idx_ptr, scratch_ptr, T, S, J, I, start, TOPK, scale,
                         stride_qb, stride_qt, stride_kb, stride_ks, stride_wb, stride_ib, stride_it,
                         BLOCK_T: tl.constexpr, JP: tl.constexpr, IP: tl.constexpr, KP: tl.constexpr,
                         BS: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr):
    pid_t, b = tl.program_id(0), tl.program_id(1)
    t0 = pid_t * BLOCK_T
    q, w = _load_queries(q_ptr, w_ptr, b, t0, T, J, I, stride_qb, stride_qt, stride_wb,
                         BLOCK_T, JP, IP, CAST)
    t = t0 + tl.arange(0, BLOCK_T)
    qpos = start + t  # absolute position of each query
    # the buffer of the best KP keys so far, sorted descending; int64 min = "nothing here yet"
    best = tl.full((BLOCK_T, KP), -9223372036854775808, tl.int64)
    s_end = tl.minimum(S, start + t0 + BLOCK_T)  # causal skipping: no key after the block's last query
    # BS < KP: a chunk's keys are scored BS at a time (a (BLOCK_T*J, KP) fp32 logit tile would not fit in
    # registers for KP = 2048) and assembled in this program's slice of a global scratch buffer (L2-resident)
    prog = b * tl.num_programs(0) + pid_t
    sbase = scratch_ptr + prog.to(tl.int64) * (BLOCK_T * KP) + tl.arange(0, BLOCK_T)[:, None] * KP
    for s0 in range(0, s_end, KP):
        if BS == KP:
            key = _chunk_keys(q, k_ptr, w, b * stride_kb, s0, S, I, stride_ks, scale, qpos,
                              BLOCK_T, JP, IP, KP, CAST, PREC)  # (BLOCK_T, KP)
        else:
            for j in tl.static_range(0, KP, BS):
                kj = _chunk_keys(q, k_ptr, w, b * stride_kb, s0 + j, S, I, stride_ks, scale, qpos,
                                 BLOCK_T, JP, IP, BS, CAST, PREC)  # (BLOCK_T, BS)
                tl.store(sbase + j + tl.arange(0, BS)[None, :], kj)
            tl.debug_barrier()  # every thread's stores visible before the whole chunk is read back
            key = tl.load(sbase + tl.arange(0, KP)[None, :])  # (BLOCK_T, KP)
            tl.debug_barrier()  # and read before the next chunk overwrites it
        chunk = _sort_rows(key, 0)  # ascending
        best = _sort_rows(tl.maximum(best, chunk), 1)  # descending: the top KP of best U chunk
    pos = (best & 0xFFFFFFFF).to(tl.int64)
    hi = (best >> 32).to(tl.int32)
    NEG_INF_KEY: tl.constexpr = -2139095041  # the order-preserving int32 of -inf's bits (0xFF800000)
    idx = tl.where(hi > NEG_INF_KEY, pos, -1)  # a -inf (future) or empty pick is padding
    c = tl.arange(0, KP)
    tl.store(idx_ptr + b * stride_ib + t[:, None] * stride_it + c[None, :], idx,
             mask=(t[:, None] < T) & (c[None, :] < TOPK))


def _check(q, keys, weights):
    check_tensor("q", q, 4, inner=2)  # (J, I) packed per query: the J heads stack into one tile
    check_tensor("keys", keys, 3, dtypes=(q.dtype,))
    check_tensor("weights", weights, 3, dtypes=(torch.float32,), inner=2)
    B, T, J, I = q.shape
    if keys.shape[0] != B or keys.shape[2] != I:
        raise ValueError(f"keys: expected shape ({B}, S, {I}) to match q {tuple(q.shape)}, got {tuple(keys.shape)}")
    if weights.shape != (B, T, J):
        raise ValueError(f"weights: expected shape {(B, T, J)}, got {tuple(weights.shape)}")
    if keys.device != q.device or weights.device != q.device:
        raise ValueError(f"keys, weights: expected the device of q ({q.device}), got {keys.device}, {weights.device}")
    return B, T, J, I, keys.shape[1]


def indexer_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, block_s: int = 64,
                   block_t: int | None = None) -> torch.Tensor:
    """Scores (B, T, S) fp32 of q (B, T, J, I), keys (B, S, I), weights (B, T, J) fp32; as Indexer.scores."""
    B, T, J, I, S = _check(q, keys, weights)
    JP, IP = next_pow2(J, 1), next_pow2(I)
    BT = block_t or (min(next_pow2(T, 1), 32) if interpreting() else max(1, 16 // JP))
    BS = next_pow2(block_s)
    out = torch.empty(B, T, S, dtype=torch.float32, device=q.device)  # (B, T, S)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(T, BT), triton.cdiv(S, BS), B)
    _indexer_scores_kernel[grid](q, keys, weights, out, T, S, J, I, I ** -0.5,
                                 q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), weights.stride(0),
                                 out.stride(0), out.stride(1),
                                 BLOCK_T=BT, JP=JP, IP=IP, BS=BS, CAST=interpreting(), PREC=dot_precision(q.dtype))
    return out


def indexer_topk(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, topk: int, start: int = 0,
                 block_t: int | None = None, block_s: int = 128) -> torch.Tensor:
    """Fused scores + causal top-k: (B, T, topk) int64 key positions, -1 padding, best first.

    The T queries sit at absolute positions start .. start + T - 1 and keys are positions 0 .. S - 1 (prefill:
    start = 0, S = T; decode: T = 1, start = S - 1). Equal to ``select_topk(Indexer.scores(...), pos, topk)``
    whenever the scores are equal (the fp32 sums may differ in the last bits, which can swap near-ties).
    """
    B, T, J, I, S = _check(q, keys, weights)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    if topk > S:
        raise ValueError(f"topk: expected at most the number of keys S = {S}, got {topk}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0 or start + T > S:
        raise ValueError(f"start: expected an integer in [0, S - T] = [0, {S - T}] (queries are keys too), "
                         f"got {start!r}")
    JP, IP, KP = next_pow2(J, 1), next_pow2(I), next_pow2(topk)
    # GPU: J * BLOCK_T >= 16 rows for tl.dot; interpreter: few, large programs (each costs ~ms of numpy calls)
    BT = block_t or (min(next_pow2(T, 1), 32) if interpreting() else max(1, 16 // JP))
    BS = min(KP, next_pow2(block_s))  # keys scored per step; a chunk of KP keys is merged at once
    idx = torch.empty(B, T, topk, dtype=torch.int64, device=q.device)  # (B, T, topk)
    if idx.numel() == 0:
        return idx
    grid = (triton.cdiv(T, BT), B)
    scratch = torch.empty(grid[0] * B * BT * KP if BS < KP else 1, dtype=torch.int64, device=q.device)
    _indexer_topk_kernel[grid](q, keys, weights, idx, scratch, T, S, J, I, start, topk, I ** -0.5,
                               q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), weights.stride(0),
                               idx.stride(0), idx.stride(1), BLOCK_T=BT, JP=JP, IP=IP, KP=KP, BS=BS,
                               CAST=interpreting(), PREC=dot_precision(q.dtype))
    return idx


def flops_bytes(B: int, T: int, S: int, J: int, I: int, topk: int, elem: int = 2,
                causal: bool = True) -> tuple[float, float]:
    """(FLOPs, bytes) of indexer_topk: the dots (causally halved in prefill) and the compulsory traffic."""
    pairs = T * (T + 1) / 2 + T * (S - T) if causal else T * S
    return 2.0 * B * pairs * J * I, float(B * (T * J * I * elem + S * I * elem + T * J * 4 + T * topk * 8))
