# %% [markdown]
# # 00a · Foundations: tokens, RMSNorm, SwiGLU and RoPE
#
# **Prerequisites:** notebook 00 (GLM-5 at a glance: the configuration and the decoder block) and basic PyTorch
# (tensors, `nn.Linear`, matrix products). **Reading time:** about 30 minutes (it runs in about 10 s under make test, 2 cores).
#
# Notebook 00 drew GLM-5's decoder block as
# $x \leftarrow x + \mathrm{Attn}(\mathrm{RMSNorm}(x))$, $x \leftarrow x + \mathrm{FFN}(\mathrm{RMSNorm}(x))$,
# fed by token embeddings. Four pieces of that picture are standard parts of almost every modern language model,
# and the later notebooks use them without deriving them again:
#
# 1. **the tokenizer**, which turns text into the integer ids the model reads (byte-level BPE);
# 2. **RMSNorm**, the normalisation in front of every attention and feed-forward block;
# 3. **SwiGLU**, the gated feed-forward network of the dense layers and of every expert;
# 4. **RoPE**, the rotation that tells attention where each token sits.
#
# Each part is derived from first principles in cells that start with `# derivation` (only `torch`, `einops`
# and plain Python) and then compared with the package `glm5_ref`, which the other notebooks build on.

# %%
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import regex  # the regular-expression engine tiktoken's pattern needs (installed with tiktoken)
import torch
import torch.nn.functional as F
from einops import rearrange

from glm5_ref import tokenizer as tok
from glm5_ref.apps.figures import show_figure
from glm5_ref.config import GLM5Config
from glm5_ref.layers import RMSNorm, SwiGLU, apply_rope, interleaved_to_half_split, rope_angles
from glm5_ref.pretrained import load_pretrained

torch.manual_seed(0)
glm5, classroom = GLM5Config.glm5(), GLM5Config.classroom()
model, enc = load_pretrained("classroom-base")  # the shipped classroom model (notebook 00) and its tokenizer
train_docs, heldout_docs = tok.corpus_split(0.1, 0)  # the split the project's tokenizer was trained on
print(f"shipped corpus: {len(train_docs)} training documents, {len(heldout_docs)} held-out documents "
      f"({sum(len(t) for _, t in heldout_docs):,} characters held out)")

# %% [markdown]
# ## 1. Tokenization: from bytes to ids
#
# A language model reads integers. The simplest faithful encoding of text is its UTF-8 bytes: 256 possible ids,
# and any string at all (code, Chinese, emoji) can be written with them, so nothing is ever "unknown". The price
# is length: a byte per id makes sequences long, and attention's cost grows with the length.
#
# **Byte-pair encoding** (BPE; Sennrich et al. 2016, byte-level as in GPT-2) shortens them by learning new ids
# for frequent byte strings. Training repeats one step: count every adjacent pair of ids in the training text,
# take the most frequent pair $(a, b)$, give it the next free id $c$, and replace every occurrence of $a\,b$ by
# $c$. After $M$ merges the vocabulary has $256 + M$ ids. The figure of merit is the **compression**, in bytes
# per token: the number of UTF-8 bytes of a text divided by the number of ids it becomes (1.0 before any merge).
#
# Encoding new text replays the merges **in the order they were learned**: among the pairs present, apply the
# one learned first, and repeat until no learned pair is left. Decoding concatenates each id's bytes.

