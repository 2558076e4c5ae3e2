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
from glm5_ref.apps.experiments import long_context as lc
from glm5_ref.apps.experiments import long_context_task as lct

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
ex = lct.make_example(np.random.default_rng(0), 512, 2, streams["val"])
ids = ex["ids"]


def show(i: int) -> str:
    if i == lct.SEP:
        return " <SEP> "
    if lct.KEY0 <= i < lct.VAL0:
        return f" <k{i - lct.KEY0}> "
    if i >= lct.VAL0:
        return f" <v{(i - lct.VAL0) // lct.VALUES_PER_KEY}.{(i - lct.VAL0) % lct.VALUES_PER_KEY}> "
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
# `glm5_ref.apps.experiments.long_context.train_stage`, which flips the DSA switches with
# `glm5_ref.training.run.set_dsa_stage`:
#
# | model | how | attention at evaluation |
# |---|---|---|
# | (a) dense | trained on the task, dense attention | dense |
# | (b) warm-up only | (a), then the indexer alone learns KL(main attention ‖ indexer), everything else frozen | indexer top-$k$ |
# | (c) DSA | (b), then sparse adaptation: top-$k$ on, the indexer trained by KL on its selected set with detached input, the rest by the task loss | indexer top-$k$ |
# | (d) control | (a)'s weights, the **same $k$** chosen by recency (the last $k$ keys: a sliding window) | recency top-$k$ |
#
# The full experiment uses $k = 64$, contexts up to 4K and both tasks. Training that takes about 21 minutes
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
ax.axhline(1 / lct.VALUES_PER_KEY, color="gray", ls=":", label="chance")
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
# `python -m glm5_ref experiment long-context` trains the same recipe at the full size, at the lengths it
# evaluates: 700 dense steps over a curriculum from 64 tokens whose last 20% draws 1K, 2K or 4K tokens,
# 200 warm-up steps and 70 sparse-adaptation steps at 1K to 4K tokens (4,096 tokens per step, so one sequence
# at 4K), $k = 64$ (GLM-5's ratio: 2048 of 128K is also 1/64), 2 seeds. It evaluates at 512, 1K, 2K and 4K
# tokens on held-out code. It writes `figures/long_context_dsa.json` and `.png`; here we load them.

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
# Full run of 2026-11-29 on a 2-core shared CPU: 2 seeds, one process per seed in parallel, 25 minutes.
#
# **What reproduces.**
#
# - **The indexer matters.** With the same $k = 64$, a recency window or a random selection recalls 5 to 21%
#   of the needles, close to the 6% of a guess within the key's family. With the indexer's top-64, DSA
#   recalls 62.5 to 78.7%. In the retrieval layer (layer 0), the indexer's top-64 holds 43 to 62% of the
#   dense attention mass at the query block at every length (per seed); the last 64 keys hold 4 to 21%.
# - **Sparse adaptation helps at the long contexts.** At 2K and 4K, DSA beats warm-up only on both seeds
#   (2K: 63.7 → 67.6 and 83.6 → 89.8; 4K: 46.9 → 52.3 and 68.0 → 72.7): the direction of Table 6
#   (71.35 → 78.86 at 128K). Training at 4K also helped dense itself (4K: 71.1, against 56.6 when training
#   stopped at 1K), and DSA's gap to dense at 4K shrank from 21.5 to 8.6 points.
#
# **What does not reproduce.** The goal was DSA within 2 points of dense at every length. It holds at no
# length in the mean: DSA is 17.5, 16.4, 9.0 and 8.6 points below dense at 512, 1K, 2K and 4K. The two seeds
# differ. Seed 1 meets it at 2K and 4K (89.8 against 89.1, 72.7 against 72.7) but loses 5 to 6 points at
# 512 and 1K. On seed 0 the warm-up did not converge (indexer KL 0.50 to 0.58 nats in the last logged steps,
# against 0.29 to 0.36 for seed 1), and warm-up only already loses 23 to 27 points at 512 to 2K; 70 sparse steps recover
# at most 5.4. Each step now holds one to four sequences instead of 4 to 16, so 200 warm-up and 70 sparse
# steps see fewer, longer examples than the previous 300 and 200: the CPU budget, not the recipe, set those
# counts (a 4K sparse step costs ~11 s). The paper's models adapt for far longer (GLM-5: 20B tokens of
# sparse adaptation; DeepSeek-V3.2: 943.7B), with $k = 2048$.
#
# **What we tried.** (1) 150 warm-up steps at 512-1K tokens, 150 sparse steps at a constant lr: the indexer
# did not converge (KL 0.6 nats); seed 0 lost 13 to 16 points at 512. (2) Training stopped at 1K tokens
# (dense 700 steps ending on 512-1K, warm-up 300 steps on 256-1K, sparse 200 steps on 512-1K): DSA within
# 2 points of dense at 512 (95.8 against 96.8) but 4.4, 5.5 and 21.5 points behind at 1K, 2K and 4K, where
# every model extrapolated. (3) This run: training at the evaluated lengths, with the step counts above.
# The module docstring lists the numbers of (1) and (2). The evaluation was never changed.
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
