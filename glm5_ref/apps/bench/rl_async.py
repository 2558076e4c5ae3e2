"""rl-async: the same RL updates with synchronous vs asynchronous rollouts, rollout workers in separate processes
(apps/rollout_processes.py), across tool latencies set relative to the rollout's own compute.

First the benchmark measures what one rollout's compute costs here (the rl-toy GLM-5 with random weights, one
thread, no tool latency: c seconds). Then for each latency ratio r in LATENCY_RATIOS every tool call sleeps a
long-tailed latency of mean about r * c (half fixed, half Pareto(1.5), capped at 10x the mean), and the same
number of updates runs synchronously (issue 2 groups of 4, wait for the slowest, train) and asynchronously
(keep groups issued; train when 2 are complete), with the same worker processes, from the same weights, with
the same tasks. So the regimes are the same on a fast and on a slow machine: r = 0.1 is compute-bound (the
workers and the trainer share the cores; asynchrony can only overlap the update with rollouts), r = 10 is
latency-bound (the cores idle while tools answer; a synchronous update waits for the slowest of 8 calls).
Reported per ratio: both wall times and their ratio, the trainer's idle fraction in each mode, the asynchronous
samples' mean staleness. Goal (issue #21): async at least 1.5x when the tool latency is at least the rollout's
compute (r >= 1). JSON: one object per ratio.

Then rows marked "simulated": the same two loops at cluster scale as a discrete-event simulation
(apps/rl_simulation.py: no model, only when rollouts and updates start and end), under assumptions the paper does
not give numbers for: an update trains on 256 rollouts and takes 120 s, the inference engine runs 512 at once,
rollout durations are log-normal with a 60 s median and a tail of width sigma (0.25 narrow, 1.0 and 1.5 long).
"""

from __future__ import annotations

import torch

from glm5_ref.apps.rl_simulation import lognormal_durations, simulate
from glm5_ref.apps.rollout_processes import Latency, ProcessRolloutPool, rollout_compute_s, run_loop
from glm5_ref.apps.tool_env import toy_config
from glm5_ref.model import GLM5ForCausalLM

LATENCY_RATIOS = (0.1, 1.0, 10.0)
SIMULATED = dict(batch=256, slots=512, train_s=120.0, median_s=60.0, updates=50)  # cluster-scale assumptions
TAIL_SIGMAS = (0.25, 0.5, 1.0, 1.5)


def simulated_rows(updates: int = SIMULATED["updates"]) -> list[dict]:
    """The simulated rows (module docstring), one per tail width."""
    c, rows = SIMULATED, []
    for sigma in TAIL_SIGMAS:
        out = {m: simulate(m, updates, c["batch"], c["slots"], c["train_s"], lognormal_durations(c["median_s"], sigma))
               for m in ("sync", "async")}
        rows.append({"name": "rl-async", "simulated": True, "tail_sigma": sigma, "rollout_median_s": c["median_s"],
                     "batch": c["batch"], "slots": c["slots"], "train_s": c["train_s"], "updates": updates,
                     "sync_s": round(out["sync"]["wall_s"]), "async_s": round(out["async"]["wall_s"]),
                     "ratio": round(out["sync"]["wall_s"] / out["async"]["wall_s"], 2),
                     "sync_idle": round(out["sync"]["trainer_idle"], 3),
                     "async_idle": round(out["async"]["trainer_idle"], 3),
                     "async_staleness": round(out["async"]["staleness_mean"], 2),
                     "async_staleness_max": out["async"]["staleness_max"]})
    return rows


def run(quick: bool = False) -> list[dict]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = toy_config()
    state = GLM5ForCausalLM(config).state_dict()
    updates, workers, ratios = (3, 4, (1.0, 10.0)) if quick else (20, 8, LATENCY_RATIOS)
    compute = rollout_compute_s(config, state)
    rows = []
    with ProcessRolloutPool(config, workers) as pool:
        for r in ratios:
            latency = Latency.with_mean(r * compute)
            out = {}
            for mode in ("sync", "async"):
                model = GLM5ForCausalLM(config)
                model.load_state_dict(state)
                out[mode] = run_loop(pool, model, mode, updates, latency, seed=0)
            rows.append({"name": "rl-async", "simulated": False, "latency_ratio": r,
                         "tool_latency_s": round(latency.sample_mean(), 4), "rollout_compute_s": round(compute, 4),
                         "sync_s": round(out["sync"]["wall_s"], 3),
                         "async_s": round(out["async"]["wall_s"], 3),
                         "ratio": round(out["sync"]["wall_s"] / out["async"]["wall_s"], 3),
                         "sync_idle": round(out["sync"]["idle_fraction"], 3),
                         "async_idle": round(out["async"]["idle_fraction"], 3),
                         "async_staleness": round(out["async"]["staleness_mean"], 2),
                         "updates": updates, "workers": workers, "rollouts_per_update": 8})
    return rows + simulated_rows(10 if quick else SIMULATED["updates"])
