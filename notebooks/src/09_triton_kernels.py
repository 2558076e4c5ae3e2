# %% [markdown]
# # 09 · Triton kernels: sparse MLA, step by step from its PyTorch twin
#
# **Prerequisites:** notebook 00a (SwiGLU), notebook 01 (MLA: the latent cache, absorption), notebook 02 (DSA: the lightning indexer
# and its top-k selection), notebook 03 (MoE: routed experts, the grouped expert GEMM), notebook 05 (MTP: several
# query tokens per decode step), notebook 07 (Muon's Newton-Schulz iteration). Online softmax, the log-sum-exp
# (lse), split-K, tiles and the roofline are defined here. **Reading time:** about 30 minutes (it runs in about 10 s under make test, 2 cores).
#
# Notebooks 01 and 02 showed **what** GLM-5's attention computes: MLA caches one 576-wide row per token
# (a 512-wide latent plus a 64-wide RoPE key), and DSA's lightning indexer picks the top-k = 2048 of those rows
# for every query (Table 10 of the paper: `index_topk` 2048). This notebook shows **how** that is made fast. We derive the sparse MLA forward kernel in
# Triton from its PyTorch twin, `MLA.attend_gathered`, one step at a time:
#
# 1. the twin (the PyTorch function the kernel must reproduce), and the one query-token slice of it that a
#    kernel program computes;
# 2. the same slice with an **online softmax** over blocks of selected keys (FlashAttention's trick), in plain
#    PyTorch;
# 3. the Triton kernel: the loop of step 2, with gathers by index and `tl.dot`, run in Triton's **CPU
#    interpreter**, checked against the twin and against `glm5_kernels.sparse_mla`;
# 4. the roofline: when MLA **decode** is memory-bound and when compute-bound, at GLM-5's 64 heads and at other
#    head counts, and where the crossover lies on an H100 and an H200 (datasheet numbers);
# 5. the other kernels in `kernels/` and what has been measured.
#
# Triton is a Python language for GPU kernels: a kernel is written for one **program instance** (one block of
# the output), and a **grid** of such instances runs in parallel. No GPU was used here: without CUDA, every
# kernel runs in Triton's CPU interpreter (`TRITON_INTERPRET=1`, in fp32), which executes each program instance
# with numpy, one at a time. That checks correctness, never speed. **GPU timings: not yet measured.**
#
# Cells that start with `# derivation` use only `torch` and `triton`; every other cell imports from `glm5_ref`
# or `kernels`.

# %%
import dataclasses
import math
import os
import time

import torch

if not torch.cuda.is_available():  # before any Triton kernel is defined: run them in the CPU interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import triton
import triton.language as tl
from IPython.display import Markdown, display

from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_kernels.sparse_mla import absorbed_sparse_attention, flops_bytes, sparse_mla_fwd

