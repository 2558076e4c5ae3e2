# %% [markdown]
# # 04 · Assembling GLM-5
#
# **Prerequisites:** notebook 00 (the parameter count, the meta device), 00a (RMSNorm, SwiGLU, RoPE),
# 01 (MLA: the latent cache, the decoupled rotary key, absorption), 02 (DSA: the lightning indexer and
# top-k), 03 (the sigmoid router, the expert bias, the shared expert, the routed scaling factor).
# **Reading time:** about 30 minutes (it runs in about 10 s under make test, 2 cores).
#
# Notebooks 01-03 built the three components of a GLM-5 layer: MLA attention, the DSA indexer that picks
# each query's keys, and the sigmoid-routed mixture of experts. This notebook stacks them into one layer and
# then into the model:
#
# 1. one decoder layer rebuilt from scratch with torch and einops, and checked against `glm5_ref`;
# 2. the parameters of the model actually built, component by component, against the config arithmetic;
# 3. a forward pass, the loss, and cached generation (exact, not approximate);
# 4. the real GLM-5's shapes on the meta device;
# 5. the same logits as an independent implementation (Hugging Face transformers);
# 6. checkpoints in the released layout.
#
# ```
# x = Emb(ids)
# for each of the 78 layers:
#     x = x + DSAAttention(RMSNorm(x))     # MLA over the indexer's top-k keys
#     x = x + FFN(RMSNorm(x))              # dense SwiGLU in layers 0-2, MoE in layers 3-77
# logits = lm_head(RMSNorm(x))             # untied from Emb
# ```

# %%
import dataclasses
import json
import math
import os
import tempfile

import torch
from einops import einsum, rearrange

from glm5_ref.apps.diagrams.overview import decoder_layer
from glm5_ref.apps.figures import show_figure, show_saved
from glm5_ref.block import DecoderLayer
from glm5_ref.config import GLM5Config
from glm5_ref.execution import Execution
from glm5_ref.model import GLM5ForCausalLM

glm5 = GLM5Config.glm5()
show_figure(decoder_layer(glm5), "04_decoder_layer.png")
print(f"GLM-5: {glm5.first_k_dense_replace} dense layers, then {glm5.num_moe_layers} MoE layers "
      f"({glm5.n_routed_experts} routed experts, top-{glm5.num_experts_per_tok}, {glm5.n_shared_experts} shared)")

# %% [markdown]
# ## One layer, from scratch (derivation)
#
# The layer of the figure, written out with torch and einops only: RMSNorm; MLA in its *expanded* form
# (every key and value rebuilt per head from the latent, as in training and prefill; notebook 01); the
# sigmoid router (scores $s_e = \sigma(u \cdot w_e)$, the bias $b_e$ added for the *choice* of the top-$K$
# only, the weights of the chosen experts taken from the unbiased scores, normalised to sum to 1 and
# multiplied by the routed scaling factor; notebook 03); SwiGLU experts and the shared expert. Attention is
# dense here: with at most `index_topk` tokens every query's causal keys fit in DSA's budget, so DSA attends
# to all of them and the indexer changes nothing (notebook 02); the package's layer is also called with
# `Execution(sparse=False)`, which switches the top-k selection off.
#
# The weights are passed in as the layer's `state_dict()`: a dict from the released checkpoint's parameter
# names (`self_attn.q_a_proj.weight`, `mlp.experts.7.up_proj.weight`, ...) to tensors. A `nn.Linear`
# weight is stored as (out, in), hence the `.T`.

