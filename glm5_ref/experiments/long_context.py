"""Does DSA keep long-context recall? Dense vs warm-up only vs DSA vs a recency control (paper Tables 3 and 6).

The claim (GLM-5 report, section "DSA"; glm5_spec.md section 9)
    After a dense indexer warm-up (everything but the indexer frozen, indexer trained by KL to the main
    attention) and a short sparse adaptation (top-k on, indexer trained by KL on the selected keys with
    detached input, the rest by the LM loss), a model that attends to only k keys per query keeps its
    long-context accuracy: Table 3 (MLA vs DSA on 128K retrieval tasks) and Table 6 (warm-up alone loses
    points at the longest contexts, joint training recovers them).

The task (deterministic from a seed)
    Code-like filler: a window of the classroom corpus (CPython standard library, classroom tokenizer, ids
    < 4096; training draws from the train split, evaluation from the validation split). Into it we insert
    ``n_pairs`` key-value pairs "k v" at uniformly random depths (the needles). Key and value tokens are
    extra ids that never occur in the filler; keys are distinct within a sequence; each of the 16 keys owns
    16 value tokens and a pair's value is drawn from its key's family. The sequence ends with SEP and a
    query block "k v" for every pair in random order:

        [filler ... k_1 v_1 ... filler ... k_2 v_2 ... filler] SEP k_3 v_3 k_1 v_1 k_2 v_2      (length L)

    The model is trained (and scored) only on predicting each v after its k in the query block: multi-query
    recall (MQAR, ``n_pairs = 8``) and needle in a haystack (NIAH, ``n_pairs = 1``). Accuracy = fraction of
    queries whose argmax over the whole vocabulary is the right value; the number we report per length is
    the mean of the MQAR and NIAH accuracies. Knowing the key's family but not reading the needle gives
    1/16 (``chance``).

    Why value families (a choice, and a simplification): with values shared by all keys, recall needs the
    two-step induction circuit (layer 1 copies "previous token = k" onto v, layer 2 matches it). At this
    size and CPU budget that circuit did not form: answer loss stayed at the "copy some value in context"
    plateau (~1.4 nats, vs ln 16 = 2.8 at chance) for 1,360 AdamW steps at lr 3e-3. With families the
    query finds its needle in one content-based hop (the value token itself says which key it answers),
    which the model learns in ~200 steps. The needle is still ONE token among up to 4K, which is exactly
    what the indexer's top-k must contain: the property DSA has to preserve.

The four models (per seed, on the same data)
    (a) dense:        GLM-5 (MLA + indexer + MoE) trained with dense attention on the task;
    (b) warmup_only:  (a) + dense indexer warm-up (indexer KL, everything else frozen), evaluated sparse;
    (c) dsa:          (b) + sparse adaptation (top-k on, detach_indexer_input, LM loss + selected-set KL);
    (d) control:      (a)'s weights evaluated with the SAME k but a recency-only selection (the k most recent
                      keys: a sliding window); ``control_random`` (k keys drawn at random, the query's own key
                      always kept) is reported beside it. Both override DSAAttention.select_keys per module.
    Training runs at the evaluated lengths: the dense stage's curriculum (64 -> 1024 tokens) ends on 1K-4K
    contexts and the warm-up and sparse adaptation draw 1K, 2K or 4K tokens; evaluation runs at 512, 1K, 2K
    and 4K. (``--quick`` keeps the previous 64-1024-token recipe, ``SCHEDULE_1K``, to stay under a minute.)

Also measured
    * mass captured: for (b) and (c), run dense attention and sum the attention probability (mean over heads,
      over query tokens) that falls on the indexer's top-k; the recency window's capture beside it.
    * multiply-adds of the attention core per layer at each length (``attention_macs``): dense MLA pairs
      L(L+1)/2 times H (d_qk + d_v) against selected pairs sum_t min(k, t+1) times H (d_qk + d_v) plus the
      dense indexer J d_I per pair (projections, identical in both, are not counted). The same formula for
      the published GLM-5 sizes (k = 2048) is reported beside it.

Choices where the paper is silent: sizes (2 layers, hidden 64, 4 heads, k = 64 = 1/64 of the longest
context, GLM-5's own ratio 2048 / 128K, so that even at 512 tokens the selection matters); the recipe
(AdamW; dense 700 steps at lr 3e-3 over a 64 -> 1024-token curriculum whose last 20% draws 1K, 2K or 4K;
warm-up 200 steps at lr 5e-3 and sparse adaptation 70 steps at lr 3e-4, both on 1K-4K tokens; 4096 tokens
per batch, i.e. one sequence at 4K; lr warm-up then cosine to 10%; step counts sized so that 2 seeds in
parallel finish in ~30 minutes on 2 CPU cores: a 4K step costs ~3 s dense, ~5 s warm-up, ~11 s sparse); loss only on the answers; the control uses the dense model's weights (the
selection is the only difference from (b)); accuracy excludes nothing, no retries.

What we tried first (recorded, not hidden): a warm-up of 150 steps on 512-1024 tokens and a sparse stage of
150 steps at a constant lr 3e-4 gave, for seed 0 at 512/1K/2K/4K, dense 0.98/0.97/0.76/0.51, warm-up only
0.84/0.80/0.70/0.27, DSA 0.82/0.80/0.64/0.27, recency control 0.19/0.13/0.05/0.06: the indexer had not
converged (warm-up KL still 0.6 nats) and the sparse stage, starting from that, did not recover. A longer
warm-up on shorter contexts is the change; the evaluation is unchanged.
The second recipe (dense 700 steps ending on 512-1024 tokens, warm-up 300 steps on 256-1024, sparse 200 steps
on 512-1024; training never saw 2K or 4K) gave, mean of seeds 0 and 1 at 512/1K/2K/4K, dense
0.968/0.942/0.809/0.566, warm-up only 0.958/0.915/0.781/0.316, DSA 0.958/0.898/0.754/0.352, recency control
0.167/0.120/0.098/0.070: DSA within 2 points only at 512. Training at the evaluated lengths is the change
that followed; the evaluation is unchanged.

Not handled: real long-context benchmarks (RULER, SQuAD), contexts beyond 4K, decode-time evaluation (the
full forward selects exactly what cached decoding selects: tested in tests/test_dsa.py).

Run: ``python -m glm5_ref experiment long-context [--quick] [--seeds 0,1]``.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import math
import multiprocessing
import os
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention, select_topk
from glm5_ref.experiments import write_json
from glm5_ref.model import GLM5ForCausalLM, GLM5Output
from glm5_ref.train import set_dsa_stage

STEM = "long_context_dsa"
LENGTHS = [512, 1024, 2048, 4096]
MODELS = ("dense", "warmup_only", "dsa", "control")
BASE_VOCAB = 4096  # classroom tokenizer ids (filler)
N_KEYS, VALUES_PER_KEY = 16, 16
SEP = BASE_VOCAB  # separates the haystack from the query block
KEY0 = BASE_VOCAB + 1  # key tokens KEY0 .. KEY0 + N_KEYS - 1
VAL0 = KEY0 + N_KEYS  # value tokens: key i owns VAL0 + i * VALUES_PER_KEY + (0 .. VALUES_PER_KEY - 1)
VOCAB = VAL0 + N_KEYS * VALUES_PER_KEY
TASKS = {"mqar": 8, "niah": 1}  # task -> number of key-value pairs (= queries) per sequence


# ---- the task -----------------------------------------------------------------------------------------------
def filler_streams() -> dict[str, torch.Tensor]:
    """The classroom corpus as token streams: {"train": (N,), "val": (M,)} ids < 4096."""
    from glm5_ref.data import build_splits

    splits = build_splits()
    return {"train": splits.train.ids, "val": splits.val.ids}


def make_example(rng: np.random.Generator, length: int, n_pairs: int, stream: torch.Tensor) -> dict:
    """One sequence of exactly ``length`` tokens. Returns ids (L,) int64, labels (L,) (-100 except the answers:
    labels[p + 1] = value for a query key at position p), query_pos (Q,), answers (Q,), needle_pos (Q,) (the
    position of each queried pair's value token in the haystack)."""
    if n_pairs < 1 or n_pairs > N_KEYS:
        raise ValueError(f"n_pairs: expected 1..{N_KEYS}, got {n_pairs}")
    tail = 1 + 2 * n_pairs  # SEP + the query block
    n_fill = length - 2 * n_pairs - tail
    if n_fill < 1:
        raise ValueError(f"length: expected more than {4 * n_pairs + 1} tokens for {n_pairs} pairs, got {length}")
    if stream.numel() < n_fill:
        raise ValueError(f"stream: expected at least {n_fill} filler tokens, got {stream.numel()}")
    start = int(rng.integers(0, stream.numel() - n_fill + 1))
    fill = stream[start:start + n_fill].numpy()  # (F,)
    key_idx = rng.choice(N_KEYS, size=n_pairs, replace=False)  # (P,) distinct keys
    keys = key_idx + KEY0
    values = VAL0 + key_idx * VALUES_PER_KEY + rng.integers(0, VALUES_PER_KEY, size=n_pairs)  # (P,) key's family
    cuts = np.sort(rng.integers(0, n_fill + 1, size=n_pairs))  # insertion points in the filler
    pieces, needle_pos, pos, prev = [], [], 0, 0
    for cut, k, v in zip(cuts, keys, values):
        pieces.append(fill[prev:cut])
        pos += cut - prev
        pieces.append(np.array([k, v]))
        needle_pos.append(pos + 1)  # the value token
        pos += 2
        prev = cut
    pieces.append(fill[prev:])
    order = rng.permutation(n_pairs)
    query = np.stack([keys[order], values[order]], axis=1).reshape(-1)  # (2P,) k v k v ...
    ids = np.concatenate(pieces + [np.array([SEP]), query]).astype(np.int64)  # (L,)
    assert ids.shape[0] == length
    query_pos = length - 2 * n_pairs + 2 * np.arange(n_pairs)  # (P,) positions of the query keys
    labels = np.full(length, -100, dtype=np.int64)
    labels[query_pos + 1] = ids[query_pos + 1]
    return {"ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "query_pos": torch.from_numpy(query_pos), "answers": torch.from_numpy(values[order].astype(np.int64)),
            "needle_pos": torch.tensor(needle_pos, dtype=torch.int64)[torch.from_numpy(order)]}


def make_batch(seed: int, length: int, batch_size: int, n_pairs: int | list[int], stream: torch.Tensor) -> dict:
    """``batch_size`` examples from one seed: stacked ids/labels (B, L); query_pos, answers (B, Q) when every
    example has the same number of pairs. ``n_pairs`` may be a list (one per example, training mixes)."""
    rng = np.random.default_rng(seed)
    counts = n_pairs if isinstance(n_pairs, list) else [n_pairs] * batch_size
    exs = [make_example(rng, length, n, stream) for n in counts]
    out = {"ids": torch.stack([e["ids"] for e in exs]), "labels": torch.stack([e["labels"] for e in exs])}
    if len(set(counts)) == 1:
        for name in ("query_pos", "answers", "needle_pos"):
            out[name] = torch.stack([e[name] for e in exs])
    return out


# ---- model and selection controls ----------------------------------------------------------------------------
def experiment_config(index_topk: int = 64) -> GLM5Config:
    """A 2-layer GLM-5 (MLA + lightning indexer + a small MoE in layer 1), positions up to 4096."""
    return GLM5Config(
        name="long-context", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, max_position_embeddings=4096,
        num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, rope_theta=10_000.0, index_n_heads=2, index_head_dim=32, index_topk=index_topk,
        intermediate_size=128, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, num_nextn_predict_layers=0,
    )


def control_selection(kind: str, query_pos: torch.Tensor, num_keys: int, topk: int, batch_size: int,
                      seed: int = 0) -> torch.Tensor:
    """A selection of the same size as the indexer's: (B, T, min(topk, S)) key positions, -1 = padding.
    "recency": keys t-k+1 .. t (a sliding window); "random": the query's own key plus k-1 causal keys drawn
    uniformly without replacement (seeded)."""
    if kind not in ("recency", "random"):
        raise ValueError(f"kind: expected 'recency' or 'random', got {kind!r}")
    K = min(topk, num_keys)
    if kind == "recency":
        idx = query_pos[:, None] - torch.arange(K - 1, -1, -1, device=query_pos.device)  # (T, K)
        idx = torch.where(idx < 0, -1, idx)
        return idx[None].expand(batch_size, -1, -1).clone()  # (B, T, K)
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch_size, query_pos.shape[0], num_keys, generator=g)  # (B, T, S)
    s = torch.arange(num_keys)
    noise = noise.masked_fill(s[None, None] == query_pos[None, :, None].cpu(), 2.0)  # own key always first
    return select_topk(noise.to(query_pos.device), query_pos, topk)


