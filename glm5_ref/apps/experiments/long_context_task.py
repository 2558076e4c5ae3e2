"""The long-context recall task of the long-context DSA experiment (long_context.py), and its cost accounting.

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
    what the indexer's top-k must contain: the property DSA has to preserve. Also here: the experiment's model config, the recency / random control
selections of the same size as the indexer's (plugged in through Execution.key_selector), and the
multiply-adds of dense MLA against DSA per layer.
"""

from __future__ import annotations

import numpy as np
import torch

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import select_topk

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
    from glm5_ref.training.data import build_splits

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


def control_selector(kind: str, topk: int, seed: int = 0):
    """An Execution.key_selector that picks keys by ``kind`` ("recency" / "random") instead of the indexer, with
    the same k (and the same "dense while everything fits" rule, which DSAAttention applies before asking)."""
    if kind not in ("recency", "random"):
        raise ValueError(f"kind: expected 'recency' or 'random', got {kind!r}")

    def select(layer_idx: int, query_pos: torch.Tensor, num_keys: int, batch_size: int) -> torch.Tensor:
        return control_selection(kind, query_pos, num_keys, topk, batch_size, seed=seed * 1000 + layer_idx)
    return select


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
