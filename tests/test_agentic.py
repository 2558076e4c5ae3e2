"""The toy tool-use environment (glm5_ref/tool_env.py) and the asynchronous loop (glm5_ref/agentic.py): the
environment's rules, staleness / crash / group-padding rules, sync and async runs, fault injection, and the rl-toy
quick run."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.apps.agentic import AsyncRLLoop, LoopConfig, _Group, rl_step
from glm5_ref.tito import trajectories_to_batch
from glm5_ref.tokenizer import PAD_ID
from glm5_ref.apps.tool_env import ASSISTANT, OBSERVATION, TOOL_CALL, ToolUseEnv, toy_config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.tito import MODEL, PROMPT, Segment, Trajectory
from glm5_ref.tokenizer import EOT_ID, encode


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLM5ForCausalLM(toy_config())


def _traj(rid: str, version: int, reward: float = 1.0, failed: bool = False) -> Trajectory:
    return Trajectory(rid, [Segment(PROMPT, [1, 2]), Segment(MODEL, [3, 4], [-0.5, -0.25], version)],
                      reward=reward, failed=failed)


def test_environment_rewards_only_the_right_call_and_answer():
    env = ToolUseEnv(10, 29)
    task = env.sample_task(random.Random(0))
    ids, mask = env.demonstration(task)
    n = len(task.prompt_ids)
    call = ids[n:n + 5]
    assert call[0] == TOOL_CALL and call[-1] == OBSERVATION and env.parse_call(call) == (task.a, task.b)
    obs = env.call_tool(call, random.Random(0))
    assert obs[-1] == ASSISTANT and obs[1:-1] == encode(str(task.a + task.b))
    answer = encode(str(task.a + task.b)) + [EOT_ID]
    assert env.reward(task, call, answer) == 1.0
    assert env.reward(task, call, answer[:-1]) == 0.0  # no end of turn
    assert env.reward(task, call, encode(str(task.a + task.b + 1)) + [EOT_ID]) == 0.0
    wrong = [TOOL_CALL, *encode(str(task.b)), encode("+")[0], *encode(str(task.a + 1)), OBSERVATION]
    assert env.reward(task, wrong, answer) == 0.0
    assert env.call_tool([TOOL_CALL, OBSERVATION], random.Random(0))[1:-1] == encode("error")
    assert sum(mask) == len(call) + len(answer) and len(mask) == len(ids)
    with pytest.raises(ValueError, match="crash_prob"):
        ToolUseEnv(crash_prob=1.5)


@pytest.fixture(scope="module")
def idle_loop(model):
    return AsyncRLLoop(model, ToolUseEnv(), LoopConfig())  # never run: only its rules are used


@settings(max_examples=40, deadline=None)
@given(G=st.integers(2, 8), tau=st.integers(0, 3), now=st.integers(0, 6), data=st.data())
def test_staleness_crash_and_group_padding_rules(idle_loop, G, tau, now, data):
    loop = idle_loop
    loop.cfg.group_size, loop.cfg.max_staleness, loop.store.version = G, tau, now
    g = _Group(0, None)
    kinds = data.draw(st.lists(st.sampled_from(["ok", "failed", "lost"]), min_size=G, max_size=G))
    versions = data.draw(st.lists(st.integers(0, now), min_size=G, max_size=G))
    for i, (kind, v) in enumerate(zip(kinds, versions)):
        g.members[i] = (kind, None if kind == "lost" else _traj(f"r{i}", v, failed=kind == "failed"))
    kept, c = loop._finalize(g)
    fresh = [f"r{i}" for i in range(G) if kinds[i] == "ok" and now - versions[i] <= tau]
    assert c["stale"] == sum(kinds[i] == "ok" and now - versions[i] > tau for i in range(G))
    assert c["failed"] == kinds.count("failed") and c["lost"] == kinds.count("lost")
    if 2 * len(fresh) > G:  # more than half valid: pad by repeating valid samples
        assert len(kept) == G and [t.rollout_id for t in kept[:len(fresh)]] == fresh
        assert {t.rollout_id for t in kept} == set(fresh) and c["padding"] == G - len(fresh)
        assert all(t.staleness(now) <= tau and not t.failed for t in kept)
    else:
        assert kept is None and c["dropped_group"] == len(fresh)
    assert set(c["fates"]) == {f"r{i}" for i in range(G) if kinds[i] != "lost"}


def test_exactly_half_valid_drops_the_group(model):
    loop = AsyncRLLoop(model, ToolUseEnv(), LoopConfig(group_size=4, max_staleness=4))
    g = _Group(0, None, {0: ("ok", _traj("a", 0)), 1: ("ok", _traj("b", 0)),
                         2: ("failed", _traj("c", 0, failed=True)), 3: ("lost", None)})
    assert loop._finalize(g)[0] is None
    g.members[3] = ("ok", _traj("d", 0))
    kept, _ = loop._finalize(g)
    assert [t.rollout_id for t in kept] == ["a", "b", "d", "a"]


def test_unconsumed_counts_every_finished_rollout_left_in_a_group(model):
    # a failed rollout waiting in an unfinished group is seen but never judged: it must count as unconsumed,
    # or the accounting seen == fates + unconsumed breaks (it did, rarely, in the crash test)
    loop = AsyncRLLoop(model, ToolUseEnv(), LoopConfig(group_size=4, max_staleness=4))
    loop.groups[0] = _Group(0, None, {0: ("ok", _traj("a", 0)), 1: ("failed", _traj("b", 0, failed=True)),
                                      2: ("lost", None)})
    loop.completed_groups.append(_Group(1, None, {0: ("failed", _traj("c", 0, failed=True))}))
    assert loop._unconsumed() == 3


def test_rl_step_masks_environment_tokens(model):
    m = GLM5ForCausalLM(toy_config())
    m.load_state_dict(model.state_dict())
    trajs = [_traj("a", 0, 1.0), _traj("b", 0, 0.0)]
    ids, lps, mask = trajectories_to_batch(trajs, PAD_ID)
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]] and lps[0, 2].item() == -0.5
    stats = rl_step(m, torch.optim.SGD(m.parameters(), lr=0.0), [trajs], "dis")
    assert stats["num_tokens"] == 4 and math.isfinite(stats["loss"])
    with pytest.raises(ValueError, match="loss_type"):
        rl_step(m, torch.optim.SGD(m.parameters(), lr=0.0), [trajs], "ppo")


def _accounting(loop: AsyncRLLoop, out: dict) -> None:
    """Every finished rollout has exactly one fate; no rollout is trained in two updates."""
    trained = [rid for update in loop.trained_ids for rid in dict.fromkeys(update)]  # unique within an update
    assert len(trained) == len(set(trained)), "a rollout was trained in two updates"
    assert set(trained) == {rid for rid, f in loop.fates.items() if f == "trained"}
    assert out["counts"]["trained"] == len(trained)
    assert out["counts"]["duplicate"] == 0
    assert not set(loop.lost_ids) & set(loop.fates) and not set(loop.lost_ids) & set(trained)
    assert len(loop.seen) == len(loop.fates) + out["counts"]["unconsumed"]


def test_sync_loop_is_on_policy(model):
    m = GLM5ForCausalLM(toy_config())
    m.load_state_dict(model.state_dict())
    loop = AsyncRLLoop(m, ToolUseEnv(10, 29), LoopConfig(mode="sync", num_workers=2, group_size=4,
                                                          groups_per_update=1, num_updates=3, lr=1e-3,
                                                          max_seconds=120))
    out = loop.run()
    assert len(out["history"]) == 3 and out["final_version"] == 3
    assert all(r["max_staleness"] == 0 for r in out["history"])
    assert all(r["frac_rejected"] == 0.0 and abs(r["mean_ratio"] - 1) < 1e-3 for r in out["history"])
    _accounting(loop, out)
    assert out["counts"]["trained"] == 12


def test_async_loop_with_crashes_respects_staleness(model):
    m = GLM5ForCausalLM(toy_config())
    m.load_state_dict(model.state_dict())
    cfg = LoopConfig(mode="async", num_workers=3, group_size=4, groups_per_update=1, num_updates=6,
                     max_staleness=1, max_inflight_groups=4, lr=1e-3, max_seconds=120)
    loop = AsyncRLLoop(m, ToolUseEnv(10, 29, crash_prob=0.3), cfg)
    out = loop.run()
    assert len(out["history"]) == 6
    assert all(r["max_staleness"] <= 1 for r in out["history"])
    assert out["counts"]["failed"] > 0  # P(no crash in >= 24 rollouts) = 0.7^24 ~ 2e-4
    failed = {rid for rid, f in loop.fates.items() if f == "failed"}
    assert not failed & {rid for u in loop.trained_ids for rid in u}
    _accounting(loop, out)


@pytest.mark.parametrize("hang", [math.inf, 1.2])  # killed for good, or a zombie that wakes up later
def test_a_worker_killed_mid_rollout_loses_and_duplicates_nothing(model, hang):
    m = GLM5ForCausalLM(toy_config())
    m.load_state_dict(model.state_dict())
    cfg = LoopConfig(mode="async", num_workers=2, group_size=4, groups_per_update=1, num_updates=40,
                     max_staleness=100, lr=1e-3, heartbeat_timeout=0.8, max_seconds=120)
    loop = AsyncRLLoop(m, ToolUseEnv(10, 29), cfg, faults=lambda wid, done: hang if (wid, done) == (0, 1) else None)
    out = loop.run()
    assert len(out["history"]) == 40  # the loop kept going
    if hang < out["wall_s"] - 0.5:  # the zombie woke up before the end: its report was refused
        assert loop.workers[0].refused == 1
    assert out["counts"]["workers_replaced"] >= 1 and out["counts"]["lost"] >= 1
    # the hung worker's in-flight rollout was written off (a slow healthy worker may be replaced too)
    assert any(rid.endswith("-w0") for rid in loop.lost_ids)
    _accounting(loop, out)


def test_loop_config_validation(model):
    with pytest.raises(ValueError, match="mode"):
        AsyncRLLoop(model, ToolUseEnv(), LoopConfig(mode="later"))
    with pytest.raises(ValueError, match="group_size"):
        AsyncRLLoop(model, ToolUseEnv(), LoopConfig(group_size=0))
    with pytest.raises(ValueError, match="max_staleness"):
        AsyncRLLoop(model, ToolUseEnv(), LoopConfig(max_staleness=-1))


def test_rl_toy_quick_run_writes_its_json(tmp_path):
    from glm5_ref.apps.experiments import rl_toy

    out = rl_toy.run(quick=True, out_dir=str(tmp_path), seeds=[0])
    saved = (tmp_path / "rl_toy.json")
    assert saved.exists()
    for key in ("config", "runs", "success_before", "success_after", "machine"):
        assert key in out
    for run in out["runs"]:
        assert {"name", "mode", "seed", "history", "counts", "success_after"} <= set(run)
        for rec in run["history"]:
            assert {"update", "reward", "frac_rejected", "mean_staleness", "wall_s"} <= set(rec)


def test_weights_pushed_every_k_updates_and_optimizer_reset(model):
    m = GLM5ForCausalLM(toy_config())
    m.load_state_dict(model.state_dict())
    cfg = LoopConfig(mode="sync", num_workers=2, group_size=2, groups_per_update=1, num_updates=4, push_every=2,
                     max_staleness=4, lr=1e-3, max_seconds=120)
    seen = []
    loop = AsyncRLLoop(m, ToolUseEnv(10, 29), cfg,
                       on_update=lambda rec: seen.append((rec["version"], id(loop.optimizer),
                                                          len(loop.optimizer.state))))
    out = loop.run()
    assert out["final_version"] == 2 and [v for v, _, _ in seen] == [0, 0, 1, 1]
    # (on_update runs after the push) a new optimizer right after each push, the same one in between
    ids, states = [i for _, i, _ in seen], [n for _, _, n in seen]
    assert ids[0] != ids[1] and ids[1] == ids[2] and ids[2] != ids[3]
    assert states[0] > 0 and states[1] == 0 and states[2] > 0 and states[3] == 0
    pushed = loop.store.get()[1]
    assert all(torch.equal(pushed[k], v) for k, v in m.state_dict().items())  # the last push is the trainer's
