"""Supervised fine-tuning (GLM-5 report section 3.1) on a mix of the three task families and the three thinking
modes, with the chat template's loss mask (chat.render(..., for_training=True).train_mask).

    family mix (by step)      reasoning 0.45, agentic 0.35, general 0.20; and 15% two-task conversations
    thinking modes            interleaved: agentic chains (a note before every call, kept within the chain), and
                              two-task conversations rendered with the default clear_thinking (the first answer's
                              reasoning collapses to a bare </think>, its content still trained);
                              preserved: half of the two-task conversations with clear_thinking=False (every
                              turn keeps and trains its reasoning);
                              turn-level: general instructions are answered with thinking off (</think> in the
                              generation prompt), reasoning and tool turns with it on; two-task conversations mix
                              the two in one session.
    context management        10% of the agentic chains with 3 items are rendered with keep-recent-1 folding
                              (context.py), so that the placeholder of a folded tool result is familiar at
                              inference (the paper applies context management at inference only; our choice).
    masks                     trained: reasoning, </think>, content, tool calls, the token that ends the turn;
                              not: prompts, tool results, <|assistant|>, <think>, a bare </think>.

Batches hold one family each (so that padding stays small: agentic chains are ~500 tokens, instructions ~45),
as many sequences as fit a budget of ``tokens_per_step`` tokens (about 23 reasoning questions, 5 agentic chains
or 28 instructions), each step's family drawn with the probabilities of MIX: by examples the mix is then about
57% reasoning, 9% agentic, 34% general, by tokens 30 / 50 / 20. Loss: next-token cross-entropy on the masked labels + the MoE balance loss + the MTP loss at
depth 1 (so the chat model keeps a draft head for speculative decoding), on the training engine (Trainer.step),
with the indexer frozen; AdamW with a warm-up and a cosine decay. Examples longer than ``max_len`` are skipped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from glm5_ref.chat import render
from glm5_ref.tokenizer import PAD_ID
from glm5_ref.training.engine import Trainer
from glm5_ref.apps.post_train.context import keep_recent_k
from glm5_ref.apps.post_train.rl_core import freeze_indexer
from glm5_ref.apps.post_train.tasks import reasoning_example, sample, sft_general
from glm5_ref.apps.post_train.tools import sft_agentic

MIX = {"reasoning": 0.45, "agentic": 0.35, "general": 0.20}  # probability that a step's batch is of a family


@dataclass
class SFTConfig:
    steps: int = 700             # optimizer steps (~1.8 s each on 2 idle cores)
    tokens_per_step: int = 3072  # token budget of one batch (padded length x rows)
    lr: float = 1e-3             # AdamW peak lr
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    mtp_depths: int = 1          # MTP depths trained alongside (0: none)
    max_len: int = 768           # longest training sequence (the chat model's trained context)
    two_task: float = 0.15       # share of two-task conversations
    seed: int = 0


def _single(family: str, rng: random.Random):
    if family == "reasoning":
        return sample(reasoning_example, rng, "train")
    return sft_agentic(rng) if family == "agentic" else sft_general(rng)


def conversation(rng: random.Random, family: str, two_task: float = 0.15) -> tuple[list[int], list[bool], dict]:
    """One SFT sequence of ``family`` (module docstring): (ids, train_mask, facts about how it was rendered)."""
    ex = _single(family, rng)
    messages, mode = ex.messages + ex.demo, "single"
    clear = True
    if family != "agentic" and rng.random() < two_task:  # a session with two tasks (turn-level thinking mixes)
        other = _single(rng.choice(["reasoning", "general"]), rng)
        messages = messages + other.messages + other.demo
        clear = rng.random() < 0.5
        mode = "interleaved" if clear else "preserved"
    elif family == "agentic" and len(ex.info["items"]) == 3 and rng.random() < 0.10:
        messages, mode = keep_recent_k(messages, 1), "keep-recent"
    r = render(messages, ex.tools, for_training=True, clear_thinking=clear)
    return r.ids, r.train_mask, {"family": family, "mode": mode}


def make_batch(rng: random.Random, family: str, cfg: SFTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) (B, T) for one step: labels are -100 outside the train mask and on padding."""
    rows, longest = [], 0
    while True:
        ids, mask, _ = conversation(rng, family, cfg.two_task)
        if len(ids) > cfg.max_len:
            continue
        if rows and max(longest, len(ids)) * (len(rows) + 1) > cfg.tokens_per_step:
            break
        rows.append((ids, mask))
        longest = max(longest, len(ids))
    x = torch.full((len(rows), longest), PAD_ID, dtype=torch.long)  # (B, T)
    y = torch.full((len(rows), longest), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
        y[i, :len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    return x, y


def run_sft(model, cfg: SFTConfig, progress=None) -> dict:
    """Train ``model`` in place; returns {"loss": per-step losses, "families": per-step family, "shares"}."""
    rng = random.Random(cfg.seed)
    freeze_indexer(model)
    model.train()
    shares = MIX
    trainer = Trainer(model, "adamw", cfg.lr, weight_decay=0.0, total_steps=cfg.steps, warmup=cfg.warmup,
                      min_lr_ratio=cfg.min_lr_ratio, grad_clip=1.0, adamw_betas=(0.9, 0.95))

    def objective(net, batch):
        x, y = batch
        out = net(x, labels=y, mtp_depths=cfg.mtp_depths)
        return out.loss, out

    losses, fams = [], []
    for step in range(cfg.steps):
        family = rng.choices(list(shares), weights=list(shares.values()))[0]
        res = trainer.step(make_batch(rng, family, cfg), loss_fn=objective)
        losses.append(float(res.out.lm_loss.detach()))
        fams.append(family)
        if progress is not None:
            progress(step, {"loss": losses[-1], "family": family})
    model.eval()
    return {"loss": losses, "families": fams, "shares": shares, "steps": cfg.steps}
