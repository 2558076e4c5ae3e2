# %% [markdown]
# # 10 · Scaling out: GLM-5 over many GPUs
#
# GLM-5 has 744B parameters; one H200 holds 141 GB. The paper serves its RL rollouts with **EP64/DP64 on 8
# nodes** (64 GPUs, FP8) and runs over a thousand concurrent multi-turn rollouts. This notebook does the
# arithmetic of that setup with the published configuration (`GLM5Config.glm5()`), then runs the pieces of
# `glm5_ref.distributed` that make it work, at toy scale, on this CPU:
#
# 1. memory per GPU for serving and for training under EP64/DP64;
# 2. the all-to-all traffic of one MoE layer, per token;
# 3. the KV cache of one 200K-token sequence: MLA against what GQA-8 would need;
# 4. a simulation of multi-turn rollouts: prefix-cache hit rate with and without DP-aware routing
#    (consistent hashing, `RolloutRouter`);
# 5. a 2-process expert-parallel MoE launched from this notebook, equal to the single-process MoE.
#
# Cells that start with `# derivation` use only plain Python and `torch`; the others import from `glm5_ref`.

# %%
import random
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

from glm5_ref.config import GLM5Config
from glm5_ref.distributed import RolloutRouter, launch
from glm5_ref.distributed.expert_parallel import ep_moe_demo
from glm5_ref.moe import MoE

t_notebook = time.perf_counter()
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(1)
checks = {}  # name -> (error, tolerance): derivation vs package, asserted at the end
cfg = GLM5Config.glm5()
GB = 1e9
parts = cfg.param_breakdown(include_mtp=True)
print(f"GLM-5: {cfg.num_params() / 1e9:.1f}B parameters ({cfg.num_params(include_mtp=True) / 1e9:.1f}B with the MTP "
      f"layer), {cfg.num_params(active=True) / 1e9:.1f}B active per token")
for name, n in parts.items():
    print(f"  {name:15s} {n / 1e9:8.2f}B")

# %% [markdown]
# ## 1. Memory per GPU under EP64 / DP64
#
# **Expert parallelism (EP64)** splits the routed experts: 256 experts per layer over 64 GPUs is 4 experts per
# GPU per layer. Everything else (attention, indexer, the 3 dense FFNs, routers, shared experts, embedding,
# LM head, MTP extras) is small next to the experts and is **replicated** on every data-parallel rank
# (DP64: "DP-attention", every GPU runs attention for its own sequences).
#
# $$\text{bytes/GPU} = b \left(\frac{P_\text{routed}}{64} + P_\text{rest}\right)$$
#
# Serving uses FP8 weights ($b = 1$), as the paper's rollout engines do. Training needs more per parameter;
# the paper does not give its recipe, so we assume a common mixed-precision one: bf16 weights (2 B), fp32
# gradients (4 B), fp32 master weights (4 B), and the optimizer state: AdamW's two moments (8 B) or Muon's
# one momentum (4 B). Data parallelism either replicates all of that (plain DDP) or shards the master
# weights and optimizer state over the 64 ranks (ZeRO-1; our `DistributedMuon` shards Muon's momentum and
# work the same way). Activations are not counted.

# %%
# derivation: the routed experts' parameters, by hand
d, I, E, layers_moe = 6144, 2048, 256, 78 - 3 + 1  # 75 MoE layers + the MTP layer's MoE block
routed_by_hand = layers_moe * E * 3 * d * I  # gate, up, down: three d x I matrices per expert
checks["routed expert parameters"] = (abs(routed_by_hand - parts["routed_experts"]), 1)
print(f"routed experts: {routed_by_hand / 1e9:.1f}B of {sum(parts.values()) / 1e9:.1f}B parameters "
      f"({routed_by_hand / sum(parts.values()):.1%})")

