# %% [markdown]
# # 08 · Agentic RL: token-in-token-out, double-sided importance sampling, an asynchronous loop
#
# **Prerequisites:** notebook 00a (foundations: the BPE tokenizer, one string with several token splits), notebook 04 (assembling GLM-5: the model, its logits and `generate`), notebook 06 (training the classroom model: a training step, AdamW). **Reading time:** about 35 minutes (it runs in about 35 s under make test, 2 cores).
#
# GLM-5 trains its agents with **reinforcement learning** (RL): the model, now called the *policy*
# $\pi_\theta$, samples whole episodes (*rollouts*: its own turns interleaved with tool results), a reward
# scores each episode, and the update makes well-scored actions more likely. For agents, GLM-5 runs this
# **asynchronously** (paper section 4.1): rollout engines keep generating while the trainer trains, so a
# trajectory often comes from weights that are a few versions old. Three pieces make that work:
#
# 1. **TITO** (token-in-token-out, section 4.1.2): the trainer receives the *exact* token ids the sampler
#    emitted and the sampler's log-probability of each one. Nothing is decoded and re-encoded.
# 2. **Direct double-sided importance sampling** (section 4.1.2, eqs. 3-5): the rollout log-probs stand in for
#    the behaviour policy. A token whose ratio $r = \pi_\theta / \pi_{rollout}$ has left a trust band is
#    **masked** (zero gradient), not clipped.
# 3. **An asynchronous loop** with staleness control (drop samples more than $\tau$ versions old), group
#    padding, environment-crash filtering and heartbeat fault tolerance (sections 3.6.3, 4.1.1 and 4.1.2).
#
# This notebook shows the re-tokenization trap with the project tokenizer and the gateway that avoids it;
# derives the policy-gradient losses from REINFORCE to GRPO + IcePop (GLM-5's reasoning RL) and to
# double-sided IS (its agentic RL), checked against `glm5_ref.rl`; compares their bias and variance on a
# bandit with a stale behaviour policy; then runs the asynchronous loop on a toy tool-use task (with a
# worker killed mid-rollout), times it against the synchronous loop, and shows the full experiment's
# results.
#
# Cells that start with `# derivation` use only `torch`; every other cell imports from `glm5_ref`.

# %%
import json
import math
import random
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from glm5_ref.apps.agentic import AsyncRLLoop, LoopConfig
from glm5_ref.apps.bench import rl_async
from glm5_ref.apps.diagrams.rl import sync_async_timeline, tito_gateway
from glm5_ref.apps.figures import show_figure, show_saved
from glm5_ref.apps.tool_env import ToolUseEnv, run_rollout, success_rate, toy_config, warm_start
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.rl import (double_sided_is_loss, group_advantages, grpo_icepop_loss, reinforce_loss,
                         sequence_logprobs)
from glm5_ref.tito import MODEL, Segment, TITOGateway, Trajectory, retokenization_trap
from glm5_ref.tokenizer import decode, encode, load_tokenizer, retokenization_example

t_notebook = time.perf_counter()
torch.manual_seed(0)
random.seed(0)
torch.set_num_threads(1)
checks = {}  # name -> (error, tolerance): derivation vs package, asserted in the check cell

# %% [markdown]
# ## 1. The re-tokenization trap
#
# A sampler picks one token at a time. Nothing forces it to pick the tokenizer's *canonical* split of a
# string. If the policy emits `" "` followed by `"return"`, the text is `" return"`, and the tokenizer
# writes that as the single token `" return"`. A pipeline that stores text and re-tokenizes for training
# trains on a token the policy never sampled, with a log-probability that belonged to another token.

# %%
enc = load_tokenizer()
ids_sampled, text, ids_again = retokenization_example()
print(f"sampled ids   {ids_sampled}  = {[enc.decode([i]) for i in ids_sampled]}")
print(f"decoded text  {text!r}")
print(f"re-encoded    {ids_again}  = {[enc.decode([i]) for i in ids_again]}")
trap = retokenization_trap(ids_sampled, [-2.3, -0.4], decode, encode)
print(f"same ids: {trap['same_ids']}; log-probs now attached to: {trap['pairs']}")
assert not trap["same_ids"]

# %% [markdown]
# The sampler's log-probs were for `" "` (-2.3) and `"return"` (-0.4). After the round trip, -2.3 sits on
# `" return"`, a token with its own, different probability, and -0.4 belongs to nothing. The ratio
# $\pi_\theta / \pi_{rollout}$ that the losses of section 2 compute for that token is then meaningless.
# Real cases: rllm PR #272 (two splits of `" Pantom"` made the trainer's and the sampler's probabilities
# disagree in sudden spikes) and TRL issue #5224 (`["he", "llo"]` became `["hello"]`).
#
# The fix is to never let text into the training path. GLM-5's **TITO gateway** (paper section 4.1.2)
# "intercepts all generation requests from rollout tasks and records each trajectory's token IDs and
# metadata". `glm5_ref.tito.TITOGateway` does the same: per rollout id it appends the prompt ids, then for
# every model turn the sampled ids with the sampler's log-probs and the policy version that sampled them,
# and for every environment turn the environment's ids with loss mask 0 (a *loss mask* marks the tokens the
# loss counts: 1 for the model's own tokens, 0 for prompt and tool output). The trainer gets exactly those
# lists.

# %%
show_figure(tito_gateway(), "08_tito_gateway.png")

# %% [markdown]
# Here is a two-turn episode of the toy task (this notebook's section 4 describes it) from an untrained policy, recorded
# through the gateway:

