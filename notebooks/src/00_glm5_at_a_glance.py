# %% [markdown]
# # 00 · GLM-5 at a glance
#
# **Prerequisites:** none: this is the first notebook. It assumes only that you know what a decoder-only
# transformer language model is (token embeddings, a stack of attention and feed-forward layers, next-token
# logits); every other term is defined where it first appears and again in the glossary at the end.
# **Reading time:** about 20 minutes (it runs in about 10 s under make test, 2 cores).
#
# GLM-5 (Zhipu AI and Tsinghua, 2026, [arXiv 2602.15763](https://arxiv.org/abs/2602.15763)) is a
# mixture-of-experts language model, "a 744B parameter model (40B active parameters)" (paper section 2.1,
# "Model size scaling"). *Mixture of experts* (MoE) means that most layers hold many feed-forward networks,
# the *experts*, and a small *router* sends each token to a few of them, so a token uses only a fraction of
# the weights. This notebook reads the published configuration and answers two questions with arithmetic:
#
# 1. **Where do the parameters sit, and which of them does one token use?**
# 2. **How many bytes does the model keep per token while it generates?**
#
# Each later notebook derives one component in detail; this one is the map. The figure shows the 14
# notebooks, grouped by topic; an arrow from A to B means: read A before B.

# %%
import dataclasses

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from glm5_ref.apps.diagrams.overview import NOTEBOOKS, notebook_map
from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config

show_figure(notebook_map(), "00_notebook_map.png")
print(f"{len(NOTEBOOKS)} notebooks, in reading order:", ", ".join(sorted(stem for stem, _, _ in NOTEBOOKS)))
assert len(NOTEBOOKS) == 14

# %% [markdown]
# ## The configuration
#
# The package's `GLM5Config.glm5()` holds the released `config.json` of the checkpoint
# (`zai-org/GLM-5`, the key names are the checkpoint's):

# %%
config = GLM5Config.glm5()
for key in ("hidden_size", "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "q_lora_rank",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
            "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
            "moe_intermediate_size", "intermediate_size", "vocab_size", "max_position_embeddings",
            "routed_scaling_factor", "num_nextn_predict_layers"):
    print(f"{key:26s} {getattr(config, key)}")
print(f"qk head width: {config.qk_nope_head_dim} + {config.qk_rope_head_dim} = {config.qk_head_dim}")

# %% [markdown]
# ## The decoder block
#
# GLM-5 is a pre-norm decoder: every block normalises its input before each of its two branches and adds
# the branch's output back to the *residual stream* $x$ (the running sum that flows through the blocks):
#
# ```
# x = x + Attention(RMSNorm(x))   # MLA, with DSA choosing which past tokens each query reads
# x = x + FFN(RMSNorm(x))         # a dense SwiGLU in the first 3 blocks, a 256-expert MoE in the other 75
# logits = W_out · RMSNorm(x)     # W_out, the LM head, is a separate matrix from the token embedding
# ```
#
# - **RMSNorm**: divide a vector by its root-mean-square, then multiply by a learned gain (notebook 00a).
# - **SwiGLU**: the feed-forward network $W_{down}(\mathrm{SiLU}(W_{gate}x) \odot W_{up}x)$, three matrices
#   (notebook 00a).
# - **RoPE**, rotary position embedding: positions enter attention by rotating pairs of query and key
#   dimensions by position-dependent angles (notebook 00a).
# - **MLA**, multi-head latent attention: attention whose keys and values are rebuilt from one small
#   *latent* vector per token, so that only the latent is kept while generating (notebook 01).
# - **DSA**, DeepSeek sparse attention: a cheap scorer, the *lightning indexer*, picks the 2048 past tokens
#   each query attends to (notebook 02).
# - **MTP**, multi-token prediction: one extra block, stored after the main ones, that predicts the token
#   after next; it drafts tokens for *speculative decoding*, where the full model checks several drafted
#   tokens in one forward (notebook 05).
#
# The printed config has 78 main blocks plus `num_nextn_predict_layers = 1` MTP block (stored as layer 78);
# the paper's prose says the layer count was reduced "to 80" (section 2.1), while its Table 10 and the
# released config give 78 main layers; the code follows the released config.
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
# (the lone $r_q$ and $r_{kv}$ are the gains of the two RMSNorms on the latents). The lightning indexer
# adds a query projection from the query latent ($r_q H_I d_I$), one key projection ($d\,d_I$), a LayerNorm
# with bias on the key ($2 d_I$) and a per-head weight projection ($d H_I$). A SwiGLU of width $w$ has
# $3dw$ parameters; an MoE block has a router ($E d$), $E$ routed experts and the shared expert. The MTP
# block is one more MoE decoder block plus two RMSNorms on its inputs, a $2d \to d$ projection and one
# more RMSNorm, and reuses the embedding and the LM head. The function below reads only the config's
# numbers.

