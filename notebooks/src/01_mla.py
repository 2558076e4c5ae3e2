# %% [markdown]
# # 01 · Multi-head Latent Attention (MLA-256)
#
# **Prerequisites:** notebook 00 (GLM-5's configuration and its cache bytes per token), 00a (RMSNorm and RoPE).
# **Reading time:** about 30 minutes (it runs in about 10 s under make test, 2 cores).
#
# Notebook 00 ended with a number: while it generates, GLM-5 keeps **576 values per token per layer** for
# attention, where plain multi-head attention with the same heads would keep 32,768. This notebook derives
# how, starting from ordinary attention:
#
# 1. multi-head attention and its KV cache, with grouped-query attention (GQA) as the usual fix;
# 2. low-rank joint compression of keys and values into one latent;
# 3. the absorption trick, which attends over the latent without ever expanding it;
# 4. why RoPE breaks absorption, and the decoupled rotary key that repairs it;
# 5. MLA exactly as GLM-5 computes it, checked against `glm5_ref.mla`, and decoding with the latent cache;
# 6. why GLM-5 uses 64 heads of width 256 ("MLA-256") rather than 96 heads of width 192;
# 7. what the cache costs at 200K tokens.
#
# Cells that start with `# derivation` use only `torch` and `einops`; every other cell imports from
# `glm5_ref`. The `# check` cell before the exercises asserts that the derivation and the package agree.

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from einops import rearrange
from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config

torch.manual_seed(0)


