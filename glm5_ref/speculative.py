"""Speculative decoding with the MTP layer: chain drafting, one verifying forward, lossless acceptance.

What it is (GLM-5 report, "MTP"; Leviathan et al. 2023, arXiv 2211.17192; glm5_spec.md section 6)
    Each round, the one MTP layer drafts N tokens recursively (depth 1 from the main model's hidden state,
    depth j from depth j-1's), the main model scores [last token, d_1 .. d_N] in ONE forward over its cache,
    and a prefix of the drafts is accepted:
      greedy (temperature 0): accept d_j while d_j == argmax p_j; then emit argmax p_{a+1}
        -> exactly the tokens plain greedy decoding emits, only fewer main-model forwards.
      sampling: accept d_j with probability min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a token
        from norm(max(0, p_j - q_j)) and stop; if all N pass, emit a bonus token from p_{N+1}
        -> every emitted token is distributed exactly as under the main model (p, q after temperature/top-p).
    Then both caches roll back past the rejected drafts (GLM5Cache.truncate, DSACache.truncate), and the MTP
    cache is refilled at the accepted positions from the main model's hidden states (what it sees in training).
    Accept length tau = accepted drafts + 1 per round; for i.i.d. acceptance a, E[tau] = (1 - a^(N+1)) / (1 - a).

Bookkeeping per round (P = the main cache length; token c at position P is emitted but not yet in the cache):
    MTP cache: positions < P hold (main hidden h_i, Emb(t_{i+1})); drafts occupy P .. P+N-2 and are dropped.
    verify:    main forward of [c, d_1 .. d_N] at positions P .. P+N: logits p_1 .. p_{N+1}, hidden h_P .. h_{P+N}.
    accept a:  main cache -> P + 1 + a; MTP gets positions P .. P+a from (h_P.., [d_1 .. d_a, new token]).

Choices: batch size 1 (rows would accept different lengths); draft_steps larger than the trained MTP depth is
allowed (the layer simply recurses further; acceptance falls) and warns; draft_steps = 0 is plain decoding.
Not handled: tree drafting (eagle-topk > 1), batched speculation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from glm5_ref.dsa import DSACache
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.sampling import check_sampling, new_generator, nucleus_probs, pad_after_stop


@dataclass
class SpecStats:
    rounds: int = 0
    accept_lengths: list[int] = field(default_factory=list)   # accepted drafts + 1, per round
    depth_tries: list[int] = field(default_factory=list)      # drafts at depth j that were checked
    depth_accepts: list[int] = field(default_factory=list)    # ... and accepted

    @property
    def accept_length(self) -> float:
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def depth_acceptance(self) -> list[float]:
        return [a / t if t else float("nan") for a, t in zip(self.depth_accepts, self.depth_tries)]


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """(V,) logits -> one token: argmax at temperature 0, else a draw from the nucleus distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(nucleus_probs(logits[None], temperature, top_p)[0], 1, generator=gen)[0]


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, draft: int, gen: torch.Generator) -> tuple[bool, int | None]:
    """The rejection-sampling rule (Leviathan et al. 2023, Algorithm 1) for one draft token drawn from q.

    Accept with probability min(1, p(draft) / q(draft)); otherwise return a replacement drawn from
    norm(max(0, p - q)). Whatever q is, the emitted token is distributed exactly as p (tested).
    """
    if bool(torch.rand((), generator=gen, device=p.device) < torch.clamp(p[draft] / q[draft], max=1.0)):
        return True, None
    residual = torch.clamp(p - q, min=0)
    residual = residual / residual.sum() if float(residual.sum()) > 0 else p  # p == q: nothing to correct
    return False, int(torch.multinomial(residual, 1, generator=gen)[0])