# %%
policy = GLM5ForCausalLM(toy_config()).eval()
env = ToolUseEnv(10, 29)
gateway = TITOGateway()
task = env.sample_task(random.Random(1))
traj = run_rollout(lambda: (policy, 0), env, task, gateway, "demo", seed=3)
print(f"reward {traj.reward}; {len(traj.ids)} tokens, {sum(traj.loss_mask)} of them generated")
for seg in traj.segments:
    lps = "" if seg.logprobs is None else "  logprobs " + " ".join(f"{x:.2f}" for x in seg.logprobs)
    print(f"{seg.kind:>6}: {[enc.decode([i]) for i in seg.ids]}{lps}")

# %% [markdown]
# ### The gateway's numbers are the sampler's (derivation)
#
# Replay the same two requests straight to the model with the same seeds: the ids and log-probs must match
# bit for bit. Then recompute the log-probs as the trainer does (one forward pass over the whole
# trajectory): with the same weights every ratio is 1 up to float rounding.

# %%
# derivation: replay the sampler directly (ids and log-probs), then recompute them as the trainer does
n_prompt = len(task.prompt_ids)
turn1 = traj.segments[1].ids
ids1, lp1 = policy.generate(torch.tensor([task.prompt_ids]), 6, temperature=1.0, seed=3, return_logprobs=True)
assert ids1[0, n_prompt:n_prompt + len(turn1)].tolist() == turn1
assert torch.equal(lp1[0, :len(turn1)], torch.tensor(traj.segments[1].logprobs))
full = torch.tensor([traj.ids])
with torch.no_grad():
    logp = torch.log_softmax(policy(full).logits[0, :-1], -1)  # (T-1, V): predicts tokens 1..T-1
recomputed = torch.cat([torch.zeros(1), logp.gather(-1, full[0, 1:, None])[:, 0]])
mask = torch.tensor(traj.loss_mask).bool()
ratio_err = (recomputed[mask] - torch.tensor(traj.logprobs)[mask]).abs().max().item()
print(f"max |log pi_trainer - log pi_rollout| over generated tokens: {ratio_err:.1e}")

# %%
# the package's per-token log-probs (the trainer's), against the hand-written gather above
pkg = sequence_logprobs(policy(full).logits, full)[0].detach()
checks["trainer log-probs == rl.sequence_logprobs"] = ((pkg - recomputed).abs().max().item(), 1e-5)
checks["rollout vs trainer log-probs (same weights)"] = (ratio_err, 1e-4)

# %% [markdown]
# ## 2. The losses: from REINFORCE to GRPO + IcePop and double-sided IS
#
# **REINFORCE, the plain score-function gradient.** For a reward $R(y)$ of a sampled sequence
# $y \sim \pi_\theta$, the gradient of the expected reward is
# $\nabla_\theta E_{y\sim\pi_\theta}[R(y)] = E_{y\sim\pi_\theta}[(R(y) - b)\,\nabla_\theta \log\pi_\theta(y)]$,
# with $\log\pi_\theta(y) = \sum_t \log\pi_\theta(a_t \mid s_t)$ over the model's tokens $a_t$ and any
# baseline $b$ that does not depend on $y$ (it lowers the variance and leaves the mean unchanged). Its loss is
# $\mathcal L = -\frac{1}{\sum_t m_t}\sum_t m_t \hat A \log\pi_\theta(a_t)$ with the *advantage*
# $\hat A = R - b$ and the loss mask $m_t$ (`rl.reinforce_loss`). It is correct only **on-policy**: the samples
# must come from $\pi_\theta$ itself.
#
# **GRPO** (group relative policy optimization, DeepSeekMath, arXiv 2402.03300) samples $G$ responses to one
# prompt and uses the group as the baseline, with no learned value function:
# $\hat A_i = (R_i - \mathrm{mean}(R_1..R_G)) / \mathrm{std}(R_1..R_G)$. It then takes several optimizer steps
# on the same samples with PPO's clipped ratio (PPO: Schulman et al., arXiv 1707.06347): with
# $r_t = \pi_\theta(a_t) / \pi_{old}(a_t)$, the ratio of the current policy to the one that sampled,
# each token contributes $\min(r_t\hat A, \mathrm{clip}(r_t, 1-\epsilon_{low}, 1+\epsilon_{high})\hat A)$.
# Once $r_t$ has moved past the clip boundary in the direction $\hat A$ favours, the token stops pulling.
#
# **IcePop** (Ring-1T, arXiv 2510.18855) handles a second mismatch: the inference engine that samples and
# the training engine that computes gradients give slightly different probabilities for the *same* weights
# (different kernels, precision, batch shapes). With $\rho_t = \pi^{train}_{old}(a_t) / \pi^{infer}_{old}(a_t)$,
# the factor $\mathrm{pop}(\rho, 1/\beta, \beta) = \rho$ if $1/\beta \le \rho \le \beta$, else 0, re-weights a
# token by the mismatch and **masks** a token whose mismatch is too large. $\rho$ does not depend on
# $\theta$, so the mask is fixed during the update. GLM-5's reasoning RL (paper section 3.2, eq. 1) is GRPO
# with IcePop and **no KL term** (the original IcePop adds a penalty on the divergence from a reference
# policy; GLM-5 removes it "to accelerate RL improvement"):
#
# $$\mathcal{L}(\theta) = -\frac{1}{G}\sum_{i=1}^{G}\frac{1}{|y_i|}\sum_{t=1}^{|y_i|}
#   \mathrm{pop}(\rho_{i,t}, 1/\beta, \beta)\,\min\!\big(r_{i,t}\hat A_i,\;
#   \mathrm{clip}(r_{i,t}, 1-\epsilon_{low}, 1+\epsilon_{high})\hat A_i\big),$$
#
# with $\beta = 2$ (the window $[0.5, 2]$), $\epsilon_{low} = 0.2$, $\epsilon_{high} = 0.28$, group size 32 and
# batch size 32, fully on-policy (section 3.2). `rl.grpo_icepop_loss` implements it.
#
# **Direct double-sided importance sampling** (agentic RL, section 4.1.2, eqs. 3-5). In the asynchronous
# loop a trajectory may be sampled by several versions of the weights, so there is no single $\pi_{old}$ to
# recompute. GLM-5 uses the sampler's own log-probs instead: $r_t = \exp(\log\pi_\theta(a_t) -
# \log\pi_{rollout}(a_t))$, and with the advantage $\hat A$ (reward minus the group mean, section 4.1):
#
# $$\mathcal{L} = -\frac{1}{\sum_t m_t}\sum_t m_t\, \mathrm{sg}[f(r_t)]\, \hat A_t \log\pi_\theta(a_t),\qquad
#   f(x) = \begin{cases} x & 1-\epsilon_l < x < 1+\epsilon_h \\ 0 & \text{otherwise,}\end{cases}$$
#
# where sg is stop-gradient (`.detach()`). The gradient is $-f(r)\hat A\,\nabla\log\pi = -\mathbb 1[r \in
# \text{band}]\,\hat A\,\nabla r$: importance sampling inside the band, **nothing** outside it. PPO's clip
# stops the gradient only when $\hat A$ pushes $r$ further out of the band, and leaves a full gradient when it
# pulls $r$ back in. The paper gives no $\epsilon$ values for agentic RL; `glm5_ref` reuses its reasoning-RL
# values $\epsilon_l = 0.2$, $\epsilon_h = 0.28$.
#
# All three losses, written out and compared with `glm5_ref.rl` (values and gradients) on a batch of 2 groups
# of 4 sequences with ragged loss masks, some tokens outside IcePop's window and some outside the band:

