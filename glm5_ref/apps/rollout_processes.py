"""Rollout workers in separate processes: the synchronous and the asynchronous RL loop, timed.

agentic.py's AsyncRLLoop teaches the loop's rules (staleness, crashes, padding, heartbeats) with worker threads in
one process, where 16 threads share the GIL and two cores with the trainer: what asynchrony buys there depends on
the machine as much as on the loop. Here each rollout worker is its own process (torch.multiprocessing, "spawn"),
as in GLM-5's decoupled rollout engine (section 4.1.1): it keeps a copy of the policy, pulls one rollout at a
time from a task queue, plays it on the calculator task of tool_env.py (run_rollout, through its own TITO
gateway) and puts the trajectory on a result queue. The trainer, in the parent process, publishes its weights
into shared memory after every update (a version counter next to them); a worker loads the newest weights before
each turn when the version moved, so one trajectory may span versions (partial rollouts).

    mode="sync"   issue the groups of one update, wait for the slowest rollout, train, publish: rollouts and
                  training take turns, and every sample is on-policy (staleness 0).
    mode="async"  keep ``max_inflight_groups`` groups issued; train as soon as ``groups_per_update`` groups are
                  complete, while the workers go on rolling out with the weights they have.

``ProcessRolloutPool`` starts the workers once (importing torch in a fresh process takes seconds) and serves any
number of timed runs (``run_loop``); a run starts from the weights it is given, and it waits for every rollout it
issued before it returns, so the next run starts with idle workers and empty queues. What a run measures: wall
time from the first issued group to the last update, the trainer's busy time (its updates and weight pushes),
hence its idle fraction, and the staleness of the trained samples.

Kept simpler than AsyncRLLoop, on purpose (this is the timing harness, not the teaching loop): no staleness limit
(every sample trains, so both modes train on the same number), no crashes, no heartbeats or worker replacement.
"""

from __future__ import annotations

import queue
import random
import time
from dataclasses import dataclass

import torch
import torch.multiprocessing as mp

from glm5_ref.apps.agentic import rl_step
from glm5_ref.apps.tool_env import ToolUseEnv, long_tail_latency, run_rollout
from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.tito import TITOGateway


@dataclass(frozen=True)
class Latency:
    """Seconds slept per tool call: base + scale * Pareto(alpha), capped (tool_env.long_tail_latency)."""
    base: float = 0.0
    scale: float = 0.0
    alpha: float = 1.5
    cap: float = 0.0

    @classmethod
    def with_mean(cls, mean: float, alpha: float = 1.5, cap_ratio: float = 10.0) -> "Latency":
        """Half the mean as a fixed base, half as a Pareto tail (mean alpha / (alpha - 1) before the cap),
        capped at cap_ratio x the mean. The cap lowers the mean a little: ``sample_mean`` says by how much."""
        return cls(mean / 2, mean / 2 / (alpha / (alpha - 1)), alpha, cap_ratio * mean)

    def sampler(self):
        return None if self.cap <= 0 else long_tail_latency(self.base, self.scale, self.alpha, self.cap)

    def sample_mean(self, n: int = 100_000, seed: int = 0) -> float:
        draw, rng = self.sampler(), random.Random(seed)
        return 0.0 if draw is None else sum(draw(rng) for _ in range(n)) / n


def _worker_main(wid: int, config: GLM5Config, shared: dict, version, lock, tasks, results) -> None:
    """One rollout process: (rollout id, task, seed, temperature, env range, Latency) in, (id, trajectory) out."""
    torch.set_num_threads(1)
    model = GLM5ForCausalLM(config).eval()
    local = {"version": -1}

    def policy():
        if version.value != local["version"]:
            with lock:  # the trainer writes the shared weights under the same lock
                model.load_state_dict(shared)
                local["version"] = version.value
        return model, local["version"]

    results.put(("ready", wid, None))
    while (item := tasks.get()) is not None:
        rollout_id, task, seed, temperature, env_range, latency = item
        env = ToolUseEnv(*env_range, latency=latency.sampler())
        with torch.no_grad():
            traj = run_rollout(policy, env, task, TITOGateway(), rollout_id, seed, temperature)
        results.put(("done", rollout_id, traj))