# %%
# derivation: the parameter count from the config's shapes, plain arithmetic (no glm5_ref function)
def count_by_hand(c):
    d, H, L, n_dense = c.hidden_size, c.num_attention_heads, c.num_hidden_layers, c.first_k_dense_replace
    r_q, r_kv = c.q_lora_rank, c.kv_lora_rank
    d_n, d_r, d_v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    H_I, d_I = c.index_n_heads, c.index_head_dim
    E, K, S, d_e, d_ff, V = (c.n_routed_experts, c.num_experts_per_tok, c.n_shared_experts,
                             c.moe_intermediate_size, c.intermediate_size, c.vocab_size)
    attn = (d * r_q + r_q + r_q * H * (d_n + d_r) + d * (r_kv + d_r) + r_kv + r_kv * H * (d_n + d_v)
            + H * d_v * d)
    indexer = r_q * H_I * d_I + d * d_I + 2 * d_I + d * H_I
    norms = 2 * d
    dense_block = attn + indexer + norms + 3 * d * d_ff
    moe_block = attn + indexer + norms + E * d + E * 3 * d * d_e + 3 * d * S * d_e
    moe_block_active = attn + indexer + norms + E * d + K * 3 * d * d_e + 3 * d * S * d_e
    embedding = head = V * d
    final_norm = d
    mtp = 3 * d + 2 * d * d + moe_block                    # enorm, hnorm, shared_head.norm, eh_proj + a block
    mtp_active = 3 * d + 2 * d * d + moe_block_active
    total = embedding + n_dense * dense_block + (L - n_dense) * moe_block + final_norm + head
    active = n_dense * dense_block + (L - n_dense) * moe_block_active + final_norm + head  # no embedding
    return {"total": total, "active": active, "total_with_mtp": total + mtp, "active_with_mtp": active + mtp_active,
            "mtp": mtp, "embedding": embedding, "head": head, "routed_experts": (L - n_dense) * E * 3 * d * d_e}


glm5_hand = count_by_hand(config)
for key, n in glm5_hand.items():
    print(f"{key:16s} {n:>18,}")

# %% [markdown]
# So GLM-5 has **743,911,199,232** parameters without the MTP block and 753,864,119,552 with it; per
# token it uses **40,833,126,912** without the MTP block. "Active" counts the 8 of 256 routed experts a
# token is sent to, leaves out the embedding matrix (a token reads one row of it) and keeps the LM head
# (every token multiplies by all of it).
#
# Which count is the paper's "744B"? Table 10's caption says its counts include the MTP layers but not the
# word embeddings and the output layer. Counted that way (printed below) GLM-5 has 752.0B parameters, 40.5B
# active: the active count fits "40B", the total does not fit "744B". The published 744B is the count
# *with* the embedding and the head and *without* the MTP block (whose active count, 40.8B, also rounds
# down to "40B"). This notebook and the package follow that reading, and always say which count a number is.