# %%
# derivation: byte-level BPE, trained and used from scratch (plain Python)
def pair_counts(ids):
    """How often each adjacent pair (a, b) occurs in the list ids."""
    counts = {}
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, new_id):
    """ids with every non-overlapping occurrence of pair (left to right) replaced by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(data: bytes, num_merges: int):
    """merges {(a, b): new id} in the order learned, vocab {id: bytes}, and the training text's length in ids
    after each merge (lengths[0] = len(data))."""
    ids, merges = list(data), {}
    vocab = {i: bytes([i]) for i in range(256)}
    lengths = [len(ids)]
    for k in range(num_merges):
        counts = pair_counts(ids)
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], -p[0], -p[1]))  # most frequent; ties: smallest pair
        new_id = 256 + k
        ids = merge(ids, pair, new_id)
        merges[pair], vocab[new_id] = new_id, vocab[pair[0]] + vocab[pair[1]]
        lengths.append(len(ids))
    return merges, vocab, lengths


def bpe_encode(data: bytes, merges):
    """Replay the merges: repeatedly apply the earliest-learned pair present in the sequence."""
    ids = list(data)
    while len(ids) > 1:
        pair = min(pair_counts(ids), key=lambda p: merges.get(p, math.inf))
        if pair not in merges:
            break
        ids = merge(ids, pair, merges[pair])
    return ids


def bpe_decode(ids, vocab) -> str:
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


# %% [markdown]
# We train it on about 4 KB of the shipped Python corpus (one training document) with 128 merges, and measure
# the compression on text it has not seen (the start of a held-out document).

# %%
train_text = dict(train_docs)["__future__.py"][:4096]
heldout_text = dict(heldout_docs)["abc.py"][:4096]
NUM_TINY_MERGES = 128
merges, vocab, lengths = train_bpe(train_text.encode("utf-8"), NUM_TINY_MERGES)

print("the first 12 merges:", ", ".join(repr(vocab[256 + k].decode("utf-8")) for k in range(12)))
print("a few later ones:   ", ", ".join(repr(vocab[256 + k].decode("utf-8")) for k in range(100, 108)))
n_bytes = len(train_text.encode("utf-8"))
for m in (0, 16, 32, 64, 128):
    print(f"after {m:3d} merges: training text {n_bytes:,} bytes -> {lengths[m]:,} tokens, "
          f"{n_bytes / lengths[m]:.2f} bytes/token")
tiny_ids = bpe_encode(heldout_text.encode("utf-8"), merges)
tiny_bpt_heldout = len(heldout_text.encode("utf-8")) / len(tiny_ids)
tiny_bpt_train = n_bytes / lengths[-1]
print(f"held-out text: {tiny_bpt_heldout:.2f} bytes/token (training text: {tiny_bpt_train:.2f})")

# encoding replays training: encoding the training text gives the same number of ids training ended with
assert len(bpe_encode(train_text.encode("utf-8"), merges)) == lengths[-1]
# and decoding inverts encoding, for the held-out text and for any other string
for s in (heldout_text, "naïve café: π ≈ 3.14159 🙂", ""):
    assert bpe_decode(bpe_encode(s.encode("utf-8"), merges), vocab) == s

# %% [markdown]
# The first merges are the commonest byte pairs of Python source: runs of spaces (indentation), `e` + space,
# common letter pairs. Compression rises quickly with the first merges and then more slowly, and it is lower on
# held-out text than on the training text, since some merges fit this one file's words rather than Python's.
# Working on the raw byte stream, the tiny BPE also merges across word boundaries (`',\n        '`, `'ame '`).
#
# ### The project's tokenizer
#
# `glm5_ref/tokenizer.py` is the same algorithm at a larger scale, with one addition. Before any merge, a regular
# expression cuts the text into **chunks** (a word with its leading space, up to 3 digits, a run of punctuation,
# a newline with the indentation that follows it, other whitespace), and merges never cross a chunk boundary,
# so a token never glues the end of one word to the start of the next. Its rank file, trained by
# `scripts/train_tokenizer.py` on the 156 training documents of the shipped corpus, maps each token's bytes to
# its **rank**: the 256 bytes have ranks 0-255 and merge $k$ has rank $256 + k$. The library `tiktoken` runs
# the encoder from these ranks; the rank file ships with the package, so the tokenizer works offline.
#
# On top of the ordinary tokens sit the **special tokens**: ids for `<|endoftext|>`, the chat roles
# `<|user|>`, `<|assistant|>` ..., and the markers of GLM-5's chat template (`<think>`, `<tool_call>` ...),
# which notebook 12 uses. GLM-5's vocabulary (its `vocab_size`, printed below) is far larger than the
# classroom model's.

# %%
ranks = tok.read_ranks()
n_special = len(tok.SPECIAL_TOKEN_NAMES)
print(f"ranks: {len(ranks):,} ordinary tokens = 256 bytes + {tok.NUM_MERGES:,} merges (ids 0..{len(ranks) - 1})")
print(f"special tokens: {n_special} (ids {tok.NUM_MERGEABLE}..{tok.VOCAB_SIZE - 1}); vocabulary {enc.n_vocab:,} "
      f"= classroom vocab_size {classroom.vocab_size:,}; GLM-5's vocab_size is {glm5.vocab_size:,}")
assert len(ranks) == tok.NUM_MERGEABLE and enc.n_vocab == tok.VOCAB_SIZE == classroom.vocab_size

line = "    def __init__(self, name='x', n=12345):\n        return"
chunks = regex.findall(tok.PAT_STR, line)
print("chunks:", chunks)
print("tokens:", [enc.decode_single_token_bytes(i).decode("utf-8") for i in tok.encode(line)])

heldout_all = "".join(text for _, text in heldout_docs)
heldout_ids = tok.encode(heldout_all)
project_bpt = len(heldout_all.encode("utf-8")) / len(heldout_ids)
print(f"held-out corpus ({len(heldout_docs)} documents, {len(heldout_all.encode('utf-8')):,} bytes): "
      f"{len(heldout_ids):,} tokens, {project_bpt:.2f} bytes/token")
snippet_bpt = len(heldout_text.encode("utf-8")) / len(tok.encode(heldout_text))
print(f"the same 4 KB held-out snippet: {snippet_bpt:.2f} bytes/token with the project's "
      f"{tok.VOCAB_SIZE:,} ids, {tiny_bpt_heldout:.2f} with the tiny BPE's {256 + NUM_TINY_MERGES} ids")
print(f"a 1,024-token context holds about {1024 * project_bpt / 1e3:.1f} KB of such code")

# %% [markdown]
# On Python files it never saw, the project's tokenizer packs several bytes into each token, well above what
# the tiny BPE reaches on the same snippet; the figures, and how much code fits in a 1,024-token context (the
# classroom model's mid-training context), are printed above (KB: $10^3$ bytes).
#
# A special token is one id, and only where the caller allows special tokens: with `allow_special=False`, the
# default for data, the string `"<|user|>"` is encoded as the ordinary text it is. Since no special token's
# bytes are in the rank file, **ordinary text can never produce a special id**, so a document that happens to
# contain `<|user|>` cannot inject a chat role.

# %%
as_special = tok.encode("<|user|>", allow_special=True)
as_text = tok.encode("<|user|>")
print(f"'<|user|>' with allow_special: {as_special};  as plain text: {as_text} "
      f"= {[enc.decode_single_token_bytes(i) for i in as_text]}")
assert as_special == [tok.SPECIAL_TOKENS["<|user|>"]]
assert len(as_text) > 1 and max(as_text) < tok.NUM_MERGEABLE
for name, idx in tok.SPECIAL_TOKENS.items():
    assert tok.encode(name, allow_special=True) == [idx] and max(tok.encode(name)) < tok.NUM_MERGEABLE
    assert name.encode("utf-8") not in ranks
assert max(heldout_ids) < tok.NUM_MERGEABLE  # half a million bytes of code: not one special id

# %% [markdown]
# ### tiktoken's rule, from the ranks alone
#
# tiktoken does not store the list of merges, only the ranks. To encode a chunk it starts from the chunk's bytes
# and repeatedly joins the adjacent pair whose concatenated bytes have the **lowest rank**, until no adjacent pair
# is a token. Since a merge learned earlier has a lower rank, this is the replay rule of `bpe_encode` above,
# written in terms of bytes instead of pairs of ids. Here it is, for one chunk:

# %%
# derivation: tiktoken's encoding rule (lowest-rank adjacent pair first), from the rank table alone
def rank_encode_chunk(data: bytes, ranks: dict) -> list:
    parts = [bytes([b]) for b in data]
    while len(parts) > 1:
        joined = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
        best = min(range(len(joined)), key=joined.__getitem__)  # the leftmost pair of lowest rank
        if joined[best] == math.inf:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[p] for p in parts]


# %%
def rank_encode(text: str) -> list:
    """The project's pattern cuts the text into chunks; each chunk is encoded on its own."""
    return [i for chunk in regex.findall(tok.PAT_STR, text) for i in rank_encode_chunk(chunk.encode("utf-8"), ranks)]


