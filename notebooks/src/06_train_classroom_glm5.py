# %% [markdown]
# # 06 · Training a classroom GLM-5
#
# Notebooks 01-05 built every part of GLM-5. This one trains it: a ~17M-parameter "classroom" GLM-5 (4 layers,
# MLA, DSA, 32 experts, one MTP layer) on 3.7 MB of Python from the CPython standard library, on a CPU.
# What is trained, and how, in one step of `glm5_ref.training.run`:
#
# | term | what it is | where |
# |---|---|---|
# | $L_{LM}$ | next-token cross-entropy, nats per token | `model.py` |
# | $L_{MTP} = \frac{\lambda}{D}\sum_{k=1}^{D} L^k$ | the ONE MTP layer unrolled over $D=3$ depths predicts tokens $k+1$ ahead; $\lambda=0.3$. Added to `out.loss` by the MTP module itself | `mtp.py` |
# | $L_{bal} = \alpha\sum_e f_e P_e$ | sequence-wise balance loss, $\alpha=10^{-4}$, per MoE layer | `moe.py` |
# | $b_e \mathrel{+}= \gamma\,\mathrm{sign}(\bar{c} - c_e)$ | aux-loss-free balancing: after each step, no gradient, $\gamma=10^{-3}$ | `moe.update_router_bias` |
# | $L_I = \mathrm{KL}(p_t \,\|\, \mathrm{softmax}(I_t))$ | the lightning indexer imitates the attention it replaces, in the DSA stages below | `dsa.py` |
#
# DSA is trained in stages (DeepSeek-V3.2 section 2.1.1, which GLM-5 follows after mid-training):
#
# | stage | attention | trained | loss |
# |---|---|---|---|
# | `dense` | dense MLA | everything but the indexers | $L_{LM} + L_{MTP} + L_{bal}$ |
# | `warmup` | dense MLA | only the indexers (the rest frozen, router biases too) | $L_I$ over all causal keys |
# | `sparse` | top-$k$ DSA | everything; the indexer sees detached inputs | $L_{LM} + L_{MTP} + L_{bal} + L_I$ on the selected keys |

# %%
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP: see glm5_ref/__main__.py

import copy
import math
import tempfile
from pathlib import Path

import torch

from glm5_ref.training.data import bits_per_byte, build_splits, eval_windows, evaluate, token_byte_lengths, uniform_bpb
from glm5_ref.apps.demo import complete
from glm5_ref.apps.plots import plot_expert_load, plot_training
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.moe import MoE
from glm5_ref.training.optim import build_optimizer
from glm5_ref.tokenizer import decode
from glm5_ref.training.checkpoint import read_log, read_trainer_state
from glm5_ref.training.engine import lr_factor, set_dsa_stage, train_step
from glm5_ref.training.options import parse_dsa_schedule, resolve_config, stage_at
from glm5_ref.training.run import train

torch.manual_seed(0)
FIGURES = Path("..") / "figures"

# %% [markdown]
# ## The data: split by document, measured in bits per byte
#
# `tokenizer.corpus_split` assigns each file of the corpus to train or validation by a hash of its path, so no
# file is in both halves (a split by position would put two halves of one file on both sides). Each half becomes
# one stream of token ids, documents joined by `<|endoftext|>`; training draws random windows of $T+1$ tokens.
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
# ones): $\ln 4112 = 8.32$ nats per token. On the fixed
# validation windows that is the ceiling any trained model must get below, in bits per byte:

# %%
SEQ_LEN = 256
windows = eval_windows(splits.val.ids, SEQ_LEN, max_windows=16)  # the same 16 windows every time
uniform = uniform_bpb(windows)
byte_lengths = token_byte_lengths()
by_hand = windows[:, 1:].numel() * math.log(4112) / (math.log(2) * int(byte_lengths[windows[:, 1:]].sum()))
print(f"uniform guess: {math.log(4112):.3f} nats/token = {uniform:.3f} bits/byte")
assert abs(by_hand - uniform) < 1e-12 and abs(bits_per_byte(math.log(2) * 8, 1) - 8) < 1e-12

# %% [markdown]
# ## One training step, by hand (derivation)
#
# On the tiny config (the same code, a few hundred thousand parameters): forward with labels, the loss as the sum
# of its parts, backward, clip the gradient norm to 1, an AdamW step, then the router-bias update on every MoE
# layer. We do it by hand on one copy of the model and with `train_step` on another, and compare the weights.