t_notebook, cpu_notebook = time.perf_counter(), time.process_time()
torch.manual_seed(0)
torch.set_num_threads(1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
print("Triton", triton.__version__, "| interpreter:", os.environ.get("TRITON_INTERPRET") == "1", "| device:", DEVICE)
checks = {}  # name -> (error, tolerance): derivation vs package, asserted at the end


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# %% [markdown]
# ## 1. The twin, and one program's share of it
#
# In the absorbed form (notebook 01) every head's query is folded into the latent space:
# $\tilde q_{t,h} = [\,(W^{UK}_h)^\top q^C_{t,h}\,;\ q^R_{t,h}\,]$ is 576 wide, and so is each cached row
# $r_s = [\,c^{KV}_s\,;\ k^R_s\,]$. With $S_t$ the indexer's selection for query $t$ (-1 marks padding):
#
# $$o_{t,h} = \sum_{s \in S_t} \mathrm{softmax}_{s}\big(\tau\, \tilde q_{t,h} \cdot r_s\big)\; c^{KV}_s
#   \qquad (512\text{ wide}),\qquad u_{t,h} = W^{UV}_h\, o_{t,h}.$$
#
# All heads of a token share the **same** selected rows (one latent per token: MQA form). That is the fact the
# kernel exploits: gather a row once, use it for every head. We build a small DSA layer (3 heads, a 24-wide
# latent and 4 RoPE dims, so 28-wide rows), a cache of 40 tokens and 6 queries at its end, each with 11
# selected keys in random order; one query gets only padding.

# %%
cfg = dataclasses.replace(GLM5Config.tiny(), num_attention_heads=3, kv_lora_rank=24, qk_nope_head_dim=8, v_head_dim=8)
attn = DSAAttention(cfg).eval()
H, N, P, C = attn.num_heads, attn.nope_dim, attn.rope_dim, attn.kv_lora_rank
B, T, S, K = 1, 6, 40, 11
q_nope, q_rope = torch.randn(B, T, H, N), torch.randn(B, T, H, P)
latent, k_rope = torch.randn(B, S, C), torch.randn(B, S, P)
query_pos = torch.arange(S - T, S)
idx = torch.stack([torch.randperm(int(p) + 1)[:K] for p in query_pos])[None]  # (1, T, K)
idx[0, 2] = -1  # a query whose selection is empty: the twin returns zeros
with torch.no_grad():
    u_twin, _ = attn.attend_gathered(q_nope, q_rope, latent, k_rope, query_pos, idx)  # (B, T, H, V)
    w_uk, w_uv = attn.absorbed_weights()
    q_abs = torch.cat([torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_rope], -1)  # (B, T, H, C + P)
    rows = torch.cat([latent, k_rope], -1)  # (B, S, C + P): the cache in FlashMLA's layout
print("twin output", tuple(u_twin.shape), "| absorbed queries", tuple(q_abs.shape), "| cache rows", tuple(rows.shape))

# %% [markdown]
# A kernel program will own one query token and all its heads. Here is that slice in plain PyTorch: gather the
# token's K rows, score them for every head, softmax over the valid ones, sum the latents, apply $W^{UV}$.

# %%
# derivation
def one_token(q_t, rows_b, idx_t, scale, C):
    """q_t (H, D), rows_b (S, D), idx_t (K,) -> o_t (H, C): the sparse attention of one query token."""
    valid = idx_t >= 0
    r = rows_b[idx_t.clamp_min(0)]  # (K, D): one gather, shared by all heads
    s = (q_t @ r.T) * scale  # (H, K)
    s = s.masked_fill(~valid, float("-inf"))
    if not valid.any():
        return torch.zeros(q_t.shape[0], C)
    return torch.softmax(s, -1) @ r[:, :C]  # (H, C): the values are the latent part of the same rows


o_slices = torch.stack([one_token(q_abs[0, t], rows[0], idx[0, t], attn.scale, C) for t in range(T)])[None]
u_slices = torch.einsum("bthc,hvc->bthv", o_slices, w_uv)
checks["per-token slices == attend_gathered"] = (rel(u_slices, u_twin), 1e-5)
print(f"per-token slices vs twin: rel err {checks['per-token slices == attend_gathered'][0]:.1e}")

# %% [markdown]
# ## 2. Online softmax over blocks of selected keys
#
# A GPU program cannot hold 2048 selected rows of 576 values at once, so it walks them in blocks of
# `BLOCK_K`. The softmax needs the maximum and the sum over **all** of them, which FlashAttention computes on
# the fly: keep a running max $m$, a running sum $\ell$ and an unnormalised output $a$; for each block with
# scores $s_j$,
#
# $$m' = \max(m, \max_j s_j),\quad \alpha = e^{m - m'},\quad \ell' = \alpha \ell + \sum_j e^{s_j - m'},\quad
#   a' = \alpha a + \sum_j e^{s_j - m'}\, c_j,$$
#
# and at the end $o = a / \ell$. Padding scores $-\infty$ and contributes $e^{-\infty} = 0$. Starting $m$ at a
# large *finite* negative number means a block of only padding never computes $-\infty - (-\infty)$, and a
# query with nothing selected ends with $\ell = 0$, which we turn into a zero output (as the twin does). The
# kernel works in base 2 ($2^{x \log_2 e} = e^x$: `exp2` is the fast instruction), which changes nothing else.

# %%
# derivation
def one_token_online(q_t, rows_b, idx_t, scale, C, block_k=4):
    H = q_t.shape[0]
    m = torch.full((H,), -1e30)
    l = torch.zeros(H)
    a = torch.zeros(H, C)
    for k0 in range(0, idx_t.numel(), block_k):
        ids = idx_t[k0:k0 + block_k]
        ok = ids >= 0
        r = rows_b[ids.clamp_min(0)] * ok[:, None]  # (BLOCK_K, D), padding rows zeroed
        s = ((q_t @ r.T) * scale).masked_fill(~ok, float("-inf"))  # (H, BLOCK_K)
        m_new = torch.maximum(m, s.max(-1).values)
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[:, None])
        l = alpha * l + p.sum(-1)
        a = alpha[:, None] * a + p @ r[:, :C]
        m = m_new
    return torch.where(l[:, None] > 0, a / l.clamp_min(1e-30)[:, None], 0.0)


