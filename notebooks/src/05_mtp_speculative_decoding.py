# %% [markdown]
# # 05 · Multi-token prediction and speculative decoding
#
# **Prerequisites:** notebook 00a (foundations: the BPE tokenizer, RMSNorm), notebook 01 (MLA: the latent cache), notebook 02 (DSA: the lightning indexer and top-k attention), notebook 03 (MoE router: routed and shared experts, top-k routing), notebook 04 (assembling GLM-5: the decoder layer, the LM head, the KV cache and `generate`). **Reading time:** about 30 minutes (it runs in about 60 s under make test, 2 cores).
#
# Notebook 04 assembled GLM-5 and generated text one token per forward pass. GLM-5 carries one extra
# decoder layer, the **MTP layer** (multi-token prediction). In training it adds a loss that predicts tokens
# further ahead. At inference it **drafts** a few tokens cheaply, and the main model **verifies** all of them
# in one forward pass. The output is exactly what the main model alone would produce, in fewer main-model
# passes. This notebook:
#
# 1. derives MTP from next-token prediction (DeepSeek-V3's equations), computes the depth-1 and depth-2
#    losses by hand and checks them against `glm5_ref`;
# 2. explains why GLM-5 shares **one** MTP module across its three training depths, with a diagram of the
#    unrolled layer and of the verifying forward;
# 3. derives the expected accept length $E[\tau] = (1 - a^{N+1}) / (1 - a)$ and checks it by Monte Carlo;
# 4. derives the rejection-sampling rule and proves it lossless by exact enumeration;
# 5. loads the shipped classroom GLM-5 (trained by the project's recipe) and measures acceptance per depth,
#    accept length and speed-up for 1 to 4 draft steps. Greedy output is asserted equal to plain greedy decoding;
# 6. builds a cost model of a speculative round for GLM-5 at batch 1, where the MoE makes verification far
#    from free, and compares it with what the classroom model measures on this CPU.
#
# Cells that start with `# derivation` use only `torch`; every other cell imports from `glm5_ref`.

# %%
import dataclasses
import math
import os
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM

t_notebook = time.perf_counter()
torch.manual_seed(0)
torch.set_num_threads(1)  # batch-1 decoding of a small model: one thread is fastest, and the same everywhere
checks = {}  # name -> (error, tolerance): derivation vs package, asserted at the end

# %% [markdown]
# ## 1. From next-token prediction to multi-token prediction
#
# The main model reads tokens $t_1 \dots t_i$ and ends in a hidden state $h^0_i$ (after the final norm). The
# LM head turns it into $P(t_{i+1})$, the next token. That is all a plain language model predicts.
#
# DeepSeek-V3 (section 2.2, eqs. 21-25) adds **depths** $k = 1 \dots D$. Depth $k$ predicts $t_{i+k+1}$.
# It combines the previous depth's state at the same position with the embedding of the token $k$ steps
# ahead. The hidden state summarises $t_{\le i+k-1}$, so with that token the depth has seen everything
# before the token it predicts:
#
# $$h'^k_i = M \begin{bmatrix} \mathrm{RMSNorm}(\mathrm{Emb}(t_{i+k})) \\ \mathrm{RMSNorm}(h^{k-1}_i)
#   \end{bmatrix}, \qquad h^k_{1:T-k} = \mathrm{Block}(h'^k_{1:T-k}), \qquad
#   P^k_{i+k+1} = \mathrm{softmax}(\mathrm{Head}(\mathrm{RMSNorm}(h^k_i)))$$
#
# $$\mathcal{L}^k = \mathrm{CE}(P^k, t), \qquad \mathcal{L} = \mathcal{L}_{\text{LM}} +
#   \frac{\lambda}{D}\sum_{k=1}^{D} \mathcal{L}^k .$$
#
# $M$ is a $d \times 2d$ matrix (`eh_proj`), Block is one full decoder layer (MLA with DSA, then MoE), and
# Emb and Head are the main model's own, shared rather than copied. GLM-5 uses $D = 3$. The paper does not
# give $\lambda$; `glm5_ref` uses GLM-4.5's 0.3. With $T$ tokens, depth $k$ can read positions
# $1 \dots T-k$ and has targets for $T-k-1$ of them:
#
# | position $i$ reads | main model | depth 1 | depth 2 | depth 3 |
# |---|---|---|---|---|
# | tokens seen | $t_{\le i}$ | $t_{\le i+1}$ | $t_{\le i+2}$ | $t_{\le i+3}$ |
# | predicts | $t_{i+1}$ | $t_{i+2}$ | $t_{i+3}$ | $t_{i+4}$ |
#
# In training every depth reads the *true* tokens (teacher forcing). Each depth is a shallow path to the next
# token, so its loss is close to the main model's. At inference the embedded tokens are the MTP layer's own
# guesses. That is where acceptance gets lost.

