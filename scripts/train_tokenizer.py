"""Train the glm5-ref byte-level BPE on the training split of the classroom corpus.

Writes glm5_ref/assets/tokenizer/glm5_ref_bpe.tiktoken (tiktoken rank file) and
glm5_ref/assets/tokenizer/tokenizer.json (pattern, special tokens, hashes).

The algorithm is the GPT-2/GPT-4 ("minbpe") one:

1. Split every training document into chunks with the regex PAT_STR and count
   identical chunks (merges never cross a chunk boundary, so each distinct
   chunk is a "word" with a count).
2. Each word starts as its UTF-8 bytes; the id of byte b is b (ranks 0..255).
3. Repeat 3832 times: take the most frequent adjacent pair (ties: the smallest
   pair of ids, so training is deterministic), give it the next id, and
   rewrite the words that contain it.

Step 3 is incremental: we keep the count of every pair, an index pair -> words
that contain it, and a heap of (-count, pair) with lazy deletion, so a merge
only touches the words that contain the merged pair.

    python scripts/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import regex  # a tiktoken dependency; the same pattern syntax as tiktoken's fancy-regex
import tiktoken

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from glm5_ref import tokenizer as tok  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # the bar is optional
    tqdm = None


def count_chunks(texts, pat_str: str) -> Counter:
    pattern = regex.compile(pat_str)
    counts = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


def pairs_of(word):
    return Counter(zip(word, word[1:]))


def replace_pair(word, pair, new_id):
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe(chunk_counts: Counter, num_merges: int, progress: bool = True):
    """Return (vocab, merges): vocab[id] = token bytes for ids 0..255+num_merges,
    merges = list of (left_id, right_id) in rank order."""
    # Words of a single byte can never take part in a merge: drop them.
    words, freqs = [], []
    for chunk, count in chunk_counts.items():
        data = chunk.encode("utf-8")
        if len(data) > 1:
            words.append(tuple(data))
            freqs.append(count)

    pair_counts = Counter()
    where = defaultdict(set)  # pair -> indices of words containing it
    for i, word in enumerate(words):
        for pair, c in pairs_of(word).items():
            pair_counts[pair] += c * freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = {i: bytes([i]) for i in range(256)}
    ids_of = {b: i for i, b in vocab.items()}
    merges = []
    reused = 0  # merges whose bytes already had an id (no new rank spent)
    bar = tqdm(total=num_merges, desc="bpe merges", unit="merge") if (progress and tqdm) else None
    while len(merges) < num_merges:
        if not heap:
            raise RuntimeError(f"corpus too small: only {len(merges)} merges possible")
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry (the count changed after it was pushed)
        new_bytes = vocab[pair[0]] + vocab[pair[1]]
        if new_bytes in ids_of:
            # Another merge already produced these bytes (e.g. (ab, c) vs (a, bc)).
            # Reuse that id: tiktoken needs unique token bytes, and its
            # lowest-rank-first encoding will build it anyway.
            new_id = ids_of[new_bytes]
            reused += 1
        else:
            new_id = len(vocab)
            vocab[new_id] = new_bytes
            ids_of[new_bytes] = new_id
            merges.append(pair)
            if bar:
                bar.update(1)
        changed = set()
        for i in sorted(where.pop(pair)):
            old = words[i]
            new = replace_pair(old, pair, new_id)
            old_pairs, new_pairs = pairs_of(old), pairs_of(new)
            for p in old_pairs.keys() | new_pairs.keys():
                delta = (new_pairs.get(p, 0) - old_pairs.get(p, 0)) * freqs[i]
                if delta:
                    pair_counts[p] += delta
                    changed.add(p)
                if p not in new_pairs:
                    where[p].discard(i)
                elif p not in old_pairs:
                    where[p].add(i)
            words[i] = new
        pair_counts.pop(pair, None)
        for p in changed:
            if pair_counts.get(p, 0) > 0 and p != pair:
                heapq.heappush(heap, (-pair_counts[p], p))
    if bar:
        bar.close()
    if reused:
        print(f"{reused} merges reused an existing token's bytes")
    return vocab, merges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=tok.RANKS_PATH.parent)
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    train_docs, val_docs = tok.corpus_split(args.validation_fraction, args.seed)
    print(f"corpus: {len(train_docs)} train / {len(val_docs)} validation documents")
    t0 = time.perf_counter()
    chunks = count_chunks((text for _, text in train_docs), tok.PAT_STR)
    print(f"{sum(chunks.values())} chunks, {len(chunks)} distinct ({time.perf_counter() - t0:.1f}s)")
    vocab, merges = train_bpe(chunks, tok.NUM_MERGES, progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    print(f"trained {len(merges)} merges in {train_s:.1f}s")

    ranks = {b: i for i, b in vocab.items()}  # rank == id; bytes 0..255 first
    assert len(ranks) == tok.NUM_MERGEABLE and sorted(ranks.values()) == list(range(tok.NUM_MERGEABLE))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ranks_path = args.out_dir / tok.RANKS_PATH.name
    tok.write_ranks(ranks, ranks_path)
    meta = {
        "name": "glm5_ref_bpe",
        "type": "byte-level BPE (tiktoken rank file)",
        "ranks_file": ranks_path.name,
        "ranks_sha256": tok.sha256_file(ranks_path),
        "pat_str": tok.PAT_STR,
        "vocab_size": tok.VOCAB_SIZE,
        "num_byte_tokens": 256,
        "num_merges": len(merges),
        "special_tokens": tok.SPECIAL_TOKENS,
        "corpus_file": tok.CORPUS_PATH.name,
        "corpus_sha256": tok.sha256_file(tok.CORPUS_PATH),
        "split": {"validation_fraction": args.validation_fraction, "seed": args.seed,
                  "train_documents": len(train_docs), "validation_documents": len(val_docs)},
    }
    meta_path = args.out_dir / tok.META_PATH.name
    meta_path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    # Check that tiktoken, loading what we just wrote, reproduces the text and compresses it.
    enc = tiktoken.Encoding(name="glm5_ref_bpe", pat_str=tok.PAT_STR,
                            mergeable_ranks=tok.read_ranks(ranks_path),
                            special_tokens=tok.SPECIAL_TOKENS, explicit_n_vocab=tok.VOCAB_SIZE)
    val_text = [text for _, text in val_docs]
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(val_text))
    n_bytes = sum(len(t.encode("utf-8")) for t in val_text)
    assert all(enc.decode(enc.encode_ordinary(t)) == t for t in val_text)
    print(f"wrote {ranks_path} and {meta_path}")
    print(f"validation: {n_bytes} bytes -> {n_tokens} tokens = {n_bytes / n_tokens:.3f} bytes/token")


if __name__ == "__main__":
    main()