# %%
EP = DP = 64
P_routed = parts["routed_experts"]
P_rest = sum(parts.values()) - P_routed
per_gpu = P_routed / EP + P_rest  # parameters each GPU holds
rows = [("serve, FP8 weights", 1.0 * per_gpu / GB)]
for opt, state in (("AdamW", 8), ("Muon", 4)):
    ddp = (2 + 4 + 4 + state) * per_gpu  # everything replicated over DP
    # ZeRO-1: master weights + optimizer state of the replicated part sharded over DP; experts are already split
    zero1 = (2 + 4) * per_gpu + (4 + state) * (P_routed / EP + P_rest / DP)
    rows += [(f"train, {opt}, plain DDP", ddp / GB), (f"train, {opt}, ZeRO-1", zero1 / GB)]
print(f"parameters per GPU: {P_routed / EP / 1e9:.1f}B routed (4 experts x 76 layers) + {P_rest / 1e9:.1f}B "
      f"replicated = {per_gpu / 1e9:.1f}B ({per_gpu / sum(parts.values()):.1%} of the model)")
for name, gb in rows:
    print(f"  {name:28s} {gb:6.1f} GB per GPU   (H200: 141 GB)")
free_fp8 = 141 - rows[0][1]

# %% [markdown]
# The experts, 97.4% of the parameters, shrink 64-fold; the replicated rest (19B) then dominates each GPU.
# Serving fits comfortably and leaves roughly 110 GB per GPU for KV caches. Training does not fit on 64 GPUs
# even with ZeRO-1 (280-330 GB per GPU before activations): the replicated part itself must be sharded too
# (ZeRO-3 / FSDP, pipeline stages) and spread over more GPUs. Muon's single momentum saves 4 bytes per
# parameter against AdamW.
#
# ## 2. All-to-all bytes per token per MoE layer
#
# Each token goes to K = 8 experts: the **dispatch** sends its hidden state (d = 6144 values) to the rank of
# each chosen expert, and the **combine** brings 8 expert outputs back. Under EP64 with balanced routing a slot
# stays on its own GPU with probability 1/64.
#
# $$\text{bytes} = K\, d\, (b_\text{dispatch} + b_\text{combine}) \cdot \tfrac{63}{64}$$

# %%
# derivation: bytes per token per MoE layer
K = 8
for name, b_disp, b_comb in (("bf16 both ways", 2, 2), ("FP8 dispatch, bf16 combine", 1, 2)):
    per_layer = K * d * (b_disp + b_comb) * (EP - 1) / EP
    print(f"{name:28s} {per_layer / 1024:6.1f} KiB per token per MoE layer, "
          f"{per_layer * layers_moe / 2**20:5.1f} MiB per token through all {layers_moe} MoE layers")
bf16_all_to_all = K * d * 4 * (EP - 1) / EP
checks["K = config.num_experts_per_tok"] = (abs(K - cfg.num_experts_per_tok), 1)

# %% [markdown]
# A prefill of 8K tokens therefore moves about 1.5 GB per MoE layer across the GPUs. That is why DeepSeek-V3
# dispatches in FP8, limits each token to a few nodes, and overlaps the exchange with computation; GLM-5's
# paper says little about its kernels. Section 5 below measures the same quantity on 2 CPU processes.
#
# ## 3. KV cache of one 200K-token sequence: MLA against GQA-8
#
# MLA caches one compressed latent per token and layer: $c^{KV}$ (512 values) plus the shared RoPE key (64),
# plus the DSA indexer's key (128). GQA with 8 KV heads of 128 dimensions caches keys and values,
# 2 x 8 x 128 = 2048 values (the "2048-dimensional cache" of the paper's ablation).

# %%
# derivation: cached values per token per layer
mla_values = 512 + 64  # c_KV + shared rope key
indexer_values = 128
gqa8_values = 2 * 8 * 128
checks["MLA cache values"] = (abs(mla_values + indexer_values - cfg.kv_cache_values_per_token()), 1)

