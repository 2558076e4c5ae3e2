"""Muon and GLM-5's Muon Split: orthogonalized momentum for the hidden matrices, AdamW for the rest.

What it is
    Muon (Keller Jordan 2024) replaces a matrix parameter's update by the nearest semi-orthogonal matrix to
    its momentum. GLM-4.5 and GLM-5 train every hidden matrix with it (GLM-5 report section 2.1). For a
    parameter W (m x n) with gradient G_t, momentum mu, learning rate lr and weight decay wd:

        M_t = mu M_{t-1} + (1 - mu) G_t                  momentum, an EMA (torch: buf.lerp_(G, 1 - mu))
        U_t = (1 - mu) G_t + mu M_t   (Nesterov)  or  M_t
        O_t = NS5(U_t) ~ U V^T   where U_t = U S V^T   (Newton-Schulz, below)
        W  <- W (1 - lr wd) - lr s(m, n) O_t             decoupled weight decay uses the plain lr

    s(m, n) = sqrt(max(1, m/n)) ("original", Keller Jordan) or 0.2 sqrt(max(m, n)) ("match_rms_adamw",
    Moonlight arXiv 2502.16982: the update then has RMS 0.2, like AdamW's, so AdamW's lr and wd carry over;
    GLM-4.5/GLM-5 use it). NS5 normalises X = U / max(||U||_F, eps), so every singular value is <= 1, then
    runs five steps of the quintic (a, b, c) = (3.4445, -4.7750, 2.0315), which pushes every singular value
    towards 1 (into [0.68, 1.14] for sigma/||U||_F >= 0.008; never above 1.2024):

        A = X X^T,   X <- a X + (b A + c A^2) X

Muon Split (GLM-5 section 2.1)
    MLA's up-projections stack all heads in one matrix: q_b_proj rows [q_nope_h; q_rope_h] and kv_b_proj
    rows [k_nope_h; v_h], heads outermost. Plain Muon orthogonalizes the whole matrix, which ties the heads'
    update scales together; Muon Split orthogonalizes each head's row block on its own and reassembles the
    updates in the original row layout, so each head updates at its own scale. Here a parameter may carry
    row blocks [(start, stop), ...] that tile its rows; a parameter without blocks is plain Muon (one block).
    Modules declare their blocks with a method ``muon_blocks() -> {local parameter name: blocks}``; for MLA
    ``MLA.muon_blocks`` (mla.py) gives the per-head blocks of q_b_proj and kv_b_proj. ``build_optimizer``
    (training/optim.py: Muon for the hidden matrices, AdamW for the rest) collects them, never from names alone.
    Momentum buffers (``state``) and blocks (param groups) travel in state_dict(): resuming is exact.

Choices where the papers are silent
    * The scale s uses the block's own shape (``split_scale="block"``); "matrix" uses the whole parameter's.
    * kv_b_proj: K and V of a head are separate blocks (the paper names W^UK and W^UV separately;
      ``split_kv=False`` makes one block per head). q_b_proj: one block per head holding its nope AND rope
      rows (``split_q_rope=True`` separates them).
    * Blocks and parameters of equal shape share one batched Newton-Schulz call; a lone matrix takes the 2-D
      path (bit-identical to torch.optim.Muon in bf16). A batched matmul may round differently from a single
      one, so a result can depend, in the last bits, on how many matrices share its shape, never on their values.
    * A non-finite gradient raises ValueError before any parameter or momentum changes (catch it to skip).

Matched to torch.optim.Muon (torch 2.13), which the tests use as the oracle: the argument names, meaning and
defaults (lr 1e-3, wd 0.1, mu 0.95, Nesterov, eps 1e-7, 5 steps, adjust_lr_fn None = "original"; GLM uses
"match_rms_adamw"), the EMA momentum, transposing TALL inputs (rows > cols) so the Gram matrix X X^T is the
small one, normalising by max(||X||_F, eps) rather than ||X||_F + eps. Differences: ``ns_dtype`` (torch
always uses bf16; the default here is fp32 on CPU and bf16 on CUDA), lr must be > 0 when a group is added
(a scheduler may still set it to 0 later), and ``blocks``/``split_scale``.

Not handled: non-2-D parameters (keep experts as 2-D parameters), distributed Muon (see glm5_ref/distributed/muon.py), complex or sparse grads.

References: Keller Jordan, "Muon: an optimizer for hidden layers in neural networks" (2024, blog and
github.com/KellerJordan/Muon); Liu et al., "Muon is Scalable for LLM Training" (Moonlight, arXiv 2502.16982);
GLM-4.5 report (arXiv 2508.06471); GLM-5 report (arXiv 2602.15763) section 2.1; torch.optim.Muon.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from glm5_ref.layers import triton_usable

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
Blocks = list[tuple[int, int]]


# ---------------------------------------------------------------------------------------------------------
# Newton-Schulz
def check_newton_schulz_args(G, steps, coefficients, dtype: torch.dtype | None) -> torch.dtype:
    """Validate newton_schulz's arguments (here and in glm5_kernels.newton_schulz); returns the compute dtype
    (default: bf16 on CUDA, fp32 elsewhere)."""
    if not isinstance(G, torch.Tensor) or G.dim() < 2:
        raise ValueError(f"newton_schulz G: expected a matrix or a batch of matrices, got "
                         f"{tuple(G.shape) if isinstance(G, torch.Tensor) else type(G).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"newton_schulz steps: expected a non-negative integer, got {steps!r}")
    if len(coefficients) != 3:
        raise ValueError(f"newton_schulz coefficients: expected (a, b, c), got {coefficients!r}")
    return dtype if dtype is not None else (torch.bfloat16 if G.is_cuda else torch.float32)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS, use_triton: bool = False) -> torch.Tensor:
    """Approximately orthogonalize G (..., m, n) -> U V^T, computed in ``dtype``; returns G's shape and dtype.
    ``use_triton``: run the steps in glm5_kernels.newton_schulz (one-triangle X X^T) where it can run."""
    dtype = check_newton_schulz_args(G, steps, coefficients, dtype)
    if use_triton and triton_usable(G, G.new_empty(0, dtype=dtype)):
        from glm5_kernels.newton_schulz import newton_schulz as newton_schulz_triton  # lazy: no triton at module level
        return newton_schulz_triton(G, steps, eps, dtype, coefficients)
    a, b, c = coefficients
    m, n = G.shape[-2:]
    X = G.to(dtype) if G.dim() == 2 else G.to(dtype).reshape(-1, m, n)  # (m, n) or (N, m, n)
    addmm = torch.addmm if X.dim() == 2 else torch.baddbmm  # addmm for one matrix: torch.optim.Muon's ops
    if m > n:  # tall: work on the transpose so that the Gram matrix is the small one (as torch.optim.Muon)
        X = X.mT  # (.., n, m)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # every singular value now <= 1
    for _ in range(steps):
        A = X @ X.mT  # (.., s, s), s = min(m, n)
        B = addmm(A, A, A, beta=b, alpha=c)  # b A + c A A
        X = addmm(X, B, X, beta=a)  # a X + B X
    if m > n:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


def _orthogonalize_all(mats: list[torch.Tensor], **ns) -> list[torch.Tensor]:
    """newton_schulz of every matrix; matrices of equal shape go through one batched call."""
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, M in enumerate(mats):
        by_shape[(tuple(M.shape), M.dtype, M.device)].append(i)
    out: list[torch.Tensor] = [None] * len(mats)  # type: ignore[list-item]
    for idx in by_shape.values():  # one matrix alone takes the 2-D path; O is (N, m, n) or [(m, n)]
        O = newton_schulz(torch.stack([mats[i] for i in idx]), **ns) if idx[1:] else [newton_schulz(mats[idx[0]], **ns)]
        for k, i in enumerate(idx):
            out[i] = O[k]
    return out


def scale_factor(shape: tuple[int, int], adjust_lr_fn: str | None) -> float:
    """s(m, n): the update multiplier of torch.optim.Muon's adjust_lr_fn."""
    m, n = shape
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, m / n))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    raise ValueError(f"adjust_lr_fn: expected None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")


