# %% [markdown]
# # 11 · Does sparse attention keep long-context recall? DSA at classroom scale
#
# Notebook 02 built DeepSeek Sparse Attention (DSA): a cheap **lightning indexer** scores every past key,
# and each query attends to only its top-$k$ keys. This notebook asks whether that loses anything. GLM-5's
# answer is "no, after the right training":
#
# - **Table 3** (128K retrieval tasks): MLA 100.0 / 95.5 on MQ-NIAH / MV-NIAH, DSA 100.0 / 97.0.
# - **Table 6** (GLM-4.7-Flash on RULER, 4K to 128K): a dense indexer warm-up alone keeps short contexts
#   (97.44 → 97.51 at 4K) but loses at the longest (79.21 → 71.35 at 128K); joint sparse training
#   brings it back (78.86).
#
# We reproduce the *shape* of that result on a problem a laptop can train:
#
# 1. the task: needles (key-value pairs) hidden in Python source, recalled at the end;
# 2. the cost: how many attention multiply-adds top-$k$ saves at each length (derived, then checked);
# 3. a live run of the whole recipe, small enough for this notebook (about 40 s);
# 4. the full experiment (`python -m glm5_ref experiment long-context`, 2 seeds, 512 to 4K tokens): its
#    committed JSON and figure, as a table like the paper's, and what it does and does not show.
#
# Cells that start with `# derivation` use only `torch`; every other cell imports from `glm5_ref`.

# %%
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Image, display

from glm5_ref import tokenizer as tok
from glm5_ref.config import GLM5Config
from glm5_ref.experiments import long_context as lc

t_notebook = time.perf_counter()
torch.manual_seed(0)
torch.set_num_threads(1)
checks = {}  # name -> (error, tolerance): derivation vs package, asserted at the end
FIG = Path("../figures")

# %% [markdown]
# ## 1. The task: needles in code
#
# The haystack is a window of the classroom corpus (CPython standard-library source). Into it we insert
# $n$ key-value pairs `k v` at random depths. Keys and values are extra token ids that never occur in the
# code. The sequence ends with a separator and a query block that repeats every key. The model is trained,
# and scored, only on the value after each key in the query block:
#
# - **MQAR** (multi-query associative recall): $n = 8$ pairs, 8 queries;
# - **NIAH** (needle in a haystack): $n = 1$.
#
# Each of the 16 keys owns its own 16 value tokens, so a model that knows the key but has not found the
# needle is right 1 time in 16. Why that design: with values shared by all keys, recall needs a two-step
# "induction" circuit, and at this size and CPU budget that circuit did not form (the module docstring
# of `glm5_ref/experiments/long_context.py` gives the numbers). With value families, the query finds its
# needle in one content-based hop. The needle is still one token among up to 4,096, and the indexer's
# top-$k$ must contain that token.

# %%
streams = lc.filler_streams()
ex = lc.make_example(np.random.default_rng(0), 512, 2, streams["val"])
ids = ex["ids"]


def show(i: int) -> str:
    if i == lc.SEP:
        return " <SEP> "
    if lc.KEY0 <= i < lc.VAL0:
        return f" <k{i - lc.KEY0}> "
    if i >= lc.VAL0:
        return f" <v{(i - lc.VAL0) // lc.VALUES_PER_KEY}.{(i - lc.VAL0) % lc.VALUES_PER_KEY}> "
    return tok.decode([i])


n0 = int(ex["needle_pos"].max())  # the later needle, so that 25 tokens of code precede it
print("... " + "".join(show(i) for i in ids[n0 - 25:n0 + 8].tolist()).replace("\n", "⏎") + " ...")
print("query block:", "".join(show(i) for i in ids[-5:].tolist()))
print("needles (value token positions):", ex["needle_pos"].tolist(), " queries at:", ex["query_pos"].tolist(),
      " answers:", [show(a).strip() for a in ex["answers"].tolist()])

