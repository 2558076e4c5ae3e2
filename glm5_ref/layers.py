"""Small shared primitives: RMSNorm, rotary position embedding (both pairings), SwiGLU; triton_usable, the one
gate through which mla.py, dsa.py, moe.py and muon.py reach the optional Triton kernels; and grouped_mm, torch's
grouped GEMM (the MoE experts' one kernel call per projection) in a form torch.compile can trace.

Every other module of glm5_ref builds on these three; each is short enough to read in one sitting.

RMSNorm (Zhang & Sennrich 2019)
    y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back, as the Hugging Face GLM-5 code does
    (so bf16 inputs give the same answer as the checkpoint's reference implementation).

RoPE (Su et al. 2021, "RoFormer")
    Split the last D dims into D/2 pairs; pair j at position m is rotated by the angle m * theta_j with
    theta_j = base^(-2j/D). Rotations preserve norms, and the dot product of a query rotated at m with a key
    rotated at n depends on m - n only, which is what makes attention relative.
    Which dims form a pair is a convention that a checkpoint bakes in:
      * interleaved ("GPT-J" / DeepSeek style): pair j = dims (2j, 2j+1). GLM-5 uses it both in MLA
        (``rope_interleave``) and in the DSA indexer (``indexer_rope_interleave``).
      * half-split ("GPT-NeoX" / rotate_half style): pair j = dims (j, j + D/2). DeepSeek-V3.2's indexer uses
        it (their 2025-11 fix); using the wrong one with a checkpoint silently breaks the top-k selection.
    The two agree up to a fixed permutation of the dims: rope_half(x[..., P]) = rope_interleaved(x)[..., P]
    with P = [0, 2, 4, ..., 1, 3, 5, ...] (``interleaved_to_half_split``). That is how transformers applies
    interleaved RoPE: permute, then rotate_half.

SwiGLU (Shazeer 2020)
    FFN(x) = W_down( SiLU(W_gate x) * W_up x ), no biases; parameter names gate_proj / up_proj / down_proj as
    in the released checkpoint. Used for the dense FFN of the first layers, every routed expert and the
    shared expert.

Not handled: RoPE scaling (YaRN, NTK, linear); GLM-5 uses the "default" type.
Axes: B batch, T sequence, H heads, D feature dims of the rotated slice.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm input: expected last dim {self.weight.shape[0]}, got shape {tuple(x.shape)}")
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * theta_j for every position m and pair j, in fp32: shapes (*positions.shape, dim/2).

    On the CPU, positions in [0, ROPE_TABLE_MAX) are read from a cached table (``_rope_table``: the same
    formula over 0 .. L-1, so the same values): a decode step rotates q and k in every layer and the indexer
    at one new position, and recomputing the angles there was about a fifth of its aten calls."""
    if dim % 2:
        raise ValueError(f"rope dim: expected an even number, got {dim}")
    # fp64 so long contexts stay exact; MPS has no float64, fp32 there (angle error < 1e-3 rad at 4K positions)
    wide = torch.float32 if positions.device.type == "mps" else torch.float64
    if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
        top, low = int(positions.max()), int(positions.min())  # no device sync on the CPU
        if low >= 0 and top < ROPE_TABLE_MAX:
            length = max(1024, 1 << top.bit_length())  # powers of two: few tables, at most 2x the need
            cos, sin = _rope_table(dim, float(theta), length, wide)
            return cos[positions], sin[positions]
    return _angles(positions, dim, theta, wide)


ROPE_TABLE_MAX = 1 << 16  # positions the CPU's cached cos / sin tables cover (8 MB for 64 rotated dims)


def _angles(positions: torch.Tensor, dim: int, theta: float, wide: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=wide, device=positions.device) / dim)  # (D/2,)
    angles = positions.to(wide)[..., None] * inv_freq  # (..., T, D/2)
    return angles.cos().float(), angles.sin().float()