# %%
caption_rule = glm5_hand["total_with_mtp"] - glm5_hand["embedding"] - glm5_hand["head"]
caption_active = glm5_hand["active_with_mtp"] - glm5_hand["head"]  # active counts never include the embedding
print(f"Table 10 caption's rule (with MTP, no embedding, no head): total {caption_rule / 1e9:.1f}B, "
      f"active {caption_active / 1e9:.1f}B")
print(f"with embedding and head, without MTP:                     total {glm5_hand['total'] / 1e9:.1f}B, "
      f"active {glm5_hand['active'] / 1e9:.1f}B")
assert round(glm5_hand["total"] / 1e9) == 744 and int(glm5_hand["active"] / 1e9) == 40
assert round(caption_rule / 1e9) == 752 and int(caption_active / 1e9) == 40

# %% [markdown]
# ## Where the parameters sit
#
# The package splits the same count by component (`glm5_ref.apps.tour.params_table`, from
# `GLM5Config.param_breakdown`); the chart shows it on a log scale, with the MTP block as its own row.

# %%
from glm5_ref.apps.tour import COMPONENT_LABELS, component_counts, params_table

print(params_table(config))
tot, act = component_counts(config)


def human(n):
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


keys = list(COMPONENT_LABELS)
fig, ax = plt.subplots(figsize=(9, 5))
floor = 1e5  # the left edge of the log axis; an active count of 0 (the embedding) draws no bar
for offset, counts, label in ((0.2, tot, "total"), (-0.2, act, "active per token")):
    bars = ax.barh([i + offset for i in range(len(keys))], [max(counts[k], floor) for k in keys], height=0.4,
                   label=label)
    for bar, k in zip(bars, keys):
        ax.text(bar.get_width() * 1.15, bar.get_y() + bar.get_height() / 2, human(counts[k]), va="center",
                fontsize=7)
ax.set_yticks(range(len(keys)), [COMPONENT_LABELS[k] for k in keys])
ax.invert_yaxis()
ax.set_xscale("log")
ax.set_xlim(floor, max(tot.values()) * 20)
ax.set_xlabel("parameters (log scale)")
ax.set_ylabel("component")
ax.set_title(f"GLM-5: {config.num_params() / 1e9:.1f}B total, {config.num_params(active=True) / 1e9:.1f}B "
             "active per token (without the MTP layer)")
ax.legend(loc="lower right")
fig.tight_layout()
show_figure(fig, "00_param_breakdown.png")

share_total = tot["routed_experts"] / config.num_params()
share_active = act["routed_experts"] / config.num_params(active=True)
share_attn = (act["attention"] + act["indexer"]) / config.num_params(active=True)
print(f"routed experts: {100 * share_total:.1f}% of all parameters, {100 * share_active:.1f}% of the active ones")
print(f"attention + indexer: {100 * (tot['attention'] + tot['indexer']) / config.num_params():.1f}% of all, "
      f"{100 * share_attn:.1f}% of the active ones")

# %% [markdown]
# **97.4% of the parameters are routed experts** (printed above), yet a token uses only 8 of the 256 in
# each MoE layer, so the experts are just over half of the active parameters. Attention (MLA plus the
# indexer) is under 2% of the total but a third of the active count: it is what every token pays for.
#
# ## Bytes per token while generating
#
# While it generates, a model keeps for every past token whatever its attention needs to read again: the
# *KV cache*. Below, **GB means $10^9$ bytes** and every value is stored in bf16 (bfloat16, a 16-bit
# floating-point format: 2 bytes per value).
#
# - Plain multi-head attention (MHA) with GLM-5's heads would keep a 256-wide key and a 256-wide value per
#   head: $64 \times 512 = 32{,}768$ values per token per layer.
# - Grouped-query attention (GQA) shares each key/value head among several query heads; with 8 KV heads of
#   GLM-5's own widths (K 256 + V 256) that is $8 \times 512 = 4096$ values.
# - MLA keeps one 512-wide latent and one shared 64-wide rotary key: **576 values**. DSA's indexer adds one
#   128-wide key per token.

