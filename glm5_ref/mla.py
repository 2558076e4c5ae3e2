"""Multi-head Latent Attention (MLA-256) of GLM-5: expanded path, absorbed decode path, latent KV cache.

What it is
    The attention of every GLM-5 layer (GLM-5 report, "Architecture": MLA, Muon Split, MLA-256), which is
    DeepSeek's MLA with decoupled RoPE (DeepSeek-V2 section 2.1, DeepSeek-V3 section 2.1 eqs. 1-11) at
    H = 64 heads of qk head dim 256 = 192 + 64 and value dim 256. Queries and keys/values go through
    low-rank latents; only the KV latent and one shared RoPE key (512 + 64 = 576 values per token) are
    cached. With h_t the (normed) layer input:

        c^Q_t        = RMSNorm(W^DQ h_t)                               q_a_proj, q_a_layernorm      (r_q)
        [q^C; q^R]_i = split(W^UQ c^Q_t)  per head i                  q_b_proj          (d_n | d_r)
        [c~_t; k^R_t] = W^DKV h_t                                       kv_a_proj_with_mqa (r_kv | d_r)
        c^KV_t       = RMSNorm(c~_t)          (k^R is not normed)       kv_a_layernorm
        q^R_i, k^R   = RoPE(q^R_i, t), RoPE(k^R_t, t)  (one k^R shared by all heads)
        [k^C; v]_s,i = split(W^UKV c^KV_s) per head i                  kv_b_proj         (d_n | d_v)
        a_t,s,i      = softmax_s( [q^C;q^R]_t,i . [k^C;k^R]_s,i / sqrt(d_n + d_r) + M_t,s )
        u_t          = W^O concat_i( sum_s a_t,s,i v_s,i )              o_proj

    Expanded path ("MHA mode", training and prefill): exactly the equations above.
    Absorbed path ("MQA mode", decode): split W^UKV per head into W^UK_i (d_n x r_kv) and W^UV_i (d_v x r_kv)
    and use associativity, so keys and values never leave the latent space:

        q^C . k^C_s = q^C . (W^UK c^KV_s) = ((W^UK)^T q^C) . c^KV_s        -> a 576-d dot product
        sum_s a_s v_s = W^UV (sum_s a_s c^KV_s)                             -> attend over 512-d latents

    RoPE is what forces the decoupling: RoPE(W^UK c_s, s) = R_s W^UK c_s puts a position-dependent
    rotation between the query and W^UK, so W^UK could no longer be folded into the query. Hence RoPE only
    touches the separate d_r dims (q^R, k^R), which stay outside the latent.

Choices where the paper is silent (and why)
    * Per-head layout of q_b_proj and kv_b_proj outputs: [nope | rope] and [k_nope | v], heads outermost,
      as in the released Hugging Face checkpoint (parameter names are the checkpoint's, relative to
      ``self_attn``, so its tensors load without renaming).
    * RoPE pairing: ``config.rope_interleave`` (True for GLM-5: pairs (2j, 2j+1)); theta ``config.rope_theta``.
    * Both latent norms use ``config.rms_norm_eps`` (1e-5 for GLM-5, as vLLM does). transformers'
      GlmMoeDsaAttention and DeepSeek's reference code construct these two norms with eps 1e-6 instead.
    * Softmax in fp32, then cast to the value dtype (as transformers does); RMSNorm also runs in fp32.
    * A query whose allowed key set is empty (possible only with ``key_indices``) returns zeros, not NaN.
    * The causal mask is by cache slot: a query at absolute position t sees keys 0..t. Without a cache,
      ``positions`` only feed RoPE and the T tokens are causal in their order. With a cache the new tokens
      must sit at positions cache.length .. cache.length + T - 1.
    * ``MLACache`` does not detach: it is meant for inference under ``torch.no_grad()``.

Sparse attention (what DSA asks of MLA): ``key_indices`` (B, T, K) gives each query the absolute positions of
the keys it may attend to (-1 = padding), on top of the causal mask. Two equal ways to run it (tested):
    masked    dense logits over all S keys, -inf outside the selection (both paths; what transformers does);
    gathered  gather each query's K latents (B, T, K, C) and attend over those in the absorbed form, so the
              cost no longer grows with S (absorbed path, ``sparse_impl="gathered"``: what DSA uses, since its
              top-k indices are distinct; with repeated indices a key would count twice, so MLA's own default
              is "masked", which treats key_indices as a set).

The interface: ``forward(...) -> (B, T, D)`` always; ``attend(...) -> AttentionOutput`` when a caller needs more
than the output (the attention probabilities for DSA's indexer loss, or a precomputed query latent). No state
survives between calls on the module.

Not handled: YaRN / mscale (GLM-5 uses the "default" RoPE), attention dropout, padding masks and per-row
cache lengths (a batch shares one cache length), FP8 caches, fused kernels (FlashMLA; the opt-in Triton kernel
glm5_kernels.sparse_mla covers the gathered path at inference). The DSA indexer lives in dsa.py and passes its
top-k selection in here as ``key_indices``.

References: DeepSeek-V2 (arXiv 2405.04434) section 2.1; DeepSeek-V3 (arXiv 2412.19437) section 2.1;
GLM-5 (arXiv 2602.15763); transformers ``models/glm_moe_dsa``; DeepSeek-V3.2-Exp ``inference/model.py``.

Axes: B batch, T new (query) tokens, S keys (cached + new), H heads, D hidden, R q latent (r_q),
C kv latent (r_kv), N nope dims (d_n), P rope dims (d_r), V value dims (d_v), E = N + P, K selected keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.layers import RMSNorm, apply_rope, triton_usable

SPARSE_IMPLS = ("gathered", "masked")


@dataclass
class AttentionOutput:
    """What ``MLA.attend`` (and ``DSAAttention.attend``) return."""
    out: torch.Tensor                           # (B, T, D) the attention output after o_proj
    probs: torch.Tensor | None = None           # (B, H, T, S) attention probabilities, with return_probs
    key_indices: torch.Tensor | None = None     # (B, T, K) the keys each query attended (None: all causal keys)
    indexer_loss: torch.Tensor | None = None    # () the indexer KL, DSA with indexer_loss=True


class MLACache:
    """Preallocated per-layer decode cache: the normed KV latent and the roped shared key of every token."""

    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        for name, value in (("batch_size", batch_size), ("max_len", max_len), ("kv_lora_rank", kv_lora_rank),
                            ("rope_dim", rope_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MLACache {name}: expected a positive integer, got {value!r}")
        self.batch_size, self.max_len = batch_size, max_len
        self.latent = torch.zeros(batch_size, max_len, kv_lora_rank, dtype=dtype, device=device)  # (B, L, C)
        self.k_rope = torch.zeros(batch_size, max_len, rope_dim, dtype=dtype, device=device)  # (B, L, P)
        self.length = 0

    @classmethod
    def for_config(cls, config: GLM5Config, batch_size: int, max_len: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> "MLACache":
        """A cache for one layer of ``config``. Use the model's dtype: a cache of another dtype is cast on
        every read."""
        return cls(batch_size, max_len, config.kv_lora_rank, config.qk_rope_head_dim, dtype=dtype, device=device)

    def append(self, latent: torch.Tensor, k_rope: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new tokens at slots start_pos..start_pos+T-1; return views of the whole cached prefix."""
        B, L, C = self.latent.shape
        P = self.k_rope.shape[-1]
        if latent.dim() != 3 or latent.shape[0] != B or latent.shape[2] != C:
            raise ValueError(f"MLACache.append latent: expected shape ({B}, T, {C}), got {tuple(latent.shape)}")
        T = latent.shape[1]
        if tuple(k_rope.shape) != (B, T, P):
            raise ValueError(f"MLACache.append k_rope: expected shape ({B}, {T}, {P}), got {tuple(k_rope.shape)}")
        if start_pos != self.length:
            raise ValueError(f"MLACache.append start_pos: expected the cache length {self.length} (tokens must be "
                             f"appended in order), got {start_pos}")
        if self.length + T > L:
            raise ValueError(f"MLACache.append: overflow, length {self.length} + {T} new tokens > max_len {L}")
        self.latent[:, self.length:self.length + T] = latent  # (B, T, C) into slots [length, length + T)
        self.k_rope[:, self.length:self.length + T] = k_rope  # (B, T, P)
        self.length += T
        return self.latent[:, :self.length], self.k_rope[:, :self.length]  # (B, S, C), (B, S, P)

    def truncate(self, new_length: int) -> None:
        """Forget every token from slot new_length on (speculative-decoding rollback)."""
        if isinstance(new_length, bool) or not isinstance(new_length, int) or not 0 <= new_length <= self.length:
            raise ValueError(f"MLACache.truncate new_length: expected an int in [0, {self.length}], got {new_length!r}")
        self.length = new_length