# %%
# derivation: one GLM-5 decoder layer (MoE, dense attention), torch and einops only
def rms_norm(x, gain, eps):
    """x / sqrt(mean(x^2) + eps) * gain, computed in fp32."""
    xf = x.float()
    return gain * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, positions, theta):
    """Rotate the pairs (2j, 2j+1) of the last dim of x (B, T, H, D) by the angle position * theta^(-2j/D)."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angle = positions.double()[:, None] * inv_freq  # (T, D/2)
    cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]  # (T, 1, D/2): same for every head
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def mla_expanded(x, w, c):
    """Causal MLA, keys and values expanded per head: x (B, T, d) -> (B, T, d). w: the layer's state dict."""
    H, N, P, C = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank
    T = x.shape[1]
    pos = torch.arange(T)
    c_q = rms_norm(x @ w["self_attn.q_a_proj.weight"].T, w["self_attn.q_a_layernorm.weight"], c.rms_norm_eps)
    q = rearrange(c_q @ w["self_attn.q_b_proj.weight"].T, "b t (h e) -> b t h e", h=H)  # (B, T, H, N + P)
    q = torch.cat([q[..., :N], rope(q[..., N:], pos, c.rope_theta)], dim=-1)
    kv_a = x @ w["self_attn.kv_a_proj_with_mqa.weight"].T  # (B, T, C + P)
    c_kv = rms_norm(kv_a[..., :C], w["self_attn.kv_a_layernorm.weight"], c.rms_norm_eps)  # (B, T, C): cached
    k_rope = rope(kv_a[..., None, C:], pos, c.rope_theta)  # (B, T, 1, P): cached, one for all heads
    kv = rearrange(c_kv @ w["self_attn.kv_b_proj.weight"].T, "b s (h f) -> b s h f", h=H)  # (B, T, H, N + V)
    k = torch.cat([kv[..., :N], k_rope.expand(-1, -1, H, -1)], dim=-1)  # (B, T, H, N + P)
    v = kv[..., N:]  # (B, T, H, V)
    scores = einsum(q, k, "b t h e, b s h e -> b h t s") * (N + P) ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.float().masked_fill(~causal, float("-inf")).softmax(dim=-1).to(v.dtype)
    out = einsum(probs, v, "b h t s, b s h v -> b t h v")
    return rearrange(out, "b t h v -> b t (h v)") @ w["self_attn.o_proj.weight"].T


def sigmoid_router(u, w_gate, bias, k, scale):
    """u (N, d) -> the k chosen experts (N, k) and their weights (N, k)."""
    scores = torch.sigmoid(u.float() @ w_gate.float().T)  # (N, E): independent affinities in (0, 1)
    chosen = (scores + bias).topk(k, dim=-1).indices  # the bias moves the choice ...
    g = scores.gather(1, chosen)  # ... the weights use the unbiased scores
    return chosen, g / g.sum(-1, keepdim=True) * scale


def swiglu(x, w_gate, w_up, w_down):
    g = x @ w_gate.T
    return (g * torch.sigmoid(g) * (x @ w_up.T)) @ w_down.T  # SiLU(g) = g * sigmoid(g)


def moe(x, w, c):
    """Routed experts + shared expert: x (B, T, d) -> (B, T, d)."""
    u = rearrange(x, "b t d -> (b t) d")
    chosen, weight = sigmoid_router(u, w["mlp.gate.weight"], w["mlp.gate.e_score_correction_bias"],
                                    c.num_experts_per_tok, c.routed_scaling_factor)
    y = torch.zeros_like(u)
    for e in range(c.n_routed_experts):
        tok, slot = torch.where(chosen == e)  # the tokens that chose expert e, and in which of their k slots
        p = f"mlp.experts.{e}."
        y[tok] += weight[tok, slot, None].to(u.dtype) * swiglu(u[tok], w[p + "gate_proj.weight"],
                                                               w[p + "up_proj.weight"], w[p + "down_proj.weight"])
    y = y + swiglu(u, w["mlp.shared_experts.gate_proj.weight"], w["mlp.shared_experts.up_proj.weight"],
                   w["mlp.shared_experts.down_proj.weight"])
    return rearrange(y, "(b t) d -> b t d", b=x.shape[0])


def decoder_layer_by_hand(x, w, c):
    """x (B, T, d) -> (B, T, d): pre-norm MLA + residual, pre-norm MoE + residual."""
    h = x + mla_expanded(rms_norm(x, w["input_layernorm.weight"], c.rms_norm_eps), w, c)
    return h + moe(rms_norm(h, w["post_attention_layernorm.weight"], c.rms_norm_eps), w, c)


# %% [markdown]
# The package's layer 1 of the classroom config (an MoE layer: 32 routed experts, top-4, one shared expert)
# with random weights, and a random expert bias so that the bias really changes some choices. The weights
# are copied out of it once; the derivation never calls a `glm5_ref` module.

