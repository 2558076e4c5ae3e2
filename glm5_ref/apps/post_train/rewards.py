"""The reward models of general RL (GLM-5 report section 3.4): an outcome reward model (a scalar head trained on
preference pairs) and a generative reward model (a model that reads the answer with a rubric and emits a score).

    ORM   s(x, y) = w . RMSNorm(h_last(x, y)) + b, on the last token of the rendered chat (prompt + answer +
          <|endoftext|>); Bradley-Terry on pairs: L = -log sigmoid(s(x, y_chosen) - s(x, y_rejected)). Chosen: a
          human-written anchor (anchors.py) fitted to the prompt's constraints; rejected: one with a flaw (filler,
          verbose padding, a formula, repetition, truncation, another topic). It never sees a reference answer.
    GRM   a chat turn: user "Rate the style of the answer from 0 to 9. Rubric: ... Reference: <an anchor of the
          topic> Task: <the prompt> Answer: <the answer>"; the assistant answers one digit (thinking off). Trained
          by SFT on the flawed and unflawed answers with the flaw's score (anchors.SCORES); half of the training
          prompts omit the reference line, so the same model also judges without an anchor ("no-anchor" runs).
          The RL reward is a SAMPLED digit / 9 (temperature 1: the generative judge's noise); the style metric of
          the evaluation is its expected value sum_d p(d) d / 9 with the reference (deterministic).
Both start from the SFT checkpoint (the usual RM initialisation) and train on the training engine. The paper's
finding the general-RL runs measure: ORMs are low-variance but hackable, GRMs more robust but noisy, and without
the human anchors the answers drift verbose and formulaic.

Choices (none given in the paper): the sizes (the policy's own, 16.6M), the flaws, scores and prompt, 50/50 with
and without reference for the GRM, the ORM's last-token head.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from glm5_ref.chat import render
from glm5_ref.layers import RMSNorm
from glm5_ref.tokenizer import PAD_ID, encode
from glm5_ref.training.engine import Trainer
from glm5_ref.apps.post_train.anchors import ANCHORS, KINDS, SCORES, degrade
from glm5_ref.apps.post_train.rl_core import freeze_indexer
from glm5_ref.apps.post_train.tasks import Example, apply_constraints, general_example, sample

RUBRIC = "Rubric: on topic, concrete, fresh words, no filler, no repetition, not padded."
DIGITS = [encode(str(d))[0] for d in range(10)]


class OutcomeRM(nn.Module):
    """A GLM-5 trunk with a scalar head on the last token (module docstring)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.norm = RMSNorm(lm.config.hidden_size)
        self.head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (B, T) right-padded, lengths (B,) -> scores (B,)."""
        h = self.lm(ids).hidden_states  # (B, T, D)
        last = h[torch.arange(ids.shape[0]), lengths - 1]  # (B, D)
        return self.head(self.norm(last))[:, 0]


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    x = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s)
    return x, torch.tensor([len(s) for s in seqs])


def orm_ids(ex: Example, answer: str) -> list[int]:
    return render(ex.messages + [{"role": "assistant", "content": answer}], for_training=True).ids


@torch.no_grad()
def orm_scores(orm: OutcomeRM, examples: list[Example], answers: list[str], rows: int = 32) -> list[float]:
    orm.eval()
    out = []
    for i in range(0, len(answers), rows):
        x, n = _pad([orm_ids(e, a) for e, a in zip(examples[i:i + rows], answers[i:i + rows])])
        out += orm(x, n).tolist()
    return out


def flawed(rng: random.Random) -> tuple[Example, str, str, int]:
    """A training prompt, an answer about its topic with one flaw kind, the kind, and its score."""
    ex = sample(general_example, rng, "train")
    kind = rng.choice(KINDS)
    text = degrade(ex.info["topic"], kind, rng)
    if rng.random() < 0.7:  # most answers also follow the prompt's surface constraints: style is not format
        text = apply_constraints(text, ex.info["case"], ex.info["end"])
    return ex, text, kind, SCORES[kind]


def _reward_trainer(net, lr: float, steps: int) -> Trainer:
    """The one optimizer setup both reward models train with: indexer frozen (as in RL), AdamW, warm-up + cosine."""
    freeze_indexer(net)
    net.train()
    return Trainer(net, "adamw", lr, weight_decay=0.0, total_steps=steps, warmup=0.05, min_lr_ratio=0.1,
                   grad_clip=1.0, adamw_betas=(0.9, 0.95))


def train_orm(lm, steps: int, pairs_per_step: int = 16, lr: float = 3e-4, seed: int = 0) -> tuple[OutcomeRM, list]:
    """Bradley-Terry training of an ORM on ``lm`` (a copy of the SFT model, trained in place)."""
    rng = random.Random(seed)
    orm = OutcomeRM(lm)
    trainer = _reward_trainer(orm, lr, steps)

    def objective(net, batch):
        x, n = batch
        s = net(x, n).reshape(2, -1)  # (2, P): chosen, rejected
        return -torch.nn.functional.logsigmoid(s[0] - s[1]).mean(), None

    losses = []
    for _ in range(steps):
        chosen, rejected = [], []
        while len(chosen) < pairs_per_step:
            ex, bad, kind, score = flawed(rng)
            if score == SCORES["good"]:
                continue
            good = apply_constraints(rng.choice(ANCHORS[ex.info["topic"]]), ex.info["case"], ex.info["end"])
            chosen.append(orm_ids(ex, good))
            rejected.append(orm_ids(ex, bad))
        losses.append(float(trainer.step(_pad(chosen + rejected), loss_fn=objective).loss))
    orm.eval()
    return orm, losses


# ---- the generative reward model ------------------------------------------------------------------------------
def grm_messages(ex: Example, answer: str, reference: str | None) -> list[dict]:
    ref = f"\nReference: {reference}" if reference else ""
    return [{"role": "user", "content": f"Rate the style of the answer from 0 to 9.\n{RUBRIC}{ref}\n"
                                        f"Task: {ex.question}\nAnswer: {answer}"}]


def reference_for(ex: Example) -> str:
    """The anchor the GRM reads for a prompt: the topic's first anchor (fixed, so scores are comparable)."""
    return ANCHORS[ex.info["topic"]][0]


