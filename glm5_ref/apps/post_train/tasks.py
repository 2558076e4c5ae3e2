"""The classroom post-training tasks: three families, synthetic, offline, seeded, each with a verifier and a held-out
evaluation set (GLM-5 report section 3: SFT, reasoning RL, agentic RL, general RL).

    reasoning   multi-step arithmetic ("Compute 4 + 3 - 5 + 8.") or "what does this short Python snippet print"
                (a chain of assignments); the worked reasoning goes inside <think> ("4 + 3 = 7\\n7 - 5 = 2 ...");
                binary reward: the answer is exactly the value. Operands 1-9, every intermediate value in 0-30,
                2-4 steps: a few hundred addition/subtraction facts that a 16M model learns only partly in SFT.
    agentic     multi-turn tool use (tools.py): look items up in a catalog (records of several fields, long
                ones too), add with the calculator, answer; reward: the answer is the total.
    general     instructions with rule-checkable constraints (exactly N words, lowercase / uppercase, end with
                "!" or ".", wrap in double quotes) about a topic, plus a style quality no rule checks (judged by
                the reward models, rewards.py, against the human-written anchors of anchors.py).

Every example is a chat (``messages`` for chat.render) with a verifier and, for SFT, a demonstration (the
assistant messages of a correct solution). The held-out set: an example belongs to the evaluation split iff a
hash of its canonical key (the question, with the catalog for agentic tasks) is 0 mod 5; the training generators
reject those, so no evaluation question is ever trained on. Thinking modes per family (choices; the paper gives
none): reasoning and agentic turns think (agentic: interleaved, a short note before every tool call), general
instructions answer with thinking off (turn-level thinking, ``enable_thinking=False``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from glm5_ref.apps.post_train.anchors import ANCHORS, TOPICS, words

FAMILIES = ("reasoning", "agentic", "general")
SPLITS = ("train", "eval")


@dataclass
class Example:
    family: str                       # "reasoning" | "agentic" | "general"
    messages: list[dict]              # the prompt: the conversation so far, ending with the user message
    answer: str                       # the reference final answer
    demo: list[dict]                  # a correct solution: the assistant (and tool) messages after ``messages``
    enable_thinking: bool = True      # the generation prompt opens <think> (or closes it)
    tools: list[dict] | None = None   # tool schemas (agentic)
    info: dict = field(default_factory=dict)  # what the verifier and the environment need

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


def in_eval_split(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 5 == 0


def sample(make, rng: random.Random, split: str):
    """Draw from the generator ``make(rng)`` until the example falls in ``split`` ("train" or "eval")."""
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    while True:
        ex = make(rng)
        if in_eval_split(ex.info["key"]) == (split == "eval"):
            return ex


def fixed_set(make, n: int, split: str, seed: int) -> list:
    """``n`` examples of one family and split, the same for a seed (evaluation sets, RL prompt sets)."""
    rng = random.Random(seed)
    return [sample(make, rng, split) for _ in range(n)]


# ---- reasoning -------------------------------------------------------------------------------------------------
def _steps(rng: random.Random, n: int, start: int, lo: int = 0, hi: int = 30) -> list[tuple[str, int, int]]:
    """n operations (op, operand, result) from ``start``, every result in [lo, hi]."""
    out, v = [], start
    for _ in range(n):
        while True:
            op, k = rng.choice("+-"), rng.randint(1, 9)
            r = v + k if op == "+" else v - k
            if lo <= r <= hi:
                break
        out.append((op, k, r))
        v = r
    return out


def reasoning_example(rng: random.Random) -> Example:
    """Arithmetic or a snippet trace, 2-4 steps, operands 1-9, values 0-30."""
    n = rng.randint(2, 4)
    start = rng.randint(1, 9)
    if rng.random() < 0.5:  # arithmetic
        steps = _steps(rng, n, start)
        q = f"Compute {start}" + "".join(f" {op} {k}" for op, k, _ in steps) + "."
        lines, v = [], start
        for op, k, r in steps:
            lines.append(f"{v} {op} {k} = {r}")
            v = r
        value, kind = v, "arith"
    else:  # snippet: a chain of assignments, each reading one or two earlier variables
        names = "abcdefg"
        vals = {"a": start}
        code, lines = [f"a = {start}"], [f"a = {start}"]
        for i in range(1, n + 1):
            x = names[i]
            y = rng.choice(list(vals))
            if rng.random() < 0.3 and len(vals) > 1:  # x = y + z
                z = rng.choice([v for v in vals if v != y])
                if vals[y] + vals[z] <= 30:
                    vals[x] = vals[y] + vals[z]
                    code.append(f"{x} = {y} + {z}")
                    lines.append(f"{x} = {vals[y]} + {vals[z]} = {vals[x]}")
                    continue
            (op, k, r), = _steps(rng, 1, vals[y])
            vals[x] = r
            code.append(f"{x} = {y} {op} {k}")
            lines.append(f"{x} = {vals[y]} {op} {k} = {r}")
        last = names[n]
        q = "What does this code print?\n```python\n" + "\n".join(code) + f"\nprint({last})\n```"
        value, kind = vals[last], "trace"
    demo = [{"role": "assistant", "reasoning_content": "\n".join(lines), "content": str(value)}]
    return Example("reasoning", [{"role": "user", "content": q}], str(value), demo, True,
                   info={"key": q, "kind": kind, "steps": n})


def reasoning_reward(ex: Example, msg: dict) -> float:
    """1 iff the parsed answer (content) is exactly the value."""
    return float((msg.get("content") or "").strip() == ex.answer)


# ---- general: instructions with rule-checkable constraints ------------------------------------------------------
CASES = {"lower": "all lowercase", "upper": "all uppercase"}
ENDS = {"!": "ending with an exclamation mark", ".": "ending with a period", "quote": "wrapped in double quotes"}


def apply_constraints(text: str, case: str | None, end: str | None) -> str:
    """Transform an answer's casing and punctuation (its words stay) to satisfy the constraints."""
    if case == "lower":
        text = text.lower()
    elif case == "upper":
        text = text.upper()
    core = text.rstrip(".!")
    if end == "quote":
        return f'"{core}."'
    if end in ("!", "."):
        return core + end
    return text