# %%
classroom = GLM5Config.classroom()
torch.manual_seed(0)
layer = DecoderLayer(classroom, layer_idx=1).eval()
assert layer.is_moe
with torch.no_grad():
    layer.mlp.gate.e_score_correction_bias.copy_(0.01 * torch.randn(classroom.n_routed_experts))
weights = {name: t.detach().clone() for name, t in layer.state_dict().items()}
print(f"{len(weights)} tensors copied, e.g.", [n for n in weights if not n.startswith("mlp.experts.")][:6])

x = torch.randn(2, 24, classroom.hidden_size)
assert x.shape[1] <= classroom.index_topk  # dense attention: every causal key fits DSA's budget
with torch.no_grad():
    by_hand = decoder_layer_by_hand(x, weights, classroom)
    package = layer(x, execution=Execution(sparse=False)).hidden
rel = ((by_hand - package).norm() / package.norm()).item()
print(f"layer 1 by hand vs glm5_ref.block.DecoderLayer: relative error {rel:.1e}")

# %% [markdown]
# The bias matters only for the choice. Without it, some tokens would pick other experts; the weights of the
# experts a token does pick come from the unbiased scores either way:

# %%
with torch.no_grad():
    u = rearrange(rms_norm(x + mla_expanded(rms_norm(x, weights["input_layernorm.weight"], classroom.rms_norm_eps),
                                            weights, classroom),
                           weights["post_attention_layernorm.weight"], classroom.rms_norm_eps), "b t d -> (b t) d")
    args = (weights["mlp.gate.weight"], classroom.num_experts_per_tok, classroom.routed_scaling_factor)
    with_bias, _ = sigmoid_router(u, args[0], weights["mlp.gate.e_score_correction_bias"], *args[1:])
    no_bias, _ = sigmoid_router(u, args[0], torch.zeros(classroom.n_routed_experts), *args[1:])
changed = sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(with_bias, no_bias))
print(f"{changed} of {len(u)} tokens choose a different set of experts because of the bias")

# %% [markdown]
# ## Counting the tiny model's parameters
#
# Notebook 00 counted GLM-5's parameters from the config alone. The same arithmetic must match the modules
# actually built, component by component (the two latent norms inside MLA count as attention). The tiny
# config (a few thousand parameters, every feature on) is used from here on.

# %%
def count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


config = GLM5Config.tiny()
torch.manual_seed(0)
model = GLM5ForCausalLM(config)
layers = model.model.layers
built = {
    "embedding": model.model.embed_tokens.weight.numel(),
    "attention": sum(count([l.self_attn]) - count([l.self_attn.indexer]) for l in layers),
    "indexer": count([l.self_attn.indexer for l in layers]),
    "norms": count([n for l in layers for n in (l.input_layernorm, l.post_attention_layernorm)] + [model.model.norm]),
    "dense_ffn": count([l.mlp for l in layers if not l.is_moe]),
    "router": count([l.mlp.gate for l in layers if l.is_moe]),
    "routed_experts": count([l.mlp.experts for l in layers if l.is_moe]),
    "shared_experts": count([l.mlp.shared_experts for l in layers if l.is_moe]),
    "lm_head": model.lm_head.weight.numel(),
}
arithmetic = config.param_breakdown()
for key, n in built.items():
    print(f"{key:16s} built {n:>8,}   config arithmetic {arithmetic[key]:>8,}")
    assert n == arithmetic[key], key
main = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
assert main == config.num_params()
mtp = sum(p.numel() for p in model.mtp.parameters())
print(f"without the MTP layer: {main:,}; the MTP layer (notebook 05) adds {mtp:,}: "
      f"{config.num_params(include_mtp=True):,} in all")
assert main + mtp == config.num_params(include_mtp=True)