# %%
# derivation: group advantages, REINFORCE, GRPO + IcePop (eq. 1) and double-sided IS (eqs. 3-5) by hand
def grpo_advantages_by_hand(R, eps=1e-6):  # R: (groups, G)
    return (R - R.mean(-1, keepdim=True)) / (R.std(-1, unbiased=False, keepdim=True) + eps)


def reinforce_by_hand(lp, A, m):  # lp, m: (B, T); A: (B,)
    return -(A[:, None] * lp * m).sum() / m.sum()


def grpo_icepop_by_hand(lp, old_lp, infer_lp, A, m, eps_low=0.2, eps_high=0.28, beta=2.0):
    rho = torch.exp(old_lp - infer_lp)  # train/inference mismatch, independent of theta
    pop = torch.where((rho >= 1 / beta) & (rho <= beta), rho, torch.zeros_like(rho))
    r = torch.exp(lp - old_lp)  # PPO ratio, carries the gradient
    surrogate = torch.minimum(r * A[:, None], r.clamp(1 - eps_low, 1 + eps_high) * A[:, None])
    per_sequence = (pop * surrogate * m).sum(1) / m.sum(1)  # 1/|y_i| sum_t
    return -per_sequence.mean()  # 1/G sum_i (over all sequences of the batch)


def double_sided_by_hand(lp, rollout_lp, A, m, eps_l=0.2, eps_h=0.28):
    r = torch.exp(lp.detach() - rollout_lp)  # sg(r)
    f = torch.where((r > 1 - eps_l) & (r < 1 + eps_h), r, torch.zeros_like(r))  # open band: masked outside
    return -(f * A[:, None] * lp * m).sum() / m.sum()


gen = torch.Generator().manual_seed(0)
B, T = 8, 6
R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])  # 2 groups of G = 4 rewards
lengths = torch.tensor([6, 3, 5, 2, 6, 4, 1, 5])
m = (torch.arange(T)[None] < lengths[:, None]).float()  # ragged loss masks
old_lp = -torch.rand(B, T, generator=gen) * 3  # log pi_old (training engine)
infer_lp = old_lp + 0.6 * torch.randn(B, T, generator=gen)  # log pi_infer: some rho outside [0.5, 2]
lp0 = old_lp + 0.3 * torch.randn(B, T, generator=gen)  # log pi_theta after a few steps

A_hand = grpo_advantages_by_hand(R).reshape(-1)  # (B,)
by_hand = {
    "REINFORCE": lambda lp: reinforce_by_hand(lp, A_hand, m),
    "GRPO + IcePop (eq. 1)": lambda lp: grpo_icepop_by_hand(lp, old_lp, infer_lp, A_hand, m),
    "double-sided IS (eqs. 3-5)": lambda lp: double_sided_by_hand(lp, infer_lp, A_hand, m),
}
hand_results = {}  # name -> (loss, gradient with respect to log pi_theta)
for name, loss_fn in by_hand.items():
    lp = lp0.clone().requires_grad_(True)
    loss = loss_fn(lp)
    loss.backward()
    hand_results[name] = (loss.item(), lp.grad)
    print(f"{name:28s} loss by hand {loss.item():+.5f}")

