"""One MLA decode step at GLM-5 layer size: the absorbed path over the latent cache against the expanded path
over a per-head K/V cache.

Both steps take the hidden state of one new token per sequence (fp32, CPU), project it, attend over a context
of L cached tokens plus itself, and return the layer output. They differ in what was cached:

    expanded   K (H, L, 256) = [k_nope; k_rope] and V (H, L, 256) per head, the way a plain attention caches
               (2 * 64 * 256 = 32768 values per token); the step only projects the new token and attends.
    absorbed   the latent cache of glm5_ref.mla (512 + 64 = 576 values per token); W^UK is folded into the
               query and W^UV into the output, so attention runs over the latents (MLA(..., absorbed=True)).

Per cached token the two do about the same arithmetic (64 heads x (576 + 512) multiply-adds absorbed,
64 x (256 + 256) expanded), but the expanded cache is 57x larger, so on a CPU the expanded step is bound by
memory bandwidth. Both steps also read the same layer weights (about 165M values, 660 MB in fp32), a
fixed cost that bounds the whole-step ratio (Amdahl); the attn_* columns time the cache-reading part alone
(scores, softmax, weighted sum; for the absorbed path also the two folds). The four timings are taken in
turns so that all see the same load on a shared machine. Both outputs are compared (``rel_diff``) so that
the timing is of two computations of the same thing.

Two batches per context: 1, where every step re-reads the layer's weights for one token, and the serving batch
(bench.serving_batch: the most sequences whose two caches fit 12 GiB, at most 64), the case MLA is built for:
the weight reads are shared by the batch and the cache reads, 57x apart, decide the step.

Columns: ms per step (median), ratio = expanded / absorbed, bytes read per step = cache + weights touched.
"""

from __future__ import annotations

import torch
from einops import rearrange
from tqdm import tqdm

from glm5_ref.apps.bench import serving_batch, timeit
from glm5_ref.config import GLM5Config
from glm5_ref.mla import MLA, MLACache, attention_core


