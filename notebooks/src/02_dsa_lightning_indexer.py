# %% [markdown]
# # 02 · DeepSeek Sparse Attention: the lightning indexer and top-k attention
#
# **Prerequisites:** notebook 00a (RoPE, RMSNorm), 01 (MLA: the q latent $c^Q$, the latent cache
# $c^{KV}$ + $k^R$, the absorbed decode path). **Reading time:** about 35 minutes (it runs in about 20 s under make test, 2 cores).
#
# Notebook 01 ended with the decode cost of absorbed MLA: per generated token, every head does
# $576 + 512$ multiply-adds **per cached token**. With 64 heads that is 69,632 multiply-adds per cached token
# and layer, so the cost grows linearly with the context: about 14 billion per layer per token at 200K.
# GLM-5 keeps MLA but lets each query attend to only $k = 2048$ of its past keys (the "$k = 2048$ used by the
# indexer", paper section 3.2, "DSA RL insights"). A cheap **lightning
# indexer** scores every past key, the top $k$ are kept, and MLA runs over those alone (DeepSeek Sparse
# Attention, DSA, from DeepSeek-V3.2; GLM-5 adopts it in paper section 2.1.1). This notebook:
#
# 1. derives the indexer's score from its formula and checks it against `glm5_ref.dsa`;
# 2. derives top-k selection and sparse attention, and shows that DSA *is* dense MLA while the context
#    fits in $k$;
# 3. shows why the indexer can run in cheap arithmetic: ReLU lets positive scales move freely, a Hadamard
#    rotation changes no score, and FP8 changes few selections;
# 4. trains the indexer to imitate the main attention (the dense warm-up stage) and measures how much
#    attention mass its top-k then captures;
# 5. counts what DSA saves per generated token at GLM-5 size, and times a decode step on this machine.
#
# As in notebook 01, cells that start with `# derivation` use only `torch`; every other cell imports from
# `glm5_ref`, and the `# check` cell before the exercises asserts that the derivation and the package agree.
# The diagram is the whole pipeline for one query token, with GLM-5's widths (the classroom model's $k$ is
# 128; the derivations below use $k = 16$ so that a 48-token sequence is already "long").

# %%
import dataclasses
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from glm5_ref.apps.diagrams.dsa import dsa_pipeline
from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config
from glm5_ref.dsa import (DSAAttention, attention_target, fp8_simulate, fp8_topk_agreement, freeze_all_but_indexers,
                          hadamard_matrix, hadamard_rotate, select_topk)
from glm5_ref.mla import MLA

torch.manual_seed(0)
torch.set_num_threads(1)  # one thread throughout: small tensors gain nothing from two; timings are steadier


def rel(a, b):
    """Relative error ||a - b|| / ||b||."""
    return float((a - b).norm() / b.norm())


checks = {}  # derivation vs package, asserted in the `# check` cell
show_figure(dsa_pipeline(GLM5Config.glm5(), GLM5Config.classroom()), "02_dsa_pipeline.png");

# %% [markdown]
# ## 1. The lightning indexer
#
# The indexer is a second, much smaller attention that only *scores*. With $c^Q_t$ the normed query latent of
# MLA (notebook 01) and $h_s$ the layer input:
#
# $$q^I_{t,j} = W^{IQ}_j c^Q_t, \qquad k^I_s = \mathrm{LayerNorm}(W^{IK} h_s), \qquad
# w_{t,j} = \frac{(W^{Iw} h_t)_j}{\sqrt{H_I}},$$
#
# $$I_{t,s} = \sum_{j=1}^{H_I} w_{t,j}\; \mathrm{ReLU}\!\Big(\frac{q^I_{t,j} \cdot k^I_s}{\sqrt{d_I}}\Big).$$
#
# GLM-5 uses $H_I = 32$ indexer heads of width $d_I = 128$ (the released configuration; DeepSeek-V3.2 uses 64
# heads). Three things make it cheap:
#
# - **one key per token**, shared by all indexer heads (like multi-query attention), so the cache grows by
#   only 128 values per token;
# - **no softmax over keys**: the score only has to *rank* keys, so each head contributes a rectified dot
#   product, and a per-query weight $w_{t,j}$ (any sign) says how much to trust each head;
# - **no values**: nothing is averaged, so the cost per key is $H_I d_I = 4096$ multiply-adds, against
#   $64 \times 1088 = 69{,}632$ for absorbed MLA.
#
# RoPE rotates the **first** $d_r$ dimensions of $q^I$ and $k^I$ (MLA rotates the last $d_r$ of its queries),
# with the same interleaved pairs as MLA. Below, the score written from the checkpoint tensors with explicit
# loops over query and key, at the classroom size ($H_I = 4$, $d_I = 32$, $d_r = 16$) with $k = 16$.

