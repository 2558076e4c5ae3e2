"""A discrete-event simulation of the synchronous and the asynchronous RL loop at cluster scale.

The process benchmark (bench rl-async, rollout_processes.py) runs the real loop on a shared CPU, where workers and
trainer compete for two cores. GLM-5's case is different (section 4.1.1): the inference engine and the trainer
sit on separate GPUs, an update trains on hundreds of agentic rollouts, and a rollout's duration has a long tail
(many turns, slow tools, long generations). This module simulates only the timing of that case: no model, no
cores, just when rollouts start and end and when the trainer is busy. Every number it produces is simulated.

    slots        rollouts the inference engine runs at once (its concurrency)
    batch        rollouts one update trains on
    train_s      seconds one update takes (with the weight push)
    durations    a sampler of rollout durations in seconds (``lognormal_durations``: median and tail)

    sync    issue ``batch`` rollouts on the current weights, wait for the last one, train; repeat. Slots idle
            while the tail finishes and while the trainer trains; the trainer idles while rollouts run.
    async   a new rollout starts, with the newest weights, whenever fewer than ``slots`` rollouts are running or
            finished and waiting to be trained (so slots idle once the trainer falls behind: that bounds the
            staleness); the trainer takes the first ``batch`` finished rollouts whenever it is free and that many
            are waiting. A rollout's staleness is the number of updates published between its start and the
            update that trains on it.

Results: wall seconds for ``updates`` updates, the trainer's idle fraction, the slots' utilisation, and the
staleness (mean and max) of the asynchronous samples. Not modelled: partial rollouts (a rollout keeps the weights
it started with), the staleness limit (every finished rollout trains, in arrival order), weight-push stalls on
the inference side, failures.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Callable


def lognormal_durations(median_s: float, sigma: float) -> Callable[[random.Random], float]:
    """Rollout durations exp(N(log median, sigma^2)): sigma 0.25 is a narrow spread, 1.0 puts the 99th percentile
    at ~10x the median, 1.5 at ~33x."""
    if not median_s > 0 or not sigma >= 0:
        raise ValueError(f"median_s, sigma: expected median_s > 0 and sigma >= 0, got {median_s}, {sigma}")
    return lambda rng: median_s * math.exp(sigma * rng.gauss(0.0, 1.0))


def _check(updates: int, batch: int, slots: int, train_s: float) -> None:
    for name, v in (("updates", updates), ("batch", batch), ("slots", slots)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    if not train_s >= 0:
        raise ValueError(f"train_s: expected seconds >= 0, got {train_s!r}")


def simulate(mode: str, updates: int, batch: int, slots: int, train_s: float,
             durations: Callable[[random.Random], float], seed: int = 0) -> dict:
    """Simulate ``updates`` updates (module docstring). Returns wall_s, trainer_idle, slot_utilisation,
    staleness_mean, staleness_max (0 for sync)."""
    _check(updates, batch, slots, train_s)
    rng = random.Random(seed)
    if mode == "sync":
        t = busy_slots = 0.0
        for _ in range(updates):
            ends = [0.0] * min(slots, batch)  # per slot: when it is free again (rollouts queue if batch > slots)
            heapq.heapify(ends)
            for _ in range(batch):
                start = heapq.heappop(ends)
                d = durations(rng)
                busy_slots += d
                heapq.heappush(ends, start + d)
            t += max(ends) + train_s
        return {"wall_s": t, "trainer_idle": 1 - updates * train_s / t, "slot_utilisation": busy_slots / (slots * t),
                "staleness_mean": 0.0, "staleness_max": 0}
    if mode != "async":
        raise ValueError(f"mode: expected 'sync' or 'async', got {mode!r}")
    if slots < batch:
        raise ValueError(f"slots: async needs at least batch ({batch}) rollouts running or waiting, got {slots}")
    events: list[tuple[float, int, int, float]] = []  # running: (end, sequence number, version, start)
    waiting: list[int] = []  # versions of finished, not yet trained rollouts, in arrival order
    lags: list[int] = []
    seq = version = done = 0
    t = finished_busy = 0.0
    training_until: float | None = None  # when the update in progress ends (None: the trainer is idle)

    def fill(now: float) -> None:  # start rollouts while fewer than `slots` are running or waiting
        nonlocal seq
        while len(events) + len(waiting) < slots:
            heapq.heappush(events, (now + durations(rng), seq, version, now))
            seq += 1

    fill(0.0)
    while done < updates:
        if training_until is None and len(waiting) >= batch:  # the trainer takes the first `batch` finished
            taken, waiting = waiting[:batch], waiting[batch:]
            lags += [version - v for v in taken]
            training_until = t + train_s
            fill(t)  # their places go to new rollouts, on the weights being trained now
        if training_until is not None and (not events or training_until <= events[0][0]):  # the update ends first
            t, training_until = training_until, None
            version += 1  # published
            done += 1
            continue
        end, _, v, begun = heapq.heappop(events)
        t = end
        finished_busy += end - begun
        waiting.append(v)  # it stays counted against `slots` until it is trained: no new start here
    running_busy = sum(t - begun for _, _, _, begun in events)
    return {"wall_s": t, "trainer_idle": 1 - updates * train_s / t,
            "slot_utilisation": (finished_busy + running_busy) / (slots * t),
            "staleness_mean": sum(lags) / len(lags), "staleness_max": max(lags)}