# %%
# the package: glm5_ref.rl on the same batch
A_pkg = group_advantages(R, normalize_std=True).reshape(-1)
checks["GRPO advantages == rl.group_advantages(normalize_std=True)"] = ((A_hand - A_pkg).abs().max().item(), 1e-6)
package = {
    "REINFORCE": lambda lp: reinforce_loss(lp, A_pkg, m),
    "GRPO + IcePop (eq. 1)": lambda lp: grpo_icepop_loss(lp, old_lp, infer_lp, A_pkg, m)[0],
    "double-sided IS (eqs. 3-5)": lambda lp: double_sided_is_loss(lp, infer_lp, A_pkg, m)[0],
}
for name, loss_fn in package.items():
    lp = lp0.clone().requires_grad_(True)
    loss = loss_fn(lp)
    loss.backward()
    hand_loss, hand_grad = hand_results[name]
    grad_err = (lp.grad - hand_grad).abs().max().item()
    checks[f"{name} by hand == glm5_ref.rl (loss and gradient)"] = (max(abs(loss.item() - hand_loss), grad_err), 1e-6)
    print(f"{name:28s} package {loss.item():+.5f}; max gradient difference from the hand-written loss {grad_err:.1e}")
_, st_ice = grpo_icepop_loss(lp0, old_lp, infer_lp, A_pkg, m)
_, st_dis = double_sided_is_loss(lp0, infer_lp, A_pkg, m)
print(f"IcePop masks {st_ice['frac_popped']:.0%} of the loss tokens (rho outside [0.5, 2]); double-sided IS "
      f"masks {st_dis['frac_rejected']:.0%} (r outside (0.8, 1.28))")
assert 0 < st_ice["frac_popped"] < 1 and 0 < st_dis["frac_rejected"] < 1  # the test batch exercises both masks

# %% [markdown]
# The gradient per token of double-sided IS and of PPO's clip (eq. 1 with $\rho = 1$, i.e. no train/inference
# mismatch), for both signs of $\hat A$:

# %%
ratios = torch.tensor([0.5, 0.8, 0.9, 1.0, 1.2, 1.28, 1.6])
rows = []
for adv in (1.0, -1.0):
    lp = torch.log(ratios)[None].clone().requires_grad_(True)  # rollout log-prob 0, so r = exp(lp)
    double_sided_is_loss(lp, torch.zeros_like(lp), torch.tensor([adv]), torch.ones_like(lp))[0].backward()
    g_dis = (lp.grad[0] * len(ratios)).tolist()
    lp2 = torch.log(ratios)[None].clone().requires_grad_(True)
    z = torch.zeros_like(lp2)
    grpo_icepop_loss(lp2, z, z, torch.tensor([adv]), torch.ones_like(lp2))[0].backward()  # PPO clip, rho = 1
    g_ppo = (lp2.grad[0] * len(ratios)).tolist()
    rows.append((adv, g_dis, g_ppo))
print("r            " + " ".join(f"{r:7.2f}" for r in ratios.tolist()))
for adv, g_dis, g_ppo in rows:
    print(f"A={adv:+.0f} DIS    " + " ".join(f"{g:7.3f}" for g in g_dis))
    print(f"A={adv:+.0f} PPO    " + " ".join(f"{g:7.3f}" for g in g_ppo))

# %% [markdown]
# At $r = 0.8$ and $r = 1.28$, exactly on the band's edges, the double-sided loss gives zero: the band is
# open. PPO keeps the gradient at $r = 0.5$ for $\hat A > 0$ and at $r = 1.6$ for $\hat A < 0$. (The
# entries are the gradient of the loss with respect to $\log\pi$, times the number of tokens:
# $-f(r)\hat A$ for double-sided IS, $-r\hat A$ or 0 for PPO.)
#
# ## 3. Bias and variance on a bandit with a stale behaviour policy
#
# A 5-armed bandit: the policy is $\pi = \mathrm{softmax}(\theta)$, the rewards $R$ are fixed, and the
# behaviour policy that sampled the data is $\mu = \mathrm{softmax}(\theta_{old})$, several updates old. The
# on-policy gradient of $J = E_\pi[R]$ is $g^* = \sum_k \pi_k (R_k - \bar R_\pi)\nabla\log\pi_k$, with
# $\nabla_\theta \log\pi_k = e_k - \pi$. From one sample $a\sim\mu$ with $\hat A = R_a - \bar R_\mu$:
#
# | estimator | weight $w(a)$ | |
# |---|---|---|
# | no correction | 1 | what a pipeline that ignores staleness does |
# | full IS | $r = \pi_a/\mu_a$ | unbiased, variance grows with the mismatch |
# | truncated IS (TIS, $C=2$) | $\min(r, 2)$ | clips large ratios |
# | double-sided IS | $f(r)$, band $(0.8, 1.28)$ | GLM-5: masks tokens outside the band |
#
# and $g(a) = w(a)\,\hat A\,(e_a - \pi)$. Everything is exact: we enumerate the arms, so
# $E[g] = \sum_a \mu_a g(a)$ and $\mathrm{Var} = \sum_a \mu_a \lVert g(a) - E[g]\rVert^2$.

# %%
# derivation: exact bias and variance of the four estimators, for growing staleness
K = 5
R = torch.tensor([1.0, 0.6, 0.3, 0.0, 0.0], dtype=torch.float64)
theta = torch.tensor([0.2, 0.5, 0.0, -0.3, 0.1], dtype=torch.float64)
drift = torch.tensor([0.6, -0.2, -0.3, 0.2, -0.3], dtype=torch.float64)  # one update's change of the logits


def estimators(pi, mu, eps_low=0.2, eps_high=0.28, C=2.0):
    r = pi / mu  # (K,)
    band = (r > 1 - eps_low) & (r < 1 + eps_high)
    return {"no correction": torch.ones_like(r), "full IS": r, "truncated IS (C=2)": r.clamp(max=C),
            "double-sided IS": torch.where(band, r, torch.zeros_like(r))}