# %% [markdown]
# ## A forward pass, a loss, and cached generation
#
# `model(ids, labels=ids)` returns logits, the next-token loss (labels are shifted inside, as in
# transformers) plus the MoE balance loss, the last hidden states (the MTP module of notebook 05 reads them)
# and the tokens each expert received (the aux-loss-free bias update of notebook 03 consumes them). At
# initialisation the loss is close to $\ln V$, the loss of a uniform guess over the $V$ tokens.
#
# Generation keeps, per layer, MLA's latent cache and the indexer's key cache, and runs the absorbed
# attention path: one new token costs one pass over the cache instead of a whole forward.

# %%
ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
out = model(ids, labels=ids)
print(f"logits {tuple(out.logits.shape)}, lm loss {out.lm_loss.item():.3f} (ln V = {math.log(config.vocab_size):.3f}), "
      f"balance loss {out.balance_loss.item():.2e}")
print("tokens per expert, MoE layer 1:", out.tokens_per_expert[0].tolist())

prompt = ids[:, :5]
cached = model.generate(prompt, 10)
uncached = model.generate(prompt, 10, use_cache=False)
print(cached.tolist())
assert torch.equal(cached, uncached)

# %% [markdown]
# The cache is exact, not an approximation: decoding token by token through it reproduces the logits of
# one full forward over the same sequence (in float64, to a relative error printed below).

# %%
with torch.no_grad():
    full = model.double()(ids).logits
    cache = model.new_cache(2, 12)
    steps = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                        for t in range(4, 12)]
err = ((torch.cat(steps, 1) - full).norm() / full.norm()).item()
print(f"cached vs full forward, relative error {err:.1e}")
assert err < 1e-6
model = model.float()

# %% [markdown]
# ## The real GLM-5 on the meta device
#
# The meta device holds shapes without memory, so the full model can be built to inspect its structure.
# Building all 78 layers takes a while in Python because of the number of modules (computed below: every
# routed expert is a SwiGLU of three Linear layers). Here we build the first 4 layers at full width
# (3 dense + 1 MoE), count each, and extrapolate to 78 layers, as notebook 00's check does.

# %%
routed = glm5.num_moe_layers * glm5.n_routed_experts
print(f"{glm5.num_moe_layers} MoE layers x {glm5.n_routed_experts} routed experts = {routed:,} routed experts, "
      f"x 3 Linear layers each = {3 * routed:,} expert Linear layers")
with torch.device("meta"):
    four = GLM5ForCausalLM(dataclasses.replace(glm5, num_hidden_layers=4))
per_layer = [sum(p.numel() for p in l.parameters()) for l in four.model.layers]
for i, n in enumerate(per_layer):
    kind = "MoE  " if four.model.layers[i].is_moe else "dense"
    print(f"layer {i} ({kind}): {n:>15,} parameters")
ends = four.model.embed_tokens.weight.numel() + four.lm_head.weight.numel() + four.model.norm.weight.numel()
total = ends + glm5.first_k_dense_replace * per_layer[0] + glm5.num_moe_layers * per_layer[3]
print(f"{glm5.first_k_dense_replace} dense + {glm5.num_moe_layers} MoE layers + embedding, head, final norm "
      f"= {total:,} (without the MTP layer)")
assert total == glm5.num_params() == 743_911_199_232
assert len(four.model.layers[3].mlp.experts) * glm5.num_moe_layers == routed == 19_200

# %% [markdown]
# (`tests/test_model.py` also builds all 78 layers on the meta device and checks the same count.)
#
# ## Checked against Hugging Face transformers
#
# Hugging Face `transformers` is the library most released checkpoints are run with; its
# `GlmMoeDsaForCausalLM` is an independent implementation of the same checkpoint format. It keeps the
# experts of a layer fused in memory (`gate_up_proj` of shape (E, 2I, d) and `down_proj` of shape
# (E, d, I)); `to_transformers_layout` converts our per-expert tensors. One difference we must bridge:
# transformers builds the two MLA latent norms with eps 1e-6 whatever the config says, while glm5_ref uses
# `rms_norm_eps` everywhere, so the comparison uses a config with eps 1e-6. Sequences longer than
# `index_topk` make both models select keys with their indexers.

# %%
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice when transformers imports it
import transformers

from glm5_ref.hf_io import to_transformers_layout

