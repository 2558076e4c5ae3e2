# %% [markdown]
# # 00 · GLM-5 at a glance
#
# GLM-5 (Zhipu AI and Tsinghua, 2026, [arXiv 2602.15763](https://arxiv.org/abs/2602.15763)) is a
# 744-billion-parameter mixture-of-experts language model of which about 40 billion parameters work on
# any one token. This notebook reads the published configuration and asks two questions, using nothing
# but arithmetic:
#
# 1. **Where do the 744B parameters sit, and which 40B does a token touch?**
# 2. **How many bytes does the model keep per token while it generates?**
#
# Every later notebook derives one component in detail; this one is the map.
#
# | notebook | component |
# |---|---|
# | 01 | MLA-256: multi-head latent attention |
# | 02 | DSA: the lightning indexer and top-k sparse attention |
# | 03 | the sigmoid MoE router and load balancing |
# | 04 | assembling the model, checked against Hugging Face transformers |
# | 05 | multi-token prediction and speculative decoding |
# | 06 | training a classroom GLM-5 on a laptop CPU |
# | 07 | Muon and Muon Split |
# | 08 | token-in-token-out agentic RL |
# | 09 | Triton kernels |
# | 10 | scaling out with torch.distributed |
# | 11 | the DSA long-context result at classroom scale |

# %%
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.display import Image, display

from glm5_ref.config import GLM5Config

config = GLM5Config.glm5()
for key in ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
            "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
            "moe_intermediate_size", "intermediate_size", "vocab_size", "max_position_embeddings"):
    print(f"{key:26s} {getattr(config, key)}")

# %% [markdown]
# ## The decoder block
#
# GLM-5 is a pre-norm decoder of 78 identical blocks (the paper's prose says 80; its Table 10 and the
# released `config.json` say 78, plus one multi-token-prediction layer stored as layer 78):
#
# ```
# x = x + MLA_DSA(RMSNorm(x))     # attention: MLA, with DSA choosing which keys each query sees
# x = x + FFN(RMSNorm(x))         # dense SwiGLU in layers 0-2, a 256-expert MoE in layers 3-77
# logits = W_out · RMSNorm(x)
# ```
#
# ## Counting parameters by hand (derivation)
#
# Let $d$ be the hidden size, $H$ the heads, $r_q, r_{kv}$ the query and KV latent widths,
# $d_n, d_r, d_v$ the per-head no-position, rotary and value widths. One attention block holds
#
# $$\underbrace{d\,r_q}_{q_a} + r_q + \underbrace{r_q H (d_n+d_r)}_{q_b}
#   + \underbrace{d (r_{kv}+d_r)}_{kv_a} + r_{kv} + \underbrace{r_{kv} H (d_n + d_v)}_{kv_b}
#   + \underbrace{H d_v d}_{o}$$
#
# the lightning indexer adds a query projection from the query latent, one key projection, a LayerNorm
# with bias and per-head weights; a SwiGLU of width $w$ has $3dw$ parameters. We write it out without the
# package, then compare.

# %%
# derivation: plain arithmetic, no glm5_ref
d, L, dense, H = 6144, 78, 3, 64
r_q, r_kv, d_n, d_r, d_v = 2048, 512, 192, 64, 256
H_I, d_I = 32, 128
E, K, S, d_e, d_ff, V = 256, 8, 1, 2048, 12288, 154880

attn = d * r_q + r_q + r_q * H * (d_n + d_r) + d * (r_kv + d_r) + r_kv + r_kv * H * (d_n + d_v) + H * d_v * d
indexer = r_q * H_I * d_I + d * d_I + 2 * d_I + d * H_I
norms = 2 * d
dense_ffn = 3 * d * d_ff
moe_total = E * d + E * 3 * d * d_e + 3 * d * S * d_e          # router + routed experts + shared expert
moe_active = E * d + K * 3 * d * d_e + 3 * d * S * d_e
embedding = head = V * d

total = L * (attn + indexer + norms) + dense * dense_ffn + (L - dense) * moe_total + embedding + head + d
active = L * (attn + indexer + norms) + dense * dense_ffn + (L - dense) * moe_active + head + d
print(f"total  {total:,}   active {active:,}")