def exact_stats(lag):
    pi = torch.softmax(theta, 0)
    mu = torch.softmax(theta - lag * drift, 0)  # the behaviour policy: `lag` updates old
    grad_logpi = torch.eye(K, dtype=torch.float64) - pi  # (K arms, K logits): row a = e_a - pi
    g_star = (pi * (R - (pi * R).sum()))[:, None].mul(grad_logpi).sum(0)
    A = R - (mu * R).sum()  # advantage from the behaviour samples' mean
    out = {}
    for name, w in estimators(pi, mu).items():
        g = (w * A)[:, None] * grad_logpi  # (K, K): the estimate from each arm
        mean = (mu[:, None] * g).sum(0)
        var = (mu * ((g - mean) ** 2).sum(1)).sum()
        out[name] = ((mean - g_star).norm() / g_star.norm()).item(), (var.sqrt() / g_star.norm()).item()
    return out, pi, mu


lags = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
table = {lag: exact_stats(lag)[0] for lag in lags}
_, pi, mu = exact_stats(1.0)
print("at lag 1: pi =", [round(x, 3) for x in pi.tolist()], " mu =", [round(x, 3) for x in mu.tolist()],
      " r =", [round(x, 2) for x in (pi / mu).tolist()])
print(f"{'lag':>5} " + " ".join(f"{n:>28}" for n in table[0.0]))
for lag, row in table.items():
    print(f"{lag:5.2f} " + " ".join(f"   bias {b:5.3f}  std {s:6.3f}   " for b, s in row.values()))
assert table[0.0]["no correction"][0] < 1e-12 and all(row["full IS"][0] < 1e-12 for row in table.values())

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for name in table[0.0]:
    axes[0].plot(lags, [table[l][name][0] for l in lags], marker="o", label=name)
    axes[1].plot(lags, [table[l][name][1] for l in lags], marker="o", label=name)
axes[0].set(title="relative bias  ||E[g] - g*|| / ||g*||", xlabel="staleness (updates)",
            ylabel="relative bias")
axes[1].set(title="relative std  sqrt(Var g) / ||g*||", xlabel="staleness (updates)", ylabel="relative std")
axes[0].legend(fontsize=8)
fig.suptitle("5-armed bandit, behaviour policy `lag` updates old (exact enumeration)")
fig.tight_layout()
show_figure(fig, "08_bandit_bias_variance.png")

# %% [markdown]
# Full IS is unbiased at every lag, and its spread grows with the mismatch. No correction is biased as soon
# as $\mu \ne \pi$. Truncation and masking sit in between. Masking zeroes the arms whose ratio left the band,
# so its bias jumps whenever an arm leaves the band, and its spread stays small. That is the trade GLM-5
# makes: a bounded, low-variance update from stale data, and no update at all from tokens the current
# policy has moved far from. The staleness limit $\tau$ keeps most tokens inside the band. This bandit
# drifts fast on purpose (one update moves a ratio to about 2), so past a lag of 1 nearly every arm is
# masked and double-sided IS is more biased than no correction at all. How many tokens leave the band in a
# real run is measured in this notebook's section 5.
#
# The package computes the same expectation: weight each arm's "sequence" by $K\mu_a$ so that the token mean
# becomes $\sum_a \mu_a(\cdot)$, and differentiate with respect to $\theta$.

# %%
lag = 0.5
pi_t = theta.clone().requires_grad_(True)
logpi = torch.log_softmax(pi_t, 0)
mu = torch.softmax(theta - lag * drift, 0)
A = R - (mu * R).sum()
loss, stats = double_sided_is_loss(logpi[:, None], torch.log(mu)[:, None], K * mu * A, torch.ones(K, 1))
(g_pkg,) = torch.autograd.grad(-loss, pi_t)
pi = torch.softmax(theta, 0)
w = estimators(pi, mu)["double-sided IS"]
g_hand = ((mu * w * A)[:, None] * (torch.eye(K, dtype=torch.float64) - pi)).sum(0)
print(f"rejected arms at lag {lag}: {stats['frac_rejected']:.0%}; E[g] by hand {g_hand.numpy().round(4)}, "
      f"package {g_pkg.numpy().round(4)}")
checks["bandit: expected double-sided IS gradient == rl.double_sided_is_loss"] = ((g_pkg - g_hand).abs().max().item(),
                                                                                   1e-12)

# %% [markdown]
# ## 4. The asynchronous loop on the toy tool-use task
#
# The task (`tool_env.ToolUseEnv`): the user asks `a+b` ($10 \le a, b \le 29$). The model must call the
# calculator, `<|tool_call|> a + b <|observation|>`. The environment answers
# `<|tool_result|> s <|assistant|>`, and the model must reply `s <|endoftext|>`. The reward is 1 for the
# right call *and* the right answer. Only the model's two turns have loss mask 1.
#
# Why asynchronous: in a synchronous loop the trainer waits until the slowest rollout of the batch is done,
# and the rollout engines wait while the trainer trains. Agent rollouts have a long tail (one slow tool call
# or one long episode), so both sides sit idle much of the time ("severe GPU idle time", paper section 3.3).
# GLM-5 decouples them (section 4.1.1): the inference engines keep generating, the trainer trains on whatever
# groups are complete and pushes its weights to the engines every $K$ updates, and it resets its optimizer
# after each push. The price is that samples are generated by older weights, which section 2's loss and
# the staleness limit $\tau$ deal with. The diagram is schematic; the project's loop is
# `glm5_ref.apps.agentic.AsyncRLLoop`.

# %%
show_figure(sync_async_timeline(), "08_sync_async_timeline.png")

