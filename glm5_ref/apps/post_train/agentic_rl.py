"""Agentic RL (GLM-5 report section 4.1): the project's asynchronous loop (apps/agentic.py: rollout worker threads,
a TITO gateway, direct double-sided importance sampling, staleness control, crash filtering, group padding, weight
pushes with an optimizer reset), driven over the chat template and the multi-turn catalog + calculator tools.

The task plugs into the loop as an environment with its own rollout (rollout.ChatToolEnv): each episode is a
tito.ChatConversation (one user turn, interleaved thinking: a single append-only sample), its reward the outcome
(the final answer is the total). The loop trains the exact sampled ids with the workers' own log-probs.

Scaled down (the paper gives no tau or K; the values are ours): 2 worker threads, G = 4 episodes per task,
2 groups per update (8 episodes), K = 1 (weights pushed after every update, then the optimizer reset), tau = 2
(drop a sample that started more than 2 versions ago), eps 0.2 / 0.28 for the band, AdamW at 2e-5, temperature 1,
at most 56 new tokens per turn, the indexer frozen. Heartbeat timeout 120 s: a turn on a busy 2-core machine can
take seconds, which must not count as a dead worker.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from glm5_ref.apps.agentic import AsyncRLLoop, LoopConfig
from glm5_ref.apps.post_train.rl_core import freeze_indexer
from glm5_ref.apps.post_train.rollout import ChatToolEnv
from glm5_ref.apps.post_train.tasks import fixed_set
from glm5_ref.apps.post_train.tools import agentic_example, agentic_reward, execute


@dataclass
class AgenticRLConfig:
    num_updates: int = 40
    group_size: int = 4
    groups_per_update: int = 2
    num_workers: int = 2
    max_staleness: int = 2
    lr: float = 2e-5
    max_new_tokens: int = 56
    rl_set: int = 512
    seed: int = 0


def agentic_rl_set(n: int = 512, seed: int = 202):
    return fixed_set(agentic_example, n, "train", seed)


def run_agentic_rl(model, cfg: AgenticRLConfig, progress=None) -> dict:
    """Train ``model`` in place with AsyncRLLoop; returns the loop's history and sample accounting."""
    pool = agentic_rl_set(cfg.rl_set)
    env = ChatToolEnv(lambda rng: rng.choice(pool), execute, agentic_reward, cfg.max_new_tokens)
    freeze_indexer(model)
    model.train()
    loop_cfg = LoopConfig(mode="async", num_workers=cfg.num_workers, group_size=cfg.group_size,
                          groups_per_update=cfg.groups_per_update, num_updates=cfg.num_updates, push_every=1,
                          max_staleness=cfg.max_staleness, max_inflight_groups=cfg.groups_per_update + 2,
                          loss_type="dis", lr=cfg.lr, temperature=1.0, heartbeat_timeout=120.0, max_seconds=3 * 3600,
                          seed=cfg.seed)
    random.seed(cfg.seed)
    loop = AsyncRLLoop(model, env, loop_cfg,
                       on_update=(lambda rec: progress(rec["update"] - 1, rec)) if progress is not None else None)
    threads = torch.get_num_threads()
    try:
        res = loop.run()
    finally:
        torch.set_num_threads(threads)  # the loop's trainer thread runs on one
    model.eval()
    return {"history": res["history"], "counts": res["counts"], "wall_s": res["wall_s"],
            "final_version": res["final_version"]}
