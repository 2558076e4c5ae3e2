"""Sliding-window attention (SWA) over GLM-5's MLA: a window mask in training, a ring of latents at decode.

What it is
    The first efficient-attention arm GLM-5 compares DSA with (GLM-5 report, section 2.1.2): each query sees
    only the W most recent keys, itself included,

        a_t,s,i = softmax_s( q_t,i . k_s,i / sqrt(d_n + d_r) )   over   t - W < s <= t

    with q, k, v exactly those of MLA (mla.py). ``SlidingWindowMLA`` subclasses ``MLA``: same parameters under
    the same names (a dense MLA or DSA checkpoint's ``self_attn`` loads unchanged, ``from_mla``), same
    ``forward(x, positions, cache, absorbed, key_indices)``, and the same three attention paths (expanded,
    absorbed, gathered). The window reaches MLA through its existing argument ``key_indices`` (the W absolute
    key positions of each query, -1 before the sequence start), so there is no second attention kernel:

        training / prefill  all T keys, -inf outside the window (MLA's masked key selection, expanded path)
        decode              ``RingMLACache``: a fixed (B, W, C) + (B, W, P) buffer, position p in slot p % W.
                            New tokens attend over [the last W - 1 cached tokens, read back in position
                            order; themselves], then overwrite the oldest slots. Keys carry RoPE at their
                            absolute position when cached, so the order inside the ring never matters.

    While every query's causal keys fit in the window (T <= W without a cache), no key_indices are passed at
    all: the computation is MLA's, operation for operation (tested bit for bit).

Cost per token per layer (GLM-5 sizes: H = 64, C = r_kv = 512, P = d_r = 64, N = d_n = 192, V = 256)
    cache       W * (C + P) values, whatever the context: 4096 * 576 = 2.36M values (4.5 MiB bf16) at W = 4096,
                against 576 per token of context for dense MLA (the same at 4096 tokens, 32x less at 128K).
    decode      absorbed, per key: H * (C + P) + H * C = 69,632 multiply-adds: W keys instead of S.
    training    expanded, per (query, key) pair H * (N + P + V) = 32,768; with a mask the reference still
                computes all S keys and discards S - W (a fused kernel would skip them: not done here).

What the paper leaves open, and what we chose
    * Window convention: W counts the query's own key (Mistral's convention, s in (t - W, t]). Table 4 uses
      W = 4096 at a 1:1 ratio of full to SWA layers; the paper does not say whether its 4096 includes the query.
    * SWA layers keep RoPE and every projection of the dense layer unchanged (Table 4 converts GLM-9B's
      layers "without any additional training"), no attention sinks, no per-layer window sizes.
    * The ring keeps W slots by default (``capacity`` > W keeps more, so that ``truncate`` can roll back a
      speculative draft of up to capacity - W + 1 tokens); a refused call changes nothing in the cache.

The paper's numbers for these arms (GLM-9B, GQA, 40 layers; section 2.1.2)
    Table 4 (no training, 1:1 full:SWA, W = 4096): the searched pattern SFSSFFSSSFFFFSSFSFFFFFFSFSFSSFSSFSFSSFSSS
    (beam 8, two layers per step, searched at 16K) beats the fixed interleave at every RULER length.
    Table 5 (190B tokens of continual training at 64K), RULER 64K / 128K: baseline 85.35 / 75.28, SWA interleave
    65.94 / 44.93 (-30.35 at 128K, quoted in the text), SWA pattern 83.72 / 69.59 (-5.69, the text's "up to 5.69
    points on RULER@128K"). Tables 4-5 are images in the report; the figures other than -30.35 and 5.69 are
    from secondary transcriptions of Table 5 and should be checked against the PDF.

Not handled: per-row cache lengths, attention sinks, a fused windowed kernel (the masked path costs O(T S)).
Axes: B batch, T new tokens, S keys attended (cached + new), W window, C kv latent, P rope dims, K selected keys.
"""

from __future__ import annotations

import torch
from einops import rearrange

from glm5_ref.config import GLM5Config
from glm5_ref.mla import MLA, SPARSE_IMPLS, AttentionOutput, check_key_indices


