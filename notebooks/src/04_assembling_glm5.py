# %% [markdown]
# # 04 · Assembling GLM-5
#
# Notebooks 01-03 built the three components of a GLM-5 layer: MLA attention, the DSA indexer that picks
# each query's keys, and the sigmoid-routed mixture of experts. This notebook stacks them into the model,
# checks that it computes exactly what the released checkpoint means (against Hugging Face transformers'
# `GlmMoeDsaForCausalLM`), and reads and writes checkpoints in the released layout.
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
import os
import tempfile

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM

torch.manual_seed(0)
config = GLM5Config.tiny()
model = GLM5ForCausalLM(config)
print(model.model.layers[1])

# %% [markdown]
# ## One layer, by hand (derivation)
#
# A decoder layer is two residual branches. We rebuild layer 1 (an MoE layer of the tiny config) from the
# components with its own weights, and compare with the package's layer.

# %%
# derivation: a pre-norm block from the pieces of notebooks 01-03
layer = model.model.layers[1]
x = torch.randn(2, 7, config.hidden_size)
with torch.no_grad():
    h = x + layer.self_attn(layer.input_layernorm(x))
    by_hand = h + layer.mlp(layer.post_attention_layernorm(h))
    package, _, _ = layer(x)
assert torch.equal(by_hand, package)
print("layer 1 by hand == glm5_ref.model.DecoderLayer")

# %% [markdown]
# ## Counting the tiny model's parameters
#
# Notebook 00 counted GLM-5's parameters from the config alone. The same arithmetic must match the modules
# actually built, component by component (the two latent norms inside MLA count as attention).

# %%
def count(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


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
print(f"plus the MTP layer (notebook 05): {mtp:,} = config.num_params(include_mtp=True) - config.num_params()")
assert main + mtp == config.num_params(include_mtp=True)

# %% [markdown]
# ## A forward pass, a loss, and cached generation
#
# `model(ids, labels=ids)` returns logits, the next-token loss (labels are shifted inside, as in
# transformers) plus the MoE balance loss, the last hidden states (the MTP module of notebook 05 reads them)
# and the tokens each expert received (the aux-loss-free bias update of notebook 03 consumes them).
#
# Generation keeps, per layer, MLA's 576-style latent cache and the indexer's key cache, and runs the
# absorbed attention path: one new token costs one pass over the cache instead of a whole forward.

# %%
ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
out = model(ids, labels=ids)
print(f"logits {tuple(out.logits.shape)}, lm loss {out.lm_loss.item():.3f} (ln V = {torch.log(torch.tensor(256.)).item():.3f}), "
      f"balance loss {out.balance_loss.item():.2e}")
print("tokens per expert, MoE layer 1:", out.tokens_per_expert[0].tolist())

prompt = ids[:, :5]
cached = model.generate(prompt, 10)
uncached = model.generate(prompt, 10, use_cache=False)
print(cached.tolist())
assert torch.equal(cached, uncached)

# %% [markdown]
# The cache is exact, not an approximation: decoding token by token through it reproduces the logits of
# one full forward over the same sequence.

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
# Building all 78 layers takes a while in Python (57,600 expert modules), so we build the first 4 layers at
# full width (3 dense + 1 MoE), count each, and extrapolate to 78 layers.

# %%
glm5 = GLM5Config.glm5()
with torch.device("meta"):
    four = GLM5ForCausalLM(dataclasses.replace(glm5, num_hidden_layers=4))
per_layer = [sum(p.numel() for p in l.parameters()) for l in four.model.layers]
for i, n in enumerate(per_layer):
    kind = "MoE  " if four.model.layers[i].is_moe else "dense"
    print(f"layer {i} ({kind}): {n:>15,} parameters")
ends = four.model.embed_tokens.weight.numel() + four.lm_head.weight.numel() + four.model.norm.weight.numel()
total = ends + 3 * per_layer[0] + 75 * per_layer[3]
print(f"3 dense + 75 MoE layers + embedding, head, final norm = {total:,}")
assert total == glm5.num_params() == 743_911_199_232

# %% [markdown]
# (`tests/test_model.py` builds all 78 layers on the meta device and checks the same count.)
#
# ## Checked against Hugging Face transformers
#
# transformers' `GlmMoeDsaForCausalLM` is an independent implementation of the same checkpoint format.
# It keeps the experts of a layer fused in memory (`gate_up_proj` of shape (E, 2I, d) and `down_proj` of
# shape (E, d, I)); `to_transformers_layout` converts our per-expert tensors. One difference we must bridge:
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

for T in (5, 24):
    ids = torch.randint(0, oracle_config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    err = ((a - b).norm() / b.norm()).item()
    print(f"T = {T:2d} ({'dense' if T <= oracle_config.index_topk else 'sparse'} attention): relative error {err:.1e}")
    assert err < 1e-4

# %% [markdown]
# ## Checkpoints in the released layout
#
# `save_pretrained` writes `config.json`, the tensors in safetensors shards and the shard index, exactly the
# layout of the released checkpoint; `from_pretrained` builds the model on the meta device and takes the
# tensors shard by shard. The round trip is bit-exact.

# %%
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, max_shard_bytes=50_000)
    print(sorted(os.listdir(tmp)))
    loaded = GLM5ForCausalLM.from_pretrained(tmp)
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
assert torch.equal(loaded.generate(prompt, 10), cached)
print("round trip: bit-exact weights, identical generation")