tests = [line, heldout_text, "x = [i ** 2 for i in range(10)]  # squares", "naïve café 🙂\r\n\tπ"]
for s in tests:
    assert rank_encode(s) == tok.encode(s)
    assert tok.decode(tok.encode(s)) == s
print(f"the from-scratch encoder matches tiktoken on {len(tests)} strings "
      f"({sum(len(tok.encode(s)) for s in tests):,} tokens)")

# %% [markdown]
# ### The re-tokenization trap
#
# Encoding maps each text to one **canonical** id sequence, but many id sequences decode to the same text: the
# ids of `W` and `arning` decode to the same bytes as the single id of `Warning`. A model that generates samples
# one token at a time can emit such a non-canonical split. Then decoding and re-encoding the text does *not*
# give back the ids that were sampled. Below, the classroom model continues a prompt at temperature 1 (a draw
# from its full distribution), and we look for the first seed whose continuation does not survive the round
# trip.

# %%
prompt = tok.encode("def read_config(path):\n    ")
for seed in range(3, 23):
    out = model.generate(torch.tensor([prompt]), 6, temperature=1.0, seed=seed)[0, len(prompt):].tolist()
    text = tok.decode(out)
    if tok.encode(text) != out:
        break
reencoded = tok.encode(text)
print(f"seed {seed}: the model sampled {len(out)} tokens: {[enc.decode_single_token_bytes(i) for i in out]}")
print(f"decoded text {text!r} re-encodes to {len(reencoded)} tokens: "
      f"{[enc.decode_single_token_bytes(i) for i in reencoded]}")
print("sampled ids:   ", out)
print("re-encoded ids:", reencoded)
assert tok.decode(reencoded) == text and reencoded != out  # same text, different ids
w_arning = [enc.encode_single_token(b"W"), enc.encode_single_token(b"arning")]  # the split of the intro above
assert tok.decode(w_arning) == "Warning" and tok.encode("Warning") == [enc.encode_single_token(b"Warning")]

