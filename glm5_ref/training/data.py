"""The shipped corpora as token ids: caching, the splits, random windows, evaluation.

What it is
    Two corpora ship with the project (hash-checked by the tokenizer module): "classroom", 176 pure-Python
    modules of the CPython standard library (train / validation; tests, notebooks and quick runs use it), and
    "pretrain", every pure-Python file of the standard library with its test suite (1,602 documents, 8.3M
    training tokens; train / validation / test, ``tokenizer.corpus_split3``), on which the recipe trains the
    shipped classroom-base model. Each corpus is split BY DOCUMENT (``tokenizer.corpus_split``: a hash of each path
    decides, so no file is ever in both halves), encoded with the project tokenizer, and each half becomes one
    token stream with the documents joined by EOT (``<|endoftext|>``):

        stream = doc_1 EOT doc_2 EOT ... doc_n EOT                (uint16 ids, vocab 4112)

    Training batches are random windows of T + 1 consecutive ids, (B, T + 1), whose starts are drawn with a
    seeded ``torch.Generator``; the model reads the window and predicts its last T tokens. The sampler's
    state (generator state + batches drawn) is a small dict, so a resumed run draws exactly the batches an
    uninterrupted one would have drawn.

Evaluation: validation loss in nats per token AND bits per byte
    Nats per token depend on the tokenizer (a tokenizer with longer tokens has fewer, harder tokens). Bits per
    byte do not: it is the code length of the TEXT,

        bits/byte = (sum over predicted tokens of -ln p(token)) / (ln 2 * UTF-8 bytes of those tokens)

    The bytes of a token are the bytes it decodes to; EOT (a special token) counts 0 bytes but its loss is
    counted, which makes the number slightly pessimistic (a document boundary is not text). A uniform guess
    over the 4112 ids costs ln(4112) nats per token, about 12 / 3.6 = 3.3 bits per byte on this corpus.
    Evaluation always uses the same fixed windows: ``max_windows`` windows of T + 1 tokens spread evenly over
    the validation stream, whose scored parts (the last T tokens) never overlap; each scored token is predicted
    once, with 1 to T tokens of context. Numbers are comparable between runs with the same ``seq_len`` and
    ``max_windows``; the context length changes them a little.

The cache
    Encoding takes well under a second, but we still cache the two streams (and the document offsets) in
    ``$GLM5_REF_CACHE`` (default ``~/.cache/glm5_ref``), under a name holding the corpus sha256 and the
    tokenizer hash, written atomically (temporary file, then ``os.replace``): an edited corpus or a retrained
    tokenizer can never be served stale ids, and an interrupted write never leaves half a file.

Not handled: other corpora than the shipped ones (pass ``documents=`` to ``build_splits`` for your own list of
(name, text) pairs), padding (every window is full), data-parallel sharding of the sampler.
Axes: B batch, T tokens per window minus one, N tokens in a stream, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glm5_ref import tokenizer as tok
from glm5_ref.devices import model_device

CACHE_VERSION = 1  # bump when the cached format changes


# ---- tokenizing and caching -----------------------------------------------------------------------------------
@dataclass
class Split:
    """One half of the corpus as a token stream."""
    ids: torch.Tensor                    # (N,) int64 token ids, documents joined (and ended) by EOT
    doc_names: list[str]                 # the documents, in stream order
    doc_offsets: list[int]               # start of each document in ``ids``; document i ends at offsets[i+1]-1 (EOT)
    num_bytes: int                       # UTF-8 bytes of the documents' text (EOT not counted)

    def __len__(self) -> int:
        return int(self.ids.numel())


@dataclass
class CorpusSplits:
    train: Split
    val: Split
    test: Split | None = None            # the held-out test documents ("pretrain" only)
    key: str = ""                        # the cache key (corpus sha256 + tokenizer hash)
    cache_path: str | None = None        # where the streams were cached (None: not cached)
    from_cache: bool = False             # True if read from the cache rather than encoded now
    meta: dict = field(default_factory=dict)


def cache_dir() -> Path:
    """$GLM5_REF_CACHE, else ~/.cache/glm5_ref."""
    return Path(os.environ.get("GLM5_REF_CACHE") or Path.home() / ".cache" / "glm5_ref")


CORPORA = ("classroom", "pretrain")


def cache_key(validation_fraction: float = 0.1, seed: int = 0, corpus: str = "classroom") -> str:
    """sha256 of the corpus file and of the tokenizer's rank file and settings (hashed now, ~20 ms, so an edited
    file can never hit an old cache entry), plus the split's parameters."""
    corpus_sha = tok.sha256_file(tok.CORPUS_PATH if corpus == "classroom" else tok.PRETRAIN_CORPUS_PATH)
    tokenizer_sha = hashlib.sha256(tok.RANKS_PATH.read_bytes() + tok.META_PATH.read_bytes()).hexdigest()
    split = hashlib.sha256(f"{validation_fraction!r}:{seed}:{tok.EOT_ID}:v{CACHE_VERSION}".encode()).hexdigest()
    return f"{corpus}-{corpus_sha[:16]}_tok-{tokenizer_sha[:16]}_split-{split[:8]}"


