# %% [markdown]
# # 03 · The MoE router: sigmoid gating, top-k, and aux-loss-free balancing
#
# **Prerequisites:** notebook 00 (mixture of experts, routed and shared experts, parameter counts), 00a
# (SwiGLU). **Reading time:** about 30 minutes (it runs in about 10 s under make test, 2 cores).
#
# 725 of GLM-5's 744 billion parameters (paper section 2.1, "Model size scaling") sit in **routed experts**: 75
# MoE layers of 256 SwiGLU experts each (Table 10). A token uses 8 of them per layer (plus one shared expert
# every token uses), so it touches 23B of the 725B; the first cell computes these numbers from the config.
# Which 8 is decided by a **router**, a single (256 × 6144) matrix per layer. This notebook derives it:
#
# 1. softmax versus sigmoid gating, and the top-k;
# 2. GLM-5's router exactly, written as a loop over tokens and checked against `glm5_ref.moe.MoEGate`;
# 3. why the load must be balanced, and the two mechanisms GLM-5 inherits from DeepSeek-V3: a bias that
#    changes *which* experts are chosen but never *how much* they weigh, and a tiny sequence-wise loss;
# 4. an experiment on a drifting stream of topics: no balancing, the auxiliary loss alone, the bias update.
#
# Cells that start with `# derivation` use only `torch`; every other cell imports from `glm5_ref`.
# The `# check` cell before the exercises asserts that the derivations and the package agree.

# %%
import dataclasses
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from glm5_ref.apps.diagrams.moe import moe_routing
from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config

torch.manual_seed(0)
torch.set_num_threads(1)  # tiny tensors: one thread is fastest and the same on every machine
glm5 = GLM5Config.glm5()
parts, active = glm5.param_breakdown(), glm5.param_breakdown(active=True)
print(f"routed experts: {parts['routed_experts'] / 1e9:.1f}B of {glm5.num_params() / 1e9:.1f}B parameters; "
      f"a token uses {active['routed_experts'] / 1e9:.1f}B of them")
print(f"routers: {parts['router'] / 1e6:.0f}M parameters; shared experts: {parts['shared_experts'] / 1e9:.1f}B")
print(f"E = {glm5.n_routed_experts}, K = {glm5.num_experts_per_tok}, shared = {glm5.n_shared_experts}, "
      f"groups = {glm5.n_group}/{glm5.topk_group}, scale = {glm5.routed_scaling_factor}")

# %% [markdown]
# ## 1. Softmax or sigmoid gating
#
# The router gives token $u_t$ an affinity for each expert from one dot product, $\ell_{t,e} = u_t \cdot w_e$.
# Mixtral and DeepSeek-V2 use a **softmax** (Mixtral over the chosen experts' logits, DeepSeek-V2 over all
# experts); DeepSeek-V3 and GLM-5 use a **sigmoid** per expert:
#
# $$s^{\text{softmax}}_{t,e} = \frac{e^{\ell_{t,e}}}{\sum_{e'} e^{\ell_{t,e'}}}, \qquad
#   s^{\text{sigmoid}}_{t,e} = \sigma(\ell_{t,e}) = \frac{1}{1 + e^{-\ell_{t,e}}}.$$
#
# Both are increasing in $\ell$, so on their own they choose the **same** top-$K$ experts. They differ in
# what the scores mean. Softmax scores compete: they sum to one, so raising one expert's logit lowers every
# other expert's score, and with 256 experts each score is tiny. A sigmoid score depends on its own expert
# only: it is an independent "how well does this expert fit", which stays meaningful as experts are added,
# and which a per-expert bias can shift without touching the others. Once the $K$ experts are chosen, the
# gate weights are their scores normalised to sum to one, times a scale $\rho$ (2.5 in GLM-5's released
# configuration, `routed_scaling_factor`, printed above):
#
# $$g_{t,e} = \rho \,\frac{s_{t,e}}{\sum_{e' \in \text{sel}_t} s_{t,e'}} \quad (e \in \text{sel}_t).$$
#
# The sigmoid saturates, so the normalised weights of the chosen experts are flatter than softmax's.

