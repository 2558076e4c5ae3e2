"""Agentic RL at toy scale: GLM-5's asynchronous rollout/trainer loop, on the calculator task of tool_env.py
(ToolUseEnv, run_rollout, warm_start, success_rate).

The loop (GLM-5 section 4.1.1; glm5_spec.md section 8), ``AsyncRLLoop``:
    * rollout workers (threads), each with its own copy of the policy and its version, pull one rollout at a
      time from a task queue, drive it through a TITO gateway (tito.py), and put the trajectory on a result
      queue. Before each turn a worker loads the newest published weights, so one trajectory may span
      versions w_0 <= ... <= w_k (partial rollouts);
    * the trainer groups results by prompt (G rollouts per prompt) and, when a group is complete, applies
      the rules: drop a sample whose version lag w' - w_0 > tau (max_staleness), drop samples failed by an
      environment crash or lost with a dead worker; if more than G/2 remain, pad the group to G by repeating
      valid samples (cyclically), else drop the group;
    * it trains on ``groups_per_update`` groups with the double-sided IS loss (rl.py) and advantages
      R - mean(R), pushes the weights every K (push_every) updates and resets the optimizer after a push;
    * fault tolerance: a worker whose heartbeat is older than heartbeat_timeout (or whose thread died) is
      declared dead under its lock; its in-flight rollout is written off (the group loses that member) and a
      replacement worker starts. A dead worker can never report afterwards (it checks the same lock), and the
      trainer also refuses any rollout id it has already seen, so nothing is trained twice or lost silently:
      every finished rollout ends in exactly one of the counters trained / stale / failed / lost /
      dropped_group / unconsumed.
    * mode="sync" issues the next batch only after the previous update: no overlap and zero staleness, the
      baseline for the benchmark and the "without staleness" run.

Choices where the paper is silent: the task; threads instead of processes (torch releases the GIL in its kernels;
the toy model is small); the unit of work is one rollout, not one group; padding repeats valid samples in order
(cyclic); staleness is judged when a batch is formed; AdamW (reset on push); gradient-norm clipping at 1.0.
An env with a ``rollout`` method plays its own episodes; rollout_processes.py times the loop with worker processes.
Not handled: task mixes, DP-aware routing, persisting the replay state across restarts. Not bit-reproducible.
"""

from __future__ import annotations

import copy
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.rl import double_sided_is_loss, group_advantages, reinforce_loss, sequence_logprobs
from glm5_ref.tito import TITOGateway, Trajectory, trajectories_to_batch
from glm5_ref.tokenizer import PAD_ID
from glm5_ref.apps.tool_env import EnvCrash, Task, ToolUseEnv, run_rollout
from glm5_ref.training.engine import train_step


def rl_step(model: GLM5ForCausalLM, optimizer: torch.optim.Optimizer, groups: list[list[Trajectory]],
            loss_type: str = "dis", eps_low: float = 0.2, eps_high: float = 0.28) -> dict:
    """One update on complete groups (engine.train_step with the RL objective): A = R - mean_group(R), loss =
    double-sided IS ("dis") or plain REINFORCE on the rollout samples ("reinforce", no off-policy correction);
    gradient norm clipped at 1. Returns statistics."""
    if loss_type not in ("dis", "reinforce"):
        raise ValueError(f"loss_type: expected 'dis' or 'reinforce', got {loss_type!r}")
    rewards = torch.tensor([[t.reward for t in g] for g in groups], dtype=torch.float32)  # (groups, G)

    def objective(net, trajs):
        ids, rollout_lp, mask = trajectories_to_batch(trajs, PAD_ID)  # (N, T) each
        lp = sequence_logprobs(net(ids).logits, ids)  # (N, T)
        adv = group_advantages(rewards).reshape(-1)  # (N,)
        loss, stats = double_sided_is_loss(lp if loss_type == "dis" else lp.detach(), rollout_lp, adv, mask,
                                           eps_low, eps_high)
        return (loss if loss_type == "dis" else reinforce_loss(lp, adv, mask)), stats

    stats, loss, _ = train_step(model, optimizer, [t for g in groups for t in g], loss_fn=objective)
    return {"loss": float(loss), "reward": float(rewards.mean()), **stats}