def rel(a, b):
    """Relative error ||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


# %% [markdown]
# ## 1. Multi-head attention and its cache
#
# With $H$ heads of width $e$, each token $x_t$ gives every head $i$ a query, a key and a value,
# $q_{t,i} = W^Q_i x_t$, $k_{t,i} = W^K_i x_t$, $v_{t,i} = W^V_i x_t$, and
#
# $$o_{t,i} = \sum_{s \le t} \mathrm{softmax}_s\!\Big(\frac{q_{t,i} \cdot k_{s,i}}{\sqrt{e}}\Big)\, v_{s,i},
# \qquad u_t = W^O [o_{t,1}; \dots; o_{t,H}].$$
#
# When a model generates, token $t$ needs the keys and values of every earlier token. Recomputing them
# each step would cost a full forward over the prefix, so they are **cached**: $2He$ values per token per
# layer. Grouped-query attention shares each key/value head among $H/G$ query heads, which divides the
# cache by $H/G$ (GLM-4.5 used $G = 8$ KV heads of width 128, the "GQA-8" baseline that GLM-5's paper compares
# MLA against in section 2.1). Both fit in a few lines (RoPE is left out here; section 4 adds it).

# %%
# derivation: multi-head and grouped-query attention with a KV cache
def causal_attention(q, k, v, scale):
    """q (H, T, e), k (H, S, e), v (H, S, e_v): the T queries are the last T of the S positions."""
    T, S = q.shape[1], k.shape[1]
    scores = torch.einsum("hte,hse->hts", q, k) * scale  # (H, T, S)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query t sits at position S - T + t
    return torch.einsum("hts,hsv->htv", scores.masked_fill(~causal, float("-inf")).softmax(-1), v)


def gqa(x, Wq, Wk, Wv, Wo, n_heads, n_kv_heads, cache=None):
    """x (T, d). cache: {"k", "v"} of shape (G, S_past, e), or None. Returns (T, d) and the grown cache."""
    q = rearrange(x @ Wq.T, "t (h e) -> h t e", h=n_heads)  # (H, T, e)
    k = rearrange(x @ Wk.T, "t (g e) -> g t e", g=n_kv_heads)  # (G, T, e)
    v = rearrange(x @ Wv.T, "t (g e) -> g t e", g=n_kv_heads)  # (G, T, e)
    if cache is not None:
        k, v = torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1)  # (G, S, e)
    rep = n_heads // n_kv_heads  # query heads per KV head
    o = causal_attention(q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0), q.shape[-1] ** -0.5)
    return rearrange(o, "h t e -> t (h e)") @ Wo.T, {"k": k, "v": v}


def mha(x, Wq, Wk, Wv, Wo, n_heads, cache=None):
    return gqa(x, Wq, Wk, Wv, Wo, n_heads, n_heads, cache)  # MHA is GQA with one KV head per query head


d, H, e, G, T = 64, 8, 8, 2, 12
x = torch.randn(T, d)
Wq, Wk, Wv = (torch.randn(H * e, d) / d**0.5 for _ in range(3))
Wo = torch.randn(d, H * e) / (H * e) ** 0.5

full, _ = mha(x, Wq, Wk, Wv, Wo, H)
out, cache = mha(x[:8], Wq, Wk, Wv, Wo, H)  # prefill 8 tokens ...
steps = [out]
for t in range(8, T):  # ... then decode one token at a time
    out, cache = mha(x[t:t + 1], Wq, Wk, Wv, Wo, H, cache)
    steps.append(out)
print("decode with the cache vs full forward:", rel(torch.cat(steps), full))
print("MHA cache per token:", 2 * H * e, "values;  GQA with", G, "KV heads:", 2 * G * e, "values")
Wk_g, Wv_g = Wk[: G * e], Wv[: G * e]
_, cache_g = gqa(x, Wq, Wk_g, Wv_g, Wo, H, G)
assert cache["k"].shape == (H, T, e) and cache_g["k"].shape == (G, T, e)

# %% [markdown]
# GQA buys its smaller cache by making heads share keys and values: with $G = 1$ (multi-query attention)
# every head attends with the same key. MLA keeps per-head keys and values and compresses differently.
#
# ## 2. Low-rank joint compression
#
# All $2H$ keys and values of a token are linear functions of the same $x_t$. MLA routes them through a
# shared bottleneck of width $r_{kv} \ll 2He$:
#
# $$c_t = W^{DKV} x_t \in \mathbb{R}^{r_{kv}}, \qquad k_{t,i} = W^{UK}_i c_t, \qquad v_{t,i} = W^{UV}_i c_t,$$
#
# and caches only $c_t$. This is still multi-head attention, with key and value projections
# $W^K_i = W^{UK}_i W^{DKV}$ of rank at most $r_{kv}$: a constraint the model learns to live with, in
# exchange for a cache of $r_{kv}$ values per token.

# %%
# derivation: MLA without RoPE = MHA with low-rank key and value projections, caching the latent only
r_kv = 16
W_dkv = torch.randn(r_kv, d) / d**0.5  # (r_kv, d)
W_uk, W_uv = torch.randn(H, e, r_kv) / r_kv**0.5, torch.randn(H, e, r_kv) / r_kv**0.5  # per head (e, r_kv)


def latent_attention_expanded(x, q):
    """q (H, T, e). Cache c = W^DKV x, expand keys and values per head, attend."""
    c = x @ W_dkv.T  # (S, r_kv): all that is cached
    k = torch.einsum("her,sr->hse", W_uk, c)  # (H, S, e)
    v = torch.einsum("her,sr->hse", W_uv, c)  # (H, S, e)
    return causal_attention(q, k, v, e**-0.5)


q = rearrange(x @ Wq.T, "t (h e) -> h t e", h=H)
k_mha = torch.einsum("her,rd,td->hte", W_uk, W_dkv, x)  # (H, T, e): MHA keys with W^K_i = W^UK_i W^DKV
v_mha = torch.einsum("her,rd,td->hte", W_uv, W_dkv, x)  # (H, T, e)
as_mha = causal_attention(q, k_mha, v_mha, e**-0.5)
print("latent attention vs MHA with W^K = W^UK W^DKV:", rel(latent_attention_expanded(x, q), as_mha))
assert rel(latent_attention_expanded(x, q), as_mha) < 1e-5
print("cache per token:", r_kv, "values instead of", 2 * H * e)

# %% [markdown]
# ## 3. Absorption: attend over the latent, never expand it
#
# Caching $c_s$ saves memory, but decoding as written would expand every cached latent into $H$ keys and
# values at every step. Associativity removes that work. For head $i$,
#
# $$q_{t,i} \cdot k_{s,i} = q_{t,i}^\top W^{UK}_i c_s = \big((W^{UK}_i)^\top q_{t,i}\big) \cdot c_s,
# \qquad \sum_s a_{s} v_{s,i} = W^{UV}_i \Big(\sum_s a_s c_s\Big).$$
#
# So fold $W^{UK}_i$ into the query once per new token ($\hat q_{t,i} \in \mathbb{R}^{r_{kv}}$), take the
# softmax over $\hat q_{t,i} \cdot c_s$, average the latents, and apply $W^{UV}_i$ once at the end. Every
# head now attends over the **same** keys and values (the latents): in this form MLA is multi-query
# attention with key and value width $r_{kv}$. The logits are the same numbers, so the softmax scale stays
# $1/\sqrt{e}$, not $1/\sqrt{r_{kv}}$.

# %%
# derivation: the absorbed form of section 2
def latent_attention_absorbed(x, q):
    c = x @ W_dkv.T  # (S, r_kv)
    q_hat = torch.einsum("hte,her->htr", q, W_uk)  # (H, T, r_kv): W^UK folded into the query
    shared = c.expand(H, -1, -1)  # (H, S, r_kv): one key/value set for all heads
    o_latent = causal_attention(q_hat, shared, shared, e**-0.5)  # (H, T, r_kv)
    return torch.einsum("htr,her->hte", o_latent, W_uv)  # W^UV applied after the sum


print("absorbed vs expanded:", rel(latent_attention_absorbed(x, q), latent_attention_expanded(x, q)))
assert rel(latent_attention_absorbed(x, q), latent_attention_expanded(x, q)) < 1e-5

# %% [markdown]
# ## 4. Why RoPE has to be decoupled
#
# Rotary position embedding rotates a query at position $t$ by $R_t$ and a key at position $s$ by $R_s$, so
# that $R_t q \cdot R_s k = q^\top R_{s-t}\, k$ depends on $s - t$ only. Put RoPE on the compressed keys,
# $k_{s,i} = R_s W^{UK}_i c_s$, and the logit becomes
#
# $$q_{t,i}^\top R_t^\top R_s W^{UK}_i c_s = q_{t,i}^\top R_{s-t} W^{UK}_i c_s:$$
#
# a different matrix sits between the query and $c_s$ for every cached position, so there is no single
# $\hat q$ to fold. Absorption would need one per cached token, which is expanding the cache again. Here is
# the failure in numbers, with a small RoPE written out (pairs of dimensions as complex numbers):

# %%
# derivation: interleaved RoPE (pairs (2j, 2j+1) as complex numbers), and absorption failing under it
def rope(x, pos, theta=10_000.0):
    """x (..., T, D), pos (T,): rotate pair j at position m by the angle m * theta^(-2j/D)."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    turn = torch.polar(torch.ones(len(pos), D // 2, dtype=torch.float64), pos[:, None].double() * freqs)  # (T, D/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())  # (..., T, D/2)
    return torch.view_as_real(z * turn).flatten(-2).to(x.dtype)  # (..., T, D)