# %%
L, T_max = config.num_hidden_layers, config.max_position_embeddings
mla_values = config.kv_lora_rank + config.qk_rope_head_dim
variants = {
    f"MHA, {config.num_attention_heads} heads x (256 K + 256 V)": config.num_attention_heads * 2 * 256,
    "GQA-8, 8 KV heads x (256 K + 256 V)": 8 * 2 * 256,
    f"MLA latent + rotary key ({mla_values})": mla_values,
    f"MLA + DSA indexer key ({config.kv_cache_values_per_token()})": config.kv_cache_values_per_token(),
}
GB = 1e9
contexts = [2**k for k in range(10, 18)] + [T_max]
fig, ax = plt.subplots(figsize=(7, 3.8))
for label, values in variants.items():
    ax.plot(contexts, [L * values * 2 * t / GB for t in contexts], marker="o", ms=3, label=label)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("cache per sequence (GB, bf16)")
ax.set_title(f"GLM-5 decode cache over {L} layers")
ax.legend(fontsize=8)
fig.tight_layout()
show_figure(fig, "00_cache_bytes.png")

print(f"{'cache':42s} {'values/token/layer':>18s} {'bytes/token':>12s} {'GB at 202,752 tokens':>21s}")
for label, values in variants.items():
    per_token = L * values * 2
    print(f"{label:42s} {values:>18,} {per_token:>12,} {per_token * T_max / GB:>21.1f}")
gqa_gb, mla_gb = L * 4096 * 2 * T_max / GB, L * mla_values * 2 * T_max / GB
assert config.kv_cache_bytes_per_token(include_indexer=False) == L * mla_values * 2  # the package agrees
print(f"GQA-8 / MLA = {4096 / mla_values:.1f}x ({gqa_gb:.1f} GB vs {mla_gb:.1f} GB over {L} layers and "
      f"{T_max:,} tokens)")

# %% [markdown]
# A 202,752-token conversation (GLM-5's full context) costs 22.3 GB of cache with MLA and the indexer key,
# 18.2 GB for MLA alone, 129.6 GB for GQA-8 at the same head widths (7.1 times MLA) and about a terabyte
# (1036.4 GB) for plain multi-head attention. Notebook 01 derives how MLA gets there without giving up
# per-head keys, and notebook 02 how DSA keeps the *compute* per token bounded as the context grows.
#
# ## The scaled-down models used in the rest of the notebooks
#
# The same code runs three configs: `glm5()` (the real one, only ever built on the meta device, which holds
# shapes without memory), `classroom()` (trains on two CPU cores; the project ships one trained copy,
# `classroom-base`) and `tiny()` (for tests). The hand count applies to all three:

# %%
for name in ("classroom", "tiny"):
    c = GLM5Config.preset(name)
    h = count_by_hand(c)
    print(f"{name:9s} d={c.hidden_size} layers={c.num_hidden_layers} ({c.first_k_dense_replace} dense) "
          f"experts={c.n_routed_experts} top-{c.num_experts_per_tok}: total {h['total']:>10,} without MTP, "
          f"{h['total_with_mtp']:>10,} with it; active {h['active']:>9,} without MTP")

