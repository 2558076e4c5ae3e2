"""RL objectives of GLM-5: group advantages, direct double-sided IS (agentic RL), GRPO + IcePop (reasoning RL),
and the on-policy distillation advantage.

What it is (GLM-5 report section 3.2 eq. 1, section 4.1 eqs. 3-5; glm5_spec.md section 8)
    Group advantage (agentic RL, section 4.1):  A_i = R_i - mean_k R_k            (std normalisation optional)

    Direct double-sided importance sampling (eqs. 3-5), the agentic-RL loss:
        r_t  = exp(log pi_theta(a_t|s_t) - log pi_rollout(a_t|s_t))    rollout log-probs replace pi_old
        f(x) = x  if 1 - eps_low < x < 1 + eps_high  else 0           an OPEN band: tokens outside are MASKED
        loss = - sum_t m_t * sg(f(r_t)) * A_t * log pi_theta(a_t|s_t) / sum_t m_t
    so grad loss = - sum_t m_t f(r_t) A_t grad log pi / sum m = - sum_t m_t [r_t in band] A_t grad r_t / sum m,
    i.e. the same gradient as -mask * r * A (tested), and EXACTLY zero for a token outside the band whatever
    the sign of A (PPO's clip only zeroes it when the sign of A pushes further out).

    GRPO + IcePop (eq. 1), the reasoning-RL loss, with no KL term:
        rho = pi_old / pi_rollout (train/inference mismatch, independent of theta),
        pop(rho) = rho if 1/beta <= rho <= beta else 0,     r = pi_theta / pi_old,
        loss = - 1/G sum_i 1/|y_i| sum_t pop(rho) * min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)

    On-policy distillation (eq. 2): A_t = sg(log pi_teacher(y_t) - log pi_theta(y_t)), group size 1.

Choices where the paper is silent
    * eps_low = 0.2, eps_high = 0.28 for double-sided IS: the paper gives NO values for agentic RL; these are
      its reasoning-RL clip values (DAPO's), reused.
    * r is detached inside f (the paper does not say); the gradient is then f(r) A grad log pi.
    * The band test runs in the dtype of ``logprobs`` with the bounds rounded to that dtype, so a ratio
      exactly at 1 - eps_low or 1 + eps_high is rejected (the band is open, eq. 5).
    * Denominator: every token with loss_mask = 1 counts, rejected ones included (slime's default; the
      rejected tokens dilute the step rather than re-weighting the survivors).
    * Aggregation: "token-mean" (one mean over every loss token of the batch, DAPO / GLM-5 agentic) or
      "seq-mean" (mean over each sequence's loss tokens, then over sequences: eq. 1's 1/G sum 1/|y_i|).
    * Per-sequence advantages of shape (B,) are broadcast over tokens; (B, T) per-token advantages are
      accepted as they are (distillation).

Not handled: KL penalties, dual-clip, sequence-level (GSPO) ratios, entropy bonuses.
Axes: B sequences, T tokens, G group size.
References: GLM-5 (arXiv 2602.15763); DAPO (arXiv 2503.14476); IcePop / Ring-1T (arXiv 2510.18855);
slime ppo_utils.py; verl core_algos.py agg_loss.
"""

from __future__ import annotations

import math

import torch

AGGREGATIONS = ("token-mean", "seq-mean")


# ---- validation helpers -----------------------------------------------------------------------------------
def _check_tensor(name: str, x, ndim: tuple[int, ...] | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ndim:
        raise ValueError(f"{name}: expected {' or '.join(f'{n}-D' for n in ndim)}, got shape {tuple(x.shape)}")
    return x


def _check_float(name: str, x: torch.Tensor, finite_where: torch.Tensor | None = None) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"{name}: contains NaN ({int(torch.isnan(x).sum())} entries); expected finite values")
    bad = ~torch.isfinite(x)
    if finite_where is not None:
        bad = bad & finite_where
    if bad.any():
        raise ValueError(f"{name}: contains +-inf at {int(bad.sum())} loss tokens; expected finite values")


def _check_eps(eps_low: float, eps_high: float) -> None:
    if not isinstance(eps_low, (int, float)) or isinstance(eps_low, bool) or not 0 < eps_low < 1:
        raise ValueError(f"eps_low: expected a number in the open interval (0, 1), got {eps_low!r}")
    if (not isinstance(eps_high, (int, float)) or isinstance(eps_high, bool) or not math.isfinite(eps_high)
            or eps_high <= 0):
        raise ValueError(f"eps_high: expected a finite number > 0, got {eps_high!r}")