# %%
# derivation: the indexer score I[t, s] from the checkpoint tensors, for one sequence x (T, d)
def rms_norm(h, w, eps):
    return w * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def rope(x, pos, theta):
    """Interleaved RoPE of notebook 01: x (..., T, D), pos (T,); pair (2j, 2j+1) turns by pos * theta^(-2j/D)."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    turn = torch.polar(torch.ones(len(pos), D // 2, dtype=torch.float64), pos[:, None].double() * freqs)  # (T, D/2)
    z = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())  # (..., T, D/2)
    return torch.view_as_real(z * turn).flatten(-2).to(x.dtype)  # (..., T, D)


def indexer_inputs(x, W, cfg):
    """Indexer queries (T, J, d_I), keys (T, d_I) and head weights (T, J) of one sequence."""
    J, dI, dr = cfg["J"], cfg["dI"], cfg["dr"]
    pos = torch.arange(x.shape[0])
    c_q = rms_norm(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], cfg["eps"])  # (T, r_q): MLA's latent
    q = (c_q @ W["indexer.wq_b.weight"].T).view(-1, J, dI)  # (T, J, d_I)
    q_rot = rope(q[..., :dr].transpose(0, 1), pos, cfg["theta"]).transpose(0, 1)  # RoPE on the FIRST d_r dims
    q = torch.cat([q_rot, q[..., dr:]], dim=-1)
    k = F.layer_norm(x @ W["indexer.wk.weight"].T, (dI,), W["indexer.k_norm.weight"], W["indexer.k_norm.bias"],
                     eps=1e-6)  # (T, d_I): one key per token, LayerNorm with bias
    k = torch.cat([rope(k[:, :dr], pos, cfg["theta"]), k[:, dr:]], dim=-1)
    w = (x @ W["indexer.weights_proj.weight"].T) / J**0.5  # (T, J)
    return q, k, w


def indexer_scores_loops(x, W, cfg):
    q, k, w = indexer_inputs(x, W, cfg)
    T = x.shape[0]
    scores = torch.zeros(T, T)
    for t in range(T):
        for s in range(T):  # every key, future ones included: the selection masks them
            scores[t, s] = (w[t] * torch.relu(q[t] @ k[s] / cfg["dI"] ** 0.5)).sum()  # sum over heads j
    return scores


# %% [markdown]
# The package's `DSAAttention` is MLA (the same seven tensors as notebook 01) plus an `indexer` submodule
# holding the four indexer tensors under the checkpoint's names.

# %%
config = dataclasses.replace(GLM5Config.classroom(), index_topk=16)  # k = 16, so T = 48 tokens is "long"
k_top = config.index_topk
model = DSAAttention(config)
W = {name: t.detach() for name, t in model.state_dict().items()}
print([name for name in W if name.startswith("indexer.")])
cfg = dict(J=config.index_n_heads, dI=config.index_head_dim, dr=config.qk_rope_head_dim, eps=config.rms_norm_eps,
           theta=config.rope_theta, heads=config.num_attention_heads, d_n=config.qk_nope_head_dim,
           d_v=config.v_head_dim, r_kv=config.kv_lora_rank)

T = 48
x = torch.randn(1, T, config.hidden_size)  # (B, T, d)
pos = torch.arange(T)
with torch.no_grad():
    package_scores = model.indexer(x, model.q_latent(x), pos)  # (B, T, S): every key, future ones too
derived_scores = indexer_scores_loops(x[0], W, cfg)
checks["indexer scores"] = rel(package_scores[0], derived_scores)
print(f"indexer scores, package vs loops: {checks['indexer scores']:.1e}")
print(f"scores that are exactly 0 (every head's ReLU is off): {float((package_scores == 0).float().mean()):.1%}")

# %% [markdown]
# ## 2. Top-k selection and sparse attention
#
# Each query $t$ keeps the $k$ best-scored keys among $s \le t$ (all of them while $t + 1 \le k$):
#
# $$S_t = \mathrm{TopK}_{s \le t}\big(I_{t,s},\; \min(k, t + 1)\big).$$
#
# One selection serves **all** 64 heads of the query: in the absorbed form every head attends over the same
# latents anyway (notebook 01), so gathering $k$ latents once per query is enough. Exact ties are common
# (the fraction of exactly-zero scores is printed above), and `glm5_ref` breaks them toward the **most recent** key,
# so the selection depends on the scores alone, and decoding token by token with a cache selects what a
# full forward selects.

# %%
# derivation: top-k over the causal keys, ties to the most recent key, -1 pads rows with fewer than k keys
def topk_derived(scores, k):
    """scores (T, S) -> (T, k) key positions, best first."""
    rows = []
    for t, row in enumerate(scores.tolist()):
        ranked = sorted(range(t + 1), key=lambda s: (row[s], s), reverse=True)[:k]  # score first, then recency
        rows.append(ranked + [-1] * (k - len(ranked)))
    return torch.tensor(rows)


derived_topk = topk_derived(package_scores[0], k_top)
package_topk = select_topk(package_scores, pos, k_top)  # (B, T, k)
checks["top-k selection (mismatches)"] = float((package_topk[0] != derived_topk).sum())
print("query 3 keeps:", package_topk[0, 3].tolist())
print("query 40 keeps:", sorted(package_topk[0, 40].tolist()))

# %% [markdown]
# Sparse attention is then MLA with one more mask: query $t$ sees key $s$ only if $s \le t$ **and**
# $s \in S_t$. Written in the absorbed form of notebook 01:

# %%
# derivation: absorbed MLA over the selected keys only (logits of unselected keys are -inf)
def mla_absorbed_sparse(x, W, cfg, selected):
    """x (T, d); selected (T, k) key positions (-1 = none). Returns the layer output (T, d)."""
    H, d_n, r_kv, dr = cfg["heads"], cfg["d_n"], cfg["r_kv"], cfg["dr"]
    T, pos = x.shape[0], torch.arange(x.shape[0])
    c_q = rms_norm(x @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], cfg["eps"])  # (T, r_q)
    q = (c_q @ W["q_b_proj.weight"].T).view(T, H, d_n + dr).transpose(0, 1)  # (H, T, d_n + d_r)
    q_c, q_r = q[..., :d_n], rope(q[..., d_n:], pos, cfg["theta"])  # MLA: RoPE on the LAST d_r dims
    kv_a = x @ W["kv_a_proj_with_mqa.weight"].T  # (T, r_kv + d_r)
    c_kv = rms_norm(kv_a[:, :r_kv], W["kv_a_layernorm.weight"], cfg["eps"])  # (S, r_kv)
    k_r = rope(kv_a[:, r_kv:], pos, cfg["theta"])  # (S, d_r)
    W_ukv = W["kv_b_proj.weight"].view(H, d_n + cfg["d_v"], r_kv)
    q_hat = torch.einsum("htn,hnr->htr", q_c, W_ukv[:, :d_n])  # (H, T, r_kv): W^UK folded into the query
    logits = (torch.einsum("htr,sr->hts", q_hat, c_kv) + torch.einsum("htp,sp->hts", q_r, k_r)) / (d_n + dr) ** 0.5
    keep = torch.zeros(T, T, dtype=torch.bool)
    for t in range(T):
        keep[t, [s for s in selected[t].tolist() if 0 <= s <= t]] = True  # selected AND causal
    probs = logits.masked_fill(~keep, float("-inf")).softmax(-1)  # (H, T, S)
    o = torch.einsum("hts,sr,hvr->htv", probs, c_kv, W_ukv[:, d_n:])  # average latents, then W^UV
    return o.transpose(0, 1).reshape(T, -1) @ W["o_proj.weight"].T  # (T, d)


derived_sparse = mla_absorbed_sparse(x[0], W, cfg, derived_topk)
with torch.no_grad():
    package_sparse = {"absorbed, gathered": model(x, absorbed=True)[0]}  # decode path: gathers k latents/query
    package_sparse["absorbed, masked"] = model(x, absorbed=True, sparse_impl="masked")[0]  # -inf outside S_t
    package_sparse["expanded, masked"] = model(x)[0]  # training path
for name, out in package_sparse.items():
    checks[f"sparse attention ({name})"] = rel(out, derived_sparse)
    print(f"sparse attention, package {name:20s} vs derivation: {checks[f'sparse attention ({name})']:.1e}")

# %% [markdown]
# ### While the context fits in $k$, DSA is dense MLA
#
# With $t + 1 \le k$ every causal key is selected, so the top-k mask removes nothing. `DSAAttention` then
# does not even build the mask: for $T \le k$ it returns *bit for bit* what a plain `MLA` with the same
# weights returns. GLM-5's $k = 2048$, so sparsity only starts after 2048 tokens; for longer sequences
# the outputs differ from the first query that has more than $k$ causal keys.

# %%
mla = MLA(config)
mla.load_state_dict({name: t for name, t in W.items() if not name.startswith("indexer.")})
with torch.no_grad():
    short_equal = torch.equal(model(x[:, :k_top]), mla(x[:, :k_top]))
    first_rows = rel(model(x)[:, :k_top], mla(x)[:, :k_top])  # queries 0..k-1 keep every causal key
    later_rows = rel(model(x)[:, k_top:], mla(x)[:, k_top:])
print(f"T = {k_top} <= k: DSA == MLA bit for bit: {short_equal}")
print(f"T = {T}: queries t < k differ from MLA by {first_rows:.1e}, queries t >= k by {later_rows:.2f}")
checks["T <= k: DSA - MLA"] = 0.0 if short_equal else 1.0

# %% [markdown]
# ## 3. Cheap arithmetic for the indexer
#
# The indexer scores *every* past key for every query, so in production it runs in FP8 (DeepSeek-V3.2's
# kernels): $q^I$ and $k^I$ are rotated by a Hadamard matrix, quantised to float8 e4m3 in blocks of 128
# values with one positive scale per block, and the scores are computed from the 8-bit values. Two
# properties of the formula make this legitimate.
#
# **ReLU is positively homogeneous:** $\mathrm{ReLU}(a z) = a\,\mathrm{ReLU}(z)$ for $a > 0$. A quantised
# query is $q = \sigma_q \tilde q$ and a quantised key $k = \sigma_k \tilde k$ with positive scales, so
#
# $$I_{t,s} = \sum_j w_{t,j}\, \mathrm{ReLU}(\sigma_{q,t,j} \sigma_{k,s}\, \tilde q_{t,j} \cdot \tilde k_s)
# = \sigma_{k,s} \sum_j \big(w_{t,j}\, \sigma_{q,t,j}\big)\, \mathrm{ReLU}(\tilde q_{t,j} \cdot \tilde k_s).$$
#
# The kernel folds the query scale into the head weight once per (query, head), runs the 8-bit dot products,
# and applies the key scale once per key: no dequantisation inside the loop. For the same reason the
# constants $1/\sqrt{d_I}$ and $1/\sqrt{H_I}$ can sit anywhere, and any positive factor on a query's whole row
# of scores leaves its ranking, hence its top-k, unchanged. It must be *positive*: with a negative scale
# the ReLU would switch off the terms it used to keep. (The head weights $w_{t,j}$ themselves may have
# either sign: a head can vote against keys.)

# %%
ix = model.indexer
with torch.no_grad():
    q, k, w = ix.queries(model.q_latent(x), pos), ix.keys(x, pos), ix.head_weights(x)  # (B,T,J,I), (B,S,I), (B,T,J)
    scale_q = torch.rand(1, T, config.index_n_heads, 1) + 0.1  # one positive scale per (query, head)
    scale_k = torch.rand(1, T, 1) + 0.1  # one positive scale per key
    scaled_inputs = ix.scores(q * scale_q, k * scale_k, w)
    scales_outside = scale_k.transpose(1, 2) * ix.scores(q, k, w * scale_q[..., 0])  # (B, T, S)
    checks["scales pulled out of the ReLU"] = rel(scaled_inputs, scales_outside)
    flipped = ix.scores(-q, k, w)  # a negative scale
    row_scaled = select_topk(8.0 * package_scores, pos, k_top)  # a positive factor on every score
print(f"positive scales moved out of the ReLU: {checks['scales pulled out of the ReLU']:.1e}")
print(f"negative scale: ReLU(-z) != -ReLU(z), scores change by {rel(flipped, -package_scores):.2f}")
print("top-k unchanged when every score is multiplied by 8:", torch.equal(row_scaled, package_topk))
checks["top-k after a positive rescale (mismatches)"] = float((row_scaled != package_topk).sum())

# %% [markdown]
# **A Hadamard rotation changes no score.** The normalised Hadamard matrix $H$ ($\pm 1/\sqrt{n}$ entries) is
# orthogonal, $H H^\top = I$, so $(qH) \cdot (kH) = q^\top H H^\top k = q \cdot k$ for every pair: rotating both
# queries and keys leaves every score, and every selection, exactly as it was (up to rounding). What it
# changes is how values are spread over the dimensions: a vector with one large coordinate becomes a vector
# of equal-sized coordinates, which is the friendliest input for a quantiser with one scale per block.

# %%
H32 = hadamard_matrix(32)
print(f"H H^T = I: max deviation {float((H32 @ H32.T - torch.eye(32)).abs().max()):.1e}")
with torch.no_grad():
    rotated = ix.scores(hadamard_rotate(q), hadamard_rotate(k), w)
checks["Hadamard-rotated scores"] = rel(rotated, package_scores)
print(f"scores after rotating q and k: relative change {checks['Hadamard-rotated scores']:.1e}")
spike = 0.05 * torch.randn(128)
spike[7] = 10.0  # one outlier coordinate
for name, v in (("before", spike), ("after", hadamard_rotate(spike))):
    print(f"largest |coordinate| / RMS {name} rotation: {float(v.abs().max() / v.pow(2).mean().sqrt()):5.1f}")

# %% [markdown]
# **What FP8 costs.** `fp8_simulate` rounds to float8 e4m3 (3 mantissa bits) with one scale per block and
# converts back, which is what an FP8 kernel computes with. Each value moves by a few percent, and a score
# near the top-k boundary can swap with its neighbour. `fp8_topk_agreement` measures the fraction of the
# full-precision top-k that the FP8 indexer (Hadamard rotation included) still selects.

# %%
with torch.no_grad():
    x_long = torch.randn(4, 128, config.hidden_size)
    q_err = rel(fp8_simulate(q), q)
    agreement = fp8_topk_agreement(ix, x_long, model.q_latent(x_long), topk=k_top)
print(f"FP8 e4m3 round trip of the indexer queries: relative error {q_err:.1%}")
print(f"top-{k_top} keys of 4 x 128 queries that the FP8 indexer still selects: {agreement:.1%}")

# %% [markdown]
# Nearly all the selected keys survive FP8 (the fraction is printed above), at half the bytes of bf16 and
# twice the tensor-core rate; the keys that swap sit at the boundary of the top-k, where scores are nearly
# equal. (GLM-5 found a different
# source of disagreement harmful: a *non-deterministic* top-k kernel collapsed RL training, so it uses a
# deterministic `torch.topk`, as `glm5_ref` does; paper section 3.2, "DSA RL insights".)
#
# ## 4. Training the indexer: the dense warm-up
#
# A freshly initialised indexer ranks keys at random. It is trained to imitate the main attention. The
# target for query $t$ is the main attention summed over heads and normalised,
# $p_{t,s} = \sum_i a_{t,s,i} / \sum_{s'} \sum_i a_{t,s',i}$ (`attention_target`, detached), and the indexer's
# distribution is the softmax of its scores over the causal keys. Stage 1, the **dense warm-up**, keeps
# attention dense, freezes everything but the indexer, and minimises
#
# $$\mathcal L^I = \frac{1}{T} \sum_t \mathrm{KL}\big(p_{t,:} \,\big\|\, \mathrm{softmax}_{s \le t}(I_{t,:})\big).$$
#
# (GLM-5 ran 1000 such steps on 14 sequences of 202,752 tokens each, paper section 2.1.1; stage 2 then
# switches top-k on and trains everything, the indexer still on its KL only.) Here: one `DSAAttention` layer
# at the classroom size, on sequences of $T = 96$ tokens drawn from a vocabulary of 24 random embeddings, so
# that the same tokens recur and the attention has a pattern to learn. A freshly initialised MLA attends
# almost uniformly (its random logits are small), so we multiply $W^{UQ}$ by 16 to sharpen it the way
# training would.

# %%
torch.manual_seed(0)
T_w, vocab = 96, 24
layer = DSAAttention(config)
with torch.no_grad():
    layer.q_b_proj.weight.mul_(16.0)  # a sharper (random) main attention
embeddings = torch.randn(vocab, config.hidden_size)


def sequences(n):
    return embeddings[torch.randint(0, vocab, (n, T_w))]  # (n, T, d)


main = MLA(config)  # the main attention alone, sharing the layer's weights, to read its probabilities
main.load_state_dict({n: t for n, t in layer.state_dict().items() if not n.startswith("indexer.")})
x_eval = sequences(16)
pos_w = torch.arange(T_w)
causal = pos_w[None, :] <= pos_w[:, None]  # (T, S)
late = pos_w >= k_top  # queries with more than k causal keys: where the selection is a real choice


def snapshot():
    """Main-attention target p, the indexer's distribution, and the attention mass its top-k captures."""
    with torch.no_grad():
        probs = main.attend(x_eval, return_probs=True).probs  # (B, H, T, S)
        p = attention_target(probs)  # (B, T, S)
        scores = layer.indexer(x_eval, layer.q_latent(x_eval), pos_w)  # (B, T, S)
        selected = select_topk(scores, pos_w, k_top)  # (B, T, k)
        captured = (torch.gather(p, -1, selected.clamp_min(0)) * (selected >= 0)).sum(-1)  # (B, T)
        with_sparse = layer(x_eval)  # sparse attention with this indexer's selection
    return {"p": p, "q": scores.masked_fill(~causal, float("-inf")).softmax(-1), "captured": captured,
            "mass": float(captured[:, late].mean()), "sparse_vs_dense": rel(with_sparse, main(x_eval).detach())}


