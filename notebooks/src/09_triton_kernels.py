# %% [markdown]
# # 09 · Triton kernels: sparse MLA, step by step from its PyTorch twin
#
# Notebooks 01 and 02 showed **what** GLM-5's attention computes: MLA caches one 576-wide row per token
# (a 512-wide latent plus a 64-wide RoPE key), and DSA's lightning indexer picks the top-k = 2048 of those rows
# for every query. This notebook shows **how** that is made fast. We derive the sparse MLA forward kernel in
# Triton from its PyTorch twin, `MLA.attend_gathered`, one step at a time:
#
# 1. the twin, and the one query-token slice of it that a kernel program computes;
# 2. the same slice with an **online softmax** over blocks of selected keys (FlashAttention's trick), in plain
#    PyTorch;
# 3. the Triton kernel: the loop of step 2, with gathers by index and `tl.dot`, run in Triton's **CPU
#    interpreter**, checked against the twin and against `glm5_kernels.sparse_mla`;
# 4. the roofline: why MLA **decode** is memory-bound at a few heads and compute-bound at GLM-5's, and where
#    the crossover lies on an H100 and an H200 (datasheet numbers);
# 5. the other kernels in `kernels/` and what has been measured.
#
# No GPU was used here: every kernel runs in the interpreter (`TRITON_INTERPRET=1`), which executes each program
# instance with numpy, one at a time. That checks correctness, never speed. **GPU timings: not yet measured.**
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
from IPython.display import Image, display

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_kernels.sparse_mla import absorbed_sparse_attention, flops_bytes, sparse_mla_fwd

t_notebook = time.perf_counter()
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
# loads (cast to fp32 in the interpreter), the log-sum-exp output, and a **split over K** for decode: with one
# query token per sequence there are only $B \cdot H / \text{BLOCK\_H}$ programs, too few to fill 132 SMs, so
# each token's K indices are divided among `num_splits` programs, each writes a partial output and its
# log-sum-exp, and a merge weights them by $e^{\mathrm{lse}_n - \mathrm{lse}}$. `absorbed_sparse_attention` wraps
# it with the $W^{UK}$/$W^{UV}$ einsums; it is what `DSAAttention(use_triton=True)` calls on a GPU.

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
# For MLA decode, each cached row (576 values, 1152 bytes in bf16) is read once per token and used by all
# $h_q$ query heads of every one of the $s_q$ query tokens of that sequence (with MTP, $s_q = 2$ to 4). Per row:
#
# $$\text{FLOPs} = 2\, h_q\, s_q\, (576 + 512), \qquad \text{bytes} = 576 \cdot 2,\qquad
#   I = \frac{2 \cdot 1088}{1152}\, h_q s_q \approx 1.89\, h_q s_q \ \text{FLOP/B}.$$
#
# The ridge points below use **datasheet** numbers (dense bf16 tensor-core peak; HBM bandwidth): H100 SXM
# 989 TFLOP/s and 3.35 TB/s, H200 SXM 989 TFLOP/s and 4.8 TB/s. These are not measurements.

# %%
DATASHEET = {"H100 SXM (datasheet)": (989e12, 3.35e12), "H200 SXM (datasheet)": (989e12, 4.8e12)}
bytes_per_row = (512 + 64) * 2  # bf16 latent + RoPE key: 1152 B per token per layer
per_row_flops = 2 * (576 + 512)  # per head and query token
crossover = {}
for name, (peak, bw) in DATASHEET.items():
    ridge = peak / bw
    crossover[name] = ridge * bytes_per_row / per_row_flops  # h_q * s_q where decode turns compute-bound
    print(f"{name}: ridge {ridge:.0f} FLOP/B -> MLA decode compute-bound from h_q*s_q = {crossover[name]:.0f}")
for hq, sq in [(16, 1), (64, 1), (128, 1), (128, 2)]:
    I_ = per_row_flops * hq * sq / bytes_per_row
    print(f"  h_q={hq:3d} s_q={sq}: intensity {I_:5.0f} FLOP/B -> "
          + ", ".join(f"{n.split()[0]} {'compute' if I_ > p / b else 'memory'}-bound" for n, (p, b) in DATASHEET.items()))

# the package's own count for sparse prefill (FlashMLA's formula), by how many heads share one gathered row
for bh in (128, 16):
    f, by = flops_bytes(1, 4096, 128, 2048, block_h=bh)
    print(f"sparse MLA prefill, 4096 queries x 2048 keys x 128 heads, {bh:3d} heads per program: {f / 1e12:.2f} TFLOP, "
          f"{by / 1e9:5.1f} GB from memory if nothing is cached -> {f / by:4.0f} FLOP/B")