class ExpandedKVCache:
    """Per-head K (B, H, L, N + P) and V (B, H, L, V), filled from the same tokens as an MLACache."""

    def __init__(self, mla: MLA, cache: MLACache, max_len: int, chunk: int = 1024):
        B, L = cache.batch_size, cache.length
        H, N, P, V = mla.num_heads, mla.nope_dim, mla.rope_dim, mla.v_dim
        self.device = cache.latent.device
        self.k = torch.empty(B, H, max_len, N + P, device=self.device)  # (B, H, L, E)
        self.v = torch.empty(B, H, max_len, V, device=self.device)  # (B, H, L, V)
        for a in range(0, L, chunk):  # expand the cached latents a chunk at a time (bounded memory)
            b = min(L, a + chunk)
            kv = rearrange(mla.kv_b_proj(cache.latent[:, a:b]), "b s (h f) -> b h s f", h=H)  # (B, H, s, N + V)
            self.k[:, :, a:b, :N] = kv[..., :N]
            self.k[:, :, a:b, N:] = cache.k_rope[:, None, a:b]  # the shared rope key, copied into every head
            self.v[:, :, a:b] = kv[..., N:]
        self.length = L

    def step(self, mla: MLA, x: torch.Tensor) -> torch.Tensor:
        """Project the new token (B, 1, D), write its K/V at slot L, attend over slots 0..L; -> (B, 1, D)."""
        L, H, N = self.length, mla.num_heads, mla.nope_dim
        pos = torch.tensor([L], device=self.device)  # (T=1,)
        q_nope, q_rope = mla.project_q(mla.q_latent(x), pos)  # (B, 1, H, N), (B, 1, H, P)
        latent, k_rope = mla.project_kv_latent(x, pos)  # (B, 1, C), (B, 1, P)
        kv = rearrange(mla.kv_b_proj(latent), "b t (h f) -> b h t f", h=H)  # (B, H, 1, N + V)
        self.k[:, :, L:L + 1, :N] = kv[..., :N]
        self.k[:, :, L:L + 1, N:] = k_rope[:, None]  # (B, 1, 1, P) broadcast over heads
        self.v[:, :, L:L + 1] = kv[..., N:]
        out = self.attend(mla, torch.cat([q_nope, q_rope], dim=-1))  # (B, 1, H, V)
        return mla.o_proj(rearrange(out, "b t h v -> b t (h v)"))  # (B, 1, D)

    def attend(self, mla: MLA, q: torch.Tensor) -> torch.Tensor:
        """The part that reads the cache: q (B, 1, H, E) against slots 0..L -> (B, 1, H, V)."""
        L = self.length
        k, v = self.k[:, :, :L + 1], self.v[:, :, :L + 1]  # (B, H, S, E), (B, H, S, V): contiguous per head
        scores = torch.einsum("bthe,bhse->bhts", q, k) * mla.scale  # (B, H, 1, S)
        pos = torch.tensor([L], device=self.device)
        return attention_core(scores, v.transpose(1, 2), pos)[0]  # values viewed as (B, S, H, V)


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median ms of each fn, timed in turns (A, B, C, D, A, B, ...) so that all see the same load on a
    shared machine."""
    times = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, t in zip(fns, times):
            ms = timeit(fn, repeats=1, warmup=0)
            if r:  # round 0 is the warm-up
                t.append(ms)
    return [sorted(t)[len(t) // 2] for t in times]


def run(quick: bool = False, device: torch.device = torch.device("cpu")) -> list[dict]:
    config = GLM5Config.glm5()
    contexts = (512, 1024) if quick else (4096, 16384)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        mla = MLA(config).eval().to(device)  # one layer at GLM-5 size: ~165M fp32 values (~660 MB)
        weight_bytes = sum(p.numel() * p.element_size() for p in mla.parameters())
        H, E, V = mla.num_heads, mla.nope_dim + mla.rope_dim, mla.v_dim
        for L in tqdm(contexts, desc="mla-decode", leave=False):
            S = L + 1
            per_seq = S * (H * (E + V) + config.kv_cache_values_per_token(include_indexer=False)) * 4  # both caches
            for B in sorted({1, serving_batch(per_seq, quick)}):
                rows.append(measure(mla, config, L, B, 3 if quick else 9 if B == 1 else 5, device) | {
                    "expanded_bytes": B * S * H * (E + V) * 4 + weight_bytes,  # cache read + weights touched
                    "absorbed_bytes": B * S * config.kv_cache_values_per_token(include_indexer=False) * 4
                    + weight_bytes, "weight_bytes": weight_bytes})
    return rows


def measure(mla: MLA, config: GLM5Config, L: int, B: int, repeats: int, device) -> dict:
    """One row: a decode step of B sequences over L cached tokens each, both paths (module docstring)."""
    cache = MLACache.for_config(config, batch_size=B, max_len=L + 1, device=device)
    # a context of L tokens: random normed latents and roped keys stand in for a real prefix
    cache.append(mla.kv_a_layernorm(torch.randn(B, L, config.kv_lora_rank, device=device)),
                 torch.randn(B, L, config.qk_rope_head_dim, device=device), start_pos=0)
    expanded = ExpandedKVCache(mla, cache, max_len=L + 1)
    x = torch.randn(B, 1, config.hidden_size, device=device)

    def absorbed_step() -> torch.Tensor:
        out = mla(x, cache=cache, absorbed=True)  # appends at slot L ...
        cache.truncate(L)  # ... and forgets it, so every repeat sees the same context
        return out

    reference = expanded.step(mla, x)
    rel_diff = float((absorbed_step() - reference).norm() / reference.norm())
    # the cache-reading part alone (no projections): what the cache layout changes
    pos = torch.tensor([L], device=device)
    q_nope, q_rope = mla.project_q(mla.q_latent(x), pos)  # (B, 1, H, N), (B, 1, H, P)
    prefix = (cache.latent[:, :L + 1], cache.k_rope[:, :L + 1])  # slot L holds a stale token: same cost
    expanded_ms, absorbed_ms, attn_expanded_ms, attn_absorbed_ms = interleaved_medians([
        lambda: expanded.step(mla, x), absorbed_step,
        lambda: expanded.attend(mla, torch.cat([q_nope, q_rope], -1)),
        lambda: mla.attend_absorbed(q_nope, q_rope, *prefix, pos, None)[0]], repeats)
    return {"name": "mla-decode", "context": L, "batch": B,
            "expanded_ms": expanded_ms, "absorbed_ms": absorbed_ms, "ratio": expanded_ms / absorbed_ms,
            "attn_expanded_ms": attn_expanded_ms, "attn_absorbed_ms": attn_absorbed_ms,
            "attn_ratio": attn_expanded_ms / attn_absorbed_ms, "rel_diff": rel_diff}