pos = torch.arange(T)
c = x @ W_dkv.T  # (T, r_kv)
k_roped = rope(torch.einsum("her,sr->hse", W_uk, c), pos)  # (H, T, e): RoPE on the expanded keys
q_roped = rope(q, pos)
true_logits = torch.einsum("hte,hse->hts", q_roped, k_roped)
folded_logits = torch.einsum("hte,her,sr->hts", q_roped, W_uk, c)  # fold W^UK as if RoPE were not there
print("absorbed logits with RoPE on the compressed keys, relative error:", rel(folded_logits, true_logits))
assert rel(folded_logits, true_logits) > 0.1

# %% [markdown]
# The repair (DeepSeek-V2) keeps position out of the latent altogether. Each head gets $d_r$ extra query
# dimensions $q^R_{t,i}$, and every token one extra **shared** key $k^R_t = W^{KR} x_t$ of width $d_r$;
# RoPE acts on those only:
#
# $$\text{logit}_{t,s,i} = \underbrace{q^C_{t,i} \cdot k^C_{s,i}}_{\text{absorbable, no position}}
#  + \underbrace{R_t q^R_{t,i} \cdot R_s k^R_s}_{\text{a small MQA term}}.$$
#
# The cache holds $c_s$ and the rotated $k^R_s$: $r_{kv} + d_r$ values per token. Our RoPE matches the
# package's interleaved RoPE (the pairing GLM-5's checkpoint uses):

# %%
from glm5_ref.layers import apply_rope

probe = torch.randn(1, T, 3, 16)  # (B, T, H, D)
ours = rope(probe.transpose(1, 2), pos).transpose(1, 2)
print("rope vs glm5_ref.layers.apply_rope:", rel(ours, apply_rope(probe, pos, 10_000.0, interleaved=True)))
assert rel(ours, apply_rope(probe, pos, 10_000.0, interleaved=True)) < 1e-6

# %% [markdown]
# ## 5. MLA as GLM-5 computes it
#
# GLM-5 also compresses the query (through a latent $c^Q$ of width $r_q$, which the DSA indexer of notebook
# 02 reads too), normalises both latents with RMSNorm, and gives each head a 256-wide query/key
# ($d_n = 192$ without position, $d_r = 64$ rotary) and a 256-wide value. With the names of the released
# checkpoint:
#
# | step | weight | shape out |
# |---|---|---|
# | $c^Q = \mathrm{RMSNorm}(W^{DQ} x)$ | `q_a_proj`, `q_a_layernorm` | $r_q$ = 2048 |
# | $[q^C_i; q^R_i] = W^{UQ} c^Q$, per head $d_n$ then $d_r$ | `q_b_proj` | $H \times 256$ |
# | $[\tilde c; k^R] = W^{DKV} x$ | `kv_a_proj_with_mqa` | 512 + 64 |
# | $c^{KV} = \mathrm{RMSNorm}(\tilde c)$ ($k^R$ is not normed) | `kv_a_layernorm` | 512 |
# | $[k^C_i; v_i] = W^{UKV} c^{KV}$, per head $d_n$ then $d_v$ | `kv_b_proj` | $H \times (192 + 256)$ |
# | $u = W^O [o_1; \dots; o_H]$ | `o_proj` | 6144 |
#
# RoPE rotates $q^R$ and $k^R$ only, and the softmax scale is $1/\sqrt{d_n + d_r} = 1/16$. (The widths are those
# of the released configuration, which the paper's Table 10 lists.) The diagram draws the same steps, with
# the widths read from `GLM5Config.glm5()`: the query path on top, the kv latent $c^{KV}$ in the middle, the
# shared rotary key $k^R$ at the bottom; the two purple tensors are all that a decode step keeps.