# %% [markdown]
# ## 2. What top-$k$ saves: the multiply-adds of the attention core
#
# For a causal prefill of $L$ tokens, dense attention scores every pair $s \le t$:
# $P_{\text{dense}} = \sum_t (t+1) = L(L+1)/2$ pairs. Top-$k$ attention scores
# $P_{\text{sparse}} = \sum_t \min(k, t+1)$ pairs. Per pair, MLA computes one score and one weighted value
# per head: $H(d_{qk} + d_v)$ multiply-adds. The indexer is still dense, at $J d_I$ per pair:
#
# $$\text{dense} = P_{\text{dense}}\, H (d_{qk} + d_v), \qquad
#   \text{DSA} = P_{\text{sparse}}\, H (d_{qk} + d_v) + P_{\text{dense}}\, J d_I .$$
#
# (The projections are the same for both and are left out.) For GLM-5, $H(d_{qk}+d_v) = 64 \cdot 512 =
# 32768$ and $J d_I = 32 \cdot 128 = 4096$: the indexer is $1/8$ of a dense pair. At 128K tokens and
# $k = 2048$, DSA therefore needs about $1/8 + 2048/65536 \approx 0.16$ of the dense work. Our classroom
# model has a relatively heavier indexer ($J d_I = 64$ against $H(d_{qk}+d_v) = 192$, a third).

# %%
# derivation: count the pairs by brute force and price them, for our config and for GLM-5
def macs_by_hand(L, k, per_pair, per_index_pair):
    dense_pairs = sum(t + 1 for t in range(L))
    sparse_pairs = sum(min(k, t + 1) for t in range(L))
    return dense_pairs * per_pair, sparse_pairs * per_pair + dense_pairs * per_index_pair


cfg = lc.experiment_config()
rows = []
for L in (512, 1024, 2048, 4096):
    d, s = macs_by_hand(L, cfg.index_topk, cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim),
                        cfg.index_n_heads * cfg.index_head_dim)
    pkg = lc.config_macs(cfg, L)
    checks[f"macs L={L}"] = (abs(d - pkg["dense_macs"]) + abs(s - pkg["dsa_macs"]), 1)
    rows.append((L, d / 1e6, s / 1e6, d / s))
g = lc.config_macs(GLM5Config.glm5(), 131072)
print(f"{'L':>6} {'dense (M MACs)':>15} {'DSA (M MACs)':>13} {'dense / DSA':>12}   k = {cfg.index_topk}, per layer")
for L, d, s, r in rows:
    print(f"{L:>6} {d:15.1f} {s:13.1f} {r:11.2f}x")
print(f"GLM-5 at 128K, k = 2048: dense / DSA = {g['speedup']:.1f}x (indexer included)")

# %% [markdown]
# ## 3. The recipe, live (small)
#
# The four models of the experiment, in the order GLM-5 trains them. Every stage is
# `glm5_ref.experiments.long_context.train_stage`, which flips the DSA switches with
# `glm5_ref.train.set_dsa_stage`:
#
# | model | how | attention at evaluation |
# |---|---|---|
# | (a) dense | trained on the task, dense attention | dense |
# | (b) warm-up only | (a), then the indexer alone learns KL(main attention ‖ indexer), everything else frozen | indexer top-$k$ |
# | (c) DSA | (b), then sparse adaptation: top-$k$ on, the indexer trained by KL on its selected set with detached input, the rest by the task loss | indexer top-$k$ |
# | (d) control | (a)'s weights, the **same $k$** chosen by recency (the last $k$ keys: a sliding window) | recency top-$k$ |
#
# The full experiment uses $k = 64$, contexts up to 4K and both tasks. Training that takes about 10 minutes
# per seed, so the live version here is smaller: the needle-in-a-haystack task alone, dense training on
# 64-token contexts, warm-up and sparse adaptation at 256 tokens with $k = 16$, evaluation at 256 and 512
# (16 held-out sequences each, so one miss is 6 points). About 45 s on a quiet 2-core CPU.

# %%
demo_cfg = lc.experiment_config(index_topk=16)
demo_size = {"dense": 200, "warmup": 20, "sparse": 20, "batch_tokens": 4096, "max_pairs": 1, "lr": {"dense": 5e-3},
             "eval": {"mqar": 0, "niah": 16}, "eval_token_budget": 0, "mass_seqs": 2, "lengths": [256, 512]}
demo_schedule = {"dense": [(1.0, [64])], "warmup": [(1.0, [256])], "sparse": [(1.0, [256])]}
t0 = time.perf_counter()
demo = lc.run_seed(0, demo_size, streams, verbose=False, config=demo_cfg, schedule=demo_schedule, keep_models=True)
print(f"trained and evaluated in {time.perf_counter() - t0:.0f} s")
print(f"{'model':>15} " + " ".join(f"{L:>6}" for L in demo_size["lengths"]) + "   (NIAH recall accuracy, chance 0.06)")
order = ("dense", "warmup_only", "dsa", "control", "control_random")
for name in order:
    print(f"{name:>15} " + " ".join(f"{demo['accuracy'][name][L]['mean']:6.2f}" for L in demo_size["lengths"]))
