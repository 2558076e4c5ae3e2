"""Speculative decoding with the MTP layer (3 drafts per round) against plain cached greedy decoding.

Model: the shipped classroom-base (glm5_ref.load_pretrained, trained by the recipe with MTP throughout), or the
checkpoint given with ``--ckpt``; never whatever runs/ happens to hold.

Protocol: code prompts of 96 tokens from held-out documents (the pretraining corpus's test split); for each,
``model.generate(prompt, 256)`` (plain: one main forward per token) and ``speculative_generate(model, prompt,
256, 3)`` (speculative), back to back in alternating order, ``repeats`` times.
    plain_tok_s, spec_tok_s   new tokens / wall seconds, summed over prompts and repeats; speedup = their ratio
    speedup_range             min and max of the per-pair ratios (the machines are shared: this is the noise)
    speedup_cpu_time          the same ratio in process CPU seconds (all threads): less sensitive to other load
    identical                 every speculative output equals the plain greedy output, token for token
    accept_length             SpecStats.accept_length (tokens emitted per round), averaged over prompts
    accept_length_pooled      emitted tokens / rounds over all prompts = 1 + a_1 + a_1 a_2 + a_1 a_2 a_3
    depth_acceptance          pooled a_j: the fraction of depth-j drafts accepted GIVEN drafts 1 .. j-1 were
Where the time goes (a cost model measured in the same run, at the prompts' context length, median ms):
    step_ms          one plain decode step: main forward of 1 token over the cache (+ argmax)
    verify_ms        one main forward of N + 1 = 4 tokens over the cache: the verify of a round
    mtp_step_ms      one MTP step (1 token over the MTP cache) + its logits; a round drafts with N of them
    mtp_share        N * mtp_step_ms / (verify_ms + N * mtp_step_ms): the drafting part of a round
    predicted_speedup = accept_length * step_ms / (verify_ms + N * mtp_step_ms)
    round_ms, plain_token_ms   measured wall time per speculative round and per plain token
Speculative decoding pays when verifying N + 1 tokens costs about as much as decoding 1 (memory-bound decoding
on a GPU) and the drafter is a small part of the model (GLM-5: 1 layer of 79). In the 4-layer classroom model
on a CPU the MTP layer is a whole MoE decoder block plus the LM head, about 30% of a main step, and the extra
verified tokens are not free, so the speed-up stays well below the accept length (notebook 05, section 7).
"""

from __future__ import annotations

import time

import torch

from glm5_ref.apps.bench import timeit
from glm5_ref.apps.model_card import held_out_prompts
from glm5_ref.devices import synchronize
from glm5_ref.pretrained import load_pretrained, read_metrics
from glm5_ref.training.checkpoint import read_trainer_state
from glm5_ref.training.run import load_model
from glm5_ref.dsa import DSACache
from glm5_ref.speculative import speculative_generate

DRAFT_STEPS = 3


@torch.no_grad()
def step_costs(model, prompt: torch.Tensor, context: int, verify_tokens=(DRAFT_STEPS + 1,), repeats: int = 15) -> dict:
    """Median ms at ``context`` tokens of cache (the prompt and its greedy continuation) of: a 1-token main
    step (step_ms), a main forward of L tokens for each L in ``verify_tokens`` (verify_ms, a dict by L), one
    MTP step on 1 token + its logits (mtp_step_ms)."""
    ids = model.generate(prompt, context - prompt.shape[1])  # (1, context)
    cache = model.new_cache(1, context + max(verify_tokens))
    out = model(ids, cache=cache)

    def main(x):
        def fn():
            model(x, cache=cache).logits[0, -1].argmax()
            cache.truncate(context)
        return fn

    mtp_cache = DSACache.for_config(model.config, 1, context + 1, dtype=out.logits.dtype, device=ids.device)
    hidden = model.model.norm(out.hidden_states)  # (1, context, D)
    emb = model.model.embed_tokens(ids)
    decode = model.execution.replace(absorbed=True)
    model.mtp.step(hidden[:, :-1], emb[:, 1:], cache=mtp_cache, execution=decode)  # MTP cache: context - 1 positions

    def mtp_step():
        h = model.mtp.step(hidden[:, -1:], emb[:, -1:], cache=mtp_cache, execution=decode).hidden
        model.mtp.logits(h, model.lm_head)[0, -1].argmax()
        mtp_cache.truncate(context - 1)

    return {"step_ms": timeit(main(ids[:, -1:]), repeats),
            "verify_ms": {L: timeit(main(ids[:, -L:]), repeats) for L in verify_tokens},
            "mtp_step_ms": timeit(mtp_step, repeats)}


