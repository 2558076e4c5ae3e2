"""DeepSeek Sparse Attention (DSA): the lightning indexer, top-k selection, sparse MLA, indexer losses.

What it is
    GLM-5 keeps MLA (mla.py) but lets each query attend to only k = index_topk = 2048 of its past keys. A
    cheap "lightning indexer" scores every past key, the top-k are kept, and MLA runs over those alone
    (DeepSeek-V3.2, arXiv 2512.02556, section 2.1; GLM-5 report, "DSA"). With c^Q_t the normed query
    latent of MLA and h_s the layer input:

        q^I_{t,j} = W^IQ_j c^Q_t                (wq_b: H_I heads of d_I)
        k^I_s     = LayerNorm(W^IK h_s)          (wk, k_norm: ONE key per token, LayerNorm with bias, eps 1e-6)
        RoPE on dims [0, d_r) of q^I and k^I     (GLM-5: interleaved pairs; DeepSeek-V3.2: half-split)
        w_{t,j}   = (W^Iw h_t)_j * H_I^-0.5       (weights_proj, fp32)
        I_{t,s}   = sum_j w_{t,j} * ReLU(q^I_{t,j} . k^I_s / sqrt(d_I))          s <= t
        S_t       = TopK_s(I_{t,s}, k = min(index_topk, t + 1))   (ties to the most recent key)
        u_t       = MLA restricted to s in S_t, the same S_t for every head.

    The indexer costs H_I * d_I = 4096 multiply-adds per (query, key) pair against 64 * 512 = 32768 for
    prefill attention (and 64 * 1088 absorbed decode), so at 128K context sparse attention over 2048 keys
    plus the dense indexer is several times cheaper than dense MLA.

The interface to MLA is one argument: the indexer's top-k goes to ``MLA.attend`` as ``key_indices``, which
runs it masked (dense logits, -inf outside the selection: what transformers does) or gathered (attend over
each query's K latents only, so the cost no longer grows with S; decode uses it). Equal; tested (mla.py).

Indexer training (DeepSeek-V3.2 section 2.1.1; GLM-5 appendix A):
    target p_{t,s} = sum_i a_{t,s,i} / sum_{s'} sum_i a_{t,s',i}  (main attention summed over heads, detached)
    stage 1 (dense warm-up, everything but the indexer frozen): KL(p_t || softmax_{s<=t}(I_t)) with dense attention
    stage 2 (sparse training): KL(p_t,S_t || softmax_{S_t}(I_t)) with top-k attention on; with
            ``detach_indexer_input`` the indexer sees detached inputs, so it learns only from its KL loss and
            the model only from the LM loss (the top-k itself is never differentiable).
    The KL is averaged over query tokens (the papers write a sum; the mean keeps the scale independent of T).

The production precision trick (DeepSeek-V3.2 inference code) is an option: rotate q^I and k^I by a
normalised Hadamard matrix, quantise them to FP8 e4m3 in blocks of 128 with one scale per block, and score
from the dequantised values. The rotation is orthogonal, so without quantisation it changes no score; it is
meant to spread outlier channels across dims before the rounding (with one scale per 128 values we measured
no accuracy gain from it on synthetic outliers: notebook 02). ``fp8_topk_agreement`` measures what the
quantisation costs (about 98% of the top-k set kept in notebook 02). Two scale formats: "amax" (scale =
amax / 448, exact) and "ue8m0", DeepSeek-V3.2's kernels' choice (scale_fmt="ue8m0": the scale rounded UP to a
power of two, 2^ceil(log2(amax / 448)), an 8-bit exponent with no mantissa, so applying it is an exponent add;
rounding up keeps every value in range, at the cost of up to one bit of resolution). ``fp8=True`` means "amax";
``fp8="ue8m0"`` selects the other (Indexer.scores, DSAAttention.attend).

Not handled: IndexShare (GLM-5.2's "shared" indexer layers), FP8 kernels (we simulate the rounding),
per-row cache lengths, the indexer's non-deterministic CUDA top-k (GLM-5 found it collapses RL).

Axes: B batch, T queries, S keys, K selected keys, H heads, J indexer heads, I indexer dim (d_I),
C kv latent, P rope dims, V value dims.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.layers import apply_rope, triton_usable
from glm5_ref.mla import MLA, AttentionOutput, MLACache, allowed_keys


class DSACache(MLACache):
    """MLA's latent cache plus the indexer's key cache (index_head_dim values per token)."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, index_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__(batch_size, max_len, kv_lora_rank, rope_dim, dtype=dtype, device=device)
        self.index_keys = torch.zeros(batch_size, max_len, index_dim, dtype=dtype, device=device)  # (B, L, I)

    @classmethod
    def for_config(cls, config: GLM5Config, batch_size: int, max_len: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "DSACache":
        return cls(batch_size, max_len, config.kv_lora_rank, config.qk_rope_head_dim, config.index_head_dim,
                   dtype=dtype, device=device)

    def write_index_keys(self, keys: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Write T indexer keys at slots start_pos.. (before MLA appends its latents, which advances
        ``length``); return the keys of the whole prefix including them, (B, start_pos + T, I)."""
        B, L, I = self.index_keys.shape
        if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != I:
            raise ValueError(f"DSACache index keys: expected shape ({B}, T, {I}), got {tuple(keys.shape)}")
        if start_pos != self.length:
            raise ValueError(f"DSACache start_pos: expected the cache length {self.length}, got {start_pos}")
        T = keys.shape[1]
        if start_pos + T > L:
            raise ValueError(f"DSACache: overflow, length {start_pos} + {T} new tokens > max_len {L}")
        self.index_keys[:, start_pos:start_pos + T] = keys  # (B, T, I)
        return self.index_keys[:, :start_pos + T]


class Indexer(nn.Module):
    """The lightning indexer (checkpoint names relative to ``self_attn.indexer``)."""

    def __init__(self, config: GLM5Config):
        super().__init__()
        self.config = config
        J, I = config.index_n_heads, config.index_head_dim
        self.n_heads, self.head_dim, self.rope_dim = J, I, config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, J * I, bias=False)  # W^IQ, from the normed q latent
        self.wk = nn.Linear(config.hidden_size, I, bias=False)  # W^IK: one key per token
        self.k_norm = nn.LayerNorm(I, eps=1e-6)  # with bias, unlike every RMSNorm of the model
        self.weights_proj = nn.Linear(config.hidden_size, J, bias=False)  # W^Iw: per-head weights

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE on the FIRST rope_dim dims (the main MLA puts its rope dims LAST)."""
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        rot = apply_rope(rot, positions, self.config.rope_theta, self.config.indexer_rope_interleave)
        return torch.cat([rot, rest], dim=-1)

    def queries(self, c_q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q = self.wq_b(c_q).unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, J, I)
        return self._rope(q, positions)

    def keys(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._rope(self.k_norm(self.wk(x)), positions)  # (B, T, I)

    def head_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights_proj(x).float() * self.n_heads ** -0.5  # (B, T, J), fp32

    def scores(self, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor,
               fp8: bool | str = False) -> torch.Tensor:
        """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s] / sqrt(I)): (B, T, J, I), (B, S, I), (B, T, J) -> (B, T, S).
        ``fp8``: score from Hadamard-rotated, FP8-rounded queries and keys (the production precision trick);
        True or "amax" for amax/448 scales, "ue8m0" for power-of-two scales."""
        if fp8:
            fmt = "amax" if fp8 is True else fp8
            q = fp8_simulate(hadamard_rotate(q), scale_format=fmt)
            keys = fp8_simulate(hadamard_rotate(keys), scale_format=fmt)
        q = q.float() * self.head_dim ** -0.5  # scale the (J, I) queries, not the (J, S) logits
        logits = torch.einsum("btji,bsi->btjs", q, keys.float())  # (B, T, J, S)
        return torch.einsum("btj,btjs->bts", weights, F.relu(logits))  # (B, T, S)

    def cached_keys(self, x: torch.Tensor, positions: torch.Tensor, cache: DSACache | None) -> torch.Tensor:
        """The new tokens' keys, written to the cache when there is one: the keys of the whole prefix (B, S, I)."""
        keys = self.keys(x, positions)  # (B, T, I)
        if cache is None:
            return keys
        return cache.write_index_keys(keys.to(cache.index_keys.dtype), cache.length).to(x.dtype)  # (B, S, I)

    def forward(self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor,
                cache: DSACache | None = None, fp8: bool | str = False) -> torch.Tensor:
        """Scores of the T new queries against every key so far, (B, T, S) with S = cache length + T.
        Future keys are NOT masked here (``select_topk`` and ``indexer_kl`` do it)."""
        keys = self.cached_keys(x, positions, cache)  # (B, S, I)
        return self.scores(self.queries(c_q, positions), keys, self.head_weights(x), fp8=fp8)


def select_topk(scores: torch.Tensor, query_pos: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k causal keys per query: (B, T, S) scores, (T,) absolute query positions -> (B, T, min(topk, S))
    key positions, -1 where a query has fewer than k causal keys. Exactly min(topk, t + 1) valid per row.

    Exact ties (frequent: a key whose ReLU terms are all zero scores exactly 0) go to the most recent key,
    so the selection depends on the fp32 scores alone, not on the sequence length or on how torch.topk
    orders equal values; that is what makes cached decoding select what a full forward selects. The rule is
    one int64 ranking key per key (``ranking_key``: the score's bits as an order-preserving integer, then the
    position); ``select_topk_reference`` ranks all S keys by it, the twin this function equals bit for bit.

    Cheaper, same result: one float top-(k + 1) per row. Where its k + 1 scores are strictly decreasing (pairs
    of -inf aside: both are padding), neither the set nor the order can depend on a tie rule, so it is the
    answer. The other rows (equal scores among the first k + 1, a NaN, or -0.0 next to +0.0, which floats call
    equal and the key orders) are ranked by the reference, on those rows only.
    """
    check_topk(topk)
    S = scores.shape[-1]
    k = min(topk, S)
    if k == S or torch.compiler.is_compiling():  # k == S: every causal key is picked, only the order is left;
        return select_topk_reference(scores, query_pos, topk)  # compiled: the branch-free twin (the same result)
    masked = causal_scores(scores, query_pos)  # (B, T, S)
    vals, idx = masked.topk(k + 1, dim=-1)  # float order; equal scores in any order
    strict = (vals[..., :-1] > vals[..., 1:]) | (vals[..., 1:] == float("-inf"))  # (B, T, k)
    out = torch.where(torch.isinf(vals[..., :k]), -1, idx[..., :k])  # a -inf pick is a future key: padding
    tied = ~strict.all(dim=-1)  # (B, T)
    if tied.any():
        rows = tied.nonzero(as_tuple=True)
        out[rows] = _select_masked(masked[rows], k)
    return out


def select_topk_reference(scores: torch.Tensor, query_pos: torch.Tensor, topk: int) -> torch.Tensor:
    """The naive twin of ``select_topk``: every key ranked by its int64 ``ranking_key``, one top-k over all S."""
    check_topk(topk)
    return _select_masked(causal_scores(scores, query_pos), min(topk, scores.shape[-1]))


def check_topk(topk) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")


def causal_scores(scores: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """(B, T, S) fp32 scores with every future key (s > query_pos[t]) at -inf."""
    causal = torch.arange(scores.shape[-1], device=scores.device) <= query_pos[:, None]  # (T, S)
    return scores.float().masked_fill(~causal, float("-inf"))


def ranking_key(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered like (fp32 score, position): unique per position, so equal scores go to the larger
    position. The IEEE bits are ordered like the floats for >= 0 and reversed for < 0; flipping the magnitude
    bits of the negative ones makes them ordered everywhere (-0.0 then ranks just below +0.0)."""
    bits = scores.contiguous().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits * 2**32 + positions


def _select_masked(masked: torch.Tensor, k: int) -> torch.Tensor:
    """(..., S) causally masked fp32 scores -> (..., k) positions by ``ranking_key``, -1 for -inf picks."""
    positions = torch.arange(masked.shape[-1], device=masked.device)
    idx = ranking_key(masked, positions).topk(k, dim=-1).indices
    return torch.where(torch.isinf(torch.gather(masked, -1, idx)), -1, idx)


def attention_target(probs: torch.Tensor) -> torch.Tensor:
    """p[t, s]: main-attention probabilities (B, H, T, S) summed over heads, L1-normalised, detached."""
    p = probs.detach().float().sum(dim=1)  # (B, T, S)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-30)


def indexer_kl(target: torch.Tensor, scores: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """mean_t KL(target_t || softmax(scores_t over support_t)); target (B, T, S) must vanish off the support.
    support (B|1, T, S) bool: the causal keys (dense warm-up) or the selected ones (sparse stage)."""
    log_q = torch.log_softmax(scores.float().masked_fill(~support, float("-inf")), dim=-1)  # (B, T, S)
    p = target * support
    kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-30)) - log_q), torch.zeros_like(p)).sum(-1)  # (B, T)
    return kl.mean()


class DSAAttention(MLA):
    """MLA with the lightning indexer choosing each query's keys (``self_attn`` of every GLM-5 layer).

    ``forward(...) -> (B, T, D)``; ``attend(...) -> AttentionOutput`` (out, probs, key_indices, indexer_loss).
    The indexer runs first (its keys join the cache), its top-k is handed to MLA as ``key_indices``; nothing is
    kept on the module between calls. Keyword arguments of both (Execution in execution.py sets them for a
    whole model):
      sparse                 True: top-k attention (GLM-5 after DSA training); False: dense MLA (the indexer
                             still caches its keys, and scores only when its loss is asked for).
      indexer_loss           also return the indexer KL against this call's attention (module docstring).
      detach_indexer_input   the indexer sees x.detach() and c_q.detach() (stage 2 of DeepSeek-V3.2).
      sparse_impl            "gathered" (absorbed attention over the gathered K latents) or "masked".
      key_selector           replaces the indexer's top-k (experiments' recency / random controls):
                             key_selector(layer_idx, query_pos (T,), num_keys S, batch_size B) -> (B, T, K).
      use_triton, fp8        the Triton indexer + sparse kernels where they can run; the FP8 simulation.
    While every query's causal keys fit in index_topk, attention is dense (exactly what top-k would give).
    """

    def __init__(self, config: GLM5Config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.indexer = Indexer(config)

    def forward(self, x, positions=None, cache=None, absorbed=False, **options) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); ``options`` as ``attend``."""
        return self.attend(x, positions, cache, absorbed, **options).out

    def attend(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: DSACache | None = None,
               absorbed: bool = False, *, sparse: bool = True, indexer_loss: bool = False,
               detach_indexer_input: bool = False, sparse_impl: str = "gathered", key_selector=None,
               use_triton: bool = False, fp8: bool = False) -> AttentionOutput:
        if cache is not None and not isinstance(cache, DSACache):
            raise ValueError(f"cache: expected a DSACache (latents + indexer keys), got {type(cache).__name__}")
        B, T = self.check_input(x, cache)
        positions = self.resolve_positions(positions, B, T, cache, x.device)  # (B|1, T)
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"cache: overflow, length {start} + {T} new tokens > max_len {cache.max_len}")
        query_pos = torch.arange(start, start + T, device=x.device)  # (T,)
        c_q = self.q_latent(x)  # (B, T, R): shared by MLA and the indexer
        xi, cqi = (x.detach(), c_q.detach()) if detach_indexer_input else (x, c_q)
        if key_selector is not None and indexer_loss:
            raise ValueError("key_selector: the indexer loss needs the indexer's own selection; pass key_selector=None")
        fits = start + T <= self.config.index_topk  # every query's causal keys fit in the budget: dense
        selected, scores = None, None
        if sparse and not fits and key_selector is not None:
            self.indexer.cached_keys(xi, positions, cache)
            selected = key_selector(self.layer_idx, query_pos, start + T, B)  # (B, T, K)
        elif (sparse and not fits and use_triton and not indexer_loss and not fp8
              and triton_usable(x, self.indexer.wq_b.weight)):
            from glm5_kernels.indexer import indexer_topk  # lazy: fused scores + top-k, no (B, T, S) scores kept
            keys = self.indexer.cached_keys(xi, positions, cache)  # (B, S, I)
            q, w = self.indexer.queries(cqi, positions), self.indexer.head_weights(xi)  # (B, T, J, I), (B, T, J)
            selected = indexer_topk(q.contiguous(), keys.contiguous(), w.contiguous(), self.config.index_topk,
                                    start)  # (B, T, K); may differ from the twin on near-ties (last-bit sums)
        elif indexer_loss or (sparse and not fits):
            scores = self.indexer(xi, cqi, positions, cache, fp8=fp8)  # (B, T, S)
            selected = select_topk(scores, query_pos, self.config.index_topk) if sparse and not fits else None
        else:
            self.indexer.cached_keys(xi, positions, cache)  # dense decoding still keeps the indexer cache whole
        res = super().attend(x, positions, cache, absorbed, selected, c_q=c_q, return_probs=indexer_loss,
                             sparse_impl=sparse_impl, use_triton=use_triton)
        if indexer_loss:
            # the indexer's distribution lives where attention did: the causal keys, or the selected ones
            support = allowed_keys(query_pos, start + T, selected, batch_size=B)
            res.indexer_loss = indexer_kl(attention_target(res.probs), scores, support)
        return res


def freeze_all_but_indexers(model: nn.Module) -> list[str]:
    """Stage 1 (dense warm-up): only parameters under an ``indexer`` module train. Returns their names."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(".indexer." in f".{name}")
        if p.requires_grad:
            trainable.append(name)
    return trainable


# --- the production precision trick ----------------------------------------------------------------------
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix (n a power of two): orthogonal and symmetric."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard size: expected a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


@functools.lru_cache(maxsize=8)
def _hadamard_fp32(n: int) -> torch.Tensor:
    return hadamard_matrix(n, torch.float32)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H over the last dim (applied to both q and k, so every dot product q . k is unchanged)."""
    return x.float() @ _hadamard_fp32(x.shape[-1]).to(x.device)


FP8_SCALE_FORMATS = ("amax", "ue8m0")


def fp8_simulate(x: torch.Tensor, block: int = 128, scale_format: str = "amax") -> torch.Tensor:
    """Quantise to float8 e4m3 in blocks of ``block`` along the last dim, then dequantise: the values an FP8
    kernel would see. Scale per block: amax / 448 ("amax"), or that rounded up to a power of two ("ue8m0")."""
    if scale_format not in FP8_SCALE_FORMATS:
        raise ValueError(f"scale_format: expected one of {FP8_SCALE_FORMATS}, got {scale_format!r}")
    D = x.shape[-1]
    b = min(block, D)
    if D % b:
        raise ValueError(f"fp8 block: the last dim {D} must be a multiple of the block {b}")
    xb = x.float().unflatten(-1, (D // b, b))  # (..., D/b, b)
    scale = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    if scale_format == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))  # 2^ceil(log2 s) >= s: no value leaves e4m3's range
    y = xb / scale
    if y.device.type == "mps":  # MPS has no float8 dtype: round on the CPU (exact, slower; fp8_indexer is opt-in)
        return (y.cpu().to(torch.float8_e4m3fn).float().to(y.device) * scale).flatten(-2)
    return (y.to(torch.float8_e4m3fn).float() * scale).flatten(-2)


def fp8_topk_agreement(indexer: Indexer, x: torch.Tensor, c_q: torch.Tensor, topk: int,
                       scale_format: str = "amax") -> float:
    """Mean fraction of each query's full-precision top-k set that the FP8-simulated indexer also picks."""
    positions = torch.arange(x.shape[1], device=x.device)
    with torch.no_grad():
        ref = select_topk(indexer(x, c_q, positions), positions, topk)
        sim = select_topk(indexer(x, c_q, positions, fp8=scale_format), positions, topk)
    hits, total = 0, 0
    for r, s in zip(ref.reshape(-1, ref.shape[-1]).tolist(), sim.reshape(-1, sim.shape[-1]).tolist()):
        a, b = {i for i in r if i >= 0}, {i for i in s if i >= 0}
        hits, total = hits + len(a & b), total + len(a)
    return hits / max(total, 1)
