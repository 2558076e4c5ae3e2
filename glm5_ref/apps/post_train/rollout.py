"""Rollouts in the chat template: batched single-turn sampling, multi-turn tool episodes through the TITO gateway,
and the adapter that runs the agentic task in the existing asynchronous RL loop (apps/agentic.py).

Every prompt is rendered by chat.render and every answer read back by chat.parse; every multi-turn episode is a
tito.ChatConversation (one sample per user turn in interleaved mode, or per context-management rewrite).

Batching: the model has no attention mask, so a batch shares one length. ``sample_batch`` groups prompts of equal
length and calls model.generate once per group (at most ``max_batch`` rows): the G samples of one RL prompt
always share a batch, and evaluation prompts of the same length do. ``run_episodes`` steps many episodes in
lockstep, one assistant turn each per round, batching the contexts that happen to have the same length.
Seeds: one per batch call, derived from ``seed`` and the call's position, so a seed fixes every sample.

The sampler ("inference engine") may be a separate copy of the policy whose weights are pushed in bf16
(``push_weights``): GLM-5's rollout engines and trainer compute the same policy with different numerics, the
train/inference mismatch IcePop (rl.grpo_icepop_loss) guards against. Here the mismatch is the bf16 rounding of
the pushed weights (the trainer keeps fp32 master weights), small but real.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from glm5_ref.chat import parse, render
from glm5_ref.tito import CHAT_STOPS, ChatConversation, TITOGateway, trim_at_stop
from glm5_ref.apps.post_train.tasks import Example


@torch.no_grad()
def push_weights(trainer_model, sampler_model, bf16: bool = True) -> None:
    """Copy the trainer's weights into the sampler, rounded to bf16 (the weight push of the rollout engine)."""
    for (_, p), (_, q) in zip(trainer_model.state_dict().items(), sampler_model.state_dict().items()):
        q.copy_(p.to(torch.bfloat16).to(q.dtype) if bf16 and p.is_floating_point() else p)


@torch.no_grad()
def sample_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 0, max_batch: int = 64) -> list[tuple[list[int], list[float]]]:
    """Sample one assistant turn for every prompt (lists of ids); returns (new ids up to and including the stop
    token, their sampler log-probs) per prompt, in order."""
    device = next(model.parameters()).device
    limit = model.config.max_position_embeddings
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list = [None] * len(prompts)
    call = 0
    for length in sorted(by_len):
        idx = by_len[length]
        new = max(0, min(max_new_tokens, limit - length))
        for s in range(0, len(idx), max_batch):
            chunk = idx[s:s + max_batch]
            if new == 0:  # no room left in the model's positions: an empty turn
                for i in chunk:
                    out[i] = ([], [])
                continue
            x = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)  # (b, T)
            ids, lps = model.generate(x, new, temperature=temperature, top_p=top_p, stop_tokens=CHAT_STOPS,
                                      seed=seed * 1_000_003 + call, return_logprobs=True)
            call += 1
            for row, i in enumerate(chunk):
                out[i] = trim_at_stop(ids[row, length:].tolist(), lps[row].tolist(), CHAT_STOPS)
    return out


def prompt_ids(ex: Example, max_tokens: int | None = None) -> list[int]:
    """The generation prompt of a single-turn example, in its thinking mode."""
    return render(ex.messages, ex.tools, add_generation_prompt=True, enable_thinking=ex.enable_thinking,
                  max_tokens=max_tokens).ids


