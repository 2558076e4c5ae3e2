"""General RL with a hybrid reward (GLM-5 report section 3.4): rule-based functions, an outcome reward model and a
generative reward model (rewards.py), on the same GRPO + IcePop loop as reasoning RL (reasoning_rl.grpo_stage).

The rewards (per answer; the prompts are the general RL set: instructions with 1-3 constraints about a topic,
answered with thinking off)
    rule       the fraction of the prompt's constraints the answer satisfies (tasks.rule_reward)
    orm        sigmoid(ORM score)
    grm        the generative judge's sampled score / 9, reading the topic's human-written anchor as reference
    hybrid     rule + 0.5 orm + 0.5 grm                      (the pipeline's stage)
    hybrid-no-anchor  the same with the judge reading no reference (the anchors left out)
The paper gives no weights, gating or routing; this sum is our choice (GRPO's per-group normalisation makes only
the relative scale matter). ``compare_rewards`` trains a short run with each reward alone and with both hybrids
from the same checkpoint and measures, on the held-out instructions: the pass rate, the style (the judge's
expected score with the reference), the ORM's score, answer length, the share of answers with filler words,
repeated words or a formula, and the reward's spread (within-group std: the ORM's low variance, the sampled
judge's noise).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from glm5_ref.apps.post_train.anchors import FILLERS, FORMULAS, words
from glm5_ref.apps.post_train.reasoning_rl import GRPOConfig, grpo_stage
from glm5_ref.apps.post_train.rewards import grm_expected, grm_sampled, orm_scores
from glm5_ref.apps.post_train.rollout import answer_turns
from glm5_ref.apps.post_train.tasks import fixed_set, general_example, instruction_pass, rule_reward

REWARDS = ("rule", "orm", "grm", "hybrid", "hybrid-no-anchor")
WEIGHTS = {"rule": 1.0, "orm": 0.5, "grm": 0.5}


def general_rl_set(n: int = 512, seed: int = 303):
    return fixed_set(general_example, n, "train", seed)


def general_config(**changes) -> GRPOConfig:
    """Scaled down: G = 4, P = 8 (32 answers per step), answers of at most 40 tokens."""
    return replace(GRPOConfig(steps=40, prompts_per_step=8, group_size=4, max_new_tokens=40, lr=2e-5), **changes)


def make_reward(kind: str, orm, grm, seed: int = 0, log: list | None = None, group_size: int = 1):
    """reward_fn(examples, turns) for grpo_stage; appends each batch's component means / spreads to ``log``."""
    if kind not in REWARDS:
        raise ValueError(f"reward: expected one of {REWARDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)

    def reward_fn(examples, turns):
        answers = [t["msg"]["content"] or "" for t in turns]
        parts = {}
        if kind in ("rule", "hybrid", "hybrid-no-anchor"):
            parts["rule"] = [rule_reward(e, t["msg"]) for e, t in zip(examples, turns)]
        if kind in ("orm", "hybrid", "hybrid-no-anchor"):
            parts["orm"] = torch.sigmoid(torch.tensor(orm_scores(orm, examples, answers))).tolist()
        if kind in ("grm", "hybrid", "hybrid-no-anchor"):
            parts["grm"] = grm_sampled(grm, examples, answers, gen, with_reference=kind != "hybrid-no-anchor")
        if len(parts) == 1:
            total = next(iter(parts.values()))
        else:
            total = [sum(WEIGHTS[k] * v[i] for k, v in parts.items()) for i in range(len(answers))]
        if log is not None:
            log.append({k: _spread(v, group_size) for k, v in parts.items()})
        return total

    return reward_fn


def _spread(values: list[float], group: int) -> dict:
    t = torch.tensor(values).reshape(-1, group)  # (prompts, G)
    return {"mean": float(t.mean()), "within_group_std": float(t.std(-1, unbiased=False).mean())}


def run_general_rl(model, orm, grm, cfg: GRPOConfig, kind: str = "hybrid", progress=None) -> dict:
    log: list = []
    reward_fn = make_reward(kind, orm, grm, cfg.seed, log, cfg.group_size)
    history = grpo_stage(model, general_rl_set(cfg.rl_set), reward_fn, cfg, progress)
    for h, parts in zip(history, log):
        h["components"] = parts
    return {"history": history, "reward": kind}


def style_report(model, grm, orm, examples, max_new_tokens: int = 40) -> dict:
    """What a general-RL run did to the held-out instructions (greedy answers): pass rate, style, ORM score,
    length, flaw shares (module docstring)."""
    turns = answer_turns(model, examples, max_new_tokens, temperature=0.0)
    answers = [t["msg"]["content"] or "" for t in turns]
    w = [words(a.lower()) for a in answers]
    stems = [f.split("{")[0].strip().lower() for f in FORMULAS]
    return {
        "instruction": sum(instruction_pass(e, t["msg"]) for e, t in zip(examples, turns)) / len(turns),
        "style": sum(grm_expected(grm, examples, answers)) / len(turns),
        "orm": sum(orm_scores(orm, examples, answers)) / len(turns),
        "mean_tokens": sum(len(t["ids"]) for t in turns) / len(turns),
        "filler": sum(any(x.strip(".,!\"") in FILLERS for x in ws) for ws in w) / len(turns),
        "repeated_word": sum(len(ws) != len(set(x.strip(".,!\"") for x in ws)) for ws in w) / len(turns),
        "formulaic": sum(any(a.lower().strip('"').startswith(s) for s in stems if s) or " is a very " in a.lower()
                         for a in answers) / len(turns),
        "distinct_answers": len(set(answers)) / len(turns),
        "examples": answers[:6],
    }


def compare_rewards(start, orm, grm, cfg: GRPOConfig, eval_examples, kinds=REWARDS, progress=None) -> dict:
    """A run of ``cfg`` from ``start`` (not modified) with each reward in ``kinds``; the report of each, and the
    reward spreads during training."""
    out = {"before": style_report(start, grm, orm, eval_examples, cfg.max_new_tokens), "runs": {}}
    for kind in kinds:
        model = copy.deepcopy(start)
        res = run_general_rl(model, orm, grm, cfg, kind, progress)
        comps = [h["components"] for h in res["history"]]
        spread = {k: sum(c[k]["within_group_std"] for c in comps) / len(comps) for k in comps[0]} if comps else {}
        out["runs"][kind] = {**style_report(model, grm, orm, eval_examples, cfg.max_new_tokens),
                             "train_reward": [h["reward"] for h in res["history"]], "reward_spread": spread}
        del model
    return out
