"""The toy agentic task: a multi-turn calculator tool-use environment in token ids, and its rollout.

One episode (every number 10..99 is one token of the project tokenizer):
    prompt  (env)    <|user|> 23 + 17 <|assistant|>
    turn 1  (model)  <|tool_call|> 23 + 17 <|observation|>          the model calls the calculator and stops
    tool    (env)    <|tool_result|> 40 <|assistant|>               the environment runs the call
    turn 2  (model)  40 <|endoftext|>                               the model answers with the tool's result
Reward 1 iff the call is exactly "a+b" and the answer is exactly str(a+b), else 0. A small GLM-5
(``toy_config``) learns the format from a short supervised warm-start (``warm_start``); RL at temperature 1
(agentic.py) then has to make the copying reliable. Environment tokens (prompt, tool result) have loss_mask 0;
only the model's two turns are trained. ``run_rollout`` drives one episode through a TITO gateway (tito.py);
``ToolUseEnv`` can crash (EnvCrash: the sample is not the policy's fault) and sleep a simulated latency
(``long_tail_latency``) per tool call.
Not handled: other tools, multi-call episodes, partial credit.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.tito import TITOGateway, Trajectory
from glm5_ref.tokenizer import EOT_ID, PAD_ID, SPECIAL_TOKENS, decode, encode
from glm5_ref.training.engine import Trainer

USER, ASSISTANT = SPECIAL_TOKENS["<|user|>"], SPECIAL_TOKENS["<|assistant|>"]
OBSERVATION, TOOL_CALL, TOOL_RESULT = (SPECIAL_TOKENS["<|observation|>"], SPECIAL_TOKENS["<|tool_call|>"],
                                       SPECIAL_TOKENS["<|tool_result|>"])
PLUS = encode("+")[0]
CALL_TOKENS, ANSWER_TOKENS = 6, 4  # max new tokens per model turn (the correct turns need 5 and 2-3)


def toy_config() -> GLM5Config:
    """A ~0.6M-parameter GLM-5 (MLA + DSA, dense FFN, no MTP) over the project's 4096-id tokenizer."""
    return GLM5Config(
        name="rl-toy", vocab_size=4096, hidden_size=64, num_hidden_layers=2, max_position_embeddings=64,
        num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, rope_theta=10_000.0, index_n_heads=1, index_head_dim=16, index_topk=64,
        intermediate_size=128, first_k_dense_replace=2, moe_intermediate_size=16, n_routed_experts=2,
        num_experts_per_tok=1, n_shared_experts=0, num_nextn_predict_layers=0)


# ---- the environment ---------------------------------------------------------------------------------------
class EnvCrash(RuntimeError):
    """The environment failed (not the policy's fault): the sample must not be trained on."""


@dataclass
class Task:
    a: int
    b: int
    prompt_ids: list[int]


class ToolUseEnv:
    """The calculator tool-use task. crash_prob: chance a tool call raises EnvCrash; latency(rng) -> seconds
    slept per tool call (simulated slow environments)."""

    def __init__(self, low: int = 10, high: int = 99, crash_prob: float = 0.0,
                 latency: Callable[[random.Random], float] | None = None):
        if not (isinstance(low, int) and isinstance(high, int) and 10 <= low <= high <= 99):
            raise ValueError(f"low, high: expected integers with 10 <= low <= high <= 99, got {low}, {high}")
        if not 0 <= crash_prob <= 1:
            raise ValueError(f"crash_prob: expected a probability in [0, 1], got {crash_prob}")
        self.low, self.high, self.crash_prob, self.latency = low, high, crash_prob, latency

    def sample_task(self, rng: random.Random) -> Task:
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        return Task(a, b, [USER, *encode(str(a)), PLUS, *encode(str(b)), ASSISTANT])

    @staticmethod
    def parse_call(call_ids: list[int]) -> tuple[int, int] | None:
        """(x, y) if the turn is <|tool_call|> x + y <|observation|>, else None."""
        if len(call_ids) < 3 or call_ids[0] != TOOL_CALL or call_ids[-1] != OBSERVATION:
            return None
        m = re.fullmatch(r"(\d+)\+(\d+)", decode(call_ids[1:-1]))
        return (int(m.group(1)), int(m.group(2))) if m else None

    def call_tool(self, call_ids: list[int], rng: random.Random) -> list[int]:
        """The observation turn: <|tool_result|> value-or-'error' <|assistant|>. May sleep and may crash."""
        if self.latency is not None:
            time.sleep(self.latency(rng))
        if self.crash_prob and rng.random() < self.crash_prob:
            raise EnvCrash("tool server crashed")
        args = self.parse_call(call_ids)
        value = str(args[0] + args[1]) if args else "error"
        return [TOOL_RESULT, *encode(value), ASSISTANT]

    @staticmethod
    def reward(task: Task, call_ids: list[int], answer_ids: list[int]) -> float:
        if ToolUseEnv.parse_call(call_ids) != (task.a, task.b):
            return 0.0
        if not answer_ids or answer_ids[-1] != EOT_ID:
            return 0.0
        return float(decode(answer_ids[:-1]) == str(task.a + task.b))

    def demonstration(self, task: Task) -> tuple[list[int], list[int]]:
        """The correct episode's ids and its loss mask (1 on the model's turns)."""
        call = [TOOL_CALL, *encode(str(task.a)), PLUS, *encode(str(task.b)), OBSERVATION]
        obs = [TOOL_RESULT, *encode(str(task.a + task.b)), ASSISTANT]
        answer = [*encode(str(task.a + task.b)), EOT_ID]
        ids = task.prompt_ids + call + obs + answer
        mask = [0] * len(task.prompt_ids) + [1] * len(call) + [0] * len(obs) + [1] * len(answer)
        return ids, mask


