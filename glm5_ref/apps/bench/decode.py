"""Cached against uncached greedy generation with the classroom GLM-5: tokens per second.

Cached: one prefill of the prompt, then one token at a time through the per-layer caches (MLA latents and
indexer keys), the absorbed attention path. Uncached: every new token re-runs the whole sequence. Both
must return the same ids (checked: ``identical``). Weights are random (the ratio does not depend on them).
"""

from __future__ import annotations

import time

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.devices import synchronize
from glm5_ref.model import GLM5ForCausalLM


def run(quick: bool = False, device: torch.device = torch.device("cpu")) -> dict:
    config = GLM5Config.classroom()
    prompt_len, new = (64, 16) if quick else (512, 128)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(config).eval().to(device)  # the same weights on every device (made on the CPU)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    model.generate(prompt[:, :8], 2)  # warm-up
    results = {}
    for use_cache in (True, False):
        synchronize()
        t0 = time.perf_counter()
        ids = model.generate(prompt, new, use_cache=use_cache)
        synchronize()
        results[use_cache] = (new / (time.perf_counter() - t0), ids)
    cached, uncached = results[True][0], results[False][0]
    return {"name": "decode", "config": "classroom", "prompt": prompt_len, "new_tokens": new,
            "cached_tok_s": cached, "uncached_tok_s": uncached, "ratio": cached / uncached,
            "identical": bool(torch.equal(results[True][1], results[False][1]))}