# %%
T = cfg.max_position_embeddings  # 202,752 = the paper's "200K"
mla = cfg.kv_cache_bytes_per_token() * T  # bf16, 78 layers, indexer keys included
mla_only = cfg.kv_cache_bytes_per_token(include_indexer=False) * T
gqa8 = cfg.num_hidden_layers * gqa8_values * 2 * T
print(f"one {T:,}-token sequence, bf16 cache, {cfg.num_hidden_layers} layers:")
print(f"  MLA + indexer keys {mla / GB:6.1f} GB   (MLA alone {mla_only / GB:.1f} GB)")
print(f"  GQA-8              {gqa8 / GB:6.1f} GB   ({gqa8 / mla:.1f}x more)")
tokens_per_gpu = free_fp8 * GB / cfg.kv_cache_bytes_per_token()
print(f"free memory per serving GPU ~{free_fp8:.0f} GB = {tokens_per_gpu / 1e6:.2f}M cached tokens with MLA, "
      f"{free_fp8 * GB / (cfg.num_hidden_layers * gqa8_values * 2) / 1e6:.2f}M with GQA-8")

# %% [markdown]
# A full 200K context costs 22 GB with MLA, so a GPU keeps about five of them besides its weights; with GQA-8
# it would keep one. Agentic rollouts are long and many (over 1k concurrent), so the cache is the scarce
# resource, and throwing it away between the turns of a rollout is expensive. That is what the next section
# is about.
#
# ## 4. DP-aware rollout routing: prefix-cache hits across turns
#
# A multi-turn rollout sends its **whole history** again at every turn (model output, tool output, model
# output ...). The engine that served turn j holds that history in its prefix cache; if turn j + 1 lands
# there, only the new tokens are prefilled. A plain load balancer (round-robin over the DP ranks) sends it
# to a random rank: a hit only with probability 1/N. GLM-5 maps each rollout id to a fixed DP rank by
# consistent hashing, with light rebalancing (`glm5_ref.distributed.RolloutRouter`: sticky placement,
# bounded loads, eps = 0.25).
#
# The simulation (our choices; the paper gives no workload numbers): 16 concurrent rollouts per DP rank,
# 3-12 turns each, a 2,000-token shared system prompt that every rank keeps cached, 200-2,000 tool tokens
# and 100-1,000 model tokens per turn; turns of the active rollouts interleave at random; each rank's cache
# holds section 3's 1.0M tokens (LRU over rollouts). Hit rate = prompt tokens found in the serving rank's cache / all
# prompt tokens.

# %%
SYSTEM = 2000


def simulate(n_ranks, policy, n_rollouts=None, capacity=int(tokens_per_gpu), seed=0):
    """Returns (hit rate, prefilled tokens, max over the run of (most active rollouts on a rank) / (mean))."""
    rng = random.Random(seed)
    n_rollouts = n_rollouts or 48 * n_ranks
    concurrent = 16 * n_ranks
    router = RolloutRouter(n_ranks) if policy == "dp-aware" else None
    caches = [dict() for _ in range(n_ranks)]  # rank -> {rollout: cached tokens}, insertion order = LRU order
    used = [0] * n_ranks
    active, started, rr = {}, 0, 0
    hit = total = 0
    peak = 1.0
    while active or started < n_rollouts:
        while len(active) < concurrent and started < n_rollouts:  # keep the engines busy
            active[started] = dict(turns=rng.randint(3, 12), done=0, length=SYSTEM)
            started += 1
        rid = rng.choice(list(active))
        ro = active[rid]
        if router is not None:
            rank = router.route(rid)
            if len(active) == concurrent:  # steady state: the engines are full
                peak = max(peak, max(router.load.values()) / (concurrent / n_ranks))
        else:
            rank, rr = rr % n_ranks, rr + 1
        prompt = ro["length"] + rng.randint(200, 2000) * (ro["done"] > 0)  # tool output of the previous turn
        cached = caches[rank].pop(rid, None)
        found = SYSTEM if cached is None else min(cached, prompt)
        hit, total = hit + found, total + prompt
        ro["length"] = prompt + rng.randint(100, 1000)  # the model's answer
        if cached is not None:
            used[rank] -= cached
        caches[rank][rid] = ro["length"]
        used[rank] += ro["length"]
        while used[rank] > capacity:  # evict least recently used rollouts
            old = next(iter(caches[rank]))
            used[rank] -= caches[rank].pop(old)
        ro["done"] += 1
        if ro["done"] == ro["turns"]:
            del active[rid]
            if router is not None:
                router.release(rid)
    return hit / total, total - hit, peak