# %% [markdown]
# ### The depth-1 and depth-2 losses by hand (derivation)
#
# A tiny GLM-5 in float64. We unroll the equations ourselves and compare with the package's
# `out.mtp_losses`.

# %%
config = dataclasses.replace(GLM5Config.tiny(), vocab_size=23, index_topk=6)
tiny = GLM5ForCausalLM(config).double()
ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
out = tiny(ids, labels=ids, mtp_depths=2)

# derivation: eqs. 21-24 unrolled over two depths with ONE set of MTP weights
mtp, T, V = tiny.mtp, ids.shape[1], config.vocab_size
with torch.no_grad():
    h = tiny.model.norm(out.hidden_states)  # h^0 (B, T, D): the main model's output after its final norm
    by_hand = []
    for k in (1, 2):
        emb = tiny.model.embed_tokens(ids[:, k:])  # Emb(t_{i+k}) for i = 0 .. T-k-1: (B, T-k, D)
        x = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h[:, :T - k])], dim=-1))  # h'^k: (B, T-k, D)
        h = mtp.block(x)[0]  # h^k = Block(h'^k), causal over its T-k positions
        logits = tiny.lm_head(mtp.shared_head.norm(h))  # (B, T-k, V); the last position has no target
        by_hand.append(F.cross_entropy(logits[:, :T - k - 1].reshape(-1, V), ids[:, k + 1:].reshape(-1)))

for k, (mine, theirs) in enumerate(zip(by_hand, out.mtp_losses), start=1):
    err = abs(mine.item() - theirs.item()) / theirs.item()
    print(f"depth {k}: by hand {mine.item():.10f}   model(...).mtp_losses[{k - 1}] {theirs.item():.10f}   rel. err {err:.1e}")
    checks[f"MTP loss, depth {k}"] = (err, 1e-6)  # the package casts logits to fp32, as for the main head
total = config.mtp_loss_weight / 2 * (by_hand[0] + by_hand[1])
checks["MTP loss, lambda/D sum"] = (abs(total.item() - out.mtp_loss.item()) / out.mtp_loss.item(), 1e-6)
print(f"lambda/D * (L1 + L2) = {total.item():.10f}   out.mtp_loss = {out.mtp_loss.item():.10f}")

# %% [markdown]
# ## 2. One module, three depths: trained the way it is used
#
# DeepSeek-V3's design gives each depth a *separate* module, and DeepSeek-V3 itself trained with depth
# $D = 1$: one module (its section 4.2). At inference it uses that module for speculative decoding with
# **one** draft token: it "predicts the next 2 tokens", the main model's next token and the draft, and reports an
# acceptance rate of 85-90% for that second token (DeepSeek-V3 section 5.4.3). To draft further ahead with
# separate modules, the draft model would need $n$ MTP layers, with memory for their parameters and caches growing
# with the number of speculative steps; to draft further with its single module, that module would have to run
# on its own output, a use it was never trained for. GLM-5 (section 2.1, "Multi-token Prediction with Parameter
# Sharing") keeps **one** MTP module and shares its parameters across **3** depths in training: the same weights
# at every depth (the loop above). The draft model costs the memory of one layer, as DeepSeek-V3's does, and can
# draft 3 tokens the way it was trained. Inference drafts like this:
#
# ```
# h <- h^0 at the last position; x <- the newest token
# for j in 1..N:  h = MTP(h, Emb(x));  x = argmax Head(norm(h))     # draft d_j
# ```
#
# Draft step $j$ computes exactly depth $j$ of training, $h^j = \mathrm{Block}(M[\mathrm{Emb}(x);\ h^{j-1}])$,
# with the same weights. The MTP layer's attention context is the one approximation: at inference the
# earlier positions hold depth-1 states. The checkpoint stores a single layer, so drafting costs the memory
# of one decoder layer. The diagram shows the unrolled layer for GLM-5's sizes and, below it, the one
# verifying forward that section 3 explains (`glm5_ref/mtp.py`, `glm5_ref/speculative.py`):

# %%
n_mtp = sum(p.numel() for p in tiny.mtp.parameters())
n_layer = sum(p.numel() for p in tiny.model.layers[1].parameters())
print(f"MTP module: {n_mtp:,} parameters = one decoder layer ({n_layer:,}) + enorm, hnorm, eh_proj, head norm "
      f"({n_mtp - n_layer:,}); used at every depth")
glm5 = GLM5Config.glm5()
extra = glm5.num_params(include_mtp=True) - glm5.num_params()
print(f"GLM-5: the MTP layer adds {extra / 1e9:.1f}B parameters to the {glm5.num_params() / 1e9:.0f}B of the main "
      f"model ({glm5.num_hidden_layers} main layers + 1; the embedding and the LM head are shared, counted once)")

# %%
from glm5_ref.apps.diagrams.mtp import mtp_unrolled