# %% [markdown]
# In reinforcement learning this matters: the policy gradient needs $\log \pi(\text{id}_t \mid \text{ids}_{<t})$
# for the ids the model actually sampled. After a decode/encode round trip those ids no longer exist (above,
# a split the model sampled became one canonical token), the sampler's log-probabilities no longer line up with
# the sequence, and the trainer would optimise actions the model never took. This is why GLM-5's RL pipeline
# passes token ids end to end, "token in, token out" (TITO; paper section 4.1.2), the subject of notebook 08.
#
# ## 2. RMSNorm
#
# Deep residual networks keep the activations entering each block at a controlled scale with a normalisation.
# **LayerNorm** (Ba et al. 2016) standardises each token's vector $x \in \mathbb{R}^d$,
#
# $$\mathrm{LayerNorm}(x) = g \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + b, \qquad
# \mu = \tfrac{1}{d}\textstyle\sum_i x_i, \quad \sigma^2 = \tfrac{1}{d}\sum_i (x_i - \mu)^2 .$$
#
# **RMSNorm** (Zhang & Sennrich 2019) drops the mean and the bias:
#
# $$\mathrm{RMSNorm}(x) = g \odot \frac{x}{\sqrt{\tfrac{1}{d}\sum_i x_i^2 + \epsilon}} .$$
#
# - **No mean subtraction.** Zhang & Sennrich argue that what LayerNorm contributes is mainly re-*scaling*
#   invariance, $\mathrm{RMSNorm}(\alpha x) = \mathrm{RMSNorm}(x)$ for every $\alpha > 0$ (while $\epsilon$ is
#   negligible), so that a block sees inputs of a fixed scale however large the residual stream grows; in their
#   experiments re-centering added little. Dropping it saves one reduction over $d$ and the bias. On a vector
#   whose mean is zero, the two norms agree exactly.
# - **$\epsilon$** (GLM-5: `rms_norm_eps` $= 10^{-5}$) keeps the division finite when $x$ is zero or tiny.
# - **The gain** $g \in \mathbb{R}^d$ is learned (initialised to ones): the network can give each channel
#   back the scale it needs.
#
# The package computes the normalisation in fp32 and casts back to the input's dtype before the gain, as the
# Hugging Face GLM-5 code does; the derivation does the same, so it matches in bf16 too.

# %%
# derivation: RMSNorm
def rms_norm(x, g, eps):
    h = x.float()
    h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return g * h.to(x.dtype)


# %%
d, eps = classroom.hidden_size, glm5.rms_norm_eps
x_norm = torch.randn(3, 5, d) * 4 + 1.5  # 15 token vectors with a non-zero mean
g = 1 + 0.1 * torch.randn(d)
norm = RMSNorm(d, eps=eps)
with torch.no_grad():
    norm.weight.copy_(g)
    ours = rms_norm(x_norm, g, eps)
    rms_gap = (ours - norm(x_norm)).abs().max()
    bf16_gap = (rms_norm(x_norm.bfloat16(), g.bfloat16(), eps) - norm.bfloat16()(x_norm.bfloat16())).abs().max()
print(f"max |derivation - glm5_ref.layers.RMSNorm|: {rms_gap:.1e} in fp32, {bf16_gap:.1e} in bf16")
print("rms of the first output rows, divided by g:",
      [f"{v:.6f}" for v in (ours / g).pow(2).mean(-1).sqrt().flatten()[:4].tolist()])
scale_gap = (rms_norm(7.5 * x_norm, g, eps) - ours).abs().max()
ln_gap = (F.layer_norm(x_norm, (d,), g, eps=eps) - rms_norm(x_norm - x_norm.mean(-1, keepdim=True), g, eps)).abs().max()
print(f"RMSNorm(7.5 x) - RMSNorm(x): {scale_gap:.1e};  LayerNorm(x) - RMSNorm(x - mean): {ln_gap:.1e}")
print("RMSNorm of a zero vector:", rms_norm(torch.zeros(4), torch.ones(4), eps).tolist())

trained = model.model.layers[0].input_layernorm  # a trained norm of the classroom model
with torch.no_grad():
    h = model.model.embed_tokens(torch.tensor([tok.encode(heldout_text[:400])]))  # (1, T, d) real embeddings
    model_gap = (rms_norm(h, trained.weight, trained.eps) - trained(h)).abs().max()
print(f"trained gain of layer 0: from {trained.weight.min():.2f} to {trained.weight.max():.2f} "
      f"(initialised to 1); derivation vs that module: {model_gap:.1e}")