def _check_batch(logprobs, others: dict[str, torch.Tensor], loss_mask, advantages):
    """Common checks: shapes (B, T), a non-empty batch, a mask that selects something, finite values.
    Returns (mask as float, advantages broadcast to (B, T))."""
    _check_tensor("logprobs", logprobs, (2,))
    if logprobs.numel() == 0:
        raise ValueError(f"logprobs: empty batch (shape {tuple(logprobs.shape)}); expected B >= 1 and T >= 1")
    _check_tensor("loss_mask", loss_mask)
    if loss_mask.shape != logprobs.shape:
        raise ValueError(f"loss_mask: expected the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(loss_mask.shape)}")
    if loss_mask.is_floating_point() and not ((loss_mask == 0) | (loss_mask == 1)).all():
        raise ValueError("loss_mask: expected only 0 and 1 entries")
    mask = loss_mask.to(torch.bool)
    if not mask.any():
        raise ValueError("loss_mask: selects no token (all zeros); the loss would be 0/0")
    _check_float("logprobs", logprobs, mask)
    for name, t in others.items():
        _check_tensor(name, t)
        if t.shape != logprobs.shape:
            raise ValueError(f"{name}: expected the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}")
        _check_float(name, t, mask)
    _check_tensor("advantages", advantages, (1, 2))
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages: expected shape ({logprobs.shape[0]},) or {tuple(logprobs.shape)}, "
                             f"got {tuple(advantages.shape)}")
        advantages = advantages[:, None].expand_as(logprobs)  # (B,) -> (B, T)
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages: expected shape ({logprobs.shape[0]},) or {tuple(logprobs.shape)}, "
                         f"got {tuple(advantages.shape)}")
    _check_float("advantages", advantages, mask)
    return mask, advantages


def aggregate(per_token: torch.Tensor, loss_mask: torch.Tensor, aggregation: str = "token-mean") -> torch.Tensor:
    """Mean of (B, T) per-token values over loss tokens: 'token-mean' (all tokens of the batch at once) or
    'seq-mean' (each sequence's mean, then the mean over sequences that have a loss token)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    m = loss_mask.to(per_token.dtype)
    per_token = torch.where(loss_mask.bool(), per_token, torch.zeros_like(per_token))  # no 0 * inf
    if aggregation == "token-mean":
        return (per_token * m).sum() / m.sum()
    counts = m.sum(-1)  # (B,)
    has = counts > 0
    seq = (per_token * m).sum(-1)[has] / counts[has]  # (B',)
    return seq.mean()


# ---- advantages ------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """A = R - mean over the group (last axis); with normalize_std also divided by (std + eps) as in GRPO.
    rewards: (G,) or (num_groups, G). A group whose rewards are all equal gets A = 0."""
    _check_tensor("rewards", rewards, (1, 2))
    if rewards.numel() == 0 or rewards.shape[-1] == 0:
        raise ValueError(f"rewards: empty group (shape {tuple(rewards.shape)}); expected G >= 1")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards: expected finite values, got NaN or inf")
    adv = rewards - rewards.mean(-1, keepdim=True)
    if normalize_std:
        std = rewards.std(-1, unbiased=False, keepdim=True) if rewards.shape[-1] > 1 else torch.zeros_like(adv)
        adv = adv / (std + eps)
    return adv


def distillation_advantage(teacher_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """On-policy distillation (eq. 2): A_t = sg(log pi_teacher(y_t) - log pi_theta(y_t)), per token."""
    _check_tensor("teacher_logprobs", teacher_logprobs)
    _check_tensor("logprobs", logprobs)
    if teacher_logprobs.shape != logprobs.shape:
        raise ValueError(f"teacher_logprobs: expected the shape of logprobs {tuple(logprobs.shape)}, "
                         f"got {tuple(teacher_logprobs.shape)}")
    _check_float("teacher_logprobs", teacher_logprobs)
    _check_float("logprobs", logprobs)
    return (teacher_logprobs - logprobs).detach()


# ---- losses ----------------------------------------------------------------------------------------------
def band_mask(ratio: torch.Tensor, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(below, above): ratio <= 1 - eps_low and ratio >= 1 + eps_high, bounds rounded to ratio's dtype."""
    lo = torch.tensor(1.0 - eps_low, dtype=ratio.dtype, device=ratio.device)
    hi = torch.tensor(1.0 + eps_high, dtype=ratio.dtype, device=ratio.device)
    return ratio <= lo, ratio >= hi