# %% [markdown]
# The classroom model has **13,065,472 parameters without its MTP block and 16,602,880 with it** (the
# "16.6M" of its model card counts the MTP block); a token uses 3,755,264 of them (without MTP).
#
# ## Glossary
#
# Each term is derived in the notebook its link names (00a is the foundations notebook).
#
# | term | one-line definition | derived in |
# |---|---|---|
# | BPE | byte-pair encoding: start from bytes, repeatedly merge the most frequent adjacent pair into a new token | [00a](00a_foundations.ipynb) |
# | RMSNorm | $x / \sqrt{\mathrm{mean}(x^2) + \epsilon}$ times a learned gain; no mean subtraction, no bias | [00a](00a_foundations.ipynb) |
# | SwiGLU | the feed-forward $W_{down}(\mathrm{SiLU}(W_{gate}x) \odot W_{up}x)$, with $\mathrm{SiLU}(z) = z\,\sigma(z)$ | [00a](00a_foundations.ipynb) |
# | RoPE | rotary position embedding: rotate pairs of query/key dims by angles proportional to the position, so $q_m \cdot k_n$ depends on $m - n$ only | [00a](00a_foundations.ipynb) |
# | KV cache | the keys and values (or whatever attention re-reads) kept for every past token while generating | [01](01_mla.ipynb) |
# | GQA | grouped-query attention: several query heads share one key/value head, shrinking the KV cache | [01](01_mla.ipynb) |
# | MLA | multi-head latent attention: per-head keys and values rebuilt from one low-rank latent per token | [01](01_mla.ipynb) |
# | latent cache | what MLA keeps per token and layer: the 512-wide KV latent and the 64-wide shared rotary key (576 values) | [01](01_mla.ipynb) |
# | absorption | folding $W^{UK}$ into the query and $W^{UV}$ into the output so decoding attends over the latents without expanding them | [01](01_mla.ipynb) |
# | decoupled RoPE key | the separate 64-wide rotary part of each query and the one shared rotary key, kept outside the latent so absorption still works | [01](01_mla.ipynb) |
# | MLA-256 | GLM-5's MLA shape: 64 heads with 256-wide query/key heads (192 + 64) instead of DeepSeek-V3's 192-wide ones, with a third fewer heads (paper section 2.1) | [01](01_mla.ipynb) |
# | DSA | DeepSeek sparse attention: each query attends only to the top-k past tokens chosen by the lightning indexer | [02](02_dsa_lightning_indexer.ipynb) |
# | lightning indexer | a few cheap heads with ReLU scores, weighted and summed, that score every past token for each query | [02](02_dsa_lightning_indexer.ipynb) |
# | top-k | keeping the k highest-scoring entries (2048 past tokens per query in GLM-5's DSA; 8 experts per token in its MoE) | [02](02_dsa_lightning_indexer.ipynb), [03](03_moe_router.ipynb) |
# | dense warm-up, sparse adaptation | DSA's two training stages: first train only the indexer to match dense attention, then train with top-k attention on | [02](02_dsa_lightning_indexer.ipynb), [06](06_train_classroom_glm5.ipynb) |
# | MoE | mixture of experts: many feed-forward experts per layer, a router sends each token to a few | [03](03_moe_router.ipynb) |
# | sigmoid router | scores each expert with an independent sigmoid of $u \cdot w_e$ (not a softmax over experts) | [03](03_moe_router.ipynb) |
# | expert bias | a per-expert number added to the router scores for choosing experts only (not for weighting them), nudged after each step toward balanced load, without gradients ("aux-loss-free" balancing) | [03](03_moe_router.ipynb) |
# | shared expert | one SwiGLU expert every token goes through, besides its routed experts | [03](03_moe_router.ipynb) |
# | routed scaling factor | the constant (2.5 in GLM-5's config) that multiplies the normalised weights of the chosen experts | [03](03_moe_router.ipynb), [04](04_assembling_glm5.ipynb) |
# | meta device | a PyTorch device that records shapes and dtypes but allocates no memory | [04](04_assembling_glm5.ipynb) |
# | safetensors | a tensor file format: a JSON header with each tensor's dtype, shape and byte range, then raw bytes; loading runs no code | [04](04_assembling_glm5.ipynb) |
# | MTP | multi-token prediction: an extra block that predicts tokens further ahead from the main model's hidden state | [05](05_mtp_speculative_decoding.ipynb) |
# | speculative decoding | a cheap drafter proposes several tokens, the full model checks them all in one forward and keeps the agreeing prefix | [05](05_mtp_speculative_decoding.ipynb) |
# | acceptance length | the mean number of tokens produced per forward of the full model in speculative decoding | [05](05_mtp_speculative_decoding.ipynb) |
# | bits per byte | the language-modelling loss in bits divided by the text's bytes, comparable across tokenizers | [06](06_train_classroom_glm5.ipynb) |
# | Muon | an optimizer that replaces each matrix's momentum by its nearest orthogonal matrix (approximately, by Newton-Schulz) | [07](07_muon_split.ipynb) |
# | Newton-Schulz | an iteration of odd matrix polynomials that pushes every singular value toward 1, approximating the orthogonal polar factor without an SVD | [07](07_muon_split.ipynb) |
# | Muon Split | Muon applied to each attention head's block of the up-projections separately, so heads update at their own scale | [07](07_muon_split.ipynb) |
# | QK-clip | shrinking the query and key weights whenever the largest attention logit passes a threshold; GLM-5 reports not needing it with Muon Split (paper section 2.1) | [07](07_muon_split.ipynb) |
# | REINFORCE | the plain policy gradient: raise the log-probability of each sampled output in proportion to its reward (minus a baseline) | [08](08_tito_agentic_rl.ipynb) |
# | GRPO | group relative policy optimization: sample several answers per prompt, use (reward - group mean) / group std as the advantage, with PPO's clipped ratio | [08](08_tito_agentic_rl.ipynb) |
# | IcePop | masking the tokens whose training-engine / inference-engine probability ratio leaves $[1/\beta, \beta]$ (paper section 3.2, Eq. 1) | [08](08_tito_agentic_rl.ipynb), [12](12_post_training.ipynb) |
# | TITO | token-in-token-out: the trainer receives the exact token ids (and log-probs) the sampler produced, never re-tokenized text | [08](08_tito_agentic_rl.ipynb) |
# | double-sided IS | importance sampling whose ratio is kept only inside a band on both sides, for samples from a stale policy | [08](08_tito_agentic_rl.ipynb) |
# | on-policy distillation | the student samples, and a teacher's log-probabilities on those samples give the advantage; GLM-5 uses it across RL stages | [12](12_post_training.ipynb) |
# | lse | the log-sum-exp of a row of scores, $\log \sum_j e^{s_j}$: lets softmax results over separate key blocks be merged exactly | [09](09_triton_kernels.ipynb) |
# | roofline | a kernel's speed bound: the smaller of peak compute and memory bandwidth times its operations per byte | [09](09_triton_kernels.ipynb) |
# | expert parallelism | placing different experts on different GPUs and moving tokens to them (an all-to-all exchange) | [10](10_scaling_out.ipynb) |
# | W4A8 | 4-bit integer weights with 8-bit activations; GLM-5's deployment format for the routed experts (paper section 5) | no notebook: `glm5_ref/quant.py` |

