"""glm5_ref against Hugging Face transformers' GlmMoeDsaForCausalLM, the same weights, side by side in one run.

Model: the classroom config (4 layers, d 256, MLA with a 64-wide latent, DSA top-128, 32 experts top-4, MTP),
with rms_norm_eps 1e-6 (transformers hard-codes it for MLA's two latent norms) and positions up to 16K, random
weights in glm5_ref converted into transformers' layout (hf_io.to_transformers_layout, experts fused). The
logits of both are checked equal (relative error below 1e-4, on 128 tokens: longer, random weights give the
indexer exact-zero ties that the two break differently) before anything is timed.

Rows (each a ratio ours / theirs of tokens per second, higher is better; medians of alternating repeats):
    prefill            one forward over a 2,048-token prompt (batch 1)
    decode C, batch B  greedy decoding of 32 new tokens after a C-token prompt (C = 256, 2K, 8K; B = 1, 8), the
                       prompt's prefill (1,024 tokens per call on both sides) not counted; ours: the absorbed path
                       over the latent cache with DSA gathering 128 latents per query; theirs: a DynamicCache of
                       expanded keys and values with DSA applied as a dense mask
    train step         forward + backward + AdamW on 8 x 256 tokens (transformers has no MTP loss: ours without
                       MTP too), fp32
    memory bound       decode tokens/s against the machine's limit: measured copy bandwidth / active bytes per
                       token (the weights a token reads with 4 of 32 experts, fp32)
Every row: name, context, batch, ours, theirs, ratio. Quick mode (CI): 128-token contexts, 4 new tokens, batch 1.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.hf_io import to_transformers_layout
from glm5_ref.model import GLM5ForCausalLM


PREFILL_CHUNK = 1024  # prompt tokens per prefill call (an 8K prompt at batch 8 in one call needs 64 GB there)


def models(config: GLM5Config, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    ours = GLM5ForCausalLM(config).eval()
    hf_config = transformers.GlmMoeDsaConfig(**{k: v for k, v in config.to_hf().items()
                                                 if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "eager"
    theirs = transformers.GlmMoeDsaForCausalLM(hf_config).eval()
    theirs.load_state_dict(to_transformers_layout({k: v.detach() for k, v in ours.hf_state_dict().items()},
                                                  config.num_hidden_layers), strict=True)
    return ours, theirs


def _median(xs):
    return sorted(xs)[len(xs) // 2]


@torch.no_grad()
def _decode_ours(model, prompt, new):
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new)
    for chunk in prompt.split(PREFILL_CHUNK, dim=1):  # chunked prefill: bounded memory (not timed)
        logits = model(chunk, cache=cache).logits[:, -1]
    t0 = time.perf_counter()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, cache=cache).logits[:, -1]
    return time.perf_counter() - t0


@torch.no_grad()
def _decode_theirs(model, prompt, new):
    import transformers

    cache = transformers.DynamicCache(config=model.config)  # filled in place by every call
    for chunk in prompt.split(PREFILL_CHUNK, dim=1):  # in one call its indexer scores (B, H, T, T) in fp32
        logits = model(chunk, cache=cache, use_cache=True).logits[:, -1]
    t0 = time.perf_counter()
    for _ in range(new):
        token = logits.argmax(-1, keepdim=True)
        logits = model(token, cache=cache, use_cache=True).logits[:, -1]
    return time.perf_counter() - t0


def _train_time(model, batch, theirs: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    if theirs:
        loss = model(batch, labels=batch).loss
    else:
        loss = model(batch, labels=batch, mtp_depths=0).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (a proxy for the memory bandwidth a decode step can use)."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / _median(times)


def active_bytes(config: GLM5Config) -> int:
    return config.num_params(active=True) * 4


def run(quick: bool = False) -> list[dict]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return [dict(name="vs-transformers", status="transformers is not installed (pip install -e '.[test]')")]
    config = dataclasses.replace(GLM5Config.classroom(), rms_norm_eps=1e-6, max_position_embeddings=16384)
    ours, theirs = models(config)
    ids = torch.randint(0, config.vocab_size, (8, 8192 + 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # within top-k: beyond it random weights give exact-zero indexer ties, which glm5_ref
        # breaks toward the most recent key and torch.topk in any order (dsa.py), so the selections may differ
        a, b = ours(ids[:1, :config.index_topk]).logits, theirs(ids[:1, :config.index_topk]).logits
    err = float((a - b).norm() / b.norm())
    if not err < 1e-4:
        raise AssertionError(f"vs-transformers: the logits differ (relative error {err:.2e}); nothing timed")
    repeats = 1 if quick else 3
    rows = []

    def row(name, context, batch, t_ours, t_theirs, tokens):
        rows.append(dict(name=name, context=context, batch=batch, ours=tokens / t_ours, theirs=tokens / t_theirs,
                         ratio=t_theirs / t_ours, threads=torch.get_num_threads(), logits_rel_err=err))

    L = 128 if quick else 2048
    with torch.no_grad():
        ta, tb = [], []
        for _ in range(repeats):
            t0 = time.perf_counter(); ours(ids[:1, :L]); ta.append(time.perf_counter() - t0)  # noqa: E702
            t0 = time.perf_counter(); theirs(ids[:1, :L]); tb.append(time.perf_counter() - t0)  # noqa: E702
    row("prefill", L, 1, _median(ta), _median(tb), L)
    new = 4 if quick else 32
    for context in ((128,) if quick else (256, 2048, 8192)):
        for batch in ((1,) if quick else (1, 8)):
            prompt = ids[:batch, :context]
            ta = [_decode_ours(ours, prompt, new) for _ in range(repeats)]
            tb = [_decode_theirs(theirs, prompt, new) for _ in range(repeats)]
            row(f"decode {context}", context, batch, _median(ta), _median(tb), new * batch)
    B, T = (2, 64) if quick else (8, 256)
    batch = ids[:B, :T + 1]
    ours.train(), theirs.train()
    ta = [_train_time(ours, batch, False) for _ in range(repeats + 1)][1:]
    tb = [_train_time(theirs, batch, True) for _ in range(repeats + 1)][1:]
    row("train step", T, B, _median(ta), _median(tb), B * T)
    limit = copy_bandwidth() / active_bytes(config)
    for r in rows:
        if r["name"].startswith("decode") and r["batch"] == 1:
            r["memory_bound_tok_s"], r["of_memory_bound"] = limit, r["ours"] / limit
    return rows