# %%
from glm5_ref.apps.diagrams import mla as mla_diagrams  # the module: its names would clash with the derivation's

glm5 = GLM5Config.glm5()
show_figure(mla_diagrams.mla_dataflow(glm5), "01_mla_dataflow.png");

# %% [markdown]
# Below, both paths written from the weights, at the classroom size (4 heads, $r_{kv} = 64$, $d_n = 32$,
# $d_r = 16$).

# %%
# derivation: GLM-5's MLA from a dict of checkpoint tensors, for one sequence x (T, d)
def rms_norm(h, w, eps):
    return w * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def mla_inputs(x, W, cfg):
    """Everything both paths share: per-head queries, the latent and the rotary key (what is cached)."""
    H, d_n, r_kv = cfg["heads"], cfg["d_n"], cfg["r_kv"]
    pos = torch.arange(x.shape[0])
    c_q = rms_norm(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], cfg["eps"])  # (T, r_q)
    q = rearrange(c_q @ W["q_b_proj.weight"].T, "t (h f) -> h t f", h=H)  # (H, T, d_n + d_r)
    q_c, q_r = q[..., :d_n], rope(q[..., d_n:], pos, cfg["theta"])  # (H, T, d_n), (H, T, d_r)
    kv_a = x @ W["kv_a_proj_with_mqa.weight"].T  # (T, r_kv + d_r)
    c_kv = rms_norm(kv_a[:, :r_kv], W["kv_a_layernorm.weight"], cfg["eps"])  # (T, r_kv)
    k_r = rope(kv_a[:, r_kv:], pos, cfg["theta"])  # (T, d_r): one rotary key shared by all heads
    return q_c, q_r, c_kv, k_r


def mla_expanded(x, W, cfg):
    H, d_n = cfg["heads"], cfg["d_n"]
    q_c, q_r, c_kv, k_r = mla_inputs(x, W, cfg)
    kv = rearrange(c_kv @ W["kv_b_proj.weight"].T, "s (h f) -> h s f", h=H)  # (H, S, d_n + d_v)
    k = torch.cat([kv[..., :d_n], k_r.expand(H, -1, -1)], dim=-1)  # (H, S, d_n + d_r)
    o = causal_attention(torch.cat([q_c, q_r], dim=-1), k, kv[..., d_n:], (d_n + cfg["d_r"]) ** -0.5)
    return rearrange(o, "h t v -> t (h v)") @ W["o_proj.weight"].T


def mla_absorbed(x, W, cfg):
    H, d_n, r_kv = cfg["heads"], cfg["d_n"], cfg["r_kv"]
    q_c, q_r, c_kv, k_r = mla_inputs(x, W, cfg)
    W_ukv = W["kv_b_proj.weight"].view(H, d_n + cfg["d_v"], r_kv)  # (H, d_n + d_v, r_kv)
    W_uk, W_uv = W_ukv[:, :d_n], W_ukv[:, d_n:]  # (H, d_n, r_kv), (H, d_v, r_kv)
    q_hat = torch.einsum("htn,hnr->htr", q_c, W_uk)  # (H, T, r_kv)
    keys = torch.cat([c_kv, k_r], dim=-1).expand(H, -1, -1)  # (H, S, r_kv + d_r): the 576-wide cache
    o_lat = causal_attention(torch.cat([q_hat, q_r], dim=-1), keys, c_kv.expand(H, -1, -1),
                             (d_n + cfg["d_r"]) ** -0.5)  # (H, T, r_kv)
    o = torch.einsum("htr,hvr->htv", o_lat, W_uv)  # (H, T, d_v)
    return rearrange(o, "h t v -> t (h v)") @ W["o_proj.weight"].T


# %% [markdown]
# The absorbed path is the one a decode step runs. Drawn with GLM-5's widths, it never builds a per-head key or
# value for a cached token: the per-head matrices act once per new token, on the query before the logits and
# on the averaged latent after them.

# %%
show_figure(mla_diagrams.mla_absorbed(glm5), "01_mla_absorbed.png");

