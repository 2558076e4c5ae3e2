"""Tests of glm5_ref.moe: the router formula (normalisation, bias for selection only, group-limited routing), grouped
dispatch against the per-expert loop (forward and gradients), permutation equivariance, the balance loss against a
direct loop, the aux-loss-free bias update on a skewed router, checkpoint names, bad input, and transformers'
GlmMoeDsaTopkRouter / GlmMoeDsaMoE as outside oracles."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.layers import grouped_mm
from glm5_ref import moe as moe_mod
from glm5_ref.moe import (MoE, MoEGate, balance_loss, grouped_mm_supported, router_stats, select_experts,
                          sort_by_expert, update_router_bias)
from tests.strategies import batch_sizes, odd_lengths, randn, seeds, small_configs, with_changes

token_counts = st.sampled_from([1, 5, 63])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds OpenMP contention (10x slower on a shared 2-core
    machine running two pytest workers), so this module runs single-threaded and restores the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_moe(config: GLM5Config, seed: int, bias_std: float = 0.1) -> MoE:
    """A seeded MoE with a non-zero router bias and weights large enough that experts differ visibly."""
    torch.manual_seed(seed)
    m = MoE(config)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
        m.gate.e_score_correction_bias.normal_(0.0, bias_std)
    return m


# ---- the router ------------------------------------------------------------------------------------------
@given(small_configs(), token_counts, seeds)
def test_gate_weights_sum_to_scaling_factor(config, n, seed):
    gate = make_moe(config, seed).gate
    idx, w, scores = gate(randn(seed, n, config.hidden_size))
    assert idx.shape == w.shape == (n, config.num_experts_per_tok) and idx.dtype == torch.int64
    assert w.dtype == scores.dtype == torch.float32 and scores.shape == (n, config.n_routed_experts)
    torch.testing.assert_close(w.sum(-1), torch.full((n,), config.routed_scaling_factor), rtol=1e-5, atol=0)


@given(small_configs(), token_counts, seeds)
def test_every_token_gets_k_distinct_experts(config, n, seed):
    idx, _, _ = make_moe(config, seed, bias_std=1.0).gate(randn(seed, n, config.hidden_size))
    assert ((idx >= 0) & (idx < config.n_routed_experts)).all()
    assert all(len(set(row)) == config.num_experts_per_tok for row in idx.tolist())


@given(small_configs(), token_counts, seeds, st.booleans())
def test_bias_changes_selection_never_the_weight_formula(config, n, seed, norm):
    config = with_changes(config, norm_topk_prob=norm)
    gate = make_moe(config, seed, bias_std=0.0).gate
    x = randn(seed, n, config.hidden_size)
    star = seed % config.n_routed_experts
    with torch.no_grad():
        gate.e_score_correction_bias[star] = 10.0  # far above any sigmoid score: always chosen
    idx, w, scores = gate(x)
    assert (idx == star).any(-1).all()
    chosen = scores.gather(1, idx)  # unbiased scores of the chosen set
    expected = chosen / chosen.sum(-1, keepdim=True) if norm else chosen
    torch.testing.assert_close(w, expected * config.routed_scaling_factor, rtol=1e-6, atol=0)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    _, _, scores0 = gate(x)
    torch.testing.assert_close(scores0, scores, rtol=0, atol=0)  # the bias never enters the scores


@given(st.integers(1, 4), st.integers(1, 3), token_counts, seeds)
def test_one_group_or_all_groups_kept_is_plain_top_k(groups, k, n, seed):
    biased = randn(seed, n, 4 * groups)  # (N, E), may be negative: as s + b can be
    plain = biased.topk(k, dim=-1).indices
    assert torch.equal(select_experts(biased, k, 1, 1), plain)
    assert torch.equal(select_experts(biased, k, groups, groups), plain)


@given(st.sampled_from([(2, 1), (4, 2), (4, 1), (8, 4)]), st.integers(1, 3), token_counts, seeds)
def test_group_limited_routing_stays_in_the_kept_groups(groups, k, n, seed):
    n_group, topk_group = groups
    per_group = 3
    biased = randn(seed, n, n_group * per_group)
    idx = select_experts(biased, k, n_group, topk_group)
    for t in range(n):  # the direct definition, one token at a time
        group_score = [sorted(biased[t, g * per_group:(g + 1) * per_group].tolist())[-2:] for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [e for e in range(n_group * per_group) if e // per_group in kept]
        assert all(e // per_group in kept for e in idx[t].tolist())
        assert sorted(idx[t].tolist()) == sorted(sorted(allowed, key=lambda e: -biased[t, e].item())[:k])


# ---- grouped dispatch against the loop ---------------------------------------------------------------------
def forward_and_grads(m: MoE, x: torch.Tensor, impl: str, seed: int):
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = m(x, impl=impl)
    (y * randn(seed + 1, *y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


def assert_grads_close(got: dict, expected: dict, tol: float = 1e-5) -> None:
    """Per parameter ||a - b|| <= tol * ||b||, with a floor of 1e-6 * (norm of all gradients) for gradients that
    are zero in exact arithmetic (an expert no token chose; the router when K = 1 and weights are normalised)."""
    def norm(g):
        return 0.0 if g is None else float(g.double().norm())
    floor = 1e-6 * sum(norm(g) ** 2 for g in expected.values()) ** 0.5
    for name, b in expected.items():
        a = got[name]
        if a is None or b is None:
            assert max(norm(a), norm(b)) <= tol * floor, name
        else:
            assert float((a.double() - b.double()).norm()) <= tol * max(norm(b), floor), name


@settings(max_examples=15)
@given(small_configs(), batch_sizes, odd_lengths, seeds)
def test_grouped_equals_loop_forward_and_gradients(config, b, t, seed):
    m = make_moe(config, seed)
    x = randn(seed, b, t, config.hidden_size)
    y1, dx1, g1 = forward_and_grads(m, x, "loop", seed)
    y2, dx2, g2 = forward_and_grads(m, x, "grouped", seed)
    assert rel(y2, y1) < 1e-5 and rel(dx2, dx1) < 1e-5
    if config.num_experts_per_tok == 1 and config.norm_topk_prob:  # every gate weight is rho: the router's exact
        del g1["gate.weight"]  # gradient is zero and both paths return rounding noise, which rel error can't judge
    assert_grads_close(g2, g1)


@pytest.mark.parametrize("width", [8, 5])  # 8: torch's grouped GEMM; 5: rows not 16-byte aligned, segment loop
def test_grouped_equals_loop_on_both_grouped_paths(width):
    config = with_changes(GLM5Config.tiny(), moe_intermediate_size=width)
    has_grouped_mm = hasattr(torch, "_grouped_mm") or hasattr(torch.nn.functional, "grouped_mm")
    assert grouped_mm_supported(torch.float32, torch.device("cpu"), 32, width) == (width == 8 and has_grouped_mm)
    m = make_moe(config, 0)
    x = randn(1, 2, 63, 32)
    y1, dx1, g1 = forward_and_grads(m, x, "loop", 0)
    y2, dx2, g2 = forward_and_grads(m, x, "grouped", 0)
    assert rel(y2, y1) < 1e-5 and rel(dx2, dx1) < 1e-5
    assert_grads_close(g2, g1)


@pytest.mark.parametrize("tokens", [1, 3])  # tiny: 8 experts, top-2, so 1 or 3 tokens are 2 or 6 slots < 8
def test_decode_sized_batches_on_the_cpu_take_the_grouped_gemm_and_equal_the_loop(tokens, monkeypatch):
    """On the CPU the grouped GEMM serves decode-sized batches too (faster there, moe.py): it is called, and
    it equals the loop with most experts' segments empty."""
    config = GLM5Config.tiny()
    assert tokens * config.num_experts_per_tok < config.n_routed_experts
    m = make_moe(config, 0)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return grouped_mm(*args, **kwargs)

    monkeypatch.setattr(moe_mod, "grouped_mm", counted)
    for seed in range(4):
        x = randn(10 + seed, 1, tokens, 32)
        y1, dx1, g1 = forward_and_grads(m, x, "loop", seed)
        y2, dx2, g2 = forward_and_grads(m, x, "grouped", seed)
        assert rel(y2, y1) < 1e-6 and rel(dx2, dx1) < 1e-6
        assert_grads_close(g2, g1)
    assert calls and set(calls) == {tokens * config.num_experts_per_tok}  # every call: the S sorted slots