before = snapshot()
trainable = freeze_all_but_indexers(layer)
print("trainable:", trainable)
optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-3)
start, losses = time.time(), []
for step in range(300):
    loss = layer.attend(sequences(8), sparse=False, indexer_loss=True).indexer_loss  # stage 1: dense attention
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step % 100 == 0 or step == 299:
        print(f"step {step:3d}   KL {loss.item():.3f}")
print(f"{len(losses)} steps in {time.time() - start:.1f} s")
after = snapshot()

# %% [markdown]
# The heat maps show one sequence: the main attention's target $p$ (left) and the indexer's softmax over
# causal keys before and after the warm-up. Before, the indexer's softmax is spread almost evenly over the
# causal keys; after, it lights up where the main attention does, key for key.

# %%
def heat(ax, m, title):
    ax.imshow(m, cmap="magma", vmin=0, vmax=float(before["p"][0].quantile(0.995)))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key s")


fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
heat(axes[0], before["p"][0], "main attention (summed over heads)")
heat(axes[1], before["q"][0], f"indexer before warm-up\n(its top-{k_top} holds {before['mass']:.0%} of the mass)")
heat(axes[2], after["q"][0], f"indexer after {len(losses)} warm-up steps\n(its top-{k_top} holds {after['mass']:.0%})")
axes[0].set_ylabel("query t")
fig.suptitle("where the main attention goes, and where the indexer looks (one sequence)", fontsize=11, y=1.03)
fig.tight_layout()
show_figure(fig, "02_attention_vs_indexer.png", dpi=100)