def run_rollout(policy: Callable[[], tuple[GLM5ForCausalLM, int]], env: ToolUseEnv, task: Task,
                gateway: TITOGateway, rollout_id: str, seed: int, temperature: float = 1.0,
                between_turns: Callable[[], None] | None = None) -> Trajectory:
    """One episode through the gateway. ``policy()`` returns (model, version) and is asked before each turn
    (a worker answers with its newest weights). ``between_turns`` is called after turn 1 (heartbeats, fault
    injection). An environment crash returns a trajectory with failed=True."""
    rng = random.Random(seed)
    gateway.start(rollout_id, task.prompt_ids, meta={"a": task.a, "b": task.b})
    model, version = policy()
    call = gateway.generate(rollout_id, model, version, CALL_TOKENS, temperature, stop_tokens=[OBSERVATION],
                            seed=seed)
    if between_turns is not None:
        between_turns()
    try:
        obs = env.call_tool(call, rng)
    except EnvCrash:
        return gateway.finish(rollout_id, reward=0.0, failed=True)
    gateway.record_environment(rollout_id, obs)
    model, version = policy()
    answer = gateway.generate(rollout_id, model, version, ANSWER_TOKENS, temperature, stop_tokens=[EOT_ID],
                              seed=seed + 1)
    return gateway.finish(rollout_id, reward=env.reward(task, call, answer))


# ---- supervised warm start, evaluation, latency ------------------------------------------------------
def warm_start(model: GLM5ForCausalLM, env: ToolUseEnv, steps: int, batch_size: int = 32, lr: float = 3e-3,
               seed: int = 0) -> list[float]:
    """Supervised steps on correct episodes (loss on the model's turns only), on the training engine: AdamW
    (betas 0.9, 0.999, no weight decay) at a constant lr, no clipping, the router left alone. Returns the losses."""
    rng = random.Random(seed)
    trainer = Trainer(model, "adamw", lr, weight_decay=0.0, total_steps=max(steps, 1), warmup=0.0, min_lr_ratio=1.0,
                      grad_clip=None, adamw_betas=(0.9, 0.999))

    def objective(net, demos):
        T = max(len(ids) for ids, _ in demos)
        ids = torch.full((len(demos), T), PAD_ID, dtype=torch.long)  # (B, T), right-padded
        labels = torch.full((len(demos), T), -100, dtype=torch.long)
        for i, (d, m) in enumerate(demos):
            ids[i, :len(d)] = torch.tensor(d)
            labels[i, :len(d)] = torch.tensor([t if keep else -100 for t, keep in zip(d, m)])
        return net(ids, labels=labels).lm_loss, None

    return [float(trainer.step([env.demonstration(env.sample_task(rng)) for _ in range(batch_size)],
                               loss_fn=objective).loss) for _ in range(steps)]


def success_rate(model: GLM5ForCausalLM, env: ToolUseEnv, n: int = 200, temperature: float = 1.0,
                 seed: int = 12345) -> float:
    """Fraction of n fresh tasks solved (sampling at ``temperature``; 0 = greedy)."""
    rng, gateway, wins = random.Random(seed), TITOGateway(), 0.0
    plain = ToolUseEnv(env.low, env.high)  # no crashes or latency while measuring
    for k in range(n):
        traj = run_rollout(lambda: (model, 0), plain, plain.sample_task(rng), gateway, f"eval-{k}",
                           seed=seed + 2 * k, temperature=temperature)
        wins += traj.reward
    return wins / n


def long_tail_latency(base: float = 0.004, scale: float = 0.004, alpha: float = 1.2,
                      cap: float = 0.4) -> Callable[[random.Random], float]:
    """Simulated tool latency: base + scale * Pareto(alpha), capped (mean ~ base + scale * alpha/(alpha-1))."""
    def sample(rng: random.Random) -> float:
        return min(cap, base + scale * rng.paretovariate(alpha))
    return sample