# ---- the asynchronous loop ---------------------------------------------------------------------------------
@dataclass
class LoopConfig:
    mode: str = "async"              # "async": rollouts overlap training; "sync": generate, then train
    num_workers: int = 2             # rollout worker threads
    group_size: int = 8              # G, rollouts per prompt
    groups_per_update: int = 2       # groups in one RL update
    num_updates: int = 50            # stop after this many updates
    push_every: int = 1              # K: publish weights every K updates (then reset the optimizer)
    max_staleness: int = 4           # tau: drop a sample whose w' - w_0 > tau
    max_inflight_groups: int = 6     # async: how many groups may be issued ahead of the trainer
    loss_type: str = "dis"           # "dis" (double-sided IS) or "reinforce" (no correction)
    eps_low: float = 0.2
    eps_high: float = 0.28
    lr: float = 1e-3
    reset_optimizer_on_push: bool = True
    temperature: float = 1.0
    heartbeat_timeout: float = 5.0   # seconds without a heartbeat before a worker is declared dead
    max_seconds: float = 3600.0      # give up (RuntimeError) after this long
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in ("async", "sync"):
            raise ValueError(f"mode: expected 'async' or 'sync', got {self.mode!r}")
        for name in ("num_workers", "group_size", "groups_per_update", "num_updates", "push_every",
                     "max_inflight_groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive integer, got {v!r}")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(f"max_staleness: expected an integer >= 0, got {self.max_staleness!r}")


class PolicyStore:
    """Versioned weights the trainer publishes and the workers pull (a stand-in for the weight push)."""

    def __init__(self, model: GLM5ForCausalLM):
        self._lock = threading.Lock()
        self.version = 0
        self._state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def publish(self, model: GLM5ForCausalLM) -> int:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with self._lock:
            self._state, self.version = state, self.version + 1
            return self.version

    def get(self) -> tuple[int, dict]:
        with self._lock:
            return self.version, self._state


@dataclass
class Assignment:
    group_id: int
    index: int                      # position in the group
    task: Task
    seed: int


class WorkerKilled(Exception):
    pass


class RolloutWorker:
    """A thread with its own policy copy. ``hang_after``: fault injection, see AsyncRLLoop.faults."""

    def __init__(self, wid: int, loop: "AsyncRLLoop"):
        self.wid, self.loop = wid, loop
        self.model = copy.deepcopy(loop.model).eval()  # built in the trainer thread: no concurrent update
        self.version = -1
        self.lock = threading.Lock()
        self.dead = False
        self.current: tuple[Assignment, str] | None = None
        self.last_beat = time.monotonic()
        self.completed = 0
        self.refused = 0  # reports it tried to make after it was declared dead (a zombie)
        self.thread = threading.Thread(target=self._run, name=f"rollout-worker-{wid}", daemon=True)

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def policy(self) -> tuple[GLM5ForCausalLM, int]:
        version, state = self.loop.store.get()
        if version != self.version:
            self.model.load_state_dict(state)
            self.version = version
        return self.model, self.version

    def _between_turns(self) -> None:
        self.beat()
        hang = self.loop.faults(self.wid, self.completed) if self.loop.faults else None
        if hang is not None:  # stop heartbeating, as a killed / wedged process would; then resume (a zombie)
            self.loop.stop_event.wait(None if math.isinf(hang) else hang)
            if self.loop.stop_event.is_set():
                raise WorkerKilled(f"worker {self.wid} was hung until the loop stopped")

    def _run(self) -> None:
        torch.set_num_threads(1)
        loop = self.loop
        while not loop.stop_event.is_set():
            self.beat()
            try:
                a = loop.tasks.get(timeout=0.02)
            except queue.Empty:
                continue
            rollout_id = f"g{a.group_id}-s{a.index}-w{self.wid}"
            with self.lock:
                if self.dead:  # never started: hand it back untouched
                    loop.tasks.put(a)
                    return
                self.current = (a, rollout_id)
            try:
                traj = getattr(loop.env, "rollout", run_rollout)(self.policy, loop.env, a.task, loop.gateway,  # env's own
                                                                 rollout_id, a.seed, loop.cfg.temperature, self._between_turns)
            except Exception:  # killed, or anything unexpected: report nothing; the supervisor writes it off
                loop.gateway.abort(rollout_id)
                self.refused += int(self.dead)  # a zombie whose rollout the gateway no longer knows
                return
            with self.lock:
                if self.dead:  # a zombie: the supervisor already wrote this rollout off
                    self.refused += 1
                    return
                loop.results.put(("done", a, traj))
                self.current = None
                self.completed += 1