# %% [markdown]
# ## The check
#
# Three independent counts must agree for each config: the hand count above, the package's
# `GLM5Config.num_params` (its own arithmetic), and the sum of `numel()` over the tensors of a model
# actually built. Parameters whose name starts with `mtp.` are the MTP block.
#
# - GLM-5 is built on the meta device with its first 4 layers (3 dense, 1 MoE) and its MTP block: that
#   model holds every kind of tensor GLM-5 has, and the 78-layer model differs from it only by 74 more
#   copies of the MoE layer, whose tensors we count once and add 74 times. (Building all 78 layers takes
#   much longer in Python, for tens of thousands of `nn.Linear` modules: notebook 04 counts them;
#   `tests/test_model.py` builds the whole model.)
# - The classroom model is the shipped `classroom-base` checkpoint, loaded with its weights.

# %%
# check: hand count == package count == the tensors of a built model, with and without the MTP block
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.pretrained import load_pretrained


def built_counts(model, extra_moe_layers=0):
    """(without MTP, with MTP): the numel of the model's tensors, plus extra copies of its last (MoE) layer."""
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    main += extra_moe_layers * sum(p.numel() for p in model.model.layers[-1].parameters())
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    return main, main + mtp


n_built = config.first_k_dense_replace + 1
with torch.device("meta"):
    glm5_model = GLM5ForCausalLM(dataclasses.replace(config, num_hidden_layers=n_built))
