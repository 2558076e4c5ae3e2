# %% [markdown]
# # 06 · Training a classroom GLM-5
#
# **Prerequisites:** notebook 00a (foundations: the BPE tokenizer, RMSNorm, SwiGLU), notebook 01 (MLA: the latent cache), notebook 02 (DSA: the lightning indexer, its KL loss and top-k attention), notebook 03 (MoE router: sigmoid gating, the balance loss and the router-bias update), notebook 04 (assembling GLM-5: the model and its checkpoint), notebook 05 (MTP: the loss over 3 depths). **Reading time:** about 30 minutes (it runs in about 50 s under make test, 2 cores).
#
# Notebooks 01-05 built every part of GLM-5. This one trains it: the "classroom" GLM-5 (4 layers, MLA, DSA,
# 32 routed experts, one MTP layer; its size is printed below) on Python source code, on a CPU. What is trained,
# and how, in one step of the training engine (`glm5_ref.training.engine.train_step`):
#
# | term | what it is | where |
# |---|---|---|
# | $L_{LM}$ | next-token cross-entropy, nats per token | `model.py` |
# | $L_{MTP} = \frac{\lambda}{D}\sum_{k=1}^{D} L^k$ | the ONE MTP layer unrolled over $D=3$ depths predicts tokens $k+1$ ahead; $\lambda=0.3$ (GLM-4.5's value; the GLM-5 paper gives none). Added to `out.loss` by the MTP module itself | `mtp.py` |
# | $L_{bal} = \alpha\sum_e f_e P_e$ | sequence-wise balance loss, $\alpha=10^{-4}$, per MoE layer | `moe.py` |
# | $b_e \mathrel{+}= \gamma\,\mathrm{sign}(\bar{c} - c_e)$ | aux-loss-free balancing: after each step, no gradient, $\gamma=10^{-3}$ | `moe.update_router_bias` |
# | $L_I = \mathrm{KL}(p_t \,\|\, \mathrm{softmax}(I_t))$ | the lightning indexer imitates the attention it replaces, in the DSA stages below | `dsa.py` |
#
# DSA is trained in stages (DeepSeek-V3.2 section 2.1.1, which GLM-5 follows after mid-training, GLM-5 section
# 2.1.1):
#
# | stage | attention | trained | loss |
# |---|---|---|---|
# | `dense` | dense MLA | everything but the indexers | $L_{LM} + L_{MTP} + L_{bal}$ |
# | `warmup` | dense MLA | only the indexers (the rest frozen, router biases too) | $L_I$ over all causal keys |
# | `sparse` | top-$k$ DSA | everything; the indexer sees detached inputs | $L_{LM} + L_{MTP} + L_{bal} + L_I$ on the selected keys |
#
# **The optimizer.** GLM-5 trains its hidden matrices with Muon and everything else (embedding, LM head, norms)
# with AdamW, and splits MLA's up-projections per head before Muon orthogonalizes them: **Muon Split** (GLM-5
# section 2.1; notebook 07 derives Muon and the split). The engine offers it (`optimizer="muon_split"`,
# `glm5_ref/training/optim.py`) and the shipped model was trained with it. The short run of this notebook uses
# AdamW for every parameter instead: on a CPU, Muon's orthogonalization of every matrix (per head, for MLA's
# up-projections) makes each step of a model this small markedly slower, and the run has a budget of well under
# a minute. The step written out by hand at the end is therefore AdamW's; notebook 07 trains with Muon Split.

# %%
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see glm5_ref/__main__.py

import copy
import math
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from glm5_ref.apps.demo import complete
from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.pretrained import load_pretrained, read_metrics
from glm5_ref.tokenizer import decode
from glm5_ref.training.data import bits_per_byte, build_splits, eval_windows, evaluate, token_byte_lengths, uniform_bpb
from glm5_ref.training.engine import lr_factor, set_dsa_stage, train_step
from glm5_ref.training.optim import build_optimizer
from glm5_ref.training.options import parse_dsa_schedule, resolve_config, stage_at
from glm5_ref.training.run import train