show_figure(mtp_unrolled(glm5), "05_mtp_unrolled.png")

# %% [markdown]
# ## 3. Speculative decoding and the accept length
#
# A round of speculative decoding with $N$ draft steps:
#
# 1. **draft**: the MTP layer proposes $d_1 \dots d_N$ (N small steps);
# 2. **verify**: ONE main-model forward over $[c, d_1, \dots, d_N]$ ($c$ is the newest token) gives the main
#    model's prediction after each prefix, $p_1 \dots p_{N+1}$;
# 3. **accept**: greedy keeps $d_j$ while $d_j = \arg\max p_j$, then emits $\arg\max p_{a+1}$ itself. The
#    main model would have emitted exactly these tokens, so the output is identical.
#
# A round emits $\tau$ = (accepted drafts) + 1 tokens, the **accept length**. Draft $j$ counts only if drafts
# $1 \dots j-1$ were accepted. If each is accepted with probability $a$, independently, then
# $P(\tau > j) = a^j$ for $j = 0 \dots N$, and
#
# $$E[\tau] = \sum_{j=0}^{N} P(\tau > j) = \sum_{j=0}^{N} a^j = \frac{1 - a^{N+1}}{1 - a}.$$
#
# Real acceptance depends on the depth. With $a_j$ = P(draft $j$ accepted | drafts before it accepted),
# $E[\tau] = 1 + a_1 + a_1 a_2 + \dots + a_1 \cdots a_N$. The GLM-5 paper reports an accept length of **2.76** for
# GLM-5 against **2.55** for DeepSeek-V3.2, both with 4 speculative steps on the authors' private prompt set
# (section 2.1, Table 2). First a Monte Carlo check of the formula:

# %%
# derivation: simulate rounds, count emitted tokens
g = torch.Generator().manual_seed(0)
for a in (0.5, 0.8):
    for N in (1, 3, 4):
        accepted = (torch.rand(200_000, N, generator=g) < a).int().cumprod(dim=1).sum(dim=1)  # prefix accepted
        mc, formula = (accepted + 1).double().mean().item(), (1 - a ** (N + 1)) / (1 - a)
        print(f"a = {a}, N = {N}: Monte Carlo E[tau] = {mc:.4f}, formula {formula:.4f}")
        checks[f"E[tau] Monte Carlo a={a} N={N}"] = (abs(mc - formula) / formula, 0.01)
# what per-draft acceptance does the paper's 2.76 (with 4 steps) mean, if it were the same at every depth?
lo, hi = 0.0, 0.999
for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if (1 - mid ** 5) / (1 - mid) < 2.76 else (lo, mid)
a_glm5 = lo
print(f"GLM-5's accept length 2.76 with 4 draft steps <=> a = {a_glm5:.3f} per draft (i.i.d.)")

# %% [markdown]
# ## 4. Sampling without changing the distribution: the rejection rule
#
# With temperature above zero, "accept if it equals the argmax" makes no sense. Leviathan et al. (2023)
# accept draft $x \sim q$ (the MTP distribution) with probability $\min(1, p(x)/q(x))$, where $p$ is the
# main model's distribution. At the first rejection they emit a token from the residual
# $r = \max(0, p - q) / Z$ and end the round. The emitted token is then distributed exactly as $p$:
#
# $$P(\text{emit } y) = \underbrace{q(y)\min\!\Big(1, \tfrac{p(y)}{q(y)}\Big)}_{\text{draft } y \text{ accepted}}
#   + \underbrace{\Big(1 - \sum_x \min(p(x), q(x))\Big)}_{P(\text{reject}) \,=\, Z} \frac{\max(0, p(y) - q(y))}{Z}
#   = \min(p, q)(y) + \max(0, p - q)(y) = p(y).$$
#
# The acceptance probability is $\sum_x \min(p(x), q(x)) = 1 - \mathrm{TV}(p, q)$: the closer the drafter is
# to the main model, the more drafts pass. The output distribution never depends on $q$. Applied at each
# position in turn, the whole emitted sequence follows the main model. Below, exact enumeration over a
# vocabulary of 6. Token 4 is never drafted ($q = 0$), and token 5 is impossible under $p$.

# %%
# derivation: enumerate every draft x and both outcomes; exact arithmetic in float64
p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10, 0.00], dtype=torch.float64)
q = torch.tensor([0.10, 0.40, 0.20, 0.05, 0.00, 0.25], dtype=torch.float64)
residual = torch.clamp(p - q, min=0)
residual = residual / residual.sum()
emitted = torch.zeros_like(p)
for x in range(len(p)):
    if q[x] == 0:
        continue  # never drafted
    accept = min(1.0, (p[x] / q[x]).item())
    emitted[x] += q[x] * accept  # drafted x and kept it
    emitted += q[x] * (1 - accept) * residual  # drafted x, rejected, resampled from the residual
