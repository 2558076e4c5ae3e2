"""Tests of glm5_ref.distributed: expert-parallel MoE and zero-redundancy Muon against their single-process twins
(2 and 4 gloo processes on CPU), the launcher failing fast, and the rollout router's hashing properties.

Process start-up dominates on a 2-core machine, so each world size runs ONE job that goes through several cases
(token counts per rank that differ, a rank with no tokens, a rank whose experts receive none, grouped and loop
paths, fp64, group-limited routing, odd widths) and every distributed-Muon case, and returns its tensors; the
references are computed here, in the pytest process. The jobs start from a forkserver that imports torch and this
module once (forking the multi-threaded pytest process itself would not be safe); the fail-fast test uses launch's
default, spawn."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import glm5_ref.muon as muon_module
from glm5_ref.config import GLM5Config
from glm5_ref.distributed import (DistributedMuon, ExpertParallelMoE, HashRing, RankFailedError, RolloutRouter,
                                  assign_units, build_distributed_optimizer, check_expert_split, launch, stable_hash)
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.moe import MoE, update_router_bias
from glm5_ref.training.optim import build_optimizer
from tests.strategies import randn

# every rank forks from one server that imported torch and this module once (spawn where there is no forkserver)
START = dict(start_method="forkserver", preload=[__name__]) if sys.platform != "win32" else {}


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """||a - b|| / ||b|| in fp64; a missing gradient counts as zeros."""
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300)) if b.norm() > 0 else float(a.norm())


# ---------------------------------------------------------------------------------------------------------
# expert-parallel MoE
TINY = GLM5Config.tiny()  # E = 8, K = 2, one shared expert, d = 32, I = 16
EP_CASES = [  # per-rank (B, T); the rank lists are cut to the world size
    dict(name="grouped fp32", config=TINY, shapes=[(2, 5), (1, 7), (1, 3), (2, 4)], impl="grouped"),
    dict(name="ranks 1 and 2 have no tokens", config=TINY, shapes=[(1, 6), (1, 0), (0, 4), (1, 9)], impl="grouped"),
    dict(name="loop fp32, odd T", config=TINY, shapes=[(1, 63), (1, 2), (1, 13), (1, 1)], impl="loop"),
    dict(name="grouped fp64 (segment loop)", config=TINY, shapes=[(1, 5), (2, 3), (1, 7), (1, 2)],
         impl="grouped", dtype=torch.float64),
    dict(name="grouped bf16", config=TINY, shapes=[(1, 31), (1, 13), (1, 7), (1, 5)], impl="grouped",
         dtype=torch.bfloat16),
    dict(name="last rank's experts get no token", config=TINY, shapes=[(1, 9), (1, 7), (1, 5), (1, 3)],
         impl="grouped", starve=True),
    dict(name="groups, odd widths, no shared", shapes=[(1, 7), (1, 5), (1, 3), (1, 6)], impl="grouped",
         config=dataclasses.replace(TINY, hidden_size=20, moe_intermediate_size=5, n_group=2, topk_group=1,
                                    num_experts_per_tok=3, n_shared_experts=0)),
]


def make_moe(case: dict, world: int) -> MoE:
    """The case's MoE, the same in every process: seeded weights, a router bias; with ``starve`` the bias
    keeps every token away from the experts of the last rank."""
    config = case["config"]
    torch.manual_seed(17)
    moe = MoE(config).to(case.get("dtype", torch.float32))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
        moe.gate.e_score_correction_bias.copy_(randn(3, config.n_routed_experts) * 0.1)
        if case.get("starve"):
            moe.gate.e_score_correction_bias[-config.n_routed_experts // world:] = -1e4
    return moe


def ep_inputs(case: dict, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank's tokens x (B, T, d) and the output gradient it backpropagates."""
    B, T = case["shapes"][rank]
    d, dtype = case["config"].hidden_size, case.get("dtype", torch.float32)
    return randn(100 + rank, B, T, d, dtype=dtype), randn(200 + rank, B, T, d, dtype=dtype)


def global_name(name: str, offset: int) -> str:
    """local_experts.experts.{i}.x -> experts.{offset + i}.x; other names are the MoE's own."""
    if not name.startswith("local_experts.experts."):
        return name
    i, rest = name[len("local_experts.experts."):].split(".", 1)
    return f"experts.{offset + int(i)}.{rest}"


