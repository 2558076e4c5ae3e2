"""Reasoning RL (GLM-5 report section 3.2): GRPO + IcePop exactly as eq. 1 (rl_core.py), binary outcome rewards,
on-policy, no KL, the indexer frozen and its top-k deterministic.

One step
    draw P prompts of the reasoning RL set (a fixed set of 512 training questions), sample G answers each with
    thinking on, at temperature 1 (top-p 1, so the sampler's log-probs are the policy's), from the sampler: a copy
    of the policy whose weights arrive in bf16 after every step (rollout.push_weights; the train/inference
    mismatch rho = pi_train_old / pi_infer_old that IcePop pops outside [1/2, 2]);
    reward 1 iff the parsed answer is the value; A = (R - mean_G R) / std_G R;
    eq. 1 on the P x G answers in 2 minibatches (the first exactly on-policy, the second one step off it: the PPO
    clip 0.2 / 0.28 acts there); push the weights to the sampler.
Scaled down (the paper's group size and batch are far larger; stated here): G = 8, P = 8 (64 answers per step),
answers of at most 64 tokens, AdamW at 3e-5, ``steps`` steps.

``grpo_stage`` is the same loop for any single-turn family with a reward function; general RL uses it too.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

from glm5_ref.apps.post_train.rl_core import Sample, eq1_update, grpo_advantages, rl_trainer
from glm5_ref.apps.post_train.rollout import answer_turns, push_weights
from glm5_ref.apps.post_train.tasks import fixed_set, reasoning_example, reasoning_reward


@dataclass
class GRPOConfig:
    steps: int = 60               # RL steps (one rollout batch each)
    prompts_per_step: int = 8     # P
    group_size: int = 8           # G
    max_new_tokens: int = 64      # answer budget (thinking included)
    lr: float = 3e-5
    minibatches: int = 2          # optimizer steps per rollout batch
    bf16_sampler: bool = True     # the sampler receives bf16 weights (the train/inference mismatch)
    rl_set: int = 512             # size of the stage's RL prompt set
    seed: int = 0


def reasoning_rl_set(n: int = 512, seed: int = 101):
    return fixed_set(reasoning_example, n, "train", seed)


def grpo_stage(model, pool: list, reward_fn, cfg: GRPOConfig, progress=None) -> list[dict]:
    """GRPO + IcePop over prompts drawn from ``pool``; ``reward_fn(examples, turns) -> list[float]`` scores the
    P x G answers (example-major). Trains ``model`` in place; returns one record per step."""
    rng = random.Random(cfg.seed)
    sampler = copy.deepcopy(model).eval()
    push_weights(model, sampler, cfg.bf16_sampler)
    trainer = rl_trainer(model, cfg.lr, cfg.steps * cfg.minibatches)
    model.train()
    history = []
    for step in range(cfg.steps):
        examples = rng.sample(pool, cfg.prompts_per_step)
        turns = answer_turns(sampler, examples, cfg.max_new_tokens, temperature=1.0, seed=cfg.seed * 100_003 + step,
                             repeats=cfg.group_size)
        rewards = reward_fn([t["example"] for t in turns], turns)
        adv = grpo_advantages(rewards, cfg.group_size)
        samples = [Sample.from_turn(t["prompt"], t["ids"], t["logprobs"], a) for t, a in zip(turns, adv)]
        stats = eq1_update(trainer, samples, cfg.minibatches, seed=step)
        push_weights(model, sampler, cfg.bf16_sampler)
        record = {"step": step, "reward": sum(rewards) / len(rewards),
                  "tokens": sum(len(t["ids"]) for t in turns) / len(turns), **stats}
        history.append(record)
        if progress is not None:
            progress(step, record)
    model.eval()
    return history


def run_reasoning_rl(model, cfg: GRPOConfig, progress=None) -> list[dict]:
    pool = reasoning_rl_set(cfg.rl_set)
    return grpo_stage(model, pool, lambda exs, turns: [reasoning_reward(e, t["msg"]) for e, t in zip(exs, turns)],
                      cfg, progress)