# %% [markdown]
# ## 3. SwiGLU
#
# The classic transformer feed-forward network is $\mathrm{FFN}(x) = W_2\, \max(0, W_1 x)$ with a hidden width
# $h = 4d$. A **gated linear unit** (GLU; Dauphin et al. 2017) multiplies one projection by a gate computed from
# another, $(W x) \odot \sigma(V x)$, so the network can switch each hidden unit on and off per token.
# Shazeer (2020) compared gate functions; among the best was the **SiLU** (also called Swish),
# $\mathrm{silu}(z) = z\, \sigma(z) = z / (1 + e^{-z})$, a smooth ReLU-like curve. The result is **SwiGLU**:
#
# $$\mathrm{SwiGLU}(x) = W_\text{down}\big(\mathrm{silu}(W_\text{gate}\, x) \odot W_\text{up}\, x\big),$$
#
# with no biases, and with the weight names `gate_proj`, `up_proj`, `down_proj` of the released checkpoint.
#
# **Why the hidden width is scaled.** SwiGLU has three $d \times h$ matrices where the classic FFN has two, so
# at the same $h$ it costs 1.5 times the parameters and FLOPs. To compare them at equal cost, Shazeer shrank the
# hidden width to $h = \tfrac{2}{3} \cdot 4d = \tfrac{8}{3} d$ (so that $3dh = 2d \cdot 4d$), and many models
# (LLaMA among them) kept that ratio. The width is a free choice, though: GLM-5's dense layers and experts use
# the ratios printed below.

# %%
# derivation: SiLU and SwiGLU
def silu(z):
    return z * (1 / (1 + torch.exp(-z)))


def swiglu(x, w_gate, w_up, w_down):
    """x (..., d); w_gate, w_up (h, d); w_down (d, h)."""
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


# %%
def ffn_weights(m):
    return m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight


z = torch.linspace(-6, 6, 101)
silu_gap = (silu(z) - F.silu(z)).abs().max()
mlp = SwiGLU(d, 3 * d)
x_ffn = torch.randn(2, 7, d)
with torch.no_grad():
    swiglu_gap = (swiglu(x_ffn, *ffn_weights(mlp)) - mlp(x_ffn)).abs().max()
    dense = model.model.layers[0].mlp  # the classroom model's trained dense FFN
    dense_gap = (swiglu(h, *ffn_weights(dense)) - dense(h)).abs().max()
    moe = model.model.layers[1].mlp
    expert_gap = (swiglu(h, *ffn_weights(moe.experts[5])) - moe.experts[5](h)).abs().max()
    gate_up, down = moe.packed_expert_weights()  # the packed tensors the grouped expert kernel reads
    I = classroom.moe_intermediate_size
    packed_gap = (swiglu(h, gate_up[5, :I], gate_up[5, I:], down[5]) - moe.experts[5](h)).abs().max()
print(f"silu: {silu_gap:.1e}; random SwiGLU: {swiglu_gap:.1e}; trained dense FFN: {dense_gap:.1e}; "
      f"expert 5: {expert_gap:.1e}; expert 5 from the packed weights: {packed_gap:.1e}")
n_swiglu = sum(p.numel() for p in mlp.parameters())
print(f"SwiGLU({d}, {3 * d}) has {n_swiglu:,} parameters = 3 d h")
for name, cfg in (("GLM-5", glm5), ("classroom", classroom)):
    print(f"{name:9s}: d = {cfg.hidden_size:,}; dense FFN h = {cfg.intermediate_size:,} "
          f"({cfg.intermediate_size / cfg.hidden_size:.2f} d); each expert h = {cfg.moe_intermediate_size:,} "
          f"({cfg.moe_intermediate_size / cfg.hidden_size:.2f} d); the 8d/3 rule would give "
          f"{8 * cfg.hidden_size / 3:,.0f}")
used = (glm5.num_experts_per_tok + glm5.n_shared_experts) * glm5.moe_intermediate_size
print(f"GLM-5 per token in an MoE layer: ({glm5.num_experts_per_tok} routed + {glm5.n_shared_experts} shared) x "
      f"{glm5.moe_intermediate_size:,} = {used:,} hidden units = {used / glm5.hidden_size:.1f} d")