def test_grouped_equals_loop_in_bf16_and_fp64():
    config = GLM5Config.tiny()
    x = randn(3, 2, 31, 32)
    for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float64, 1e-12)):
        m = make_moe(config, 3).to(dtype)
        router_dtype = torch.float32 if dtype == torch.bfloat16 else dtype  # the router stays at least fp32
        assert m.gate.weight.dtype == m.gate.e_score_correction_bias.dtype == router_dtype
        y1, y2 = m(x.to(dtype), impl="loop"), m(x.to(dtype), impl="grouped")
        assert y2.dtype == dtype and rel(y2, y1) < tol


def test_packed_experts_follow_in_place_updates_and_replacements():
    config = GLM5Config.tiny()
    m = make_moe(config, 4)
    x = randn(4, 1, 13, 32)
    with torch.no_grad():
        m.experts[1].up_proj.weight.mul_(3.0)  # an optimizer step writes in place
    assert rel(m(x), m(x, impl="loop")) < 1e-6
    with torch.no_grad():
        m.experts[2].down_proj.weight.data = torch.randn(32, 16)  # a replaced parameter forces a re-pack
    assert rel(m(x), m(x, impl="loop")) < 1e-6
    m2 = copy.deepcopy(m)
    assert rel(m2(x), m(x, impl="loop")) < 1e-6
    m3 = MoE(config)
    m3.load_state_dict(m.state_dict(), assign=True)
    assert rel(m3(x), m(x, impl="loop")) < 1e-6