def run(quick: bool = False, ckpt: str | None = None, device: torch.device = torch.device("cpu")) -> dict:
    """The shipped classroom-base model (``ckpt``: another checkpoint folder or training run instead), prompts from
    the pretraining corpus's held-out test documents."""
    torch.manual_seed(0)
    if ckpt is None:
        model, _ = load_pretrained("classroom-base")
        info = {"source": "shipped", "path": "glm5_ref/assets/checkpoints/classroom-base",
                **{k: v for k, v in read_metrics("classroom-base").items() if k in ("attention",)},
                "tokens": read_metrics("classroom-base")["recipe"]["tokens"]}
    else:
        model, info = load_model(ckpt), {"source": "--ckpt", "path": ckpt, **read_trainer_state(ckpt)}
    model = model.to(device)
    n_prompts, prompt_len, new, repeats = (2, 96, 64, 1) if quick else (4, 96, 256, 2)
    prompts = [p.to(device) for p in held_out_prompts(n_prompts, prompt_len)]
    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        model.generate(prompts[0][:, :16], 4)
        speculative_generate(model, prompts[0][:, :16], 8, DRAFT_STEPS)
    t_plain = t_spec = 0.0
    identical, accept, rounds, ratios, cpu = True, [], 0, [], {"plain": 0.0, "spec": 0.0}
    tries, accepts = [0] * DRAFT_STEPS, [0] * DRAFT_STEPS
    for i, prompt in enumerate(prompts):
        for r in range(repeats):  # plain and speculative back to back (alternating order): same machine load
            results, times = {}, {}
            for kind in (("plain", "spec") if (i + r) % 2 == 0 else ("spec", "plain")):
                t0, c0 = time.perf_counter(), time.process_time()
                if kind == "plain":
                    results[kind] = model.generate(prompt, new)
                else:
                    results[kind] = speculative_generate(model, prompt, new, DRAFT_STEPS)
                synchronize()  # a GPU may still be running the last step
                times[kind] = time.perf_counter() - t0
                cpu[kind] += time.process_time() - c0
            t_plain, t_spec = t_plain + times["plain"], t_spec + times["spec"]
            ratios.append(times["plain"] / times["spec"])
            spec_ids, stats = results["spec"]
            identical = identical and torch.equal(spec_ids, results["plain"])
            if r == 0:  # greedy: every repeat drafts and accepts the same tokens
                accept.append(stats.accept_length)
                tries = [a + b for a, b in zip(tries, stats.depth_tries)]
                accepts = [a + b for a, b in zip(accepts, stats.depth_accepts)]
            rounds += stats.rounds
    n_tokens = n_prompts * repeats * new
    rates = [a / t if t else None for a, t in zip(accepts, tries)]  # None: depth never reached
    tau = sum(accept) / len(accept)
    pooled = 1 + sum(accepts) / tries[0]  # emitted tokens / rounds, over all prompts: = 1 + a1 + a1 a2 + a1 a2 a3
    costs = step_costs(model, prompts[0], prompt_len + new // 2, repeats=5 if quick else 15)
    costs["verify_ms"] = costs["verify_ms"][DRAFT_STEPS + 1]
    draft_ms = DRAFT_STEPS * costs["mtp_step_ms"]
    predicted = tau * costs["step_ms"] / (costs["verify_ms"] + draft_ms)
    return {
        "name": "spec-decode", "draft_steps": DRAFT_STEPS,
        "accept_length": round(tau, 3), "accept_length_pooled": round(pooled, 3),
        "depth_acceptance": [None if a is None else round(a, 3) for a in rates],
        "plain_tok_s": round(n_tokens / t_plain, 1), "spec_tok_s": round(n_tokens / t_spec, 1),
        "speedup": round(t_plain / t_spec, 3), "speedup_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "speedup_cpu_time": round(cpu["plain"] / cpu["spec"], 3),
        "identical": bool(identical),
        "step_ms": round(costs["step_ms"], 2), "verify_ms": round(costs["verify_ms"], 2),
        "mtp_step_ms": round(costs["mtp_step_ms"], 2), "mtp_share": round(draft_ms / (costs["verify_ms"] + draft_ms), 3),
        "round_ms": round(1e3 * t_spec / rounds, 2), "plain_token_ms": round(1e3 * t_plain / n_tokens, 2),
        "predicted_speedup": round(predicted, 3),
        "prompts": n_prompts, "prompt_tokens": prompt_len, "new_tokens": new, "repeats": repeats,
        "threads": torch.get_num_threads(),
        "model": f"{info['source']}: {info.get('path')} ({info.get('args', {}).get('config', model.config.name)}, "
                 f"{info.get('step', '?')} steps, {info.get('tokens', '?')} tokens, "
                 f"{info.get('attention', 'dense')} attention)",
    }
