"""Tests of the muon-split experiment (glm5_ref/experiments/muon_split.py): the GQA baseline is a correct causal
attention (one group per head = naive multi-head attention; G groups = MHA with repeated K/V heads), swapping it
(or TrackedMLA) into GLM5ForCausalLM keeps the model's shapes, the logit and per-head update-RMS measurements
are right, and the quick mode writes the JSON schema the README and notebook 07 read."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.apps import experiments
from glm5_ref.apps.experiments import gqa as gqa_mod
from glm5_ref.apps.experiments import muon_split as ms
from glm5_ref.layers import apply_rope
from glm5_ref.mla import MLA
from glm5_ref.training.engine import Trainer
from glm5_ref.training.optim import build_optimizer
from tests.strategies import batch_sizes, odd_lengths, randn, seeds


def naive_mha(x, gqa: gqa_mod.GQA, k_w, v_w) -> torch.Tensor:
    """Multi-head attention head by head with an explicit causal mask; k_w, v_w hold one K/V head per query
    head (H * E, D) and (H * V, D)."""
    B, T, D = x.shape
    H, E, Vd, N = gqa.num_heads, gqa.head_dim, gqa.v_dim, gqa.nope_dim
    pos = torch.arange(T)
    outs = []
    for h in range(H):
        q = x @ gqa.q_proj.weight[h * E:(h + 1) * E].T  # (B, T, E)
        k = x @ k_w[h * E:(h + 1) * E].T
        v = x @ v_w[h * Vd:(h + 1) * Vd].T  # (B, T, V)
        q = torch.cat([q[..., :N], apply_rope(q[..., N:], pos, gqa.rope_theta, gqa.rope_interleave)], -1)
        k = torch.cat([k[..., :N], apply_rope(k[..., N:], pos, gqa.rope_theta, gqa.rope_interleave)], -1)
        s = q @ k.transpose(1, 2) / math.sqrt(E)  # (B, T, T)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(torch.softmax(s, -1) @ v)  # (B, T, V)
    return torch.cat(outs, -1) @ gqa.o_proj.weight.T  # (B, T, D)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@settings(max_examples=15, deadline=None)
@given(seed=seeds, B=batch_sizes, T=odd_lengths, H=st.sampled_from([1, 2, 3, 4, 6]),
       nope=st.sampled_from([0, 3, 8]), rope=st.sampled_from([0, 2, 4]), data=st.data())
def test_gqa_equals_naive_attention(seed, B, T, H, nope, rope, data):
    """G groups: query head h reads K/V head h // (H / G), i.e. MHA with the K/V rows repeated; G = H is plain
    multi-head attention."""
    if nope + rope == 0:
        nope = 2
    G = data.draw(st.sampled_from([g for g in range(1, H + 1) if H % g == 0]))
    torch.manual_seed(seed)
    gqa = gqa_mod.GQA(hidden_size=10, num_heads=H, n_kv_groups=G, nope_dim=nope, rope_dim=rope, v_dim=5)
    x = randn(seed, B, T, 10)
    E, rep = nope + rope, H // G
    k_w = gqa.k_proj.weight.view(G, E, 10).repeat_interleave(rep, 0).reshape(H * E, 10)
    v_w = gqa.v_proj.weight.view(G, 5, 10).repeat_interleave(rep, 0).reshape(H * 5, 10)
    with torch.no_grad():
        assert rel(gqa(x), naive_mha(x, gqa, k_w, v_w)) < 1e-5


@settings(max_examples=10, deadline=None)
@given(seed=seeds, T=st.sampled_from([2, 5, 13]), cut=st.integers(min_value=1, max_value=12))
def test_gqa_is_causal(seed, T, cut):
    """Changing tokens after position t never changes the outputs at positions <= t."""
    cut = min(cut, T - 1)
    torch.manual_seed(seed)
    gqa = gqa_mod.GQA(12, 4, 2, 4, 4, 6)
    x = randn(seed, 2, T, 12)
    y = x.clone()
    y[:, cut:] = randn(seed + 1, 2, T - cut, 12)
    with torch.no_grad():
        a, b = gqa(x), gqa(y)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


def test_gqa_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_kv_groups"):
        gqa_mod.GQA(8, 6, 4, 4, 4, 4)
    with pytest.raises(ValueError, match="rope_dim"):
        gqa_mod.GQA(8, 4, 2, 4, 3, 4)
    with pytest.raises(ValueError, match="num_heads"):
        gqa_mod.GQA(8, 0, 1, 4, 4, 4)
    gqa = gqa_mod.GQA(8, 4, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="x"):
        gqa(torch.zeros(1, 3, 7))
    with pytest.raises(ValueError, match="cache"):
        gqa(torch.zeros(1, 3, 8), cache=object())


def test_default_kv_groups():
    """8 groups (GQA-8), or the largest divisor of the head count that is at most 8."""
    base = GLM5Config.tiny()
    got = {H: ms.default_kv_groups(dataclasses.replace(base, num_attention_heads=H))
           for H in (1, 4, 6, 12, 16, 64)}
    assert got == {1: 1, 4: 4, 6: 6, 12: 6, 16: 8, 64: 8}
    assert ms.default_kv_groups(ms.experiment_config()) == 8


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_swapped_model_keeps_shapes_and_trains(attention):
    cfg = ms.experiment_config(quick=True)
    model = ms.build_model(cfg, attention, seed=3)
    kinds = {type(layer.self_attn) for layer in model.model.layers}
    assert kinds == {gqa_mod.TrackedMLA if attention == "mla" else gqa_mod.GQA}
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 11, cfg.vocab_size) and torch.isfinite(out.loss)
    # the same seed gives the same weights; every parameter sits in exactly one optimizer group, split too
    again = ms.build_model(cfg, attention, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    opt = build_optimizer(model, "muon_split", 1e-3)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    out.loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > len(before) // 2
    with pytest.raises(ValueError, match="attention"):
        ms.build_model(cfg, "mqa")


def test_tracked_mla_is_mla_and_records_the_causal_max_logit():
    """TrackedMLA computes MLA's function; its max logit equals the max of the absorbed path's logits over
    the causal keys (an independent formula for the same logits)."""
    cfg = ms.experiment_config(quick=True)
    torch.manual_seed(0)
    tracked = gqa_mod.TrackedMLA(cfg)
    plain = MLA(cfg)
    plain.load_state_dict(tracked.state_dict())
    x = torch.randn(2, 9, cfg.hidden_size)
    tracked.track = True
    with torch.no_grad():
        torch.testing.assert_close(tracked(x), plain(x))
        pos = torch.arange(9)
        q_nope, q_rope = plain.project_q(plain.q_latent(x), pos)
        latent, k_rope = plain.project_kv_latent(x, pos)
        w_uk, _ = plain.absorbed_weights()
        scores = (torch.einsum("bthn,hnc,bsc->bhts", q_nope, w_uk, latent)
                  + torch.einsum("bthp,bsp->bhts", q_rope, k_rope)) * plain.scale  # (B, H, T, S)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, float("-inf")).amax()
    assert abs(tracked.max_logit.item() - expected.item()) < 1e-5
    assert tracked.max_logit.item() < scores.amax().item() or bool(causal.all())  # the future was excluded


def test_causal_max_logit_ignores_future_keys():
    s = torch.zeros(1, 2, 4, 6)  # 4 queries at positions 2..5 of 6 keys
    s[0, 1, 0, 3] = 100.0  # query at position 2 looking at key 3: in the future
    s[0, 0, 1, 3] = 7.0  # query at position 3 looking at key 3: allowed
    assert gqa_mod.causal_max_logit(s).item() == 7.0


def test_per_head_update_rms_recovers_the_update_and_spread():
    """W' = (1 - lr wd) W - lr D: per_head_update_rms gives D's RMS per block; spread of equal values is 0."""
    torch.manual_seed(0)
    W = torch.randn(6, 5)
    D = torch.cat([torch.full((2, 5), 1.0), torch.full((2, 5), -2.0), torch.full((2, 5), 3.0)])
    lr, wd = 0.01, 0.1
    W2 = (1 - lr * wd) * W - lr * D
    got = ms.per_head_update_rms({"w": W}, {"w": W2}, {"q": ("w", [(0, 2), (2, 4), (4, 6)])}, lr, wd)
    assert got["q"] == pytest.approx([1.0, 2.0, 3.0], rel=1e-4)
    assert ms.spread([0.2, 0.2, 0.2]) == pytest.approx({"cv": 0.0, "max_over_min": 1.0}, abs=1e-12)
    assert ms.spread([1.0, 3.0]) == pytest.approx({"cv": 0.5, "max_over_min": 3.0})


def test_muon_split_makes_every_head_update_rms_0_2():
    """With Muon Split ("match_rms_adamw") each head block's update has RMS 0.2 * (NS singular values, in
    [0.68, 1.14]); plain Muon does not hold each head to that."""
    cfg = ms.experiment_config(quick=True)
    model = ms.build_model(cfg, "mla", seed=0)
    ids = torch.randint(0, cfg.vocab_size, (4, 17))
    model(ids, labels=ids).loss.backward()
    attn = model.model.layers[0].self_attn
    blocks = ms.head_row_blocks(attn)
    assert [len(blocks[k][1]) for k in "qkv"] == [cfg.num_attention_heads] * 3
    opt = build_optimizer(model, "muon_split", 1e-2)
    before = {n: getattr(attn, n).weight.detach().clone() for n in ("q_b_proj", "kv_b_proj")}
    opt.step()
    rms = ms.per_head_update_rms(before, {n: getattr(attn, n).weight.detach() for n in before}, blocks, 1e-2, 0.1)
    for k in "qkv":
        assert all(0.2 * 0.6 < r < 0.2 * 1.15 for r in rms[k]), (k, rms[k])


def test_lr_schedule_and_summaries():
    trainer = Trainer(torch.nn.Linear(2, 2), "adamw", 1.0, total_steps=100, warmup=ms.WARMUP,
                      min_lr_ratio=ms.MIN_LR_RATIO)  # the engine's schedule, as every arm uses it
    lrs = []
    for _ in range(100):
        lrs.append(trainer.lr)
        trainer.optimizer.step()  # no gradients: nothing changes, but the scheduler's order is kept
        trainer.scheduler.step()
    assert lrs[0] == pytest.approx(0.01 / ms.WARMUP) and max(lrs) == pytest.approx(1.0)  # step 1 already moves
    assert lrs[-1] == pytest.approx(ms.MIN_LR_RATIO)
    curve = {"step": [0, 10, 20], "val_bpb": [3.0, 2.5, 2.0]}
    assert ms.steps_to_reach(curve, 2.5) == 10 and ms.steps_to_reach(curve, 1.0) is None
    runs = {"adamw": {0: {"final_val_bpb": 2.2, "steps": 20}, 1: {"final_val_bpb": 1.5, "steps": 20}},
            "muon_split": {0: {"curve": curve, "final_val_bpb": 2.0}, 1: {"curve": curve, "final_val_bpb": 2.0}},
            "muon": {0: {"final_val_bpb": 2.1}, 1: {"final_val_bpb": 2.3}},
            "gqa_muon": {0: {"final_val_bpb": 2.0}, 1: {"final_val_bpb": 2.1}}}
    frac = ms.steps_to_adamw_fraction(runs, [0, 1])
    assert frac["per_seed"] == {"0": 1.0, "1": None} and frac["mean"] is None and "seed 1" in frac["reason"]
    g = ms.gap(runs, [0, 1], "muon")
    assert g["per_seed"] == pytest.approx([0.1, 0.2]) and g["mean"] == pytest.approx(0.15)
    assert g["std"] == pytest.approx(math.sqrt(0.005)) and g["sem"] == pytest.approx(0.05)


def test_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        ms.run(quick=True, seeds=[])
    with pytest.raises(ValueError, match="lr_grid"):
        ms.run(quick=True, seeds=[0], lr_grid=(0.0,))
    with pytest.raises(ValueError, match="arm"):
        ms.train_arm("sgd", 1e-3, 0, ms.experiment_config(True), {}, 1, 1, 4, 1, 1)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("muon_split")
    result = ms.run(quick=True, out_dir=str(out), seeds=[0, 1], steps=6, lr_grid=(3e-3, 6e-3), progress=False)
    return result, out


def test_quick_run_schema(quick_result):
    result, out = quick_result
    assert (out / "muon_split.png").stat().st_size > 10_000
    on_disk = json.loads((out / "muon_split.json").read_text())
    assert on_disk["final_val_bpb"] == result["final_val_bpb"]
    arms = set(ms.ARMS)
    assert set(on_disk["runs"]) == arms and set(on_disk["final_val_bpb"]) == arms
    assert set(on_disk["lr_sweep"]) == arms and all(2 <= len(v) <= 2 + experiments.MAX_GRID_EXTENSIONS
                                                    for v in on_disk["lr_sweep"].values())
    for arm in arms:
        assert set(on_disk["runs"][arm]) == {"0", "1"}
        fin = on_disk["final_val_bpb"][arm]
        assert fin["n"] == 2 and len(fin["per_seed"]) == 2 and fin["std"] is not None
        assert fin["mean"] == pytest.approx(sum(fin["per_seed"]) / 2)
        swept = {float(k): v for k, v in on_disk["lr_sweep"][arm].items() if v is not None}
        assert {3e-3, 6e-3} <= set(map(float, on_disk["lr_sweep"][arm])) and on_disk["lr"][arm] == min(swept, key=swept.get)
        for seed in ("0", "1"):
            r = on_disk["runs"][arm][seed]
            assert r["curve"]["step"][0] == 0 and r["curve"]["step"][-1] == 6 == r["steps"]
            assert len(r["curve"]["val_bpb"]) == len(r["curve"]["step"])
            assert all(0 < b < 5 and math.isfinite(b) for b in r["curve"]["val_bpb"])
            assert r["final_val_bpb"] == r["curve"]["val_bpb"][-1] == fin["per_seed"][int(seed)]
            assert all(math.isfinite(v) and v > 0 for v in r["track"]["max_logit"])
            if ms.ARMS[arm][0] == "mla":
                assert all(math.isfinite(v) for v in r["track"]["q_cv"] + r["track"]["k_cv"] + r["track"]["v_cv"])
    frac = on_disk["steps_to_adamw_fraction"]
    assert set(frac["per_seed"]) == {"0", "1"}
    assert (frac["mean"] is None) == (None in frac["per_seed"].values()) == (frac["reason"] is not None)
    for mla_arm in ("muon", "muon_split"):
        g = on_disk["gap_mla_vs_gqa"][mla_arm]
        expected = [on_disk["runs"][mla_arm][s]["final_val_bpb"] - on_disk["runs"]["gqa_muon"][s]["final_val_bpb"]
                    for s in ("0", "1")]
        assert g["per_seed"] == pytest.approx(expected) and g["std"] is not None
    assert set(on_disk["head_update_rms_spread"]) == {"adamw", "muon", "muon_split"}
    assert on_disk["gqa_kv_groups"] == ms.default_kv_groups(ms.experiment_config(True))


def test_tune_lr_extends_past_a_winning_edge_only():
    """The same rule for every arm: an interior optimum stops the sweep; an edge optimum extends the grid by its
    ratio, at most max_extensions times; a diverged trial (inf) never wins."""
    calls = []

    def bowl(center):
        def trial(lr):
            calls.append(lr)
            return abs(math.log(lr / center))
        return trial

    best, tried = experiments.tune_lr(bowl(5e-3), (2e-3, 5e-3, 1.25e-2))
    assert best == 5e-3 and len(tried) == 3
    best, tried = experiments.tune_lr(bowl(0.08), (2e-3, 5e-3, 1.25e-2), max_extensions=2)
    assert len(tried) == 5 and best == pytest.approx(1.25e-2 * 2.5**2)
    best, tried = experiments.tune_lr(bowl(1e-3), (2e-3, 5e-3, 1.25e-2), max_extensions=2)
    assert best == pytest.approx(8e-4) and len(tried) == 5  # 8e-4 wins; 3.2e-4 confirms the bracket
    best, _ = experiments.tune_lr(lambda lr: math.inf if lr > 4e-3 else -lr, (2e-3, 5e-3, 1.25e-2), max_extensions=0)
    assert best == 2e-3
    with pytest.raises(ValueError, match="lr_grid"):
        experiments.tune_lr(bowl(1.0), (1e-3,))