# %%
# derivation: softmax and sigmoid gates on the same logits, one token, 8 experts, top-2
logits = torch.tensor([2.0, 1.5, 0.3, -0.2, -1.0, 0.9, -2.0, 0.1])
k, rho = 2, 2.5
chosen = logits.topk(k).indices
for name, s in (("softmax", logits.softmax(-1)), ("sigmoid", logits.sigmoid())):
    gate = rho * s[chosen] / s[chosen].sum()
    print(f"{name:8s} scores {[round(v, 3) for v in s.tolist()]}  chosen {chosen.tolist()}  "
          f"gates {[round(v, 3) for v in gate.tolist()]}")
assert torch.equal(logits.softmax(-1).topk(k).indices, logits.sigmoid().topk(k).indices)  # same choice

# %% [markdown]
# ## 2. GLM-5's router, one token at a time
#
# GLM-5's router (`topk_method = "noaux_tc"`, DeepSeek-V3 §2.1.2) adds three things to the sigmoid top-$K$:
#
# - a **bias** $b_e$ (`e_score_correction_bias`) that is added to the scores for the *selection only*:
#   $\text{sel}_t = \text{TopK}(s_{t,e} + b_e)$, while the gate weights use the unbiased $s_{t,e}$;
# - **group-limited routing**: experts are split into `n_group` groups, a group's score is the sum of its two
#   best biased scores, and only the `topk_group` best groups stay eligible. DeepSeek-V3 uses 8 groups of
#   which 4 are kept (so a token's experts live on at most 4 nodes); GLM-5 sets 1/1, which switches it off;
# - the normalisation and scale of section 1, computed in fp32 whatever the model's dtype.
#
# The diagram shows one token's path with GLM-5's numbers, and the bias update of section 3, which closes the
# loop without a gradient.

# %%
show_figure(moe_routing(glm5), "03_moe_routing.png");

# %% [markdown]
# Here it is as a plain loop over tokens (the package does the same with batched tensor operations):

# %%
# derivation: the router written out per token
def route_naive(x, weight, bias, k, n_group, topk_group, rho, normalise=True):
    """x (N, d), weight (E, d), bias (E,) -> chosen experts (N, k) sorted by id, gate weights (N, k)."""
    E = weight.shape[0]
    per_group = E // n_group
    chosen_all, gates_all = [], []
    for u in x:
        s = torch.sigmoid(weight.double() @ u.double())  # (E,) affinities
        biased = (s + bias.double()).tolist()
        group_score = [sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        eligible = [e for e in range(E) if e // per_group in kept]
        chosen = sorted(sorted(eligible, key=lambda e: -biased[e])[:k])
        g = s[chosen]
        if normalise:
            g = g / g.sum()
        chosen_all.append(chosen)
        gates_all.append(rho * g)
    return torch.tensor(chosen_all), torch.stack(gates_all)


# %%
from glm5_ref.moe import MoE, MoEGate, balance_loss, router_stats, update_router_bias

checks = {}
# a DeepSeek-V3-style configuration (groups on) and GLM-5's routing (1/1), both at classroom width
for n_group, topk_group, experts, k in ((4, 2, 32, 4), (1, 1, 32, 4)):
    config = dataclasses.replace(GLM5Config.classroom(), n_group=n_group, topk_group=topk_group,
                                 n_routed_experts=experts, num_experts_per_tok=k)
    gate = MoEGate(config)
    with torch.no_grad():
        gate.e_score_correction_bias.normal_(0.0, 0.05)
    x = torch.randn(37, config.hidden_size)
    with torch.no_grad():  # routing only: no gradient needed, and none is carried into the comparisons
        idx, w, scores = gate(x)  # (N, K) best biased score first, (N, K), (N, E)
        idx_naive, w_naive = route_naive(x, gate.weight, gate.e_score_correction_bias, k, n_group, topk_group,
                                         config.routed_scaling_factor)
    order = idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), idx_naive)
    checks[f"router, groups {n_group}/{topk_group}"] = float((w.gather(1, order) - w_naive).abs().max())
    print(f"groups {n_group}/{topk_group}: same experts for all {len(x)} tokens; max gate difference "
          f"{checks[f'router, groups {n_group}/{topk_group}']:.1e}; gates sum to "
          f"{w.sum(-1).mean():.4f} (= routed_scaling_factor)")