# %%
tiny = GLM5ForCausalLM(resolve_config("tiny"))  # the tiny config, vocabulary widened to the tokenizer's 4112
batch = splits.train.ids[:2 * 33].reshape(2, 33)  # (B, T + 1): read all, predict the last T
a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
opt_a, opt_b = build_optimizer(a, "adamw", 1e-3), build_optimizer(b, "adamw", 1e-3)

# derivation: one step by hand
out = a(batch, labels=batch)
parts = out.lm_loss + out.mtp_loss + out.balance_loss
per_depth = [round(l.item(), 3) for l in out.mtp_losses]
print(f"LM {out.lm_loss.item():.4f} + MTP {out.mtp_loss.item():.4f} (= 0.3/3 x sum of {per_depth}) "
      f"+ balance {out.balance_loss.item():.2e} = {out.loss.item():.4f}")
assert torch.allclose(parts, out.loss)
out.loss.backward()
torch.nn.utils.clip_grad_norm_([p for p in a.parameters() if p.grad is not None], 1.0)
opt_a.step()
opt_a.zero_grad()
moes = [m for m in a.modules() if isinstance(m, MoE)]  # main layers', then the MTP block's
with torch.no_grad():
    for moe, load in zip(moes, out.tokens_per_expert):
        moe.gate.e_score_correction_bias += 1e-3 * torch.sign(load.float().mean() - load.float())
print("tokens per expert, MoE layer 1:", out.tokens_per_expert[0].tolist())
print("its bias after the step:       ", [round(x, 4) for x in moes[0].gate.e_score_correction_bias.tolist()])

# the package
train_step(b, opt_b, batch)
assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
print("by hand == glm5_ref.training.engine.train_step (weights and router biases, bit for bit)")

# %% [markdown]
# ## What each DSA stage trains
#
# `set_dsa_stage` sets the model's execution (`model.set_execution(sparse=..., detach_indexer_input=...)`, which
# every layer, the MTP layer's included, reads in its forward) and, for the warm-up, freezes everything but the
# indexers. Count the parameters that receive a gradient in each stage:

# %%
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
# stages are placed by fractions of the same run. With a time budget (`minutes=`), "the run" is the clock, so
# the cosine ends exactly when the budget does; with `steps=` it is the step count (and resuming is bit-exact).

# %%
import matplotlib.pyplot as plt

schedule = parse_dsa_schedule("dense:0.8,warmup:0.05,sparse:0.15")
p = torch.linspace(0, 1, 400).tolist()
fig, ax = plt.subplots(figsize=(7, 2.6))
ax.plot(p, [lr_factor(x, 0.05, 0.1) for x in p], color="black")
for stage, color in (("warmup", "tab:orange"), ("sparse", "tab:purple")):
    xs = [x for x in p if stage_at(schedule, x) == stage]
    ax.axvspan(xs[0], xs[-1], color=color, alpha=0.15, label=f"DSA {stage}")
ax.set(xlabel="progress of the run", ylabel="lr / peak lr", title="the demo's schedules")
ax.legend()
plt.show()

# %% [markdown]
# ## A short run of the classroom model
#
# `train` does all of the above in a loop, with periodic evaluation on the fixed validation windows, a JSONL log,
# and checkpoints in the released Hugging Face layout plus the training state (optimizer, scheduler, sampler and
# RNG states) so that a run can resume. Here it gets 40 seconds; `make demo` gives it about 7 minutes (its run,
# in `runs/classroom/`, is shown below when it exists). MTP trains only in the last 30% of this run: its three
# depths more than double the cost of a step on a CPU, and the LM is what we measure.

# %%
run_dir = Path(tempfile.mkdtemp()) / "classroom"
result = train("classroom", run_dir, minutes=0.67, batch_size=8, seq_len=SEQ_LEN, lr=2e-3,
               dsa_stage="dense:0.7,warmup:0.1,sparse:0.2", mtp_start=0.7, num_evals=4, eval_windows_n=16,
               checkpoint_minutes=0, progress=False)
print(f"{result.step} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f} s; validation "
      f"{result.final_eval['loss']:.3f} nats/token = {result.final_eval['bpb']:.3f} bits/byte (uniform {uniform:.3f})")