o_online = torch.stack([one_token_online(q_abs[0, t], rows[0], idx[0, t], attn.scale, C) for t in range(T)])[None]
checks["online softmax == one-pass slices"] = (rel(o_online, o_slices), 1e-5)
print(f"online softmax vs one pass: rel err {checks['online softmax == one-pass slices'][0]:.1e}")

# %% [markdown]
# ## 3. The Triton kernel
#
# Now the loop of step 2 becomes a Triton program. The grid is (head blocks, tokens): program $(i, t)$ owns
# `BLOCK_H` heads of token $t$. Inside, everything is a tile:
#
# * the queries: a `(BLOCK_H, C)` tile and a `(BLOCK_H, P)` tile (the latent and RoPE parts; GLM-5's 576 is not a
#   power of two, so the two parts are separate tiles of 512 and 64, both powers of two);
# * each step loads `BLOCK_K` indices, turns them into row pointers (`kv + idx * row_stride`) and **gathers**
#   a `(BLOCK_K, C)` and a `(BLOCK_K, P)` tile with a mask (padding and the ragged tail load zeros);
# * scores are two `tl.dot`s, $Q_C R_C^\top + Q_P R_P^\top$; the value product is a third `tl.dot` of the
#   probabilities with the **same** gathered latent tile.
#
# Tile sizes are powers of two, so sizes that are not (our 24-wide latent, 11 keys) are padded and masked.
# In the interpreter we keep to fp32: it computes bf16 wrongly without an error (Triton issues #11584 and #11604).

# %%
# derivation
@triton.jit
def sparse_mla_kernel(q_ptr, kv_ptr, idx_ptr, o_ptr, T, H, K, C, P, qk_scale,
                      BLOCK_H: tl.constexpr, CP: tl.constexpr, PP: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_h, t = tl.program_id(0), tl.program_id(1)  # batch 1 here; the package adds a batch axis and splits
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    c, p = tl.arange(0, CP), tl.arange(0, PP)
    q_row = q_ptr + (t * H + h[:, None]) * (C + P)
    q_c = tl.load(q_row + c[None, :], mask=(h[:, None] < H) & (c[None, :] < C), other=0.0)  # (BLOCK_H, CP)
    q_r = tl.load(q_row + C + p[None, :], mask=(h[:, None] < H) & (p[None, :] < P), other=0.0)  # (BLOCK_H, PP)
    m = tl.full((BLOCK_H,), -1.0e30, tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, CP), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_ptr + t * K + kk, mask=kk < K, other=-1)  # (BLOCK_K,)
        ok = ids >= 0
        row = kv_ptr + tl.where(ok, ids, 0)[:, None] * (C + P)  # gather: one pointer per selected row
        lat = tl.load(row + c[None, :], mask=ok[:, None] & (c[None, :] < C), other=0.0)  # (BLOCK_K, CP)
        rope = tl.load(row + C + p[None, :], mask=ok[:, None] & (p[None, :] < P), other=0.0)  # (BLOCK_K, PP)
        s = tl.dot(q_c, tl.trans(lat), input_precision="ieee")
        s = tl.dot(q_r, tl.trans(rope), acc=s, input_precision="ieee") * qk_scale  # (BLOCK_H, BLOCK_K), base 2
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(pr, axis=1)
        acc = tl.dot(pr, lat, acc=acc * alpha[:, None], input_precision="ieee")  # values = the latents
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(o_ptr + (t * H + h[:, None]) * C + c[None, :], out, mask=(h[:, None] < H) & (c[None, :] < C))


