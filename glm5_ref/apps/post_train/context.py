"""Agent context management (GLM-5 report section 4.2.4): keep-recent-k and hierarchical discard-all, measured on a
long-horizon variant of the agentic task whose full history exceeds the model's trained context.

A trajectory is (q, r_1, a_1, o_1, ..., r_n, a_n, o_n): reasoning, action (tool call), observation (tool result).
    keep-recent-k   fold the observations older than the k most recent rounds:
                    o_i <- "Tool result is omitted to save tokens."  for i = 1 .. n - k;  r_i and a_i stay.
    discard-all     drop the whole tool-call history: restart from the question (DeepSeek-V3.2).
    hierarchical    keep-recent-k always; when the (folded) context still exceeds T, discard-all.
The paper: k = 5, T = 32K on a 200K-token model; BrowseComp 55.3% -> 62.0% (keep-recent-5) -> 75.9 (hierarchical).

Here (choices, scaled down): the agent's window W = 1,024 tokens, the longest context the classroom model ever
trained on (the base's mid-training; post-training sequences stay under 768). A prompt longer than W ends the
episode as a failure (chat.render's ValueError: the model cannot be called with it), the hard form of "accuracy
degrades under extremely long contexts". k = 2 (the episodes have 6-8 rounds, not hundreds), T = 896 (7/8 W).
The long-horizon task asks for the total of 6-8 items whose records have 12-14 fields (~110 tokens each): the full
history is 1,200-1,600 tokens; folded it is ~700-900. The notes in the reasoning ("fig price 41.") carry every
value the final sum needs, so folding loses nothing; discard-all does (the episode starts over), which is why
hierarchical management only helps where the folded context itself outgrows T. Episodes are greedy, so the
three strategies see the same model decisions until their contexts differ.
"""

from __future__ import annotations

import random

from glm5_ref.chat import render
from glm5_ref.apps.post_train.tasks import fixed_set

PLACEHOLDER = "Tool result is omitted to save tokens."
WINDOW = 1024
KEEP = 2
THRESHOLD = 896
STRATEGIES = ("none", "keep-recent-k", "hierarchical")


def _rounds(messages: list[dict]) -> list[list[int]]:
    """Indices of the tool messages of each round (a round: one assistant turn's tool results)."""
    rounds, current = [], []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            current.append(i)
        elif current:
            rounds.append(current)
            current = []
    return rounds + ([current] if current else [])


def keep_recent_k(messages: list[dict], k: int = KEEP) -> list[dict]:
    """Fold every tool result older than the ``k`` most recent rounds into the placeholder (module docstring)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k: expected an integer >= 0, got {k!r}")
    rounds = _rounds(messages)
    fold = {i for r in rounds[:max(0, len(rounds) - k)] for i in r}
    return [{**m, "content": PLACEHOLDER} if i in fold else m for i, m in enumerate(messages)]


def discard_all(messages: list[dict]) -> list[dict]:
    """Restart from the question: everything up to and including the last user message, nothing after."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return list(messages[:last_user + 1])


def hierarchical(messages: list[dict], tools=None, k: int = KEEP, threshold: int = THRESHOLD) -> list[dict]:
    """keep-recent-k; discard-all when the folded context (with its generation prompt) exceeds ``threshold``."""
    folded = keep_recent_k(messages, k)
    n = len(render(folded, tools, add_generation_prompt=True).ids)
    return discard_all(messages) if n > threshold else folded


def long_horizon_example(rng: random.Random):
    from glm5_ref.apps.post_train.tools import agentic_example

    return agentic_example(rng, n_items=rng.randint(6, 8), extras=(12, 14))


def long_horizon_set(n: int, seed: int = 4242):
    return fixed_set(long_horizon_example, n, "eval", seed)


def measure_context_management(model, n: int = 12, seed: int = 4242, window: int = WINDOW, k: int = KEEP,
                               threshold: int = THRESHOLD, max_new_tokens: int = 80) -> dict:
    """Success rate of each strategy on ``n`` long-horizon episodes (greedy), with the facts behind it."""
    from glm5_ref.apps.post_train.rollout import run_episodes
    from glm5_ref.apps.post_train.tools import agentic_reward, execute

    examples = long_horizon_set(n, seed)
    full = [len(render(ex.messages + ex.demo, ex.tools).ids) for ex in examples]
    folded = [len(render(keep_recent_k(ex.messages + ex.demo, k), ex.tools).ids) for ex in examples]
    restarts = [0]

    def hcm(m):
        new = hierarchical(m, examples[0].tools, k, threshold)
        restarts[0] += int(len(new) < len(m) and new == discard_all(m))
        return new

    manage = {"none": None, "keep-recent-k": lambda m: keep_recent_k(m, k), "hierarchical": hcm}
    out = {"window": window, "k": k, "threshold": threshold, "episodes": n,
           "full_history_tokens": sum(full) / n, "folded_history_tokens": sum(folded) / n, "strategies": {}}
    for name in STRATEGIES:
        res = run_episodes(model, examples, execute, agentic_reward, max_new_tokens=max_new_tokens, temperature=0.0,
                           seed=seed, max_turns=3 + 2 * 8, window=window, manage=manage[name], prefix=f"cm-{name}-")
        out["strategies"][name] = {"success": sum(r["reward"] for r in res) / n,
                                   "overflow": sum(r["overflow"] for r in res) / n,
                                   "mean_turns": sum(r["turns"] for r in res) / n,
                                   "discard_all_restarts": restarts[0] if name == "hierarchical" else 0}
    return out
