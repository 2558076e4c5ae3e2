"""Benchmark "muon": Newton-Schulz 5 on the classroom model's matrices, and the optimizer step's share.

ns_ms       NS5 (glm5_ref.muon.newton_schulz, fp32 on CPU) over every 2-D hidden matrix of
            GLM5Config.classroom(), matrices of equal shape batched into one call, as Muon.step does.
matmul_ms   the raw matmuls NS5 performs on the same shapes: per shape and iteration A = X X^T, A A, B X as
            three torch.matmul calls on a contiguous (N, small side, large side) batch, 5 iterations; nothing
            else (no normalisation, no casts, no scaled additions, no transposed views).
ratio       NS5 time / matmul time, the median over rounds that run both back to back (robust to the load of
            a shared machine, which can swing absolute times 5x): what NS5 costs beyond its matmuls (goal <= 1.2).
step_share  opt / (train + opt), median over rounds; opt is one build_optimizer(model, "muon_split").step()
            (Muon with Muon Split on the hidden matrices, AdamW on embedding, head and norms) and train one
            forward + backward of a stand-in with the same parameters: every hidden matrix is applied as a
            linear map to its own token batch (all tokens for attention, indexer and dense/shared FFN; the
            routed share tokens * K / E for each expert), plus embedding lookup, LM head and cross-entropy.
            Attention's token-token products (scores, softmax, DSA top-k) are NOT in the stand-in, so
            train is a lower bound and step_share an upper bound for the real classroom model.

ns_gflop and train_gflop count the flops of both (NS5 does not depend on the tokens, a training step grows with
them): at classroom size NS5 outweighs forward + backward until several thousand tokens per step; at GLM-5 size,
with millions of tokens per step, it is a small share.

Timing on a shared machine: small ops with several threads can stall on descheduled threads (we saw a run
over 100x slower than the next); the ratios above hold up, absolute times do not. torch.set_num_threads(1) steadies
them.

The matrix list comes from the config by arithmetic (the same terms as GLM5Config.param_breakdown); it
includes the MTP module's decoder block and eh_proj when the config has one, since training updates them.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.devices import synchronize
from glm5_ref.muon import head_blocks, kv_head_blocks, newton_schulz
from glm5_ref.training.optim import build_optimizer


def hidden_matrices(c: GLM5Config, tokens: int) -> list[tuple[str, tuple[int, int], int]]:
    """(name, (rows, cols), tokens it sees per training step) of every 2-D hidden matrix, rows = out features."""
    d, H, e = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size
    attention = [("q_a_proj", (c.q_lora_rank, d)), ("q_b_proj", (H * c.qk_head_dim, c.q_lora_rank)),
                 ("kv_a_proj_with_mqa", (c.kv_lora_rank + c.qk_rope_head_dim, d)),
                 ("kv_b_proj", (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),
                 ("o_proj", (d, H * c.v_head_dim)),
                 ("indexer.wq_b", (c.index_n_heads * c.index_head_dim, c.q_lora_rank)),
                 ("indexer.wk", (c.index_head_dim, d)), ("indexer.weights_proj", (c.index_n_heads, d))]
    out = []
    n_layers = c.num_hidden_layers + c.num_nextn_predict_layers  # the MTP block is a MoE decoder block
    for layer in range(n_layers):
        p = f"layers.{layer}."
        out += [(p + n, s, tokens) for n, s in attention]
        if not c.is_moe_layer(layer):
            w, q, t = c.intermediate_size, p + "mlp.", tokens
            out += [(q + "gate_proj", (w, d), t), (q + "up_proj", (w, d), t), (q + "down_proj", (d, w), t)]
            continue
        out.append((p + "mlp.gate", (c.n_routed_experts, d), tokens))
        routed = max(1, tokens * c.num_experts_per_tok // c.n_routed_experts)  # tokens per expert, balanced
        for x in range(c.n_routed_experts):
            q, t = f"{p}mlp.experts.{x}.", routed
            out += [(q + "gate_proj", (e, d), t), (q + "up_proj", (e, d), t), (q + "down_proj", (d, e), t)]
        if c.n_shared_experts:
            w, q, t = c.n_shared_experts * e, p + "mlp.shared_experts.", tokens
            out += [(q + "gate_proj", (w, d), t), (q + "up_proj", (w, d), t), (q + "down_proj", (d, w), t)]
        if layer >= c.num_hidden_layers:
            out.append((p + "eh_proj", (d, 2 * d), tokens))
    return out


def by_shape(shapes: list[tuple[int, int]]) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    return counts


class StandIn(nn.Module):
    """The classroom model's parameters with a forward that costs what their matmuls cost (module docstring)."""

    def __init__(self, c: GLM5Config, tokens: int):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        n_norms = 2 * c.num_hidden_layers + 1
        self.norms = nn.ParameterList([nn.Parameter(torch.ones(c.hidden_size)) for _ in range(n_norms)])
        self.names, self.hidden, inputs = [], nn.ParameterList(), []
        for name, (rows, cols), t in hidden_matrices(c, tokens):
            self.names.append(name)
            self.hidden.append(nn.Parameter(torch.randn(rows, cols) * cols**-0.5))
            inputs.append(torch.randn(t, cols))
        self.inputs = inputs  # (t, cols) per matrix, fixed activations

    def muon_blocks(self) -> dict[str, list[tuple[int, int]]]:
        c, out = self.c, {}
        for i, name in enumerate(self.names):
            if name.endswith("q_b_proj"):
                out[f"hidden.{i}"] = head_blocks(c.qk_head_dim, c.num_attention_heads)
            elif name.endswith("kv_b_proj"):
                out[f"hidden.{i}"] = kv_head_blocks(c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim)
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        loss = sum((x @ W.T).square().mean() for x, W in zip(self.inputs, self.hidden))  # (t, rows) each
        h = self.embed_tokens(ids)  # (tokens, d)
        for w in self.norms:
            h = h * w
        logits = self.lm_head(h)  # (tokens, V)
        return loss + F.cross_entropy(logits, ids)


