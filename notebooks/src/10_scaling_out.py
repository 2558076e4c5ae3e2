# %% [markdown]
# # 10 · Scaling out: GLM-5 over many GPUs
#
# **Prerequisites:** notebook 00 (the parameter counts, with and without the MTP layer; cache bytes per token),
# notebook 01 (MLA: the latent cache; GQA), notebook 02 (DSA: the indexer key), notebook 03 (MoE: routed and
# shared experts, top-k routing), notebook 05 (MTP), notebook 06 (validation bits per byte), notebook 07 (Muon),
# notebook 08 (multi-turn agentic rollouts). Expert, data and tensor parallelism, all-to-all, all-reduce and
# ZeRO are defined here. **Reading time:** about 30 minutes (it runs in about 10 s under make test, 2 cores).
#
# GLM-5 has 744B parameters (paper section 2.1); one H200 holds 141 GB (GB = $10^9$ bytes throughout). The paper
# serves its RL rollouts with **EP64 and DP64 over 8 nodes** (64 GPUs, FP8; section 3.6.2) and runs over 1k
# concurrent multi-turn rollouts (section 4.1.1). This notebook does the arithmetic of that setup with the
# published configuration (`GLM5Config.glm5()`), then runs the pieces of `glm5_ref.distributed` that make it
# work, at toy scale, on this CPU:
#
# 1. memory per GPU for serving and for training under EP64/DP64;
# 2. the traffic: the all-to-all of one MoE layer per token, and the gradient all-reduce of data parallelism;
# 3. the KV cache of one 200K-token sequence: MLA against what GQA-8 would need;
# 4. a simulation of multi-turn rollouts: prefix-cache hit rate with and without DP-aware routing
#    (consistent hashing, `RolloutRouter`);
# 5. a 2-process expert-parallel MoE launched from this notebook, equal to the single-process MoE.
#
# Cells that start with `# derivation` use only plain Python and `torch`; the others import from `glm5_ref`.

# %%
import json
import random
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from glm5_ref.apps.figures import ROOT, show_figure, show_saved
from glm5_ref.config import GLM5Config
from glm5_ref.distributed import RolloutRouter, launch
from glm5_ref.distributed.expert_parallel import ep_moe_demo
from glm5_ref.moe import MoE

t_notebook, cpu_notebook = time.perf_counter(), time.process_time()
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(1)
checks = {}  # name -> (error, tolerance): derivation vs package, asserted at the end
cfg = GLM5Config.glm5()
GB = 1e9
main_parts = cfg.param_breakdown()  # the 78 main layers, embedding and head: notebook 00's count
parts = cfg.param_breakdown(include_mtp=True)  # + the MTP layer, which serving keeps for speculative decoding
active_parts = cfg.param_breakdown(active=True)
print(f"{'component':15s} {'without MTP':>18s} {'with MTP':>18s} {'MTP layer adds':>15s} {'active, no MTP':>16s}")
for name in parts:
    print(f"{name:15s} {main_parts[name]:>18,} {parts[name]:>18,} {parts[name] - main_parts[name]:>15,} "
          f"{active_parts[name]:>16,}")
total, total_mtp, active = sum(main_parts.values()), sum(parts.values()), sum(active_parts.values())
print(f"{'total':15s} {total:>18,} {total_mtp:>18,} {total_mtp - total:>15,} {active:>16,}")
assert total == cfg.num_params() and total_mtp == cfg.num_params(include_mtp=True)
assert active == cfg.num_params(active=True)

