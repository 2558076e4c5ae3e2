"""The agentic task: multi-turn tool use in GLM-5's chat template, with a catalog lookup and a calculator.

A task asks for the total price (or weight) of one to three items of a catalog. The tools (OpenAI format, rendered
by chat.py into the system prompt):
    lookup(key)   the item's catalog record: "item: apple\\nprice: 23\\nweight: 41\\ncolor: red\\n..." with its
                  fields in random order, 3-7 of them (long-horizon variant: 12-14, a long tool result); an
                  unknown key gives "error: no item named ..."
    calc(expr)    evaluates + - * on integers (a parser, never eval); anything else gives "error: ..."
A correct episode (interleaved thinking: a short note before every call, kept within the chain):
    assistant  <think>Look up apple.</think> lookup(key=apple)
    tool       item: apple ... price: 23 ...
    assistant  <think>apple price 23. Look up fig.</think> lookup(key=fig)
    tool       item: fig ... price: 41 ...
    assistant  <think>fig price 41. Add 23+41.</think> calc(expr=23+41)
    tool       64
    assistant  <think>The total is 64.</think>64
Reward 1 iff the final answer is the total. The notes carry the values forward, so folding old tool results
(context.py, keep-recent-k) loses nothing the episode still needs. The long-horizon variant (context.py) asks for
6-8 items with long records, so that its full history exceeds the model's trained context.

Choices (the paper's agentic tasks are software engineering, terminal and search): a catalog of 24 item names,
values 10-60 (so every sum of up to 8 stays below 500), one tool call per turn, at most 2 + 2 x items turns.
"""

from __future__ import annotations

import random
import re

from glm5_ref.apps.post_train.tasks import Example, sample

ITEMS = ("apple", "pear", "fig", "plum", "lemon", "mango", "grape", "melon", "kiwi", "peach", "olive", "onion",
         "carrot", "bean", "rice", "salt", "honey", "butter", "cheese", "egg", "milk", "bread", "tea", "jam")
COLORS = ("red", "green", "blue", "brown", "white", "black", "yellow", "orange")
EXTRA = ("color", "shelf", "stock", "origin", "code", "rating", "batch", "aisle", "supplier", "size", "grade",
         "season", "box", "label")
FIELDS = ("price", "weight")
TOOLS = [
    {"type": "function", "function": {"name": "lookup", "description": "Catalog record of an item.",
                                      "parameters": {"type": "object", "properties": {"key": {"type": "string"}},
                                                     "required": ["key"]}}},
    {"type": "function", "function": {"name": "calc", "description": "Integer arithmetic with + - *.",
                                      "parameters": {"type": "object", "properties": {"expr": {"type": "string"}},
                                                     "required": ["expr"]}}},
]


def _extra_value(name: str, rng: random.Random) -> str:
    if name == "color":
        return rng.choice(COLORS)
    if name in ("shelf", "aisle", "box", "code", "batch", "label"):
        return rng.choice("ABCDEFGH") + str(rng.randint(1, 9))
    if name in ("origin", "supplier", "season", "grade", "size"):
        return rng.choice(("north", "south", "east", "west", "local", "small", "large", "high", "low"))
    return str(rng.randint(1, 99))


def make_record(item: str, rng: random.Random, extras: int) -> tuple[str, dict[str, int]]:
    """(record text, {"price": p, "weight": w}) with ``extras`` other fields, in random order."""
    values = {f: rng.randint(10, 60) for f in FIELDS}
    fields = [(f, str(v)) for f, v in values.items()] + [(e, _extra_value(e, rng)) for e in rng.sample(EXTRA, extras)]
    rng.shuffle(fields)
    return "\n".join([f"item: {item}"] + [f"{k}: {v}" for k, v in fields]), values


def agentic_example(rng: random.Random, n_items: int | None = None, extras: tuple[int, int] = (3, 7)) -> Example:
    """A catalog question over 1-3 items (or ``n_items``), records with ``extras`` other fields (a range)."""
    n = n_items or rng.choice((1, 2, 2, 3, 3))
    items = rng.sample(ITEMS, n)
    field = rng.choice(FIELDS)
    catalog, values = {}, {}
    for it in items:
        catalog[it], v = make_record(it, rng, rng.randint(*extras))
        values[it] = v[field]
    total = sum(values.values())
    names = items[0] if n == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    q = f"What is the {'total ' if n > 1 else ''}{field} of {names}?"
    demo, note = [], f"Look up {items[0]}."
    for k, it in enumerate(items):
        demo.append(_call(note, "lookup", {"key": it}))
        demo.append({"role": "tool", "content": catalog[it]})
        note = f"{it} {field} {values[it]}." + (f" Look up {items[k + 1]}." if k + 1 < n else "")
    if n > 1:
        expr = "+".join(str(values[it]) for it in items)
        demo.append(_call(note + f" Add {expr}.", "calc", {"expr": expr}))
        demo.append({"role": "tool", "content": str(total)})
        note = f"The total is {total}."
    demo.append({"role": "assistant", "reasoning_content": note, "content": str(total)})
    key = q + "|" + "|".join(catalog[it] for it in items)
    return Example("agentic", [{"role": "user", "content": q}], str(total), demo, True, TOOLS,
                   info={"key": key, "items": items, "field": field, "catalog": catalog, "values": values})


def _call(note: str, name: str, args: dict) -> dict:
    return {"role": "assistant", "reasoning_content": note, "content": "",
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}}]}


def sft_agentic(rng: random.Random) -> Example:
    return sample(agentic_example, rng, "train")


# ---- the environment ----------------------------------------------------------------------------------------
_EXPR = re.compile(r"\s*\d+(\s*[-+*]\s*\d+)*\s*")


def calc(expr: str) -> str:
    """+ - * on non-negative integer literals, left to right with * first; "error: ..." otherwise."""
    if not isinstance(expr, str) or not _EXPR.fullmatch(expr) or len(expr) > 64:
        return f"error: cannot evaluate {str(expr)[:32]!r}"
    terms, sign, total = re.findall(r"\d+|[-+*]", expr), 1, 0
    prod = None
    for tok in terms + ["+"]:
        if tok.isdigit():
            prod = int(tok) if prod is None else prod * int(tok)
        elif tok == "*":
            continue
        else:
            total += sign * (prod or 0)
            sign, prod = (1 if tok == "+" else -1), None
    return str(total)


def execute(ex: Example, call: dict) -> str:
    """The tool result for one parsed call ({"type": "function", "function": {"name", "arguments"}})."""
    import json

    fn = call.get("function", {})
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except json.JSONDecodeError:
        return "error: arguments are not valid JSON"
    if not isinstance(args, dict):
        return "error: arguments must be an object"
    if fn.get("name") == "lookup":
        key = str(args.get("key", "")).strip()
        return ex.info["catalog"].get(key, f"error: no item named {key[:24]!r}")
    if fn.get("name") == "calc":
        return calc(str(args.get("expr", "")))
    return f"error: unknown tool {str(fn.get('name'))[:24]!r}"


def agentic_reward(ex: Example, msg: dict) -> float:
    """1 iff the final answer (content of the turn with no tool call) is the total."""
    return float(not msg.get("tool_calls") and (msg.get("content") or "").strip() == ex.answer)
