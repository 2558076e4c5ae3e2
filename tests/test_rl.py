"""RL objectives (glm5_ref/rl.py): REINFORCE equivalence, the double-sided band, stop-gradient form,
aggregation, IcePop, advantages and bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.rl import (aggregate, band_mask, distillation_advantage, double_sided_is_loss, group_advantages,
                         grpo_icepop_loss, reinforce_loss, sequence_logprobs)
from tests.strategies import randn, seeds


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().detach().requires_grad_(True)


def _grad(loss_fn, lp: torch.Tensor) -> torch.Tensor:
    lp = _leaf(lp)
    loss = loss_fn(lp)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return lp.grad


def _batch(seed: int, B: int, T: int):
    lp = -torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) * 3  # log-probs in (-3, 0]
    adv = randn(seed + 1, B)
    mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 2)) < 0.7).float()
    mask[:, 0] = 1.0  # every sequence has a loss token
    return lp, adv, mask


def _exact_ratio_logprob(target: float, dtype=torch.float32) -> torch.Tensor:
    """A log-prob d (with rollout log-prob 0) whose exp(d) in `dtype` equals `target` rounded to `dtype`."""
    want = torch.tensor(target, dtype=dtype)
    d = torch.log(want)
    for _ in range(64):
        got = torch.exp(d)
        if got == want:
            return d
        d = torch.nextafter(d, torch.tensor(math.inf, dtype=dtype) if got < want else torch.tensor(-math.inf,
                                                                                                   dtype=dtype))
    raise AssertionError(f"no {dtype} log-prob with exp == {target}")


@settings(max_examples=25, deadline=None)
@given(seed=seeds, B=st.integers(1, 4), T=st.integers(1, 9))
def test_every_loss_is_reinforce_when_policies_coincide(seed, B, T):
    lp, adv, mask = _batch(seed, B, T)
    for agg in ("token-mean", "seq-mean"):
        want = _grad(lambda x: aggregate(-(adv[:, None] * x), mask, agg), lp)
        dis = _grad(lambda x: double_sided_is_loss(x, x.detach(), adv, mask, aggregation=agg), lp)
        ice = _grad(lambda x: grpo_icepop_loss(x, x.detach(), x.detach(), adv, mask, aggregation=agg), lp)
        rf = _grad(lambda x: reinforce_loss(x, adv, mask, aggregation=agg), lp)
        for got in (dis, ice, rf):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # and the closed form: -A * grad log pi / number of loss tokens
    torch.testing.assert_close(_grad(lambda x: double_sided_is_loss(x, x.detach(), adv, mask), lp),
                               -adv[:, None] * mask / mask.sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.28), (0.25, 0.25), (0.1, 0.5)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_zero_gradient_outside_the_open_band_including_its_boundaries(eps_low, eps_high, sign):
    lo, hi = _exact_ratio_logprob(1 - eps_low), _exact_ratio_logprob(1 + eps_high)
    assert torch.exp(lo) == torch.tensor(1 - eps_low) and torch.exp(hi) == torch.tensor(1 + eps_high)
    inside = lo + 1e-3  # just inside the band, above the low edge
    lp = torch.stack([lo, hi, lo - 1.0, hi + 1.0, torch.tensor(0.0), inside,
                      hi - 1e-3])[None]  # (1, 7) log-ratios (rollout lp = 0)
    rollout = torch.zeros_like(lp)  # so that r = exp(lp) exactly as constructed
    assert torch.equal(torch.exp(lp - rollout)[0, :2], torch.tensor([1 - eps_low, 1 + eps_high]))
    adv = torch.tensor([sign])
    mask = torch.ones_like(lp)
    grad = _grad(lambda x: double_sided_is_loss(x, rollout, adv, mask, eps_low, eps_high), lp)[0]
    assert torch.equal(grad[:4], torch.zeros(4)), grad  # boundaries and beyond: exactly zero
    assert (grad[4:] != 0).all() and (torch.sign(grad[4:]) == -sign).all()
    _, stats = double_sided_is_loss(lp, rollout, adv, mask, eps_low, eps_high)
    assert stats["frac_rejected_low"] == pytest.approx(2 / 7) and stats["frac_rejected_high"] == pytest.approx(2 / 7)
    # PPO's clip, by contrast, keeps the gradient of a token beyond the band when A pushes it back inside
    ppo = _grad(lambda x: grpo_icepop_loss(x, rollout, rollout, adv, mask, eps_low, eps_high), lp)[0]
    far = 2 if sign > 0 else 3  # A > 0 and r too low, or A < 0 and r too high
    assert ppo[far] != 0


@settings(max_examples=25, deadline=None)
@given(seed=seeds, B=st.integers(1, 4), T=st.integers(1, 9), spread=st.floats(0.05, 1.0))
def test_stop_gradient_form_equals_masked_ratio_form(seed, B, T, spread):
    lp, adv, mask = _batch(seed, B, T)
    rollout = lp + spread * randn(seed + 3, B, T)  # a stale behaviour policy: ratios on both sides of the band
    n = mask.sum()

    def masked_ratio(x):
        ratio = torch.exp(x - rollout)
        below, above = band_mask(ratio.detach(), 0.2, 0.28)
        return -((~(below | above)) * ratio * adv[:, None] * mask).sum() / n

    torch.testing.assert_close(_grad(lambda x: double_sided_is_loss(x, rollout, adv, mask), lp),
                               _grad(masked_ratio, lp), rtol=1e-5, atol=1e-7)


def test_rejected_tokens_stay_in_the_denominator():
    rollout = torch.tensor([[0.0, 0.0, -2.0, 2.0]])  # ratios 1, 1, e^2 (rejected), e^-2 (rejected)
    loss, stats = double_sided_is_loss(_leaf(torch.full((1, 4), -1.0)), rollout - 1.0, torch.tensor([1.0]),
                                       torch.ones(1, 4))
    # kept tokens contribute -1 * 1 * (-1) each; the mean divides by all 4 loss tokens
    assert loss.item() == pytest.approx(2 / 4)
    assert stats["frac_rejected"] == 0.5 and stats["num_tokens"] == 4


@settings(max_examples=25, deadline=None)
@given(seed=seeds, B=st.integers(2, 4), T=st.integers(2, 9))
def test_token_mean_and_sequence_mean(seed, B, T):
    per_token = randn(seed, B, T)
    equal = torch.ones(B, T)
    torch.testing.assert_close(aggregate(per_token, equal, "token-mean"), aggregate(per_token, equal, "seq-mean"))
    unequal = torch.ones(B, T)
    unequal[0, 1:] = 0  # sequence 0 has one token, the others T
    per_token[0, 0] = per_token[1:].mean() + 5.0  # make the short sequence's weight matter
    tm, sm = aggregate(per_token, unequal, "token-mean"), aggregate(per_token, unequal, "seq-mean")
    assert not torch.isclose(tm, sm)
    assert sm.item() == pytest.approx((per_token[0, 0] + per_token[1:].mean(-1).sum()).item() / B, rel=1e-5)


def test_icepop_pops_the_mismatch_independent_of_theta():
    lp = torch.full((1, 4), -1.0)
    old = torch.full((1, 4), -1.0)
    rollout = old - torch.log(torch.tensor([[1.0, 2.0, 2.5, 0.3]]))  # rho = 1, 2 (kept), 2.5, 0.3 (popped)
    mask = torch.ones(1, 4)
    for shift in (0.0, 0.1, -0.1):  # theta moves; the popped set does not
        grad = _grad(lambda x: grpo_icepop_loss(x, old, rollout, torch.tensor([1.0]), mask), lp + shift)[0]
        assert torch.equal(grad[2:], torch.zeros(2))
        if shift == 0.0:
            torch.testing.assert_close(grad[:2], torch.tensor([-1.0, -2.0]) / 4)  # pop(rho) = rho, seq-mean
    _, stats = grpo_icepop_loss(lp, old, rollout, torch.tensor([1.0]), mask)
    assert stats["frac_popped"] == 0.5


def test_ppo_clip_zeroes_only_when_the_sign_matches():
    lp = torch.log(torch.tensor([[2.0, 2.0, 0.5]]))  # r = 2, 2, 0.5 against pi_old = 1
    zeros = torch.zeros(1, 3)
    for adv, zero_at in ((torch.tensor([1.0]), [0, 1]), (torch.tensor([-1.0]), [2])):
        grad = _grad(lambda x: grpo_icepop_loss(x, zeros, zeros, adv, torch.ones(1, 3)), lp)[0]
        for k in range(3):
            assert (grad[k] == 0) == (k in zero_at)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = group_advantages(r)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(group_advantages(r, normalize_std=True)[0], torch.tensor([1.0, -1.0, -1.0, 1.0]),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(group_advantages(r, normalize_std=True)[1], torch.zeros(4))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(0))


def test_distillation_advantage_is_detached():
    lp = _leaf(torch.tensor([[-1.0, -2.0]]))
    adv = distillation_advantage(torch.tensor([[-0.5, -3.0]]), lp)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, torch.tensor([[0.5, -1.0]]))
    with pytest.raises(ValueError, match="teacher_logprobs"):
        distillation_advantage(torch.zeros(1, 3), lp)


def test_sequence_logprobs_matches_log_softmax():
    logits = randn(0, 2, 5, 7)
    ids = torch.randint(0, 7, (2, 5), generator=torch.Generator().manual_seed(0))
    got = sequence_logprobs(logits, ids)
    assert torch.equal(got[:, 0], torch.zeros(2))
    torch.testing.assert_close(got[1, 3], torch.log_softmax(logits[1, 2], -1)[ids[1, 3]])


def test_bad_inputs_raise_clear_errors_never_nan():
    lp, adv, mask = _batch(0, 2, 5)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        double_sided_is_loss(lp, lp[:, :4], adv, mask)
    with pytest.raises(ValueError, match="loss_mask"):
        double_sided_is_loss(lp, lp, adv, mask[:, :3])
    with pytest.raises(ValueError, match="advantages"):
        double_sided_is_loss(lp, lp, adv[:1], mask)
    for eps_low in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eps_low"):
            double_sided_is_loss(lp, lp, adv, mask, eps_low=eps_low)
    for eps_high in (0.0, -0.2, float("inf")):
        with pytest.raises(ValueError, match="eps_high"):
            double_sided_is_loss(lp, lp, adv, mask, eps_high=eps_high)
    with pytest.raises(ValueError, match="empty"):
        double_sided_is_loss(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="selects no token"):
        double_sided_is_loss(lp, lp, adv, torch.zeros_like(mask))
    bad = lp.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="logprobs.*NaN"):
        double_sided_is_loss(bad, lp, adv, mask)
    with pytest.raises(ValueError, match="rollout_logprobs.*NaN"):
        double_sided_is_loss(lp, bad, adv, mask)
    with pytest.raises(ValueError, match="NaN"):
        grpo_icepop_loss(lp, bad, lp, adv, mask)
    with pytest.raises(ValueError, match="beta"):
        grpo_icepop_loss(lp, lp, lp, adv, mask, beta=1.0)
    with pytest.raises(TypeError, match="logprobs"):
        double_sided_is_loss(lp.tolist(), lp, adv, mask)
    with pytest.raises(ValueError, match="aggregation"):
        double_sided_is_loss(lp, lp, adv, mask, aggregation="sum")