ranks_axis = [1, 2, 4, 8, 16, 32, 64]
t0 = time.perf_counter()
results = {p: [simulate(n, p) for n in ranks_axis] for p in ("round-robin", "dp-aware")}
print(f"simulated {2 * len(ranks_axis)} setups in {time.perf_counter() - t0:.1f} s")
print(f"{'DP ranks':>8s} {'hit rate, round-robin':>22s} {'hit rate, DP-aware':>19s} {'prefill saved':>14s} "
      f"{'max/mean load':>14s}")
for i, n in enumerate(ranks_axis):
    (h_rr, pre_rr, _), (h_dp, pre_dp, peak) = results["round-robin"][i], results["dp-aware"][i]
    print(f"{n:8d} {h_rr:22.1%} {h_dp:19.1%} {pre_rr / pre_dp:13.1f}x {peak:14.2f}")

# %%
fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
for p, style in (("round-robin", "o--"), ("dp-aware", "s-")):
    ax[0].plot(ranks_axis, [r[0] for r in results[p]], style, label=p)
    ax[1].plot(ranks_axis, [r[1] / 1e6 for r in results[p]], style, label=p)
ax[0].set(xscale="log", xlabel="data-parallel ranks N (16 concurrent rollouts each)", ylabel="prefix-cache hit rate",
          ylim=(0, 1), title="prompt tokens found in the serving rank's cache")
ax[1].set(xscale="log", yscale="log", xlabel="data-parallel ranks N", ylabel="prefilled tokens (millions)",
          title="prefill work (48 N rollouts)")
for a in ax:
    a.set_xticks(ranks_axis, [str(n) for n in ranks_axis])
    a.legend()
    a.grid(alpha=0.3)
fig.tight_layout()
fig.savefig("../figures/10_prefix_cache_hit_rate.png", dpi=120)
plt.close(fig)
display(Image("../figures/10_prefix_cache_hit_rate.png"))
hit64_rr, hit64_dp = results["round-robin"][-1][0], results["dp-aware"][-1][0]
hit1 = results["dp-aware"][0][0]  # one rank: every turn finds its history (only the new tokens miss)
assert abs(hit64_dp - hit1) < 0.02 and hit64_rr < 0.5 * hit64_dp, (hit1, hit64_dp, hit64_rr)

# %% [markdown]
# With one rank both policies hit the same cache. From two ranks on, round-robin finds a rollout's history
# only when its turn happens to land where the previous one did (probability 1/N); what remains is the shared
# system prompt. DP-aware routing keeps every turn after the first on the rollout's rank, so only new tokens
# are prefilled, at any N. The bounded-load rule keeps the busiest rank within a small factor of the mean
# active rollouts (last column, in the steady state; the router places a new rollout only on a rank below
# ceil(1.25 m / N)).
#
# ## 5. Expert-parallel MoE on 2 processes, launched from here
#
# `launch(fn, 2, ...)` starts two processes joined in a gloo process group (`glm5_ref.distributed.launch`);
# each runs `ep_moe_demo`: the same seeded MoE (tiny config: 8 experts, top-2, one shared expert), its own
# tokens (rank 0 has 37, rank 1 has 11), experts 0-3 on rank 0 and 4-7 on rank 1, tokens exchanged by
# `all_to_all_single`, forward and backward. The single-process MoE on the concatenated tokens must give the
# same outputs and gradients. (The function lives in a module because a child process cannot import a
# function defined in a notebook cell.)