@given(small_configs(), odd_lengths, seeds)
def test_permuting_tokens_permutes_outputs(config, t, seed):
    m = make_moe(config, seed)
    x = randn(seed, 2, t, config.hidden_size)
    perm = torch.randperm(2 * t, generator=torch.Generator().manual_seed(seed))
    y = m(x).reshape(2 * t, -1)
    y_perm = m(x.reshape(2 * t, -1)[perm].reshape(2, t, -1)).reshape(2 * t, -1)
    assert rel(y_perm, y[perm]) < 1e-6


def test_sort_by_expert_gives_contiguous_segments():
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]])
    order, token, counts = sort_by_expert(idx, 4)
    assert idx.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2, 2] and counts.tolist() == [2, 1, 3, 0]
    assert token.tolist() == [0, 2, 1, 0, 1, 2]


# ---- balancing ---------------------------------------------------------------------------------------------
@given(small_configs(), batch_sizes, odd_lengths, seeds)
def test_balance_loss_equals_a_direct_loop(config, b, t, seed):
    m = make_moe(config, seed)
    y, aux = m(randn(seed, b, t, config.hidden_size), return_aux=True)
    E, K, alpha = config.n_routed_experts, config.num_experts_per_tok, config.aux_loss_alpha_seq
    total = 0.0
    for s in range(b):
        for e in range(E):
            f = E / (K * t) * sum(e in aux.topk_idx[s, i].tolist() for i in range(t))
            P = sum(aux.scores[s, i, e].item() / aux.scores[s, i].sum().item() for i in range(t)) / t
            total += alpha * f * P
    assert abs(aux.balance_loss.item() - total / b) <= 1e-6 * total / b
    assert aux.tokens_per_expert.sum() == b * t * K and aux.topk_idx.shape == (b, t, K)
    loss = balance_loss(aux.scores, aux.topk_idx, E, K, alpha)
    assert loss.requires_grad and torch.equal(loss, aux.balance_loss)


@settings(max_examples=10)
@given(seeds)
def test_bias_updates_balance_a_skewed_router(seed):
    config = with_changes(GLM5Config.tiny(), n_routed_experts=16, num_experts_per_tok=2)
    gate = MoEGate(config)
    g = torch.Generator().manual_seed(seed)
    topic = torch.randn(32, generator=g)
    topic /= topic.norm()
    with torch.no_grad():
        gate.weight.copy_(0.3 * torch.randn(16, 32, generator=g))
        gate.weight[:2] += 1.5 * topic  # two experts every token of the topic prefers

    def load(n: int) -> torch.Tensor:
        idx, _, _ = gate(torch.randn(n, 32, generator=g) + 2 * topic)
        return torch.bincount(idx.flatten(), minlength=16)

    assert router_stats(load(4096))["max_over_mean"] > 2.0
    recent = torch.zeros(16, dtype=torch.long)
    for step in range(150):
        counts = load(128)
        recent += counts if step >= 100 else 0
        update_router_bias(gate, counts, gamma=0.01)
    # the sign rule makes each bias hover within ~gamma of its balancing value, so the load it controls is the
    # load averaged over steps (here the last 50); a one-batch snapshot still carries that jitter
    assert router_stats(recent)["max_over_mean"] < 1.5
    assert not gate.e_score_correction_bias.requires_grad


def test_update_router_bias_rule():
    gate = MoEGate(GLM5Config.tiny())  # 8 experts, gamma = bias_update_speed = 1e-3
    update_router_bias(gate, torch.tensor([4, 0, 2, 2, 2, 2, 2, 2]))  # mean 2
    assert gate.e_score_correction_bias.tolist() == pytest.approx([-1e-3, 1e-3, 0, 0, 0, 0, 0, 0])
    update_router_bias(MoE(GLM5Config.tiny()), torch.ones(8), gamma=0.5)  # an MoE is accepted too
    stats = router_stats(torch.tensor([4, 0, 2, 2, 2, 2, 2, 2]))
    assert stats["max_over_mean"] == 2.0 and stats["mean_load"] == 2.0 and stats["cv"] == pytest.approx(0.5)