# %% [markdown]
# The bias moves the *choice* and nothing else. Push one expert's bias far up and it is chosen for every
# token, but its gate weight is still its own sigmoid score, normalised among the chosen:

# %%
with torch.no_grad():
    gate.e_score_correction_bias.zero_()
    gate.e_score_correction_bias[7] = 10.0
idx_b, w_b, scores_b = gate(x)
print("expert 7 chosen by", int((idx_b == 7).any(-1).sum()), "of", len(x), "tokens")
chosen_scores = scores_b.gather(1, idx_b)
assert torch.allclose(w_b, 2.5 * chosen_scores / chosen_scores.sum(-1, keepdim=True))
print("mean gate weight of expert 7:", f"{w_b[idx_b == 7].mean():.3f}", "(its bias is 10; its weight is not)")

# %% [markdown]
# ## 3. Why the load must be balanced
#
# Each expert is a separate weight matrix; in training and serving they are spread over devices (expert
# parallelism), and every device waits for the busiest one. If the busiest expert gets $m$ times the mean
# load, a layer runs at $1/m$ of the throughput it could have, and experts that get no tokens are parameters
# that learn nothing. Routers drift toward imbalance on their own: an expert chosen often is trained more,
# fits better, and is chosen more.
#
# The classic fix is an **auxiliary loss** that penalises correlation between how often an expert is chosen
# and how much affinity it gets. DeepSeek-V3 keeps a sequence-wise version of it with a tiny weight
# ($\alpha = 10^{-4}$ in GLM-4.5, whose hyper-parameters GLM-5 says it keeps: paper Appendix A, "Other
# hyper-parameters are the same as those of GLM-4.5"; `aux_loss_alpha_seq` in the config); for a sequence of
# $T$ tokens
#
# $$L_{\text{bal}} = \alpha \sum_e f_e P_e,\quad f_e = \frac{E}{K T}\sum_t \mathbb 1[e \in \text{sel}_t],
#   \quad P_e = \frac1T \sum_t \frac{s_{t,e}}{\sum_{e'} s_{t,e'}}.$$
#
# A loss pulls on the same weights that the language-modelling loss trains, so a weight large enough to
# balance also interferes with learning. The main mechanism is therefore **aux-loss-free**: after each step,
# every expert's bias moves by a fixed $\gamma$ (0.001 in GLM-4.5, hence GLM-5; `bias_update_speed`) against its
# load,
#
# $$b_e \leftarrow b_e + \gamma\,\operatorname{sign}(\bar c - c_e),$$
#
# with $c_e$ the tokens expert $e$ received in the step and $\bar c$ their mean. No gradient is involved,
# and because the bias only changes the choice, the output weights stay the model's own scores.

# %%
# derivation: the bias rule and the sequence-wise loss, written out
def bias_update_naive(bias, load, gamma):
    mean = sum(load) / len(load)
    return [b + gamma * ((mean > c) - (mean < c)) for b, c in zip(bias, load)]


def balance_loss_naive(scores, chosen, E, K, alpha):
    """scores (T, E) list of lists, chosen (T, K) lists: one sequence."""
    T = len(scores)
    f = [E / (K * T) * sum(e in c for c in chosen) for e in range(E)]
    P = [sum(s[e] / sum(s) for s in scores) / T for e in range(E)]
    return alpha * sum(fe * pe for fe, pe in zip(f, P))


# %%
load = torch.tensor([9, 0, 3, 4, 4, 4, 4, 4])
naive = bias_update_naive([0.0] * 8, load.tolist(), 0.001)
g8 = MoEGate(GLM5Config.tiny())  # 8 experts
update_router_bias(g8, load)
checks["bias update"] = max(abs(a - b) for a, b in zip(naive, g8.e_score_correction_bias.tolist()))
print("load", load.tolist(), "-> bias", [round(b, 6) for b in g8.e_score_correction_bias.tolist()])
print({k: round(v, 3) if isinstance(v, float) else v for k, v in router_stats(load).items()})