def run_derived(q, kv, ids, scale, C, block_h=16, block_k=16):
    _, T_, H_, D = q.shape
    o = torch.full((1, T_, H_, C), float("nan"))  # NaN: an element the kernel forgets to write shows up
    grid = (triton.cdiv(H_, block_h), T_)
    sparse_mla_kernel[grid](q.contiguous(), kv.contiguous(), ids.to(torch.int32).contiguous(), o, T_, H_,
                            ids.shape[-1], C, D - C, scale * math.log2(math.e), BLOCK_H=block_h,
                            CP=triton.next_power_of_2(C), PP=max(16, triton.next_power_of_2(D - C)), BLOCK_K=block_k)
    return o


t0 = time.perf_counter()
o_kernel = run_derived(q_abs, rows, idx, attn.scale, C)
t_interp = time.perf_counter() - t0
u_kernel = torch.einsum("bthc,hvc->bthv", o_kernel, w_uv)
checks["derived Triton kernel == attend_gathered"] = (rel(u_kernel, u_twin), 1e-5)
checks["derived Triton kernel == online softmax"] = (rel(o_kernel, o_online), 1e-5)
print(f"derived kernel vs twin: rel err {checks['derived Triton kernel == attend_gathered'][0]:.1e}  "
      f"({T} programs in the interpreter: {t_interp * 1e3:.0f} ms, i.e. not a speed measurement)")

# %% [markdown]
# The package kernel, `glm5_kernels.sparse_mla.sparse_mla_fwd`, is this program plus a batch axis, fp16/bf16
# loads (cast to fp32 in the interpreter), an lse output, and split-K for decode. Two definitions:
#
# * **lse**, the log-sum-exp of one row of scores, $\mathrm{lse} = \log \sum_j e^{s_j}$ (in the loop above,
#   $m + \log \ell$). It is the softmax's normaliser in log form, and it is what lets partial softmax results
#   over different blocks of keys be merged **exactly**: if $o_n$ is the softmax-weighted output over key block
#   $n$ alone and $\mathrm{lse}_n$ that block's log-sum-exp, then with $\mathrm{lse} = \log \sum_n
#   e^{\mathrm{lse}_n}$ the full output is $o = \sum_n e^{\mathrm{lse}_n - \mathrm{lse}}\, o_n$.
# * **split-K**: splitting the key dimension of one query's attention (here its K selected keys) across
#   several program instances, each returning a partial output and its lse, merged at the end by that formula.
#   Decode needs it: with one query token per sequence there are only $B \cdot H / \text{BLOCK\_H}$ programs,
#   too few to fill an H100's 132 SMs (streaming multiprocessors, the GPU's cores); split-K multiplies that by
#   `num_splits`.
#
# First the merge by hand, in plain PyTorch: split each query's 11 selected keys into two blocks, attend to each
# alone, merge with the lse weights.

# %%
# derivation
def one_token_partial(q_t, rows_b, idx_t, scale, C):
    """-> (o (H, C), lse (H,)): softmax attention over the keys idx_t alone; lse = -inf if none is valid."""
    valid = idx_t >= 0
    r = rows_b[idx_t.clamp_min(0)]
    s = ((q_t @ r.T) * scale).masked_fill(~valid, float("-inf"))  # (H, K')
    lse = torch.logsumexp(s, -1)  # (H,)
    if not valid.any():
        return torch.zeros(q_t.shape[0], C), lse
    return torch.exp(s - lse[:, None]) @ r[:, :C], lse


def merge(parts):
    """[(o_n, lse_n)] -> o = sum_n exp(lse_n - lse) o_n, lse = logsumexp_n lse_n (an all-empty query gives 0)."""
    lse = torch.logsumexp(torch.stack([l for _, l in parts]), 0)  # (H,)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    return sum(torch.exp(l - safe)[:, None] * o for o, l in parts)


o_merged = torch.stack([merge([one_token_partial(q_abs[0, t], rows[0], idx[0, t, :6], attn.scale, C),
                               one_token_partial(q_abs[0, t], rows[0], idx[0, t, 6:], attn.scale, C)])
                        for t in range(T)])[None]
checks["split-K merge by hand == one pass"] = (rel(o_merged, o_slices), 1e-5)
print(f"two key blocks merged by their lse vs one pass: rel err {checks['split-K merge by hand == one pass'][0]:.1e}")