def allowed_keys(query_pos: torch.Tensor, num_keys: int, key_indices: torch.Tensor | None = None,
                 batch_size: int | None = None) -> torch.Tensor:
    """Boolean mask (B|1, T, S): key s is attended by the query at absolute position t iff s <= t and
    (when key_indices is given) s is among that query's selected keys.

    query_pos: (T,) or (B, T) absolute positions, i.e. the index of each query's own key among the S keys.
    key_indices: (B, T, K) integer absolute key positions, -1 = padding; each in [-1, t].
    """
    q = query_pos if query_pos.dim() == 2 else query_pos[None]  # (B|1, T)
    if q.dim() != 2 or (q.numel() and not torch.compiler.is_compiling()  # value checks: eager only (they sync)
                        and (int(q.min()) < 0 or int(q.max()) >= num_keys)):
        raise ValueError(f"query_pos: expected (T,) or (B, T) positions in [0, {num_keys}), got shape "
                         f"{tuple(query_pos.shape)}")
    allowed = torch.arange(num_keys, device=q.device) <= q[..., None]  # (B|1, T, S): causal
    if key_indices is None:
        return allowed
    B = batch_size if batch_size is not None else q.shape[0]
    idx = check_key_indices(key_indices, q, B)  # (B, T, K) int64
    slot = torch.where(idx < 0, num_keys, idx)  # (B, T, K): padding goes to an extra, dropped column
    selected = torch.zeros(*idx.shape[:2], num_keys + 1, dtype=torch.bool, device=q.device)  # (B, T, S + 1)
    selected.scatter_(-1, slot, True)
    return allowed & selected[..., :num_keys]  # (B, T, S)


