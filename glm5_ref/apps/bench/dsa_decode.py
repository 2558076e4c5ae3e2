"""One decode step of a GLM-5 attention layer at long context: DSA (lightning indexer + top-k + sparse MLA)
against dense absorbed MLA over every cached key.

One ``DSAAttention`` at GLM-5 size (hidden 6144, 64 heads, r_kv 512, indexer 32 x 128, index_topk 2048;
about 175M fp32 values, nn.Linear's default init), CPU, under ``torch.no_grad()``, at batch 1 and at the
serving batch (bench.serving_batch: the most sequences whose caches fit 12 GiB, at most 64; there the
projections' weight reads are shared by the batch, so the attention cores decide the step). A ``DSACache``
is filled directly with L random tokens (RMS-normed latents, random rope keys, LayerNorm-ed indexer keys:
no 128K prefill), then one new token is timed, and ``cache.truncate(L)`` after each call makes every call
see the same context. Timed side by side, interleaved repeat by repeat (the machine is shared):

    dsa_ms       DSAAttention(absorbed=True), sparse, sparse_impl="gathered": the indexer scores all L + 1
                 keys, torch.topk keeps 2048, absorbed attention runs over the 2048 gathered latents
    dense_ms     the same module with sparse=False: absorbed attention over all L + 1 latents (the
                 indexer only caches the new token's key: it scores nothing unless asked for its loss)
    mla_ms       plain MLA sharing the same weights (no indexer at all): the dense model one would deploy
    indexer_ms   the indexer alone: its projections, scores over all keys, select_topk
    fixed_ms     a decode step over a 1-token context: the projections and folds every step pays whatever
                 the context (about 175M weights read once per token, memory-bound on a CPU)
    attn_*_ms    the context-dependent part alone: dense absorbed attention core vs indexer + top-k +
                 gathered attention

Expected arithmetic (multiply-adds per generated token, attention core only, S = L + 1 keys):
    dense  H (r_kv + d_r + r_kv) S = 64 * 1088 * S          (logit over 576 dims, average over 512)
    DSA    H_I d_I S + H (2 r_kv + d_r) min(k, S) = 4096 S + 69632 * 2048
so ``mac_ratio`` is 8.2x at 32K and 13.4x at 128K. ``step_mac_ratio`` adds the projections (about 175M
multiply-adds, the same on both sides). On a CPU the projections are matrix-vector products bound by memory
bandwidth while the attention cores are matrix-matrix products, so the measured step ratio falls below
step_mac_ratio: ``fixed_ms`` bounds it by dense_ms / fixed_ms whatever the indexer costs.
``rel_diff`` compares the gathered output against the masked path (dense logits, -inf outside the top-k),
so the timed DSA step is checked to compute the same thing; ``dense_vs_mla`` does the same for the two dense
baselines.

On a machine shared with other jobs, run it with OMP_WAIT_POLICY=PASSIVE (or OMP_NUM_THREADS=1). By default
libgomp's idle worker threads spin; when another process holds one of the two cores, every parallel op then
waits for a scheduler time slice (several ms), which inflates the many small ops of the DSA step far more than
the few large matrix products of the dense step (measured here: a DSA step 3-6x slower, ratios below 1).
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from tqdm import tqdm

from glm5_ref.apps.bench import serving_batch, timeit
from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention, DSACache, select_topk
from glm5_ref.mla import MLA


def attention_core_macs(config: GLM5Config, num_keys: int, sparse: bool) -> int:
    """Multiply-adds of the context-dependent part of one absorbed decode step over num_keys keys."""
    per_key = config.num_attention_heads * (2 * config.kv_lora_rank + config.qk_rope_head_dim)  # 576 + 512 per head
    if not sparse:
        return per_key * num_keys
    indexer = config.index_n_heads * config.index_head_dim * num_keys  # q^I . k^I for every key
    return indexer + per_key * min(config.index_topk, num_keys)


def projection_macs(config: GLM5Config, indexer: bool) -> int:
    """Multiply-adds of one token's projections and absorbed folds (independent of the context)."""
    c, H = config, config.num_attention_heads
    macs = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim  # q_a, q_b
            + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)  # kv_a
            + H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank  # folds W^UK, W^UV
            + H * c.v_head_dim * c.hidden_size)  # o_proj
    if indexer:
        macs += (c.q_lora_rank * c.index_n_heads * c.index_head_dim + c.hidden_size * c.index_head_dim
                 + c.hidden_size * c.index_n_heads)  # wq_b, wk, weights_proj
    return macs


def fill_cache(m: DSAAttention, cache: DSACache, length: int, chunk: int = 16384) -> None:
    """Write ``length`` random tokens per sequence straight into the cache (what a prefill would leave there)."""
    c, dev, B = m.config, cache.latent.device, cache.batch_size
    for a in range(0, length, chunk):
        n = min(chunk, length - a)
        cache.write_index_keys(m.indexer.k_norm(torch.randn(B, n, c.index_head_dim, device=dev)), a)  # (B, n, I)
        cache.append(m.kv_a_layernorm(torch.randn(B, n, c.kv_lora_rank, device=dev)),  # (B, n, C): unit RMS
                     torch.randn(B, n, c.qk_rope_head_dim, device=dev) / 3 ** 0.5, a)  # (B, n, P): Linear-init