# %% [markdown]
# The package does the same with `num_splits` Triton programs per token and `combine_splits` for the merge.
# `absorbed_sparse_attention` wraps the kernel with the $W^{UK}$/$W^{UV}$ einsums; it is what
# `DSAAttention(use_triton=True)` calls on a GPU.

# %%
o_pkg = sparse_mla_fwd(q_abs, rows, idx, attn.scale, d_v=C)
o_split = sparse_mla_fwd(q_abs, rows, idx, attn.scale, d_v=C, num_splits=3, block_k=4)
with torch.no_grad():
    u_pkg = absorbed_sparse_attention(q_nope, q_rope, latent, k_rope, idx, w_uk, w_uv, attn.scale)
checks["derived kernel == glm5_kernels.sparse_mla"] = (rel(o_kernel, o_pkg), 1e-6)
checks["split-K decode == one pass"] = (rel(o_split, o_pkg), 1e-6)
checks["kernels wrapper == attend_gathered"] = (rel(u_pkg, u_twin), 1e-5)
for name in ("derived kernel == glm5_kernels.sparse_mla", "split-K decode == one pass", "kernels wrapper == attend_gathered"):
    print(f"{name:38s} rel err {checks[name][0]:.1e}")

# %% [markdown]
# ## 4. The roofline: memory-bound or compute-bound?
#
# A kernel is **memory-bound** when moving its bytes takes longer than doing its FLOPs, i.e. when its
# arithmetic intensity $I$ = FLOPs / bytes is below the device's ridge point $\pi / \beta$ (peak FLOP/s over
# memory bandwidth). Its attainable speed is $\min(\pi, I \beta)$.
#
# (Bytes here: GB means $10^9$ bytes, TB/s $10^{12}$ bytes per second.) For MLA decode, each cached row (576
# values, 1152 bytes in bf16) is read once per token and used by all
# $h_q$ query heads of every one of the $s_q$ query tokens of that sequence (with MTP, $s_q = 2$ to 4). Per row:
#
# $$\text{FLOPs} = 2\, h_q\, s_q\, (576 + 512), \qquad \text{bytes} = 576 \cdot 2,\qquad
#   I = \frac{2 \cdot 1088}{1152}\, h_q s_q \approx 1.89\, h_q s_q \ \text{FLOP/B}.$$
#
# The ridge points below use **datasheet** numbers (dense bf16 tensor-core peak; HBM bandwidth): H100 SXM
# 989 TFLOP/s and 3.35 TB/s, H200 SXM 989 TFLOP/s and 4.8 TB/s. These are not measurements.

# %%
DATASHEET = {"H100 SXM (datasheet)": (989e12, 3.35e12), "H200 SXM (datasheet)": (989e12, 4.8e12)}
glm5 = GLM5Config.glm5()
HQ = glm5.num_attention_heads  # 64 query heads
D_ROW, D_V = glm5.kv_lora_rank + glm5.qk_rope_head_dim, glm5.kv_lora_rank  # 576-wide rows, 512-wide values
bytes_per_row = D_ROW * 2  # bf16 latent + RoPE key: 1152 B per token per layer
per_row_flops = 2 * (D_ROW + D_V)  # per head and query token: 2 x (576 + 512)
print(f"GLM-5: {HQ} query heads, rows of {D_ROW} values ({bytes_per_row} B in bf16), {per_row_flops} FLOPs per row "
      f"per head and query token -> I = {per_row_flops / bytes_per_row:.2f} h_q s_q FLOP/B")
crossover = {}
for name, (peak, bw) in DATASHEET.items():
    ridge = peak / bw
    crossover[name] = ridge * bytes_per_row / per_row_flops  # h_q * s_q where decode turns compute-bound
    print(f"{name}: ridge {ridge:.0f} FLOP/B -> MLA decode compute-bound from h_q*s_q = {crossover[name]:.0f}")
intensity_of = {}
for hq, sq in [(16, 1), (HQ, 1), (HQ, 2), (128, 1), (128, 2)]:
    I_ = intensity_of[hq, sq] = per_row_flops * hq * sq / bytes_per_row
    print(f"  h_q={hq:3d} s_q={sq}: intensity {I_:5.0f} FLOP/B -> "
          + ", ".join(f"{n.split()[0]} {'compute' if I_ > p / b else 'memory'}-bound" for n, (p, b) in DATASHEET.items()))
