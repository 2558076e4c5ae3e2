"""MoE layer benchmark: grouped dispatch (sort by expert, grouped GEMM) against the per-expert loop.

A scaled-down GLM-5 MoE layer: 256 routed experts, top-8, hidden 1024, expert width 256, one shared expert (GLM-5
itself: hidden 6144, expert width 2048), fp32, torch's default thread count. Times the whole layer (router, routed
experts, shared expert) at 16, 256 and 2048 tokens, forward, and forward + backward at 2048. routing_share is the
part of the grouped forward spent routing (the router) and permuting / unpermuting (sort by expert, gather the
tokens into expert order, scale by the gate weights, index_add back), each timed on its own. Each loop/grouped
pair is timed in alternating rounds, so that load from other processes on a shared machine hits both alike.

On a CPU, torch._grouped_mm runs the per-expert matrix products one after another, so both paths do the same
GEMMs; at 16 and 256 tokens they are bound by streaming the experts' weights from memory (768 MB in fp32 here).
What grouped dispatch saves on a CPU is per-expert framework overhead and, in the backward, the loop's
per-expert gradient of its token gather (a full (N, d) zero tensor per expert). On a GPU it also saves ~E
kernel launches per projection.

Quick mode (CI smoke test): 16 and 128 tokens, forward + backward at 128, fewer rounds.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from glm5_ref.apps.bench import timeit
from glm5_ref.config import GLM5Config
from glm5_ref.moe import MoE, sort_by_expert


def layer_config() -> GLM5Config:
    return dataclasses.replace(GLM5Config.classroom(), name="bench-moe", hidden_size=1024, moe_intermediate_size=256,
                               n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1)


def paired(fn_a, fn_b, rounds: int) -> tuple[float, float]:
    """Median ms of fn_a and fn_b, measured in alternating rounds after one warm-up each."""
    timeit(fn_a, repeats=1, warmup=1), timeit(fn_b, repeats=1, warmup=1)
    a, b = [], []
    for _ in range(rounds):
        a.append(timeit(fn_a, repeats=1, warmup=0))
        b.append(timeit(fn_b, repeats=1, warmup=0))
    return sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]


def run(quick: bool = False, device: torch.device = torch.device("cpu")) -> list[dict]:
    torch.manual_seed(0)
    config = layer_config()
    moe = MoE(config).to(device)  # made on the CPU: the same weights on every device
    with torch.no_grad():  # a trained router spreads tokens; a fresh one too (random rows), plus a small bias
        moe.gate.e_score_correction_bias.normal_(0.0, 0.01)
    token_counts = (16, 128) if quick else (16, 256, 2048)
    backward_at = token_counts[-1]
    rounds = 3 if quick else 7
    rows = []
    for n in token_counts:
        x = torch.randn(1, n, config.hidden_size, device=device)
        with torch.no_grad():
            loop_ms, grouped_ms = paired(lambda: moe(x, impl="loop"), lambda: moe(x, impl="grouped"), rounds)
            h = x.reshape(n, -1)  # (N, d)
            idx, w, _ = moe.gate(h)
            S = n * config.num_experts_per_tok
            act = torch.randn(S, config.moe_intermediate_size, device=device)  # (S, I) stand-in SwiGLU activations
            ys = torch.randn(S, config.hidden_size, device=device)  # (S, d) stand-in expert outputs

            def permute_unpermute():  # the grouped path minus its two grouped GEMMs and the SwiGLU
                order, token_of_slot, counts = sort_by_expert(idx, config.n_routed_experts)
                xs = h[token_of_slot]  # (S, d) permute
                scaled = act * w.reshape(-1)[order, None]  # (S, I) gate weights
                out = torch.zeros_like(h).index_add_(0, token_of_slot, ys)  # (N, d) unpermute + combine
                return xs, scaled, counts.cumsum(0), out

            route_ms = timeit(lambda: moe.gate(h), repeats=rounds)
            permute_ms = timeit(permute_unpermute, repeats=rounds)
        row = {"name": f"moe E=256 K=8 d=1024 I=256, {n} tokens", "tokens": n, "loop_ms": loop_ms,
               "grouped_ms": grouped_ms, "ratio": loop_ms / grouped_ms,
               "routing_share": (route_ms + permute_ms) / grouped_ms, "threads": torch.get_num_threads(),
               "load_avg": os.getloadavg()[0]}  # 1-minute load average: other processes skew the timings
        if n == backward_at:
            x.requires_grad_(True)
            dy = torch.randn_like(x)

            def fwd_bwd(impl):
                moe.zero_grad(set_to_none=True)
                x.grad = None
                moe(x, impl=impl).backward(dy)

            fb_loop, fb_grouped = paired(lambda: fwd_bwd("loop"), lambda: fwd_bwd("grouped"), max(3, rounds // 2))
            moe.zero_grad(set_to_none=True)
            row.update({"fwd_bwd_loop_ms": fb_loop, "fwd_bwd_grouped_ms": fb_grouped,
                        "fwd_bwd_ratio": fb_loop / fb_grouped})
        rows.append(row)
    return rows