with torch.no_grad():
    p = before["p"]
    oracle = float(p.topk(k_top, dim=-1).values.sum(-1)[:, late].mean())  # the k largest p: the best any top-k can do
    uniform = float((k_top / (pos_w[late] + 1.0)).mean())  # k random causal keys of uniform attention
print(f"attention mass in the top-{k_top} keys, queries t >= {k_top} ({int(late.sum())} per sequence):")
print(f"  {'k random keys (uniform attention)':38s} {uniform:.1%}")
print(f"  {'indexer before warm-up':38s} {before['mass']:.1%}")
print(f"  {'indexer after warm-up':38s} {after['mass']:.1%}")
print(f"  {'best possible (top-k of p itself)':38s} {oracle:.1%}")
print(f"sparse layer output vs dense: relative difference {before['sparse_vs_dense']:.3f} before, "
      f"{after['sparse_vs_dense']:.3f} after")
assert after["mass"] > before["mass"] + 0.2 and after["sparse_vs_dense"] < before["sparse_vs_dense"]
assert losses[-1] < 0.5 * losses[0]

# %% [markdown]
# A few hundred warm-up steps (their time is printed above) take the indexer from a random choice to one that
# holds most of the attention mass, close to the best any 16 keys could hold; the sparse layer's output moves
# toward the dense one accordingly. This is the paper's finding in miniature: the warm-up alone recovers most
# of the quality (section 2.1.2, Table 6: RULER of GLM-4.7-Flash with DSA), and sparse training then closes
# most of the remaining gap.
#
# ## 5. What DSA saves per generated token
#
# Count the multiply-adds of one decode step that depend on the context length $L$ (the projections and the
# folds of notebook 01 cost the same at any $L$). Dense absorbed MLA: per head and cached token, a
# $(r_{kv} + d_r)$-wide logit and an $r_{kv}$-wide multiply-add into the latent average. DSA: the indexer over
# every key, then the same absorbed attention over at most $k$ keys:
#
# $$\text{dense}(L) = H\,(2 r_{kv} + d_r)\,L = 69{,}632\,L, \qquad
# \text{DSA}(L) = H_I d_I\, L + H\,(2 r_{kv} + d_r) \min(k, L) = 4096\,L + 69{,}632 \min(2048, L).$$
#
# (The indexer's weighted sum over heads adds $H_I = 32$ more per key; we leave it out.) The two cross where
# $69{,}632\,L = 4096\,L + 69{,}632\,k$, at $L^* = k \cdot 69{,}632 / 65{,}536 = 17k/16 = 2176$. Beyond that DSA's
# cost grows 17 times more slowly, and the ratio tends to $69{,}632 / 4096 = 17$.