h200_bw = DATASHEET["H200 SXM (datasheet)"][1]
print(f"h_q=16, s_q=1 on an H200: at most {intensity_of[16, 1] * h200_bw / 1e12:.0f} TFLOP/s of useful work")
fp8_row = 656  # FlashMLA's FP8 row: 512 FP8 latent values + 64 bf16 RoPE values + 4 fp32 scales = 512 + 128 + 16 B
print(f"FP8 cache: {fp8_row} B per row, {bytes_per_row / fp8_row:.2f}x fewer bytes -> H200 crossover at h_q*s_q = "
      f"{crossover['H200 SXM (datasheet)'] * fp8_row / bytes_per_row:.0f}")

# the package's own count for sparse prefill (FlashMLA's formula), by how many heads share one gathered row
prefill = {}
for h, bh in ((128, 128), (128, 16), (HQ, HQ), (HQ, 16)):
    f, by = prefill[h, bh] = flops_bytes(1, 4096, h, 2048, block_h=bh)
    print(f"sparse MLA prefill, 4096 queries x 2048 keys x {h:3d} heads, {bh:3d} heads per program: {f / 1e12:.2f} TFLOP, "
          f"{by / 1e9:5.1f} GB from memory if nothing is cached -> {f / by:4.0f} FLOP/B")
f = prefill[128, 128][0]
print(f"at FlashMLA's 640 TFLOP/s (H800) the {f / 1e12:.2f} TFLOP of the 128-head shape take {f / 640e12 * 1e3:.2f} ms")

# %%
hs = torch.logspace(0, 10, 200, base=2)  # h_q * s_q from 1 to 1024
fig, ax = plt.subplots(figsize=(7, 4))
for (name, (peak, bw)), color in zip(DATASHEET.items(), ["tab:blue", "tab:red"]):
    intensity = per_row_flops * hs / bytes_per_row
    ax.plot(hs, torch.minimum(torch.full_like(hs, peak), intensity * bw) / 1e12, color=color, label=name)
    ax.axvline(crossover[name], color=color, ls=":", lw=1)
for hq, sq, label in [(16, 1, "h_q=16"), (HQ, 1, f"GLM-5 h_q={HQ}"), (HQ, 2, f"GLM-5 + MTP {HQ}x2"),
                      (128, 2, "FlashMLA bench 128x2")]:
    ax.axvline(hq * sq, color="gray", ls="--", lw=0.8)
    ax.text(hq * sq * 1.05, 12, label, rotation=90, fontsize=8, color="gray")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("query heads x query tokens per sequence (h_q * s_q)")
ax.set_ylabel("attainable TFLOP/s (bf16)")
ax.set_title("MLA decode roofline, datasheet peaks (dotted: crossover)")
ax.legend(fontsize=8)
fig.tight_layout()
_ = show_figure(fig, "09_mla_decode_roofline.png")

# %% [markdown]
# With 16 heads and one query token the intensity is 30 FLOP/B: at best about 145 TFLOP/s of useful work on an
# H200's 4.8 TB/s, so such a kernel is judged in GB/s. GLM-5 has 64 query heads: one query token gives 121
# FLOP/B, memory-bound on both; with MTP's $s_q = 2$ ($h_q s_q = 128$, 242 FLOP/B) decode passes the H200's
# crossover (109) but not the H100's (156). FlashMLA's benchmark shape (DeepSeek's 128 heads, $s_q = 2$) is
# compute-bound on both. The FP8 cache (656 B per row instead of 1152) lowers the crossover by another 1.76x,
# to 62 on the H200. This is why the paper (section 2.1, "Multi-latent Attention") cut the head count from 96
# to 64 at width 256 ("MLA-256"): decode work per cached byte fell by a third.
#
# Sparse prefill is compute-bound only if a gathered row serves many heads before it is dropped: 216 FLOP/B
# with all 128 heads of FlashMLA's shape in one program (114 at GLM-5's 64), but 30 FLOP/B with 16-head
# programs if every re-read came from HBM (the GPU's main memory). The package kernel uses 16-head programs and
# relies on the L2 cache for the re-reads (the head blocks of a token are neighbouring programs); whether that
# holds is a GPU measurement, not yet made.
#
# ## 5. The other kernels, and what has been measured
#
# `kernels/` (imported as `glm5_kernels`) holds four kernels, each with a PyTorch twin in `glm5_ref`. The table
# gives, for each, GLM-5's own shape (read from `GLM5Config.glm5()`, i.e. Table 10 of the paper) and the shape
# `python -m glm5_kernels.bench` times on a GPU. The benchmark shapes are those of published reference kernels
# (FlashMLA's 128-head sparse MLA, VeOmni's grouped MoE GEMM), so that a timing can be compared with a published
# one; they are **not** GLM-5's shapes.