def encode_documents(documents: list[tuple[str, str]]) -> Split:
    """(name, text) pairs -> one stream, each document followed by EOT."""
    ids, offsets, names, nbytes = [], [], [], 0
    for name, text in documents:
        offsets.append(len(ids))
        ids.extend(tok.encode(text))  # special-token strings in the text stay plain text
        ids.append(tok.EOT_ID)
        names.append(name)
        nbytes += len(text.encode("utf-8"))
    return Split(torch.tensor(ids, dtype=torch.int64), names, offsets, nbytes)


def _atomic_save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def build_splits(validation_fraction: float = 0.1, seed: int = 0, documents: list[tuple[str, str]] | None = None,
                 use_cache: bool = True, corpus: str = "classroom") -> CorpusSplits:
    """Train and validation (and, for "pretrain", test) streams of a shipped corpus (cached), or train and
    validation of ``documents`` (never cached). The "pretrain" split is 2.5% / 2.5% of the documents for
    validation / test whatever ``validation_fraction`` says."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction: expected a number in (0, 1), got {validation_fraction!r}")
    if corpus not in CORPORA:
        raise ValueError(f"corpus: expected one of {CORPORA}, got {corpus!r}")
    if documents is not None:
        train, val = tok.corpus_split(validation_fraction, seed, documents=documents)
        return CorpusSplits(encode_documents(train), encode_documents(val))
    names = ("train", "val") if corpus == "classroom" else ("train", "val", "test")
    key = cache_key(validation_fraction if corpus == "classroom" else 0.025, seed, corpus)
    path = cache_dir() / f"{key}.npz"
    if use_cache and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                parts = [Split(torch.from_numpy(z[f"{h}_ids"].astype(np.int64)), meta[h]["names"],
                               meta[h]["offsets"], meta[h]["num_bytes"]) for h in names]
            return CorpusSplits(*parts, key=key, cache_path=str(path), from_cache=True, meta=meta)
        except (OSError, KeyError, ValueError):  # unreadable cache: rebuild it below
            pass
    if corpus == "classroom":
        docs = tok.corpus_split(validation_fraction, seed)  # checks the corpus sha256
    else:
        docs = tok.corpus_split3(tok.pretrain_documents(), seed=seed)
    parts = [encode_documents(d) for d in docs]
    meta = {h: {"names": s.doc_names, "offsets": s.doc_offsets, "num_bytes": s.num_bytes} for h, s in zip(names, parts)}
    meta["key"] = key
    if use_cache:
        try:
            _atomic_save_npz(path, **{f"{h}_ids": s.ids.numpy().astype(np.uint16) for h, s in zip(names, parts)},
                             meta=np.array(json.dumps(meta)))
        except OSError:  # a read-only home is no reason to fail: we just encode again next time
            path = None
    return CorpusSplits(*parts, key=key, cache_path=str(path) if use_cache and path else None, meta=meta)


# ---- random training windows -----------------------------------------------------------------------------------
class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from a stream: ``next()`` -> (B, T + 1) int64.

    Starts are uniform over every position that leaves a full window (windows may span a document boundary,
    as in GPT-style pre-training). A ``torch.Generator`` seeded with ``seed`` draws them; ``state_dict()``
    holds its state and the number of batches drawn, ``load_state_dict`` restores both exactly.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        _check_positive(batch_size=batch_size, seq_len=seq_len)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
            raise ValueError(f"BatchSampler ids: expected a 1-D tensor of token ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ids.numel() < seq_len + 1:
            raise ValueError(f"BatchSampler seq_len: {seq_len} + 1 tokens do not fit in a stream of {ids.numel()}")
        self.ids, self.batch_size, self.seq_len, self.seed = ids, batch_size, seq_len, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self) -> torch.Tensor:
        n_starts = self.ids.numel() - self.seq_len  # starts 0 .. N - T - 1
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=self.generator)  # (B,)
        offsets = torch.arange(self.seq_len + 1)  # (T + 1,)
        self.batches_drawn += 1
        return self.ids[starts[:, None] + offsets[None, :]]  # (B, T + 1)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn, "seed": self.seed,
                "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"BatchSampler state: {key} = {state[key]} in the saved state, {getattr(self, key)} "
                                 "now; resume with the same batch_size and seq_len")
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])
        self.seed = state["seed"]


# ---- evaluation ------------------------------------------------------------------------------------------------
def token_byte_lengths(vocab_size: int | None = None) -> torch.Tensor:
    """(V,) UTF-8 bytes each token id decodes to; special tokens (EOT, ...) count 0 bytes."""
    enc = tok.load_tokenizer()
    V = vocab_size or tok.VOCAB_SIZE
    special = set(tok.SPECIAL_TOKENS.values())
    lengths = [0 if i in special or i >= tok.VOCAB_SIZE else len(enc.decode_single_token_bytes(i)) for i in range(V)]
    return torch.tensor(lengths, dtype=torch.int64)


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Code length of a text in bits per UTF-8 byte: total_nats / (ln 2 * total_bytes)."""
    if total_bytes <= 0:
        raise ValueError(f"bits_per_byte total_bytes: expected a positive byte count, got {total_bytes}")
    return total_nats / (math.log(2) * total_bytes)


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The fixed evaluation set: non-overlapping (T + 1)-token windows, at most ``max_windows`` of them spread
    evenly over the stream (all of them when None). Returns (W, T + 1); no randomness, so always the same."""
    _check_positive(seq_len=seq_len)
    n = (ids.numel() - 1) // seq_len  # window w covers ids[w*T : w*T + T + 1]
    if n < 1:
        raise ValueError(f"eval_windows seq_len: a stream of {ids.numel()} tokens holds no window of {seq_len + 1}")
    chosen = torch.arange(n) if max_windows is None or max_windows >= n else \
        torch.linspace(0, n - 1, max_windows).round().long()  # (W,)
    return ids[chosen[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]]  # (W, T + 1)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16, byte_lengths: torch.Tensor | None = None,
             score_from: int = 0) -> dict:
    """Validation loss of ``model`` on fixed windows (W, T + 1): each window is read whole and its last T tokens
    are scored (only those after the first ``score_from`` of them: how well the model uses context beyond
    ``score_from`` tokens). Returns {"loss": nats/token, "bpb": bits/byte, "tokens", "bytes", "nats"}.

    ``model(ids)`` must return an object with ``.logits`` (B, T + 1, V) (GLM5ForCausalLM does); the windows
    move to the device of the model's parameters a batch at a time (the numbers are summed on the host)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluate windows: expected (W, T + 1) with T >= 1, got {tuple(windows.shape)}")
    if not 0 <= score_from < windows.shape[1] - 1:
        raise ValueError(f"evaluate score_from: expected 0 <= score_from < T = {windows.shape[1] - 1}, got {score_from}")
    byte_lengths = token_byte_lengths() if byte_lengths is None else byte_lengths
    device = model_device(model)
    byte_lengths = byte_lengths.to(device)
    was_training = model.training
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    try:
        for chunk in windows.split(batch_size):
            chunk = chunk.to(device)
            logits = model(chunk).logits[:, score_from:-1].float()  # (B, T', V): position t predicts token t + 1
            targets = chunk[:, score_from + 1:]  # (B, T')
            nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                    reduction="sum").item()
            tokens += targets.numel()
            nbytes += int(byte_lengths[targets].sum())
    finally:
        model.train(was_training)
    return {"loss": nats / tokens, "bpb": bits_per_byte(nats, nbytes), "tokens": tokens, "bytes": nbytes,
            "nats": nats}


def uniform_bpb(windows: torch.Tensor, vocab_size: int = tok.VOCAB_SIZE,
                byte_lengths: torch.Tensor | None = None) -> float:
    """Bits per byte of the uniform distribution over ``vocab_size`` ids on the same windows (the ceiling a
    trained model must beat)."""
    byte_lengths = token_byte_lengths() if byte_lengths is None else byte_lengths
    targets = windows[:, 1:]
    return bits_per_byte(targets.numel() * math.log(vocab_size), int(byte_lengths[targets].sum()))


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