def check_window(name: str, value) -> int:
    """A window (or ring capacity) must be a positive int; returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive integer (keys per query, its own included), got {value!r}")
    return value


class RingMLACache:
    """The decode cache of one SWA layer: the normed KV latent and roped shared key of the last ``capacity``
    tokens (default: the window), token p in slot p % capacity. ``length`` counts every token ever appended."""

    def __init__(self, batch_size: int, window: int, kv_lora_rank: int, rope_dim: int, capacity: int | None = None,
                 max_len: int | None = None, dtype: torch.dtype = torch.float32, device=None):
        self.window = check_window("RingMLACache window", window)
        self.capacity = check_window("RingMLACache capacity", window if capacity is None else capacity)
        if self.capacity < self.window:
            raise ValueError(f"RingMLACache capacity: expected >= window = {window}, got {capacity}")
        self.batch_size = check_window("RingMLACache batch_size", batch_size)
        self.max_len = check_window("RingMLACache max_len", max_len) if max_len is not None else 2**62
        self.latent = torch.zeros(batch_size, self.capacity, kv_lora_rank, dtype=dtype, device=device)  # (B, W, C)
        self.k_rope = torch.zeros(batch_size, self.capacity, rope_dim, dtype=dtype, device=device)  # (B, W, P)
        self.length = 0

    @classmethod
    def for_config(cls, config: GLM5Config, batch_size: int, window: int, max_len: int | None = None,
                   dtype: torch.dtype = torch.float32, device=None, capacity: int | None = None) -> "RingMLACache":
        return cls(batch_size, window, config.kv_lora_rank, config.qk_rope_head_dim, capacity=capacity,
                   max_len=max_len, dtype=dtype, device=device)

    def recent(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The last n cached tokens (n <= min(length, capacity)) in position order: (B, n, C), (B, n, P)."""
        slots = torch.arange(self.length - n, self.length, device=self.latent.device) % self.capacity  # (n,)
        return self.latent[:, slots], self.k_rope[:, slots]

    def write(self, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Append T tokens at positions length .. length + T - 1; only the last ``capacity`` of them are kept."""
        T = latent.shape[1]
        m = min(T, self.capacity)
        slots = torch.arange(self.length + T - m, self.length + T, device=self.latent.device) % self.capacity
        self.latent[:, slots] = latent[:, T - m:].to(self.latent.dtype)  # (B, m, C): m distinct slots
        self.k_rope[:, slots] = k_rope[:, T - m:].to(self.k_rope.dtype)
        self.length += T

    def truncate(self, new_length: int) -> None:
        """Forget tokens from new_length on, where the ring still holds the W - 1 tokens before new_length."""
        lowest = 0 if self.length <= self.capacity else self.length - self.capacity + self.window - 1
        if isinstance(new_length, bool) or not isinstance(new_length, int) or not lowest <= new_length <= self.length:
            raise ValueError(f"RingMLACache.truncate new_length: expected an int in [{lowest}, {self.length}] (older "
                             f"tokens the window needs are overwritten; capacity {self.capacity}), got {new_length!r}")
        self.length = new_length


def window_key_indices(query_pos: torch.Tensor, window: int, first_key: int = 0) -> torch.Tensor:
    """(T, W) the key positions in (t - W, t] of each query position t, -1 for those before ``first_key``."""
    idx = query_pos[:, None] - window + 1 + torch.arange(window, device=query_pos.device)  # (T, W), ascending
    return torch.where(idx >= first_key, idx, -1)


def restrict_to_window(key_indices: torch.Tensor, query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """A query's own selection (B, T, K) intersected with its window: indices at or before t - W become -1."""
    return torch.where(key_indices > query_pos[None, :, None] - window, key_indices, -1)


class SlidingWindowMLA(MLA):
    """MLA restricted to a sliding window: ``forward(x, positions, cache, absorbed, key_indices) -> (B, T, D)``,
    with ``cache`` a ``RingMLACache`` (``new_cache``). Parameters are MLA's, under MLA's names."""

    def __init__(self, config: GLM5Config, layer_idx: int = 0, window: int = 4096):
        super().__init__(config, layer_idx)
        self.window = check_window("window", window)

    @classmethod
    def from_mla(cls, attn: MLA, window: int) -> "SlidingWindowMLA":
        """A SWA layer with the weights of ``attn`` (an MLA or a DSAAttention, whose indexer is left out)."""
        swa = cls(attn.config, attn.layer_idx, window).to(device=attn.q_a_proj.weight.device,
                                                          dtype=attn.q_a_proj.weight.dtype)
        own = set(swa.state_dict())  # MLA's tensors: a DSAAttention's indexer.* are left out
        swa.load_state_dict({k: v for k, v in attn.state_dict().items() if k in own})
        return swa

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                  device=None) -> RingMLACache:
        return RingMLACache.for_config(self.config, batch_size, self.window, max_len, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: RingMLACache | None = None,
                absorbed: bool = False, key_indices: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). Arguments as ``attend``."""
        return self.attend(x, positions, cache, absorbed, key_indices).out

    def attend(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: RingMLACache | None = None,
               absorbed: bool = False, key_indices: torch.Tensor | None = None, *, return_probs: bool = False,
               sparse_impl: str = "masked") -> AttentionOutput:
        """Windowed attention of T new tokens over the ring (when given) and themselves.

        positions: as MLA (default cache.length + arange(T)). key_indices: (B, T, K) absolute key positions a
        query may attend to (-1 = padding), intersected with its window. Returns out, and with return_probs
        the probabilities (B, H, T, S) over the S = n + T keys attended: the n cached ones, then the new ones.
        """
        if cache is not None and not isinstance(cache, RingMLACache):
            raise ValueError(f"cache: expected a RingMLACache (see new_cache), got {type(cache).__name__}")
        if cache is not None and cache.window != self.window:
            raise ValueError(f"cache: expected a ring for window {self.window}, got window {cache.window}")
        if sparse_impl not in SPARSE_IMPLS:
            raise ValueError(f"sparse_impl: expected one of {SPARSE_IMPLS}, got {sparse_impl!r}")
        B, T = self.check_input(x, cache)
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"cache: overflow, length {start} + {T} new tokens > max_len {cache.max_len}")
        positions = self.resolve_positions(positions, B, T, cache, x.device)  # (B|1, T), checked
        query_pos = torch.arange(start, start + T, device=x.device)  # (T,) absolute
        if key_indices is not None:
            key_indices = restrict_to_window(check_key_indices(key_indices, query_pos, B), query_pos, self.window)
        n = min(start, self.window - 1)  # cached keys still inside the first new query's window
        q_nope, q_rope = self.project_q(self.q_latent(x), positions)  # (B, T, H, N), (B, T, H, P)
        latent, k_rope = self.project_kv_latent(x, positions)  # (B, T, C), (B, T, P)
        keys_lat, keys_rope = latent, k_rope
        if n:
            old_lat, old_rope = cache.recent(n)  # (B, n, C), (B, n, P): positions start - n .. start - 1
            keys_lat = torch.cat([old_lat.to(x.dtype), latent], dim=1)  # (B, S, C), S = n + T
            keys_rope = torch.cat([old_rope.to(x.dtype), k_rope], dim=1)  # (B, S, P)
        slots = self.key_slots(query_pos, start - n, key_indices, B)  # (B, T, K) slot indices, or None
        query_slot = query_pos - (start - n)  # (T,): each query's own key among the S keys
        out, probs = self.attend_path(q_nope, q_rope, keys_lat, keys_rope, query_slot, slots, absorbed,
                                      sparse_impl, return_probs)
        if cache is not None:
            cache.write(latent, k_rope)  # after reading: the new tokens overwrite the oldest slots
        out = self.o_proj(rearrange(out, "b t h v -> b t (h v)"))  # (B, T, D)
        return AttentionOutput(out=out, probs=probs, key_indices=key_indices)

    def key_slots(self, query_pos: torch.Tensor, first: int, key_indices: torch.Tensor | None,
                  batch_size: int) -> torch.Tensor | None:
        """The keys each query may attend to, as indices into the S keys held (key position - first), (B, T, K);
        None when every query's causal keys already lie inside its window (plain causal MLA then)."""
        if key_indices is not None:
            return torch.where(key_indices >= first, key_indices - first, -1)
        if int(query_pos[-1]) - first < self.window:
            return None
        return window_key_indices(query_pos - first, self.window)[None].expand(batch_size, -1, -1)  # (B, T, W)

    def attend_path(self, q_nope, q_rope, latent, k_rope, query_slot, slots, absorbed, sparse_impl, return_probs):
        """MLA's expanded, absorbed or gathered attention (mla.py) over the keys held."""
        if not absorbed:
            return self.attend_expanded(q_nope, q_rope, latent, k_rope, query_slot, slots, return_probs)
        if slots is not None and sparse_impl == "gathered":
            return self.attend_gathered(q_nope, q_rope, latent, k_rope, query_slot, slots, return_probs)
        return self.attend_absorbed(q_nope, q_rope, latent, k_rope, query_slot, slots, return_probs)