def general_example(rng: random.Random, n_words: int | None = None, anchored: bool = False) -> Example:
    """A topic with 1-3 constraints (always a word count). ``anchored``: the word count is that of one of the
    topic's anchors, whose transformed text is the demonstration (SFT); otherwise 2-8 words, any."""
    topic = rng.choice(TOPICS)
    anchor = rng.choice(ANCHORS[topic])
    n = len(words(anchor)) if anchored else (n_words or rng.randint(2, 8))
    case = rng.choice([None, "lower", "upper"])
    end = rng.choice([None, "!", ".", "quote"])
    parts = [f"in exactly {n} word{'s' if n > 1 else ''}"] + ([CASES[case]] if case else []) + (
        [ENDS[end]] if end else [])
    q = f"Write about {topic} " + ", ".join(parts) + "."
    demo_text = apply_constraints(anchor, case, end) if len(words(anchor)) == n else ""
    return Example("general", [{"role": "user", "content": q}], demo_text,
                   [{"role": "assistant", "content": demo_text}] if demo_text else [], False,
                   info={"key": q, "topic": topic, "n_words": n, "case": case, "end": end})


def constraint_checks(ex: Example, text: str) -> dict[str, bool]:
    """Each constraint of a general example on an answer's text: {"words": ..., "case": ..., "end": ...}."""
    info, text = ex.info, (text or "").strip()
    out = {"words": len(words(text)) == info["n_words"]}
    letters = [c for c in text if c.isalpha()]
    if info["case"] == "lower":
        out["case"] = bool(letters) and all(c.islower() for c in letters)
    elif info["case"] == "upper":
        out["case"] = bool(letters) and all(c.isupper() for c in letters)
    if info["end"] == "quote":
        out["end"] = len(text) > 2 and text[0] == '"' and text[-1] == '"'
    elif info["end"] is not None:
        out["end"] = text.endswith(info["end"]) and not text.endswith(("..", "!!"))
    return out


def rule_reward(ex: Example, msg: dict) -> float:
    """The rule-based reward: the fraction of constraints the answer satisfies."""
    checks = constraint_checks(ex, msg.get("content") or "")
    return sum(checks.values()) / len(checks)


def instruction_pass(ex: Example, msg: dict) -> bool:
    """Every constraint satisfied (the evaluation's pass rate)."""
    return all(constraint_checks(ex, msg.get("content") or "").values())


def sft_general(rng: random.Random) -> Example:
    """A training general example with a demonstration (anchored word count)."""
    return sample(lambda r: general_example(r, anchored=True), rng, "train")
