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

Not handled: branching trajectories (context management that rewrites history), multimodal segments.
References: GLM-5 section 4.1.2; slime rollout/sglang_rollout.py and agent/trajectory.py; TRL issue #5224.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

PROMPT, MODEL, ENV = "prompt", "model", "env"


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
        new, lps = out[0, len(context):].tolist(), lps[0].tolist()
        stops = set(stop_tokens or [])
        for k, tok in enumerate(new):
            if tok in stops:
                new, lps = new[:k + 1], lps[:k + 1]
                break
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