# %%
g = glm5
bench_shape = {  # what kernels/bench.py times on a GPU (the shapes of published reference kernels)
    "indexer": "4096 queries, 32K keys, 32 heads x 128, k = 2048",
    "sparse_mla": "4096 queries, 32K keys, k = 2048, 128 heads (FlashMLA), 576/512",
    "moe": "32K tokens, d 2048, I 768, E 128, top-8 (VeOmni)",
    "ns": "4096 x 4096, 8192 x 8192",
}
glm5_shape = {
    "indexer": f"{g.index_n_heads} heads x {g.index_head_dim}, k = {g.index_topk}, up to {g.max_position_embeddings:,} keys",
    "sparse_mla": f"k = {g.index_topk}, {g.num_attention_heads} heads, rows {g.kv_lora_rank + g.qk_rope_head_dim}"
                  f" / values {g.kv_lora_rank}",
    "moe": f"d {g.hidden_size}, I {g.moe_intermediate_size}, E {g.n_routed_experts}, top-{g.num_experts_per_tok}",
    "ns": f"experts {g.moe_intermediate_size} x {g.hidden_size}; Muon Split head blocks {g.qk_head_dim} x {g.q_lora_rank}",
}
kernel_rows = [
    ("`indexer.indexer_topk`", "fused $q \\cdot k$, ReLU, weighted head sum, causal top-k (bitonic merge)",
     "`Indexer.scores` + `select_topk`", "indexer"),
    ("`sparse_mla.sparse_mla_fwd`", "this notebook's kernel (+ batch, split-K decode)", "`MLA.attend_gathered`",
     "sparse_mla"),
    ("`moe_gemm.moe_experts`", "grouped GEMM over expert segments, SwiGLU epilogue", "`MoE` (grouped / loop)", "moe"),
    ("`newton_schulz.xxt` / `ns5_step`", "$XX^\\top$ on one triangle of tiles; NS5 step", "`muon.newton_schulz`", "ns"),
]
table = ["| kernel | what | twin in `glm5_ref` | GLM-5's shape | benchmark shape (GPU) | GPU time |", "|---" * 6 + "|"]
table += [f"| {k} | {w} | {t} | {glm5_shape[key]} | {bench_shape[key]} | not yet measured |" for k, w, t, key in kernel_rows]
display(Markdown("\n".join(table)))
assert (g.num_attention_heads, g.hidden_size, g.moe_intermediate_size, g.n_routed_experts) == (64, 6144, 2048, 256)

# %% [markdown]
# `python -m glm5_kernels.bench` times them on a GPU (TFLOP/s, GB/s, fraction of the measured ceilings, ratio to
# the twin and to `torch.compile` of it); on a CPU it runs the correctness checks below and says that timings
# need a GPU.

# %%
from glm5_kernels.bench import correctness_checks  # noqa: E402

t0 = time.perf_counter()
rows_ok = correctness_checks(DEVICE, dtypes=[torch.float32])
print(f"{'kernel':30s} {'shape':26s} {'rel err':>9s}  ok   (Triton interpreter, fp32; {time.perf_counter() - t0:.0f} s)")
for r in rows_ok:
    print(f"{r['kernel']:30s} {r['shape']:26s} {r['rel_err']:9.1e}  {r['ok']}")
checks["kernels.bench correctness rows"] = (sum(not r["ok"] for r in rows_ok), 0.5)