# %%
glm5 = GLM5Config.glm5()
H, r_kv, d_r = glm5.num_attention_heads, glm5.kv_lora_rank, glm5.qk_rope_head_dim
H_I, d_I, k_glm = glm5.index_n_heads, glm5.index_head_dim, glm5.index_topk


def dense_macs(L):
    return H * (2 * r_kv + d_r) * L


def dsa_macs(L):
    return H_I * d_I * L + H * (2 * r_kv + d_r) * min(k_glm, L)


crossover = H * (2 * r_kv + d_r) * k_glm / (H * (2 * r_kv + d_r) - H_I * d_I)
fixed_macs = (glm5.hidden_size * glm5.q_lora_rank + glm5.q_lora_rank * H * glm5.qk_head_dim
              + glm5.hidden_size * (r_kv + d_r) + H * (glm5.qk_nope_head_dim + glm5.v_head_dim) * r_kv
              + H * glm5.v_head_dim * glm5.hidden_size)  # projections and folds: the same at every L
print(f"multiply-adds per cached token: dense absorbed MLA {H * (2 * r_kv + d_r):,}, indexer {H_I * d_I:,} "
      f"(ratio {H * (2 * r_kv + d_r) / (H_I * d_I):.0f})")
print(f"crossover at L* = {crossover:.0f} cached tokens")
for L in (4096, 32768, 131072, glm5.max_position_embeddings):
    print(f"L = {L:7,d}: dense {dense_macs(L) / 1e9:6.2f} G, DSA {dsa_macs(L) / 1e9:5.2f} G "
          f"(indexer {H_I * d_I * L / 1e9:4.2f} G), ratio {dense_macs(L) / dsa_macs(L):4.1f}x")
