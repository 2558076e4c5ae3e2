"""Token-in-token-out (TITO) trajectories and the gateway that records them.

What it is (GLM-5 report section 4.1.2; glm5_spec.md section 8)
    The trainer must optimise exactly the actions the sampler took. A trajectory therefore stores
        ids[t]        every token id, exactly as sampled (model) or as the environment produced it,
        logprobs[t]   log pi_rollout(ids[t] | ids[:t]) for model tokens (the sampler's own number), 0 elsewhere,
        loss_mask[t]  1 for model-generated tokens, 0 for prompt and environment / observation tokens,
        versions[t]   the policy version that sampled a model token (-1 elsewhere),
    plus the rollout id. The gateway sits between the rollout code and the inference engine: every
    generation request goes through it, and it appends the returned ids and log-probs; environment output
    is appended as ids. Nothing is ever decoded and re-encoded.

    Why (the re-tokenization trap): a sampler can emit a non-canonical split of a string, e.g.
    [" ", "return"] (ids 32, 319) where the tokenizer would write [" return"] (id 581). decode() gives the
    same text, encode() gives different ids, and the stored log-probabilities now belong to tokens that no
    longer exist (``retokenization_trap``). ``first_divergence`` / ``mask_after_drift`` are the per-turn
    prefix check a text-based pipeline needs instead (slime trajectory manager, rllm PR #272).

Choices where the paper is silent
    * One lock guards the gateway's table and each append; appends for one rollout are atomic, so many
      threads can drive many rollouts at once (tested with N concurrent rollouts).
    * Generation requests trim everything after the first stop token (the model's generate repeats it).
    * A rollout id may be started once; finish/abort removes it, so a late append raises ValueError
      instead of silently creating a second copy.

Conversations in the chat template (``ChatConversation``; chat.py, GLM-5 section 3.1)
    GLM-5's template is append-only within a tool-call chain but, in the default interleaved mode, NOT across
    user turns: a new user message re-renders every earlier assistant turn without its reasoning. So
        interleaved (clear_thinking=True)   each user turn starts a new sample (Trajectory "<id>/0", "<id>/1", ...)
                                            whose prompt is the re-rendered history (earlier turns: loss_mask 0);
        preserved   (clear_thinking=False)  the new turn's ids are appended to the one sample (checked: the old
                                            rendering must be a prefix of the new one, else ValueError).
    Tool results are appended in both modes. The model's ids are never re-rendered: the template's delta (what
    the environment appends) is computed between two canonical renderings, and a role token the model already
    sampled as its stop token (<|observation|>, <|user|>) is not appended twice; any other stop token (e.g.
    <|endoftext|> before a new user turn in preserved mode) stays as sampled, followed by the full delta.
    Context management that rewrites history (folding old tool results) is a rewrite: ``rewrite`` starts a
    new sample from the managed messages, as a user turn does in interleaved mode.

Not handled: multimodal segments; branching (several continuations of one sample).
References: GLM-5 section 4.1.2; slime rollout/sglang_rollout.py and agent/trajectory.py; TRL issue #5224.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from glm5_ref.chat import parse, render
from glm5_ref.tokenizer import SPECIAL_TOKENS

PROMPT, MODEL, ENV = "prompt", "model", "env"
CHAT_STOPS = [SPECIAL_TOKENS[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]  # end an assistant turn


@dataclass
class Segment:
    kind: str                           # "prompt" | "model" | "env"
    ids: list[int]                      # token ids, as sampled / as produced
    logprobs: list[float] | None = None  # sampler log-probs (model segments only)
    version: int | None = None          # policy version that sampled it (model segments only)


@dataclass
class Trajectory:
    """A finished (or live) multi-turn rollout in TITO form. Per-token lists all have len(ids)."""
    rollout_id: str
    segments: list[Segment] = field(default_factory=list)
    reward: float | None = None
    failed: bool = False                # the environment crashed: never train on it
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return [i for s in self.segments for i in s.ids]

    @property
    def logprobs(self) -> list[float]:
        return [lp for s in self.segments for lp in (s.logprobs if s.kind == MODEL else [0.0] * len(s.ids))]

    @property
    def loss_mask(self) -> list[int]:
        return [int(s.kind == MODEL) for s in self.segments for _ in s.ids]

    @property
    def versions(self) -> list[int]:
        return [s.version if s.kind == MODEL else -1 for s in self.segments for _ in s.ids]

    @property
    def model_versions(self) -> list[int]:
        """w_0 <= ... <= w_k: the version of each generated segment, in order."""
        return [s.version for s in self.segments if s.kind == MODEL and s.ids]

    @property
    def num_generated(self) -> int:
        return sum(len(s.ids) for s in self.segments if s.kind == MODEL)

    def staleness(self, current_version: int) -> int:
        """w' - w_0: how many versions the oldest generated segment lags (0 with no generated token)."""
        versions = self.model_versions
        return current_version - versions[0] if versions else 0