def naive_sliding_window_mla(mla: MLA, x: torch.Tensor, window: int,
                             positions: torch.Tensor | None = None) -> torch.Tensor:
    """The twin, written plainly: full causal MLA over all T keys with -inf outside (t - W, t]. (B, T, D)."""
    check_window("window", window)
    B, T, _ = x.shape
    positions = torch.arange(T, device=x.device) if positions is None else positions
    H = mla.num_heads
    q_nope, q_rope = mla.project_q(mla.q_latent(x), positions)  # (B, T, H, N), (B, T, H, P)
    latent, k_rope = mla.project_kv_latent(x, positions)  # (B, T, C), (B, T, P)
    k_nope, v = mla.kv_b_proj(latent).unflatten(-1, (H, -1)).split([mla.nope_dim, mla.v_dim], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, N + P)
    k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, H, -1)], dim=-1)  # (B, T, H, N + P)
    scores = torch.einsum("bthe,bshe->bhts", q, k) * mla.scale  # (B, H, T, T)
    t, s = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
    inside = (s <= t) & (s > t - window)  # (T, T): causal and within the window
    probs = torch.softmax(scores.float().masked_fill(~inside, float("-inf")), dim=-1).to(v.dtype)  # fp32, as MLA
    out = torch.einsum("bhts,bshv->bthv", probs, v)  # (B, T, H, V)
    return mla.o_proj(out.flatten(-2))
