"""GLM-5's chat template: one renderer and one parser, the single source of truth for SFT, RL and serving.

The format (the GLM-4.7 family's Jinja template, which GLM-5 ships; ../shared/reference/post_training_sources.md
sections 1.2-1.7; GLM-5 report section 3.1 for the three thinking modes). No newline after a role token and no
end-of-turn token: a turn ends where the next role token (or <|endoftext|>) begins.

    [gMASK]<sop>
    tools     <|system|>\\n# Tools\\n\\n ... <tools>\\n{one JSON per tool}\\n</tools>\\n\\n ... (the call format)
    system    <|system|>{text}
    user      <|user|>{text}
    assistant <|assistant|><think>{reasoning}</think>{content}<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>...
              or, where the reasoning is not kept: <|assistant|></think>{content}...
    tool      <|observation|> (once per run of consecutive tool messages) <tool_response>{text}</tool_response>
    prompt    <|assistant|><think>   (or <|assistant|></think> with enable_thinking=False)

Argument values V are written verbatim when they are strings, as JSON otherwise.

The three thinking modes
    interleaved (default, clear_thinking=True): an assistant turn keeps its reasoning only after the LAST user
                message (the current tool-call chain); earlier turns collapse to a bare </think>. So the rendered
                prompt is NOT append-only across user turns: a new user message deletes earlier reasoning, and a
                TITO trajectory must start a new sample at each user turn (tito.py).
    preserved   (clear_thinking=False): every assistant turn keeps its reasoning; append-only.
    turn-level  (enable_thinking per request): the generation prompt opens <think> or closes it at once; a
                no-thinking turn in history is an assistant message without reasoning (a bare </think>).

SFT mask (``Rendered.train_mask``, one flag per id): trained are an assistant turn's reasoning, the </think> that
closes it, its content, its tool calls, and the token that ends the turn (the next message's role token, or the
<|endoftext|> that ``render(..., for_training=True)`` appends after a final assistant turn). Not trained: [gMASK]
<sop>, the system, tools, user and tool messages, the role token <|assistant|>, <think>, and a bare </think> (it is
the scaffold of a non-thinking turn: the generation prompt already holds it). An assistant message with
``"train": False`` is rendered but masked out (paper 3.1: "erroneous segments within trajectories are retained but
masked out in the loss function").

Choices where the sources are silent: content=None renders as "" (the Jinja prints "None"); tool results that are
not strings are written as JSON; the parser reads an argument value back as JSON when it parses as JSON and the
tool's schema (if given) does not declare it a string, else as the string.
Not handled: images, GLM-5.1's unwrapped tools, Reasoning Effort lines, streaming parses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from glm5_ref.tokenizer import SPECIAL_TOKENS, decode, encode

ROLES = ("system", "user", "assistant", "tool")
TOOLS_HEADER = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
TOOLS_FOOTER = ("</tools>\n\nFor each function call, output the function name and arguments within the following XML "
                "format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
                "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>")


@dataclass
class Rendered:
    text: str               # the exact string
    ids: list[int]          # its token ids (special tokens one id each; message text never produces them)
    train_mask: list[bool]  # per id: does SFT train on it


class _Builder:
    def __init__(self):
        self.text, self.ids, self.mask = [], [], []

    def special(self, name: str, trained: bool = False) -> None:
        self.text.append(name)
        self.ids.append(SPECIAL_TOKENS[name])
        self.mask.append(trained)

    def plain(self, text: str, trained: bool = False, scaffold: bool = False) -> None:
        """Message text (never special tokens), or the template's own scaffold (whose tags are special)."""
        if text:
            ids = encode(text, allow_special=scaffold)
            self.text.append(text)
            self.ids += ids
            self.mask += [trained] * len(ids)

    def result(self) -> Rendered:
        return Rendered("".join(self.text), self.ids, self.mask)


def _arguments(call: dict, index: int) -> tuple[str, dict]:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(f"messages[{index}]: a tool call needs a function name, got {call!r}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"messages[{index}]: tool call {fn['name']!r}: arguments are not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"messages[{index}]: tool call {fn['name']!r}: arguments must be a JSON object, got "
                         f"{type(args).__name__}")
    return fn["name"], args


def _check(messages, tools) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages: expected a list of message dicts, got {type(messages).__name__}")
    if tools is not None and (not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError("tools: expected a list of tool dicts (OpenAI format), got "
                         f"{type(tools).__name__}")
    open_calls = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"messages[{i}]: unknown role {role!r}; expected one of {ROLES}")
        if m["role"] == "assistant":
            open_calls = len(m.get("tool_calls") or [])
        elif m["role"] == "tool":
            if open_calls == 0:
                raise ValueError(f"messages[{i}]: a tool message with no preceding assistant tool call to answer")
            open_calls -= 1
        else:
            open_calls = 0