oracle_config = dataclasses.replace(config, rms_norm_eps=1e-6, index_n_heads=8, index_head_dim=8, index_topk=6)
torch.manual_seed(1)
ours = GLM5ForCausalLM(oracle_config).eval()
hf_config = transformers.GlmMoeDsaConfig(**{k: v for k, v in oracle_config.to_hf().items()
                                             if k not in ("architectures", "model_type")})
hf_config._attn_implementation, hf_config._experts_implementation = "eager", "eager"
theirs = transformers.GlmMoeDsaForCausalLM(hf_config).eval()
theirs.load_state_dict(to_transformers_layout(ours.hf_state_dict(), oracle_config.num_hidden_layers), strict=True)

hf_errors = {}
for T in (5, 24):
    ids = torch.randint(0, oracle_config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    hf_errors[T] = ((a - b).norm() / b.norm()).item()
    print(f"T = {T:2d} ({'dense' if T <= oracle_config.index_topk else 'sparse'} attention): "
          f"relative error {hf_errors[T]:.1e}")
    assert hf_errors[T] < 1e-4

# %% [markdown]
# ## Checkpoints in the released layout
#
# `save_pretrained` writes `config.json`, the tensors in *safetensors* shards and the shard index, exactly
# the layout of the released checkpoint. safetensors is Hugging Face's file format for tensors: a JSON header
# giving each tensor's name, dtype, shape and byte range, followed by the raw bytes, so that loading reads
# data and never runs code (unlike Python's pickle). `from_pretrained` builds the model on the meta device
# and takes the tensors shard by shard. The round trip is bit-exact.

# %%
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, max_shard_bytes=50_000)
    print(sorted(os.listdir(tmp)))
    loaded = GLM5ForCausalLM.from_pretrained(tmp)
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
assert torch.equal(loaded.generate(prompt, 10), cached)
print("round trip: bit-exact weights, identical generation")

# %% [markdown]
# ## Out of the checkpoint: quantized deployment
#
# The released checkpoint is also the start of deployment. GLM-5 serves with W4A8 (paper section 5: 4-bit
# weights for the routed experts, 8-bit activations) and trains the experts with INT4 quantization-aware
# training (section 2.4.3). `python -m glm5_ref experiment quantization` applies each scheme of
# `glm5_ref/quant.py` to the shipped classroom model and measures what it costs in bits per byte on held-out
# code; its results are committed in `figures/quantization.json`, read here:

# %%
with open("../figures/quantization.json") as f:
    quant = json.load(f)
print(f"{'scheme':>28} {'bits/byte':>10} {'delta':>9} {'top-1 agreement':>16}")
for row in quant["rows"]:
    print(f"{row['scheme']:>28} {row['bits_per_byte']:10.4f} {row['delta_bits_per_byte']:+9.4f} "
          f"{row['top1_agreement']:16.3f}")
qat = quant["qat"]
print(f"INT4 QAT vs quantizing after the same fine-tune: {qat['qat_bits_per_byte']:.4f} vs "
      f"{qat['finetune_then_ptq_bits_per_byte']:.4f} bits/byte")
show_saved("quantization.png")

# %% [markdown]
# ## The check
#
# The layer written from scratch must equal the package's layer on a fresh input: the same experts chosen
# for every token, and outputs equal to a relative error of $10^{-5}$ (float32 rounding; the two compute the
# same sums in different orders). The bias must have changed some token's choice, or the test would not
# exercise it.

# %%
# check: the derivation's decoder layer == glm5_ref.block.DecoderLayer (MoE layer, dense attention)
x2 = torch.randn(3, 40, classroom.hidden_size, generator=torch.Generator().manual_seed(7))
with torch.no_grad():
    ours_out = decoder_layer_by_hand(x2, weights, classroom)
    res = layer(x2, execution=Execution(sparse=False))
    h = x2 + mla_expanded(rms_norm(x2, weights["input_layernorm.weight"], classroom.rms_norm_eps), weights, classroom)
    chosen, gate_weight = sigmoid_router(rearrange(rms_norm(h, weights["post_attention_layernorm.weight"],
                                                            classroom.rms_norm_eps), "b t d -> (b t) d"),
                                         weights["mlp.gate.weight"], weights["mlp.gate.e_score_correction_bias"],
                                         classroom.num_experts_per_tok, classroom.routed_scaling_factor)