# %% [markdown]
# ## Summary
#
# - Sparse MLA is the twin's per-token slice with an online softmax over blocks of selected rows: gather each
#   row once (all heads share it), two `tl.dot`s for the 512 + 64 score, a third for the values, which are the
#   same latents. Padding is a masked load and a $-\infty$ score; an empty selection gives zeros.
# - The lse of each partial result is what makes split-K exact: partial outputs over disjoint key blocks merge
#   with weights $e^{\mathrm{lse}_n - \mathrm{lse}}$.
# - Decode reads 1152 bytes per selected row and does $2 \cdot 1088$ FLOPs per head and query token with it:
#   memory-bound below $h_q s_q \approx 109$ on an H200 (datasheet), compute-bound above; GLM-5's 64 heads cross
#   it only with two query tokens per step (MTP) or an FP8 cache.
# - Everything here ran in Triton's CPU interpreter and checks correctness only. GPU timings: not yet measured.
#
# The check: every derivation above equals the package (`glm5_ref`'s twin and the `glm5_kernels` kernels), and
# the roofline numbers the prose states are the ones computed.

# %%
# check: derivation == glm5_ref / glm5_kernels, and the roofline numbers of the prose
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
assert round(crossover["H200 SXM (datasheet)"]) == 109 and round(crossover["H100 SXM (datasheet)"]) == 156
assert round(intensity_of[16, 1]) == 30 and round(intensity_of[HQ, 1]) == 121 and round(intensity_of[HQ, 2]) == 242
assert intensity_of[HQ, 2] > 989e12 / 4.8e12 > intensity_of[HQ, 1]  # GLM-5 + MTP compute-bound on an H200
assert [round(f / by) for f, by in (prefill[128, 128], prefill[HQ, HQ], prefill[HQ, 16])] == [216, 114, 30]
print(f"derivation == glm5_ref / kernels ({len(checks)} checks); roofline numbers as stated; "
      f"notebook ran in {time.perf_counter() - t_notebook:.0f} s "
      f"(wall clock; {time.process_time() - cpu_notebook:.0f} s of CPU in this process)")

# %% [markdown]
# ## Exercises
#
# 1. FlashMLA stores the cache in FP8: 656 bytes per row instead of 1152. Predict the value of $h_q s_q$ at which
#    MLA decode turns compute-bound on an H200 (datasheet numbers), and whether GLM-5 with one query token per
#    step is then memory- or compute-bound. Check with the section 4 formula.
# 2. The online softmax must not depend on the block size. Predict what `one_token_online` returns with
#    `block_k` = 1, 3 and 11 (one block) compared with the one-pass slice, then check.
# 3. Split each query's 11 selected keys into **three** blocks (4, 4, 3) instead of two, merge them by their lse
#    with `merge`, and check the result against `sparse_mla_fwd(..., num_splits=3)`. What weight does a block of
#    padding only get, and why?

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
peak, bw = DATASHEET["H200 SXM (datasheet)"]
crossover_fp8 = (peak / bw) * 656 / per_row_flops  # h_q * s_q where FP8 decode turns compute-bound
print(f"FP8 cache: compute-bound from h_q*s_q = {crossover_fp8:.0f}; GLM-5 with one token: h_q*s_q = {HQ}")
assert 60 < crossover_fp8 < 64 and HQ > crossover_fp8  # one token per step is now (just) compute-bound

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
for bk in (1, 3, 11):
    o_bk = torch.stack([one_token_online(q_abs[0, t], rows[0], idx[0, t], attn.scale, C, block_k=bk)
                        for t in range(T)])[None]
    print(f"block_k = {bk:2d}: rel err vs one pass {rel(o_bk, o_slices):.1e}")
    assert rel(o_bk, o_slices) < 1e-5  # the same result up to fp32 rounding

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
o3 = torch.stack([merge([one_token_partial(q_abs[0, t], rows[0], idx[0, t, a:b], attn.scale, C)
                         for a, b in ((0, 4), (4, 8), (8, 11))]) for t in range(T)])[None]
o3_pkg = sparse_mla_fwd(q_abs, rows, idx, attn.scale, d_v=C, num_splits=3, block_k=4)
print(f"three blocks merged by hand vs the package's 3-way split-K: rel err {rel(o3, o3_pkg):.1e}")
assert rel(o3, o3_pkg) < 1e-5
# a block of padding only has lse = log(0) = -inf, so its weight exp(-inf - lse) is exactly 0
_, lse_pad = one_token_partial(q_abs[0, 2], rows[0], idx[0, 2, :4], attn.scale, C)
assert torch.isinf(lse_pad).all() and (lse_pad < 0).all()