print(f"at FlashMLA's 640 TFLOP/s (H800) the {f / 1e12:.2f} TFLOP take {f / 640e12 * 1e3:.2f} ms")

# %%
hs = torch.logspace(0, 10, 200, base=2)  # h_q * s_q from 1 to 1024
fig, ax = plt.subplots(figsize=(7, 4))
for (name, (peak, bw)), color in zip(DATASHEET.items(), ["tab:blue", "tab:red"]):
    intensity = per_row_flops * hs / bytes_per_row
    ax.plot(hs, torch.minimum(torch.full_like(hs, peak), intensity * bw) / 1e12, color=color, label=name)
    ax.axvline(crossover[name], color=color, ls=":", lw=1)
for hq, sq, label in [(16, 1, "h_q=16"), (64, 1, "GLM-5 h_q=64"), (128, 2, "FlashMLA bench 128x2")]:
    ax.axvline(hq * sq, color="gray", ls="--", lw=0.8)
    ax.text(hq * sq * 1.05, 60, label, rotation=90, fontsize=8, color="gray")
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("query heads x query tokens per sequence (h_q * s_q)")
ax.set_ylabel("attainable TFLOP/s (bf16)")
ax.set_title("MLA decode roofline, datasheet peaks (dotted: crossover)")
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs("../figures", exist_ok=True)
fig.savefig("../figures/09_mla_decode_roofline.png", dpi=110)
plt.close(fig)
display(Image("../figures/09_mla_decode_roofline.png"))

# %% [markdown]
# With 16 heads and one query token the intensity is 30 FLOP/B: at best about 145 TFLOP/s of useful work on an
# H200's 4.8 TB/s, so such a kernel is judged in GB/s. GLM-5 has 64 query heads: one query token gives 121
# FLOP/B, memory-bound on both; with MTP's $s_q = 2$ ($h_q s_q = 128$) decode passes the H200's crossover (109)
# but not the H100's (156). FlashMLA's benchmark shape (128 heads, $s_q = 2$) is compute-bound on both. The FP8
# cache (656 B per row instead of 1152) lowers the crossover by another 1.76x.
#
# Sparse prefill is compute-bound only if a gathered row serves many heads before it is dropped: 216 FLOP/B
# with all 128 heads in one program (FlashMLA's layout), but 30 FLOP/B with 16-head programs if every re-read
# came from HBM. The package kernel uses 16-head programs and relies on the L2 cache for the re-reads (the 8
# head blocks of a token are neighbouring programs); whether that holds is a GPU measurement, not yet made.
#
# ## 5. The other kernels, and what has been measured
#
# | kernel (`kernels/`) | what | twin in `glm5_ref` | GLM-5 shape for the GPU goal | GPU time |
# |---|---|---|---|---|
# | `indexer.indexer_topk` | fused $q \cdot k$, ReLU, weighted head sum, causal top-k (bitonic merge) | `Indexer.scores` + `select_topk` | 4096 queries, 32K keys, 32 heads x 128, k = 2048 | not yet measured on a GPU |
# | `sparse_mla.sparse_mla_fwd` | this notebook's kernel (+ batch, split-K decode) | `MLA.attend_gathered` | 4096 queries, 32K keys, k = 2048, 128 heads, 576/512 | not yet measured on a GPU |
# | `moe_gemm.moe_experts` | grouped GEMM over expert segments, SwiGLU epilogue | `MoE` (grouped / loop) | 32K tokens, d 2048, I 768, E 128, top-8 | not yet measured on a GPU |
# | `newton_schulz.xxt` / `ns5_step` | $XX^\top$ on one triangle of tiles; NS5 step | `muon.newton_schulz` | 4096 x 4096, 8192 x 8192 | not yet measured on a GPU |
#
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
# - Decode reads 1152 bytes per selected row and does $2 \cdot 1088$ FLOPs per head and query token with it:
#   memory-bound below $h_q s_q \approx 109$ on an H200 (datasheet), compute-bound above.
# - Everything here ran in Triton's CPU interpreter and checks correctness only. GPU timings: not yet measured.
#
# The last check: the derivations and the package agree.

# %%
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
print(f"derivation == glm5_ref / kernels ({len(checks)} checks); notebook ran in {time.perf_counter() - t_notebook:.0f} s "
      "(2-core shared CPU, 2026-11-29)")