# %% [markdown]
# ## 1. Memory per GPU under EP64 / DP64
#
# **Expert parallelism (EP64)** splits the routed experts: 256 experts per layer over 64 GPUs is 4 experts per
# GPU per layer. Everything else (attention, indexer, the 3 dense FFNs, routers, shared experts, embedding,
# LM head, MTP extras) is small next to the experts and is **replicated** on every data-parallel rank
# (**data parallelism**, DP64: each of the 64 GPUs processes its own sequences with its own copy; the paper's
# "DP-attention", section 3.6.2).
#
# The counts: **743,911,199,232** parameters without the MTP layer (notebook 00's count, the paper's "744B") and
# **40,833,126,912** active per token; the MTP layer adds 9,952,920,320 (753.9B in all). A serving GPU holds the
# MTP layer too, since the rollout engines decode speculatively with it (section 3.6.2), so the memory below
# counts **with** the MTP layer.
#
# $$\text{bytes/GPU} = b \left(\frac{P_\text{routed}}{64} + P_\text{rest}\right)$$
#
# Serving uses FP8 weights ($b = 1$), as the paper's rollout engines do. Training needs more per parameter;
# the paper does not give its recipe, so we assume a common mixed-precision one: bf16 weights (2 B), fp32
# gradients (4 B), fp32 master weights (4 B), and the optimizer state: AdamW's two moments (8 B) or Muon's
# one momentum (4 B). Data parallelism either replicates all of that (plain DDP) or shards the master
# weights and optimizer state over the 64 ranks (ZeRO-1; our `DistributedMuon` shards Muon's momentum and
# work the same way; ZeRO, the "zero redundancy optimizer", stage 1 shards the optimizer state). Activations are
# not counted.

# %%
# derivation: the routed experts' parameters, by hand
d, I, E, layers_moe = 6144, 2048, 256, 78 - 3 + 1  # 75 MoE layers + the MTP layer's MoE block
routed_by_hand = layers_moe * E * 3 * d * I  # gate, up, down: three d x I matrices per expert
checks["routed expert parameters (with MTP)"] = (abs(routed_by_hand - parts["routed_experts"]), 1)
checks["routed expert parameters (no MTP)"] = (abs((layers_moe - 1) * E * 3 * d * I - main_parts["routed_experts"]), 1)
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
# The experts, 97.4% of the parameters (with the MTP layer, printed above), shrink 64-fold; the replicated rest
# (19.4B) then dominates each GPU. Serving fits comfortably and leaves roughly 110 GB per GPU for KV caches.
# Training does not fit on 64 GPUs even with ZeRO-1 (280-327 GB per GPU before activations): the replicated part
# itself must be sharded too (ZeRO-3 or FSDP, which shard the weights and gradients as well; pipeline stages,
# which give each GPU a range of layers) and spread over more GPUs. Muon's single momentum
# saves 4 bytes per parameter against AdamW.
#
# Why hold 744B parameters when a token uses 41B? Because, per token trained, a mixture of experts learns more
# than a dense model of the same active size. The classroom measurement of `scripts/compare_dense.py` (the
# classroom MoE against a dense model of matched active parameters, the same 524,288 training tokens, validation
# bits per byte as in notebook 06) shows both sides of that trade: at equal tokens the MoE is better; at equal
# wall-clock on a CPU, where nothing is parallel and the extra experts cost time, the dense model is.

# %%
dense_cmp = json.loads((ROOT / "figures" / "compare_dense.json").read_text())
eq_tok, eq_wall = dense_cmp["equal_tokens"], dense_cmp["equal_wall_clock"]
print(f"equal tokens ({eq_tok['tokens']:,}): MoE {eq_tok['glm5_moe_bpb']:.3f} bits/byte, dense {eq_tok['dense_bpb']:.3f}")
print(f"equal wall-clock ({eq_wall['seconds']:.0f} s): MoE {eq_wall['glm5_moe_bpb']:.3f}, dense {eq_wall['dense_bpb']:.3f}")
for name, run in dense_cmp["runs"].items():
    print(f"  {name:8s}: {run['params'] / 1e6:.2f}M parameters, {run['active_params'] / 1e6:.2f}M active, "
          f"{run['tok_s']:.0f} tokens/s on {dense_cmp['threads']} threads")
_ = show_saved("compare_dense.png")