def ep_worker(rank: int, world: int, cases: list[dict]) -> dict:
    torch.manual_seed(rank)  # nothing below may depend on a rank's RNG state
    results = []
    for case in cases:
        ep = ExpertParallelMoE(make_moe(case, world))
        x, gy = ep_inputs(case, rank)
        x.requires_grad_(True)
        y, aux = ep(x, impl=case["impl"], return_aux=True)
        (y * gy).sum().backward()
        ep.allreduce_replicated_grads()
        grads = {global_name(n, ep.expert_offset): p.grad for n, p in ep.named_parameters()}
        ep.update_router_bias(aux.tokens_per_expert, gamma=0.01)  # from the load of all ranks
        results.append(dict(y=y.detach(), x_grad=x.grad, grads=grads, load=aux.tokens_per_expert,
                            bias=ep.gate.e_score_correction_bias.clone(),
                            experts=list(range(ep.expert_offset, ep.expert_offset + ep.n_local))))
    bad = []  # E = 9 experts over 2 or 4 ranks: every rank must refuse
    try:
        ExpertParallelMoE(MoE(dataclasses.replace(TINY, n_routed_experts=9)))
    except ValueError as e:
        bad.append(str(e))
    return dict(cases=results, bad=bad)


@pytest.mark.parametrize("k", range(len(EP_CASES)), ids=[c["name"] for c in EP_CASES])
def test_expert_parallel_equals_single_process(job, k):
    world, results = job["world"], job["ep"]
    case = EP_CASES[k]
    moe = make_moe(case, world)
    xs, gys = zip(*(ep_inputs(case, r) for r in range(world)))
    d = case["config"].hidden_size
    x = torch.cat([t.reshape(-1, d) for t in xs])[None].requires_grad_(True)  # (1, all tokens, d)
    y, aux = moe(x, impl=case["impl"], return_aux=True)
    (y * torch.cat([t.reshape(-1, d) for t in gys])[None]).sum().backward()
    tol = {torch.float64: 1e-12, torch.bfloat16: 1e-2}.get(case.get("dtype"), 1e-5)
    ref = dict(moe.named_parameters())
    start = 0
    for rank, res in enumerate(r["cases"][k] for r in results):
        n = xs[rank].shape[0] * xs[rank].shape[1]
        assert res["y"].shape == xs[rank].shape
        assert rel(res["y"].reshape(-1, d), y[0, start:start + n]) < tol, f"rank {rank} forward"
        assert rel(res["x_grad"].reshape(-1, d), x.grad[0, start:start + n]) < tol, f"rank {rank} input grad"
        start += n
        owned = {name for name in ref if name.startswith("experts.") and int(name.split(".")[1]) in res["experts"]}
        assert set(res["grads"]) == owned | {name for name in ref if not name.startswith("experts.")}
        for name, g in res["grads"].items():
            assert rel(g, ref[name].grad) < tol, f"rank {rank}: gradient of {name}"
    load = sum(r["cases"][k]["load"] for r in results)
    assert torch.equal(load, aux.tokens_per_expert)  # the loads all-reduce to the single-process load
    update_router_bias(moe, aux.tokens_per_expert, gamma=0.01)
    assert all(torch.equal(r["cases"][k]["bias"], moe.gate.e_score_correction_bias) for r in results)
    if case.get("starve"):
        L = case["config"].n_routed_experts // world
        assert load[-L:].sum() == 0 and load.sum() == x.shape[1] * case["config"].num_experts_per_tok


def test_expert_count_not_divisible_by_world_size(job):
    world, results = job["world"], job["ep"]
    for r in results:  # a clear ValueError on every rank, naming both numbers
        assert len(r["bad"]) == 1 and f"n_routed_experts = 9 is not divisible by the world size {world}" in r["bad"][0]


def test_expert_parallel_bad_input():
    with pytest.raises(ValueError, match="n_routed_experts = 6 .* world size 4"):
        check_expert_split(6, 4)
    with pytest.raises(ValueError, match="world_size"):
        check_expert_split(8, 0)
    assert check_expert_split(256, 64) == 4
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            ExpertParallelMoE(MoE(TINY))