print(f"projections and folds, at any L: {fixed_macs / 1e6:.0f} M")

# %% [markdown]
# Now the measurement: one GLM-5-size layer (random fp32 weights; the cell prints how many), a cache filled
# with $L$ random tokens, and one new token, dense (`MLA`, absorbed) against DSA (`DSAAttention`, absorbed,
# gathered), at small contexts so that this notebook stays fast. **Timings are machine-dependent:** they are
# measured on whatever machine runs the notebook, at that moment, on one thread, so the printed table (not
# this text) is the result; `python -m glm5_ref bench dsa-decode` does the same at 32K and 128K. The dashed
# line is a step over a 1-token context: reading the layer's weights, which every step pays.

# %%
from glm5_ref.apps.bench import timeit
from glm5_ref.apps.bench.dsa_decode import attention_core_macs, fill_cache, interleaved, shared_mla
from glm5_ref.dsa import DSACache

measured = {}
with torch.no_grad():
    torch.manual_seed(0)
    big = DSAAttention(glm5).eval()
    big_mla = shared_mla(big)  # the same tensors, no indexer
    n_layer = sum(p.numel() for p in big.parameters())
    n_indexer = sum(p.numel() for n, p in big.named_parameters() if n.startswith("indexer."))
    print(f"one GLM-5-size layer: {n_layer / 1e6:.0f}M weights, of which the indexer {n_indexer / 1e6:.1f}M")
    token = torch.randn(1, 1, glm5.hidden_size)
    empty = DSACache.for_config(glm5, 1, 1)

    def one_token(module, cache, L):
        out = module(token, cache=cache, absorbed=True)  # appends the token at slot L ...
        cache.truncate(L)  # ... and forgets it, so every repeat sees the same context
        return out

    fixed_ms = timeit(lambda: one_token(big_mla, empty, 0), repeats=5)
    for L in (2048, 4096, 8192, 16384):
        cache = DSACache.for_config(glm5, 1, L + 1)
        fill_cache(big, cache, L)  # random normed latents, rope keys and indexer keys
        measured[L] = interleaved({"dense": lambda: one_token(big_mla, cache, L),
                                   "dsa": lambda: one_token(big, cache, L)}, repeats=5)
        print(f"L = {L:6,d}: dense {measured[L]['dense']:6.1f} ms, DSA {measured[L]['dsa']:6.1f} ms, "
              f"DSA / dense {measured[L]['dsa'] / measured[L]['dense']:.2f}")
    print(f"step over a 1-token context: {fixed_ms:.1f} ms")
    del big, big_mla, cache