# %% [markdown]
# Now the package. `MLA` holds the same seven tensors under the same names, so its `state_dict()` is
# exactly the dict the derivation reads; `absorbed=False` is the expanded path used for training and
# prefill, `absorbed=True` the decode path.

# %%
from glm5_ref.mla import MLA, MLACache

config = GLM5Config.classroom()
cfg = dict(heads=config.num_attention_heads, d_n=config.qk_nope_head_dim, d_r=config.qk_rope_head_dim,
           d_v=config.v_head_dim, r_kv=config.kv_lora_rank, eps=config.rms_norm_eps, theta=config.rope_theta)
mla = MLA(config)
W = {name: t.detach() for name, t in mla.state_dict().items()}
print(sorted(W))

x = torch.randn(1, 40, config.hidden_size)  # (B, T, d)
with torch.no_grad():
    package_expanded, package_absorbed = mla(x), mla(x, absorbed=True)
derived_expanded, derived_absorbed = mla_expanded(x[0], W, cfg), mla_absorbed(x[0], W, cfg)
checks = {
    "derivation: absorbed vs expanded": rel(derived_absorbed, derived_expanded),
    "package expanded vs derivation": rel(package_expanded[0], derived_expanded),
    "package absorbed vs derivation": rel(package_absorbed[0], derived_expanded),
}
for name, err in checks.items():
    print(f"{name:36s} {err:.1e}")

# %% [markdown]
# ### Decoding with the latent cache
#
# `MLACache` preallocates the two cached tensors of one layer, `latent` $(B, L, r_{kv})$ and `k_rope`
# $(B, L, d_r)$. A forward with a cache appends the new tokens and attends over everything cached so far;
# the usual pattern is one expanded prefill, then absorbed single-token steps. `truncate` rolls the cache
# back, which speculative decoding (notebook 05) uses to drop rejected draft tokens.

# %%
cache = MLACache.for_config(config, batch_size=1, max_len=64)
with torch.no_grad():
    pieces = [mla(x[:, :32], cache=cache)]  # prefill 32 tokens (expanded path)
    for t in range(32, 40):  # then one token at a time (absorbed path)
        pieces.append(mla(x[:, t:t + 1], cache=cache, absorbed=True))
decoded = torch.cat(pieces, dim=1)
checks["cached decode vs derivation"] = rel(decoded[0], derived_expanded)
print("cached decode vs derivation:", f"{checks['cached decode vs derivation']:.1e}")
print("cache length", cache.length, "| latent", tuple(cache.latent.shape), "| k_rope", tuple(cache.k_rope.shape),
      "| values per token:", cache.latent.shape[-1] + cache.k_rope.shape[-1])

# %% [markdown]
# At GLM-5 size the difference is large. The next cell counts what one decode step over a 16K-token context
# reads in fp32 (MB: $10^6$ bytes, GB: $10^9$ bytes): the cached latents on the absorbed path, against the
# per-head keys and values an implementation that caches them expanded would read.
# `python -m glm5_ref bench mla-decode` times both on your machine. The layer's weights, read by both paths,
# take a fixed share of every step, so the whole-step speed-up is smaller than the speed-up of the attention
# part.

# %%
L16, fp32 = 16_384, 4
latent_bytes = L16 * (glm5.kv_lora_rank + glm5.qk_rope_head_dim) * fp32
expanded_bytes = L16 * glm5.num_attention_heads * (glm5.qk_head_dim + glm5.v_head_dim) * fp32
layer_weights = glm5.param_breakdown()["attention"] // glm5.num_hidden_layers
print(f"one decode step over {L16:,} cached tokens, fp32: absorbed reads {latent_bytes / 1e6:.1f} MB of latents, "
      f"expanded {expanded_bytes / 1e9:.2f} GB of keys and values ({expanded_bytes / latent_bytes:.0f}x)")
print(f"the attention weights of one layer: {layer_weights / 1e6:.0f}M values, read by both paths")
#
# ## 6. MLA-256: fewer, wider heads
#
# In the absorbed path a head's cost per cached token does not depend on its width: it is one
# $(r_{kv} + d_r)$-wide dot product for the logit and one $r_{kv}$-wide multiply-add for the latent
# average, $576 + 512$ multiply-adds. The head width is paid only once per *new* token, in the folds
# $(W^{UK}_i)^\top q$ and $W^{UV}_i o$. So decode cost per cached token is proportional to the number of
# heads. Training runs the expanded path, whose cost per (query, key) pair is proportional to
# $H (d_{qk} + d_v)$: heads times width.
#
# GLM-5 therefore widens the heads from 192 to 256 ($d_n$ 128 $\to$ 192) and cuts their number by a
# third (96 $\to$ 64): training cost roughly unchanged, decode cost per cached token down by a third
# (paper section 2.1, "Multi-latent Attention", where this variant is called MLA-256). The
# table computes both from the shapes, for two possible 96-head baselines (value width 192 like the
# queries, or DeepSeek-V3's 128).