# ---------------------------------------------------------------------------------------------------------
# row blocks
def check_blocks(blocks, rows: int, what: str = "blocks") -> Blocks:
    """Validate that blocks [(start, stop), ...] tile range(rows) in order; return them as tuples."""
    try:
        out = [(int(s), int(e)) for s, e in blocks]
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a list of (start, stop) pairs, got {blocks!r}") from None
    pos = 0
    for s, e in out:
        if s != pos or e <= s:
            raise ValueError(f"{what}: expected non-empty blocks tiling rows 0..{rows} in order, "
                             f"got {(s, e)} where a block starting at {pos} was due (blocks {out})")
        pos = e
    if pos != rows:
        raise ValueError(f"{what}: blocks end at row {pos}, expected them to cover all {rows} rows")
    return out


def _positive_ints(fn: str, **values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn} {name}: expected a positive integer, got {v!r}")


def head_blocks(rows_per_head: int, n_heads: int) -> Blocks:
    """One block of rows_per_head rows per head: [(0, r), (r, 2r), ...]."""
    _positive_ints("head_blocks", rows_per_head=rows_per_head, n_heads=n_heads)
    return [(h * rows_per_head, (h + 1) * rows_per_head) for h in range(n_heads)]


def kv_head_blocks(n_heads: int, k_rows: int, v_rows: int, split_kv: bool = True) -> Blocks:
    """Blocks of a matrix whose rows are [k_0; v_0; k_1; v_1; ...] (kv_b_proj: k_nope then v per head)."""
    _positive_ints("kv_head_blocks", n_heads=n_heads, k_rows=k_rows, v_rows=v_rows)
    if not split_kv:
        return head_blocks(k_rows + v_rows, n_heads)
    per = k_rows + v_rows
    return [blk for h in range(n_heads) for blk in ((h * per, h * per + k_rows), (h * per + k_rows, (h + 1) * per))]