assert glm5_model.model.layers[-1].is_moe and not glm5_model.model.layers[-2].is_moe
print(f"GLM-5 on the meta device: {n_built} layers built; the MoE layer's tensors are added "
      f"{config.num_hidden_layers - n_built} more times")
classroom_model, _ = load_pretrained("classroom-base")
classroom = GLM5Config.classroom()
assert classroom_model.config == classroom  # the shipped checkpoint has exactly the classroom preset's shapes
for name, c, model, extra in (("glm5", config, glm5_model, config.num_hidden_layers - n_built),
                              ("classroom", classroom, classroom_model, 0)):
    hand = count_by_hand(c)
    main, with_mtp = built_counts(model, extra)
    print(f"{name:9s} without MTP: hand {hand['total']:>15,}  package {c.num_params():>15,}  built {main:>15,}")
    print(f"{'':9s} with MTP:    hand {hand['total_with_mtp']:>15,}  package {c.num_params(include_mtp=True):>15,}"
          f"  built {with_mtp:>15,}")
    print(f"{'':9s} active:      hand {hand['active']:>15,}  package {c.num_params(active=True):>15,}")
    assert hand["total"] == c.num_params() == main
    assert hand["total_with_mtp"] == c.num_params(include_mtp=True) == with_mtp
    assert hand["active"] == c.num_params(active=True)
    assert hand["active_with_mtp"] == c.num_params(active=True, include_mtp=True)
assert count_by_hand(config)["total"] == 743_911_199_232 and count_by_hand(config)["active"] == 40_833_126_912
assert count_by_hand(classroom)["total"] == 13_065_472 and count_by_hand(classroom)["total_with_mtp"] == 16_602_880
experts_per_layer = len(glm5_model.model.layers[-1].mlp.experts)
print(f"{config.num_moe_layers} MoE layers x {experts_per_layer} routed experts = "
      f"{config.num_moe_layers * experts_per_layer:,} routed experts in GLM-5's main layers")
assert config.num_moe_layers * experts_per_layer == 19_200

# %% [markdown]
# ## Exercises
#
# 1. GLM-5 sends each token to 8 of 256 routed experts. Predict the active parameter count (without the MTP
#    block) if it used 16, then check with the package.
# 2. The KV cache can be stored in FP8 (an 8-bit floating-point format, 1 byte per value). Predict the
#    MLA + indexer-key cache, in GB, of one 131,072-token sequence in FP8, then check with
#    `config.kv_cache_bytes_per_token`.
# 3. Derive the parameters of GLM-5's MTP block from its parts (one MoE decoder block, three RMSNorms of
#    width $d$, the $2d \to d$ projection) and check it against the package.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
c = GLM5Config.glm5()
extra = c.num_moe_layers * (16 - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
prediction = c.num_params(active=True) + extra
print(f"predicted {prediction:,} active parameters ({prediction / 1e9:.1f}B), +{extra / 1e9:.1f}B")
assert dataclasses.replace(c, num_experts_per_tok=16).num_params(active=True) == prediction

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
c = GLM5Config.glm5()
prediction = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim + c.index_head_dim) * 1 * 131_072 / 1e9
print(f"predicted {prediction:.2f} GB in FP8")
assert abs(c.kv_cache_bytes_per_token(bytes_per_value=1) * 131_072 / 1e9 - prediction) < 1e-9

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
c = GLM5Config.glm5()
d = c.hidden_size
moe_block = (c.param_breakdown()["attention"] + c.param_breakdown()["indexer"]) // c.num_hidden_layers \
    + 2 * d + c.n_routed_experts * d + (c.n_routed_experts + c.n_shared_experts) * 3 * d * c.moe_intermediate_size
mtp = moe_block + 3 * d + 2 * d * d
print(f"MTP block: {mtp:,} parameters ({mtp / 1e9:.2f}B)")
assert mtp == c.num_params(include_mtp=True) - c.num_params() == 9_952_920_320