def check_key_indices(key_indices: torch.Tensor, query_pos: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Validate (B, T, K) integer key positions in [-1, t] for queries at query_pos (B|1, T); return int64."""
    B, T = batch_size, query_pos.shape[-1]
    if not isinstance(key_indices, torch.Tensor) or key_indices.dim() != 3 or key_indices.shape[:2] != (B, T):
        shape = tuple(key_indices.shape) if isinstance(key_indices, torch.Tensor) else type(key_indices).__name__
        raise ValueError(f"key_indices: expected shape ({B}, {T}, K), got {shape}")
    if key_indices.is_floating_point() or key_indices.is_complex() or key_indices.dtype == torch.bool:
        raise ValueError(f"key_indices: expected an integer dtype, got {key_indices.dtype}")
    idx = key_indices.long()
    if idx.numel() and not torch.compiler.is_compiling() and (
            bool((idx < -1).any()) or bool((idx > query_pos.reshape(-1, T, 1)).any())):
        raise ValueError("key_indices: expected values in [-1, t] for the query at position t (-1 = padding), "
                         f"got values in [{int(idx.min())}, {int(idx.max())}]")
    return idx


def attention_core(scores: torch.Tensor, values: torch.Tensor, query_pos: torch.Tensor,
                   key_indices: torch.Tensor | None = None, return_probs: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked softmax over keys, then the weighted sum of values. Used by both MLA paths.

    scores: (B, H, T, S) scaled logits. values: (B, S, H, V) per head, or (B, S, V) shared by all heads
    (the absorbed path, where the values are the latents). query_pos, key_indices: see ``allowed_keys``.
    Returns (out (B, T, H, V), probs (B, H, T, S) with ``return_probs``, else None). A query with no allowed
    key gets zeros (and zero gradients), never NaN.
    """
    B, H, T, S = scores.shape
    if values.shape[0] != B or values.shape[1] != S or values.dim() not in (3, 4):
        raise ValueError(f"values: expected ({B}, {S}, H, V) or ({B}, {S}, V), got {tuple(values.shape)}")
    decode_step = key_indices is None and T == 1 and not torch.compiler.is_compiling()  # (compiled: masks fuse)
    if decode_step and int(query_pos.reshape(-1)[-1]) == S - 1:
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)  # one decode step: every key allowed
    else:
        allowed = allowed_keys(query_pos, S, key_indices, batch_size=B)[:, None]  # (B|1, 1, T, S)
        logits = scores.float().masked_fill(~allowed, torch.finfo(torch.float32).min)
        # an all-masked row becomes uniform here and is zeroed by the second fill: no NaN, no gradient
        probs = torch.softmax(logits, dim=-1).masked_fill(~allowed, 0.0).to(values.dtype)  # (B, H, T, S)
    if values.dim() == 3:
        out = torch.einsum("bhts,bsv->bthv", probs, values)  # (B, T, H, V)
    else:
        out = torch.einsum("bhts,bshv->bthv", probs, values)  # (B, T, H, V)
    return out, (probs if return_probs else None)