@torch.no_grad()
def speculative_generate(model: GLM5ForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, draft_steps: int,
                         temperature: float = 0.0, top_p: float = 1.0, stop_tokens: list[int] | None = None,
                         seed: int | None = None, cache=None) -> tuple[torch.Tensor, SpecStats]:
    """Generate with MTP drafts verified by the main model; returns ids (1, T + new) and statistics.
    ``cache``: an empty GLM5Cache to decode into (else one is made), so a caller can inspect it afterwards."""
    if isinstance(draft_steps, bool) or not isinstance(draft_steps, int) or draft_steps < 1:
        raise ValueError(f"draft_steps: expected a positive integer (0 means plain decoding), got {draft_steps!r}")
    if model.mtp is None:
        raise ValueError("draft_steps: this model has no MTP layer (config.num_nextn_predict_layers = 0)")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: speculative decoding takes one sequence, shape (1, T), got {tuple(input_ids.shape)}")
    if draft_steps > model.config.num_mtp_depths:
        warnings.warn(f"draft_steps = {draft_steps} exceeds the {model.config.num_mtp_depths} MTP depths trained; "
                      "the layer recurses further and acceptance drops", stacklevel=2)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected a non-negative integer, got {max_new_tokens!r}")
    check_sampling(temperature, top_p)
    T0 = input_ids.shape[1]
    p = model.lm_head.weight
    input_ids = input_ids.to(p.device)  # the prompt, the generator and every block on the model's device
    gen = new_generator(seed, input_ids.device)
    stop = set(stop_tokens or [])
    max_len = T0 + max_new_tokens + draft_steps + 1
    if cache is None:
        cache = model.new_cache(1, max_len)
    elif cache.length != 0 or cache.max_len < max_len:
        raise ValueError(f"cache: expected an empty cache of max_len >= {max_len}, got length {cache.length}, "
                         f"max_len {cache.max_len}")
    mtp_cache = DSACache.for_config(model.config, 1, max_len, dtype=p.dtype, device=p.device)
    embed, mtp = model.model.embed_tokens, model.mtp
    draft_ex = model.execution.replace(absorbed=True)  # the MTP layer decodes over its own latent cache
    stats = SpecStats(depth_tries=[0] * draft_steps, depth_accepts=[0] * draft_steps)

    out = model(input_ids, cache=cache)
    hidden = model.model.norm(out.hidden_states)  # (1, T0, D): main hidden at positions 0..T0-1
    seq = input_ids[0].tolist()
    seq.append(int(_pick(out.logits[0, -1], temperature, top_p, gen)))
    while len(seq) - T0 < max_new_tokens and seq[-1] not in stop:
        P = cache.length  # == len(seq) - 1: the newest token is emitted but not yet in the main cache
        # 1. MTP catches up on the committed positions, then drafts recursively
        m = mtp_cache.length
        nxt = torch.tensor([seq[m + 1:P + 1]], device=input_ids.device)  # tokens one step ahead of m .. P-1
        h = mtp.step(hidden[:, -(P - m):], embed(nxt), cache=mtp_cache, execution=draft_ex).hidden
        drafts, q_dists = [], []
        for j in range(draft_steps):
            logits = mtp.logits(h[:, -1:], model.lm_head)[0, 0]  # (V,)
            q_dists.append(None if temperature == 0 else nucleus_probs(logits[None], temperature, top_p)[0])
            drafts.append(int(_pick(logits, temperature, top_p, gen)))
            if j + 1 < draft_steps:
                h = mtp.step(h[:, -1:], embed(torch.tensor([[drafts[-1]]], device=input_ids.device)),
                             cache=mtp_cache, execution=draft_ex).hidden
        mtp_cache.truncate(P)  # draft entries never stay
        # 2. one main forward verifies all drafts
        block = torch.tensor([[seq[-1]] + drafts], device=input_ids.device)  # (1, N + 1)
        out = model(block, cache=cache)
        target = out.logits[0]  # (N + 1, V): p_1 .. p_{N+1}
        accepted, new_token = 0, None
        for j, d in enumerate(drafts):
            stats.depth_tries[j] += 1
            if temperature == 0:
                ok = d == int(target[j].argmax())
            else:
                ok, new_token = accept_or_resample(nucleus_probs(target[j][None], temperature, top_p)[0],
                                                   q_dists[j], d, gen)
            if not ok:
                break
            stats.depth_accepts[j] += 1
            accepted += 1
            if d in stop:  # a stop token ends the sequence: later drafts do not count
                break
        if new_token is None:
            new_token = int(_pick(target[accepted], temperature, top_p, gen))
        stats.rounds += 1
        stats.accept_lengths.append(accepted + 1)
        # 3. roll back past the rejected drafts, commit the accepted ones and the new token
        cache.truncate(P + 1 + accepted)
        hidden = model.model.norm(out.hidden_states[:, :accepted + 1])  # (1, a + 1, D): positions P .. P+a
        emitted = drafts[:accepted] + ([new_token] if not (accepted and drafts[accepted - 1] in stop) else [])
        seq.extend(emitted)
    seq = seq[:T0 + max_new_tokens]
    cache.truncate(min(cache.length, len(seq) - 1))  # the last round may have verified past the end
    ids = torch.tensor([seq], device=input_ids.device)
    return pad_after_stop(ids, T0, stop_tokens, T0 + max_new_tokens), stats  # as generate() pads