# %% [markdown]
# At equal tokens the MoE reaches 2.024 bits per byte against the dense model's 2.057; at equal wall-clock it
# is behind (2.095), because on 2 CPU threads it trains at 1,421 tokens/s against 2,027. Expert parallelism is
# how a GPU cluster removes that cost: every GPU computes only its own experts, in parallel with the others, and
# pays in communication instead, which is the next section.
#
# ## 2. Communication: all-to-all per MoE layer, all-reduce per step
#
# **All-to-all** is the collective in which every rank sends a different piece of data to every other rank.
# Under expert parallelism each token goes to K = 8 experts: the **dispatch** (an all-to-all) sends its hidden
# state (d = 6144 values) to the rank of each chosen expert, and the **combine** (another all-to-all) brings the 8
# expert outputs back. Under EP64 with balanced routing a slot stays on its own GPU with probability 1/64.
#
# $$\text{bytes} = K\, d\, (b_\text{dispatch} + b_\text{combine}) \cdot \tfrac{63}{64}$$

# %%
# derivation: bytes per token per MoE layer
K = 8
per_layer_bytes = {}
for name, b_disp, b_comb in (("bf16 both ways", 2, 2), ("FP8 dispatch, bf16 combine", 1, 2)):
    per_layer = per_layer_bytes[name] = K * d * (b_disp + b_comb) * (EP - 1) / EP
    print(f"{name:28s} {per_layer / 1e3:6.1f} KB per token per MoE layer, "
          f"{per_layer * layers_moe / 1e6:5.1f} MB per token through all {layers_moe} MoE layers")

# %% [markdown]
# The formula assumes balanced routing. An independent count, from the configuration rather than from the
# constants above: route 4,096 tokens of one rank to the top-8 of 256 experts under random (balanced) scores,
# place the experts on 64 ranks in contiguous blocks as `ExpertParallelMoE` does, and count the rows that leave
# the rank.