print("p          ", [f"{v:.3f}" for v in p.tolist()])
print("emitted    ", [f"{v:.3f}" for v in emitted.tolist()])
print(f"P(accept) = {torch.minimum(p, q).sum().item():.3f} = 1 - TV(p, q) = {1 - 0.5 * (p - q).abs().sum().item():.3f}")
checks["rejection rule, exact enumeration"] = ((emitted - p).abs().max().item(), 1e-12)

# %% [markdown]
# The package's `accept_or_resample` implements the rule. A seeded Monte Carlo of it should land on $p$.
# Keeping every draft would land on $q$ instead:

# %%
from glm5_ref.speculative import accept_or_resample, speculative_generate

g = torch.Generator().manual_seed(0)
n = 20_000
counts = torch.zeros(len(p), dtype=torch.float64)
for d in torch.multinomial(q, n, replacement=True, generator=g).tolist():
    ok, replacement = accept_or_resample(p, q, d, g)
    counts[d if ok else replacement] += 1
tv_rule = 0.5 * (counts / n - p).abs().sum().item()
tv_naive = 0.5 * (q - p).abs().sum().item()
print(f"total variation to p: accept_or_resample {tv_rule:.4f} (sampling noise ~0.01); keeping every draft {tv_naive:.3f}")
checks["accept_or_resample, Monte Carlo TV to p"] = (tv_rule, 0.02)

# %% [markdown]
# ## 5. The shipped classroom GLM-5 and its MTP layer
#
# Acceptance needs a trained drafter. The project ships one: `classroom-base`, the 4-layer classroom GLM-5
# (MLA, DSA, 32-expert MoE, one MTP layer) trained by GLM-5's pre-training recipe
# (`python -m glm5_ref recipe base`: pre-training with MTP over 3 depths from the start and Muon Split,
# mid-training on longer contexts, the DSA warm-up and sparse adaptation; its model card is
# `glm5_ref/assets/checkpoints/classroom-base/README.md`). Its data, the **pretraining corpus**, is every
# pure-Python file of CPython 3.11.7's standard library with its test suite, split by document into train,
# validation and test, and tokenized by the project's byte-level BPE tokenizer of 4,112 ids (notebook 00a);
# notebook 06 explains the data and the training. Nothing is trained here: we load the checkpoint and compare
# each depth's loss on held-out test documents.
#
# In training (and in this evaluation) depth $k$ at position $i$ is fed the TRUE token $t_{i+k}$ and predicts
# $t_{i+k+1}$: it has exactly the information the main model has one position later, so its loss is not
# "harder the further ahead". It reaches that information through a different path: the main model's last
# hidden state plus $k$ passes of one extra decoder layer. In this model the depths score lower than the main head
# (printed below); at decoding time the drafts are fed the model's own guesses instead, and the acceptance
# rates of section 6 are what counts.

# %%
from glm5_ref.apps.model_card import held_out_prompts
from glm5_ref.pretrained import load_pretrained, read_metrics
from glm5_ref.training.data import build_splits

model, _ = load_pretrained("classroom-base")
card = read_metrics("classroom-base")
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, trained on {card['recipe']['tokens']:,} "
      f"tokens ({', '.join(s['name'] for s in card['recipe']['stages'])})")
test = build_splits(corpus="pretrain").test.ids
windows = torch.stack([test[s:s + 257] for s in range(0, 16 * 4000, 4000)])  # 16 held-out windows of 256 + 1
with torch.no_grad():
    ev = model(windows, labels=windows)
print(f"held-out cross-entropy (nats/token): main {ev.lm_loss.item():.3f}; MTP depths "
      + ", ".join(f"{k + 1}: {l.item():.3f}" for k, l in enumerate(ev.mtp_losses))
      + f"  (uniform: {math.log(model.config.vocab_size):.2f})")
# every depth is far better than a uniform guess, and all three are within a tenth of a nat of each other
assert max(l.item() for l in ev.mtp_losses) < math.log(model.config.vocab_size) / 2
assert max(l.item() for l in ev.mtp_losses) - min(l.item() for l in ev.mtp_losses) < 0.1

# %% [markdown]
# ## 6. Acceptance and accept length, 1 to 4 draft steps
#
# Three held-out code prompts of 64 tokens (test documents, from their first `def` or `class`), 128 new tokens
# each. Greedy decoding with $N = 1 \dots 4$ draft steps, each output asserted equal to plain greedy decoding.
# Speed-ups are ratios of CPU time (`time.process_time`, one thread), which other load on the machine does not
# inflate as it does wall-clock time. Then sampling at temperature 1 with the
# rejection rule. Depth 4 was never trained (GLM-5 trains 3), and the layer simply recurses once more.
# `SpecStats.depth_acceptance` gives the conditional rates $a_j$.

