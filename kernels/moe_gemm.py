"""Grouped MoE GEMM in Triton: every expert's SwiGLU over its contiguous segment of expert-sorted token-slots.

Twin: ``glm5_ref.moe.MoE._experts_grouped`` (torch._grouped_mm over the same segments) and ``torch._grouped_mm``
itself. After ``sort_by_expert`` the S = N * K token-slots lie in E contiguous segments, segment e being rows
offs[e-1] .. offs[e] (offs = cumulative counts, int32, as torch._grouped_mm takes them). Then

    grouped_gemm:   y[seg_e] = x[seg_e] @ W[e]^T                       x (S, Kd), W (E, N, Kd) -> y (S, N)
    swiglu_gate_up: h[seg_e] = silu(x W_g[e]^T) * (x W_u[e]^T) * g      gate|up (E, 2I, d), g (S,) fp32 gate weight
    moe_experts:    ys = grouped_gemm(swiglu_gate_up(xs), down)         down (E, d, I) -> ys (S, d)

Algorithm and tiling
    One 2-D launch for all experts. Row tiles never straddle two experts: expert e owns ceil(n_e / BLOCK_M)
    tiles, and a tile table (expert, first row, end row) is built ON THE DEVICE with cumsum and searchsorted
    (no host sync, so it can be captured in a CUDA graph). The grid is (ceil(S / BLOCK_M) + E, N / BLOCK_N),
    an upper bound on the tiles; a tile past the end has an empty row range and stores nothing. A program
    computes one (BLOCK_M, BLOCK_N) output tile over Kd in BLOCK_K steps with an fp32 accumulator.
    swiglu_gate_up keeps TWO accumulators (gate and up columns n and I + n of the same expert) so that the
    (S, 2I) gate|up product never reaches memory: SwiGLU and the router's gate weight are the epilogue (as
    the twin, the weight scales down_proj's input, which is linear, so equal to scaling its output).

FLOP and byte counts (S token-slots, d hidden, I expert width, E experts with at least one token)
    FLOPs = 2 S d (2I) + 2 S I d = 6 S d I
    bytes = gate|up and down weights of the used experts, 3 E d I e, + activations S d e (in) + S I e (h, written
            and read) + S d e (out); the weights dominate when S / E (tokens per expert) is small, so decode-
            sized batches are memory-bound and prefill-sized ones (S / E >~ 200 in bf16) compute-bound.

Not handled: the permutation itself (gather by ``token_of_slot``) and the combine (index_add) stay in PyTorch
(fusing them is what SonicMoE / vLLM's fused_moe do), FP8 weights, a backward pass, persistent scheduling,
expert parallelism. GPU tiling is untuned (BLOCK_M 64, BLOCK_N 64, BLOCK_K 32): not yet measured on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_tensor, dot_precision, interpreting, next_pow2


@triton.jit
def _grouped_gemm_kernel(x_ptr, w_ptr, y_ptr, g_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr, N, Kd,
                         stride_xm, stride_we, stride_wn, stride_ym, n_off,
                         SWIGLU: tl.constexpr, HAS_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr):
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(tile_e_ptr + tile)
    lo = tl.load(tile_lo_ptr + tile)
    hi = tl.load(tile_hi_ptr + tile)  # == lo for a tile past the last expert: nothing loaded or stored
    rows = lo + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_ok, c_ok = rows < hi, cols < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < Kd
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + k[None, :],
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_base + cols[None, :] * stride_wn + k[:, None],
                    mask=c_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_N) = W[e][cols, k]^T
        if CAST:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc=acc, input_precision=PREC)
        if SWIGLU:  # the up projection: rows n_off + cols of the packed gate|up weight
            wu = tl.load(w_base + (n_off + cols[None, :]) * stride_wn + k[:, None],
                         mask=c_ok[None, :] & k_ok[:, None], other=0.0)
            if CAST:
                wu = wu.to(tl.float32)
            acc_u = tl.dot(x, wu, acc=acc_u, input_precision=PREC)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u  # silu(gate) * up, fp32
    if HAS_G:
        acc = acc * tl.load(g_ptr + rows, mask=r_ok, other=0.0)[:, None]  # the router's gate weight, fp32
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & c_ok[None, :])


def tile_table(offs: torch.Tensor, S: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row tile: (expert, first row, end row), int32, on offs' device, sync-free. Length ceil(S/BM) + E."""
    E = offs.shape[0]
    ends = offs.long()  # (E,)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])  # (E,)
    tiles = (ends - starts + block_m - 1) // block_m  # (E,) row tiles of each expert
    cum = tiles.cumsum(0)  # (E,)
    n_tiles = -(-S // block_m) + E  # upper bound on sum(tiles)
    t = torch.arange(n_tiles, device=offs.device)  # (n_tiles,)
    e = torch.searchsorted(cum, t, right=True)  # (n_tiles,) expert of each tile; E = past the end
    valid = e < E
    ec = e.clamp(max=E - 1)
    lo = starts[ec] + (t - (cum - tiles)[ec]) * block_m
    hi = torch.minimum(lo + block_m, ends[ec])
    lo, hi = torch.where(valid, lo, 0), torch.where(valid, hi, 0)
    return ec.to(torch.int32), lo.to(torch.int32), hi.to(torch.int32)


def _check_offs(offs, E: int, S: int, device, validate: bool) -> None:
    if not isinstance(offs, torch.Tensor):
        raise TypeError(f"offs: expected a torch.Tensor, got {type(offs).__name__}")
    if offs.dtype != torch.int32 or offs.shape != (E,):
        raise ValueError(f"offs: expected int32 of shape ({E},) (cumulative segment ends), got {offs.dtype} "
                         f"{tuple(offs.shape)}")
    if offs.device != device:
        raise ValueError(f"offs: expected device {device}, got {offs.device}")
    if validate and E and (bool((offs[1:] < offs[:-1]).any()) or int(offs[0]) < 0 or int(offs[-1]) != S):
        raise ValueError(f"offs: expected non-decreasing segment ends from >= 0 up to the row count {S}, got "
                         f"{offs.tolist()[:8]}{'...' if E > 8 else ''}")


def _launch(x, w, offs, out, g, n_cols, swiglu, block_m, block_n, block_k):
    S, Kd = x.shape
    BM, BN, BK = next_pow2(block_m), next_pow2(min(block_n, max(n_cols, 1))), next_pow2(min(block_k, max(Kd, 1)))
    if S == 0 or n_cols == 0:
        return out
    te, lo, hi = tile_table(offs, S, BM)
    grid = (te.shape[0], triton.cdiv(n_cols, BN))
    _grouped_gemm_kernel[grid](x, w, out, g if g is not None else x, te, lo, hi, n_cols, Kd,
                               x.stride(0), w.stride(0), w.stride(1), out.stride(0), n_cols,
                               SWIGLU=swiglu, HAS_G=g is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                               CAST=interpreting(), PREC=dot_precision(x.dtype))
    return out


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, block_m: int = 64, block_n: int = 64,
                 block_k: int = 32, validate: bool = True) -> torch.Tensor:
    """y[seg_e] = x[seg_e] @ w[e]^T: x (S, K), w (E, N, K), offs (E,) int32 segment ends -> y (S, N).
    Equal to ``torch._grouped_mm(x, w.transpose(1, 2), offs=offs)``; rows past offs[-1] are not allowed."""
    check_tensor("x", x, 2)
    check_tensor("w", w, 3, dtypes=(x.dtype,))
    if w.shape[2] != x.shape[1]:
        raise ValueError(f"w: expected shape (E, N, {x.shape[1]}) to match x {tuple(x.shape)}, got {tuple(w.shape)}")
    _check_offs(offs, w.shape[0], x.shape[0], x.device, validate)
    out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)  # (S, N)
    return _launch(x, w, offs, out, None, w.shape[1], False, block_m, block_n, block_k)