# ---- checkpoint layout and bad input -------------------------------------------------------------------------
def test_checkpoint_names():
    config = GLM5Config.tiny()
    m = MoE(config)
    keys = set(m.state_dict())
    expected = {"gate.weight", "gate.e_score_correction_bias"}
    expected |= {f"experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")}
    expected |= {f"shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert keys == expected
    assert "gate.e_score_correction_bias" not in dict(m.named_parameters())
    assert m.shared_experts.gate_proj.weight.shape == (16, 32)
    assert not any(k.startswith("shared") for k in MoE(with_changes(config, n_shared_experts=0)).state_dict())


def test_bad_input_raises_value_error():
    config = GLM5Config.tiny()
    m = MoE(config)
    with pytest.raises(ValueError, match="hidden_size = 32"):
        m.gate(torch.randn(3, 31))
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        m(torch.randn(2, 3, 31))
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        m(torch.randn(3, 32))
    with pytest.raises(ValueError, match="impl"):
        m(torch.randn(1, 3, 32), impl="fast")
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(1, 3, 32, dtype=torch.float64))
    state = m.state_dict()
    state["gate.e_score_correction_bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        m.load_state_dict(state)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        update_router_bias(m.gate, torch.ones(7))
    with pytest.raises(ValueError, match="gamma"):
        update_router_bias(m.gate, torch.ones(8), gamma=float("nan"))
    m.gate.e_score_correction_bias = torch.zeros(9)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        m.gate(torch.randn(3, 32))
    with pytest.raises(ValueError, match="balance_loss"):
        balance_loss(torch.rand(2, 5, 8), torch.zeros(2, 5, 3, dtype=torch.long), 8, 2, 1e-4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):  # more experts than the kept groups hold
        with_changes(config, n_group=4, topk_group=1, num_experts_per_tok=3)


# ---- transformers as the oracle -----------------------------------------------------------------------------
def hf_moe(config: GLM5Config, m: MoE):
    """transformers' GlmMoeDsaMoE holding m's weights (its experts are fused: gate_up_proj = cat(gate, up))."""
    mod = pytest.importorskip("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa")
    from transformers.models.glm_moe_dsa.configuration_glm_moe_dsa import GlmMoeDsaConfig

    hf_config = GlmMoeDsaConfig(**config.to_hf())
    hf_config._experts_implementation = "eager"
    ref = mod.GlmMoeDsaMoE(hf_config)
    sd = m.state_dict()
    E = config.n_routed_experts
    state = {k: v for k, v in sd.items() if k.startswith(("gate.", "shared_experts."))}
    state["experts.gate_up_proj"] = torch.stack([torch.cat([sd[f"experts.{e}.gate_proj.weight"],
                                                            sd[f"experts.{e}.up_proj.weight"]]) for e in range(E)])
    state["experts.down_proj"] = torch.stack([sd[f"experts.{e}.down_proj.weight"] for e in range(E)])
    ref.load_state_dict(state)
    return ref


oracle_configs = st.sampled_from([(1, 1, 8, 2), (4, 2, 16, 3), (4, 1, 12, 3), (8, 4, 32, 8)]).map(
    lambda g: with_changes(GLM5Config.tiny(), n_group=g[0], topk_group=g[1], n_routed_experts=g[2],
                           num_experts_per_tok=g[3]))


@settings(max_examples=12)
@given(oracle_configs, token_counts, seeds, st.booleans())
def test_matches_transformers_router_and_moe(config, n, seed, norm):
    config = with_changes(config, norm_topk_prob=norm)
    m = make_moe(config, seed)
    ref = hf_moe(config, m)
    x = randn(seed, 1, n, config.hidden_size)
    with torch.no_grad():
        logits_ref, w_ref, idx_ref = ref.gate(x)
        idx, w, scores = m.gate(x)
        assert rel(scores, logits_ref.sigmoid()) < 1e-6
        s_ref, s = idx_ref.sort(-1), idx.sort(-1)  # transformers leaves its top-k unsorted
        assert torch.equal(s_ref.values, s.values)
        assert w.dtype == w_ref.dtype == torch.float32
        assert rel(w.gather(1, s.indices), w_ref.gather(1, s_ref.indices)) < 1e-6
        y_ref = ref(x)
        for impl in ("grouped", "loop"):
            assert rel(m(x, impl=impl), y_ref) < 1e-5


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_batch_gives_empty_output_and_zero_balance_loss(shape):
    config = GLM5Config.tiny()
    moe = MoE(config)
    y, aux = moe(torch.randn(*shape, config.hidden_size), return_aux=True)
    assert y.shape == (*shape, config.hidden_size)
    assert aux.topk_idx.shape == (*shape, config.num_experts_per_tok)
    assert aux.tokens_per_expert.sum() == 0
    assert aux.balance_loss.item() == 0.0  # not NaN
