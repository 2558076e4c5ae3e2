"""Synthetic copy data for the recipe's batches, and the copy probe that measures what it teaches.

Why: a language model predicts a repeated name, number or line by finding where it appeared before and copying
what followed (an "induction head": one head attends to the previous token, a second matches the current
token against those and copies the next one; Olsson et al., "In-context learning and induction heads", 2022).
Large models learn it from natural text within their first billion tokens or so. The classroom model sees
5-6M tokens in all, and the first shipped classroom-base never learned it: on a repeated 96-token span of
held-out code its loss on the repeat was 3.37 nats per token against 3.48 on the first occurrence (a copying
model pays well under 1), so it could not copy an item name or a digit from its prompt, which every
post-training task needs. GLM-5 mixes synthetic long-range-dependency data into mid-training (report section
2.3); at classroom scale the simplest such data, a span of the corpus written twice in one window, goes in from
the first pre-training step, so the mechanism forms while the model is still cheap to change.

    RepeatMixSampler   BatchSampler's windows; each row, with probability ``fraction``, gets one span of the
                       stream (16 .. seq_len / 2 tokens) written into it twice, both copies at random places
                       (the second after the first, the gap random): the rest of the row stays natural text
    RandomCopySampler  the pure task: every row is a span of uniformly random ordinary token ids written twice
                       (nothing to learn but copying); what a copy warm-up trains on
    copy_probe         mean loss (nats per token) on the first occurrence of held-out spans and on their repeat,
                       each span written twice back to back; the gap between the two is what the model learned

Every draw comes from the sampler's one seeded generator, so ``state_dict`` / ``load_state_dict`` (BatchSampler's)
resume it exactly. Axes: B batch, T + 1 window length, L span length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm5_ref.training.data import BatchSampler


class RepeatMixSampler(BatchSampler):
    """BatchSampler whose rows carry a repeated span with probability ``fraction`` (module docstring)."""

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0, fraction: float = 0.25,
                 min_span: int = 16):
        super().__init__(ids, batch_size, seq_len, seed)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction: expected a probability in [0, 1], got {fraction!r}")
        if isinstance(min_span, bool) or not isinstance(min_span, int) or not 1 <= min_span <= (seq_len + 1) // 2:
            raise ValueError(f"min_span: expected an integer in [1, (seq_len + 1) // 2 = {(seq_len + 1) // 2}], "
                             f"got {min_span!r}")
        self.fraction, self.min_span = float(fraction), min_span

    def next(self) -> torch.Tensor:
        batch = super().next()  # (B, T + 1)
        W, g = batch.shape[1], self.generator
        chosen = torch.rand(batch.shape[0], generator=g) < self.fraction  # (B,)
        for row in chosen.nonzero().flatten().tolist():
            L = int(torch.randint(self.min_span, W // 2 + 1, (1,), generator=g))
            src = int(torch.randint(0, self.ids.numel() - L + 1, (1,), generator=g))
            first = int(torch.randint(0, W - 2 * L + 1, (1,), generator=g))
            second = int(torch.randint(first + L, W - L + 1, (1,), generator=g))
            span = self.ids[src:src + L]
            batch[row, first:first + L] = span
            batch[row, second:second + L] = span
        return batch


class RandomCopySampler(BatchSampler):
    """Rows of ``seq_len + 1`` tokens: a span of (seq_len + 2) // 2 random ordinary ids, then the same span again
    (cut to the window). Measured 2026-12-02 (batch 16, 16-token spans): the classroom model starts copying after
    about 1,600 steps with AdamW cosine-decayed from 2e-3, after about 650 at a constant 5e-4 (none by 1,100 at
    1e-3); a plain 4-layer GPT of the same width after about 550 at 2e-3 (800 with RoPE).

    The repeat always starts (seq_len + 2) // 2 positions after the span: a head that looks back by that fixed
    offset solves the task without matching content, so what it teaches need not be copying by content (an
    induction head). Measured 2026-12-03 in the recipe's warm-up (fp32, 32-token windows, AdamW 5e-4): the task's
    loss left its plateau near step 1,650, and at step 2,000 the copy probe on code spans at the same offset was
    worse on the repeat than on the first occurrence (8.93 vs 8.33 nats).

    Why so late is measured by ``python -m glm5_ref experiment copy-onset`` (apps/experiments/copy_onset.py:
    this task, batch 16, a constant lr, three seeds per arm, 800 steps; figures/copy_onset.json). A plain GPT of
    the same width starts copying in every seed; with MLA's rotary layout (16 of 64 dims, one shared rotary key)
    it starts in fewer; with GLM-5's init (N(0, 0.02) everywhere) instead of PyTorch's it starts in none; the
    classroom model starts in none, whatever its lr, rope_theta, rotary share, init or FFN (dense or MoE). The
    README's copy-onset table has the numbers. A single seed does not separate arms: one GPT written in two
    throwaway pilot scripts started by step 800 in 3 of 3 seeds in one and 1 of 3 in the other. A random-place
    variant (a span of 8-24 ids repeated anywhere in a 65-id row, so content must be matched) was not learned
    by the full-RoPE GPT in 1,500 steps of batch 16, nor by the decoupled-RoPE GPT at rope_theta 100 in 500 of
    batch 64 (with 4,000 ids or a 512-id pool; pilots, not in the repository): at these budgets it does not tell
    the architectures apart."""

    def __init__(self, batch_size: int, seq_len: int, seed: int = 0, vocab: int | None = None):
        from glm5_ref.tokenizer import NUM_MERGEABLE

        self.vocab = NUM_MERGEABLE if vocab is None else vocab
        super().__init__(torch.zeros(seq_len + 1, dtype=torch.long), batch_size, seq_len, seed)

    def next(self) -> torch.Tensor:
        W = self.seq_len + 1
        span = torch.randint(0, self.vocab, (self.batch_size, (W + 1) // 2), generator=self.generator)  # (B, L)
        self.batches_drawn += 1
        return torch.cat([span, span], dim=1)[:, :W]  # (B, T + 1)


def training_sampler(train_ids: torch.Tensor, batch_size: int, seq_len: int, seed: int, *,
                     repeat_fraction: float = 0.0, random_copy: bool = False) -> BatchSampler:
    """The sampler a run trains on: the pure copy task, corpus windows with some repeated spans, or plain windows."""
    if random_copy:
        return RandomCopySampler(batch_size, seq_len, seed=seed)
    if repeat_fraction > 0:  # its draws change the stream, so 0 keeps the plain sampler's batches
        return RepeatMixSampler(train_ids, batch_size, seq_len, seed=seed, fraction=repeat_fraction,
                                min_span=min(16, (seq_len + 1) // 2))
    return BatchSampler(train_ids, batch_size, seq_len, seed=seed)


def probe_windows(ids: torch.Tensor, n: int = 32, span: int = 96, seed: int = 1) -> torch.Tensor:
    """(n, 2 * span): ``n`` spans of ``ids`` at seeded random starts, each written twice back to back."""
    if ids.numel() < span:
        raise ValueError(f"span: {span} tokens do not fit in a stream of {ids.numel()}")
    starts = torch.randint(0, ids.numel() - span + 1, (n,), generator=torch.Generator().manual_seed(seed))
    chunks = ids[starts[:, None] + torch.arange(span)]  # (n, L)
    return torch.cat([chunks, chunks], dim=1)


def span_nll(logits: torch.Tensor, rows: torch.Tensor, span: int,
             repeat_from: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token nats of rows that hold a span of ``span`` ids and then its repeat: (first (B, span - 1): predicting
    ids 1 .. span-1 of the first occurrence, repeat: predicting ids ``repeat_from`` .. of the repeat). logits
    (B, T, V) of ``rows`` (B, T); position j predicts id j + 1."""
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), rows[:, 1:], reduction="none")  # (B, T - 1)
    return nll[:, :span - 1], nll[:, span - 1 + repeat_from:]


@torch.no_grad()
def copy_probe(model, ids: torch.Tensor, n: int = 32, span: int = 96, seed: int = 1, batch_size: int = 8) -> dict:
    """{"first", "repeat"}: mean nats per token predicting tokens 1 .. L-1 of each span's first occurrence, and
    tokens 1 .. L-1 of its repeat (token 0 of the repeat follows the end of the span: not copyable). A model that
    copies has "repeat" far below "first"; one that does not has them about equal."""
    windows = probe_windows(ids, n, span, seed).to(next(model.parameters()).device)
    first, repeat = [], []
    was_training = model.training
    model.eval()
    for rows in windows.split(batch_size):
        f, r = span_nll(model(rows).logits, rows, span, repeat_from=1)
        first.append(f)
        repeat.append(r)
    model.train(was_training)
    return {"first": float(torch.cat(first).mean()), "repeat": float(torch.cat(repeat).mean()),
            "spans": n, "span_tokens": span}