# %% [markdown]
# GLM-5's dense FFN is narrower than the $\tfrac{8}{3}d$ rule ($2d$) and each routed expert is much narrower
# still ($d/3$): in an MoE layer a token passes through the shared expert and 8 routed experts (notebook 03),
# so the feed-forward width one token actually uses there is $3d$, as printed above.
#
# ## 4. RoPE: position as a rotation
#
# Attention compares a query $q_m$ (the token at position $m$) with keys $k_n$ through dot products, which know
# nothing of positions. **Rotary position embedding** (RoPE; Su et al. 2021) rotates queries and keys by angles
# that grow with the position. Split a $D$-dimensional vector into $D/2$ pairs; pair $i$ of the token at
# position $m$ is rotated by the angle $m\,\theta_i$, with
#
# $$\theta_i = \text{base}^{-2i/D}, \quad i = 0, \dots, D/2 - 1, \qquad
# \begin{pmatrix} y_{2i} \\ y_{2i+1} \end{pmatrix} =
# \begin{pmatrix} \cos m\theta_i & -\sin m\theta_i \\ \sin m\theta_i & \cos m\theta_i \end{pmatrix}
# \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix}.$$
#
# Pair 0 turns by one radian per token; the last pair turns $\text{base}^{(D-2)/D}$ times more slowly. Writing the
# rotation as $R(m\theta)$, and using $R(a)^\top R(b) = R(b - a)$,
#
# $$\big(R(m\theta)\, q\big) \cdot \big(R(n\theta)\, k\big) = q \cdot R\big((n - m)\theta\big)\, k ,$$
#
# so **the score depends on the positions only through $m - n$**: attention becomes relative, and rotations
# keep every vector's norm. In GLM-5 only a 64-dimensional slice of each query and key is rotated
# (`qk_rope_head_dim`; notebook 01 explains why), with base `rope_theta` $= 10^6$.
#
# **Which dims form a pair** is a convention the checkpoint bakes in. *Interleaved* (GPT-J, DeepSeek): pair $i$
# is dims $(2i, 2i+1)$. *Half-split* (GPT-NeoX, `rotate_half`): pair $i$ is dims $(i, i + D/2)$. The rotation
# is the same; only the layout differs, so the two agree after permuting the dims (evens first, then odds),
# but applying the wrong one to trained weights rotates the wrong numbers together. GLM-5's config sets
# `rope_interleave=True`, and `glm5_ref/mla.py` passes it to `apply_rope`. In the derivation the two layouts
# differ only in one `rearrange` pattern.

# %%
# derivation: RoPE, both pairings
def rope(x, positions, base, interleaved=True):
    """x (B, T, ..., D) rotated by its positions (T,): pair i at position m turns by m * base^(-2i/D)."""
    D = x.shape[-1]
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angle = positions.double()[:, None] * theta  # (T, D/2)
    angle = angle.reshape(angle.shape[:1] + (1,) * (x.dim() - 3) + angle.shape[1:])  # (T, 1.., D/2)
    cos, sin = angle.cos().float(), angle.sin().float()
    flat = "... (i two)" if interleaved else "... (two i)"  # interleaved: (2i, 2i+1); half-split: (i, i + D/2)
    pairs = rearrange(x.float(), f"{flat} -> ... i two", two=2)  # (..., D/2, 2): the coordinates of each pair
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rearrange(rotated, f"... i two -> {flat}").to(x.dtype)


# %%
D, base = glm5.qk_rope_head_dim, glm5.rope_theta
x_rope = torch.randn(2, 16, 4, D)  # (B, T, H, D)
pos = torch.arange(100, 116)
rope_gaps = {}
for interleaved in (True, False):
    ours_rope, package_rope = rope(x_rope, pos, base, interleaved), apply_rope(x_rope, pos, base, interleaved)
    rope_gaps[interleaved] = (ours_rope - package_rope).abs().max()
    print(f"interleaved={interleaved}: max |derivation - glm5_ref.layers.apply_rope| = {rope_gaps[interleaved]:.1e}")
P = interleaved_to_half_split(D)
perm_gap = (rope(x_rope[..., P], pos, base, interleaved=False) - rope(x_rope, pos, base)[..., P]).abs().max()
print(f"half-split of the permuted dims = permuted interleaved: {perm_gap:.1e}")
norm_gap = (rope(x_rope, pos, base).norm(dim=-1) - x_rope.norm(dim=-1)).abs().max()
print(f"norms preserved: {norm_gap:.1e}")

q, k = torch.randn(1, 1, D), torch.randn(1, 1, D)


def score(m, n):
    return float((rope(q, torch.tensor([m]), base) * rope(k, torch.tensor([n]), base)).sum())


pairs_mn = [(5, 2), (1_005, 1_002), (200_005, 200_002)]
scores = [score(m, n) for m, n in pairs_mn]
print("q_m . k_n for m - n = 3 at three absolute positions:", [f"{s:.5f}" for s in scores])
print(f"the same pair at m - n = 4 instead: {score(6, 2):.5f}")
relative_gap = max(abs(s - scores[0]) for s in scores)
print(f"GLM-5 config: rope_interleave = {glm5.rope_interleave}, rope_theta = {glm5.rope_theta:,.0f}, "
      f"rotated dims D = {glm5.qk_rope_head_dim}")