# %% [markdown]
# `AsyncRLLoop` runs rollout workers in threads. Each holds a copy of the policy and its version, and loads
# the newest weights before every turn. The trainer:
#
# - groups the results by prompt, $G$ rollouts each;
# - drops a sample whose lag $w' - w_0$ exceeds $\tau$, and samples failed by an environment crash or lost
#   with a dead worker;
# - pads a group with more than $G/2$ valid samples by repeating them, and drops the others;
# - trains with the double-sided IS loss, pushes weights every $K$ updates, and resets AdamW after each push;
# - replaces a worker whose heartbeat stopped. The worker's in-flight rollout is written off, and a late
#   report from it is refused.
#
# A short warm start on correct episodes teaches the format. Then come 12 asynchronous updates, during
# which worker 0 hangs in the middle of its second rollout and never comes back.

# %%
torch.manual_seed(0)
model = GLM5ForCausalLM(toy_config())
t0 = time.perf_counter()
losses = warm_start(model, env, 200, lr=1e-2, seed=0)
before = success_rate(model, env, 40, seed=777)
print(f"warm start: 200 steps in {time.perf_counter() - t0:.0f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}, "
      f"success {before:.2f}")
cfg = LoopConfig(mode="async", num_workers=2, group_size=4, groups_per_update=2, num_updates=12, max_staleness=2,
                 max_inflight_groups=4, lr=3e-4, heartbeat_timeout=1.0, seed=0)
loop = AsyncRLLoop(model, ToolUseEnv(10, 29, crash_prob=0.05), cfg,
                   faults=lambda wid, done: math.inf if (wid, done) == (0, 1) else None)
out = loop.run()
print(f"12 async updates in {out['wall_s']:.1f} s; final weight version {out['final_version']}")
print("counts:", out["counts"])
print("lost in-flight rollouts:", loop.lost_ids)
for r in out["history"][::3]:
    print(f"  update {r['update']:2d}: reward {r['reward']:.2f}, rejected {r['frac_rejected']:.3f}, "
          f"lag mean {r['mean_staleness']:.2f} max {r['max_staleness']}")
trained = [rid for u in loop.trained_ids for rid in dict.fromkeys(u)]
assert len(trained) == len(set(trained)) and not set(trained) & set(loop.lost_ids)
assert out["counts"]["workers_replaced"] >= 1 and len(out["history"]) == 12

# %% [markdown]
# The hung worker's rollout appears under `lost`, and a replacement worker took its place. No rollout id
# appears in two updates. Every finished rollout has exactly one fate: trained, stale, failed, dropped with
# its group, or still unconsumed at the end (`loop.fates`).
#
# ### Does asynchrony save time here? (measured on the machine that built this notebook)
#
# `python -m glm5_ref bench rl-async` times the same number of RL updates (8 rollouts each) with the
# synchronous and the asynchronous loop, from the same random weights and the same tasks, with the rollout
# workers in **separate processes** (`glm5_ref/apps/rollout_processes.py`: each keeps its own copy of the
# policy, the trainer pushes its weights into shared memory after every update). The tool latency is set
# relative to what one rollout's compute costs on this machine ($c$, measured first): every tool call sleeps
# about $r \cdot c$ on average, half of it fixed and half a Pareto(1.5) tail, so $r = 1$ means a tool call is
# as slow as the model's own work on the rollout, whatever the machine. The cell below runs the quick form
# (3 updates, 4 workers, $r = 1$ and $r = 10$) and prints the trainer's idle fraction in each mode.

# %%
bench = rl_async.run(quick=True)
measured = [r for r in bench if not r["simulated"]]
print(f"one rollout's compute: {measured[0]['rollout_compute_s'] * 1e3:.0f} ms; {measured[0]['updates']} updates, "
      f"{measured[0]['workers']} worker processes")
for row in measured:
    print(f"tool latency {row['latency_ratio']:>4} x compute ({row['tool_latency_s'] * 1e3:.0f} ms per call): "
          f"sync {row['sync_s']:.2f} s (trainer idle {row['sync_idle']:.0%}), async {row['async_s']:.2f} s "
          f"(idle {row['async_idle']:.0%}, samples {row['async_staleness']:.2f} versions old): {row['ratio']:.2f}x")
print("simulated at cluster scale (256 rollouts per update, 512 running at once, 120 s updates, 60 s median rollout):")
for row in bench:
    if row["simulated"]:
        print(f"  tail sigma {row['tail_sigma']}: sync {row['sync_s']} s, async {row['async_s']} s, {row['ratio']}x; "
              f"trainer idle {row['sync_idle']:.0%} vs {row['async_idle']:.0%}; async samples {row['async_staleness']} "
              f"versions old on average, at most {row['async_staleness_max']}")
assert all(r["sync_s"] > 0 and r["async_s"] > 0 and 0 <= r["async_idle"] <= 1 for r in bench)