# %%
tiny = GLM5Config.tiny()
tokens = [37, 11]
t0 = time.perf_counter()
ranks = launch(ep_moe_demo, 2, tiny, tokens, 0, timeout=120)
t_launch = time.perf_counter() - t0

torch.manual_seed(0)
moe = MoE(tiny)  # the same seeded weights as every rank built
xs = [torch.randn(1, n, tiny.hidden_size, generator=torch.Generator().manual_seed(1 + r)) for r, n in enumerate(tokens)]
x = torch.cat(xs, dim=1).requires_grad_(True)  # (1, 48, d): both ranks' tokens
y, aux = moe(x, return_aux=True)
y.sum().backward()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


y_err = max(rel(r["y"], y[:, s:s + n]) for r, s, n in zip(ranks, [0, tokens[0]], tokens))
xg_err = max(rel(r["x_grad"], x.grad[:, s:s + n]) for r, s, n in zip(ranks, [0, tokens[0]], tokens))
ref_grads = dict(moe.named_parameters())
w_err = max(rel(g, ref_grads[name].grad) for r in ranks for name, g in r["grads"].items())
load = sum(r["load"] for r in ranks)
print(f"2 ranks launched and finished in {t_launch:.1f} s")
print(f"rel. error vs single process: outputs {y_err:.1e}, input grads {xg_err:.1e}, weight grads {w_err:.1e}")
print(f"tokens per expert, summed over ranks: {load.tolist()} (single process: {aux.tokens_per_expert.tolist()})")
for r, rank in enumerate(ranks):
    print(f"rank {r}: {rank['off_rank_slots']} of {rank['slots']} slots went to the other rank "
          f"({rank['off_rank_slots'] / rank['slots']:.0%}; 1/2 expected), {rank['bytes_sent']:,} bytes sent "
          f"= {rank['bytes_sent'] / tokens[r]:.0f} per token (K d (4 + 4) x off-rank share, fp32)")
assert y_err < 1e-5 and xg_err < 1e-5 and w_err < 1e-5
assert torch.equal(load, aux.tokens_per_expert)
checks["all-to-all bytes per token, formula vs measured"] = (
    abs(sum(r["bytes_sent"] for r in ranks) - sum(r["off_rank_slots"] for r in ranks) * tiny.hidden_size * 8), 1)

# %% [markdown]
# ## Summary
#
# - Under EP64 each GPU holds 4 of every layer's 256 experts (1/64 of the 734B expert parameters); the
#   replicated 19B (attention, dense layers, embeddings) then dominate. FP8 serving needs about 31 GB of
#   weights per GPU; training needs far more (280 GB even with ZeRO-1), hence sharding beyond DP64.
# - Every token sends its hidden state to 8 experts and gets 8 outputs back: about 190 KiB per token per MoE
#   layer in bf16 at EP64, 14 MiB through the whole model.
# - MLA caches 704 values per token and layer (with the indexer key); GQA-8 would cache 2048: 22 GB against
#   65 GB for one 200K-token sequence.
# - Consistent hashing of rollout ids onto DP ranks turns multi-turn prompts into cache hits; a round-robin
#   balancer loses them as soon as there are several ranks (figures/10_prefix_cache_hit_rate.png).
# - Launch on CPU: `torchrun --nproc_per_node 2 -m glm5_ref train --config tiny --steps 20 --out runs/dp`
#   (add `--expert-parallel` to shard the experts); the same command runs on GPUs with NCCL.

# %%
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
print(f"derivation == glm5_ref ({len(checks)} checks); notebook ran in {time.perf_counter() - t_notebook:.0f} s")