@dataclass
class _Group:
    group_id: int
    task: Task
    members: dict = field(default_factory=dict)  # index -> ("ok" | "failed" | "lost", Trajectory | None)


class AsyncRLLoop:
    """Rollout workers + trainer. ``faults(worker_id, rollouts_completed) -> seconds | None``: fault injection;
    that worker stops heartbeating mid-rollout (after turn 1) for that long (math.inf: until the loop ends),
    then resumes as a zombie whose report is refused if it was declared dead meanwhile.
    ``run()`` returns {"history": per-update records, "counts": sample accounting, "wall_s", "final_version"}."""

    def __init__(self, model: GLM5ForCausalLM, env: ToolUseEnv, cfg: LoopConfig,
                 faults: Callable[[int, int], float | None] | None = None,
                 on_update: Callable[[dict], None] | None = None):
        cfg.validate()
        self.model, self.env, self.cfg, self.faults, self.on_update = model, env, cfg, faults, on_update
        self.store = PolicyStore(model)
        self.gateway = TITOGateway()
        self.tasks: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.rng = random.Random(cfg.seed)
        self.workers: list[RolloutWorker] = []
        self.groups: dict[int, _Group] = {}
        self.completed_groups: list[_Group] = []
        self.next_group = 0
        self.updates = 0
        self.seen: set[str] = set()
        self.counts = {k: 0 for k in ("trained", "padding", "stale", "failed", "lost", "dropped_group",
                                      "duplicate", "groups_trained", "groups_dropped", "workers_replaced")}
        self.trained_ids: list[list[str]] = []  # per update, with padding repeats
        self.fates: dict[str, str] = {}  # rollout id -> trained | stale | failed | dropped_group
        self.lost_ids: list[str] = []  # in-flight rollouts of workers declared dead
        self.history: list[dict] = []
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=0.0)

    def _spawn(self) -> None:
        w = RolloutWorker(len(self.workers), self)
        self.workers.append(w)
        w.thread.start()

    def _check_workers(self) -> None:
        now = time.monotonic()
        for w in list(self.workers):
            if w.dead:
                continue
            if now - w.last_beat > self.cfg.heartbeat_timeout or not w.thread.is_alive():
                with w.lock:
                    w.dead = True
                    lost, w.current = w.current, None
                if lost is not None:
                    self.gateway.abort(lost[1])
                    self.lost_ids.append(lost[1])
                    self.results.put(("lost", lost[0], None))
                self.counts["workers_replaced"] += 1
                self._spawn()

    def _issue_group(self) -> None:
        g = _Group(self.next_group, self.env.sample_task(self.rng))
        self.groups[g.group_id] = g
        for i in range(self.cfg.group_size):
            self.tasks.put(Assignment(g.group_id, i, g.task, self.rng.randrange(2**31)))
        self.next_group += 1

    def _inflight(self) -> int:
        return len(self.groups)

    def _drain(self, timeout: float) -> None:
        try:
            item = self.results.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            kind, a, traj = item
            g = self.groups.get(a.group_id)
            if (traj is not None and traj.rollout_id in self.seen) or g is None:
                self.counts["duplicate"] += 1  # already seen, or its group is already complete
            elif g is not None and a.index not in g.members:
                if traj is not None:
                    self.seen.add(traj.rollout_id)
                    kind = "failed" if traj.failed else "ok"
                g.members[a.index] = (kind, traj)
                if len(g.members) == self.cfg.group_size:
                    self.completed_groups.append(self.groups.pop(a.group_id))
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                return

    def _finalize(self, g: _Group) -> tuple[list[Trajectory] | None, dict]:
        """The rules: drop stale / failed / lost; pad to G if more than G/2 remain, else drop the group.
        Returns (the G trajectories to train on, or None) and the counts, with each rollout's fate."""
        G, now = self.cfg.group_size, self.store.version
        c = {"stale": 0, "failed": 0, "lost": 0, "dropped_group": 0, "padding": 0}
        fates, valid = {}, []
        for i in sorted(g.members):
            kind, traj = g.members[i]
            if kind == "lost":
                c["lost"] += 1
            elif kind == "failed":
                c["failed"] += 1
                fates[traj.rollout_id] = "failed"
            elif traj.staleness(now) > self.cfg.max_staleness:
                c["stale"] += 1
                fates[traj.rollout_id] = "stale"
            else:
                valid.append(traj)
        if 2 * len(valid) <= G:
            c["dropped_group"] = len(valid)
            fates.update({t.rollout_id: "dropped_group" for t in valid})
            return None, {**c, "fates": fates}
        c["padding"] = G - len(valid)
        fates.update({t.rollout_id: "trained" for t in valid})
        return valid + [valid[k % len(valid)] for k in range(G - len(valid))], {**c, "fates": fates}

    def _consume(self, c: dict, kept: list[Trajectory] | None) -> None:
        for k, v in c.items():
            if k != "fates":
                self.counts[k] += v
        self.fates.update(c["fates"])
        if kept is None:
            self.counts["groups_dropped"] += 1
        else:
            self.counts["groups_trained"] += 1
            self.counts["trained"] += self.cfg.group_size - c["padding"]

    def run(self) -> dict:
        cfg = self.cfg
        torch.set_num_threads(1)
        t0 = time.monotonic()
        for _ in range(cfg.num_workers):
            self._spawn()
        try:
            while self.updates < cfg.num_updates:
                if time.monotonic() - t0 > cfg.max_seconds:
                    raise RuntimeError(f"AsyncRLLoop: {self.updates} of {cfg.num_updates} updates after "
                                       f"{cfg.max_seconds} s (max_seconds)")
                if cfg.mode == "async":
                    while self._inflight() + len(self.completed_groups) < cfg.max_inflight_groups:
                        self._issue_group()
                elif self._inflight() == 0 and not self.completed_groups:
                    for _ in range(cfg.groups_per_update):
                        self._issue_group()
                self._drain(timeout=0.005)
                self._check_workers()
                if cfg.mode == "async":
                    ready = len(self.completed_groups) >= cfg.groups_per_update
                else:
                    ready = self._inflight() == 0 and bool(self.completed_groups)
                if not ready:
                    continue
                batch = []  # (group, kept, counts): staleness is judged now, when the batch is formed
                while self.completed_groups and len(batch) < cfg.groups_per_update:
                    g = self.completed_groups.pop(0)
                    kept, c = self._finalize(g)
                    if kept is None:
                        self._consume(c, None)
                    else:
                        batch.append((g, kept, c))
                if batch and (len(batch) == cfg.groups_per_update or cfg.mode == "sync"):
                    self._train([kept for _, kept, _ in batch], t0)
                    for _, kept, c in batch:
                        self._consume(c, kept)
                else:  # async and too few survivors: put them back unjudged (judged again next time)
                    self.completed_groups[:0] = [g for g, _, _ in batch]
            wall_s = time.monotonic() - t0  # before shutting the workers down
        finally:
            self.stop_event.set()
            for w in self.workers:
                w.thread.join(timeout=2.0)
        self.counts["unconsumed"] = self._unconsumed()
        return {"history": self.history, "counts": dict(self.counts), "wall_s": wall_s,
                "final_version": self.store.version}

    def _unconsumed(self) -> int:
        """Finished rollouts, valid or failed, still waiting in a group when the loop stopped: seen, never judged."""
        return sum(1 for g in list(self.groups.values()) + self.completed_groups
                   for kind, _ in g.members.values() if kind != "lost")

    def _train(self, groups: list[list[Trajectory]], t0: float) -> None:
        cfg = self.cfg
        version = self.store.version
        stats = rl_step(self.model, self.optimizer, groups, cfg.loss_type, cfg.eps_low, cfg.eps_high)
        self.updates += 1
        self.trained_ids.append([t.rollout_id for g in groups for t in g])
        lags = [t.staleness(version) for g in groups for t in g]
        record = {"update": self.updates, "version": version, "mean_staleness": sum(lags) / len(lags),
                  "max_staleness": max(lags), "wall_s": time.monotonic() - t0, **stats}
        self.history.append(record)
        if self.updates % cfg.push_every == 0:
            self.store.publish(self.model)
            if cfg.reset_optimizer_on_push:
                self.optimizer = self._new_optimizer()
        if self.on_update is not None:
            self.on_update(record)