@functools.lru_cache(maxsize=16)
def _rope_table(dim: int, theta: float, length: int, wide: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(length, dim/2) fp32 cos and sin for positions 0 .. length-1 on the CPU (read-only: callers index it)."""
    return _angles(torch.arange(length), dim, theta, wide)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x by its positions.

    x: (B, T, D) or (B, T, H, D) (any number of head axes after T); positions: (T,) or (B, T) integers.
    Returns a tensor of x's shape and dtype (the rotation itself runs in fp32).
    """
    if x.dim() < 2:
        raise ValueError(f"apply_rope x: expected (B, T, ..., D), got shape {tuple(x.shape)}")
    B, T, D = x.shape[0], x.shape[1], x.shape[-1]
    if positions.dim() == 1:
        positions = positions[None]  # (1, T)
    if positions.dim() != 2 or positions.shape[-1] != T or positions.shape[0] not in (1, B):
        raise ValueError(f"apply_rope positions: expected shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
    cos, sin = rope_angles(positions, D, theta)  # (B|1, T, D/2)
    extra = x.dim() - 3  # head axes between T and D
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])  # (B|1, T, 1.., D/2)
    sin = sin.reshape(cos.shape)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # pair j = dims (2j, 2j+1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., : D // 2], xf[..., D // 2:]  # pair j = dims (j, j + D/2)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def interleaved_to_half_split(dim: int) -> torch.Tensor:
    """The permutation P with rope_half(x[..., P]) == rope_interleaved(x)[..., P]: evens first, then odds."""
    return torch.cat((torch.arange(0, dim, 2), torch.arange(1, dim, 2)))


class SwiGLU(nn.Module):
    """W_down( SiLU(W_gate x) * W_up x ), bias-free; the dense FFN and every expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def triton_usable(*tensors: torch.Tensor) -> bool:
    """May an opt-in Triton kernel (package ``glm5_kernels``, folder kernels/) take these tensors? Decided here,
    without importing the kernels: triton must be installed; every tensor on CUDA (or on the CPU when Triton's
    interpreter is on, TRITON_INTERPRET=1, where bf16 is computed wrongly and so refused) in fp16/bf16/fp32; and
    forward only (False when autograd would need a backward through the kernel)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    interpreting = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
        if interpreting and (t.device.type != "cpu" or t.dtype == torch.bfloat16):
            return False
        if not interpreting and t.device.type != "cuda":
            return False
    return True


# ---- the grouped GEMM of the MoE experts (moe.py), usable under torch.compile ----------------------------
def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """Can torch's grouped GEMM run here? fp32/bf16/fp16 on CPU (bf16 only on GPU), and every row stride
    (width * element size) a multiple of 16 bytes. Otherwise MoE falls back to a loop over the segments."""
    if _grouped_mm_fn() is None:
        return False
    if device.type == "cpu":
        ok_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    else:
        ok_dtype = dtype == torch.bfloat16
    itemsize = torch.empty((), dtype=dtype).element_size()
    return ok_dtype and all(w * itemsize % 16 == 0 for w in widths)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[s] = x[s] @ w[e(s)] for the rows s of expert e's segment (offs: (E,) int32 segment ends): (S, k), (E, k, n)
    -> (S, n). torch's grouped GEMM; under torch.compile the same call wrapped as a custom operator, because the
    compiler's shape function for torch._grouped_mm accepts bf16 only (the CPU kernel also runs fp32/fp16)."""
    if torch.compiler.is_compiling():
        return _grouped_mm_op(x, w, offs)
    return _grouped_mm_fn()(x, w, offs=offs)


# The custom operator for torch.compile: the eager kernel, a shape function for the compiler, and the backward
# (dx = grouped dy @ w^T; dw[e] = x_e^T dy_e, the grouped GEMM with the groups along its inner dim). Its namespace
# is this module's name, so a copy of this file in another package registers its own.
_OP_NAMESPACE = __name__.replace(".", "_")


@torch.library.custom_op(f"{_OP_NAMESPACE}::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_fn()(x, w, offs=offs)


@torch.library.custom_op(f"{_OP_NAMESPACE}::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_fn()(x.t(), dy, offs=offs)  # (E, k, n)


_grouped_mm_op.register_fake(lambda x, w, offs: x.new_empty(x.shape[0], w.shape[-1]))
_grouped_mm_weight_grad.register_fake(lambda x, dy, offs: x.new_empty(offs.shape[0], x.shape[1], dy.shape[1]))


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    return _grouped_mm_op(dy, w.transpose(1, 2), offs), _grouped_mm_weight_grad(x, dy, offs), None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)