# ---------------------------------------------------------------------------------------------------------
# distributed Muon
MUON_CASES = [
    dict(name="muon_split, some grads None", optimizer="muon_split", kwargs={}, none_every=7),
    dict(name="muon, no Nesterov, matrix scale", optimizer="muon",
         kwargs=dict(muon_kwargs=dict(nesterov=False, split_scale="matrix"))),
    dict(name="muon_split, sharded after a plain Muon step", optimizer="muon_split", kwargs={}, warm=True),
]
MUON_STEPS = 3


def muon_model() -> GLM5ForCausalLM:
    torch.manual_seed(5)
    return GLM5ForCausalLM(TINY)


def set_grads(model, step: int, none_every: int = 0) -> None:
    for i, p in enumerate(model.parameters()):
        p.grad = None if none_every and i % none_every == step else randn(1000 * step + i, *p.shape)


def run_muon(case: dict, distributed: bool, counted: list | None = None):
    """MUON_STEPS steps; distributed: the Muon part is a DistributedMuon (from step 2 with ``warm``)."""
    model = muon_model()
    make = build_distributed_optimizer if distributed and not case.get("warm") else build_optimizer
    opt = make(model, case["optimizer"], lr=0.02, **case["kwargs"])
    for step in range(MUON_STEPS):
        if distributed and case.get("warm") and step == 1:
            opt.optimizers["muon"] = DistributedMuon.from_muon(opt.optimizers["muon"])
            counted.clear()  # count only the distributed steps
        set_grads(model, step, case.get("none_every", 0))
        opt.step()
    return model, opt


def muon_worker(rank: int, world: int, cases: list[dict]) -> list[dict]:
    counted = []  # matrices that reached Newton-Schulz on this rank

    def counting(G, *args, **kwargs):
        counted.append(1 if G.dim() == 2 else G.shape[0])
        return ns(G, *args, **kwargs)

    ns, muon_module.newton_schulz = muon_module.newton_schulz, counting
    out = []
    for case in cases:
        counted.clear()
        model, opt = run_muon(case, distributed=True, counted=counted)
        muon = opt.optimizers["muon"]
        out.append(dict(params={n: p.detach().clone() for n, p in model.named_parameters()}, ns=sum(counted),
                        ns_last=muon.ns_matrices, units=len(muon.units()),
                        momentum=sum(s["momentum_buffer"].numel() for s in muon.state.values()),
                        resumes_exactly=resumes_exactly(case, model, opt)))
    return out


def resumes_exactly(case: dict, model, opt) -> bool:
    """A copy of the model given opt's state_dict takes the next step exactly as the original does."""
    twin = copy.deepcopy(model)
    twin_opt = build_distributed_optimizer(twin, case["optimizer"], lr=0.02, **case["kwargs"])
    buffer = io.BytesIO()  # through a checkpoint file's bytes: load_state_dict alone would share the tensors
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer))
    for m, o in ((model, opt), (twin, twin_opt)):
        set_grads(m, MUON_STEPS)
        o.step()
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def job_worker(rank: int, world: int) -> dict:
    """Everything one job checks: the EP cases, the Muon cases, and who ran where."""
    return dict(rank=rank, world=world, ep=ep_worker(rank, world, EP_CASES), muon=muon_worker(rank, world, MUON_CASES))


@pytest.fixture(scope="module", params=[2, 4], ids=["2 ranks", "4 ranks"])
def job(request):
    world = request.param
    results = launch(job_worker, world, timeout=60, **START)
    assert [(r["rank"], r["world"]) for r in results] == [(q, world) for q in range(world)]  # results by rank
    return dict(world=world, ep=[r["ep"] for r in results], muon=[r["muon"] for r in results])