t_notebook = time.perf_counter()
torch.manual_seed(0)
cfg = GLM5Config.classroom()
print(f"classroom GLM-5: {cfg.num_params():,} parameters without the MTP layer, "
      f"{cfg.num_params(include_mtp=True):,} with it; {cfg.num_params(active=True, include_mtp=True):,} active per "
      f"token with it ({cfg.num_experts_per_tok} of {cfg.n_routed_experts} experts)")
print(f"{cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense + {cfg.num_moe_layers} MoE) + 1 MTP layer, "
      f"d = {cfg.hidden_size}, vocabulary {cfg.vocab_size:,}")
assert cfg.num_params(include_mtp=True) == sum(p.numel() for p in GLM5ForCausalLM(cfg).parameters())

# %% [markdown]
# ## The data: split by document, measured in bits per byte
#
# The short run below trains on the **classroom corpus**: 176 pure-Python modules of the CPython standard library.
# The shipped model was trained on the larger **pretraining corpus** (every pure-Python file of the standard library
# with its test suite). Both are tokenized by the project's byte-level BPE tokenizer (notebook 00a).
# `tokenizer.corpus_split` assigns each file to train or validation by a hash of its path, so no file is in both
# halves (a split by position would put two halves of one file on both sides). Each half becomes one stream of
# token ids, documents joined by `<|endoftext|>`; training draws random windows of $T+1$ tokens.
#
# Nats per token depend on the tokenizer; **bits per byte** do not: the loss of every predicted token, summed,
# over the UTF-8 bytes those tokens spell, $\text{bpb} = \sum -\ln p / (\ln 2 \cdot \text{bytes})$.

# %%
splits = build_splits()
for name, half in (("train", splits.train), ("validation", splits.val)):
    print(f"{name:10s} {len(half.doc_names):3d} files  {len(half):>9,} tokens  {half.num_bytes:>9,} bytes  "
          f"{half.num_bytes / len(half):.2f} bytes/token")
assert not set(splits.train.doc_names) & set(splits.val.doc_names)
print("validation files, e.g.:", splits.val.doc_names[:4])
print(repr(decode(splits.train.ids[1000:1040].tolist())))

# %% [markdown]
# A model that knows nothing puts $1/4112$ on every id of the vocabulary (4,088 byte-level tokens and 24 special
# ones): $\ln 4112 = 8.32$ nats per token. On the fixed validation windows that is the ceiling any trained model
# must get below, in bits per byte:

# %%
SEQ_LEN = 256
windows = eval_windows(splits.val.ids, SEQ_LEN, max_windows=16)  # the same 16 windows every time
uniform = uniform_bpb(windows)
byte_lengths = token_byte_lengths()
by_hand = windows[:, 1:].numel() * math.log(4112) / (math.log(2) * int(byte_lengths[windows[:, 1:]].sum()))
print(f"uniform guess: {math.log(4112):.3f} nats/token = {uniform:.3f} bits/byte")
assert abs(by_hand - uniform) < 1e-12 and abs(bits_per_byte(math.log(2) * 8, 1) - 8) < 1e-12

# %% [markdown]
# ## What each DSA stage trains
#
# `set_dsa_stage` sets the model's execution (`model.set_execution(sparse=..., detach_indexer_input=...)`, which
# every layer, the MTP layer's included, reads in its forward) and, for the warm-up, freezes everything but the
# indexers. On the tiny config (the same code, a few hundred thousand parameters), count the parameters that
# receive a gradient in each stage:

# %%
tiny = GLM5ForCausalLM(resolve_config("tiny"))  # the tiny config, vocabulary widened to the tokenizer's 4112
T_LONG = 40  # longer than the tiny config's index_topk = 4, so sparse attention really selects keys
long_batch = splits.train.ids[:2 * (T_LONG + 1)].reshape(2, T_LONG + 1)
for stage in ("dense", "warmup", "sparse"):
    model = copy.deepcopy(tiny)
    set_dsa_stage(model, stage)
    out = model(long_batch, labels=long_batch, indexer_loss=stage != "dense")
    loss = out.indexer_loss if stage == "warmup" else out.loss
    loss.backward()
    got = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    indexer = [n for n in got if ".indexer." in n]
    print(f"{stage:7s} loss {loss.item():9.3g}   {len(got):3d} tensors get gradients, {len(indexer):2d} of them "
          f"indexer tensors")
    if stage == "dense":
        assert not indexer  # the indexer is not used: dense attention
    if stage == "warmup":
        assert got and len(got) == len(indexer)  # only the indexers learn
    if stage == "sparse":
        assert indexer and len(got) > len(indexer)