# %%
def all_to_all_bytes_per_token(config, ep, bytes_dispatch, bytes_combine, n_tokens=4096, seed=0):
    """Measured on random balanced routing: bytes that cross ranks per token per MoE layer."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_tokens, config.n_routed_experts, generator=g)
    experts = scores.topk(config.num_experts_per_tok, dim=-1).indices  # (N, K), distinct experts per token
    owner = experts // (config.n_routed_experts // ep)  # contiguous blocks of experts per rank
    off_rank_slots = (owner != 0).sum().item()  # this is rank 0's batch
    return off_rank_slots * config.hidden_size * (bytes_dispatch + bytes_combine) / n_tokens


measured_a2a = all_to_all_bytes_per_token(cfg, EP, 2, 2)
print(f"counted on random routing: {measured_a2a / 1e3:.1f} KB per token per MoE layer (bf16 both ways); "
      f"formula {per_layer_bytes['bf16 both ways'] / 1e3:.1f} KB")
checks["all-to-all bytes per token: formula vs count from the config (relative)"] = (
    abs(measured_a2a / per_layer_bytes["bf16 both ways"] - 1), 0.005)

# %% [markdown]
# A prefill of 8K tokens therefore moves about 1.6 GB per MoE layer across the GPUs (printed below). That is why
# DeepSeek-V3 dispatches in FP8, limits each token to a few nodes, and overlaps the exchange with computation;
# GLM-5's paper says little about its kernels. Section 5 counts the same quantity on 2 CPU processes.
#
# The other collective is the **all-reduce** of data parallelism: after each step, every rank's gradient of
# each replicated parameter is summed over the ranks, and every rank gets the sum. The usual implementation is a
# **ring**: the tensor is cut into N chunks; in N - 1 steps of a reduce-scatter each rank passes one chunk to its
# neighbour, adding what it receives, until each rank holds one fully summed chunk; in N - 1 steps of an
# all-gather the summed chunks travel round the ring. Each rank sends $2 (N-1)/N$ times the tensor's bytes,
# whatever N. The derivation simulates the ring and counts.

# %%
# derivation: ring all-reduce, simulated on N "ranks" in one process, counting the bytes each rank sends
def ring_all_reduce(tensors):
    n = len(tensors)
    chunks = [list(t.clone().chunk(n)) for t in tensors]  # chunks[rank][c]
    sent = [0] * n
    for step in range(n - 1):  # reduce-scatter: rank r sends chunk (r - step) to rank r + 1, which adds it
        msgs = [(r, (r - step) % n, chunks[r][(r - step) % n].clone()) for r in range(n)]
        for r, c, data in msgs:
            chunks[(r + 1) % n][c] += data
            sent[r] += data.numel() * data.element_size()
    for step in range(n - 1):  # all-gather: rank r sends its summed chunk (r + 1 - step) to rank r + 1
        msgs = [(r, (r + 1 - step) % n, chunks[r][(r + 1 - step) % n].clone()) for r in range(n)]
        for r, c, data in msgs:
            chunks[(r + 1) % n][c] = data
            sent[r] += data.numel() * data.element_size()
    return [torch.cat(c) for c in chunks], sent


n_sim, numel = 8, 8 * 1000
grads = [torch.randn(numel) for _ in range(n_sim)]
reduced, sent = ring_all_reduce(grads)
assert all(torch.allclose(r, torch.stack(grads).sum(0), atol=1e-5) for r in reduced)
ring_formula = 2 * (n_sim - 1) / n_sim * numel * 4
print(f"ring all-reduce over {n_sim} ranks of {numel * 4:,} bytes: each rank sent {sent[0]:,} bytes; "
      f"2 (N-1)/N x bytes = {ring_formula:,.0f}")
checks["ring all-reduce bytes: simulation vs 2 (N-1)/N"] = (max(abs(x - ring_formula) for x in sent), 1)

# %%
prefill_tokens = 8192
print(f"8K-token prefill: {prefill_tokens * per_layer_bytes['bf16 both ways'] / GB:.2f} GB of all-to-all per MoE layer")
# DP64 training step: only the replicated parameters are all-reduced (each expert lives on one rank of EP64)
allreduce_per_step = 2 * (DP - 1) / DP * P_rest * 4  # fp32 gradients
print(f"DP{DP} gradient all-reduce of the {P_rest / 1e9:.1f}B replicated parameters (fp32): "
      f"{allreduce_per_step / GB:.0f} GB sent by each GPU per optimizer step")

# %% [markdown]
# A training step's all-reduce thus sends about 153 GB from every GPU, once per optimizer step; the all-to-alls
# cost 193.5 KB per token per MoE layer, in the forward pass and again in the backward pass. **Tensor
# parallelism** (splitting each weight matrix across GPUs) would add an all-reduce of activations inside every
# layer; EP and DP avoid it for the experts and attention, which is why the paper's serving setup uses them.
#
# ## 3. KV cache of one 200K-token sequence: MLA against GQA-8
#
# MLA caches one compressed latent per token and layer: $c^{KV}$ (512 values) plus the shared RoPE key (64),
# 576 values, plus the DSA indexer's key (128). **GQA-8** (grouped-query attention with 8 KV heads) caches a key
# and a value per KV head. At GLM-5's own head widths (keys 192 + 64 = 256, values 256) that is
# 8 x (256 + 256) = 4096 values. The paper's MLA-versus-GQA ablation (section 2.1, Table 1) instead quotes a
# "2048-dimension KV-cache" for GQA-8: its proxy model has 128-wide heads, 8 x (128 + 128) = 2048, half of
# GLM-5's widths. Both are computed below; the canonical comparison uses GLM-5's widths.

# %%
# derivation: cached values per token per layer
mla_values = 512 + 64  # c_KV + shared rope key
indexer_values = 128
gqa8_values = 8 * (256 + 256)  # 8 KV heads at GLM-5's head widths
gqa8_128_values = 8 * (128 + 128)  # 8 KV heads of width 128: the paper's "2048-dimension" ablation cache
checks["MLA cache values"] = (abs(mla_values + indexer_values - cfg.kv_cache_values_per_token()), 1)
checks["GQA-8 values at GLM-5's widths"] = (abs(gqa8_values - 8 * (cfg.qk_head_dim + cfg.v_head_dim)), 1)

# %%
T = cfg.max_position_embeddings  # 202,752 = the paper's "200K"
mla = cfg.kv_cache_bytes_per_token() * T  # bf16, 78 layers, indexer keys included
mla_only = cfg.kv_cache_bytes_per_token(include_indexer=False) * T
gqa8 = cfg.num_hidden_layers * gqa8_values * 2 * T
gqa8_128 = cfg.num_hidden_layers * gqa8_128_values * 2 * T
print(f"one {T:,}-token sequence, bf16 cache, {cfg.num_hidden_layers} layers:")
print(f"  MLA alone (576 values)           {mla_only / GB:6.1f} GB")
print(f"  MLA + indexer keys (704 values)  {mla / GB:6.1f} GB")
print(f"  GQA-8, 256-wide heads (4096)     {gqa8 / GB:6.1f} GB   ({gqa8 / mla_only:.1f}x MLA alone)")
print(f"  GQA-8, 128-wide heads (2048)     {gqa8_128 / GB:6.1f} GB   ({gqa8_128 / mla_only:.1f}x MLA alone; the paper's "
      f"ablation cache)")
tokens_per_gpu = free_fp8 * GB / cfg.kv_cache_bytes_per_token()
print(f"free memory per serving GPU ~{free_fp8:.0f} GB = {tokens_per_gpu / 1e6:.2f}M cached tokens with MLA + indexer "
      f"keys, {free_fp8 * GB / (cfg.num_hidden_layers * gqa8_values * 2) / 1e6:.2f}M with GQA-8 (256-wide)")

# %% [markdown]
# A full 200K context costs 18.2 GB with MLA alone and 22.3 GB with the indexer keys, so a serving GPU keeps
# about five of them besides its weights. GQA-8 at GLM-5's head widths would need 129.6 GB, 7.1x MLA's 576
# values: not even one such sequence would fit beside the weights. (With 128-wide heads, the paper's ablation
# cache, it would be 64.8 GB, 3.6x.) Agentic rollouts are long and many (over 1k concurrent), so the cache is
# the scarce resource, and throwing it away between the turns of a rollout is expensive. That is what the next
# section is about.
#
# ## 4. DP-aware rollout routing: prefix-cache hits across turns
#
# A multi-turn rollout sends its **whole history** again at every turn (model output, tool output, model
# output ...). The engine that served turn j holds that history in its prefix cache; if turn j + 1 lands
# there, only the new tokens are prefilled. A plain load balancer (round-robin over the DP ranks) sends it
# to a random rank: a hit only with probability 1/N. GLM-5 maps each rollout id to a fixed DP rank by
# consistent hashing, with light rebalancing (`glm5_ref.distributed.RolloutRouter`: sticky placement,
# bounded loads, eps = 0.25; paper section 4.1.2, "DP-aware routing for acceleration").
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
fig.suptitle("Multi-turn rollouts: round-robin against DP-aware routing (simulation)")
fig.tight_layout()
_ = show_figure(fig, "10_prefix_cache_hit_rate.png", dpi=120)
hit64_rr, hit64_dp = results["round-robin"][-1][0], results["dp-aware"][-1][0]
hit1 = results["dp-aware"][0][0]  # one rank: every turn finds its history (only the new tokens miss)

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
assert y_err < 1e-5 and xg_err < 1e-5 and w_err < 1e-5
assert torch.equal(load, aux.tokens_per_expert)

# %% [markdown]
# Each rank reports `bytes_sent`: the rows moved for **its own tokens**, dispatch out and combine back,
# $2 \times$ (off-rank slots) $\times d \times 4$ bytes (fp32). The count below is independent of the ranks: it
# takes the routing of the single-process MoE above (computed in this notebook's process), assigns each token to
# the rank that holds it and each expert to its rank (experts 0-3 on rank 0, 4-7 on rank 1), and counts the
# slots whose expert lives elsewhere. Per rank, what a rank *sends* also differs from what is moved for its
# tokens: rank r sends its own off-rank rows (dispatch) plus the outputs of the rows it received (combine); the
# totals over the ranks are the same.

# %%
n_local = tiny.n_routed_experts // 2
token_rank = torch.cat([torch.full((n,), r) for r, n in enumerate(tokens)])  # (48,) the rank holding each token
owner = aux.topk_idx.reshape(-1, tiny.num_experts_per_tok) // n_local  # (48, K) the rank holding each slot's expert
off_by_hand = [int((owner[token_rank == r] != r).sum()) for r in range(2)]
row_bytes = tiny.hidden_size * 4  # one fp32 row of d values
moved_by_hand = [2 * off * row_bytes for off in off_by_hand]  # dispatch out + combine back, for rank r's tokens
sent_by_hand = [(off_by_hand[r] + off_by_hand[1 - r]) * row_bytes for r in range(2)]  # what rank r itself sends
for r, rank in enumerate(ranks):
    print(f"rank {r}: {rank['off_rank_slots']} of {rank['slots']} slots went to the other rank "
          f"({rank['off_rank_slots'] / rank['slots']:.0%}; 1/2 expected); moved for its tokens: reported "
          f"{rank['bytes_sent']:,} B, counted {moved_by_hand[r]:,} B = {moved_by_hand[r] / tokens[r]:.0f} per token; "
          f"sent by the rank itself: {sent_by_hand[r]:,} B")
checks["off-rank slots: ranks vs single-process routing"] = (
    sum(abs(r["off_rank_slots"] - o) for r, o in zip(ranks, off_by_hand)), 0.5)
checks["all-to-all bytes: ranks vs single-process routing"] = (
    sum(abs(r["bytes_sent"] - m) for r, m in zip(ranks, moved_by_hand)), 0.5)
checks["total bytes: moved for the tokens == sent by the ranks"] = (abs(sum(moved_by_hand) - sum(sent_by_hand)), 0.5)

# %% [markdown]
# Per token the demo moves $2 d \cdot 4 = 256$ bytes per off-rank slot; with K = 2 slots of which half leave the
# rank, that is about $K d (4 + 4) / 2 = 256$ bytes per token, the section 2 formula at EP2 in fp32.
#
# ## Summary
#
# - GLM-5 has 743.9B parameters without the MTP layer (40.8B active per token) and 753.9B with it. Under EP64
#   each GPU holds 4 of every layer's 256 experts (1/64 of the 734B expert parameters, MTP layer included); the
#   replicated 19.4B (attention, dense layers, embeddings) then dominate. FP8 serving needs about 31 GB of weights
#   per GPU; training needs far more (280 GB even with ZeRO-1), hence sharding beyond DP64.
# - Every token sends its hidden state to 8 experts and gets 8 outputs back: about 193.5 KB per token per MoE
#   layer in bf16 at EP64, 14.7 MB through the whole model; a random-routing count from the configuration agrees.
#   A ring all-reduce sends $2(N-1)/N$ times the gradient bytes from each rank: about 153 GB per DP64 step.
# - MLA caches 576 values per token and layer (704 with the indexer key); GQA-8 at GLM-5's head widths would
#   cache 4096: 18.2 GB against 129.6 GB (7.1x) for one 202,752-token sequence.
# - Consistent hashing of rollout ids onto DP ranks turns multi-turn prompts into cache hits; a round-robin
#   balancer loses them as soon as there are several ranks (figures/10_prefix_cache_hit_rate.png).
# - Launch on CPU: `torchrun --nproc_per_node 2 -m glm5_ref train --config tiny --steps 20 --out runs/dp`
#   (add `--expert-parallel` to shard the experts); the same command runs on GPUs with NCCL (NVIDIA's library of
#   collectives) in place of gloo.
#
# The check: the derivations equal the package and the independent counts, and the numbers stated above are
# the computed ones.

# %%
# check: derivations == glm5_ref and the independent counts; the numbers the prose states
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
assert (total, active, total_mtp) == (743_911_199_232, 40_833_126_912, 753_864_119_552)  # notebook 00's numbers
assert round(P_rest / 1e9, 1) == 19.4 and round(per_gpu / 1e9) == 31
assert 2 * tiny.hidden_size * 4 == 256 == tiny.num_experts_per_tok * tiny.hidden_size * 8 // 2  # section 5's 256 bytes
assert round(per_layer_bytes["bf16 both ways"] / 1e3, 1) == 193.5 and round(allreduce_per_step / GB) == 153
assert round(prefill_tokens * per_layer_bytes["bf16 both ways"] / GB, 1) == 1.6
assert (round(mla_only / GB, 1), round(mla / GB, 1), round(gqa8 / GB, 1), round(gqa8_128 / GB, 1)) == (18.2, 22.3, 129.6, 64.8)
assert round(gqa8 / mla_only, 1) == 7.1 and round(gqa8_128 / mla_only, 1) == 3.6
assert abs(hit64_dp - hit1) < 0.02 and hit64_rr < 0.5 * hit64_dp, (hit1, hit64_dp, hit64_rr)
assert (round(eq_tok["glm5_moe_bpb"], 3), round(eq_tok["dense_bpb"], 3), round(eq_wall["glm5_moe_bpb"], 3)) == (2.024, 2.057, 2.095)
print(f"derivation == glm5_ref ({len(checks)} checks); stated numbers as computed; "
      f"notebook ran in {time.perf_counter() - t_notebook:.0f} s "
      f"(wall clock; {time.process_time() - cpu_notebook:.0f} s of CPU in this process)")

# %% [markdown]
# ## Exercises
#
# 1. Serve GLM-5 with EP32 (4 nodes) instead of EP64. Predict the FP8 weight bytes per GPU (with the MTP layer),
#    then check with the parameter breakdown.
# 2. Inside one node (EP8) with FP8 both ways, predict the all-to-all bytes per token per MoE layer, then check
#    with `all_to_all_bytes_per_token`.
# 3. Simulate a ring all-reduce over 16 ranks with `ring_all_reduce`. Predict the bytes each rank sends for a
#    16,000-value fp32 tensor, then check; how does it compare with 64 ranks?

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
ep32 = parts["routed_experts"] / 32 + (sum(parts.values()) - parts["routed_experts"])
print(f"EP32, FP8: {ep32 / GB:.1f} GB of weights per GPU (EP64: {per_gpu / GB:.1f} GB)")
assert abs(ep32 - per_gpu - parts["routed_experts"] / 64) < 1  # the routed share doubles, the rest is unchanged

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
predicted = cfg.num_experts_per_tok * cfg.hidden_size * (1 + 1) * 7 / 8
counted = all_to_all_bytes_per_token(cfg, 8, 1, 1)
print(f"EP8, FP8 both ways: predicted {predicted / 1e3:.1f} KB, counted {counted / 1e3:.1f} KB per token per layer")
assert abs(counted / predicted - 1) < 0.01

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
_, sent16 = ring_all_reduce([torch.randn(16_000) for _ in range(16)])
predicted16 = 2 * 15 / 16 * 16_000 * 4
print(f"16 ranks: each sends {sent16[0]:,} B (predicted {predicted16:,.0f}); 64 ranks would send "
      f"{2 * 63 / 64 * 16_000 * 4:,.0f} B: almost the same, 2x the tensor at large N")
assert all(x == predicted16 for x in sent16)