def render(messages, tools=None, *, add_generation_prompt: bool = False, enable_thinking: bool = True,
           clear_thinking: bool = True, for_training: bool = False, max_tokens: int | None = None) -> Rendered:
    """The conversation in GLM-5's template (module docstring). ``max_tokens``: refuse a rendering longer than the
    model's context (ValueError naming the first message that does not fit)."""
    _check(messages, tools)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    b = _Builder()
    b.special("[gMASK]")
    b.special("<sop>")
    if tools:
        b.special("<|system|>")
        b.plain(TOOLS_HEADER + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + TOOLS_FOOTER,
                scaffold=True)
    ends: list[int] = []  # where each message ends in ids, for the length check
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content")
        text = "" if content is None else content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
        # the role token that opens this message ends the assistant turn before it: the model learns to emit it
        ends_turn = i > 0 and messages[i - 1]["role"] == "assistant" and messages[i - 1].get("train", True)
        if role in ("system", "user"):
            b.special(f"<|{role}|>", trained=ends_turn)
            b.plain(text)
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                b.special("<|observation|>", trained=ends_turn)
            b.special("<tool_response>")
            b.plain(text)
            b.special("</tool_response>")
        else:
            _assistant(b, m, i, keep=not clear_thinking or i > last_user, ends_turn=ends_turn)
        ends.append(len(b.ids))
    if add_generation_prompt:
        b.special("<|assistant|>")
        b.special("<think>" if enable_thinking else "</think>")
    elif for_training and messages and messages[-1]["role"] == "assistant":
        b.special("<|endoftext|>", trained=messages[-1].get("train", True))
    out = b.result()
    if max_tokens is not None and len(out.ids) > max_tokens:
        first = next((i for i, e in enumerate(ends) if e > max_tokens), len(messages) - 1)
        raise ValueError(f"messages[{first}]: the conversation is {len(out.ids)} tokens, longer than the context "
                         f"of {max_tokens} (it stops fitting at this message)")
    return out


def _assistant(b: _Builder, m: dict, i: int, keep: bool, ends_turn: bool = False) -> None:
    train = m.get("train", True)
    content = m.get("content") or ""
    reasoning = m.get("reasoning_content")
    if reasoning is None and "</think>" in content:  # reasoning written inline: split it out
        reasoning, content = content.split("</think>", 1)
        reasoning = reasoning.replace("<think>", "")
    b.special("<|assistant|>", trained=ends_turn)
    if keep and reasoning and reasoning.strip():
        b.special("<think>")
        b.plain(reasoning.strip(), trained=train)
        b.special("</think>", trained=train)
    else:
        b.special("</think>")
    b.plain(content.strip(), trained=train)
    for call in m.get("tool_calls") or []:
        name, args = _arguments(call, i)
        b.special("<tool_call>", trained=train)
        b.plain(name, trained=train)
        for k, v in args.items():
            b.special("<arg_key>", trained=train)
            b.plain(str(k), trained=train)
            b.special("</arg_key>", trained=train)
            b.special("<arg_value>", trained=train)
            b.plain(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False), trained=train)
            b.special("</arg_value>", trained=train)
        b.special("</tool_call>", trained=train)


_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def parse(generated, tools=None) -> dict:
    """A generated assistant turn (the text or ids after the generation prompt) -> {"content",
    "reasoning_content", "tool_calls"} in the OpenAI format (arguments as a JSON string)."""
    text = decode(generated) if isinstance(generated, (list, tuple)) else generated
    if not isinstance(text, str):
        raise ValueError(f"generated: expected a string or a list of token ids, got {type(generated).__name__}")
    for stop in _STOPS:
        text = text.split(stop, 1)[0]
    reasoning = None
    if "</think>" in text:
        reasoning, text = text.split("</think>", 1)
        reasoning = reasoning.replace("<think>", "").strip() or None
    strings = {t.get("function", t).get("name"): {k for k, p in t.get("function", t).get("parameters", {})
                                                  .get("properties", {}).items() if p.get("type") == "string"}
               for t in tools or []}
    calls = []
    for body in _CALL.findall(text):
        name = body.split("<arg_key>", 1)[0].strip()
        args = {}
        for k, v in _ARG.findall(body):
            args[k] = v if k in strings.get(name, set()) else _json_or_str(v)
        calls.append({"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
    content = _CALL.sub("", text).strip()
    return {"content": content, "reasoning_content": reasoning, "tool_calls": calls}


def _json_or_str(v: str):
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v
