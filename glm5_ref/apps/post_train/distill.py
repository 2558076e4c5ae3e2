"""On-policy cross-stage distillation (GLM-5 report section 3.5), the final stage: the student (the general-RL
model) samples; each prompt's teacher (the final checkpoint of the stage whose RL set the prompt comes from)
scores the student's own tokens; eq. 2's advantage goes into eq. 1's loss with group size 1.

    A_t = sg[ log pi_teacher(y_t | x, y_<t) - log pi_train_old(y_t | x, y_<t) ]        (eq. 2)
    teachers   reasoning prompts -> the reasoning-RL checkpoint; agentic tasks -> the agentic-RL checkpoint;
               instructions -> the general-RL checkpoint (the student's own start: it anchors what general RL added)
    prompts    drawn from each teacher's RL set (reasoning_rl_set, agentic_rl_set, general_rl_set), mixed in equal
               proportions (the paper: "appropriate proportions", not given)
Only the sampled token's teacher log-prob is needed, so the teacher runs one forward over the student's ids (the
paper fetches it from the inference engine); the mean of -A_t over the model's tokens is the sampled reverse KL
(reported). Agentic episodes are multi-turn: the whole episode is one sample (its tool results masked).

Scaled down: 4 prompts per family per step (12 samples, G = 1; the paper's batch is 1,024), AdamW at 2e-5, the
same sampler (bf16 weights) and two minibatches as reasoning RL.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch

from glm5_ref.apps.post_train.agentic_rl import agentic_rl_set
from glm5_ref.apps.post_train.general_rl import general_rl_set
from glm5_ref.apps.post_train.reasoning_rl import reasoning_rl_set
from glm5_ref.apps.post_train.rl_core import Sample, eq1_update, rl_trainer, token_logprobs
from glm5_ref.apps.post_train.rollout import answer_turns, push_weights, run_episodes
from glm5_ref.apps.post_train.tools import agentic_reward, execute

FAMILY_TEACHER = {"reasoning": "reasoning_rl", "agentic": "agentic_rl", "general": "general_rl"}


@dataclass
class DistillConfig:
    steps: int = 30
    per_family: int = 4          # prompts of each family per step (group size 1)
    lr: float = 2e-5
    minibatches: int = 2
    max_new_tokens: dict | None = None  # per family; default reasoning 64, agentic 56 per turn, general 40
    rl_set: int = 512
    seed: int = 0


def run_distill(student, teachers: dict, cfg: DistillConfig, progress=None) -> list[dict]:
    """Train ``student`` in place; ``teachers`` maps family -> teacher model. Returns one record per step."""
    budget = cfg.max_new_tokens or {"reasoning": 64, "agentic": 56, "general": 40}
    pools = {"reasoning": reasoning_rl_set(cfg.rl_set), "agentic": agentic_rl_set(cfg.rl_set),
             "general": general_rl_set(cfg.rl_set)}
    rng = random.Random(cfg.seed)
    sampler = copy.deepcopy(student).eval()
    push_weights(student, sampler)
    trainer = rl_trainer(student, cfg.lr, cfg.steps * cfg.minibatches)
    for t in teachers.values():
        t.eval()
    student.train()
    history = []
    for step in range(cfg.steps):
        seed = cfg.seed * 100_003 + step
        samples, families, rewards = [], [], {}
        for fam in ("reasoning", "general"):
            turns = answer_turns(sampler, rng.sample(pools[fam], cfg.per_family), budget[fam], 1.0, seed=seed)
            samples += [Sample.from_turn(t["prompt"], t["ids"], t["logprobs"]) for t in turns]
            families += [fam] * len(turns)
        eps = run_episodes(sampler, rng.sample(pools["agentic"], cfg.per_family), execute, agentic_reward,
                           max_new_tokens=budget["agentic"], temperature=1.0, seed=seed, prefix=f"d{step}-")
        for e in eps:
            samples += [Sample.from_trajectory(t) for t in e["samples"]]
            families += ["agentic"] * len(e["samples"])
        rewards["agentic"] = sum(e["reward"] for e in eps) / len(eps)

        def teacher_logprobs(ids, keep):
            out = torch.zeros(ids.shape, dtype=torch.float32)
            for fam, teacher in teachers.items():
                rows = [j for j, i in enumerate(keep) if families[i] == fam]
                if rows:
                    out[rows] = token_logprobs(teacher, ids[rows])
            return out

        stats = eq1_update(trainer, samples, cfg.minibatches, teacher_logprobs=teacher_logprobs, seed=step)
        push_weights(student, sampler)
        record = {"step": step, "agentic_reward": rewards["agentic"], **stats}
        history.append(record)
        if progress is not None:
            progress(step, record)
    student.eval()
    return history