class TITOGateway:
    """Records trajectories by appending ids; thread-safe. Typical use per rollout:
    start -> generate (model turn) -> record_environment (observation) -> generate ... -> finish."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict[str, Trajectory] = {}

    def start(self, rollout_id: str, prompt_ids: list[int], meta: dict | None = None) -> None:
        prompt_ids = _as_ids("prompt_ids", prompt_ids)
        if not prompt_ids:
            raise ValueError("prompt_ids: expected at least one token")
        with self._lock:
            if rollout_id in self._live:
                raise ValueError(f"rollout_id: {rollout_id!r} is already live")
            self._live[rollout_id] = Trajectory(rollout_id, [Segment(PROMPT, prompt_ids)], meta=dict(meta or {}))

    def _get(self, rollout_id: str) -> Trajectory:
        if rollout_id not in self._live:
            raise ValueError(f"rollout_id: {rollout_id!r} is not live (never started, finished or aborted)")
        return self._live[rollout_id]

    def ids(self, rollout_id: str) -> list[int]:
        with self._lock:
            return self._get(rollout_id).ids

    def record_generation(self, rollout_id: str, ids: list[int], logprobs: list[float], version: int) -> None:
        """Append sampled ids with the sampler's log-probs, as returned by the engine."""
        ids = _as_ids("ids", ids)
        logprobs = [float(x) for x in logprobs]
        if len(logprobs) != len(ids):
            raise ValueError(f"logprobs: expected {len(ids)} values (one per id), got {len(logprobs)}")
        if any(x != x or x > 0 for x in logprobs):
            raise ValueError("logprobs: expected log-probabilities (<= 0, not NaN)")
        with self._lock:
            self._get(rollout_id).segments.append(Segment(MODEL, ids, logprobs, int(version)))

    def record_environment(self, rollout_id: str, ids: list[int]) -> None:
        """Append environment / observation ids (loss_mask 0)."""
        ids = _as_ids("ids", ids)
        with self._lock:
            self._get(rollout_id).segments.append(Segment(ENV, ids))

    @torch.no_grad()
    def generate(self, rollout_id: str, model, version: int, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, stop_tokens: list[int] | None = None, seed: int | None = None) -> list[int]:
        """Intercept one generation request: run ``model.generate`` on the rollout's ids, record the sampled
        ids and their log-probs (cut after the first stop token), return the new ids."""
        context = self.ids(rollout_id)
        x = torch.tensor([context], dtype=torch.long, device=next(model.parameters()).device)
        out, lps = model.generate(x, max_new_tokens, temperature=temperature, top_p=top_p, stop_tokens=stop_tokens,
                                  seed=seed, return_logprobs=True)
        new, lps = trim_at_stop(out[0, len(context):].tolist(), lps[0].tolist(), stop_tokens)
        self.record_generation(rollout_id, new, lps, version)
        return new

    def finish(self, rollout_id: str, reward: float | None = None, failed: bool = False) -> Trajectory:
        with self._lock:
            traj = self._get(rollout_id)
            del self._live[rollout_id]
        traj.reward, traj.failed = reward, failed
        return traj

    def abort(self, rollout_id: str) -> None:
        """Discard a live rollout (its worker died): nothing of it is ever returned."""
        with self._lock:
            self._live.pop(rollout_id, None)

    def live(self) -> list[str]:
        with self._lock:
            return list(self._live)