def split_rows(W: torch.Tensor, blocks) -> list[torch.Tensor]:
    """The row blocks of W (views, no copy)."""
    return [W[s:e] for s, e in check_blocks(blocks, W.shape[0], "split_rows blocks")]


def merge_rows(parts: list[torch.Tensor], blocks, shape) -> torch.Tensor:
    """Inverse of split_rows: place each part at its rows of a new tensor of ``shape``."""
    blocks = check_blocks(blocks, shape[0], "merge_rows blocks")
    if len(parts) != len(blocks):
        raise ValueError(f"merge_rows parts: expected {len(blocks)} parts (one per block), got {len(parts)}")
    out = parts[0].new_empty(shape)
    for i, ((s, e), part) in enumerate(zip(blocks, parts)):
        if tuple(part.shape) != (e - s, *shape[1:]):
            raise ValueError(f"merge_rows parts[{i}]: expected shape {(e - s, *shape[1:])}, got {tuple(part.shape)}")
        out[s:e] = part
    return out


def muon_update(U: torch.Tensor, blocks=None, adjust_lr_fn: str | None = None, split_scale: str = "block",
                **ns) -> torch.Tensor:
    """The scaled direction s * NS5(U) of one (m, n) matrix, block by block (``ns``: newton_schulz kwargs)."""
    blocks = check_blocks(blocks or [(0, U.shape[0])], U.shape[0])
    parts = _orthogonalize_all(split_rows(U, blocks), **ns)
    scaled = [O * scale_factor(O.shape if split_scale == "block" else U.shape, adjust_lr_fn) for O in parts]
    return merge_rows(scaled, blocks, U.shape)