def train_grm(lm, steps: int, batch: int = 24, lr: float = 3e-4, seed: int = 0) -> list[float]:
    """SFT of ``lm`` (a copy of the SFT model, in place) into the generative judge."""
    rng = random.Random(seed)
    trainer = _reward_trainer(lm, lr, steps)

    def objective(net, b):
        x, y = b
        out = net(x, labels=y, mtp_depths=0)
        return out.lm_loss, out

    losses = []
    for _ in range(steps):
        seqs, labels = [], []
        for _ in range(batch):
            ex, text, kind, score = flawed(rng)
            ref = reference_for(ex) if rng.random() < 0.5 else None
            r = render(grm_messages(ex, text, ref) + [{"role": "assistant", "content": str(score)}],
                       for_training=True)
            seqs.append(r.ids)
            labels.append([t if m else -100 for t, m in zip(r.ids, r.train_mask)])
        x, _ = _pad(seqs)
        y = torch.full_like(x, -100)
        for i, l in enumerate(labels):
            y[i, :len(l)] = torch.tensor(l)
        losses.append(float(trainer.step((x, y), loss_fn=objective).loss))
    lm.eval()
    return losses


@torch.no_grad()
def grm_digit_probs(grm, examples: list[Example], answers: list[str], with_reference: bool = True,
                    rows: int = 32) -> torch.Tensor:
    """(N, 10) the judge's distribution over the score digits for each answer."""
    grm.eval()
    seqs = [render(grm_messages(e, a, reference_for(e) if with_reference else None), add_generation_prompt=True,
                   enable_thinking=False).ids for e, a in zip(examples, answers)]
    out = torch.zeros(len(seqs), 10)
    for i in range(0, len(seqs), rows):
        x, n = _pad(seqs[i:i + rows])
        logits = grm(x).logits[torch.arange(x.shape[0]), n - 1][:, DIGITS]  # (b, 10)
        out[i:i + len(n)] = torch.softmax(logits.float(), -1)
    return out


def grm_expected(grm, examples, answers, with_reference: bool = True) -> list[float]:
    """The deterministic style score in [0, 1]: E[digit] / 9."""
    p = grm_digit_probs(grm, examples, answers, with_reference)
    return ((p * torch.arange(10.0)).sum(-1) / 9).tolist()


def grm_sampled(grm, examples, answers, generator: torch.Generator, with_reference: bool = True) -> list[float]:
    """The RL reward: one sampled digit / 9 per answer (the generative judge's noise included)."""
    p = grm_digit_probs(grm, examples, answers, with_reference)
    return (torch.multinomial(p, 1, generator=generator)[:, 0].float() / 9).tolist()