# %%
def attention_costs(H, d_n, d_r, d_v, d=6144, r_q=2048, r_kv=512):
    params = d * r_q + r_q * H * (d_n + d_r) + d * (r_kv + d_r) + r_kv * H * (d_n + d_v) + H * d_v * d
    return {
        "params": params,  # attention weights of one layer (norm gains left out)
        "train_pair": 2 * H * (d_n + d_r + d_v),  # FLOPs per (query, key) pair, expanded path
        "decode_cached": 2 * H * (r_kv + d_r + r_kv),  # FLOPs per cached token per decode step, absorbed
        "decode_fold": 2 * H * (d_n + d_v) * r_kv,  # FLOPs per decode step for the two folds (once)
    }


variants = {
    "MLA-192, 96 heads, d_v 192": attention_costs(96, 128, 64, 192),
    "MLA-192, 96 heads, d_v 128": attention_costs(96, 128, 64, 128),
    "MLA-256, 64 heads (GLM-5)": attention_costs(glm5.num_attention_heads, glm5.qk_nope_head_dim,
                                                 glm5.qk_rope_head_dim, glm5.v_head_dim),
}
new = variants["MLA-256, 64 heads (GLM-5)"]
print(f"{'variant':28s} {'params/layer':>13s} {'train FLOPs/pair':>17s} {'decode FLOPs/cached tok':>24s} "
      f"{'fold FLOPs/step':>16s}")
for name, v in variants.items():
    print(f"{name:28s} {v['params'] / 1e6:11.1f} M {v['train_pair']:17,d} {v['decode_cached']:24,d} "
          f"{v['decode_fold'] / 1e6:14.1f} M")
for name, v in list(variants.items())[:2]:
    print(f"MLA-256 vs {name}: params x{new['params'] / v['params']:.2f}, training x"
          f"{new['train_pair'] / v['train_pair']:.2f}, decode per cached token x"
          f"{new['decode_cached'] / v['decode_cached']:.3f}")

# %%
assert glm5.param_breakdown()["attention"] == glm5.num_hidden_layers * (new["params"] + 2048 + 512)  # + norm gains
for v in list(variants.values())[:2]:
    assert new["decode_cached"] / v["decode_cached"] == 2 / 3  # one third less decode compute per cached token
    assert abs(new["train_pair"] / v["train_pair"] - 1) < 0.12  # training cost about the same
    assert abs(new["params"] / v["params"] - 1) < 0.17  # and about the same parameters

# %% [markdown]
# The paper's claim ("This keeps the training computation and the number of parameters constant while
# decreasing the decoding computation", section 2.1) checks out on the arithmetic: per cached token, decode
# work falls to exactly 2/3, while training cost and parameters stay within the ratios printed above (at most
# 12% and 17% away, as the cell asserts) of either 96-head baseline. The folds (last column) are paid once per
# generated token, not once per cached token, so beyond a few hundred cached tokens the cached tokens dominate.
#
# ## 7. The cache at 200K tokens
#
# Per token and layer in bf16 (2 bytes per value), three ways to cache attention at GLM-5's own head widths
# (keys $d_n + d_r = 256$ wide, values 256): MHA keeps a key and a value for each of the 64 heads; GQA with 8 KV
# heads keeps 8 keys and 8 values; MLA keeps $c^{KV}$ and $k^R$, $512 + 64 = 576$ values. The cell prints the
# values and bytes per token, and the cache of one sequence over 78 layers at the full context of 202,752
# tokens, in GB ($10^9$ bytes; KB below means $10^3$ bytes).
#
# The paper's own GQA-8 baseline (section 2.1: "GQA with 8 query groups (denoted as GQA-8, 2048-dimension
# KV-cache)") is GLM-4.5's attention, whose heads are 128 wide: $8 \times (128 + 128) = 2048$ values per token
# and layer. That is a different model's head width; at GLM-5's widths the same 8 KV heads keep twice as much.
# The cell prints both, each labelled.