# ---------------------------------------------------------------------------------------------------------
# the optimizer
def closure_loss(closure) -> torch.Tensor | None:
    """The optimizer-step convention: re-evaluate the loss with gradients on, when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _check_finite(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError naming the first parameter whose gradient is not finite (one device sync)."""
    items = [(g, i, p) for g in optimizer.param_groups for i, p in enumerate(g["params"]) if p.grad is not None]
    if items and not torch.stack([torch.isfinite(p.grad).all() for _, _, p in items]).all():
        g, i, p = next(item for item in items if not torch.isfinite(item[2].grad).all())
        name = g["param_names"][i] if "param_names" in g else f"params[{i}]"
        raise ValueError(f"{type(optimizer).__name__}.step: gradient of {name} (shape {tuple(p.shape)}) has "
                         "non-finite values; nothing was updated (skip this batch or lower the lr)")


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (module docstring). Muon Split: a param group may hold ``"blocks"``, a list
    parallel to ``"params"`` of None (plain Muon) or row blocks [(start, stop), ...]."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 ns_dtype: torch.dtype | None = None, split_scale: str = "block", use_triton: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, split_scale=split_scale, blocks=None,
                        use_triton=use_triton)  # use_triton: NS5 in glm5_kernels.newton_schulz where it can run
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._validate(self.param_groups[-1])
        except (ValueError, TypeError):
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    @staticmethod
    def _validate(g: dict) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"Muon {name} = {g[name]!r}: expected {expected}")

        for name, low, strict in (("lr", 0.0, True), ("weight_decay", 0.0, False), ("eps", 0.0, True)):
            v = g[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < low or (strict and v == low):
                raise bad(name, f"a finite number {'>' if strict else '>='} {low}")
        if not (isinstance(g["momentum"], (int, float)) and 0.0 <= g["momentum"] < 1.0):
            raise bad("momentum", "a number in [0, 1)")
        if isinstance(g["ns_steps"], bool) or not isinstance(g["ns_steps"], int) or not 0 <= g["ns_steps"] < 100:
            raise bad("ns_steps", "an integer in [0, 100)")
        if len(g["ns_coefficients"]) != 3:
            raise bad("ns_coefficients", "three numbers (a, b, c)")
        if g["adjust_lr_fn"] not in (None, "original", "match_rms_adamw"):
            raise bad("adjust_lr_fn", "None, 'original' or 'match_rms_adamw'")
        if g["split_scale"] not in ("block", "matrix"):
            raise bad("split_scale", "'block' or 'matrix'")
        dt = g["ns_dtype"]
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise bad("ns_dtype", "None or a floating torch.dtype")
        names = g.get("param_names") or [f"params[{i}]" for i in range(len(g["params"]))]
        for p, name in zip(g["params"], names):
            if p.dim() != 2:
                raise ValueError(f"Muon params: {name} has shape {tuple(p.shape)}, expected a 2-D matrix "
                                 "(give embeddings, norms, biases and other non-matrices to AdamW)")
            if p.is_complex():
                raise TypeError(f"Muon params: {name} is complex, which Muon does not support")
        if g["blocks"] is not None:
            if len(g["blocks"]) != len(g["params"]):
                raise ValueError(f"Muon blocks: expected one entry (None or a block list) per parameter, "
                                 f"{len(g['params'])} in all, got {len(g['blocks'])}")
            g["blocks"] = [None if b is None else check_blocks(b, p.shape[0], f"Muon blocks of {name}")
                           for b, p, name in zip(g["blocks"], g["params"], names)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        _check_finite(self)
        for g in self.param_groups:
            lr, mu = g["lr"], g["momentum"]
            items = []  # (param, start, stop, matrix to orthogonalize)
            for i, p in enumerate(g["params"]):
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # M = mu M + (1 - mu) G
                U = p.grad.lerp(buf, mu) if g["nesterov"] else buf  # (1 - mu) G + mu M
                blocks = (g["blocks"] or [None] * len(g["params"]))[i] or [(0, p.shape[0])]
                items += [(p, s, e, U[s:e]) for s, e in blocks]
            outs = _orthogonalize_all([M for *_, M in items], steps=g["ns_steps"], eps=g["eps"],
                                      dtype=g["ns_dtype"], coefficients=g["ns_coefficients"],
                                      use_triton=g.get("use_triton", False))
            for p in {id(p): p for p, *_ in items}.values():
                p.mul_(1 - lr * g["weight_decay"])  # decoupled weight decay, plain lr (as torch)
            for (p, s, e, _), O in zip(items, outs):
                shape = (e - s, p.shape[1]) if g["split_scale"] == "block" else p.shape
                p[s:e].add_(O, alpha=-lr * scale_factor(shape, g["adjust_lr_fn"]))
        return loss