# %%
Ls = torch.logspace(10, 17.7, 200, base=2).tolist()  # 1K .. 200K
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
ax1.plot(Ls, [dense_macs(L) for L in Ls], color="tab:red", label="dense absorbed MLA")
ax1.plot(Ls, [dsa_macs(L) for L in Ls], color="tab:blue", label=f"DSA: indexer + attention over k = {k_glm}")
ax1.plot(Ls, [H_I * d_I * L for L in Ls], color="tab:blue", ls=":", lw=1, label="   of which the indexer")
ax1.axhline(fixed_macs, color="gray", ls="--", lw=1, label="projections (any context)")
ax1.axvline(crossover, color="black", lw=0.8, ls=":")
ax1.annotate(f"crossover L* = {crossover:.0f}", (crossover, dsa_macs(crossover)), xytext=(1100, 2.5e7), fontsize=8,
             arrowprops=dict(arrowstyle="->", lw=0.8))
for L in (32768, 131072):  # the saving, as a double arrow between the two curves
    ax1.annotate("", (L, dsa_macs(L)), xytext=(L, dense_macs(L)), arrowprops=dict(arrowstyle="<->", lw=0.8))
    ax1.text(L * 1.08, (dense_macs(L) * dsa_macs(L)) ** 0.5, f"{dense_macs(L) / dsa_macs(L):.1f}x\nat {L // 1024}K",
             fontsize=8, va="center")
ax1.set_ylim(3e6, None)
ax1.set_xscale("log")
ax1.set_yscale("log")
ax1.set_xlabel("context length L (tokens)")
ax1.set_ylabel("multiply-adds per generated token, one layer")
ax1.set_title("attention-core arithmetic, GLM-5 dimensions")
ax1.legend(fontsize=8, loc="upper left")
Lm = list(measured)
ax2.plot(Lm, [measured[L]["dense"] for L in Lm], "o-", color="tab:red", label="dense absorbed MLA")
ax2.plot(Lm, [measured[L]["dsa"] for L in Lm], "o-", color="tab:blue", label="DSA (gathered)")
ax2.axhline(fixed_ms, color="gray", ls="--", lw=1, label="step over a 1-token context")
ax2.set_xscale("log", base=2)
ax2.set_xticks(Lm, [f"{L // 1024}K" for L in Lm])
ax2.set_ylim(0, None)
ax2.set_xlabel("context length L (tokens)")
ax2.set_ylabel("ms per decode step")
ax2.set_title("measured: one GLM-5-size layer, fp32, 1 CPU thread\n(on the machine that ran this notebook)",
              fontsize=10)