def trim_at_stop(ids: list[int], logprobs: list[float], stop_tokens) -> tuple[list[int], list[float]]:
    """Cut sampled ids (and their log-probs) after the first stop token (model.generate repeats it)."""
    stops = set(stop_tokens or [])
    for k, tok in enumerate(ids):
        if tok in stops:
            return list(ids[:k + 1]), list(logprobs[:k + 1])
    return list(ids), list(logprobs)


def _as_ids(name: str, ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{name}: expected a list of int token ids, got {type(ids).__name__}")
    if any(i < 0 for i in ids):
        raise ValueError(f"{name}: expected non-negative token ids")
    return list(ids)


# ---- the re-tokenization trap ------------------------------------------------------------------------------
def retokenization_trap(ids: list[int], logprobs: list[float], decode, encode) -> dict:
    """What a text-in-text-out pipeline does to sampled tokens: decode, re-encode, and pair the stored
    log-probs with the new ids. Returns text, ids_retokenized, same_ids, and 'pairs': (new id, the log-prob
    now attached to it) -- which is a log-prob of a different token wherever the ids changed."""
    text = decode(list(ids))
    new = list(encode(text))
    pairs = [(tok, logprobs[k] if k < len(logprobs) else None) for k, tok in enumerate(new)]
    return {"text": text, "ids_sampled": list(ids), "ids_retokenized": new, "same_ids": new == list(ids),
            "same_length": len(new) == len(ids), "pairs": pairs}


def first_divergence(expected: list[int], actual: list[int]) -> int | None:
    """Index of the first position where two id lists differ; None if they are equal; the shorter length
    if one is a proper prefix of the other."""
    for k, (a, b) in enumerate(zip(expected, actual)):
        if a != b:
            return k
    return None if len(expected) == len(actual) else min(len(expected), len(actual))


def mask_after_drift(expected: list[int], actual: list[int], loss_mask: list[int]) -> list[int]:
    """The per-turn prefix check: keep the loss mask up to the first divergence, zero it after."""
    k = first_divergence(expected, actual)
    if k is None:
        return list(loss_mask)
    return [m if i < k else 0 for i, m in enumerate(loss_mask)]


def trajectories_to_batch(trajs: list[Trajectory], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trainer's view of N trajectories: (ids, rollout_logprobs, loss_mask), each (N, T) right-padded with
    pad_id / 0 / 0. Right padding is invisible to a causal model's real tokens."""
    T = max(len(t.ids) for t in trajs)
    ids = torch.full((len(trajs), T), pad_id, dtype=torch.long)  # (N, T)
    lps = torch.zeros(len(trajs), T)
    mask = torch.zeros(len(trajs), T)
    for i, t in enumerate(trajs):
        n = len(t.ids)
        ids[i, :n], lps[i, :n], mask[i, :n] = torch.tensor(t.ids), torch.tensor(t.logprobs), torch.tensor(
            t.loss_mask, dtype=torch.float32)
    return ids, lps, mask


# ---- conversations in the chat template ---------------------------------------------------------------------
class ChatConversation:
    """One conversation in GLM-5's chat template, recorded through ``gateway`` (module docstring): a sample per
    user turn in interleaved mode (clear_thinking=True), one growing sample in preserved mode. ``messages``
    (ending with a user message) is the conversation so far; ``self.messages`` grows with the parsed turns.
    ``max_tokens``: refuse a sample longer than the model's context (chat.render's ValueError)."""

    def __init__(self, gateway: TITOGateway, conversation_id: str, messages: list[dict], tools=None, *,
                 clear_thinking: bool = True, enable_thinking: bool = True, max_tokens: int | None = None,
                 meta: dict | None = None):
        if not messages or messages[-1].get("role") != "user":
            raise ValueError(f"messages: expected a conversation ending with a user message, got "
                             f"{messages[-1].get('role') if messages else 'no message'!r} last")
        self.gateway, self.cid, self.tools = gateway, conversation_id, tools
        self.clear_thinking, self.enable_thinking, self.max_tokens = clear_thinking, enable_thinking, max_tokens
        self.meta, self.messages, self.samples, self.last_sampled = dict(meta or {}), list(messages), [], None
        self.finished: list[Trajectory] = []
        self._start(self.messages)

    def _render(self, messages, prompt: bool) -> list[int]:
        return render(messages, self.tools, add_generation_prompt=prompt, enable_thinking=self.enable_thinking,
                      clear_thinking=self.clear_thinking, max_tokens=self.max_tokens).ids

    def _start(self, messages) -> None:
        rid = f"{self.cid}/{len(self.samples)}"
        self.gateway.start(rid, self._render(messages, True), meta={**self.meta, "conversation": self.cid,
                                                                    "turn": len(self.samples)})
        self.samples.append(rid)

    @property
    def rollout_id(self) -> str:
        """The live sample's rollout id."""
        return self.samples[-1]

    def context(self) -> list[int]:
        """The ids the model continues from (the live sample, exactly as recorded)."""
        return self.gateway.ids(self.rollout_id)

    def record(self, ids: list[int], logprobs: list[float], version: int) -> dict:
        """Record one sampled assistant turn (ids up to and including the stop token) and return it parsed
        ({content, reasoning_content, tool_calls}); the parsed message joins ``self.messages``."""
        self.gateway.record_generation(self.rollout_id, ids, logprobs, version)
        msg = parse(list(ids), self.tools)
        msg["tool_calls"] = [c for c in msg["tool_calls"] if c["function"]["name"]]  # a call with no name: none
        self.messages.append({"role": "assistant", **msg})
        self.last_sampled = ids[-1] if len(ids) else None
        return msg

    @torch.no_grad()
    def generate(self, model, version: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None) -> dict:
        """One assistant turn through the gateway (batch 1); returns the parsed message."""
        x = torch.tensor([self.context()], dtype=torch.long, device=next(model.parameters()).device)
        out, lps = model.generate(x, max_new_tokens, temperature=temperature, top_p=top_p, stop_tokens=CHAT_STOPS,
                                  seed=seed, return_logprobs=True)
        new, lps = trim_at_stop(out[0, x.shape[1]:].tolist(), lps[0].tolist(), CHAT_STOPS)
        return self.record(new, lps, version)

    def _append(self, new_messages: list[dict]) -> None:
        """Append the template's delta for ``new_messages`` (an append-only extension) as environment ids."""
        old = self._render(self.messages, False)
        self.messages += new_messages
        new = self._render(self.messages, True)
        if new[:len(old)] != old:
            raise ValueError(f"conversation {self.cid!r}: the rendering is not append-only here "
                             f"(clear_thinking={self.clear_thinking}); start a new sample instead")
        delta = new[len(old):]
        if delta and delta[0] == self.last_sampled:  # the model already emitted this role token as its stop
            delta = delta[1:]
        self.gateway.record_environment(self.rollout_id, delta)

    def tool_results(self, results: list[str]) -> None:
        """The environment's answers to the last turn's tool calls, in order."""
        self._append([{"role": "tool", "content": r} for r in results])

    def user(self, text: str, enable_thinking: bool | None = None) -> None:
        """A new user turn: a new sample in interleaved mode, appended in preserved mode."""
        if enable_thinking is not None:
            self.enable_thinking = enable_thinking
        if self.clear_thinking:
            self.finished.append(self.gateway.finish(self.rollout_id))
            self.messages.append({"role": "user", "content": text})
            self._start(self.messages)
        else:
            self._append([{"role": "user", "content": text}])

    def rewrite(self, messages: list[dict]) -> None:
        """Continue from rewritten history (context management): the live sample ends, a new one starts."""
        self.finished.append(self.gateway.finish(self.rollout_id))
        self.messages = list(messages)
        self._start(self.messages)

    def finish(self, reward: float | None = None, failed: bool = False) -> list[Trajectory]:
        """End the conversation; every sample gets ``reward`` (and ``failed``). Returns the samples in order."""
        self.finished.append(self.gateway.finish(self.rollout_id))
        for t in self.finished:
            t.reward, t.failed = reward, failed
        return self.finished

    def abort(self) -> None:
        self.gateway.abort(self.rollout_id)