class selection_override:
    """Context manager: every DSAAttention of ``model`` selects keys by ``kind`` ("recency" / "random") instead
    of by its indexer, with the same k and the same "dense while everything fits" rule."""

    def __init__(self, model: torch.nn.Module, kind: str, seed: int = 0):
        if kind not in ("recency", "random"):
            raise ValueError(f"kind: expected 'recency' or 'random', got {kind!r}")
        self.model, self.kind, self.seed = model, kind, seed

    def __enter__(self):
        self.modules = [m for m in self.model.modules() if isinstance(m, DSAAttention)]
        for i, m in enumerate(self.modules):
            def select_keys(this, x, c_q, positions, cache, _layer=i):
                start = cache.length if cache is not None else 0
                T = x.shape[1]
                if not this.sparse or start + T <= this.config.index_topk:
                    return None
                q = torch.arange(start, start + T, device=x.device)  # (T,)
                this._selected = control_selection(self.kind, q, start + T, this.config.index_topk, x.shape[0],
                                                   seed=self.seed * 1000 + _layer)
                return this._selected
            m.select_keys = types.MethodType(select_keys, m)  # instance attribute shadows the class method
        return self.model

    def __exit__(self, *exc):
        for m in self.modules:
            del m.select_keys
        return False


def set_sparse(model: torch.nn.Module, sparse: bool) -> None:
    for m in model.modules():
        if isinstance(m, DSAAttention):
            m.sparse = sparse