def double_sided_is_loss(logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, advantages: torch.Tensor,
                         loss_mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28,
                         aggregation: str = "token-mean") -> tuple[torch.Tensor, dict[str, float]]:
    """GLM-5's direct double-sided IS loss (eqs. 3-5). Shapes: logprobs, rollout_logprobs, loss_mask (B, T);
    advantages (B,) or (B, T). Returns (scalar loss, stats) with stats frac_rejected_low / _high / frac_rejected
    (over loss tokens), mean_ratio (over loss tokens), num_tokens."""
    _check_eps(eps_low, eps_high)
    mask, adv = _check_batch(logprobs, {"rollout_logprobs": rollout_logprobs}, loss_mask, advantages)
    ratio = torch.exp(logprobs.detach() - rollout_logprobs.detach())  # (B, T), sg(r)
    below, above = band_mask(ratio, eps_low, eps_high)
    weight = torch.where(below | above, torch.zeros_like(ratio), ratio)  # f(r): masked, not clipped
    loss = aggregate(-(weight * adv.detach() * logprobs), mask, aggregation)
    n = mask.sum()
    stats = {
        "frac_rejected_low": float((below & mask).sum() / n),
        "frac_rejected_high": float((above & mask).sum() / n),
        "frac_rejected": float(((below | above) & mask).sum() / n),
        "mean_ratio": float(ratio[mask].mean()),
        "num_tokens": int(n),
    }
    return loss, stats


def grpo_icepop_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                     advantages: torch.Tensor, loss_mask: torch.Tensor, eps_low: float = 0.2,
                     eps_high: float = 0.28, beta: float = 2.0,
                     aggregation: str = "seq-mean") -> tuple[torch.Tensor, dict[str, float]]:
    """GLM-5's reasoning-RL objective (eq. 1): PPO clip on r = pi_theta / pi_old times IcePop's pop(rho),
    rho = pi_old / pi_rollout kept inside [1/beta, beta] (weight rho) and zeroed outside; averaged per
    sequence then over the group (aggregation='seq-mean'); no KL. Returns (scalar loss, stats)."""
    _check_eps(eps_low, eps_high)
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 1:
        raise ValueError(f"beta: expected a finite number > 1, got {beta!r}")
    mask, adv = _check_batch(logprobs, {"old_logprobs": old_logprobs, "rollout_logprobs": rollout_logprobs},
                             loss_mask, advantages)
    adv = adv.detach()
    rho = torch.exp(old_logprobs.detach() - rollout_logprobs.detach())  # (B, T), independent of theta
    kept = (rho >= 1.0 / beta) & (rho <= beta)
    pop = torch.where(kept, rho, torch.zeros_like(rho))
    ratio = torch.exp(logprobs - old_logprobs.detach())  # (B, T), carries the gradient
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    loss = aggregate(-(pop * surrogate), mask, aggregation)
    n = mask.sum()
    stats = {
        "frac_popped": float((~kept & mask).sum() / n),
        "frac_clipped": float(((ratio.detach() != clipped.detach()) & mask).sum() / n),
        "mean_ratio": float(ratio.detach()[mask].mean()),
        "mean_mismatch": float(rho[mask].mean()),
        "num_tokens": int(n),
    }
    return loss, stats


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, loss_mask: torch.Tensor,
                   aggregation: str = "token-mean") -> torch.Tensor:
    """-mean(A * log pi): the on-policy policy gradient, with no correction for a stale behaviour policy."""
    mask, adv = _check_batch(logprobs, {}, loss_mask, advantages)
    return aggregate(-(adv.detach() * logprobs), mask, aggregation)


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T) log pi(ids[:, t] | ids[:, :t]) from (B, T, V) logits of a causal model; position 0 (no context)
    gets 0. This is the per-token layout TITO trajectories use (tito.Trajectory.logprobs)."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"logits, ids: expected (B, T, V) and (B, T), got {tuple(logits.shape)} and "
                         f"{tuple(ids.shape)}")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): predicts tokens 1..T-1
    picked = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return torch.cat([picked.new_zeros(ids.shape[0], 1), picked], dim=1)  # (B, T)