# %% [markdown]
# ## The schedules
#
# The learning rate warms up linearly over the first 5% of the run, then follows a cosine down to 10%. The DSA
# stages are placed by fractions of the same run (with `steps=` the run is the step count, and resuming is
# bit-exact; with a time budget, `minutes=`, it is the clock). MTP trains in every step of the run
# (`mtp_start=0`, the default): in the dense and sparse stages its three depths add to the loss, and in the
# warm-up nothing but the indexers trains at all, MTP included, as in the recipe.

# %%
DSA_SCHEDULE = "dense:0.7,warmup:0.1,sparse:0.2"
schedule = parse_dsa_schedule(DSA_SCHEDULE)
prog = torch.linspace(0, 1, 400).tolist()
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.plot(prog, [lr_factor(x, 0.05, 0.1) for x in prog], color="black", label="lr / peak lr")
for stage, color in (("warmup", "tab:orange"), ("sparse", "tab:purple")):
    xs = [x for x in prog if stage_at(schedule, x) == stage]
    ax.axvspan(xs[0], xs[-1], color=color, alpha=0.15, label=f"DSA {stage}")
ax.set(xlabel="progress of the run", ylabel="lr / peak lr", title="the short run's schedules")
ax.legend(fontsize=8)
show_figure(fig, "06_schedules.png")

# %% [markdown]
# ## A short run of the classroom model
#
# `train` does all of the above in a loop, with periodic evaluation on the fixed validation windows, a JSONL log,
# and checkpoints in the released Hugging Face layout plus the training state (optimizer, scheduler, sampler and
# RNG states) so that a run can resume. Here: 40 steps of 2 windows of 256 tokens, AdamW at a peak lr of 3e-3,
# MTP over 3 depths throughout, and the three DSA stages. Everything is seeded, so the numbers are the same on
# every run; only the time differs.

# %%
run_dir = Path(tempfile.mkdtemp()) / "classroom"
result = train("classroom", run_dir, steps=40, batch_size=2, seq_len=SEQ_LEN, optimizer="adamw", lr=3e-3,
               dsa_stage=DSA_SCHEDULE, num_evals=3, eval_windows_n=16, checkpoint_minutes=0, progress=False)
print(f"{result.step} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s; validation "
      f"{result.final_eval['loss']:.3f} nats/token = {result.final_eval['bpb']:.3f} bits/byte (uniform {uniform:.3f})")
print(sorted(os.listdir(result.checkpoint)))
log = result.log
steps = [r for r in log if r["kind"] == "step"]
evals = [r for r in log if r["kind"] == "eval"]
print("first steps:", [(r["step"], r["stage"], round(r["lm_loss"], 3)) for r in steps[:3]])
print("last steps: ", [(r["step"], r["stage"], round(r["lm_loss"], 3), round(r.get("indexer_loss", 0), 4),
                        [round(c, 3) for c in r.get("mtp_ce", [])]) for r in steps[-3:]])
