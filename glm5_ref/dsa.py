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
        S_t       = TopK_s(I_{t,s}, k = min(index_topk, t + 1))   (torch.topk: deterministic)
        u_t       = MLA restricted to s in S_t, the same S_t for every head.

    The indexer costs H_I * d_I = 4096 multiply-adds per (query, key) pair against 64 * 512 = 32768 for
    prefill attention (and 64 * 1088 absorbed decode), so at 128K context sparse attention over 2048 keys
    plus the dense indexer is several times cheaper than dense MLA.

Two ways to run sparse attention, equal to each other (tested):
    * masked:   dense logits over all S keys, -inf outside the selection (MLA's attention_core with
                key_indices); simple, and what transformers does;
    * gathered: gather the K selected latents per query, (B, T, K, C), and attend over those in the
                absorbed form; the cost no longer grows with S. Decode uses it.

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
quantisation costs (about 98% of the top-k set kept in notebook 02).

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
from glm5_ref.mla import MLA, MLACache, allowed_keys, check_key_indices


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
        self.fp8 = False  # simulate the production Hadamard + FP8 block quantisation (see module docstring)

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

    def scores(self, q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """I[t, s] = sum_j w[t, j] ReLU(q[t, j] . k[s] / sqrt(I)): (B, T, J, I), (B, S, I), (B, T, J) -> (B, T, S)."""
        if self.fp8:
            q, keys = fp8_simulate(hadamard_rotate(q)), fp8_simulate(hadamard_rotate(keys))
        q = q.float() * self.head_dim ** -0.5  # scale the (J, I) queries, not the (J, S) logits
        logits = torch.einsum("btji,bsi->btjs", q, keys.float())  # (B, T, J, S)
        return torch.einsum("btj,btjs->bts", weights, F.relu(logits))  # (B, T, S)

    def forward(self, x: torch.Tensor, c_q: torch.Tensor, positions: torch.Tensor,
                cache: DSACache | None = None, scores: bool = True) -> torch.Tensor | None:
        """Scores of the T new queries against every key so far, (B, T, S) with S = cache length + T.
        Future keys are NOT masked here (``select_topk`` and ``indexer_kl`` do it). With ``scores=False``
        only the new keys are cached (dense decoding still has to keep the indexer cache complete)."""
        keys = self.keys(x, positions)  # (B, T, I)
        if cache is not None:
            keys = cache.write_index_keys(keys.to(cache.index_keys.dtype), cache.length).to(x.dtype)  # (B, S, I)
        if not scores:
            return None
        return self.scores(self.queries(c_q, positions), keys, self.head_weights(x))


def select_topk(scores: torch.Tensor, query_pos: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k causal keys per query: (B, T, S) scores, (T,) absolute query positions -> (B, T, min(topk, S))
    key positions, -1 where a query has fewer than k causal keys. Exactly min(topk, t + 1) valid per row.

    Exact ties (frequent: a key whose ReLU terms are all zero scores exactly 0) go to the most recent key,
    so the selection depends on the fp32 scores alone, not on the sequence length or on how torch.topk
    orders equal values; that is what makes cached decoding select what a full forward selects. The trick:
    rank by one int64 key = (the fp32 score's bits, mapped to an order-preserving integer) * 2^32 + position.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive integer, got {topk!r}")
    S = scores.shape[-1]
    causal = torch.arange(S, device=scores.device) <= query_pos[:, None]  # (T, S)
    masked = scores.float().masked_fill(~causal, float("-inf"))  # (B, T, S)
    bits = masked.view(torch.int32).long()  # IEEE bits: ordered like the floats for >= 0, reversed for < 0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # now ordered like the floats everywhere
    key = bits * 2**32 + torch.arange(S, device=scores.device)  # (B, T, S): unique, ties -> larger position
    idx = key.topk(min(topk, S), dim=-1).indices  # (B, T, k)
    picked = torch.gather(masked, -1, idx)  # (B, T, k)
    return torch.where(torch.isinf(picked), -1, idx)  # a -inf pick is a future key: padding


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

    Switches (attributes, so a trainer can flip them between stages):
      sparse                 True: top-k attention (GLM-5 after DSA training); False: dense MLA (stage 1).
      sparse_impl            "gathered" (default; absorbed attention over the gathered K latents) or
                             "masked" (dense logits masked outside the selection). Only the absorbed path
                             gathers; the expanded path always masks.
      detach_indexer_input   the indexer sees x.detach() and c_q.detach() (stage 2 of DeepSeek-V3.2).
    """

    def __init__(self, config: GLM5Config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.indexer = Indexer(config)
        self.sparse = True
        self.sparse_impl = "gathered"
        self.detach_indexer_input = False
        self.use_triton = False  # opt-in: kernels.indexer top-k + kernels.sparse_mla where they can run (inference)
        self._scores: torch.Tensor | None = None  # indexer scores (B, T, S) of the forward call in progress
        self._selected: torch.Tensor | None = None  # its top-k (B, T, K), None when attention is dense
        self._want_scores = False  # set by forward when the indexer loss needs the scores

    def select_keys(self, x, c_q, positions, cache):
        """Run the indexer, keep its scores for the KL loss, return the top-k (or None: dense attention)."""
        if self.detach_indexer_input:
            x, c_q = x.detach(), c_q.detach()
        start = cache.length if cache is not None else 0
        fits = start + x.shape[1] <= self.config.index_topk  # every query's causal keys fit in the budget
        if (self.use_triton and self.sparse and not fits and not self._want_scores and not self.indexer.fp8
                and triton_usable(x, self.indexer.wq_b.weight)):
            from kernels.indexer import indexer_topk  # lazy: fused scores + top-k, the (B, T, S) scores never stored
            keys = self.indexer.keys(x, positions)  # (B, T, I)
            if cache is not None:
                keys = cache.write_index_keys(keys.to(cache.index_keys.dtype), cache.length).to(x.dtype)  # (B, S, I)
            q, w = self.indexer.queries(c_q, positions), self.indexer.head_weights(x)  # (B, T, J, I), (B, T, J)
            self._selected = indexer_topk(q.contiguous(), keys.contiguous(), w.contiguous(), self.config.index_topk,
                                          start)  # (B, T, K); may differ from the twin on near-ties (last-bit sums)
            return self._selected
        need_scores = self._want_scores or (self.sparse and not fits)
        self._scores = self.indexer(x, c_q, positions, cache, scores=need_scores)  # (B, T, S) or None
        if not self.sparse or fits:
            return None  # dense attention (exactly what top-k gives when everything fits)
        query_pos = torch.arange(start, start + x.shape[1], device=x.device)  # (T,)
        self._selected = select_topk(self._scores, query_pos, self.config.index_topk)  # (B, T, K)
        return self._selected

    def forward(self, x, positions=None, cache=None, absorbed=False, key_indices=None, indexer_loss=False):
        """As MLA.forward (without return_probs); with ``indexer_loss=True`` returns (out, KL of the indexer)."""
        if cache is not None and not isinstance(cache, DSACache):
            raise ValueError(f"cache: expected a DSACache (latents + indexer keys), got {type(cache).__name__}")
        if indexer_loss and key_indices is not None:
            raise ValueError("key_indices: the indexer loss needs the indexer's own selection; pass key_indices=None")
        start = cache.length if cache is not None else 0
        self._scores, self._selected, self._want_scores = None, None, indexer_loss
        try:
            if not indexer_loss:  # inference and plain LM training: no probabilities kept
                return super().forward(x, positions, cache, absorbed, key_indices)
            out, probs = super().forward(x, positions, cache, absorbed, key_indices, return_probs=True)
            query_pos = torch.arange(start, start + x.shape[1], device=x.device)  # (T,)
            # the indexer's distribution lives where attention did: the causal keys, or the selected ones
            support = allowed_keys(query_pos, start + x.shape[1], self._selected, batch_size=x.shape[0])
            return out, indexer_kl(attention_target(probs), self._scores, support)
        finally:
            self._scores, self._selected, self._want_scores = None, None, False

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs=False):
        if key_indices is None or self.sparse_impl == "masked":
            return super().attend_absorbed(q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs)
        return self.attend_gathered(q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs)

    def attend_gathered(self, q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs=False):
        """Absorbed attention over the K selected latents only: the cost is independent of the context S."""
        B, T, K = key_indices.shape
        S = latent.shape[1]
        idx = check_key_indices(key_indices, query_pos, B)  # (B, T, K) int64, -1 = padding
        if self.use_triton and not return_probs and triton_usable(q_nope, q_rope, latent, k_rope,
                                                                   self.kv_b_proj.weight):
            from kernels.sparse_mla import absorbed_sparse_attention  # lazy: glm5_ref never imports triton at load
            w_uk, w_uv = self.absorbed_weights()  # (H, N, C), (H, V, C)
            return absorbed_sparse_attention(q_nope, q_rope, latent, k_rope, idx, w_uk, w_uv, self.scale)
        valid = idx >= 0  # (B, T, K)
        rows = torch.arange(B, device=idx.device)[:, None, None]  # (B, 1, 1)
        lat = latent[rows, idx.clamp_min(0)]  # (B, T, K, C): each query's selected latents
        kr = k_rope[rows, idx.clamp_min(0)]  # (B, T, K, P)
        w_uk, w_uv = self.absorbed_weights()  # (H, N, C), (H, V, C)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope * self.scale, w_uk)  # (B, T, H, C), scale folded in
        scores = (torch.einsum("bthc,btkc->bhtk", q_lat, lat)
                  + torch.einsum("bthp,btkp->bhtk", q_rope * self.scale, kr))  # (B, H, T, K)
        logits = scores.float().masked_fill(~valid[:, None], torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1).masked_fill(~valid[:, None], 0.0)  # (B, H, T, K)
        o_lat = torch.einsum("bhtk,btkc->bthc", probs.to(lat.dtype), lat)  # (B, T, H, C)
        out = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, V)
        if not return_probs:
            return out
        full = probs.new_zeros(B, probs.shape[1], T, S + 1)  # (B, H, T, S + 1): padding -> the extra column
        slot = torch.where(valid, idx, S)[:, None].expand(-1, probs.shape[1], -1, -1)  # (B, H, T, K)
        return out, full.scatter_add(-1, slot, probs)[..., :S]  # probabilities scattered back to key positions


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


def fp8_simulate(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantise to float8 e4m3 in blocks of ``block`` along the last dim (scale = amax / 448 per block),
    then dequantise: the values an FP8 kernel would see."""
    D = x.shape[-1]
    b = min(block, D)
    if D % b:
        raise ValueError(f"fp8 block: the last dim {D} must be a multiple of the block {b}")
    xb = x.float().unflatten(-1, (D // b, b))  # (..., D/b, b)
    scale = xb.abs().amax(-1, keepdim=True).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return ((xb / scale).to(torch.float8_e4m3fn).float() * scale).flatten(-2)


def fp8_topk_agreement(indexer: Indexer, x: torch.Tensor, c_q: torch.Tensor, topk: int) -> float:
    """Mean fraction of each query's full-precision top-k set that the FP8-simulated indexer also picks."""
    T = x.shape[1]
    positions = torch.arange(T, device=x.device)
    old = indexer.fp8
    try:
        with torch.no_grad():
            indexer.fp8 = False
            ref = select_topk(indexer(x, c_q, positions), positions, topk)
            indexer.fp8 = True
            sim = select_topk(indexer(x, c_q, positions), positions, topk)
    finally:
        indexer.fp8 = old
    hits, total = 0, 0
    for r, s in zip(ref.reshape(-1, ref.shape[-1]).tolist(), sim.reshape(-1, sim.shape[-1]).tolist()):
        a, b = {i for i in r if i >= 0}, {i for i in s if i >= 0}
        hits, total = hits + len(a & b), total + len(a)
    return hits / max(total, 1)
