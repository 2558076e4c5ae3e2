"""The discrete-event simulation of the sync and async RL loops (apps/rl_simulation.py), checked by hand."""

import random

import pytest

from glm5_ref.apps.rl_simulation import lognormal_durations, simulate

TEN = lambda rng: 10.0  # noqa: E731  every rollout takes 10 s


def test_sync_is_rollout_makespan_plus_training_per_update():
    out = simulate("sync", 5, 4, 8, 3.0, TEN)
    assert out["wall_s"] == 5 * (10 + 3) and out["staleness_max"] == 0
    assert out["slot_utilisation"] == pytest.approx(5 * 4 * 10 / (8 * 65))  # 4 of 8 slots busy, 10 s of each 13
    assert simulate("sync", 2, 8, 4, 0.0, TEN)["wall_s"] == 2 * 20  # 8 rollouts on 4 slots: two waves


def test_async_by_hand():
    """8 slots, batches of 4, 10 s rollouts, 3 s updates. t=0: 8 start (v0). t=10: 4 train (lag 0) until 13 while
    4 new start; 13: v1, the other 4 train (lag 1) until 16, 4 new start; 16: v2. 20: the four from t=10 train (lag
    2) until 23; 23: v3, the four from t=13 (lag 2); 26: v4; 30: the four from t=20 (lag 2); 33: v5, done."""
    out = simulate("async", 5, 4, 8, 3.0, TEN)
    assert out["wall_s"] == 33.0
    assert out["staleness_mean"] == pytest.approx((0 + 1 + 2 + 2 + 2) / 5) and out["staleness_max"] == 2
    assert out["trainer_idle"] == pytest.approx(1 - 15 / 33)


def test_a_longer_tail_slows_sync_much_more_than_async():
    runs = {s: {m: simulate(m, 20, 64, 128, 30.0, lognormal_durations(20.0, s), seed=1)["wall_s"]
                for m in ("sync", "async")} for s in (0.25, 1.5)}
    assert runs[1.5]["sync"] > 3 * runs[0.25]["sync"]  # sync waits for the slowest of 64 each time
    assert runs[1.5]["async"] < 1.5 * runs[0.25]["async"]  # async is bound by the trainer: 20 x 30 s
    assert runs[0.25]["async"] >= 20 * 30.0


def test_lognormal_durations_median():
    draw, rng = lognormal_durations(60.0, 1.0), random.Random(0)
    xs = sorted(draw(rng) for _ in range(20001))
    assert 55 < xs[10000] < 65


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="mode"):
        simulate("fast", 1, 1, 1, 1.0, TEN)
    with pytest.raises(ValueError, match="slots"):
        simulate("async", 1, 8, 4, 1.0, TEN)
    with pytest.raises(ValueError, match="batch"):
        simulate("sync", 1, 0, 4, 1.0, TEN)
    with pytest.raises(ValueError, match="train_s"):
        simulate("sync", 1, 1, 4, -1.0, TEN)
    with pytest.raises(ValueError, match="median_s"):
        lognormal_durations(0.0, 1.0)
