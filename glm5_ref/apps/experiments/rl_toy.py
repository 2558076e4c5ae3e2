"""rl-toy: asynchronous agentic RL on the toy tool-use task, with and without staleness.

A ~0.6M-parameter GLM-5 (tool_env.toy_config) is warm-started for a few hundred supervised steps on correct
episodes of the calculator task (tool_env.ToolUseEnv: call the tool with "a+b", read the observation, answer),
then trained with RL from the same starting weights in three ways:
    sync                 generate a batch with the current weights, train, push: no staleness (ratios = 1)
    async                12 rollout workers run ahead of the trainer (up to 16 groups in flight); tool calls
                         have a long-tailed latency, so a group waits for its slowest member and samples lag
                         up to tau = 4 versions; the double-sided IS loss masks tokens whose ratio left the band
    async-no-correction  the same asynchronous loop with plain REINFORCE on the stale samples
and records reward, rejected-token fraction and version lag against updates, and the success rate (sampling
at temperature 1, fresh tasks) before and after RL.

    python -m glm5_ref experiment rl-toy [--quick] [--out DIR] [--seeds 0,1]

Full run: figures/rl_toy.json and figures/rl_toy.png (10 minutes on a shared 2-core CPU, one torch
thread). --quick: the same code at a toy size (well under a minute), written under --out.
Runs are not bit-reproducible: thread timing decides which weights a rollout used.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from glm5_ref.apps.agentic import AsyncRLLoop, LoopConfig
from glm5_ref.apps.tool_env import ToolUseEnv, long_tail_latency, success_rate, toy_config, warm_start
from glm5_ref.apps.experiments import write_json
from glm5_ref.model import GLM5ForCausalLM

FULL = dict(warm_steps=200, warm_lr=1e-2, updates=300, group_size=8, groups_per_update=2, eval_n=200,
            workers=12, max_inflight_groups=16, max_staleness=4, lr=5e-4)
QUICK = dict(warm_steps=30, warm_lr=1e-2, updates=3, group_size=4, groups_per_update=1, eval_n=12,
             workers=4, max_inflight_groups=4, max_staleness=4, lr=5e-4)
# simulated tool latency (seconds): 0.05 + 0.05 * Pareto(1.5), capped at 3 s. A group is complete only when
# its slowest member is, so its early members wait and age: this is where staleness comes from.
LATENCY = dict(base=0.05, scale=0.05, alpha=1.5, cap=3.0)
RUNS = (("sync", "sync", "dis"), ("async", "async", "dis"), ("async-no-correction", "async", "reinforce"))
ENV_RANGE = (10, 29)


def _run_one(state: dict, env: ToolUseEnv, p: dict, name: str, mode: str, loss: str, seed: int) -> dict:
    model = GLM5ForCausalLM(toy_config())
    model.load_state_dict(state)
    cfg = LoopConfig(mode=mode, num_workers=p["workers"], group_size=p["group_size"],
                     groups_per_update=p["groups_per_update"], num_updates=p["updates"], push_every=1,
                     max_staleness=p["max_staleness"], max_inflight_groups=p["max_inflight_groups"],
                     loss_type=loss, lr=p["lr"], heartbeat_timeout=30.0, seed=seed)
    t0 = time.perf_counter()

    def progress(rec: dict) -> None:
        if rec["update"] % 25 == 0:
            print(f"  {name} seed {seed}: update {rec['update']}/{p['updates']} reward {rec['reward']:.2f} "
                  f"rejected {rec['frac_rejected']:.3f} lag {rec['mean_staleness']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    slow_env = ToolUseEnv(*ENV_RANGE, latency=long_tail_latency(**LATENCY))
    out = AsyncRLLoop(model, slow_env, cfg, on_update=progress).run()
    after = success_rate(model, env, p["eval_n"], temperature=1.0, seed=10_000 + seed)
    greedy = success_rate(model, env, p["eval_n"], temperature=0.0, seed=10_000 + seed)
    hist = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in out["history"]]
    return {"name": name, "mode": mode, "loss_type": loss, "seed": seed, "history": hist, "counts": out["counts"],
            "wall_s": round(out["wall_s"], 2), "success_after": after, "success_after_greedy": greedy}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = {"sync": "tab:blue", "async": "tab:orange", "async-no-correction": "tab:red"}

    def smooth(xs, k=10):
        return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]

    for run in result["runs"]:
        h = run["history"]
        u = [r["update"] for r in h]
        label = f"{run['name']} (seed {run['seed']})" if len(result["seeds"]) > 1 else run["name"]
        c = colors.get(run["name"])
        axes[0].plot(u, smooth([r["reward"] for r in h]), color=c, label=label)
        axes[1].plot(u, smooth([r["frac_rejected"] for r in h]), color=c, label=label)
        axes[2].plot(u, smooth([r["mean_staleness"] for r in h]), color=c, label=label)
    axes[0].set(title="reward per update (moving mean of 10)", xlabel="update", ylabel="mean reward")
    axes[1].set(title="tokens outside the band (rejected)", xlabel="update", ylabel="fraction of loss tokens")
    axes[2].set(title="version lag of trained samples", xlabel="update", ylabel="w' - w_0 (mean)")
    names = ["before RL"] + [name for name, _, _ in RUNS]
    vals = [result["success_before"]] + [result["success_after"][n] for n, _, _ in RUNS]
    axes[3].bar(range(len(vals)), vals, color=["gray"] + [colors[n] for n, _, _ in RUNS])
    axes[3].set_xticks(range(len(vals)), names, rotation=15)
    axes[3].set(title="success rate (T = 1, fresh tasks)", ylim=(0, 1))
    for k, v in enumerate(vals):
        axes[3].text(k, v + 0.02, f"{v:.2f}", ha="center")
    axes[0].legend(fontsize=8)
    fig.suptitle("rl-toy: agentic RL on the calculator tool-use task (toy GLM-5, 2-core CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False, out_dir: str | None = None, seeds: list[int] | None = None) -> dict:
    torch.set_num_threads(1)
    p = QUICK if quick else FULL
    seeds = list(seeds) if seeds else [0]
    out_dir = Path(out_dir) if out_dir is not None else Path("figures")
    env = ToolUseEnv(*ENV_RANGE)
    t_start = time.perf_counter()
    runs, before, before_greedy, warm_losses = [], {}, {}, {}
    for seed in seeds:
        torch.manual_seed(seed)
        model = GLM5ForCausalLM(toy_config())
        losses = warm_start(model, env, p["warm_steps"], lr=p["warm_lr"], seed=seed)
        warm_losses[seed] = [round(x, 4) for x in losses]
        before[seed] = success_rate(model, env, p["eval_n"], temperature=1.0, seed=10_000 + seed)
        before_greedy[seed] = success_rate(model, env, p["eval_n"], temperature=0.0, seed=10_000 + seed)
        print(f"seed {seed}: warm start {p['warm_steps']} steps, loss {losses[-1]:.3f}, success {before[seed]:.2f}",
              flush=True)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for name, mode, loss in RUNS:
            runs.append(_run_one(state, env, p, name, mode, loss, seed))
            print(f"  {name}: success {runs[-1]['success_after']:.2f} in {runs[-1]['wall_s']:.0f} s", flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    result = {
        "experiment": "rl-toy",
        "quick": quick,
        "seeds": seeds,
        "config": {**p, "env_range": list(ENV_RANGE), "tool_latency": LATENCY, "model": "tool_env.toy_config()",
                   "push_every": 1,
                   "eps_low": 0.2, "eps_high": 0.28, "temperature": 1.0, "optimizer": "AdamW, reset after each push",
                   "runs": [list(r) for r in RUNS]},
        "machine": f"{platform.machine()} CPU, 1 torch thread, shared",
        "date": time.strftime("%Y-%m-%d"),
        "success_before": mean(list(before.values())),
        "success_before_greedy": mean(list(before_greedy.values())),
        "success_before_per_seed": {str(k): v for k, v in before.items()},
        "success_after": {name: mean([r["success_after"] for r in runs if r["name"] == name]) for name, _, _ in RUNS},
        "success_after_greedy": {name: mean([r["success_after_greedy"] for r in runs if r["name"] == name])
                                 for name, _, _ in RUNS},
        "warm_start_losses": {str(k): v for k, v in warm_losses.items()},
        "runs": runs,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_json(out_dir / "rl_toy.json", result)
    _plot(result, out_dir / "rl_toy.png")
    return result