# %% [markdown]
# Read the printed ratios as one measurement on one machine. The asynchronous loop can only win the time the
# synchronous one spends *waiting*: for the slowest tool call of each batch while the trainer idles, and for the
# trainer while the workers idle. When tool calls are fast next to the model's compute ($r \ll 1$) the cores are
# busy either way, and overlap saves at most the trainer's share. When they are slow ($r \geq 1$) a synchronous
# update waits for the slowest of its 8 calls, and the tail decides; the asynchronous loop trains on whichever
# groups finish first. The README's table has the full sweep ($r$ = 0.1, 1, 10, 20 updates, 8 workers).
# GLM-5 puts the inference and training engines on *different* GPUs (section 4.1.1); separate processes on a
# shared CPU come closer to that than threads, but they still share the cores. The simulated rows
# (`glm5_ref/apps/rl_simulation.py`, a discrete-event simulation: no model, only when rollouts and updates start
# and end) show that case: the longer the tail of rollout durations, the longer every synchronous update waits
# for its slowest rollout, while the asynchronous loop stays bound by the trainer; the price is staleness, whose
# maximum grows with the tail. That is what the staleness limit $\tau$ and double-sided IS are for.
#
# ## 5. The full experiment
#
# `python -m glm5_ref experiment rl-toy` runs the same loop for 300 updates from a 200-step warm start,
# three ways from the same weights, with tool calls whose latency has a long tail (0.05 + 0.05 Pareto(1.5)
# seconds): **sync** (generate, then train; no staleness), **async** (12 workers, up to 16 groups in flight,
# $\tau = 4$; a group waits for its slowest member, so its other samples age; double-sided IS), and
# **async-no-correction** (the same asynchronous loop with plain REINFORCE on the stale samples). It writes
# `figures/rl_toy.json` and `figures/rl_toy.png`. Loaded here:

# %%
with open("../figures/rl_toy.json") as f:
    full_run = json.load(f)
print(f"machine: {full_run['machine']}, {full_run['date']}, {full_run['wall_s']:.0f} s in all")
fc = full_run["config"]
print(f"{fc['updates']} updates from a {fc['warm_steps']}-step warm start; {fc['workers']} workers, up to "
      f"{fc['max_inflight_groups']} groups in flight, tau = {fc['max_staleness']}, G = {fc['group_size']}; tool latency "
      f"{fc['tool_latency']['base']} + {fc['tool_latency']['scale']} Pareto({fc['tool_latency']['alpha']}) s")
n_eval = full_run["config"]["eval_n"]
se = math.sqrt(0.5 * 0.5 / n_eval)  # the largest standard error of a success rate over n_eval tasks
print(f"success before RL: {full_run['success_before']:.3f} sampled at T = 1, {full_run['success_before_greedy']:.3f} "
      f"greedy ({n_eval} fresh tasks; standard error at most {se:.3f})")
summary = {}
for run in full_run["runs"]:
    h = run["history"]
    summary[run["name"]] = {
        "after": run["success_after"], "after_greedy": run["success_after_greedy"],
        "lag": sum(r["mean_staleness"] for r in h) / len(h), "max_lag": max(r["max_staleness"] for r in h),
        "rejected": sum(r["frac_rejected"] for r in h) / len(h), "max_rejected": max(r["frac_rejected"] for r in h),
        "stale": run["counts"]["stale"], "wall_s": run["wall_s"]}
    s = summary[run["name"]]
    print(f"{run['name']:>20}: after RL {s['after']:.3f} (greedy {s['after_greedy']:.3f}); over all updates: "
          f"lag {s['lag']:.2f} (max {s['max_lag']}), rejected {s['rejected']:.4f} (max {s['max_rejected']:.3f}), "
          f"{s['stale']} samples dropped as stale; {s['wall_s']:.0f} s")
print(f"wall time sync / async in that run: {summary['sync']['wall_s'] / summary['async']['wall_s']:.2f}")
show_saved("rl_toy.png")

# %% [markdown]
# What the full run measured (shared 2-core CPU, 2026-11-29, one seed, 200 fresh tasks per success rate, so
# each rate has a standard error of at most 0.035; all numbers printed above):
#
# - RL lifts the sampled success rate from 0.535 to 0.745 (sync), 0.765 (async) and 0.740 (async without
#   correction); greedy success goes from 0.785 to 0.840, 0.855 and 0.820.
# - The asynchronous runs train on samples that lag 1.4-1.5 versions on average (at most 4, the $\tau$
#   limit; 169 and 220 samples were dropped as too stale). About 1.2% of the double-sided run's loss tokens
#   fall outside the band (up to 12.6% in one update). At this size and learning rate, that much staleness
#   costs nothing measurable, with or without the correction: the three runs end within about one standard
#   error of each other.
# - That run's wall times were 269 s (sync) and 136 s (async) for the same 300 updates. It is one run on a
#   shared machine with a different worker count and latency than the benchmark above, and it does not
#   show that asynchrony is faster in general: the benchmark's own ratio on this machine is the one printed
#   in section 4 above.
#
# The three runs see the same tasks and sampling seeds in the same order (common random numbers), which is
# why their reward curves share their ups and downs.
#
# ## Summary
#
# - **TITO**: train on the ids the sampler emitted and the log-probs it reported, recorded per rollout id
#   with the policy version. A decode/encode round trip can change ids (`[" ", "return"]` becomes
#   `[" return"]`) and leaves log-probs on tokens that were never sampled.
# - **The losses**: REINFORCE $-\hat A\log\pi$ is right only on-policy. GRPO normalizes rewards within a group
#   and clips the PPO ratio; IcePop's $\mathrm{pop}(\rho, 1/\beta, \beta)$ masks tokens whose
#   train/inference mismatch leaves $[0.5, 2]$ (GLM-5's reasoning RL, eq. 1). Double-sided IS
#   $-\mathrm{sg}[f(r)]\hat A\log\pi$ uses the rollout log-probs as the behaviour policy and masks tokens whose
#   ratio leaves the open band $(0.8, 1.28)$, for either sign of $\hat A$ (GLM-5's agentic RL, eqs. 3-5). It
#   trades a little bias for a bounded variance, and the staleness limit $\tau$ keeps the bias small.
# - **Asynchronous loop**: versions on every generated segment, staleness and crash filters, group padding,
#   weight pushes with an optimizer reset, and heartbeats. A killed worker costs one sample and nothing is
#   trained twice. Whether it saves wall-clock time depends on how much of the synchronous loop's time is
#   waiting; measure it (`python -m glm5_ref bench rl-async`) rather than assume it.
#
# The check: the derivations equal the package, and the full run's numbers are those stated above.

