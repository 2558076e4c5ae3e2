"""Cached against uncached greedy generation with the classroom GLM-5: tokens per second.

Cached: one prefill of the prompt, then one token at a time through the per-layer caches (MLA latents and
indexer keys), the absorbed attention path. Uncached: every new token re-runs the whole sequence. Both
must return the same ids (checked: ``identical``). Weights are random (the ratio does not depend on them).

Full mode also times the cached decode step under torch.compile (inductor, dynamic shapes, so one graph serves
every cache length) against the same step eager, through one greedy loop: ``compiled_tok_s`` /
``eager_step_tok_s``, ``compile_s`` (its two graphs: fewer keys than index_topk, and DSA's selection) and
``compiled_identical``. On the 2-core CPU (2026-12-03, 1 thread, with a training run sharing the cores, so only
roughly) the compiled step was one graph per case without breaks, gave the same ids (logits within 6.2e-6) and
ran at 0.5-1.1x eager (four runs, 96 and 200-token prompts): a classroom decode step is ~1,000 tiny aten calls
whose eager kernels the generated ones do not beat, and torch.compile brings no CUDA graphs to a CPU. --quick
leaves the compiled rows out (the compile alone takes 25-70 s here).
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
    row = {"name": "decode", "config": "classroom", "prompt": prompt_len, "new_tokens": new,
           "cached_tok_s": cached, "uncached_tok_s": uncached, "ratio": cached / uncached,
           "identical": bool(torch.equal(results[True][1], results[False][1]))}
    if not quick:
        row.update(compiled_rows(model, prompt, new))
    return row


@torch.no_grad()
def greedy_steps(forward, model, prompt: torch.Tensor, new: int) -> tuple[list[int], float]:
    """Prefill eagerly, then ``new - 1`` greedy steps through ``forward`` (the model or its compiled form);
    returns the ids and the seconds the steps took."""
    cache = model.new_cache(1, prompt.shape[1] + new)
    tok = model(prompt, cache=cache).logits[:, -1:].argmax(-1)  # (1, 1)
    ids = [int(tok)]
    synchronize()
    t0 = time.perf_counter()
    for _ in range(new - 1):
        tok = forward(tok, cache=cache).logits[:, -1:].argmax(-1)
        ids.append(int(tok))
    synchronize()
    return ids, time.perf_counter() - t0


def compiled_rows(model, prompt: torch.Tensor, new: int) -> dict:
    compiled = torch.compile(model, dynamic=True)
    t0 = time.perf_counter()  # compile: below index_topk keys every key is attended, above it DSA selects;
    for length in (8, prompt.shape[1]):  # one graph each (dynamic shapes: every other length reuses them)
        greedy_steps(compiled, model, prompt[:, :length], 3)
    compile_s = time.perf_counter() - t0
    eager_ids, eager_s = greedy_steps(model, model, prompt, new)
    compiled_ids, compiled_s = greedy_steps(compiled, model, prompt, new)
    return {"eager_step_tok_s": (new - 1) / eager_s, "compiled_tok_s": (new - 1) / compiled_s,
            "compiled_speedup": eager_s / compiled_s, "compile_s": compile_s,
            "compiled_identical": eager_ids == compiled_ids}