# ---- cost accounting ------------------------------------------------------------------------------------------
def attention_macs(length: int, topk: int, n_heads: int, qk_dim: int, v_dim: int, index_heads: int,
                   index_dim: int) -> dict:
    """Multiply-adds of one layer's attention core over a causal sequence of ``length`` tokens (prefill).

    dense  = pairs_dense * H (d_qk + d_v)          pairs_dense  = sum_t (t + 1)        = L (L + 1) / 2
    dsa    = pairs_sparse * H (d_qk + d_v) + pairs_dense * J d_I    pairs_sparse = sum_t min(k, t + 1)
    (scores q.k and the weighted sum of values per head; the indexer scores every causal pair.)"""
    for name, v in (("length", length), ("topk", topk), ("n_heads", n_heads), ("qk_dim", qk_dim),
                    ("v_dim", v_dim), ("index_heads", index_heads), ("index_dim", index_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v!r}")
    L, k = length, topk
    pairs_dense = L * (L + 1) // 2
    m = min(k, L)
    pairs_sparse = m * (m + 1) // 2 + (L - m) * k
    per_pair = n_heads * (qk_dim + v_dim)
    dense = pairs_dense * per_pair
    dsa = pairs_sparse * per_pair + pairs_dense * index_heads * index_dim
    return {"pairs_dense": pairs_dense, "pairs_sparse": pairs_sparse, "dense_macs": dense, "dsa_macs": dsa,
            "saved_macs": dense - dsa, "saved_fraction": 1 - dsa / dense, "speedup": dense / dsa}


def config_macs(config: GLM5Config, length: int, topk: int | None = None) -> dict:
    return attention_macs(length, topk or config.index_topk, config.num_attention_heads, config.qk_head_dim,
                          config.v_head_dim, config.index_n_heads, config.index_head_dim)


# ---- training -------------------------------------------------------------------------------------------------
def _lengths_for(step: int, steps: int, schedule: list[tuple[float, list[int]]]) -> list[int]:
    for frac, lengths in schedule:
        if step < frac * steps:
            return lengths
    return schedule[-1][1]


def answer_forward(model: GLM5ForCausalLM, ids: torch.Tensor, labels: torch.Tensor | None = None,
                   indexer_loss: bool = False, positions_only: torch.Tensor | None = None,
                   absorbed: bool = False) -> GLM5Output:
    """GLM5ForCausalLM.forward without the (B, T, V) logits of tokens nobody scores: the LM head runs only
    where labels != -100 (training) or at ``positions_only`` (B, Q) (evaluation; logits come back (B, Q, V)).
    The same layers and losses as the model's forward (CE + balance + mean indexer KL); no MTP. ``absorbed``:
    the absorbed MLA path, whose sparse attention gathers the k selected latents (dsa.py; equal to the
    masked expanded path, tested there) and so is much cheaper at 4K: evaluation of sparse models uses it."""
    B, T = model._check_ids(ids, None)
    x = model.model.embed_tokens(ids)  # (B, T, D)
    positions = torch.arange(T, device=ids.device)  # (T,)
    kls, auxes = [], []
    for layer in model.model.layers:
        x, kl, aux = layer(x, positions, None, absorbed, indexer_loss)
        kls += [kl] if kl is not None else []
        auxes += [aux] if aux is not None else []
    out = GLM5Output(logits=x.new_zeros(0), tokens_per_expert=[a.tokens_per_expert for a in auxes])
    out.balance_loss = sum((a.balance_loss for a in auxes), x.new_zeros(()))
    if positions_only is not None:
        rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
        out.logits = model.lm_head(model.model.norm(x[rows, positions_only])).float()  # (B, Q, V)
    if indexer_loss:
        out.indexer_loss = torch.stack(kls).mean()
    if labels is not None:
        where = labels[:, 1:] != -100  # (B, T - 1): position t predicts labels[t + 1]
        h = x[:, :-1][where]  # (N, D)
        logits = model.lm_head(model.model.norm(h)).float()  # (N, V)
        out.lm_loss = F.cross_entropy(logits, labels[:, 1:][where])
        out.loss = out.lm_loss + out.balance_loss + (out.indexer_loss if indexer_loss else 0.0)
    return out


def train_stage(model: GLM5ForCausalLM, stage: str, steps: int, lr: float, batch_tokens: int,
                schedule: list[tuple[float, list[int]]], stream: torch.Tensor, seed: int, log: list,
                warmup_frac: float = 0.05, cosine: bool = True, progress=None, max_pairs: int = 8) -> None:
    """``steps`` AdamW steps of one DSA stage ("dense", "warmup", "sparse"; glm5_ref.train.set_dsa_stage).
    Batches hold ``batch_tokens`` tokens at a length drawn from the schedule; each training example has 1 to
    ``max_pairs`` pairs. Loss: answers' cross-entropy (dense, sparse) + indexer KL (sparse), or indexer KL alone (warmup)."""
    set_dsa_stage(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    for step in range(steps):
        p = step / max(steps, 1)
        factor = min(1.0, p / warmup_frac) if warmup_frac > 0 and p < warmup_frac else (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (p - warmup_frac) / (1 - warmup_frac))) if cosine else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * max(factor, 1e-3)
        lengths = _lengths_for(step, steps, schedule)
        L = int(rng.choice(lengths))
        B = max(1, batch_tokens // L)
        counts = [int(c) for c in rng.integers(1, max_pairs + 1, size=B)]
        batch = make_batch(int(rng.integers(2**31)), L, B, counts, stream)
        out = answer_forward(model, batch["ids"], batch["labels"], indexer_loss=stage != "dense")
        loss = out.indexer_loss if stage == "warmup" else out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{stage} step {step}: loss {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if stage != "warmup":
            with torch.no_grad():
                model.update_router_biases(out.tokens_per_expert)
        if step % 25 == 0 or step == steps - 1:
            rec = {"stage": stage, "step": step, "length": L, "loss": round(float(loss.detach()), 4),
                   "lm_loss": round(float(out.lm_loss.detach()), 4) if out.lm_loss is not None else None,
                   "indexer_loss": round(float(out.indexer_loss.detach()), 4) if out.indexer_loss is not None else None}
            log.append(rec)
            if progress:
                progress(rec)
    for p_ in model.parameters():
        p_.requires_grad_(True)
    model.eval()


# ---- evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def recall_accuracy(model: GLM5ForCausalLM, batches: list[dict], absorbed: bool = False) -> float:
    """Fraction of queries whose argmax (whole vocabulary) at the query key is the right value."""
    hits, total = 0, 0
    for b in batches:
        pred = answer_forward(model, b["ids"], positions_only=b["query_pos"], absorbed=absorbed).logits.argmax(-1)  # (B, Q)
        hits += int((pred == b["answers"]).sum())
        total += pred.numel()
    return hits / max(total, 1)


@torch.no_grad()
def mass_captured(model: GLM5ForCausalLM, ids: torch.Tensor, query_only: bool = False) -> dict:
    """Run the model with DENSE attention; per layer, the mean over heads and query tokens (only those with
    more causal keys than k) of the attention probability on (i) the indexer's top-k and (ii) the k most
    recent keys. ``query_only``: average over the answer-bearing query tokens instead of every token
    (they are the last 2 * n_pairs tokens; we use the last 16). Returns {"indexer": [...], "recency": [...]}."""
    cfg = model.config
    k = cfg.index_topk
    B, T = ids.shape
    positions = torch.arange(T)
    x = model.model.embed_tokens(ids)  # (B, T, D)
    out = {"indexer": [], "recency": []}
    rows = slice(T - 16, T) if query_only else slice(k, T)
    for layer in model.model.layers:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        old = attn.sparse
        attn.sparse = False
        try:
            _, probs = super(DSAAttention, attn).forward(h, positions, return_probs=True)  # (B, H, T, T) dense
        finally:
            attn.sparse = old
        c_q = attn.q_latent(h)
        scores = attn.indexer(h, c_q, positions)  # (B, T, T)
        sel = select_topk(scores, positions, k)  # (B, T, K)
        p = probs.float().mean(1)  # (B, T, S): mean over heads
        got = torch.gather(p, -1, sel.clamp_min(0)) * (sel >= 0)
        rec = control_selection("recency", positions, T, k, B)
        got_r = torch.gather(p, -1, rec.clamp_min(0)) * (rec >= 0)
        out["indexer"].append(float(got.sum(-1)[:, rows].mean()))
        out["recency"].append(float(got_r.sum(-1)[:, rows].mean()))
        x, _, _ = layer(x, positions)
    return out


def eval_sets(seed: int, lengths: list[int], n_seqs: dict[str, int], stream: torch.Tensor,
              max_batch_tokens: int = 8192, token_budget: int = 0) -> dict:
    """{length: {task: [batches]}}, deterministic from ``seed`` (the same for every model). Sequences per
    task: max(n_seqs[task], token_budget // length) (more at short lengths, where they are cheap)."""
    sets = {}
    for L in lengths:
        sets[L] = {}
        for ti, (task, n_pairs) in enumerate(TASKS.items()):
            n = max(n_seqs[task], token_budget // L)
            per = max(1, min(n, max_batch_tokens // L))
            batches = []
            for bi, first in enumerate(range(0, n, per)):
                bseed = 10_000_000 + seed * 100_000 + L * 10 + ti * 1000 + bi
                batches.append(make_batch(bseed, L, min(per, n - first), n_pairs, stream))
            sets[L][task] = batches
    return sets


def evaluate_model(model: GLM5ForCausalLM, sets: dict, mode: str, seed: int = 0) -> dict:
    """Accuracy per length and task for ``mode``: "dense", "sparse" (indexer top-k), "recency", "random"."""
    res = {}
    set_sparse(model, mode != "dense")
    for L, tasks in sets.items():
        res[L] = {}
        for task, batches in tasks.items():
            if mode in ("recency", "random"):
                with selection_override(model, mode, seed=seed):
                    res[L][task] = recall_accuracy(model, batches, absorbed=True)
            else:
                res[L][task] = recall_accuracy(model, batches, absorbed=mode == "sparse")
        res[L]["mean"] = float(np.mean([res[L][t] for t in tasks]))
    return res


# ---- the experiment -----------------------------------------------------------------------------------------
LR = {"dense": 3e-3, "warmup": 5e-3, "sparse": 3e-4}
# The full run trains at the evaluated lengths: the dense stage ends on 1K-4K contexts, warm-up and sparse
# adaptation draw 1K, 2K or 4K tokens per sequence (one 4K sequence per step at the longest).
SCHEDULE = {"dense": [(0.25, [64, 128]), (0.45, [128, 256]), (0.6, [256, 512]), (0.8, [512, 1024]),
                      (1.0, [1024, 2048, 4096])],
            "warmup": [(1.0, [1024, 2048, 4096])], "sparse": [(1.0, [1024, 2048, 4096])]}
# The previous recipe (training stops at 1K; 2K and 4K are extrapolation), kept for --quick, which must stay
# under a minute: a 4K sparse step costs ~10 s on one CPU thread.
SCHEDULE_1K = {"dense": [(0.3, [64, 128]), (0.55, [128, 256]), (0.8, [256, 512]), (1.0, [512, 1024])],
               "warmup": [(1.0, [256, 512, 1024])], "sparse": [(1.0, [512, 1024])]}
SIZES = {
    # steps per stage, training batch tokens, evaluation sequences per task and length (at least; more at
    # short lengths: eval_token_budget // length), sequences for the attention-mass measurement
    "full": {"dense": 700, "warmup": 200, "sparse": 70, "batch_tokens": 4096, "eval": {"mqar": 8, "niah": 16},
             "eval_token_budget": 32768, "mass_seqs": 1, "lengths": LENGTHS},
    "quick": {"dense": 40, "warmup": 8, "sparse": 8, "batch_tokens": 1024, "eval": {"mqar": 2, "niah": 2},
              "eval_token_budget": 0, "mass_seqs": 1, "lengths": [512, 1024], "schedule": SCHEDULE_1K},
}


def run_seed(seed: int, size: dict, streams: dict, verbose: bool = True, config: GLM5Config | None = None,
             schedule: dict | None = None, keep_models: bool = False) -> dict:
    """Train (a), (b), (c) from ``seed`` and evaluate (a)-(d) on the same sequences. ``size``: a SIZES entry;
    ``config``, ``schedule``: defaults experiment_config() and SCHEDULE (the notebook passes smaller ones);
    ``keep_models``: also return the three models under "models"."""
    torch.manual_seed(seed)
    cfg = config or experiment_config()
    sched = schedule or size.get("schedule") or SCHEDULE
    lr = {**LR, **size.get("lr", {})}
    log: list[dict] = []
    t0 = time.perf_counter()

    def progress(rec):
        if verbose:
            print(f"  seed {seed} {rec} {time.perf_counter() - t0:.0f}s", flush=True)

    model = GLM5ForCausalLM(cfg)
    train_stage(model, "dense", size["dense"], lr["dense"], size["batch_tokens"], sched["dense"],
                streams["train"], seed * 7 + 1, log, progress=progress, max_pairs=size.get("max_pairs", 8))
    dense = copy.deepcopy(model)
    train_stage(model, "warmup", size["warmup"], lr["warmup"], size["batch_tokens"], sched["warmup"],
                streams["train"], seed * 7 + 2, log, warmup_frac=0.1, progress=progress,
                max_pairs=size.get("max_pairs", 8))
    warm = copy.deepcopy(model)
    train_stage(model, "sparse", size["sparse"], lr["sparse"], size["batch_tokens"], sched["sparse"],
                streams["train"], seed * 7 + 3, log, warmup_frac=0.1, cosine=True,
                progress=progress, max_pairs=size.get("max_pairs", 8))
    dsa = model
    train_s = time.perf_counter() - t0

    sets = eval_sets(seed, size["lengths"], size["eval"], streams["val"], token_budget=size["eval_token_budget"])
    sets = {L: {t: b for t, b in ts.items() if b} for L, ts in sets.items()}  # a task with 0 sequences: skipped
    acc = {"dense": evaluate_model(dense, sets, "dense"), "warmup_only": evaluate_model(warm, sets, "sparse"),
           "dsa": evaluate_model(dsa, sets, "sparse"), "control": evaluate_model(dense, sets, "recency"),
           "control_random": evaluate_model(dense, sets, "random", seed=seed)}
    mass = {}
    for L in size["lengths"]:
        ids = next(iter(sets[L].values()))[0]["ids"][:size["mass_seqs"]]  # MQAR if evaluated
        mass[L] = {name: mass_captured(m, ids) for name, m in (("warmup_only", warm), ("dsa", dsa))}
        mass[L].update({f"{name}_queries": mass_captured(m, ids, query_only=True)
                        for name, m in (("warmup_only", warm), ("dsa", dsa))})
    if verbose:
        for name, res in acc.items():
            print(f"  seed {seed} {name:15s} " + " ".join(f"{L}:{res[L]['mean']:.3f}" for L in res), flush=True)
        print(f"  seed {seed}: train {train_s:.0f}s, total {time.perf_counter() - t0:.0f}s", flush=True)
    out = {"accuracy": acc, "mass": mass, "log": log, "train_seconds": train_s,
           "total_seconds": time.perf_counter() - t0}
    if keep_models:
        out["models"] = {"dense": dense, "warmup_only": warm, "dsa": dsa}
    return out


def _seed_worker(seed: int, size_name: str) -> dict:
    torch.set_num_threads(1)
    return run_seed(seed, SIZES[size_name], filler_streams(), verbose=True)


def run(quick: bool = False, out_dir: str | None = None, seeds: list[int] | None = None) -> dict:
    torch.set_num_threads(1)
    size = SIZES["quick" if quick else "full"]
    seeds = list(seeds) if seeds else ([0] if quick else [0, 1])
    out_dir = Path(out_dir) if out_dir is not None else Path("runs/experiments/long-context" + ("-quick" if quick else ""))
    streams = filler_streams()
    cfg = experiment_config()
    lengths = size["lengths"]
    t0 = time.perf_counter()
    workers = min(len(seeds), os.cpu_count() or 1) if not quick else 1
    if workers > 1:  # seeds are independent: one process each (1 torch thread per process)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            per_seed = dict(zip(seeds, pool.map(_seed_worker, seeds, ["quick" if quick else "full"] * len(seeds))))
    else:
        per_seed = {s: run_seed(s, size, streams, verbose=not quick) for s in seeds}
    names = list(MODELS) + ["control_random"]

    def mean(vals):
        return float(np.mean(vals))

    result = {
        "experiment": "long-context", "quick": quick, "lengths": lengths, "index_topk": cfg.index_topk,
        "seeds": seeds, "tasks": dict(TASKS), "chance": 1 / VALUES_PER_KEY,
        "accuracy": {n: [mean([per_seed[s]["accuracy"][n][L]["mean"] for s in seeds]) for L in lengths]
                     for n in names},
        "accuracy_per_seed": {n: {str(s): [per_seed[s]["accuracy"][n][L]["mean"] for L in lengths] for s in seeds}
                              for n in names},
        "accuracy_by_task": {n: {t: [mean([per_seed[s]["accuracy"][n][L][t] for s in seeds]) for L in lengths]
                                 for t in TASKS} for n in names},
        "mass_captured": {
            key: {sel: [mean([float(np.mean(per_seed[s]["mass"][L][key][sel])) for s in seeds]) for L in lengths]
                  for sel in ("indexer", "recency")}
            for key in ("warmup_only", "dsa", "warmup_only_queries", "dsa_queries")},
        "mass_captured_per_layer": {str(s): {str(L): per_seed[s]["mass"][L] for L in lengths} for s in seeds},
        "attention_macs_per_layer": [dict(length=L, **config_macs(cfg, L)) for L in lengths],
        "attention_macs_glm5_per_layer": [dict(length=L, **config_macs(GLM5Config.glm5(), L)) for L in lengths],
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "training": {"steps": {k: size[k] for k in ("dense", "warmup", "sparse")}, "lr": LR,
                     "batch_tokens": size["batch_tokens"],
                     "length_schedule": {k: [[f, ls] for f, ls in v]
                                         for k, v in (size.get("schedule") or SCHEDULE).items()}},
        "eval_sequences_per_task_and_length": size["eval"],
        "train_log": {str(s): per_seed[s]["log"] for s in seeds},
        "seconds": {str(s): round(per_seed[s]["total_seconds"], 1) for s in seeds},
        "wall_seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / f"{STEM}.json", result)
    plot(result, out_dir / f"{STEM}.png")
    return result


def plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = result["lengths"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    styles = {"dense": ("k", "o", "(a) dense MLA"), "warmup_only": ("tab:orange", "s", "(b) indexer warm-up only"),
              "dsa": ("tab:blue", "^", "(c) DSA (warm-up + sparse adaptation)"),
              "control": ("tab:red", "x", "(d) recency selection, same k"),
              "control_random": ("tab:gray", "+", "(d') random selection, same k")}
    for name, (color, marker, label) in styles.items():
        if name not in result["accuracy"]:
            continue
        ax.plot(lengths, result["accuracy"][name], color=color, marker=marker, label=label)
        for vals in result["accuracy_per_seed"][name].values():
            ax.plot(lengths, vals, color=color, alpha=0.25, lw=0.8)
    ax.axhline(result["chance"], color="gray", ls=":", lw=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("recall accuracy (mean of MQAR and NIAH)")
    n = len(result["seeds"])
    ax.set_title(f"top-k = {result['index_topk']} keys per query, {n} seed{'s' if n > 1 else ''} (thin: per seed)")
    ax.legend(fontsize=7, loc="best")
    ax = axes[1]
    macs = result["attention_macs_per_layer"]
    ax.plot(lengths, [m["dense_macs"] / 1e6 for m in macs], "k-o", label="dense MLA")
    ax.plot(lengths, [m["dsa_macs"] / 1e6 for m in macs], "b-^", label="DSA (top-k attention + indexer)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("attention-core multiply-adds per layer (M)")
    ax.set_title("cost: " + ", ".join(f"{m['speedup']:.1f}x" for m in macs) + " fewer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