# %%
layers, bf16, full_context = glm5.num_hidden_layers, 2, glm5.max_position_embeddings
k_width, v_width = glm5.qk_head_dim, glm5.v_head_dim  # 256, 256
values_per_token_layer = {
    "MHA (64 KV heads, K 256 + V 256)": glm5.num_attention_heads * (k_width + v_width),
    "GQA-8 (8 KV heads, K 256 + V 256)": 8 * (k_width + v_width),
    "MLA (c_KV 512 + k_R 64)": glm5.kv_lora_rank + glm5.qk_rope_head_dim,
}
paper_gqa8 = 8 * (128 + 128)  # GLM-4.5's 128-wide heads: the paper's "2048-dimension KV-cache"
mla_values = values_per_token_layer["MLA (c_KV 512 + k_R 64)"]
assert mla_values * bf16 * layers == glm5.kv_cache_bytes_per_token(include_indexer=False)
gb = {name: v * bf16 * layers * full_context / 1e9 for name, v in values_per_token_layer.items()}
print(f"{'':36s} {'values/token/layer':>18s} {'bytes/token/layer':>17s} {'KB/token (78 layers)':>21s} "
      f"{'GB at ' + format(full_context, ','):>16s}")
for name, v in values_per_token_layer.items():
    print(f"{name:36s} {v:18,d} {v * bf16:17,d} {v * bf16 * layers / 1e3:21,.1f} {gb[name]:16,.1f}")
print(f"{'GQA-8 with 128-wide heads (paper)':36s} {paper_gqa8:18,d} {paper_gqa8 * bf16:17,d} "
      f"{paper_gqa8 * bf16 * layers / 1e3:21,.1f} {paper_gqa8 * bf16 * layers * full_context / 1e9:16,.1f}")
ratio_gqa8 = values_per_token_layer["GQA-8 (8 KV heads, K 256 + V 256)"] / mla_values
print(f"GQA-8 at GLM-5's widths keeps {ratio_gqa8:.1f}x MLA's cache; the paper's 128-wide GQA-8 "
      f"{paper_gqa8 / mla_values:.1f}x")
indexer_gb = glm5.index_head_dim * bf16 * layers * full_context / 1e9
print(f"the DSA indexer keys of notebook 02 ({glm5.index_head_dim} values per token and layer) add {indexer_gb:.1f} GB")
h200 = 141e9  # bytes of HBM on one H200
mha_bytes_per_token = values_per_token_layer["MHA (64 KV heads, K 256 + V 256)"] * bf16 * layers
print(f"MHA's cache alone outgrows one H200 (141 GB) at {h200 / mha_bytes_per_token:,.0f} tokens")
assert values_per_token_layer["MHA (64 KV heads, K 256 + V 256)"] == 32_768 and mla_values == 576
assert round(indexer_gb, 1) == 4.0
assert round(ratio_gqa8, 1) == 7.1 and round(paper_gqa8 / mla_values, 1) == 3.6
assert round(gb["GQA-8 (8 KV heads, K 256 + V 256)"], 1) == 129.6 and round(gb["MLA (c_KV 512 + k_R 64)"], 1) == 18.2

# %%
contexts = torch.linspace(1024, full_context, 200)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
colors = ["tab:red", "tab:orange", "tab:blue"]
names = list(values_per_token_layer)
kb = [v * bf16 * layers / 1e3 for v in values_per_token_layer.values()]
ax1.bar([n.replace(" (", "\n(") for n in names], kb, color=colors)
ax1.set_yscale("log")
ax1.set_ylim(50, 20_000)
ax1.set_ylabel("KB per token (78 layers, bf16)")
ax1.set_title("cache per token, GLM-5 head widths")
for i, b in enumerate(kb):
    ax1.text(i, b, f"{b:,.0f} KB", ha="center", va="bottom", fontsize=9)
ax1.tick_params(axis="x", labelsize=8)
for (name, v), color in zip(values_per_token_layer.items(), colors):
    ax2.plot(contexts / 1000, v * bf16 * layers * contexts / 1e9, label=name, color=color)
ax2.axhline(h200 / 1e9, color="gray", ls="--", lw=1)
ax2.text(95, 165, "memory of one H200 (141 GB)", color="gray", fontsize=8)
ax2.set_yscale("log")
ax2.set_ylim(0.05, 3000)
ax2.set_xlabel("context length (thousand tokens)")
ax2.set_ylabel("cache per sequence (GB = 1e9 bytes)")
ax2.set_title("cache per sequence, GLM-5 dimensions")
ax2.legend(fontsize=8, loc="lower right")
fig.tight_layout()
show_figure(fig, "01_kv_cache.png");