rel2 = ((ours_out - res.hidden).norm() / res.hidden.norm()).item()
print(f"relative error {rel2:.1e} (and {rel:.1e} on the first input)")
assert rel < 1e-5 and rel2 < 1e-5
package_chosen = res.moe_aux.topk_idx.reshape(-1, classroom.num_experts_per_tok)
assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(chosen, package_chosen))
assert torch.allclose(gate_weight.sort(-1).values, res.moe_aux.topk_weight.reshape(chosen.shape).sort(-1).values,
                      rtol=1e-5, atol=1e-6)
assert changed > 0
print(f"same experts for all {len(chosen)} tokens; {changed} tokens of the first input were moved by the bias")

# %% [markdown]
# ## Exercises
#
# 1. Give expert 5 of the layer a bias of +10. Predict which tokens choose it, and whether its weight in
#    each token's mix depends on the +10; then check with `sigmoid_router` and the package's router
#    (`layer.mlp.gate`).
# 2. GLM-5 makes its first 3 layers dense. Predict how the total parameter count changes if only the first
#    layer were dense (`first_k_dense_replace = 1`), then check with `GLM5Config.num_params`.
# 3. Derive how many `nn.Linear` modules GLM-5 has (the 78 layers, the LM head and the MTP layer; the router
#    is a plain parameter, not a Linear), check the formula on the 4-layer meta model `four`, and print the
#    full model's number.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
bias = weights["mlp.gate.e_score_correction_bias"].clone()
bias[5] += 10.0
u1 = torch.randn(16, classroom.hidden_size, generator=torch.Generator().manual_seed(3))
ch, wt = sigmoid_router(u1, weights["mlp.gate.weight"], bias, classroom.num_experts_per_tok,
                        classroom.routed_scaling_factor)
assert (ch == 5).any(-1).all()  # every token chooses expert 5 ...
scores = torch.sigmoid(u1 @ weights["mlp.gate.weight"].T)
expected = scores.gather(1, ch) / scores.gather(1, ch).sum(-1, keepdim=True) * classroom.routed_scaling_factor
assert torch.allclose(wt, expected)  # ... with a weight from its unbiased score: the +10 never enters it
with torch.no_grad():
    layer.mlp.gate.e_score_correction_bias.copy_(bias)
    idx, w_pkg, _ = layer.mlp.gate(u1)
    layer.mlp.gate.e_score_correction_bias.copy_(weights["mlp.gate.e_score_correction_bias"])
assert (idx == 5).any(-1).all() and torch.allclose(w_pkg.sort(-1).values, wt.sort(-1).values, atol=1e-6)
print("expert 5 chosen by all 16 tokens; its weights:", [round(v, 3) for v in wt[ch == 5].tolist()[:6]], "...")

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
c, d = GLM5Config.glm5(), GLM5Config.glm5().hidden_size
moe_ffn = c.n_routed_experts * d + (c.n_routed_experts + c.n_shared_experts) * 3 * d * c.moe_intermediate_size
dense_ffn = 3 * d * c.intermediate_size
prediction = c.num_params() + 2 * (moe_ffn - dense_ffn)
print(f"each layer turned MoE adds {(moe_ffn - dense_ffn) / 1e9:.2f}B: {prediction:,} in all")
assert dataclasses.replace(c, first_k_dense_replace=1).num_params() == prediction

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
def n_linear(c):
    per_layer = 5 + 3  # MLA: q_a, q_b, kv_a, kv_b, o; indexer: wq_b, wk, weights_proj
    moe_ffn = 3 * c.n_routed_experts + 3  # routed experts and the shared expert
    mtp = 1 + per_layer + moe_ffn  # eh_proj and one MoE block
    return c.num_hidden_layers * per_layer + c.first_k_dense_replace * 3 + c.num_moe_layers * moe_ffn + 1 + mtp


counted = sum(isinstance(m, torch.nn.Linear) for m in four.modules())
assert counted == n_linear(four.config), (counted, n_linear(four.config))
print(f"4-layer model: {counted:,} Linear modules; GLM-5: {n_linear(glm5):,}")