class ProcessRolloutPool:
    """``workers`` rollout processes sharing one weight buffer. Use as a context manager (closes the workers)."""

    def __init__(self, config: GLM5Config, workers: int, start_timeout: float = 120.0):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers: expected a positive integer, got {workers!r}")
        ctx = mp.get_context("spawn")
        self.config, self.workers = config, workers
        self.shared = {k: v.detach().clone().share_memory_() for k, v in GLM5ForCausalLM(config).state_dict().items()}
        self.version, self.lock = ctx.Value("q", 0, lock=False), ctx.Lock()
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.procs = [ctx.Process(target=_worker_main, daemon=True, name=f"rollout-{w}",
                                  args=(w, config, self.shared, self.version, self.lock, self.tasks, self.results))
                      for w in range(workers)]
        for p in self.procs:
            p.start()
        for _ in range(workers):  # every worker has imported torch and built its model
            self._get(start_timeout, "starting the rollout workers")

    def publish(self, model: GLM5ForCausalLM) -> int:
        """Copy the trainer's weights into shared memory; the workers pick them up before their next turn."""
        with self.lock, torch.no_grad():
            for k, v in model.state_dict().items():
                self.shared[k].copy_(v)
            self.version.value += 1
        return self.version.value

    def submit(self, rollout_id: str, task, seed: int, temperature: float, env_range, latency: Latency) -> None:
        self.tasks.put((rollout_id, task, seed, temperature, env_range, latency))

    def _get(self, timeout: float, doing: str):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                dead = [p.name for p in self.procs if not p.is_alive()]
                if dead:  # a worker that died never answers: say so now rather than at the deadline
                    raise RuntimeError(f"ProcessRolloutPool: rollout workers {dead} died while {doing}. Workers "
                                       "start with 'spawn', which re-imports the main script: a script that starts "
                                       "a pool needs its code under `if __name__ == \"__main__\":`") from None
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"ProcessRolloutPool: nothing came back within {timeout} s while "
                                       f"{doing}") from None

    def next_result(self, timeout: float = 600.0):
        """(rollout id, trajectory) of the next finished rollout."""
        _, rollout_id, traj = self._get(timeout, "waiting for a rollout")
        return rollout_id, traj

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=10.0)
            if p.is_alive():
                p.terminate()

    def __enter__(self) -> "ProcessRolloutPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_loop(pool: ProcessRolloutPool, model: GLM5ForCausalLM, mode: str, updates: int, latency: Latency, *,
             group_size: int = 4, groups_per_update: int = 2, max_inflight_groups: int | None = None,
             env_range: tuple[int, int] = (10, 29), lr: float = 3e-4, temperature: float = 1.0,
             seed: int = 0) -> dict:
    """Train ``model`` for ``updates`` RL updates (agentic.rl_step) on rollouts from ``pool``.
    Returns wall_s, trainer_busy_s, idle_fraction, staleness (mean / max over trained samples), trained_ids."""
    if mode not in ("sync", "async"):
        raise ValueError(f"mode: expected 'sync' or 'async', got {mode!r}")
    for name, v in (("updates", updates), ("group_size", group_size), ("groups_per_update", groups_per_update)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    inflight = max_inflight_groups or (pool.workers + group_size - 1) // group_size + groups_per_update
    if inflight < groups_per_update:
        raise ValueError(f"max_inflight_groups: expected at least groups_per_update ({groups_per_update}), "
                         f"got {inflight}")
    env, rng = ToolUseEnv(*env_range), random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    pool.publish(model)  # the workers start from this run's weights
    pending: dict[int, dict[int, object]] = {}  # group -> index -> trajectory
    slot: dict[str, tuple[int, int]] = {}  # rollout id -> (group, index)
    complete: list[list] = []
    trained: list[str] = []
    lags: list[int] = []
    issued = done = busy = 0

    def issue() -> None:
        nonlocal issued
        task = env.sample_task(rng)
        pending[issued] = {}
        for i in range(group_size):
            slot[f"g{issued}-s{i}"] = (issued, i)
            pool.submit(f"g{issued}-s{i}", task, rng.randrange(2**31), temperature, env_range, latency)
        issued += 1

    t0 = time.perf_counter()
    while done < updates:
        if mode == "async":
            while len(pending) + len(complete) < inflight:
                issue()
        elif not pending and not complete:
            for _ in range(groups_per_update):
                issue()
        rollout_id, traj = pool.next_result()
        g, i = slot.pop(rollout_id)
        pending[g][i] = traj
        if len(pending[g]) == group_size:
            members = pending.pop(g)
            complete.append([members[k] for k in range(group_size)])
        if len(complete) >= groups_per_update and (mode == "async" or not pending):
            batch, complete = complete[:groups_per_update], complete[groups_per_update:]
            lags += [t.staleness(pool.version.value) for grp in batch for t in grp]  # versions are the pool's
            trained += [t.rollout_id for grp in batch for t in grp]
            t = time.perf_counter()
            rl_step(model, optimizer, batch)
            pool.publish(model)
            busy += time.perf_counter() - t
            done += 1
    wall = time.perf_counter() - t0
    outstanding = sum(group_size - len(m) for m in pending.values())
    for _ in range(outstanding):  # let the workers finish what this run issued: the next run starts clean
        pool.next_result()
    return {"wall_s": wall, "trainer_busy_s": busy, "idle_fraction": 1.0 - busy / wall,
            "staleness_mean": sum(lags) / len(lags), "staleness_max": max(lags), "trained_ids": trained,
            "issued_rollouts": issued * group_size}


def rollout_compute_s(config: GLM5Config, state: dict, n: int = 16, env_range: tuple[int, int] = (10, 29),
                      seed: int = 0) -> float:
    """Mean seconds one rollout's compute takes (no tool latency), one thread, in this process."""
    model = GLM5ForCausalLM(config).eval()
    model.load_state_dict(state)
    env, rng = ToolUseEnv(*env_range), random.Random(seed)
    policy = lambda: (model, 0)  # noqa: E731
    with torch.no_grad():
        run_rollout(policy, env, env.sample_task(rng), TITOGateway(), "warm", 0)
        t = time.perf_counter()
        for k in range(n):
            run_rollout(policy, env, env.sample_task(rng), TITOGateway(), f"r{k}", rng.randrange(2**31))
    return (time.perf_counter() - t) / n