fig, ax = plt.subplots(figsize=(7, 3))
width = 0.38
for j, L in enumerate(demo_size["lengths"]):
    ax.bar(np.arange(len(order)) + (j - 0.5) * width, [demo["accuracy"][n][L]["mean"] for n in order], width,
           label=f"{L} tokens")
ax.axhline(1 / lc.VALUES_PER_KEY, color="gray", ls=":", label="chance")
ax.set_xticks(np.arange(len(order)), ["(a) dense", "(b) warm-up", "(c) DSA", "(d) recency", "(d') random"])
ax.set_ylabel("NIAH recall")
ax.set_title(f"live demo: k = {demo_cfg.index_topk}, one seed, 16 needles per length")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG / "11_demo_recall.png", dpi=110)
plt.close(fig)
display(Image(filename=str(FIG / "11_demo_recall.png")))

# %% [markdown]
# How much of the main attention does the indexer's top-16 capture? We run model (c) with **dense**
# attention and add up the attention probability (mean over heads) that lands on the indexer's selection,
# at the query tokens, where recall happens. The 16 most recent keys are the comparison.

# %%
for L in demo_size["lengths"]:
    m = demo["mass"][L]["dsa_queries"]
    print(f"L = {L}: indexer top-16 captures " + ", ".join(f"layer {i}: {v:.2f}" for i, v in enumerate(m["indexer"]))
          + " | last 16 keys: " + ", ".join(f"{v:.2f}" for v in m["recency"]))

# %% [markdown]
# The control's selection really is different: on one sequence, the fraction of (query, key) picks that
# the recency window shares with the indexer's top-$k$ in each layer of model (c).

# %%
from glm5_ref.dsa import select_topk

model_c = demo["models"]["dsa"]
x_ids = lc.make_batch(5, 256, 1, 8, streams["val"])["ids"]
pos = torch.arange(256)
with torch.no_grad():
    h = model_c.model.embed_tokens(x_ids)
    for i, layer in enumerate(model_c.model.layers):
        a = layer.self_attn
        hn = layer.input_layernorm(h)
        top = select_topk(a.indexer(hn, a.q_latent(hn), pos), pos, demo_cfg.index_topk)[0, 16:]  # (T', k)
        win = lc.control_selection("recency", pos, 256, demo_cfg.index_topk, 1)[0, 16:]
        shared = (top[:, :, None] == win[:, None, :]).any(-1).float().mean()
        print(f"layer {i}: indexer and recency share {shared:.0%} of their picks")
        h, _, _ = layer(h, pos)

# %% [markdown]
# ## 4. The full experiment (committed results)
#
# `python -m glm5_ref experiment long-context` trains the same recipe at the full size: 700 dense steps
# over a curriculum from 64 to 1,024 tokens, 300 warm-up steps at 256 to 1,024 tokens, 200 sparse-adaptation
# steps at 512 to 1,024 tokens, $k = 64$ (GLM-5's ratio: 2048 of 128K is also 1/64), 2 seeds. It evaluates at 512, 1K, 2K and 4K tokens on held-out code. 2K and 4K are
# longer than anything seen in training, for every model alike. It writes `figures/long_context_dsa.json`
# and `.png`; here we load them.

# %%
res_path = FIG / "long_context_dsa.json"
res = json.loads(res_path.read_text())
lengths = res["lengths"]
names = {"dense": "(a) dense MLA", "warmup_only": "(b) + indexer warm-up only", "dsa": "(c) + sparse adaptation (DSA)",
         "control": "(d) recency top-k (control)", "control_random": "(d') random top-k"}
head = "| model | " + " | ".join(f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths) + " |"
lines = [head, "|---" * (len(lengths) + 1) + "|"]
for key, label in names.items():
    mean = res["accuracy"][key]
    per = list(res["accuracy_per_seed"][key].values())
    cells = [f"{100 * m:.1f} ({', '.join(f'{100 * p[i]:.0f}' for p in per)})" for i, m in enumerate(mean)]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
from IPython.display import Markdown

display(Markdown(f"Recall accuracy (%), mean of MQAR and NIAH, seeds {res['seeds']} (per seed in brackets), "
                 f"k = {res['index_topk']}, chance {100 * res['chance']:.1f}%:\n\n" + "\n".join(lines)))