# %%
# check: derivation == glm5_ref, and the committed rl-toy results as the prose states them
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
sync, asy, noc = summary["sync"], summary["async"], summary["async-no-correction"]
stated = [  # (measured, stated, tolerance)
    (full_run["success_before"], 0.535, 1e-9), (full_run["success_before_greedy"], 0.785, 1e-9),
    (sync["after"], 0.745, 1e-9), (asy["after"], 0.765, 1e-9), (noc["after"], 0.740, 1e-9),
    (sync["after_greedy"], 0.840, 1e-9), (asy["after_greedy"], 0.855, 1e-9), (noc["after_greedy"], 0.820, 1e-9),
    (se, 0.035, 5e-4), (asy["stale"], 169, 0), (noc["stale"], 220, 0), (asy["max_lag"], 4, 0),
    (noc["max_lag"], 4, 0), (asy["rejected"], 0.012, 5e-4), (asy["max_rejected"], 0.126, 5e-4),
    (sync["wall_s"], 269, 0.5), (asy["wall_s"], 136, 0.5),
]
for measured_value, stated_value, tol in stated:
    assert abs(measured_value - stated_value) <= tol, (measured_value, stated_value)
assert 1.35 <= min(asy["lag"], noc["lag"]) and max(asy["lag"], noc["lag"]) < 1.55 and sync["lag"] == 0
assert max(sync["after"], asy["after"], noc["after"]) - min(sync["after"], asy["after"], noc["after"]) <= se
print(f"derivation == glm5_ref ({len(checks)} checks), {len(stated) + 2} stated results match the JSON; "
      f"notebook ran in {time.perf_counter() - t_notebook:.0f} s")

# %% [markdown]
# ## Exercises
#
# 1. **GRPO advantages.** A group of $G = 4$ samples gets rewards $(1, 0, 0, 0)$. Predict the four advantages
#    $(R_i - \mathrm{mean})/\mathrm{std}$ (population std), and what happens to a group whose rewards are all
#    equal. Check with `rl.group_advantages`.
# 2. **IcePop's mask does not move.** Five tokens have train/inference mismatch
#    $\rho = 0.4, 0.5, 1, 2, 2.5$ and $\beta = 2$. Predict which tokens get zero gradient, and whether
#    moving $\theta$ (so that $r \neq 1$) changes that set. Check with `rl.grpo_icepop_loss`.
# 3. **Staleness and group padding.** With $\tau = 2$, a trajectory whose model turns were sampled at
#    versions 3, 4 and 5 is judged when the trainer is at version $w' = 6$. Is it kept? At $w' = 5$? Then: a
#    group of $G = 8$ has 2 stale samples and 1 crashed sample. Is it padded or dropped, and with 2 more
#    crashes? Check with `Trajectory.staleness` and the rule of this notebook's section 4.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
predicted = torch.tensor([0.75, -0.25, -0.25, -0.25]) / math.sqrt(0.25 * 0.75)  # std of (1, 0, 0, 0) = sqrt(3)/4
adv = group_advantages(rewards, normalize_std=True)
print(f"advantages {adv.numpy().round(4)} (predicted {predicted.numpy().round(4)}); "
      f"all-equal group: {group_advantages(torch.ones(4), normalize_std=True).tolist()}")
assert torch.allclose(adv, predicted, atol=1e-5) and torch.equal(group_advantages(torch.ones(4), normalize_std=True),
                                                                 torch.zeros(4))

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
rho = torch.tensor([[0.4, 0.5, 1.0, 2.0, 2.5]])
old = torch.full((1, 5), -1.0)
infer = old - torch.log(rho)  # rho = pi_old / pi_infer
popped = []
for shift in (0.0, 0.1):  # theta at pi_old, then moved so that r = exp(0.1) on every token
    lp = (old + shift).clone().requires_grad_(True)
    loss, st = grpo_icepop_loss(lp, old, infer, torch.tensor([1.0]), torch.ones(1, 5))
    loss.backward()
    popped.append((lp.grad[0] == 0).tolist())
    print(f"shift {shift}: zero-gradient tokens {popped[-1]}, frac_popped {st['frac_popped']:.1f}")
assert popped[0][0] and popped[0][4] and not any(popped[0][1:4])  # 0.4 and 2.5 are popped; the window is closed
assert popped[1] == popped[0]

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
traj3 = Trajectory("ex3", [Segment("prompt", [1]), Segment(MODEL, [2], [-0.1], 3), Segment("env", [3]),
                           Segment(MODEL, [4], [-0.2], 4), Segment(MODEL, [5], [-0.3], 5)])
tau = 2
kept = {w: traj3.staleness(w) <= tau for w in (6, 5)}
print(f"w' - w_0 at w' = 6: {traj3.staleness(6)} -> kept {kept[6]}; at w' = 5: {traj3.staleness(5)} -> kept {kept[5]}")
G8 = 8
for invalid in (3, 5):
    valid = G8 - invalid
    print(f"G = {G8}, {valid} valid: {'padded with ' + str(G8 - valid) + ' repeats' if 2 * valid > G8 else 'dropped'}")
assert kept == {6: False, 5: True}
assert 2 * (G8 - 3) > G8 and not 2 * (G8 - 5) > G8  # 5 valid of 8: padded with 3; 3 valid: dropped
