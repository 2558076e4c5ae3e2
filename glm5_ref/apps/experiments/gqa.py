"""The two attention arms of the muon-split experiment besides GLM-5's MLA: grouped-query attention (GQA-8, the
paper's Table 1 baseline) and MLA that records its largest attention logit; ``build_model`` swaps them into a
GLM5ForCausalLM. Experiment code (muon_split.py), not a component: no cache, training only.

Both record, while ``track`` is True, the largest causal logit q.k * scale of their last forward in
``max_logit`` (a scalar tensor): the quantity QK-clip would bound, which the paper reports stays bounded under
Muon Split without it.

GQA-8 (Table 1's baseline): 8 KV groups for the 16 query heads (2 query heads share a KV head), the same per-head
dims as MLA (q/k 24 = 16 position-free + 8 rotated by RoPE, the partial rotary of GLM's GQA models; v 16), no
low-rank compression. Its cache is 8 * (24 + 16) = 320 values per token against MLA's 32 + 8 = 40 (8x; the
paper's 2048 vs 576 is 3.6x) and it has more attention parameters. Same softmax scale 1/sqrt(24).
Axes: B batch, T tokens, H query heads, G KV groups, E q/k head dim, V value head dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.layers import apply_rope
from glm5_ref.mla import MLA, allowed_keys, attention_core
from glm5_ref.model import GLM5ForCausalLM


def causal_max_logit(scores: torch.Tensor) -> torch.Tensor:
    """Largest entry of scaled logits (B, H, T, S) among the causal (allowed) keys, the queries being the last T
    positions of the S keys."""
    T, S = scores.shape[-2:]
    allowed = allowed_keys(torch.arange(S - T, S, device=scores.device), S)  # (T, S)
    return scores.detach().float().masked_fill(~allowed, float("-inf")).amax()


class TrackedMLA(MLA):
    """glm5_ref.mla.MLA (dense) that keeps the largest causal logit of its last expanded forward in
    ``max_logit`` while ``track`` is True (a scalar tensor; None otherwise)."""

    def __init__(self, config: GLM5Config, layer_idx: int = 0):
        super().__init__(config, layer_idx)
        self.track, self.max_logit = False, None

    def attend_expanded(self, q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs=False):
        if self.track:  # recompute the logits the parent forms (one extra einsum, only on tracked steps)
            kv = rearrange(self.kv_b_proj(latent), "b s (h f) -> b s h f", h=self.num_heads)  # (B, S, H, N + V)
            k_nope = kv[..., :self.nope_dim]  # (B, S, H, N)
            scores = (torch.einsum("bthn,bshn->bhts", q_nope, k_nope)
                      + torch.einsum("bthp,bsp->bhts", q_rope, k_rope)) * self.scale  # (B, H, T, S)
            self.max_logit = causal_max_logit(scores)
        return super().attend_expanded(q_nope, q_rope, latent, k_rope, query_pos, key_indices, return_probs)


class GQA(nn.Module):
    """Grouped-query attention with partial RoPE, a drop-in for MLA in a DecoderLayer:
    ``forward(x, positions=None, cache=None, absorbed=False) -> (B, T, D)``.

    q_h = W^Q_h x (E dims: ``nope`` position-free then ``rope`` rotated), k_g, v_g = W^K_g x, W^V_g x for
    G = ``n_kv_groups`` groups; query head h reads group h // (H / G). out = W^O [softmax(q k^T * scale) v]_h.
    No cache (training only); ``muon_blocks`` gives the per-head row blocks of q/k/v_proj for Muon Split.
    """

    def __init__(self, hidden_size: int, num_heads: int, n_kv_groups: int, nope_dim: int, rope_dim: int,
                 v_dim: int, rope_theta: float = 10_000.0, rope_interleave: bool = True):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("n_kv_groups", n_kv_groups),
                            ("v_dim", v_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GQA {name}: expected a positive integer, got {value!r}")
        if num_heads % n_kv_groups:
            raise ValueError(f"GQA n_kv_groups: expected a divisor of num_heads = {num_heads}, got {n_kv_groups}")
        if nope_dim < 0 or rope_dim < 0 or rope_dim % 2 or nope_dim + rope_dim < 1:
            raise ValueError(f"GQA nope_dim, rope_dim: expected nope >= 0 and an even rope >= 0 with a positive "
                             f"sum, got {nope_dim}, {rope_dim}")
        self.num_heads, self.n_kv_groups = num_heads, n_kv_groups
        self.nope_dim, self.rope_dim, self.v_dim = nope_dim, rope_dim, v_dim
        self.head_dim = nope_dim + rope_dim
        self.scale = self.head_dim ** -0.5
        self.rope_theta, self.rope_interleave = rope_theta, rope_interleave
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, n_kv_groups * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, n_kv_groups * v_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * v_dim, hidden_size, bias=False)
        self.track, self.max_logit = False, None

    @classmethod
    def from_config(cls, config: GLM5Config, n_kv_groups: int) -> "GQA":
        """A GQA with MLA's per-head dims (q/k = nope + rope, v) and the config's RoPE settings."""
        return cls(config.hidden_size, config.num_attention_heads, n_kv_groups, config.qk_nope_head_dim,
                   config.qk_rope_head_dim, config.v_head_dim, config.rope_theta, config.rope_interleave)

    def muon_blocks(self) -> dict[str, list[tuple[int, int]]]:
        """One row block per head of q_proj and per KV group of k_proj and v_proj."""
        def per(rows: int, n: int) -> list[tuple[int, int]]:
            return [(i * rows, (i + 1) * rows) for i in range(n)]
        return {"q_proj.weight": per(self.head_dim, self.num_heads),
                "k_proj.weight": per(self.head_dim, self.n_kv_groups),
                "v_proj.weight": per(self.v_dim, self.n_kv_groups)}

    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if not self.rope_dim:
            return t
        nope, rope = t.split([self.nope_dim, self.rope_dim], dim=-1)  # (B, T, h, N), (B, T, h, P)
        return torch.cat([nope, apply_rope(rope, positions, self.rope_theta, self.rope_interleave)], dim=-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None, absorbed: bool = False,
                key_indices: torch.Tensor | None = None) -> torch.Tensor:
        if cache is not None or key_indices is not None:
            raise ValueError("GQA: cache and key_indices are not supported (training-only baseline); pass None")
        D = self.q_proj.in_features
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != D or x.shape[1] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"GQA x: expected shape (B, T, {D}) with T >= 1, got {shape}")
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device) if positions is None else positions
        q = rearrange(self.q_proj(x), "b t (h e) -> b t h e", h=self.num_heads)  # (B, T, H, E)
        k = rearrange(self.k_proj(x), "b t (g e) -> b t g e", g=self.n_kv_groups)  # (B, T, G, E)
        v = rearrange(self.v_proj(x), "b t (g v) -> b t g v", g=self.n_kv_groups)  # (B, T, G, V)
        q, k = self._rope(q, positions), self._rope(k, positions)
        rep = self.num_heads // self.n_kv_groups
        k = k.repeat_interleave(rep, dim=2)  # (B, T, H, E): head h reads group h // rep
        v = v.repeat_interleave(rep, dim=2)  # (B, T, H, V)
        scores = torch.einsum("bthe,bshe->bhts", q, k) * self.scale  # (B, H, T, T)
        if self.track:
            self.max_logit = causal_max_logit(scores)
        out, _ = attention_core(scores, v, torch.arange(T, device=x.device))  # (B, T, H, V), causal
        return self.o_proj(rearrange(out, "b t h v -> b t (h v)"))  # (B, T, D)


def build_model(config: GLM5Config, attention: str = "mla", n_kv_groups: int | None = None,
                seed: int = 0) -> GLM5ForCausalLM:
    """GLM5ForCausalLM(config) with every layer's self_attn replaced by TrackedMLA ("mla") or GQA ("gqa", with
    ``n_kv_groups`` groups, default min(8, heads)), all weights drawn from N(0, initializer_range) under ``seed``."""
    if attention not in ("mla", "gqa"):
        raise ValueError(f"build_model attention: expected 'mla' or 'gqa', got {attention!r}")
    G = n_kv_groups if n_kv_groups is not None else default_kv_groups(config)
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = TrackedMLA(config, i) if attention == "mla" else GQA.from_config(config, G)
    torch.manual_seed(seed)
    model._init_weights()  # the swapped-in modules get the same init as the rest (RMSNorm gains stay at one)
    return model


def default_kv_groups(config: GLM5Config) -> int:
    """8 KV groups (GQA-8), or as many as the head count allows (the largest divisor of H that is <= 8)."""
    H = config.num_attention_heads
    return max(g for g in range(1, min(8, H) + 1) if H % g == 0)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]