# %% [markdown]
# The published headline numbers are "744B total, 40B active". The exact count is
# **743,911,199,232** without the MTP layer (with it, 753.9B: the arithmetic says the "744B" excludes
# MTP, although the paper's table caption says otherwise). "Active" counts the routed experts a token
# uses (8 of 256), leaves out the embedding matrix (a token reads one row of it) and keeps the LM head.
# The package computes the same from the config:

# %%
assert total == config.num_params() == 743_911_199_232
assert active == config.num_params(active=True) == 40_833_126_912
print(f"with the MTP layer: {config.num_params(include_mtp=True):,}")

# %% [markdown]
# ## Where the parameters sit
#
# The table splits both counts by component; the chart shows them on a log scale.

# %%
from glm5_ref.apps.tour import component_counts, params_table, plot_param_breakdown

print(params_table(config))
path = plot_param_breakdown(config, "../figures/00_param_breakdown.png")
display(Image(path))

# %% [markdown]
# **97.4% of the parameters are routed experts**, yet a token uses only 8 of the 256 in each MoE layer,
# so the experts account for barely more than half of the active parameters. Attention (MLA plus the
# indexer) is under 2% of the total but a third of the active count: it is what every token pays for.

# %%
tot, act = component_counts(config)
assert abs(tot["routed_experts"] / config.num_params() - 0.974) < 1e-3
assert act["routed_experts"] / config.num_params(active=True) < 0.6
assert (act["attention"] + act["indexer"]) / config.num_params(active=True) > 0.3

# %% [markdown]
# ## Bytes per token while generating
#
# During decoding every layer keeps something per past token. Plain multi-head attention would keep a
# 256-wide key and a 256-wide value per head: $2 \times 64 \times 256$ values. MLA keeps one 512-wide
# latent and one shared 64-wide rotary key, **576 values**; DSA's indexer adds a 128-wide key. In bf16:

# %%
from glm5_ref.apps.tour import cache_table

print(cache_table(config))
mla_values = r_kv + d_r
assert config.kv_cache_values_per_token(include_indexer=False) == mla_values == 576
assert config.kv_cache_bytes_per_token() == L * (mla_values + d_I) * 2

contexts = [2**k for k in range(10, 18)] + [202752]
fig, ax = plt.subplots(figsize=(7, 3.8))
for label, per_token in [("MHA, 64 heads x (256 K + 256 V)", L * 2 * H * 256 * 2),
                         ("GQA-8 (8 KV heads x 256)", L * 2 * 8 * 256 * 2),
                         ("MLA latent + rope key (576)", L * 576 * 2),
                         ("MLA + DSA indexer key (704)", config.kv_cache_bytes_per_token())]:
    ax.plot(contexts, [per_token * t / 2**30 for t in contexts], marker="o", ms=3, label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("cache per sequence (GiB, bf16)")
ax.set_title("GLM-5 decode cache, 78 layers")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig("../figures/00_cache_bytes.png", dpi=110)
plt.show()

# %% [markdown]
# A 200K-token conversation costs about 21 GiB of cache with MLA and DSA, against almost a terabyte for
# plain multi-head attention with the same heads. Notebook 01 derives how MLA gets there without giving up
# per-head keys, and notebook 02 how DSA keeps the *compute* per token bounded as the context grows.
#
# ## The scaled-down models used in the rest of the notebooks
#
# The same code runs three configs: `glm5()` (the real one, only ever built on the meta device here),
# `classroom()` (trains on two CPU cores in minutes) and `tiny()` (for tests).

# %%
for name in ("classroom", "tiny"):
    c = GLM5Config.preset(name)
    print(f"{name:10s} total {c.num_params():>12,}  active {c.num_params(active=True):>12,}  "
          f"d={c.hidden_size} layers={c.num_hidden_layers} experts={c.n_routed_experts} top-{c.num_experts_per_tok}")
assert 10e6 <= GLM5Config.classroom().num_params() <= 30e6