# %%
prompts = held_out_prompts(3, 64)
NEW = 128
with torch.no_grad():
    model.generate(prompts[0][:, :8], 4), speculative_generate(model, prompts[0][:, :8], 4, 2)  # warm-up
plain_ids, plain_s = [], 0.0
for pr in prompts:  # timed in CPU seconds of this process: other programs on a shared machine do not inflate it
    t0 = time.process_time()
    plain_ids.append(model.generate(pr, NEW))
    plain_s += time.process_time() - t0


def pooled(stats_list, N):
    """Pool SpecStats over prompts: conditional acceptance per depth and emitted tokens per round."""
    tries = [sum(s.depth_tries[j] for s in stats_list) for j in range(N)]
    acc = [sum(s.depth_accepts[j] for s in stats_list) for j in range(N)]
    rates = [a / t if t else 0.0 for a, t in zip(acc, tries)]  # never reached: the chain before it is 0 anyway
    return rates, sum(sum(s.accept_lengths) for s in stats_list) / sum(s.rounds for s in stats_list)


results = {"greedy": {}, "sampled": {}}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # draft_steps = 4 > 3 trained depths warns
    for N in (1, 2, 3, 4):
        stats, spec_s = [], 0.0
        for pr, ref in zip(prompts, plain_ids):
            t0 = time.process_time()
            ids_, st = speculative_generate(model, pr, NEW, N)
            spec_s += time.process_time() - t0
            assert torch.equal(ids_, ref), "greedy speculative decoding must equal plain greedy decoding"
            stats.append(st)
        rates, tau = pooled(stats, N)
        results["greedy"][N] = dict(rates=rates, tau=tau, speedup=plain_s / spec_s)
        stats = [speculative_generate(model, pr, NEW, N, temperature=1.0, seed=i)[1]
                 for i, pr in enumerate(prompts)]
        rates_s, tau_s = pooled(stats, N)
        results["sampled"][N] = dict(rates=rates_s, tau=tau_s)
        print(f"N = {N}: greedy  tau = {tau:.2f}, a_j = {[round(r, 2) for r in rates]}, speed-up "
              f"{plain_s / spec_s:.2f}x (output identical)\n       sampled tau = {tau_s:.2f}, a_j = "
              f"{[round(r, 2) for r in rates_s]}")

# %% [markdown]
# Pooled over the prompts, $\tau$ = emitted tokens / rounds, and this equals $1 + a_1 + a_1 a_2 + \dots$
# exactly, by counting. The formula does real work when it predicts $\tau$ for every $N$ from the per-depth
# rates of *one* run, the $N = 4$ run. The i.i.d. formula with $a = a_1$ is shown too.
#
# Greedy and sampled acceptance measure different things. A greedy draft passes only when the two argmaxes
# agree; a sampled draft passes with probability $\sum_x \min(p(x), q(x)) = 1 - \mathrm{TV}(p, q)$, which
# counts the overlap of the whole distributions. The printed rates show which is larger for this model.
# Greedy decoding of a small model also falls into repetitive loops (the text below), and repeated text is
# easy to draft, so greedy acceptance partly measures the loops.

# %%
from glm5_ref.tokenizer import decode


def chain(rates, N):
    return 1 + sum(math.prod(rates[:j]) for j in range(1, N + 1))


print(repr(decode(plain_ids[0][0, 64:].tolist())[:240]))
Ns = [1, 2, 3, 4]
for mode in ("greedy", "sampled"):
    r4 = results[mode][4]["rates"]
    for N in Ns:
        pred, meas = chain(r4, N), results[mode][N]["tau"]
        print(f"{mode:7s} N = {N}: measured tau {meas:.2f}   from the N = 4 rates {pred:.2f}   "
              f"i.i.d. with a = a_1: {(1 - r4[0] ** (N + 1)) / (1 - r4[0] + 1e-12):.2f}")

# %% [markdown]
# ## 7. What the speed-up depends on
#
# Per round, speculative decoding pays for one verify forward of $N+1$ tokens and $N$ MTP steps. Plain
# decoding pays one main step per token. So
#
# $$\text{speed-up} = \frac{E[\tau] \cdot C_{\text{step}}}{C_{\text{verify}}(N+1) + N\, C_{\text{MTP}}}.$$
#
# At batch 1 on a GPU, decoding is memory-bound: the time of a forward is close to the time to read the weights
# it uses (2 bytes each in bf16). For a *dense* model a forward of 4 tokens reads the same weights as a forward of
# 1, so $C_{\text{verify}} \approx C_{\text{step}}$, and a drafter that is 1 of 79 layers would cost
# $C_{\text{step}}/78$. Neither holds for GLM-5:
#
# - **Verification reads more experts.** Each verified token is routed to its own top-8 of 256 experts, so a
#   verify of $k$ tokens reads the routed weights of every expert that *any* of the $k$ tokens chose, up to all
#   256. How many that is depends on how correlated the routing of neighbouring tokens is. We **assume** uniform,
#   independent routing (each token's 8 experts a uniform random subset), which gives
#   $E[\text{distinct}] = E\,(1 - (1 - K/E)^k)$ per MoE layer. Real routing is correlated, which touches fewer.
# - **A draft step reads the LM head.** The MTP layer shares the main model's LM head: 154,880 x 6,144 parameters,
#   read at every draft step on top of the layer itself.
#
# The cost model counts parameters read and ignores the attention's cache reads (a verify reads the cache once for
# all its tokens, so counting them would favour speculation, most at long context):