class MLA(nn.Module):
    """GLM-5 attention: ``forward(x, positions, cache, absorbed, key_indices) -> (B, T, hidden)``."""

    def __init__(self, config: GLM5Config, layer_idx: int = 0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        c = config
        H, N, P, V = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.num_heads, self.nope_dim, self.rope_dim, self.v_dim = H, N, P, V
        self.kv_lora_rank, self.scale = c.kv_lora_rank, c.softmax_scale
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)  # W^DQ
        self.q_a_layernorm = RMSNorm(c.q_lora_rank, eps=c.rms_norm_eps)
        self.q_b_proj = nn.Linear(c.q_lora_rank, H * (N + P), bias=False)  # W^UQ (and W^QR)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + P, bias=False)  # W^DKV (and W^KR)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, eps=c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (N + V), bias=False)  # W^UK and W^UV, interleaved per head
        self.o_proj = nn.Linear(H * V, c.hidden_size, bias=False)  # W^O

    # --- the pieces (the DSA subclass reuses them) ------------------------------------------------------
    def q_latent(self, x: torch.Tensor) -> torch.Tensor:
        """c^Q = RMSNorm(W^DQ x): (B, T, D) -> (B, T, R). The DSA indexer reads it too."""
        return self.q_a_layernorm(self.q_a_proj(x))

    def project_q(self, c_q: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, R) -> q_nope (B, T, H, N), q_rope (B, T, H, P) with RoPE at ``positions`` ((T,) or (B, T))."""
        q = rearrange(self.q_b_proj(c_q), "b t (h e) -> b t h e", h=self.num_heads)  # (B, T, H, N + P)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, H, N), (B, T, H, P)
        return q_nope, apply_rope(q_rope, positions, self.config.rope_theta, self.config.rope_interleave)

    def project_kv_latent(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> normed latent c^KV (B, T, C), shared key k^R (B, T, P) with RoPE: what the cache holds."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), apply_rope(k_rope, positions, self.config.rope_theta,
                                                       self.config.rope_interleave)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of kv_b_proj.weight as W^UK (H, N, C) and W^UV (H, V, C)."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)  # (H, N+V, C)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]  # (H, N, C), (H, V, C)

    def muon_blocks(self, split_kv: bool = True, split_q_rope: bool = False) -> dict[str, list[tuple[int, int]]]:
        """Per-head row blocks of the up-projections, for Muon Split (muon.py): the attention module knows
        its own head layout. q_b_proj rows are [nope_h; rope_h] per head (one block per head, or two with
        ``split_q_rope``); kv_b_proj rows are [k_nope_h; v_h] per head (K and V as separate blocks unless
        ``split_kv=False``; the paper names W^UK and W^UV separately, so splitting them is our default)."""
        H, N, P, V = self.num_heads, self.nope_dim, self.rope_dim, self.v_dim

        def per_head(first: int, second: int, split: bool) -> list[tuple[int, int]]:
            w = first + second
            if not split:
                return [(h * w, (h + 1) * w) for h in range(H)]
            return [b for h in range(H) for b in ((h * w, h * w + first), (h * w + first, (h + 1) * w))]

        return {"q_b_proj.weight": per_head(N, P, split_q_rope), "kv_b_proj.weight": per_head(N, V, split_kv)}

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: MLACache | None = None,
                absorbed: bool = False, key_indices: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). Arguments as ``attend``."""
        return self.attend(x, positions, cache, absorbed, key_indices).out

    def attend(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: MLACache | None = None,
               absorbed: bool = False, key_indices: torch.Tensor | None = None, *, c_q: torch.Tensor | None = None,
               return_probs: bool = False, sparse_impl: str = "masked", use_triton: bool = False) -> AttentionOutput:
        """Attention of the T new tokens over the cached prefix and themselves.

        positions: (T,) or (B, T) absolute positions; default cache.length + arange(T) (0 + arange without a
        cache). cache: the layer's MLACache; the T new tokens are appended, then attended with the prefix.
        absorbed: False = expanded path (keys/values per head); True = absorbed path (attend over latents).
        key_indices: (B, T, K) absolute key positions each query may attend to (-1 = padding), or None (all
        causal keys). c_q: the query latent q_latent(x) when the caller already computed it (DSA's indexer
        reads it too). return_probs: also return the probabilities (B, H, T, S). sparse_impl: how the absorbed
        path runs key_indices: "masked" (a set: repeats are harmless) or "gathered" (each query's indices must be
        distinct, as DSA's top-k is). use_triton: the gathered path's Triton kernel where it can run.
        A refused call (bad shapes, positions, selection or a full cache) changes nothing in the cache.
        """
        B, T = self.check_input(x, cache)
        if sparse_impl not in SPARSE_IMPLS:
            raise ValueError(f"sparse_impl: expected one of {SPARSE_IMPLS}, got {sparse_impl!r}")
        start = cache.length if cache is not None else 0
        positions = self.resolve_positions(positions, B, T, cache, x.device)  # (B|1, T)
        query_pos = torch.arange(start, start + T, device=x.device)  # (T,): each query's own key slot
        if key_indices is not None:  # checked before the cache is touched
            check_key_indices(key_indices, query_pos, B)
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"cache: overflow, length {start} + {T} new tokens > max_len {cache.max_len}")
        c_q = self.q_latent(x) if c_q is None else c_q  # (B, T, R)
        q_nope, q_rope = self.project_q(c_q, positions)  # (B, T, H, N), (B, T, H, P)
        latent, k_rope = self.project_kv_latent(x, positions)  # (B, T, C), (B, T, P)
        if cache is not None:
            latent, k_rope = cache.append(latent, k_rope, start)  # (B, S, C), (B, S, P), S = start + T
            latent, k_rope = latent.to(x.dtype), k_rope.to(x.dtype)
        if not absorbed:
            out, probs = self.attend_expanded(q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs)
        elif key_indices is not None and sparse_impl == "gathered":
            out, probs = self.attend_gathered(q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs,
                                              use_triton)
        else:
            out, probs = self.attend_absorbed(q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs)
        out = self.o_proj(rearrange(out, "b t h v -> b t (h v)"))  # (B, T, D)
        return AttentionOutput(out=out, probs=probs, key_indices=key_indices)

    # --- the three paths: each returns (out (B, T, H, V), probs (B, H, T, S) or None) -----------------------
    def attend_expanded(self, q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs=False):
        """The textbook path: expand every key and value per head, concatenate nope and rope parts."""
        kv = rearrange(self.kv_b_proj(latent), "b s (h f) -> b s h f", h=self.num_heads)  # (B, S, H, N + V)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)  # (B, S, H, N), (B, S, H, V)
        k_rope = k_rope[:, :, None].expand(-1, -1, self.num_heads, -1)  # (B, S, H, P): one key for all heads
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, E)
        k = torch.cat([k_nope, k_rope], dim=-1)  # (B, S, H, E)
        scores = torch.einsum("bthe,bshe->bhts", q, k) * self.scale  # (B, H, T, S)
        return attention_core(scores, v, query_pos, key_indices, return_probs)  # (B, T, H, V)

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs=False):
        """Fold W^UK into the query and W^UV into the output; keys and values stay 576-d / 512-d latents."""
        w_uk, w_uv = self.absorbed_weights()  # (H, N, C), (H, V, C)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope * self.scale, w_uk)  # (B, T, H, C): (W^UK)^T q^C, scaled
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, latent)
                  + torch.einsum("bthp,bsp->bhts", q_rope * self.scale, k_rope))  # (B, H, T, S)
        o_lat, probs = attention_core(scores, latent, query_pos, key_indices, return_probs)  # (B, T, H, C)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv), probs  # (B, T, H, V): W^UV applied after the sum

    def attend_gathered(self, q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs=False,
                        use_triton=False):
        """Absorbed attention over the K selected latents only: the cost is independent of the context S."""
        B, T, K = key_indices.shape
        S = latent.shape[1]
        idx = check_key_indices(key_indices, query_pos, B)  # (B, T, K) int64, -1 = padding
        w_uk, w_uv = self.absorbed_weights()  # (H, N, C), (H, V, C)
        if use_triton and not return_probs and triton_usable(q_nope, q_rope, latent, k_rope, self.kv_b_proj.weight):
            from glm5_kernels.sparse_mla import absorbed_sparse_attention  # lazy: never at module load
            return absorbed_sparse_attention(q_nope, q_rope, latent, k_rope, idx, w_uk, w_uv, self.scale), None
        valid = idx >= 0  # (B, T, K)
        rows = torch.arange(B, device=idx.device)[:, None, None]  # (B, 1, 1)
        lat = latent[rows, idx.clamp_min(0)]  # (B, T, K, C): each query's selected latents
        kr = k_rope[rows, idx.clamp_min(0)]  # (B, T, K, P)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope * self.scale, w_uk)  # (B, T, H, C), scale folded in
        scores = (torch.einsum("bthc,btkc->bhtk", q_lat, lat)
                  + torch.einsum("bthp,btkp->bhtk", q_rope * self.scale, kr))  # (B, H, T, K)
        logits = scores.float().masked_fill(~valid[:, None], torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1).masked_fill(~valid[:, None], 0.0)  # (B, H, T, K)
        o_lat = torch.einsum("bhtk,btkc->bthc", probs.to(lat.dtype), lat)  # (B, T, H, C)
        out = torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, V)
        if not return_probs:
            return out, None
        full = probs.new_zeros(B, probs.shape[1], T, S + 1)  # (B, H, T, S + 1): padding -> the extra column
        slot = torch.where(valid, idx, S)[:, None].expand(-1, probs.shape[1], -1, -1)  # (B, H, T, K)
        return out, full.scatter_add(-1, slot, probs)[..., :S]  # probabilities scattered back to key positions

    # --- argument checks --------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, cache: MLACache | None) -> tuple[int, int]:
        """x must be (B, T, hidden) floating with T >= 1, and the cache must fit it; returns (B, T)."""
        D = self.config.hidden_size
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != D or x.shape[1] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (B, T, {D}) with T >= 1, got {shape}")
        if not x.is_floating_point():
            raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
        if cache is not None:
            expected = (x.shape[0], self.kv_lora_rank, self.rope_dim)
            got = (cache.batch_size, cache.latent.shape[-1], cache.k_rope.shape[-1])
            if got != expected:
                raise ValueError(f"cache: expected (batch, kv_lora_rank, rope_dim) = {expected}, got {got}")
        return x.shape[0], x.shape[1]

    def resolve_positions(self, positions, B: int, T: int, cache: MLACache | None, device) -> torch.Tensor:
        """Checked positions (B|1, T): the given ones, or cache.length + arange(T) by default."""
        start = cache.length if cache is not None else 0
        limit = self.config.max_position_embeddings
        if positions is None:  # the default needs no check on tensor values (no device sync)
            if start + T > limit:
                raise ValueError(f"positions: expected values in [0, max_position_embeddings = {limit}), got "
                                 f"[{start}, {start + T - 1}]")
            return torch.arange(start, start + T, device=device)[None]  # (1, T)
        if (not isinstance(positions, torch.Tensor) or positions.is_floating_point() or positions.is_complex()
                or positions.dtype == torch.bool):
            raise ValueError(f"positions: expected an integer tensor, got {getattr(positions, 'dtype', positions)}")
        if positions.dim() == 1:
            positions = positions[None]  # (1, T)
        if positions.dim() != 2 or positions.shape[1] != T or positions.shape[0] not in (1, B):
            raise ValueError(f"positions: expected shape ({T},) or ({B}, {T}), got {tuple(positions.shape)}")
        if torch.compiler.is_compiling():  # value checks: eager only (each one syncs and breaks the graph)
            return positions
        expected = torch.arange(start, start + T, device=device)  # (T,)
        if cache is not None and not bool((positions == expected).all()):
            raise ValueError(f"positions: with a cache of length {start} the {T} new tokens must be at "
                             f"positions {start}..{start + T - 1}, got first positions {positions[:, 0].tolist()}")
        if int(positions.min()) < 0 or int(positions.max()) >= limit:
            raise ValueError(f"positions: expected values in [0, max_position_embeddings = {limit}), got "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        return positions