# %% [markdown]
# A full 202,752-token context needs 18.2 GB of MLA cache per sequence (plus 4.0 GB for the DSA indexer
# keys of notebook 02), against 129.6 GB for GQA-8 at the same head widths, 7.1 times as much, and over a
# terabyte for MHA, whose cache outgrows a whole H200 at the context printed above. Even the paper's
# narrower GQA-8 (128-wide heads) keeps 3.6 times MLA's cache.
#
# ## Summary
#
# - MLA caches one normed latent $c^{KV}$ (512) and one shared rotary key $k^R$ (64) per token and layer.
# - Absorbing $W^{UK}$ into the query and $W^{UV}$ into the output lets decoding attend over the latents
#   directly: per head, a 576-wide logit and a 512-wide average per cached token.
# - RoPE would break absorption if it touched the compressed keys, so it lives in separate dimensions.
# - With absorption, decode cost per cached token scales with the number of heads only; MLA-256 trades
#   a third of the heads for wider ones and keeps training cost.
#
# The last check: the derivation and `glm5_ref.mla` agree, on both paths and through the cache.

# %%
# check: the derivation equals glm5_ref.mla (expanded, absorbed, and decoding through the cache)
for name, err in checks.items():
    assert err < 1e-5, (name, err)
print("derivation == glm5_ref.mla:", {k: f"{v:.1e}" for k, v in checks.items()})

# %% [markdown]
# ## Exercises
#
# 1. Halve the latent: predict GLM-5's MLA cache (without the indexer keys), in GB, for one 202,752-token
#    sequence in bf16 if `kv_lora_rank` were 256 instead of 512, then check with
#    `GLM5Config.kv_cache_bytes_per_token`.
# 2. The paper's GQA-8 has 8 KV heads of width 128. Predict how many values per token the `gqa` function of
#    section 1 caches with 8 KV heads of width 128, and the ratio to MLA's 576; then build that cache and count.
# 3. Absorption changes the order of the products, not the logits. Predict the softmax scale the absorbed path
#    must use for the classroom config (the keys it dots with are $r_{kv} + d_r = 80$ wide), then check that
#    `MLA(config)` with `absorbed=True` matches the expanded path, and that the derivation with the scale
#    $1/\sqrt{80}$ does not.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
import dataclasses

prediction = (256 + glm5.qk_rope_head_dim) * 2 * glm5.num_hidden_layers * glm5.max_position_embeddings / 1e9
half = dataclasses.replace(glm5, kv_lora_rank=256)
measured = half.kv_cache_bytes_per_token(include_indexer=False) * glm5.max_position_embeddings / 1e9
print(f"kv_lora_rank 256: predicted {prediction:.1f} GB, package {measured:.1f} GB "
      f"(was {gb['MLA (c_KV 512 + k_R 64)']:.1f})")
assert abs(prediction - measured) < 1e-9

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
e128, T_ex = 128, 5
x_ex = torch.randn(T_ex, 256)
Wq_ex, Wk_ex, Wv_ex = torch.randn(64 * e128, 256), torch.randn(8 * e128, 256), torch.randn(8 * e128, 256)
Wo_ex = torch.randn(256, 64 * e128)
_, cache_ex = gqa(x_ex, Wq_ex, Wk_ex, Wv_ex, Wo_ex, n_heads=64, n_kv_heads=8)
per_token = (cache_ex["k"].numel() + cache_ex["v"].numel()) // T_ex
print(f"GQA-8 with 128-wide heads caches {per_token} values per token and layer, {per_token / 576:.2f}x MLA's 576")
assert per_token == 2048 and round(per_token / 576, 1) == 3.6

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3: the scale stays 1/sqrt(d_n + d_r) = 1/sqrt(48), the width of the per-head keys it replaces
print("scale the package uses:", mla.scale, "= 1/sqrt(d_n + d_r) =", (cfg["d_n"] + cfg["d_r"]) ** -0.5)
assert abs(mla.scale - (cfg["d_n"] + cfg["d_r"]) ** -0.5) < 1e-12
with torch.no_grad():
    assert rel(mla(x, absorbed=True)[0], mla(x)[0]) < 1e-5
q_c, q_r, c_kv, k_r = mla_inputs(x[0], W, cfg)
W_ukv = W["kv_b_proj.weight"].view(cfg["heads"], cfg["d_n"] + cfg["d_v"], cfg["r_kv"])
q_hat = torch.einsum("htn,hnr->htr", q_c, W_ukv[:, :cfg["d_n"]])
keys = torch.cat([c_kv, k_r], dim=-1).expand(cfg["heads"], -1, -1)
o_wrong = causal_attention(torch.cat([q_hat, q_r], dim=-1), keys, c_kv.expand(cfg["heads"], -1, -1),
                           (cfg["r_kv"] + cfg["d_r"]) ** -0.5)
o_heads = torch.einsum("htr,hvr->htv", o_wrong, W_ukv[:, cfg["d_n"]:])  # (H, T, d_v)
out_wrong = rearrange(o_heads, "h t v -> t (h v)") @ W["o_proj.weight"].T
print(f"absorbed with 1/sqrt(80): relative error {rel(out_wrong, derived_expanded):.2f}")
assert rel(out_wrong, derived_expanded) > 1e-3
