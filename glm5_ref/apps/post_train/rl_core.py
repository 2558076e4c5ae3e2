"""The update every on-policy post-training stage shares: GRPO + IcePop (GLM-5 eq. 1) on the training engine.

    rho_t = pi_train_old(y_t) / pi_infer_old(y_t)          the trainer vs the sampler, both before the update
    pop(rho) = rho if 1/beta <= rho <= beta else 0         beta = 2 (IcePop, as in GLM-5)
    r_t = pi_theta(y_t) / pi_train_old(y_t)
    L = -1/G sum_i 1/|y_i| sum_t pop(rho_t) min(r_t A_i, clip(r_t, 1 - 0.2, 1 + 0.28) A_i)          no KL term
    A_i = (R_i - mean_G R) / std_G R                        reasoning and general RL (GRPO)
    A_t = sg(log pi_teacher(y_t) - log pi_train_old(y_t))   on-policy distillation, eq. 2, group size 1

rl.grpo_icepop_loss is the loss; this file computes pi_train_old with the trainer's weights before the update
(``token_logprobs``), splits the batch into ``minibatches`` optimizer steps (the first is exactly on-policy, r = 1;
the later ones are not, which is what the PPO clip is for), and runs each step through engine.Trainer.step.

Choices where the paper is silent: AdamW (betas 0.9, 0.999, no weight decay) at a constant lr after a short
warm-up; gradient-norm clip 1.0; two minibatches per rollout batch; groups whose rewards are all equal have zero
advantage and are left out of the update (they would add nothing but denominators; DAPO's dynamic sampling, without
resampling); the router biases stay as they are during RL; in distillation the advantage uses pi_train_old (the
paper's log pi_theta^train at sampling time), so r keeps its meaning. The indexer is frozen (``freeze_indexer``,
requires_grad False on every parameter under ".indexer.", GLM-5 section 3.2) and its top-k is torch.topk, which
is deterministic: the sampler and the trainer select the same keys for the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from glm5_ref.rl import group_advantages, grpo_icepop_loss, sequence_logprobs
from glm5_ref.tito import trajectories_to_batch
from glm5_ref.tokenizer import PAD_ID
from glm5_ref.training.engine import Trainer


@dataclass
class Sample:
    """One trained sequence: all of its ids (prompt, model turns, tool results), the model's tokens (mask 1) and
    the sampler's log-prob of each id (0 where mask is 0)."""
    ids: list[int]
    mask: list[int]
    rollout_logprobs: list[float]
    advantage: float = 0.0

    @classmethod
    def from_turn(cls, prompt: list[int], new: list[int], logprobs: list[float], advantage: float = 0.0):
        return cls(list(prompt) + list(new), [0] * len(prompt) + [1] * len(new), [0.0] * len(prompt) + list(logprobs),
                   advantage)

    @classmethod
    def from_trajectory(cls, traj, advantage: float = 0.0):
        return cls(traj.ids, traj.loss_mask, traj.logprobs, advantage)


def freeze_indexer(model) -> int:
    """requires_grad False on the lightning indexers (GLM-5 freezes them in RL); returns how many tensors."""
    n = 0
    for name, p in model.named_parameters():
        if ".indexer." in f".{name}":
            p.requires_grad_(False)
            n += 1
    return n


def rl_trainer(model, lr: float, total_steps: int, warmup: float = 0.05) -> Trainer:
    freeze_indexer(model)
    return Trainer(model, "adamw", lr, weight_decay=0.0, total_steps=max(total_steps, 1), warmup=warmup,
                   min_lr_ratio=1.0, grad_clip=1.0, adamw_betas=(0.9, 0.999))


def to_batch(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, loss_mask, rollout_logprobs), each (N, T), right-padded with PAD_ID / 0 / 0 (tito's padding)."""
    ids, lps, mask = trajectories_to_batch(
        [SimpleNamespace(ids=s.ids, logprobs=s.rollout_logprobs, loss_mask=s.mask) for s in samples], PAD_ID)
    return ids, mask, lps


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """(N, T) log pi(ids[:, t] | ids[:, :t]) under ``model`` (0 at t = 0), ``rows`` sequences at a time."""
    was = model.training
    model.eval()
    out = torch.cat([sequence_logprobs(model(ids[i:i + rows]).logits, ids[i:i + rows])
                     for i in range(0, ids.shape[0], rows)])
    model.train(was)
    return out


def grpo_advantages(rewards: list[float], group_size: int) -> list[float]:
    """(R - mean) / std within each consecutive group of ``group_size`` rewards (0 for an all-equal group)."""
    r = torch.tensor(rewards, dtype=torch.float32).reshape(-1, group_size)  # (groups, G)
    return group_advantages(r, normalize_std=True).reshape(-1).tolist()


def eq1_update(trainer: Trainer, samples: list[Sample], minibatches: int = 2, teacher_logprobs=None,
               eps_low: float = 0.2, eps_high: float = 0.28, beta: float = 2.0, seed: int = 0) -> dict:
    """One rollout batch -> ``minibatches`` optimizer steps of eq. 1 (module docstring). ``teacher_logprobs``:
    a function ids (N, T) -> (N, T) teacher log-probs; then A_t = teacher - pi_train_old per token (eq. 2) and the
    samples' own advantages are ignored. Samples with a zero advantage are dropped (not in distillation).
    Returns statistics (mean over the steps), or {"skipped": 1} when nothing is left to train."""
    keep = [i for i, s in enumerate(samples) if any(s.mask) and (teacher_logprobs is not None or s.advantage != 0.0)]
    samples = [samples[i] for i in keep]  # an empty turn (no room left to generate) trains nothing
    if not samples:
        return {"skipped": 1}
    ids, mask, rollout = to_batch(samples)
    old = token_logprobs(trainer.model, ids)  # (N, T) pi_train_old
    if teacher_logprobs is not None:
        adv = (teacher_logprobs(ids, keep) - old) * mask  # (N, T), eq. 2
    else:
        adv = torch.tensor([s.advantage for s in samples], dtype=torch.float32)  # (N,)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    parts = [p for p in order.chunk(min(minibatches, len(samples))) if p.numel()]
    stats: dict[str, float] = {}
    for part in parts:
        def objective(net, idx):
            lp = sequence_logprobs(net(ids[idx]).logits, ids[idx])  # (n, T), with gradient
            return grpo_icepop_loss(lp, old[idx], rollout[idx], adv[idx], mask[idx], eps_low, eps_high, beta,
                                    aggregation="seq-mean")

        res = trainer.step(part, loss_fn=objective)
        for k, v in {**res.out, "loss": float(res.loss), "grad_norm": float(res.grad_norm)}.items():
            stats[k] = stats.get(k, 0.0) + float(v) / len(parts)
    if teacher_logprobs is not None:
        stats["reverse_kl"] = float(-(adv * mask).sum() / mask.sum())  # mean log pi_old - log pi_teacher
    stats["samples"] = len(samples)
    return stats