# The loss is about alpha when the load is even and at most alpha * E / K (all tokens AND all affinity on the
# same K experts). Sigmoid scores of the other experts stay well above zero, so P_e moves little: below, all
# tokens pile onto 4 experts and the loss barely reaches 2 alpha. A gentle safety net, not the main mechanism.
with torch.no_grad():
    gate.e_score_correction_bias.zero_()
skewed = MoEGate(config)  # the same 32-expert, top-4 router as `gate` (the 1/1 case above)
with torch.no_grad():
    skewed.weight.copy_(gate.weight)
    skewed.weight[:4] += 3.0 * x.mean(0) / x.mean(0).norm() ** 2  # experts 0-3: a head start on every token
for name, router in (("random router", gate), ("router skewed to experts 0-3", skewed)):
    idx_s, _, scores_s = router(x)
    loss_pkg = balance_loss(scores_s, idx_s, 32, 4, 1e-4)
    loss_naive = balance_loss_naive(scores_s.tolist(), idx_s.tolist(), 32, 4, 1e-4)
    checks[f"balance loss, {name}"] = abs(loss_pkg.item() - loss_naive) / loss_naive
    print(f"{name:30s} balance loss {loss_pkg.item():.2e}   max/mean load "
          f"{router_stats(torch.bincount(idx_s.flatten(), minlength=32))['max_over_mean']:.2f}")

# %% [markdown]
# ## 4. An experiment: a drifting stream of topics
#
# A small MoE layer (16 experts, top-2, width 16, no shared expert) learns to map tokens to targets. Tokens
# come from 8 "topics" (clusters, each with its own target function), and which topics are popular drifts
# over the 300 training steps, as a pre-training data mix does. Three runs from the same initialisation:
#
# - **no balancing**;
# - **auxiliary loss alone**, with $\alpha = 0.03$: GLM-4.5's $10^{-4}$ does nothing visible in 300 steps of
#   a toy, so it is scaled up (the factor is printed below), as a method that relies on the loss alone has to;
# - **bias update** with GLM-5's own $\gamma = 0.001$ and no auxiliary loss.
#
# The heat maps show each expert's load per step, as a multiple of the mean (1 = perfectly balanced). A batch
# of 256 tokens gives each expert 32 token-slots on average, so even a perfect router shows sampling noise per
# step (its size is printed below); the load summed over the last 100 steps shows the balance the router is
# steering to.

# %%
E, K, d, STEPS, BATCH, TOPICS = 16, 2, 16, 300, 256, 8
toy = dataclasses.replace(GLM5Config.tiny(), hidden_size=d, moe_intermediate_size=16, n_routed_experts=E,
                          num_experts_per_tok=K, n_shared_experts=0, aux_loss_alpha_seq=0.03,
                          bias_update_speed=0.001)
g = torch.Generator().manual_seed(0)
centers = 1.5 * torch.randn(TOPICS, d, generator=g)  # where each topic's tokens live
maps = torch.randn(TOPICS, d, d, generator=g) / math.sqrt(d)  # each topic's target function


def topic_mix(step):
    """Topic popularity at a step: a broad bump that travels 1.5 times around the 8 topics."""
    phase = step / STEPS * 1.5 * TOPICS
    dist = (torch.arange(TOPICS) - phase + TOPICS / 2) % TOPICS - TOPICS / 2
    return torch.softmax(-dist**2 / 8.0, 0)


def stream(step, gen):
    topic = torch.multinomial(topic_mix(step), BATCH, replacement=True, generator=gen)  # (N,)
    x = centers[topic] + torch.randn(BATCH, d, generator=gen)  # (N, d)
    y = torch.tanh(torch.einsum("nij,nj->ni", maps[topic], x))  # (N, d)
    return x[None], y[None]  # one sequence of BATCH tokens


def train(method):
    torch.manual_seed(0)
    moe = MoE(toy)
    opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    loads, losses = [], []
    for step in range(STEPS):
        x, y = stream(step, gen)
        out, aux = moe(x, return_aux=True)
        mse = (out - y).pow(2).mean()
        loss = mse + aux.balance_loss if method == "auxiliary loss" else mse
        opt.zero_grad()
        loss.backward()
        opt.step()
        if method == "bias update":
            update_router_bias(moe, aux.tokens_per_expert)  # gamma = toy.bias_update_speed
        loads.append(aux.tokens_per_expert.float() / aux.tokens_per_expert.float().mean())
        losses.append(mse.item())
    return torch.stack(loads), losses  # (STEPS, E)