assert all(r.get("mtp_ce") for r in steps if r["stage"] != "warmup")  # MTP in every step that trains the model
first = sum(r["lm_loss"] for r in steps[:3]) / 3
last = sum(r["lm_loss"] for r in steps[-3:]) / 3
print(f"LM loss: first 3 steps {first:.3f}, last 3 steps {last:.3f}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
x = [r["step"] for r in steps]
ax1.plot(x, [r["lm_loss"] for r in steps], color="tab:blue", label="train LM loss")
ax1.plot(x, [sum(r["mtp_ce"]) / len(r["mtp_ce"]) if r.get("mtp_ce") else float("nan") for r in steps],
         color="tab:green", lw=0.9, label="MTP cross-entropy (mean of 3 depths)")
for stage, color in (("warmup", "tab:orange"), ("sparse", "tab:purple")):
    xs = [r["step"] for r in steps if r["stage"] == stage]
    for ax in (ax1, ax2):
        ax.axvspan(xs[0] - 0.5, xs[-1] + 0.5, color=color, alpha=0.12, label=f"DSA {stage}" if ax is ax1 else None)
ax1.set(xlabel="step", ylabel="nats per token", title="training loss")
ax1.legend(fontsize=8)
ax2.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", color="tab:red", label="validation")
ax2.axhline(uniform, color="gray", ls="--", label=f"uniform guess ({uniform:.2f})")
ax2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
ax2.legend(fontsize=8)
fig.suptitle("40 steps of the classroom GLM-5 (AdamW, MTP x3, DSA stages)")
fig.tight_layout()
show_figure(fig, "06_notebook_loss.png")

# %% [markdown]
# ## Expert load and the bias update
#
# After every optimizer step the engine moves each router bias by $\gamma = 10^{-3}$: down for an expert that got
# more than the mean number of tokens in that step, up for one that got fewer. The bias enters only the *choice* of
# the top-$k$ experts, not their weights (notebook 03), and no gradient touches it. It moves by exactly $\gamma$ per
# step whatever the imbalance, so after $S$ steps no bias has moved by more than $S\gamma$: 0.04 in this run.
# The heat map shows each MoE layer's tokens per expert, relative to the mean, between evaluations; the numbers
# below it are the largest load over the mean, per layer and interval:

# %%
load_evals = [r for r in evals if r.get("expert_load") and sum(map(sum, r["expert_load"]))]  # intervals with steps
loads = torch.tensor([r["expert_load"] for r in load_evals], dtype=torch.float64)  # (intervals, MoE layers, experts)
rel = loads / loads.mean(-1, keepdim=True)
fig, axes = plt.subplots(1, rel.shape[1], figsize=(4.2 * rel.shape[1], 2.8), squeeze=False, layout="constrained")
from matplotlib.colors import TwoSlopeNorm

norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))
for i, ax in enumerate(axes[0]):
    im = ax.imshow(rel[:, i].numpy(), aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set(xlabel="expert", ylabel="interval between evaluations", title=f"MoE layer {i + 1}: load / mean",
           yticks=range(len(load_evals)))
fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="tokens routed / mean over experts")
fig.suptitle("the short run: tokens per expert / mean load")
show_figure(fig, "06_notebook_expert_load.png")
max_over_mean = rel.amax(-1)  # (evals, MoE layers)
for i in range(rel.shape[1]):
    print(f"MoE layer {i + 1}: max load / mean per interval {[round(v, 2) for v in max_over_mean[:, i].tolist()]}, "
          f"idle experts in the last interval: {int((loads[-1, i] == 0).sum())} of {loads.shape[-1]}")
trained_model = GLM5ForCausalLM.from_pretrained(result.checkpoint).eval()
bias_moves = [m.gate.e_score_correction_bias.abs().max().item() for m in trained_model.moe_layers()]
print(f"largest |bias| per MoE layer after {result.step} steps: {[round(b, 3) for b in bias_moves]} "
      f"(bound {result.step} x 1e-3 = {result.step * 1e-3:.3f})")
assert max(bias_moves) <= result.step * 1e-3 + 1e-6

# %% [markdown]
# So the load does **not** even out in 40 steps: the printed ratios stay far above 1 (a perfectly balanced
# layer reads 1.0 everywhere), because a bias that can move by at most 0.04 barely changes which experts win the
# top-$k$ while the router's weights are still changing fast. Balancing is a slow controller: it works over
# thousands of steps. The shipped model, trained for thousands of steps, shows what it reaches. Its load on 16
# validation windows of the pretraining corpus, per main MoE layer:

# %%
shipped, _ = load_pretrained("classroom-base")
card = read_metrics("classroom-base")
pre = build_splits(corpus="pretrain")
with torch.no_grad():
    ev = shipped(eval_windows(pre.val.ids, SEQ_LEN, 16))
for i, (moe, load) in enumerate(zip(shipped.moe_layers(), ev.tokens_per_expert)):
    load = load.double()
    bias = moe.gate.e_score_correction_bias
    print(f"MoE layer {i + 1}: max load / mean {load.max() / load.mean():.2f},"
          f" min / mean {load.min() / load.mean():.2f}; bias range [{bias.min().item():+.3f}, {bias.max().item():+.3f}]")