gap = [100 * (c - a) for a, c in zip(res["accuracy"]["dense"], res["accuracy"]["dsa"])]
print("DSA minus dense, points:", [f"{g:+.1f}" for g in gap])
per_layer = res["mass_captured_per_layer"]
for L in lengths:
    for name in ("warmup_only", "dsa"):
        layers = np.mean([per_layer[s][str(L)][f"{name}_queries"]["indexer"] for s in per_layer], axis=0)
        window = np.mean([per_layer[s][str(L)][f"{name}_queries"]["recency"] for s in per_layer], axis=0)
        print(f"L = {L:4d} {name:11s}: attention mass on the indexer's top-{res['index_topk']} at the query block, "
              f"per layer {np.round(layers, 2).tolist()} (last {res['index_topk']} keys: {np.round(window, 2).tolist()})")
print("attention-core MACs, dense / DSA per layer:",
      [f"{m['speedup']:.1f}x" for m in res["attention_macs_per_layer"]])
display(Image(filename=str(FIG / "long_context_dsa.png")))

# %% [markdown]
# ## 5. Reading the result
#
# Full run of 2026-11-29 on a 2-core shared CPU: 2 seeds, one process per seed in parallel, 13 minutes.
#
# **What reproduces.**
#
# - **The indexer matters.** With the same $k = 64$, a recency window or a random selection recalls 5 to 19%
#   of the needles, close to the 6% of a guess within the key's family. With the indexer's top-64, DSA
#   recalls 95.8% at 512 tokens. In the retrieval layer (layer 0), the indexer's top-64 holds 62 to 75% of
#   the dense attention mass at the query block at 512 tokens (per seed); the last 64 keys hold 5 to 19%.
# - **Short contexts are lossless.** At 512 tokens, warm-up only is 1.1 points and DSA 1.0 point below
#   dense (95.8 against 96.8). Each seed is scored on 64 MQAR and 64 NIAH sequences, so a 1-point gap is
#   within noise. This is the shape of Table 6's 4K column.
# - **Warm-up alone loses at the longest context; sparse adaptation wins part of it back.** At 4K, warm-up
#   only falls to 31.6 against dense 56.6. DSA recovers to 35.2, on both seeds (32.8 → 36.7 and 30.5 → 33.6).
#   That is the direction of Table 6 (71.35 → 78.86 at 128K), but far from its size.
#
# **What does not reproduce.** The goal was DSA within 2 points of dense at every length. It holds only at
# 512. DSA is 4.4 points lower at 1K, 5.5 at 2K and 21.5 at 4K. At 1K, seed 1 even got worse in the sparse
# stage (85.7 → 82.0), while seed 0 stayed level (97.3 → 97.7). 2K and 4K are longer than any training
# context, and dense itself drops there (80.9, 56.6). Its attention spreads out when it extrapolates:
# at 4K, layer 0's top-64 captures only 13 to 25% of it, and the last 64 keys capture about as much (16 to
# 30%). A selection of 64 keys cannot follow a diffuse pattern. The paper's models adapt at the lengths
# they are evaluated at (GLM-5: 20B tokens of sparse adaptation; DeepSeek-V3.2: 943.7B), with $k = 2048$.
# Ours adapted for 200 steps of 4K tokens each, on 512- to 1K-token contexts.
#
# **What we tried.** A first recipe (150 warm-up steps at 512-1K tokens, 150 sparse steps at a constant lr)
# left the indexer unconverged (KL 0.6 nats). On seed 0 it already lost 13 to 16 points at 512, and the sparse stage did not
# recover them: the module docstring lists those numbers. A longer warm-up that also covered 256-token
# contexts fixed the short lengths. The evaluation was never changed. We did not train the sparse stage on
# 2K-4K contexts: dense never saw them either, so the comparison would no longer be like for like.
#
# **Cost.** At 4K tokens, DSA's attention core costs 2.7x fewer multiply-adds than dense (1.8x at 512).
# Our indexer is a third of a dense pair's cost; GLM-5's is an eighth. With GLM-5's sizes and $k = 2048$,
# nothing is sparse up to 2K, and the indexer makes attention 12.5% dearer there. At 4K, DSA costs 1.14x
# less. The saving is a long-context one, as the paper says ("1.5-2x less attention compute on long
# sequences").

# %%
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
print(f"derivation == glm5_ref ({len(checks)} checks); notebook ran in {time.perf_counter() - t_notebook:.0f} s")