@pytest.mark.parametrize("k", range(len(MUON_CASES)), ids=[c["name"] for c in MUON_CASES])
def test_distributed_muon_equals_muon(job, k):
    world, results = job["world"], job["muon"]
    case = MUON_CASES[k]
    model, opt = run_muon(case, distributed=False)
    ref = dict(model.named_parameters())
    for rank, res in enumerate(r[k] for r in results):
        for name, p in res["params"].items():
            assert rel(p, ref[name]) < 1e-5, f"rank {rank}: {name} after {MUON_STEPS} steps"
        assert res["resumes_exactly"], f"rank {rank}: the sharded state_dict does not resume exactly"
    # matrices to orthogonalize at each step: one per block of every Muon parameter that has a gradient
    group, none_every = opt.optimizers["muon"].param_groups[0], case.get("none_every", 0)
    index = {id(p): i for i, p in enumerate(model.parameters())}
    per_step = [sum(len(b) if b else 1 for p, b in zip(group["params"], group["blocks"] or [None] * 999)
                    if not (none_every and index[id(p)] % none_every == step)) for step in range(MUON_STEPS)]
    expected = sum(per_step[1:] if case.get("warm") else per_step)
    assert results[0][k]["units"] == sum(len(b) if b else 1 for b in group["blocks"] or [None] * len(group["params"]))
    counts = [r[k]["ns"] for r in results]
    assert sum(counts) == expected  # every matrix orthogonalized once per step, by one rank ...
    assert max(counts) < expected and all(c > 0 for c in counts)  # ... and no rank does all of them
    assert sum(r[k]["ns_last"] for r in results) == per_step[-1]
    full = sum(s["momentum_buffer"].numel() for s in opt.optimizers["muon"].state.values())
    assert sum(r[k]["momentum"] for r in results) == full  # momentum sharded, not replicated


def test_assignment_is_balanced_and_deterministic():
    shapes = [(0, i, 0, r, c) for i, (r, c) in enumerate([(64, 32), (32, 64), (8, 8), (16, 16), (64, 64)] * 5)]
    for world in (1, 2, 3, 4):
        owner = assign_units(shapes, world)
        assert owner == assign_units(list(shapes), world) and set(owner) == set(range(world))
        cost = [min(r, c) ** 2 * (2 * max(r, c) + min(r, c)) for _, _, _, r, c in shapes]
        load = [sum(c for c, o in zip(cost, owner) if o == q) for q in range(world)]
        assert max(load) <= 4 / 3 * max(sum(cost) / world, max(cost))  # Graham's LPT bound; OPT >= both
    with pytest.raises(ValueError, match="world_size"):
        assign_units(shapes, 0)


# ---------------------------------------------------------------------------------------------------------
# launch
def fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one exploded")
    dist.barrier()  # rank 0 would wait here until the group timeout, were it not terminated


def die_silently(rank: int, world: int) -> None:
    os._exit(3)


def sleep_forever(rank: int, world: int) -> None:
    time.sleep(600)


def echo(rank: int, world: int, payload) -> tuple:
    return rank, world, payload


def test_a_failing_rank_fails_the_job_fast():
    t = time.monotonic()
    with pytest.raises(RankFailedError, match="(?s)rank 1 of 2 failed.*ValueError: rank one exploded") as info:
        launch(fail_on_rank_one, 2, timeout=120, pg_timeout=120)  # the default start method, spawn
    assert info.value.rank == 1 and time.monotonic() - t < 60  # not the 120 s timeouts


def test_a_dying_rank_and_a_hung_job_fail_fast():
    with pytest.raises(RankFailedError, match="(?s)rank 0 of 1 failed.*exited with code 3"):
        launch(die_silently, 1, timeout=60, **START)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 still running after 2 s"):
        launch(sleep_forever, 1, timeout=2, **START)
    assert time.monotonic() - t < 30