# %% [markdown]
# The shipped model's ratios are much closer to 1 than the short run's, yet not 1: on a given stretch of code the
# busiest expert of a layer still gets well over the mean, because the bias balances the load averaged over
# training batches, not within every window. Only the differences between a layer's biases change which experts
# win; the biases of a layer can all drift the same way (here most of them are positive) without effect.

# %% [markdown]
# ## Samples from the short run
#
# A model trained for 40 steps has learned little more than the surface of Python (newlines with indentation,
# `#` comments, `self.`):

# %%
set_dsa_stage(trained_model, "sparse")  # the indexer was trained: attend over its top-k, as GLM-5 does
# a prompt ends where a line's text starts: "\n" + indentation is ONE token of this tokenizer
prompts = ("class Point:\n    def __init__(self", "import os\n\n\ndef list_files(path):\n    ")
for prompt in prompts:
    print(repr(prompt + complete(trained_model, prompt, max_new_tokens=24)))

# %% [markdown]
# ## The whole recipe: the shipped classroom-base model
#
# Forty steps show the mechanics. The project ships the classroom GLM-5 trained by GLM-5's own pre-training recipe
# (`python -m glm5_ref recipe base`, `glm5_ref/apps/recipe.py`; model card
# `glm5_ref/assets/checkpoints/classroom-base/README.md`): pre-training at 256 tokens with Muon Split and MTP over
# 3 depths, mid-training at 1,024 tokens on long documents packed with related files (MTP x3), the indexer's dense
# warm-up with everything else frozen, and sparse adaptation (MTP x3). Its stages and its validation curve, from
# the card's `metrics.json`:

# %%
for st in card["recipe"]["stages"]:
    print(f"{st['name']:10s} context {st['seq_len']:4d}, batch {st['batch_size']}, {st['steps']:4d} steps, "
          f"{st['tokens']:>9,} tokens, {st['dsa_stage']:6s} attention, {st['optimizer']} peak lr {st['lr']:g}, "
          f"{st['train_s'] / 60:.0f} min; val {st['final_eval']['val_bpb']:.3f} bits/byte")
print(f"total {card['recipe']['tokens']:,} tokens; {card['params']:,} parameters (MTP layer included)")
assert card["params"] == cfg.num_params(include_mtp=True)
fig, ax = plt.subplots(figsize=(8, 3.5))
for stage in card["recipe"]["stages"]:
    pts = [r for r in card["curve"] if r["stage_name"] == stage["name"]]
    ax.plot([r["tokens_total"] / 1e6 for r in pts], [r["val_bpb"] for r in pts], "o-", ms=3, label=stage["name"])
ax.set(xlabel="tokens trained (millions)", ylabel="validation bits per byte", title="classroom-base, the recipe")
ax.legend()
fig.tight_layout()
show_figure(fig, "06_recipe_curve.png")

# %% [markdown]
# Each stage is evaluated at its own context (256 tokens, then 1,024), so the curve steps up at mid-training:
# longer windows are scored over positions the 256-token model never saw. The card's measurements on held-out
# documents, and one of them recomputed here (the card's "check" number: 4 validation windows of 128 tokens,
# which `tests/test_pretrained.py` also recomputes):

# %%
d = card["dsa_vs_dense"]
print(f"test bits/byte: {card['test_bpb']:.3f} (512-token windows), {card['test_bpb_256']:.3f} (256-token windows)")
print(f"DSA vs dense at {d['context']} tokens: DSA {d['dsa_bpb']:.3f}, the same model dense {d['same_model_dense_bpb']:.3f}"
      f", before the DSA stages (dense) {d['before_dsa_dense_bpb']:.3f}")
check_windows = eval_windows(pre.val.ids, 128, 4)
check_bpb = evaluate(shipped, check_windows, batch_size=8, byte_lengths=token_byte_lengths(cfg.vocab_size))["bpb"]
print(f"check windows: recomputed {check_bpb:.4f} bits/byte, card {card['check_bpb']:.4f}")
assert abs(check_bpb - card["check_bpb"]) < 1e-4
prompt = "def fibonacci(n):\n    "
print(repr(prompt + complete(shipped, prompt, 48)))

