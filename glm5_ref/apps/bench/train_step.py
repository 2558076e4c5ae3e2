"""Training-step benchmark: the classroom GLM-5 against an all-dense model of matched active parameters.

One step = forward (LM + balance losses, and MTP in the second row), backward, gradient clipping, AdamW step and
the router-bias update: exactly training.engine.train_step, on one random (B, T + 1) batch, fp32, torch's thread count.
The dense twin (training.options.matched_dense_config) makes every layer dense with a SwiGLU of width (K + S) * d_e = 640,
so a token touches the same FFN parameters in both models; the MoE model pays for routing (the sigmoid router,
sorting token-slots by expert, gathering and scattering them) and for running 32 small expert GEMMs instead of
one large one. ratio = glm5_tok_s / dense_tok_s (below 1: the MoE step is slower at equal active size, which on
a CPU is expected: the MoE's benefit is quality per active parameter, see scripts/compare_dense.py).

Columns compiled_ms / compiled_speedup: the same GLM-5 step with the model under torch.compile (inductor, one
graph for forward and one for backward; the optimizer step stays eager), timed in the same rounds.

Rows: the trunk alone (mtp_depths=0), then the step the demo trains (MTP over config.num_mtp_depths depths; the
MTP block is an MoE block in both models). The two models are timed in alternating rounds, so that load from other
processes on a shared machine hits both alike. Batch 8 x 256 tokens (the demo's); quick mode (CI): 2 x 64, 2 rounds.
"""

from __future__ import annotations

import torch

from glm5_ref.apps.bench import timeit
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.training.optim import build_optimizer
from glm5_ref.training.engine import set_dsa_stage, train_step
from glm5_ref.training.options import matched_dense_config, resolve_config


def _stepper(config, batch, mtp_depths, compiled: bool = False):
    torch.manual_seed(0)
    model = GLM5ForCausalLM(config).to(batch.device)  # the same weights on every device (made on the CPU)
    set_dsa_stage(model, "dense")
    opt = build_optimizer(model, "adamw", 1e-3)
    kwargs = {} if mtp_depths is None else {"mtp_depths": mtp_depths}
    net = torch.compile(model, fullgraph=True) if compiled else model  # inductor: forward and backward graphs
    return lambda: train_step(net, opt, batch, "dense", 1.0, **kwargs)


def run(quick: bool = False, compile_too: bool | None = None, device: torch.device = torch.device("cpu")) -> list[dict]:
    """``compile_too`` (default: not in quick mode): also time the step with the model under torch.compile
    (inductor, fullgraph), side by side with eager; compile_s is its first call, compilation included."""
    compile_too = not quick if compile_too is None else compile_too
    config = resolve_config("classroom")
    dense = matched_dense_config(config)
    B, T = (2, 64) if quick else (8, 256)  # the demo's batch
    rounds = 2 if quick else 5
    batch = torch.randint(0, config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for label, depths in (("trunk (no MTP)", 0), (f"with MTP x{config.num_mtp_depths}", None)):
        glm5, twin = _stepper(config, batch, depths), _stepper(dense, batch, depths)
        timeit(glm5, repeats=1, warmup=1), timeit(twin, repeats=1, warmup=1)
        compiled = _stepper(config, batch, depths, compiled=True) if compile_too else None
        compile_s = timeit(compiled, repeats=1, warmup=0) / 1e3 if compiled else None  # the first call compiles
        a, b, c = [], [], []
        for _ in range(rounds):  # alternate, so that a burst of load from elsewhere hits all of them
            a.append(timeit(glm5, repeats=1, warmup=0))
            b.append(timeit(twin, repeats=1, warmup=0))
            if compiled:
                c.append(timeit(compiled, repeats=1, warmup=0))
        glm5_ms, dense_ms = sorted(a)[len(a) // 2], sorted(b)[len(b) // 2]
        compiled_ms = sorted(c)[len(c) // 2] if c else None
        rows.append({
            "name": f"train-step {label}", "batch": f"{B}x{T}", "glm5_ms": glm5_ms, "dense_ms": dense_ms,
            "glm5_tok_s": B * T / glm5_ms * 1e3, "dense_tok_s": B * T / dense_ms * 1e3,
            "ratio": dense_ms / glm5_ms, "compiled_ms": compiled_ms, "compile_s": compile_s,
            "compiled_speedup": glm5_ms / compiled_ms if compiled_ms else None,
            "glm5_active_params": config.num_params(active=True), "dense_active_params": dense.num_params(active=True),
            "threads": torch.get_num_threads(),
        })
    return rows