# %%
# the cost model: batch-1, memory-bound cost of one main step, one verify of k tokens and one MTP step, in weights read
E, K, n_moe = glm5.n_routed_experts, glm5.num_experts_per_tok, glm5.num_moe_layers
active = glm5.param_breakdown(active=True)  # what one token reads (the LM head included, the embedding is a lookup)
step_params = sum(active.values())
per_expert = 3 * glm5.hidden_size * glm5.moe_intermediate_size  # one routed expert: gate, up, down (SwiGLU)
assert active["routed_experts"] == n_moe * K * per_expert


def distinct_experts(k):
    """Expected distinct experts per MoE layer that k tokens touch, under uniform independent routing (an ASSUMPTION)."""
    return E * (1 - (1 - K / E) ** k)


def verify_cost(k):
    """A main forward of k tokens, in units of a 1-token main step: the non-routed weights once, the routed
    weights of every distinct expert."""
    return (step_params - active["routed_experts"] + n_moe * per_expert * distinct_experts(k)) / step_params


with_mtp = glm5.param_breakdown(active=True, include_mtp=True)
mtp_layer_params = sum(with_mtp.values()) - step_params  # the MTP decoder layer (its K experts), eh_proj, norms
mtp_cost = (mtp_layer_params + active["lm_head"]) / step_params  # ... and the shared LM head it reads
print(f"one main step reads {step_params / 1e9:.1f}B parameters ({step_params * 2 / 1e9:.1f} GB in bf16; GB = 10^9 "
      f"bytes), {active['routed_experts'] / 1e9:.1f}B of them routed experts ({K} of {E} in {n_moe} MoE layers)")
print(f"LM head {glm5.vocab_size:,} x {glm5.hidden_size:,} = {active['lm_head'] / 1e9:.2f}B; MTP layer read per token "
      f"{mtp_layer_params / 1e9:.2f}B; an MTP step = {mtp_cost:.3f} of a main step (1/{1 / mtp_cost:.0f}, not 1/78)")
for k in (1, 2, 4, 5):
    print(f"verify of {k} token{'s' if k > 1 else ' '}: {distinct_experts(k):5.1f} distinct experts per MoE layer (uniform routing), "
          f"cost {verify_cost(k):.2f} main steps")

# %% [markdown]
# A verify of 4 tokens costs about 2.6 main steps under this model, not 1. With GLM-5's acceptance (the i.i.d.
# rate $a$ that reproduces the paper's 2.76 at 4 steps, section 3) the projected batch-1 speed-up follows.
# The naive proportions (verify free, MTP 1/78) are printed for contrast:

# %%
Ns = [1, 2, 3, 4]
tau_glm5 = {N: (1 - a_glm5 ** (N + 1)) / (1 - a_glm5) for N in Ns}
glm5_moe = {N: tau_glm5[N] / (verify_cost(N + 1) + N * mtp_cost) for N in Ns}
glm5_naive = {N: tau_glm5[N] / (1 + N / 78) for N in Ns}
for N in Ns:
    print(f"N = {N}: E[tau] {tau_glm5[N]:.2f}; cost {verify_cost(N + 1):.2f} + {N} x {mtp_cost:.3f} main steps -> "
          f"projected speed-up {glm5_moe[N]:.2f}x  (naive proportions: {glm5_naive[N]:.2f}x)")

# %% [markdown]
# Under these assumptions speculative decoding of one sequence barely pays for GLM-5: the tokens a round gains
# are eaten by the extra experts the verify must read. Two things change that in practice. Routing of
# neighbouring tokens is correlated (fewer distinct experts), and serving runs many sequences at once: at a batch
# of dozens of sequences most experts are read anyway, verify tokens then add compute rather than weight reads,
# and a round's extra tokens come almost free. The model is a batch-1 bound, not a prediction for a server.
#
# The classroom model on this CPU is a different machine, so we measure its three costs at the prompts' context,
# the way `glm5_ref.apps.bench.spec_decode.step_costs` (behind `python -m glm5_ref bench spec-decode`) does, but in
# CPU time: a main step (1 token over the cache), a verify ($N+1$ tokens over the cache, then the cache is rolled
# back), and one MTP step with its logits over the MTP layer's own cache:

# %%
from glm5_ref.dsa import DSACache


def cpu_ms(fn, repeats=15):
    """Median CPU milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append((time.process_time() - t0) * 1e3)
    return sorted(times)[repeats // 2]


with torch.no_grad():
    context = 64 + NEW // 2
    ctx_ids = plain_ids[0][:, :context]  # a prompt and its greedy continuation
    cache = model.new_cache(1, context + 8)
    out = model(ctx_ids, cache=cache)

    def main_forward(k):  # k tokens over the cache, then roll the cache back
        def fn():
            model(ctx_ids[:, -k:], cache=cache).logits[0, -1].argmax()
            cache.truncate(context)
        return fn

    mtp_cache = DSACache.for_config(model.config, 1, context + 1, dtype=out.logits.dtype)
    hidden, emb = model.model.norm(out.hidden_states), model.model.embed_tokens(ctx_ids)
    decode_ex = model.execution.replace(absorbed=True)
    model.mtp.step(hidden[:, :-1], emb[:, 1:], cache=mtp_cache, execution=decode_ex)  # the MTP cache up to here

    def mtp_step():
        h = model.mtp.step(hidden[:, -1:], emb[:, -1:], cache=mtp_cache, execution=decode_ex).hidden
        model.mtp.logits(h, model.lm_head)[0, -1].argmax()
        mtp_cache.truncate(context - 1)

    c_step, c_mtp = cpu_ms(main_forward(1)), cpu_ms(mtp_step)
    c_verify = {N + 1: cpu_ms(main_forward(N + 1)) for N in Ns}
print(f"main step {c_step:.2f} ms, MTP step {c_mtp:.2f} ms ({c_mtp / c_step:.0%} of a main step); verify of N+1 tokens: "
      + ", ".join(f"{N + 1}: {c_verify[N + 1]:.2f} ms ({c_verify[N + 1] / c_step:.1f}x)" for N in Ns))
predicted = {N: results["greedy"][N]["tau"] * c_step / (c_verify[N + 1] + N * c_mtp) for N in Ns}
for N in Ns:
    print(f"N = {N}: predicted speed-up {predicted[N]:.2f}x, measured {results['greedy'][N]['speedup']:.2f}x")
assert c_mtp > 0.1 * c_step  # the classroom drafter is no 1/78 of a step: one of 5 layers, plus the LM head

# %% [markdown]
# Here the MTP layer is one of five decoder layers plus the LM head, so a draft step costs a sizeable fraction of
# a main step (printed above), and the speed-up stays far below the accept length. The verify ratios depend on
# the machine: at batch 1 a model this small spends much of a forward in per-operation overhead (Python, operator
# dispatch) that does not grow with the number of tokens, while its matrix products and each token's own experts
# do. These timings come from a machine shared with other work and vary from run to run by tens of percent, the
# predicted and measured speed-ups with them; `python -m glm5_ref bench spec-decode` measures the same costs in
# wall-clock time. The model card's benchmark (8 prompts, wall-clock, two threads) is in `metrics.json`:

# %%
bench = card["speculative"]
print(f"model card: {bench['prompts']} prompts x {bench['new_tokens']} tokens, 3 drafts: accept length "
      f"{bench['accept_length']:.2f}, {bench['speedup']:.2f}x plain decoding ({bench['spec_tok_s']:.0f} vs "
      f"{bench['plain_tok_s']:.0f} tokens/s, {bench['threads']} threads)")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
for mode, color in (("greedy", "tab:blue"), ("sampled", "tab:orange")):
    ax1.plot(Ns, [results[mode][N]["tau"] for N in Ns], "o", color=color, ms=7, label=f"measured, {mode}")
    ax1.plot(Ns, [chain(results[mode][4]["rates"], N) for N in Ns], "-", color=color, alpha=0.6,
             label=f"$1 + a_1 + a_1a_2 + \\dots$ ({mode}, rates of N = 4)")
ax1.plot(Ns, [N + 1 for N in Ns], ":", color="gray", label="every draft accepted")
ax1.plot([4], [2.76], "*", color="tab:green", ms=12, label="GLM-5, paper Table 2 (4 steps): 2.76")
ax1.set_xlabel("draft steps N")
ax1.set_ylabel("accept length (tokens per round)")
ax1.set_xticks(Ns)
ax1.legend(fontsize=7)
ax1.set_title("accept length, classroom-base")
ax2.plot(Ns, [results["greedy"][N]["speedup"] for N in Ns], "o-", color="tab:blue", label="classroom, measured (greedy, this CPU)")
ax2.plot(Ns, [predicted[N] for N in Ns], "x--", color="tab:blue", alpha=0.6, label="classroom, cost model with measured costs")
ax2.plot(Ns, [glm5_moe[N] for N in Ns], "s-", color="tab:green", label=f"GLM-5 batch 1, MoE cost model, a = {a_glm5:.2f}")
ax2.plot(Ns, [glm5_naive[N] for N in Ns], "^:", color="gray", label="GLM-5, naive (verify free, MTP 1/78)")
ax2.axhline(1.0, color="gray", lw=1)
ax2.set_xlabel("draft steps N")
ax2.set_ylabel("speed-up over plain decoding")
ax2.set_xticks(Ns)
ax2.legend(fontsize=7)
ax2.set_title("tokens/s, speculative / plain")
fig.tight_layout()
show_figure(fig, "05_accept_length.png")

# %% [markdown]
# ## Summary
#
# - MTP depth $k$ combines the previous depth's state with the embedding of the token $k$ ahead, runs one
#   decoder block, and predicts the token after it. GLM-5 unrolls **one** module over 3 depths with shared
#   weights, so the drafts at inference are computed the way they were trained.
# - A round emits $E[\tau] = 1 + a_1 + a_1 a_2 + \dots$ tokens; with equal rates, $(1 - a^{N+1})/(1 - a)$.
# - Greedy verification returns exactly plain greedy decoding. With sampling, the rule
#   $\min(1, p/q)$ plus the residual $\max(0, p - q)$ returns exactly the main model's distribution.
# - Speed-up $= E[\tau]\, C_{\text{step}} / (C_{\text{verify}}(N+1) + N C_{\text{MTP}})$. For an MoE at batch
#   1 the verify reads the experts of every verified token and each draft step reads the LM head, so the
#   speed-up stays far below $E[\tau]$; it approaches $E[\tau]$ when the weights are read anyway, as in batched
#   serving.
#
# The last check: the derivations and the package agree.

# %%
# check: every derivation of this notebook against glm5_ref (MTP losses, the accept length, the rejection rule)
for name, (err, tolerance) in checks.items():
    assert err < tolerance, (name, err, tolerance)
print(f"derivation == glm5_ref ({len(checks)} checks); notebook ran in {time.perf_counter() - t_notebook:.0f} s")

# %% [markdown]
# ## Exercises
#
# 1. **Distinct experts.** Under uniform routing, how many distinct routed experts per MoE layer does a GLM-5
#    verify of 8 tokens read? Predict it with `distinct_experts`, then check by simulating 2,000 verifies of 8
#    tokens, each token choosing a random 8 of 256 experts.
# 2. **A better drafter.** If every draft were accepted with probability $a = 0.8$, what accept length would 3 draft
#    steps give, and what batch-1 speed-up does the cost model of section 7 project for GLM-5? Predict whether it
#    exceeds 1, then compute it.
# 3. **A stubborn drafter.** A drafter that always proposes token 1 ($q$ a point mass) against the $p$ of section 4:
#    predict the acceptance probability of `accept_or_resample` and the distribution of the emitted token, then
#    check with 4,000 draws.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
g = torch.Generator().manual_seed(1)
picks = torch.rand(2000, 8, E, generator=g).topk(K, dim=-1).indices  # (verifies, tokens, K): uniform top-K subsets
touched = torch.zeros(2000, E).scatter_(1, picks.reshape(2000, -1), 1.0).sum(dim=1)  # distinct experts per verify
print(f"8 tokens: formula {distinct_experts(8):.2f} distinct experts, simulation {touched.mean().item():.2f} "
      f"(of {E}; one token reads {K})")
assert abs(touched.mean().item() - distinct_experts(8)) < 0.3

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
a, N = 0.8, 3
tau = (1 - a ** (N + 1)) / (1 - a)
speedup = tau / (verify_cost(N + 1) + N * mtp_cost)
print(f"a = {a}, N = {N}: E[tau] = {tau:.3f}; projected GLM-5 batch-1 speed-up {speedup:.2f}x")
assert abs(tau - 2.952) < 1e-9  # 1 + 0.8 + 0.64 + 0.512
assert 1.0 < speedup < tau  # even a good drafter gains far less than E[tau] when the verify reads ~4x the experts

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
point = torch.zeros_like(p)
point[1] = 1.0
g = torch.Generator().manual_seed(2)
n3, accepted3 = 4000, 0
emitted3 = torch.zeros_like(p)
for _ in range(n3):
    ok, replacement = accept_or_resample(p, point, 1, g)
    accepted3 += ok
    emitted3[1 if ok else replacement] += 1
print(f"P(accept) = {accepted3 / n3:.3f} (predicted p(1) = sum min(p, q) = {p[1].item():.2f}); emitted "
      f"{[round(v, 3) for v in (emitted3 / n3).tolist()]} vs p {p.tolist()}")
assert abs(accepted3 / n3 - p[1].item()) < 0.03
assert 0.5 * (emitted3 / n3 - p).abs().sum().item() < 0.03