ax2.legend(fontsize=8)
fig.tight_layout()
show_figure(fig, "02_dsa_cost.png", dpi=100)
assert all(attention_core_macs(glm5, L, sparse=False) == dense_macs(L) for L in (100, 4096, 131072))
assert all(attention_core_macs(glm5, L, sparse=True) == dsa_macs(L) for L in (100, 4096, 131072))
assert 2150 < crossover < 2200 and 13 < dense_macs(131072) / dsa_macs(131072) < 14

# %% [markdown]
# What to look for in the printed table (the exact times vary from machine to machine and run to run). Near
# $L = k$ DSA gains nothing: it attends over (almost) every key like dense MLA does, and pays on top for the
# indexer (whose weights the cell counted) and for gathering the selected latents, so there it is about as
# fast as dense or slower. As $L$ grows past $k$, the dense step grows with $L$ while the DSA step grows much
# more slowly. And neither step starts from zero: at batch size 1 a decode step first reads all the layer's
# weights (the dashed line; matrix-vector products, bound by memory bandwidth), which takes longer than the
# attention itself until the context reaches tens of thousands of tokens. So a whole step speeds up far less
# than the attention core's ratio at 128K in the arithmetic table suggests (`python -m glm5_ref bench
# dsa-decode` measures it), and the paper itself reports more modest gains for the whole system: "roughly
# 1.5-2x" less attention computation on long sequences and 128K contexts "at half the GPU cost" (section 2.1.1).
#
# ## Summary
#
# - The lightning indexer scores every past key with $\sum_j w_{t,j}\,\mathrm{ReLU}(q^I_{t,j} \cdot k^I_s / \sqrt{d_I})$:
#   one 128-wide key per token, 32 heads, no softmax, no values; 4096 multiply-adds per key, 17 times less than
#   absorbed MLA.
# - Each query keeps its top $k = 2048$ causal keys (ties to the most recent) and all 64 heads attend over
#   those; while the context fits in $k$, DSA is exactly dense MLA.
# - ReLU's positive homogeneity lets positive quantisation scales move out of the inner loop, and a Hadamard
#   rotation changes no score; in FP8 the indexer still picks about 98% of the same keys.
# - A dense warm-up on a KL to the main attention teaches the indexer where attention goes: here its top-16
#   went from a random fraction of the attention mass to most of it.
# - At GLM-5 size, from $L^* = 2176$ tokens on, DSA needs fewer attention multiply-adds per generated token,
#   13.4 times fewer at 128K (131,072 tokens), and the ratio tends to 17 at long contexts.
#
# The last check: the derivation and `glm5_ref.dsa` agree.

# %%
# check: the derivations (indexer score, top-k, sparse attention, the scale and rotation identities) equal glm5_ref.dsa
for name, err in checks.items():
    assert err < 1e-5, (name, err)
print("derivation == glm5_ref.dsa:", {k: f"{v:.1e}" for k, v in checks.items()})

# %% [markdown]
# ## Exercises
#
# 1. Halve GLM-5's $k$ to 1024. Predict the crossover context $L^*$ from which DSA needs fewer attention-core
#    multiply-adds than dense MLA, then check with `glm5_ref.apps.bench.dsa_decode.attention_core_macs`.
# 2. Multiply every indexer head weight $w_{t,j}$ by 3, then by $-1$. Predict, for each, whether the top-$k$
#    selection of section 2 changes; then check with `ix.scores` and `select_topk`.
# 3. Raise the layer's $k$ from 16 to $T = 48$. Predict how the `DSAAttention` output over the 48 tokens then
#    compares with plain `MLA` with the same weights, and check.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1: L* = k * 69,632 / (69,632 - 4096) = 17k/16
k_half = 1024
prediction = k_half * 17 / 16
half_k = dataclasses.replace(glm5, index_topk=k_half)
first_cheaper = next(L for L in range(k_half, 4 * k_half)
                     if attention_core_macs(half_k, L, sparse=True) < attention_core_macs(half_k, L, sparse=False))
print(f"k = {k_half}: predicted L* = {prediction:.0f}; the first L with fewer DSA multiply-adds: {first_cheaper}")
assert first_cheaper == int(prediction) + 1  # at L* itself the two are equal

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2: a positive factor on every head weight scales every score: same ranking. -1 flips the ranking.
with torch.no_grad():
    tripled = select_topk(ix.scores(q, k, 3.0 * w), pos, k_top)
    negated = select_topk(ix.scores(q, k, -w), pos, k_top)
print("x3: selection unchanged:", torch.equal(tripled, package_topk),
      "| x(-1): keys that change:", int((negated.sort(-1).values != package_topk.sort(-1).values).sum()))
assert torch.equal(tripled, package_topk) and not torch.equal(negated, package_topk)

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3: with k >= T every causal key is selected, so DSA is dense MLA, bit for bit
wide = DSAAttention(dataclasses.replace(config, index_topk=T))
wide.load_state_dict(W)
with torch.no_grad():
    same = torch.equal(wide(x), mla(x))
print(f"k = {T} = T: DSA == MLA bit for bit: {same}")
assert same