slots = BATCH * K / E  # token-slots per expert per step, on average
noise = ((1 - K / E) / slots) ** 0.5  # std / mean of a binomial count: a router choosing uniformly at random
print(f"{slots:.0f} token-slots per expert per step; a uniform random router's load varies by ±{noise:.0%} "
      f"(one standard deviation); auxiliary-loss weight {toy.aux_loss_alpha_seq / glm5.aux_loss_alpha_seq:.0f}x "
      f"GLM-5's {glm5.aux_loss_alpha_seq:g}")
runs = {method: train(method) for method in ("no balancing", "auxiliary loss", "bias update")}
summary = {}
for method, (loads, losses) in runs.items():
    summary[method] = {
        "max/mean load per step": loads[-100:].max(1).values.mean().item(),  # last 100 steps
        "max/mean of summed load": router_stats(loads[-100:].sum(0))["max_over_mean"],  # last 100 steps
        "experts with < 10% of mean": int((loads[-100:].mean(0) < 0.1).sum()),
        "task mse": sum(losses[-50:]) / 50,  # last 50 steps
    }
    print(f"{method:15s}", {k: round(v, 3) for k, v in summary[method].items()})

# %%
fig = plt.figure(figsize=(13, 6.2))
grid = fig.add_gridspec(2, 3, height_ratios=(2.2, 1), hspace=0.45)
vmax = max(loads.max().item() for loads, _ in runs.values())
for i, (method, (loads, losses)) in enumerate(runs.items()):
    ax = fig.add_subplot(grid[0, i])
    image = ax.imshow(loads.T, aspect="auto", cmap="magma", vmin=0, vmax=min(vmax, 4), interpolation="nearest")
    ax.set_title(f"{method}\nmax/mean per step, last 100: {summary[method]['max/mean load per step']:.2f}",
                 fontsize=10)
    ax.set_xlabel("training step")
    if i == 0:
        ax.set_ylabel("expert")
fig.colorbar(image, ax=fig.axes, label="load / mean load", shrink=0.9, location="right")
ax = fig.add_subplot(grid[1, :2])
for method, (loads, _) in runs.items():
    smooth = torch.nn.functional.avg_pool1d(loads.max(1).values[None, None], 9, 1, 4, count_include_pad=False)[0, 0]
    ax.plot(smooth, label=method)
ax.axhline(1.0, color="gray", lw=0.8, ls="--")
ax.set_xlabel("training step")
ax.set_ylabel("max / mean load\n(9-step average)")
ax.set_title("the busiest expert's load over training (1 = perfectly balanced)", fontsize=10)
ax.legend(fontsize=8)
ax = fig.add_subplot(grid[1, 2])
mix = torch.stack([topic_mix(s) for s in range(STEPS)])
ax.imshow(mix.T, aspect="auto", cmap="Blues", interpolation="nearest")
ax.set_xlabel("training step")
ax.set_ylabel("topic")
ax.set_title("topic popularity in the stream", fontsize=10)
fig.suptitle("expert load on a drifting stream of topics: three ways to balance (or not)", fontsize=12, y=0.98)
show_figure(fig, "03_expert_load.png");

# %% [markdown]
# Without balancing, a few experts take most of the tokens and some receive none at all. Top-$K$ routing
# cannot repair this by itself: an expert that is never chosen gets no gradient, and the router's gradient
# only reshapes the weights among the experts it already chose. Both balancing methods bring every expert
# back and keep the load even as the topics drift. The bias does it with GLM-5's own $\gamma$ and nothing
# added to the loss; the auxiliary loss needed a weight 300 times GLM-5's (printed above), large enough to
# compete with the task, which is exactly the interference DeepSeek-V3 set out to avoid (its section 2.1.2).
# (The task losses of the three runs are close in this toy; DeepSeek-V3's ablations at scale found the
# loss-free method better on most benchmarks.)

