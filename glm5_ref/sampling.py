"""Turning logits into tokens: greedy, temperature and nucleus (top-p) sampling, seeding, stop-token padding.

Shared by plain decoding (model.py ``GLM5ForCausalLM.generate``) and speculative decoding (speculative.py),
so both draw from exactly the same distribution:

    p = softmax(logits / temperature), zeroed outside the smallest set of tokens whose mass reaches top_p
        (a token is kept when the mass of the tokens ranked above it is below top_p), renormalised;
    temperature 0 means argmax (greedy), with ties to the lowest id (torch.argmax).

Every random draw takes a ``torch.Generator`` seeded by the caller (``new_generator``), so a seed fixes the
output. After a stop token a sequence repeats it to the requested length (``pad_after_stop``), so every row
of a batch has the same length.
Axes: B batch, V vocabulary.
"""

from __future__ import annotations

import torch


def new_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed when None)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature, top_p: expected temperature >= 0 and 0 < top_p <= 1, got "
                         f"{temperature}, {top_p}")


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature), zeroed outside the top-p nucleus and renormalised: (B, V) fp32."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # a token is kept if the mass before it is below top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_token(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) logits: argmax at temperature 0, else a draw from the nucleus distribution.
    Returns (token (B,), its log-probability under the distribution it was drawn from (B,))."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None])[:, 0]
    probs = nucleus_probs(logits, temperature, top_p)  # (B, V)
    token = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return token, torch.log(probs.gather(-1, token[:, None])[:, 0])


def pad_after_stop(ids: torch.Tensor, prompt_len: int, stop_tokens, total_len: int | None = None) -> torch.Tensor:
    """ids (B, T): after the first generated stop token (at or past ``prompt_len``) every position repeats it;
    the result is cut or padded (with each row's last token) to ``total_len`` columns when given."""
    if total_len is not None and ids.shape[1] < total_len:
        ids = torch.cat([ids, ids[:, -1:].expand(-1, total_len - ids.shape[1])], dim=1)
    ids = ids[:, :total_len] if total_len is not None else ids
    stop = torch.tensor(sorted(set(stop_tokens or [])), dtype=ids.dtype, device=ids.device)
    if not stop.numel() or ids.shape[1] <= prompt_len:
        return ids
    gen = ids[:, prompt_len:]  # (B, N)
    hit = torch.isin(gen, stop)  # (B, N)
    after = hit.cumsum(1) > 0  # (B, N): at or after the first stop
    first = hit.float().argmax(1)  # (B,) index of the first stop (0 when none: masked out by ``after``)
    token = gen.gather(1, first[:, None])  # (B, 1)
    return torch.cat([ids[:, :prompt_len], torch.where(after, token, gen)], dim=1)
