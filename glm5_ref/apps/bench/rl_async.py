"""rl-async: the same number of RL updates with synchronous vs asynchronous rollouts when the environment's
latency has a long tail (simulated: base + scale * Pareto(alpha), capped; tool_env.long_tail_latency).

Synchronous: issue a batch, wait for its slowest rollout, train, push (the trainer and the workers take turns).
Asynchronous (GLM-5 section 4.1.1): workers keep rolling out while the trainer trains; a batch is formed from
whichever groups finish first, so one slow tool call no longer stalls the update. Same model (the rl-toy
GLM-5, random weights: only time matters), same workers, same updates; staleness is not limited here
(max_staleness is large) so that both runs train on exactly the same number of samples.
Goal (issue #10): async at least 1.5x faster. JSON keys: name, sync_s, async_s, ratio (+ the settings).
"""

from __future__ import annotations

import torch

from glm5_ref.apps.agentic import AsyncRLLoop, LoopConfig
from glm5_ref.apps.tool_env import ToolUseEnv, long_tail_latency, toy_config
from glm5_ref.model import GLM5ForCausalLM

# seconds per tool call: 0.1 + 0.05 * Pareto(1.5), capped at 2 s (mean ~0.25 s, 1 call in ~90 above 1 s)
LATENCY = {"base": 0.1, "scale": 0.05, "alpha": 1.5, "cap": 2.0}


def _time(mode: str, updates: int, state: dict, workers: int) -> float:
    model = GLM5ForCausalLM(toy_config())
    model.load_state_dict(state)
    env = ToolUseEnv(10, 29, latency=long_tail_latency(LATENCY["base"], LATENCY["scale"], LATENCY["alpha"],
                                                          LATENCY["cap"]))
    cfg = LoopConfig(mode=mode, num_workers=workers, group_size=4, groups_per_update=2, num_updates=updates,
                     max_staleness=10**6, max_inflight_groups=workers // 4 + 2, heartbeat_timeout=30.0,
                     lr=3e-4, seed=0)
    return AsyncRLLoop(model, env, cfg).run()["wall_s"]


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    state = GLM5ForCausalLM(toy_config()).state_dict()
    updates, workers = (6, 16) if quick else (25, 16)
    sync_s = _time("sync", updates, state, workers)
    async_s = _time("async", updates, state, workers)
    return {"name": "rl-async", "sync_s": round(sync_s, 3), "async_s": round(async_s, 3),
            "ratio": round(sync_s / async_s, 3), "updates": updates, "workers": workers,
            "rollouts_per_update": 8,
            "latency": "{base} + {scale} * Pareto({alpha}) s, capped at {cap} s".format(**LATENCY)}