def swiglu_gate_up(x: torch.Tensor, gate_up: torch.Tensor, offs: torch.Tensor, gate_weight: torch.Tensor | None = None,
                   block_m: int = 64, block_n: int = 64, block_k: int = 32, validate: bool = True) -> torch.Tensor:
    """h[seg_e] = silu(x W_g[e]^T) * (x W_u[e]^T) * g: x (S, d), gate_up (E, 2I, d) packed [gate; up] as
    ``MoE.packed_expert_weights``, gate_weight (S,) fp32 or None -> h (S, I) in x's dtype."""
    check_tensor("x", x, 2)
    check_tensor("gate_up", gate_up, 3, dtypes=(x.dtype,))
    if gate_up.shape[2] != x.shape[1] or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up: expected shape (E, 2I, {x.shape[1]}), got {tuple(gate_up.shape)}")
    if gate_weight is not None:
        check_tensor("gate_weight", gate_weight, 1, dtypes=(torch.float32,))
        if gate_weight.shape[0] != x.shape[0]:
            raise ValueError(f"gate_weight: expected shape ({x.shape[0]},), got {tuple(gate_weight.shape)}")
    _check_offs(offs, gate_up.shape[0], x.shape[0], x.device, validate)
    I = gate_up.shape[1] // 2
    out = torch.empty(x.shape[0], I, dtype=x.dtype, device=x.device)  # (S, I)
    return _launch(x, gate_up, offs, out, gate_weight, I, True, block_m, block_n, block_k)


def moe_experts(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor,
                gate_weight: torch.Tensor | None = None, validate: bool = True, **blocks) -> torch.Tensor:
    """The routed experts over expert-sorted rows: xs (S, d) -> ys (S, d), as MoE._experts_grouped between its
    permute and its combine. gate_up (E, 2I, d), down (E, d, I), offs (E,) int32, gate_weight (S,) fp32."""
    check_tensor("xs", xs, 2)
    check_tensor("down", down, 3, dtypes=(xs.dtype,))
    if down.shape[0] != gate_up.shape[0] or 2 * down.shape[2] != gate_up.shape[1] or down.shape[1] != xs.shape[1]:
        raise ValueError(f"down: expected shape ({gate_up.shape[0]}, {xs.shape[1]}, {gate_up.shape[1] // 2}), got "
                         f"{tuple(down.shape)}")
    h = swiglu_gate_up(xs, gate_up, offs, gate_weight, validate=validate, **blocks)  # (S, I)
    return grouped_gemm(h, down, offs, validate=False, **blocks)  # (S, d)


def flops_bytes(S: int, d: int, I: int, E_used: int, elem: int = 2) -> tuple[float, float]:
    """(FLOPs, bytes) of moe_experts: 6 S d I, and weights of the used experts + activations."""
    return 6.0 * S * d * I, float(3 * E_used * d * I * elem + S * (2 * d + 2 * I) * elem + 4 * S)