# %% [markdown]
# ### What it does not yet do: copy from its context
#
# Its completions repeat little of the prompt, and the copy probe (`training/synthetic.py`) shows why: on a span of
# code written twice, the repeat costs nearly as much as the first time. Post-training needs that mechanism.
# `python -m glm5_ref experiment copy-onset` (its committed results are read here) times when a model starts
# copying on the simplest task there is, 16 random ids and then the same 16, over three seeds per arm: a plain GPT
# of the same width against the classroom GLM-5. A run "starts" at the first evaluation where the repeat costs
# 1 nat less than the first half; the check recomputes every run's onset from its curve.

# %%
import json

from glm5_ref.apps.experiments import copy_onset
from glm5_ref.apps.figures import ROOT, show_saved

onset_result = json.loads((ROOT / "figures" / "copy_onset.json").read_text())
for run in onset_result["runs"]:
    by_hand = next((c["step"] for c in run["curve"] if c["first"] - c["repeat"] >= 1.0), None)
    assert by_hand == run["onset"] == copy_onset.onset(run["curve"])
for arm, s in onset_result["summary"].items():
    print(f"{arm:24s} started in {s['started']} of {s['seeds']} seeds, onsets {s['onsets']}")
show_saved("copy_onset.png")

# %% [markdown]
# The plain GPT with PyTorch's default init starts in every seed. Give it GLM-5's init instead, N(0, 0.02) for
# every matrix and embedding (what transformers and `GLM5ForCausalLM` use), and it starts in none, as stuck as the
# classroom model (its repeat costs what the first half does, to 0.01 nats), at lr 2e-3 or 5e-4; 0.02 on the
# embeddings alone, or on the matrices alone, is enough to stop it by step 800. MLA's rotary layout and SwiGLU
# each lower its odds too. The classroom model starts in none of its runs: not at a lower lr, a faster
# rope_theta, twice the rotated dims, after GLM's [gMASK]<sop> prefix, without MoE, or with PyTorch's init (one
# dense-FFN seed was leaving the plateau at step 800). At this budget the init decides for the GPT, and the
# classroom model has more than one thing against it (the README's copy-onset section).

# %% [markdown]
# ## One training step, by hand (derivation)
#
# The last check takes the training engine apart. On the tiny config: forward with labels, the loss as the sum of
# its parts, backward, clip the global gradient norm to 1, the optimizer update, then the router biases. To write
# out *every* parameter's update with a few lines of torch, the check runs the engine with `optimizer="adamw"`
# (every parameter AdamW); with `"muon_split"`, as above, the hidden matrices take the Muon update that notebook 07
# writes out, and the embedding, the LM head and the norms take exactly this AdamW update. AdamW with betas
# $(\beta_1, \beta_2) = (0.9, 0.95)$, step $t$, learning rate $\eta$, weight decay $\lambda$ (0.1 on matrices,
# 0 on vectors such as norms):
#
# $$m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \quad
#   W \leftarrow W(1 - \eta\lambda) - \eta\,\frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}.$$
#
# Then every router bias moves by $\gamma\,\mathrm{sign}(\bar{c} - c_e)$. Two steps by hand on one copy of the
# model, two steps of `train_step` on another.

