"""The evaluation every stage gets: one row of the stage-by-skill matrix, on the held-out sets (tasks.py), greedy.

    reasoning     accuracy on held-out reasoning questions (thinking on)
    agentic       success rate of held-out catalog episodes (multi-turn, tools, interleaved thinking)
    instruction   the share of held-out instructions whose answer satisfies every constraint (thinking off)
    style         the generative reward model's expected score / 9 for those answers, reading the topic's
                  human-written anchor (rewards.grm_expected): "reward-model score" in [0, 1]
    mean_tokens   the mean length in tokens of those answers (stop token included): the verbose drift
    reasoning_sampled   reasoning accuracy of one sample at temperature 1 (the distribution RL trains)
Greedy decoding makes a row a deterministic function of the weights, so two stages differ only where their models
do (the evaluation sets are fixed by their seeds). Sizes are in ``EvalConfig``; the standard error of an accuracy p
on n questions is sqrt(p (1 - p) / n): 4.4 points at p = 0.5, n = 128; 8.8 points for the 32 agentic episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm5_ref.apps.post_train.rewards import grm_expected
from glm5_ref.apps.post_train.rollout import answer_turns, run_episodes
from glm5_ref.apps.post_train.tasks import fixed_set, general_example, instruction_pass, reasoning_example, reasoning_reward
from glm5_ref.apps.post_train.tools import agentic_example, agentic_reward, execute

SKILLS = ("reasoning", "agentic", "instruction", "style", "mean_tokens")


@dataclass
class EvalConfig:
    reasoning: int = 128
    agentic: int = 32
    general: int = 96
    reasoning_sampled: int = 64  # the first questions of the reasoning set, one sample each at temperature 1
    reasoning_tokens: int = 64
    agentic_tokens: int = 56     # per turn (the longest correct turn is ~41 tokens)
    general_tokens: int = 40     # (the longest correct answer is ~33 tokens: uppercase splits finely)
    seed: int = 7


def eval_sets(cfg: EvalConfig) -> dict:
    return {"reasoning": fixed_set(reasoning_example, cfg.reasoning, "eval", cfg.seed),
            "agentic": fixed_set(agentic_example, cfg.agentic, "eval", cfg.seed + 1),
            "general": fixed_set(general_example, cfg.general, "eval", cfg.seed + 2)}


def evaluate_policy(model, grm, cfg: EvalConfig, sets: dict | None = None) -> dict:
    """One row of the matrix (module docstring)."""
    sets = sets or eval_sets(cfg)
    model.eval()
    r = answer_turns(model, sets["reasoning"], cfg.reasoning_tokens, temperature=0.0)
    rs = answer_turns(model, sets["reasoning"][:cfg.reasoning_sampled], cfg.reasoning_tokens, temperature=1.0,
                      seed=cfg.seed)
    eps = run_episodes(model, sets["agentic"], execute, agentic_reward, max_new_tokens=cfg.agentic_tokens,
                       temperature=0.0, prefix="eval-")
    g = answer_turns(model, sets["general"], cfg.general_tokens, temperature=0.0)
    answers = [t["msg"]["content"] or "" for t in g]
    n_r, n_g = len(r), len(g)
    return {
        "reasoning": sum(reasoning_reward(t["example"], t["msg"]) for t in r) / n_r,
        "agentic": sum(e["reward"] for e in eps) / len(eps),
        "instruction": sum(instruction_pass(t["example"], t["msg"]) for t in g) / n_g,
        "style": sum(grm_expected(grm, sets["general"], answers)) / n_g if grm is not None else None,
        "mean_tokens": sum(len(t["ids"]) for t in g) / n_g,
        "reasoning_sampled": sum(reasoning_reward(t["example"], t["msg"]) for t in rs) / len(rs),
        "reasoning_tokens": sum(len(t["ids"]) for t in r) / n_r,
        "agentic_turns": sum(e["turns"] for e in eps) / len(eps),
        "samples": {"reasoning": _show(r[0]), "general": _show(g[0]), "agentic": eps[0]["messages"][-1]},
    }


def _show(turn: dict) -> dict:
    return {"question": turn["example"].question, "answer": turn["msg"]}