# %% [markdown]
# Each pair has a **wavelength** $2\pi/\theta_i$, the number of tokens after which it comes back to where it
# started. The fast pairs distinguish neighbouring tokens; the slow ones change little over the whole context
# and behave almost like position-free dimensions. The right panel shows what the rotation alone does to a
# score: for a query equal to its key, with the same energy in every pair, $q_m \cdot k_n / \lVert q\rVert^2
# = \tfrac{2}{D}\sum_i \cos\big((m-n)\theta_i\big)$, which falls as the distance grows (the "long-term decay"
# of the RoPE paper; the curves show its mean over bins of distances and the band where most values fall).
# A trained model can still attend far away by putting the energy of $q$ and $k$ into the
# slow pairs.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.3))
for name, cfg, color in (("GLM-5", glm5, "C0"), ("classroom", classroom, "C1")):
    Dr = cfg.qk_rope_head_dim
    wavelength = 2 * math.pi * cfg.rope_theta ** (torch.arange(0, Dr, 2, dtype=torch.float64) / Dr)
    ax1.semilogy(range(Dr // 2), wavelength, "o-", ms=3, color=color,
                 label=f"{name}: D = {Dr}, base = {cfg.rope_theta:.0e}")
    ax1.axhline(cfg.max_position_embeddings, ls="--", lw=1, color=color,
                label=f"{name} max_position_embeddings: {cfg.max_position_embeddings:,}")
    edges = torch.unique(torch.logspace(0, math.log10(glm5.max_position_embeddings), 60).long())  # log-spaced bins
    bins = [torch.linspace(a, b - 1, min(b - a, 256)).round().long() for a, b in zip(edges[:-1], edges[1:])]
    dist = torch.cat(bins)  # up to 256 distances per bin, spread evenly over it
    e = torch.zeros(1, 1, Dr)
    e[..., 0::2] = 1.0  # energy 1 in each pair, on its first coordinate
    qk = (rope(e.expand(1, len(dist), Dr), dist, cfg.rope_theta) * rope(e, torch.tensor([0]), cfg.rope_theta))
    qk = (qk.sum(-1)[0] / (Dr / 2)).split([len(b) for b in bins])  # q_0 . k_dist / |q|^2, per bin
    mids = [float(b.float().mean()) for b in bins]
    mean = [float(c.mean()) for c in qk]
    lo, hi = [float(c.quantile(0.1)) for c in qk], [float(c.quantile(0.9)) for c in qk]
    ax2.semilogx(mids, mean, color=color, lw=2, label=f"{name}: mean over a bin of distances")
    ax2.fill_between(mids, lo, hi, color=color, alpha=0.2, label=f"{name}: 10-90% of the bin")
ax1.set(title="RoPE: wavelength of each rotated pair", xlabel="pair index i",
        ylabel="wavelength 2π/θ_i (tokens)")
ax1.legend(fontsize=8)
ax2.axhline(0, color="gray", lw=0.5)
ax2.set(title="Score of a query with an identical key, by distance", xlabel="relative distance m - n (tokens)",
        ylabel="q_m · k_n / |q|²")
ax2.legend(fontsize=8)
fig.tight_layout()
show_figure(fig, "00a_rope.png")

slowest = 2 * math.pi * glm5.rope_theta ** ((D - 2) / D)
print(f"GLM-5: fastest pair wavelength {2 * math.pi:.2f} tokens, slowest {slowest:,.0f} tokens "
      f"({slowest / glm5.max_position_embeddings:.1f}x the {glm5.max_position_embeddings:,}-token context)")

# %% [markdown]
# ## The check
#
# The cell below collects the claims of this notebook: the tiny BPE round-trips; the from-scratch rank encoder
# equals the project's tokenizer; special tokens are single ids that ordinary text never produces; the sampled
# ids differ from their re-encoding while decoding to the same text; and RMSNorm, SwiGLU and RoPE (both
# pairings) equal `glm5_ref.layers`, with RoPE's score depending only on $m - n$.

# %%
# check: the derivations equal glm5_ref (tolerances: fp32 rounding)
for s in tests:
    assert bpe_decode(bpe_encode(s.encode("utf-8"), merges), vocab) == s  # the tiny BPE round-trips
    assert rank_encode(s) == tok.encode(s)  # tiktoken's rule, from the shipped ranks
assert tiny_bpt_train > tiny_bpt_heldout > 1.0 and project_bpt > tiny_bpt_heldout
assert tok.encode("<|user|>", allow_special=True) == [tok.SPECIAL_TOKENS["<|user|>"]]
assert max(heldout_ids) < tok.NUM_MERGEABLE <= min(tok.SPECIAL_TOKENS.values())
assert tok.decode(out) == tok.decode(reencoded) and out != reencoded  # the re-tokenization trap
assert max(rms_gap, model_gap, scale_gap, ln_gap) < 1e-5 and bf16_gap == 0  # RMSNorm
assert max(silu_gap, swiglu_gap, dense_gap, expert_gap, packed_gap) < 1e-5 and n_swiglu == 3 * d * 3 * d
for interleaved in (True, False):
    assert torch.allclose(rope(x_rope, pos, base, interleaved), apply_rope(x_rope, pos, base, interleaved), atol=1e-5)
assert perm_gap < 1e-5 and norm_gap < 1e-4
assert relative_gap < 1e-3 * abs(scores[0]) + 1e-4 and abs(score(6, 2) - scores[0]) > 1e-2
print("all checks passed")

# %% [markdown]
# ## Exercises
#
# 1. **More merges.** Train the tiny BPE with 256 merges instead of 128 on the same 4 KB. Predict: does the
#    compression of the training text rise, and does the held-out text gain as much? Check.
# 2. **Where $\epsilon$ starts to matter.** RMSNorm is scale-invariant "while $\epsilon$ is negligible". For a
#    vector with i.i.d. standard normal entries, $\tfrac{1}{d}\sum x_i^2 \approx 1$, so at what scale $\alpha$
#    does $\mathrm{RMSNorm}(\alpha x)$ shrink to about $1/\sqrt{2}$ of $\mathrm{RMSNorm}(x)$ with
#    $\epsilon = 10^{-5}$? Derive it, then check.
# 3. **The 8d/3 rule at GLM-5's width.** What hidden width $h$ gives a SwiGLU the parameter count of a classic
#    $4d$ FFN at $d = 6144$, and what fraction of it is GLM-5's dense `intermediate_size`? Check the count with a
#    small `SwiGLU` whose $d$ is a multiple of 3.
# 4. **RoPE's slowest pair.** How many tokens does GLM-5's slowest rotated pair need for one full turn? Predict
#    from $\theta_{D/2-1} = \text{base}^{-(D-2)/D}$, then check with `glm5_ref.layers.rope_angles` that the pair
#    is back at angle 0 after that many positions and not yet a quarter of the way round at the end of the
#    context.

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 1
merges_256, vocab_256, lengths_256 = train_bpe(train_text.encode("utf-8"), 256)
train_256 = n_bytes / lengths_256[-1]
heldout_256 = len(heldout_text.encode("utf-8")) / len(bpe_encode(heldout_text.encode("utf-8"), merges_256))
print(f"training text: {tiny_bpt_train:.2f} -> {train_256:.2f} bytes/token; "
      f"held-out: {tiny_bpt_heldout:.2f} -> {heldout_256:.2f}")
assert train_256 > tiny_bpt_train and heldout_256 >= tiny_bpt_heldout
assert train_256 - tiny_bpt_train > heldout_256 - tiny_bpt_heldout  # later merges fit the training file more

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 2
# RMSNorm(a x) = g a x / sqrt(a^2 + eps) (mean(x^2) = 1): the factor a / sqrt(a^2 + eps) vs 1, equal to 1/sqrt(2)
# when a^2 = eps, i.e. a = sqrt(1e-5) ~ 3.2e-3.
eps = glm5.rms_norm_eps
alpha = math.sqrt(eps)
v = torch.randn(4096, dtype=torch.float64)
v = v / v.pow(2).mean().sqrt()  # mean(v^2) = 1 exactly
ratio = float(rms_norm(alpha * v, torch.ones(1, dtype=torch.float64), eps).norm()
              / rms_norm(v, torch.ones(1, dtype=torch.float64), eps).norm())
print(f"alpha = {alpha:.2e}: |RMSNorm(alpha x)| / |RMSNorm(x)| = {ratio:.4f} (1/sqrt(2) = {2 ** -0.5:.4f})")
assert abs(ratio - 2 ** -0.5) < 1e-4

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 3
# 3 d h = 2 d (4 d)  =>  h = 8 d / 3 = 16,384 at d = 6144; GLM-5's 12,288 is 3/4 of it.
h_rule = 8 * glm5.hidden_size // 3
print(f"h = {h_rule:,}; GLM-5's intermediate_size {glm5.intermediate_size:,} is "
      f"{glm5.intermediate_size / h_rule:.2f} of it")
assert h_rule == 16_384 and glm5.intermediate_size / h_rule == 0.75
d_small = 96
classic = 2 * d_small * 4 * d_small  # W1 (4d x d) and W2 (d x 4d)
assert sum(p.numel() for p in SwiGLU(d_small, 8 * d_small // 3).parameters()) == classic

# %% tags=["solution"] jupyter={"source_hidden": true}
# solution 4
# theta_31 = 1e6^(-62/64), so one turn takes 2 pi 1e6^(62/64) ~ 4.0 million tokens, ~20x the context.
turn = 2 * math.pi * glm5.rope_theta ** ((D - 2) / D)
cos_turn, _ = rope_angles(torch.tensor([round(turn)]), D, glm5.rope_theta)
cos_ctx, _ = rope_angles(torch.tensor([glm5.max_position_embeddings]), D, glm5.rope_theta)
print(f"one turn of the slowest pair: {turn:,.0f} tokens; its cosine there {cos_turn[0, -1]:.6f}, "
      f"at the end of the context {cos_ctx[0, -1]:.3f}")
assert 3.9e6 < turn < 4.1e6 and cos_turn[0, -1] > 0.999999 and cos_ctx[0, -1] > 0