def test_launch_bad_input():
    for kwargs, match in ((dict(world_size=0), "world_size"), (dict(world_size=2, timeout=0), "timeout"),
                          (dict(world_size=2, start_method="teleport"), "start_method")):
        with pytest.raises(ValueError, match=match):
            launch(echo, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# DP-aware rollout routing (no processes)
rank_counts = st.integers(min_value=1, max_value=16)
vnode_counts = st.sampled_from([64, 128])
rollout_ids = st.one_of(st.text(max_size=20), st.integers(min_value=0, max_value=10**12))


def test_stable_hash_is_pinned():
    # BLAKE2b, not Python's per-process salted hash(): these values hold in every process, on every machine
    assert stable_hash("rollout:0") == 10362046860991587030
    assert [HashRing(8).rank_of(f"rollout-{i}") for i in range(10)] == [4, 3, 1, 0, 2, 1, 2, 5, 7, 7]


@given(rank_counts, vnode_counts, st.lists(rollout_ids, min_size=1, max_size=50), st.randoms())
def test_a_rollout_always_maps_to_the_same_rank(n, vnodes, ids, rnd):
    order = list(range(n))
    rnd.shuffle(order)
    a, b = HashRing(n, vnodes), HashRing(order, vnodes)  # built separately, ranks inserted in another order
    for i in ids:
        assert a.rank_of(i) == b.rank_of(i) == a.rank_of(i) and 0 <= a.rank_of(i) < n
    assert a.rank_of(7) == a.rank_of("7")  # ids are hashed through str()


@given(rank_counts, vnode_counts)
def test_adding_a_rank_moves_about_one_nth_of_the_ids(n, vnodes):
    ids = [f"rollout-{i}" for i in range(5000)]
    ring = HashRing(n, vnodes)
    before = [ring.rank_of(i) for i in ids]
    ring.add_rank(n)
    after = [ring.rank_of(i) for i in ids]
    moved = [(b, a) for b, a in zip(before, after) if b != a]
    assert all(a == n for _, a in moved)  # ids only move to the new rank
    assert 0.5 / (n + 1) <= len(moved) / len(ids) <= 1.5 / (n + 1)
    ring.remove_rank(n)  # and removing it moves exactly those back
    assert [ring.rank_of(i) for i in ids] == before
    assert math.isclose(sum(ring.shares().values()), 1.0)


@given(rank_counts, st.sampled_from([0.0, 0.1, 0.25, 1.0]), st.integers(min_value=1, max_value=300))
def test_bounded_load_keeps_max_load_within_the_bound(n, eps, m):
    router = RolloutRouter(n, eps=eps)
    for i in range(m):
        router.route(f"rollout-{i}")
        active = i + 1
        assert max(router.load.values()) <= math.ceil((1 + eps) * active / n)
    assert sum(router.load.values()) == m


@given(rank_counts, st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=60)), max_size=200))
def test_routing_is_sticky_and_placements_respect_the_capacity(n, ops):
    eps = 0.25
    router = RolloutRouter(n, eps=eps)
    where: dict[str, int] = {}
    for arrive, i in ops:
        rid = f"r{i}"
        if arrive or rid not in where:
            load = dict(router.load)
            rank = router.route(rid)
            if rid in where:
                assert rank == where[rid]  # every turn of a rollout goes where its cache is
            else:
                assert load[rank] + 1 <= math.ceil((1 + eps) * (len(where) + 1) / n)
                where[rid] = rank
        else:
            router.release(rid)
            del where[rid]
        assert sum(router.load.values()) == len(where) == router.active()


def test_router_follows_the_hash_when_loads_allow_and_survives_rank_changes():
    router = RolloutRouter(4, eps=None)
    assert all(router.route(i) == router.ring.rank_of(i) for i in range(200))
    router = RolloutRouter(4, eps=0.25)
    for i in range(40):
        router.route(i)
    placed = dict(router.placement)
    router.add_rank(4)
    assert all(router.route(int(k.split(":")[1])) == r for k, r in placed.items())  # sticky after a join
    moved = router.remove_rank(0)
    assert len(moved) == sum(r == 0 for r in placed.values()) > 0 and router.active() == 40
    assert 0 not in router.load and 0 not in router.placement.values()
    assert all(router.placement[k] == r for k, r in placed.items() if r != 0)  # the others did not move


def test_routing_bad_input():
    for make, match in ((lambda: HashRing(0), "positive number of ranks"), (lambda: HashRing([]), "at least one"),
                        (lambda: HashRing([1, 1]), "distinct"), (lambda: HashRing(2, vnodes=0), "vnodes"),
                        (lambda: RolloutRouter(0), "positive number of ranks"),
                        (lambda: RolloutRouter(2, eps=-0.1), "eps"), (lambda: HashRing([-1]), "non-negative")):
        with pytest.raises(ValueError, match=match):
            make()
    ring = HashRing(1)
    with pytest.raises(ValueError, match="last rank"):
        ring.remove_rank(0)
    with pytest.raises(TypeError, match="rollout_id"):
        ring.rank_of(1.5)
    with pytest.raises(ValueError, match="not active"):
        RolloutRouter(2).release("nobody")