def shared_mla(m: DSAAttention) -> MLA:
    """A plain MLA holding the very tensors of m (no copy): dense attention without any indexer."""
    with torch.device("meta"):
        mla = MLA(m.config, m.layer_idx)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("indexer.")}
    mla.load_state_dict(state, assign=True)
    return mla.eval()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each fn, timing them in turn repeat by repeat (fair under a varying load)."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timeit(fn, repeats=1, warmup=0))
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool = False, device: torch.device = torch.device("cpu")) -> list[dict]:
    config = GLM5Config.glm5()
    contexts = (4096, 8192) if quick else (32768, 131072)
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        dsa = DSAAttention(config).eval().to(device)  # one layer at GLM-5 size, nn.Linear default init
        mla = shared_mla(dsa)
        # the fixed cost: a step over a 1-token context (projections + folds, almost no attention)
        x1 = torch.randn(1, 1, config.hidden_size, device=device)
        empty = DSACache.for_config(config, 1, 1, device=device)

        def fixed_step() -> torch.Tensor:
            out = mla(x1, cache=empty, absorbed=True)
            empty.truncate(0)
            return out

        fixed_ms = timeit(fixed_step, repeats=3 if quick else 7)
        for L in tqdm(contexts, desc="dsa-decode", leave=False):
            per_seq = (L + 1) * config.kv_cache_values_per_token(include_indexer=True) * 4  # latents + indexer keys
            for B in sorted({1, serving_batch(per_seq, quick)}):
                rows.append(measure(dsa, mla, L, B, 3 if quick else 7 if B == 1 else 5, device)
                            | {"fixed_ms": fixed_ms})
    return rows


def measure(dsa: DSAAttention, mla: MLA, L: int, B: int, repeats: int, device) -> dict:
    """One row: a decode step of B sequences over L cached tokens each, DSA and the dense baselines."""
    config, k = dsa.config, dsa.config.index_topk
    x = torch.randn(B, 1, config.hidden_size, device=device)  # the new tokens' (normed) hidden states
    cache = DSACache.for_config(config, B, L + 1, device=device)
    fill_cache(dsa, cache, L)
    S, pos = L + 1, torch.tensor([L], device=device)  # keys seen by each new token; its position

    def step(module: torch.nn.Module, sparse: bool = True, impl: str = "gathered") -> torch.Tensor:
        options = dict(sparse=sparse, sparse_impl=impl) if module is dsa else {}
        out = module(x, cache=cache, absorbed=True, **options)  # appends the token at slot L ...
        cache.truncate(L)  # ... and forgets it: every call sees the same L cached tokens
        return out

    gathered, masked = step(dsa), step(dsa, impl="masked")
    rel_diff = float((gathered - masked).norm() / masked.norm())
    dense_vs_mla = float((step(dsa, sparse=False) - step(mla)).norm() / step(mla).norm())

    # the context-dependent parts, on the inputs the step computes
    c_q = dsa.q_latent(x)  # (B, 1, R)
    q_nope, q_rope = dsa.project_q(c_q, pos)  # (B, 1, H, N), (B, 1, H, P)
    dsa.indexer(x, c_q, pos, cache)  # writes the new tokens' indexer keys at slot L
    latent, k_rope = cache.latent[:, :S], cache.k_rope[:, :S]  # (B, S, C), (B, S, P): slot L is stale, which
    # costs the same

    def indexer_step() -> torch.Tensor:
        return select_topk(dsa.indexer(x, c_q, pos, cache), pos, k)  # (B, 1, k)

    idx = indexer_step()

    def attn_dsa() -> torch.Tensor:
        return dsa.attend_gathered(q_nope, q_rope, latent, k_rope, pos, indexer_step())[0]

    def attn_dense() -> torch.Tensor:
        return mla.attend_absorbed(q_nope, q_rope, latent, k_rope, pos, None)[0]

    ms = interleaved({
        "dense": lambda: step(dsa, sparse=False), "mla": lambda: step(mla), "dsa": lambda: step(dsa),
        "indexer": indexer_step, "attn_dense": attn_dense, "attn_dsa": attn_dsa,
    }, repeats)
    assert idx.shape == (B, 1, k) and bool((idx >= 0).all())
    proj_dsa = projection_macs(config, True)
    core_dense, core_dsa = attention_core_macs(config, S, False), attention_core_macs(config, S, True)
    return {
        "name": "dsa-decode", "context": L, "batch": B, "index_topk": k, "threads": torch.get_num_threads(),
        "dense_ms": ms["dense"], "mla_ms": ms["mla"], "dsa_ms": ms["dsa"], "indexer_ms": ms["indexer"],
        "ratio": ms["dense"] / ms["dsa"], "ratio_vs_mla": ms["mla"] / ms["dsa"],
        "attn_dense_ms": ms["attn_dense"], "attn_dsa_ms": ms["attn_dsa"],
        "attn_ratio": ms["attn_dense"] / ms["attn_dsa"],
        "mac_ratio": core_dense / core_dsa,
        "step_mac_ratio": (proj_dsa + config.index_n_heads * config.index_head_dim * S + core_dense)
        / (proj_dsa + core_dsa),  # dense_ms's module also runs the indexer projections and scores
        "rel_diff": rel_diff, "dense_vs_mla": dense_vs_mla,
    }