# %%
none, aux_loss, bias = (summary[m] for m in ("no balancing", "auxiliary loss", "bias update"))
assert none["experts with < 10% of mean"] > 0 and aux_loss["experts with < 10% of mean"] == 0
assert bias["experts with < 10% of mean"] == 0
assert bias["max/mean of summed load"] < none["max/mean of summed load"] - 0.5
assert aux_loss["max/mean of summed load"] < none["max/mean of summed load"] - 0.5

# %% [markdown]
# ## Summary
#
# - GLM-5's router is one fp32 matrix per layer; scores are per-expert sigmoids, the 8 experts are chosen on
#   score + bias, and the gate weights are the chosen *unbiased* scores, normalised and scaled by 2.5.
# - Group-limited routing exists in the formula but is switched off in GLM-5 (`n_group = topk_group = 1`).
# - Balance comes mainly from the bias, nudged by ±0.001 per step against each expert's load, with a
#   sequence-wise auxiliary loss of weight $10^{-4}$ as a safety net.
# - `glm5_ref.moe.MoE` runs the experts either one at a time (`impl="loop"`) or sorted by expert into one
#   grouped matrix multiply per projection (`impl="grouped"`); `python -m glm5_ref bench moe` times both.
#
# The last check: the derivations and `glm5_ref.moe` agree.

# %%
# check: the derivations (router, bias update, balance loss) equal glm5_ref.moe
for name, err in checks.items():
    assert err < 1e-6, (name, err)
print("derivation == glm5_ref.moe:", {k: f"{v:.1e}" for k, v in checks.items()})

# %% [markdown]
# ## Exercises
#
# 1. Switch the normalisation off (`norm_topk_prob=False`) and push expert 7's bias to 10 as in section 2.
#    Predict expert 7's gate weight for a token in terms of its sigmoid score, then check with `MoEGate`.
# 2. An expert keeps receiving 9 token-slots per step, more than the mean. With GLM-5's $\gamma$, predict after
#    how many steps its bias has fallen by 0.05, then check with `update_router_bias`.
# 3. A router that picks its top-2 of 16 experts uniformly at random, on batches of 256 tokens: predict the
#    standard deviation of an expert's load divided by the mean load, then check by simulating 2000 batches.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1: without the normalisation the gate weight is rho * s_7, the unbiased score times 2.5
raw = MoEGate(dataclasses.replace(config, norm_topk_prob=False))
with torch.no_grad():
    raw.weight.copy_(gate.weight)
    raw.e_score_correction_bias[7] = 10.0
    idx_r, w_r, scores_r = raw(x)
prediction = raw.routed_scaling_factor * scores_r[:, 7]  # (N,)
measured = w_r[idx_r == 7]  # (N,): expert 7 is chosen by every token
print(f"expert 7: gate weight {measured.mean():.3f} on average = 2.5 x its sigmoid score {scores_r[:, 7].mean():.3f}")
assert (idx_r == 7).any(-1).all() and torch.allclose(measured, prediction)

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2: the bias moves by gamma = 0.001 per step, so 0.05 takes 50 steps
g_ex = MoEGate(dataclasses.replace(GLM5Config.tiny(), bias_update_speed=glm5.bias_update_speed))
load_ex = torch.tensor([9, 4, 4, 4, 4, 4, 4, 3])  # mean 4.5; expert 0 is over it
steps = 0
while g_ex.e_score_correction_bias[0] > -0.05 + 1e-6:
    update_router_bias(g_ex, load_ex)
    steps += 1
print(f"bias of the overloaded expert after {steps} steps: {g_ex.e_score_correction_bias[0]:.3f}")
assert steps == round(0.05 / glm5.bias_update_speed)

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3: each expert is picked by a token with probability p = 2/16, so its count is Binomial(256, p):
# std / mean = sqrt((1 - p) / (256 p))
p_pick = 2 / 16
prediction = ((1 - p_pick) / (256 * p_pick)) ** 0.5
picks = torch.rand(2000, 256, 16, generator=torch.Generator().manual_seed(0)).topk(2, dim=-1).indices
counts = torch.zeros(2000, 16).scatter_add_(1, picks.flatten(1), torch.ones(2000, 512))  # (2000, 16) loads
measured = float((counts / counts.mean(-1, keepdim=True)).std())
print(f"predicted {prediction:.3f}, simulated {measured:.3f}")
assert abs(measured - prediction) < 0.01