def paired_ms(fns: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Wall times (ms) of each fn over ``repeats`` rounds after one warm-up round, the fns run back to back in
    every round, so that the ratio within a round is taken under the same load of a shared machine."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, ts in zip(fns, times):
            synchronize()
            t0 = time.perf_counter()
            fn()
            synchronize()  # a GPU runs the kernels asynchronously
            if r:
                ts.append((time.perf_counter() - t0) * 1e3)
    return times


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run(quick: bool = False, device: torch.device = torch.device("cpu")) -> dict:
    torch.manual_seed(0)
    c = GLM5Config.classroom()
    repeats = 3 if quick else 7
    tokens = 256 if quick else 1024
    shapes = [s for _, s, _ in hidden_matrices(c, tokens)]
    counts = by_shape(shapes)
    batches = [torch.randn(n, *s).to(device) for s, n in counts.items()]  # (N, rows, cols), made on the CPU
    # (N, small, large), contiguous, with orthonormal rows: X X^T = I keeps every product O(1) through the 5
    # iterations (random inputs would overflow to inf/NaN or underflow to slow denormals)
    raw = [torch.linalg.qr(torch.randn(n, max(s), min(s)))[0].mT.contiguous().to(device) for s, n in counts.items()]

    def ns():
        for G in batches:
            newton_schulz(G, steps=5)

    def matmuls():
        for X in raw:
            for _ in range(5):
                A = torch.matmul(X, X.mT)  # (N, s, s)
                B = torch.matmul(A, A)  # (N, s, s)
                X = torch.matmul(B, X)  # (N, s, l)

    ns_t, mm_t = paired_ms([ns, matmuls], repeats)
    # flops: NS5 does 5 x (X X^T: 2 s^2 l, A A: 2 s^3, B X: 2 s^2 l); forward + backward of a linear map 6 t m n
    ns_flop = sum(n * 5 * (4 * min(s) ** 2 * max(s) + 2 * min(s) ** 3) for s, n in counts.items())
    train_flop = sum(6 * t * m * n for _, (m, n), t in hidden_matrices(c, tokens))
    train_flop += 6 * tokens * c.vocab_size * c.hidden_size  # LM head

    model = StandIn(c, tokens).to(device)
    model.inputs = [x.to(device) for x in model.inputs]  # a plain list: .to() leaves it where it was
    ids = torch.randint(0, c.vocab_size, (tokens,)).to(device)
    opt = build_optimizer(model, "muon_split", lr=1e-4)

    def train():
        opt.zero_grad()
        model(ids).backward()

    train_t, opt_t = paired_ms([train, opt.step], repeats)
    return {
        "name": "muon", "threads": torch.get_num_threads(), "matrices": len(shapes), "shapes": len(counts),
        "ns_ms": median(ns_t), "matmul_ms": median(mm_t), "ratio": median([a / b for a, b in zip(ns_t, mm_t)]),
        "tokens": tokens, "train_ms": median(train_t), "opt_ms": median(opt_t),
        "step_share": median([o / (t + o) for t, o in zip(train_t, opt_t)]),
        "ns_gflop": ns_flop / 1e9, "train_gflop": train_flop / 1e9,
    }


if __name__ == "__main__":
    from glm5_ref.apps.bench import format_table

    print(format_table([run()]))