# %%
# derivation: training steps written out (forward, loss, backward, clip, AdamW, router biases), torch only
def steps_by_hand(model, batches, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0, gamma=1e-3):
    """Train a copy of ``model`` on ``batches`` (each (B, T + 1)); returns (the losses, the trained copy)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    losses = []
    for t, batch in enumerate(batches, start=1):
        out = model(batch, labels=batch)
        loss = out.lm_loss + out.mtp_loss + out.balance_loss  # L_LM + lambda/D sum_k L^k + L_bal
        losses.append(loss.item())
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # None: unused (the indexer, dense attention)
        total_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None]))
        scale = torch.clamp(clip / (total_norm + 1e-6), max=1.0)  # clip the global gradient norm to `clip`
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                if g is None:
                    continue  # no gradient, no update (not even the weight decay)
                g = g * scale
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
                p.mul_(1 - lr * (weight_decay if p.dim() >= 2 else 0.0))
                p.sub_(lr * m_hat / (v_hat.sqrt() + eps))
            for moe, c in zip(model.moe_layers(), out.tokens_per_expert):  # main MoE layers, then the MTP block's
                moe.gate.e_score_correction_bias.add_(gamma * torch.sign(c.float().mean() - c.float()))
    return losses, model


batches = [splits.train.ids[i * 66:(i + 1) * 66].reshape(2, 33) for i in range(2)]  # two batches (B, T + 1)
LR = 1e-3
losses_hand, model_hand = steps_by_hand(tiny, batches, LR)
print("losses by hand:", [round(l, 4) for l in losses_hand])

# %%
# check: two steps of glm5_ref.training.engine.train_step (AdamW) == the two steps written out by hand
engine_model = copy.deepcopy(tiny)
opt = build_optimizer(engine_model, "adamw", LR)
losses_engine = [train_step(engine_model, opt, b)[1].item() for b in batches]
engine_state, hand_state = engine_model.state_dict(), model_hand.state_dict()
err = max((engine_state[k] - hand_state[k]).abs().max().item() for k in engine_state)
moved = max((engine_state[k] - tiny.state_dict()[k]).abs().max().item() for k in engine_state)
print(f"losses: engine {[round(l, 4) for l in losses_engine]}, by hand {[round(l, 4) for l in losses_hand]}")
print(f"after 2 steps, over all {len(engine_state)} tensors (weights and router biases): max |engine - by hand| = "
      f"{err:.1e}; the steps moved them by up to {moved:.1e}")
assert max(abs(a - b) for a, b in zip(losses_engine, losses_hand)) < 1e-5
assert err < 1e-6 < moved
assert math.isfinite(result.final_eval["bpb"]) and result.final_eval["bpb"] < uniform  # the short run learned
print(f"the engine's step == the step written out; notebook ran in {time.perf_counter() - t_notebook:.0f} s")

# %% [markdown]
# ## Exercises
#
# 1. **The first AdamW step.** At $t = 1$, $m_1 / (1 - \beta_1) = g$ and $v_1 / (1 - \beta_2) = g^2$. Predict the
#    size of the first update of an embedding entry with a nonzero gradient (without the weight decay), then
#    check it with `steps_by_hand` on one batch with `weight_decay=0`.
# 2. **How far can a bias move?** The recipe's stages take the step counts printed above, and the indexer warm-up
#    does not update the router biases. Predict the largest $|b_e|$ any router of the shipped model can have
#    (biases start at 0, $\gamma = 10^{-3}$), then check the shipped model's biases.
# 3. **Tokens of a stage.** Predict the pre-training stage's token count from its batch, context and steps, then
#    check it against the card.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
_, one_step = steps_by_hand(tiny, batches[:1], LR, weight_decay=0.0)
delta = (one_step.model.embed_tokens.weight - tiny.model.embed_tokens.weight).abs().detach()
entries = delta[delta > 0]
print(f"first-step update of the {entries.numel():,} embedding entries that moved: median {entries.median().item():.4e}, "
      f"max {entries.max().item():.4e} (lr = {LR}): lr * |g| / (|g| + eps), i.e. lr * sign(g) unless |g| ~ eps")
assert entries.max().item() <= LR * (1 + 1e-5) and abs(entries.median().item() - LR) < 1e-3 * LR

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
updating = sum(st["steps"] for st in card["recipe"]["stages"] if st["dsa_stage"] != "warmup")
largest = max(m.gate.e_score_correction_bias.abs().max().item() for m in shipped.moe_layers())
print(f"{updating:,} steps update the biases -> |b_e| <= {updating * 1e-3:.3f}; largest in the shipped model {largest:.3f}")
assert largest <= updating * 1e-3 + 1e-2  # + bf16 rounding of the stored biases

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
st = card["recipe"]["stages"][0]
predicted = st["batch_size"] * st["seq_len"] * st["steps"]
print(f"{st['name']}: {st['batch_size']} x {st['seq_len']} x {st['steps']} = {predicted:,} tokens; card {st['tokens']:,}")
assert predicted == st["tokens"]