def answer_turns(model, examples: list[Example], max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 seed: int = 0, repeats: int = 1) -> list[dict]:
    """One answer per (example, repeat), batched: dicts with prompt (ids), ids, logprobs, msg (parsed), example.
    Ordered example-major: the ``repeats`` samples of one example are consecutive (a GRPO group)."""
    prompts = [prompt_ids(ex) for ex in examples for _ in range(repeats)]
    outs = sample_batch(model, prompts, max_new_tokens, temperature, top_p, seed)
    res = []
    for k, (p, (ids, lps)) in enumerate(zip(prompts, outs)):
        ex = examples[k // repeats]
        res.append({"prompt": p, "ids": ids, "logprobs": lps, "msg": parse(ids, ex.tools), "example": ex})
    return res


# ---- multi-turn tool episodes ---------------------------------------------------------------------------------
def run_episodes(model, examples: list[Example], execute: Callable[[Example, dict], str],
                 reward: Callable[[Example, dict], float], *, max_new_tokens: int = 56, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, max_turns: int | None = None, version: int = 0,
                 window: int | None = None, manage: Callable[[list[dict]], list[dict]] | None = None,
                 gateway: TITOGateway | None = None, prefix: str = "ep") -> list[dict]:
    """Run every example's episode (assistant turn, tool results, ... until a turn with no tool call), in lockstep.
    ``window``: the context the agent may use (a longer prompt ends the episode: "overflow", reward 0).
    ``manage(messages) -> messages``: context management applied after every tool round (a rewrite when it changes
    anything). Returns per episode: reward, samples (Trajectories), messages, turns, overflow, rewrites."""
    gateway = gateway or TITOGateway()
    convs, state = [], []
    for i, ex in enumerate(examples):
        convs.append(ChatConversation(gateway, f"{prefix}{i}", ex.messages, ex.tools, max_tokens=window,
                                      enable_thinking=ex.enable_thinking))
        state.append({"done": False, "overflow": False, "turns": 0, "rewrites": 0, "last": None})
    turns = max_turns or max(2 + 2 * len(ex.info.get("items", [1])) for ex in examples)
    for t in range(turns):
        live = [i for i, s in enumerate(state) if not s["done"]]
        if not live:
            break
        outs = sample_batch(model, [convs[i].context() for i in live], max_new_tokens, temperature, top_p,
                            seed * 7919 + t)
        for i, (ids, lps) in zip(live, outs):
            c, s, ex = convs[i], state[i], examples[i]
            if not ids:  # out of positions
                s["done"], s["overflow"] = True, True
                continue
            msg = c.record(ids, lps, version)
            s["turns"] += 1
            s["last"] = msg
            if not msg["tool_calls"] or ids[-1] != CHAT_STOPS[2] or t == turns - 1:
                s["done"] = True
                continue
            try:
                c.tool_results([execute(ex, call) for call in msg["tool_calls"]])
                if manage is not None:
                    managed = manage(c.messages)
                    if managed != c.messages:
                        c.rewrite(managed)
                        s["rewrites"] += 1
            except ValueError:  # the next prompt no longer fits the window (chat.render names the message)
                s["done"], s["overflow"] = True, True
    results = []
    for c, s, ex in zip(convs, state, examples):
        r = 0.0 if s["overflow"] or s["last"] is None else reward(ex, s["last"])
        try:
            samples = c.finish(reward=r)
        except ValueError:  # the live sample never started (an overflowing rewrite): finish the ones that did
            samples = c.finished
            for smp in samples:
                smp.reward = r
        results.append({"reward": r, "samples": samples, "messages": c.messages, "turns": s["turns"],
                        "overflow": s["overflow"], "rewrites": s["rewrites"], "example": ex})
    return results


class ChatToolEnv:
    """The agentic task for apps/agentic.py's AsyncRLLoop: ``sample_task(rng)`` draws a training example and
    ``rollout(...)`` (the loop's rollout function) plays one episode through the loop's gateway."""

    def __init__(self, make: Callable[[random.Random], Example], execute, reward, max_new_tokens: int = 56):
        self.make, self.execute, self.reward, self.max_new_tokens = make, execute, reward, max_new_tokens

    def sample_task(self, rng: random.Random) -> Example:
        return self.make(rng)

    def rollout(self, policy, env, task: Example, gateway: TITOGateway, rollout_id: str, seed: int,
                temperature: float = 1.0, between_turns=None):
        """One episode (the signature of tool_env.run_rollout): ``policy()`` -> (model, version) before every turn."""
        conv = ChatConversation(gateway, rollout_id, task.messages, task.tools)
        msg = None
        try:
            for t in range(2 + 2 * len(task.info["items"])):
                model, version = policy()
                msg = conv.generate(model, version, self.max_new_tokens, temperature, seed=seed + t)
                if not msg["tool_calls"] or conv.last_sampled != CHAT_STOPS[2]:
                    break
                if between_turns is not None:
                    between_turns()
                conv.tool_results([self.execute(task, call) for call in msg["tool_calls"]])
        except BaseException:
            conv.abort()  # the loop writes the rollout off; nothing of it stays live in the gateway
            raise
        samples = conv.finish(reward=self.reward(task, msg) if msg is not None else 0.0)
        traj = samples[0]  # one user turn, no rewrite: one sample
        traj.rollout_id = rollout_id
        return traj