print(sorted(os.listdir(result.checkpoint)))
log = result.log
steps = [r for r in log if r["kind"] == "step"]
print("first steps:", [(r["step"], r["stage"], round(r["loss"], 3)) for r in steps[:3]])
print("last steps: ", [(r["step"], r["stage"], round(r["loss"], 3), round(r.get("indexer_loss", 0), 4),
                        round(r.get("mtp_loss", 0), 3)) for r in steps[-3:]])

# %%
plot_training(log, str(FIGURES / "06_notebook_loss.png"), uniform=uniform, title="40 seconds of classroom GLM-5")
plot_expert_load(log, str(FIGURES / "06_notebook_expert_load.png"), title="tokens per expert / mean load")
from IPython.display import Image, display

display(Image(str(FIGURES / "06_notebook_loss.png")), Image(str(FIGURES / "06_notebook_expert_load.png")))

# %% [markdown]
# The heat maps show the aux-loss-free balancing at work: a fresh router sends tokens unevenly (dark cells); each
# step nudges the bias of every overloaded expert down and every underloaded one up by $\gamma$, and the load
# evens out without a gradient ever touching the bias.
#
# ## Samples
#
# A model trained for 40 seconds has learned the surface of Python (indentation, `self.`, colons, common names),
# not much more. `make demo`'s seven minutes go further.

# %%
model = GLM5ForCausalLM.from_pretrained(result.checkpoint).eval()
set_dsa_stage(model, "sparse")  # the indexer was trained: attend over its top-k, as GLM-5 does
# a prompt ends where a line's text starts: "\n" + indentation is ONE token of this tokenizer
prompts = ("class Point:\n    def __init__(self", "import os\n\n\ndef list_files(path):\n    ")
for prompt in prompts:
    print(repr(prompt + complete(model, prompt, max_new_tokens=24)))
print(repr(prompts[1] + complete(model, prompts[1], 24, temperature=0.8, seed=0)))

# %% [markdown]
# DSA is meant to be (almost) lossless: the same model, evaluated with dense attention and with the indexer's
# top-128 keys per query (our windows are 256 long, so half the keys are dropped for the later queries):

# %%
sparse_eval = evaluate(model, windows)
set_dsa_stage(model, "dense")
dense_eval = evaluate(model, windows)
print(f"bits/byte: dense attention {dense_eval['bpb']:.4f}, top-128 DSA {sparse_eval['bpb']:.4f}")

# %% [markdown]
# ## The whole recipe: the shipped classroom-base model
#
# Forty seconds show the mechanics. The project also ships the classroom GLM-5 trained by GLM-5's own
# pre-training recipe for about two hours (`python -m glm5_ref recipe base`, glm5_ref/apps/recipe.py):
# pre-training at 256 tokens with Muon Split and MTP over 3 depths from the start, mid-training at 1,024 tokens
# on long documents packed with related files, the indexer's dense warm-up with everything else frozen, and
# sparse adaptation. Its validation curve, stage by stage, from its model card:

# %%
from glm5_ref.pretrained import load_pretrained, read_metrics

card = read_metrics("classroom-base")
fig, ax = plt.subplots(figsize=(8, 3.5))
for stage in card["recipe"]["stages"]:
    pts = [r for r in card["curve"] if r["stage_name"] == stage["name"]]
    ax.plot([r["tokens_total"] / 1e6 for r in pts], [r["val_bpb"] for r in pts], "o-", ms=3, label=stage["name"])
ax.set(xlabel="tokens trained (millions)", ylabel="validation bits per byte", title="classroom-base, the recipe")
ax.legend()
fig.tight_layout()
fig.savefig(FIGURES / "06_recipe_curve.png", dpi=110)
plt.close(fig)
display(Image(str(FIGURES / "06_recipe_curve.png")))
shipped, _ = load_pretrained("classroom-base")
print(f"{card['recipe']['tokens']:,} tokens; test {card['test_bpb']:.3f} bits/byte")
prompt = "def fibonacci(n):\n    "
print(repr(prompt + complete(shipped, prompt, 48)))

# %% [markdown]
# ## Checks

# %%
first = sum(r["lm_loss"] for r in steps[:3]) / 3
last = sum(r["lm_loss"] for r in steps[-3:]) / 3
print(f"LM loss: first steps {first:.3f}, last steps {last:.3f}")
assert last < first - 0.5, (first, last)
assert math.isfinite(result.final_eval["bpb"]) and result.final_eval["bpb"] < uniform
assert math.isfinite(dense_eval["bpb"]) and math.isfinite(sparse_eval["bpb"])
print("loss went down; validation bits/byte finite and below the uniform guess")
