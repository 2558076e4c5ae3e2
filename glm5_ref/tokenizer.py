"""The glm5-ref tokenizer: a 4096-id byte-level BPE, run by tiktoken.

Byte-level BPE. Text is first cut into chunks by a regular expression (words
with their leading space, numbers of up to 3 digits, runs of punctuation,
newlines with the indentation that follows them, other whitespace). Each chunk
is UTF-8 encoded and starts as a sequence of byte tokens (ids 0..255, the id of
byte b is b), so *any* string can be encoded and nothing is ever "unknown".
Training (scripts/train_tokenizer.py) then repeatedly finds the most frequent
adjacent pair of tokens inside chunks and merges it into a new token; merge i
gets rank 256 + i. We do 3832 merges, so ranks cover 0..4087, and add 8 special
tokens (ids 4088..4095) that can never come out of ordinary text.

What tiktoken does. tiktoken is a fast Rust implementation of *encoding* with
such a vocabulary. It does not need the list of merges: given the mergeable
ranks (token bytes -> rank), it encodes a chunk by repeatedly joining the
adjacent pair whose concatenated bytes has the lowest rank. Since a merge
learned earlier always has a lower rank, this replays the training merges.

Why we ship ranks. The rank file (base64(token bytes) SPACE rank per line, the
format of tiktoken's own cl100k_base file) plus the split pattern and the
special tokens *is* the tokenizer. Shipping the small file makes the tokenizer
exactly reproducible offline, with no download and no trainer dependency.

The TITO caveat. Encoding is not injective on id sequences: a sampler can emit
a word as several smaller tokens (every byte string has many tokenizations),
and decode-then-encode returns the *canonical* ids instead, which are different
(see retokenization_example()). In RL the log-probabilities must be computed
for the ids the policy actually sampled, so trainers pass token ids end to end
("token in, token out") rather than re-tokenizing the decoded text.

This module needs only the standard library and tiktoken, so it can be copied
alone together with the assets/ folder next to it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from pathlib import Path

import tiktoken

ASSETS = Path(__file__).resolve().parent / "assets"
RANKS_PATH = ASSETS / "tokenizer" / "glm5_ref_bpe.tiktoken"
META_PATH = ASSETS / "tokenizer" / "tokenizer.json"
CORPUS_PATH = ASSETS / "corpus" / "python_stdlib.jsonl"
MANIFEST_PATH = ASSETS / "corpus" / "MANIFEST.json"
PRETRAIN_CORPUS_PATH = ASSETS / "corpus" / "python_stdlib_full.jsonl.gz"  # scripts/build_corpus.py --pretrain
PRETRAIN_MANIFEST_PATH = ASSETS / "corpus" / "MANIFEST_full.json"

# GPT-4 (cl100k) style split pattern with two changes for source code:
# contractions only when no letter follows ('self' stays one word), and a
# newline chunk carries the indentation after it ("\n        " is one chunk,
# later one token), so punctuation no longer swallows the newline.
PAT_STR = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)(?!\p{L})",  # English contractions: 's 't 're ...
    r"[^\r\n\p{L}\p{N}]?+\p{L}+",  # a word, with one leading space/symbol
    r"\p{N}{1,3}",  # numbers in groups of 1-3 digits
    r" ?[^\s\p{L}\p{N}]++",  # a run of punctuation, with one leading space
    r"\s*[\r\n]+[^\S\r\n]*",  # newline(s) plus the next line's indentation
    r"\s+(?!\S)",  # spaces, leaving the last one to the next word
    r"\s+",  # any other whitespace
])

NUM_MERGEABLE = 4088  # the rank file: 256 byte tokens + 3832 merges
NUM_MERGES = NUM_MERGEABLE - 256
# Special tokens, each one id that ordinary text can never produce. The first eight are the project's own (ids
# 4088-4095, unchanged since the tokenizer was trained); then the tokens of GLM-5's chat template that those do not
# already cover (glm5_ref/chat.py renders them; <|system|>, <|user|>, <|assistant|>, <|observation|> are shared),
# and four reserved ids, so that the vocabulary is 4112 = 257 x 16.
SPECIAL_TOKEN_NAMES = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                       "<|observation|>", "<|tool_call|>", "<|tool_result|>",
                       "[gMASK]", "<sop>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
                       "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>",
                       "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>")
VOCAB_SIZE = NUM_MERGEABLE + len(SPECIAL_TOKEN_NAMES)  # 4112
SPECIAL_TOKENS = {name: NUM_MERGEABLE + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
EOT_ID = SPECIAL_TOKENS["<|endoftext|>"]
PAD_ID = SPECIAL_TOKENS["<|pad|>"]


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write mergeable ranks in tiktoken's format, one 'base64 rank' per line."""
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n"
             for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    Path(path).write_text("".join(lines), encoding="ascii", newline="\n")


def read_ranks(path: str | Path = RANKS_PATH) -> dict[bytes, int]:
    """Parse a tiktoken rank file (same result as tiktoken.load.load_tiktoken_bpe)."""
    ranks = {}
    for line in Path(path).read_text(encoding="ascii").splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def load_tokenizer() -> tiktoken.Encoding:
    """The glm5-ref tokenizer, built offline from the shipped rank file."""
    meta = json.loads(META_PATH.read_text(encoding="utf-8"))
    actual = sha256_file(RANKS_PATH)
    if actual != meta["ranks_sha256"]:
        raise ValueError(f"{RANKS_PATH}: sha256 {actual} does not match "
                         f"tokenizer.json (expected {meta['ranks_sha256']})")
    ranks = read_ranks(RANKS_PATH)
    if sorted(ranks.values()) != list(range(NUM_MERGEABLE)):
        raise ValueError(f"{RANKS_PATH}: ranks must be exactly 0..{NUM_MERGEABLE - 1}")
    return tiktoken.Encoding(name="glm5_ref_bpe", pat_str=meta["pat_str"], mergeable_ranks=ranks,
                             special_tokens=dict(meta["special_tokens"]), explicit_n_vocab=VOCAB_SIZE)


def load_tiktoken_named(name: str = "cl100k_base") -> tiktoken.Encoding:
    """A stock tiktoken encoding (cl100k_base, o200k_base, ...), for comparisons only."""
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network error, unknown name, missing cache
        raise RuntimeError(
            f"could not load tiktoken encoding {name!r}: it needs network access to download its "
            f"rank file, or a cached copy in TIKTOKEN_CACHE_DIR ({type(e).__name__}: {e}). "
            f"The glm5-ref tokenizer itself (load_tokenizer) works offline.") from e


def encode(text: str, allow_special: bool = False) -> list[int]:
    """Text -> ids. Special-token strings become their ids only if allow_special;
    otherwise they are encoded as the plain text they are (no injection from data)."""
    enc = load_tokenizer()
    if allow_special:
        return enc.encode(text, allowed_special="all")
    return enc.encode(text, disallowed_special=())


def decode(ids: list[int]) -> str:
    """Ids -> text (invalid UTF-8, e.g. half a character, becomes U+FFFD)."""
    return load_tokenizer().decode(list(ids))


def corpus_documents(path: str | Path | None = None,
                     manifest_path: str | Path | None = None) -> list[tuple[str, str]]:
    """The shipped classroom corpus as (path, text) pairs, after checking its sha256."""
    path = Path(path) if path is not None else CORPUS_PATH
    manifest_path = Path(manifest_path) if manifest_path is not None else MANIFEST_PATH
    expected = json.loads(manifest_path.read_text(encoding="utf-8"))["sha256"]
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"corpus file {path} is corrupted or modified: sha256 expected "
                         f"{expected} (from {manifest_path.name}), got {actual}")
    with open(path, encoding="utf-8") as f:
        return [(d["path"], d["text"]) for d in map(json.loads, f)]


def pretrain_documents() -> list[tuple[str, str]]:
    """The pretraining corpus (every pure-Python file of the standard library, tests included; 1,602 documents,
    29 MB) as (path, text) pairs, after checking the sha256 of the compressed file and of its content."""
    import gzip

    manifest = json.loads(PRETRAIN_MANIFEST_PATH.read_text(encoding="utf-8"))

    def check(what: str, blob: bytes, key: str) -> None:
        if hashlib.sha256(blob).hexdigest() != manifest[key]:
            raise ValueError(f"pretraining corpus {PRETRAIN_CORPUS_PATH}: the {what} is corrupted or modified "
                             f"(sha256 does not match {PRETRAIN_MANIFEST_PATH.name}); restore it from git or "
                             "rebuild it with python scripts/build_corpus.py --pretrain")

    data = PRETRAIN_CORPUS_PATH.read_bytes()
    check("compressed file", data, "gz_sha256")  # before decompressing: a truncated file fails here, clearly
    raw = gzip.decompress(data)
    check("content", raw, "jsonl_sha256")
    return [(d["path"], d["text"]) for d in map(json.loads, raw.decode("utf-8").splitlines())]


def _split_fraction(path: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def corpus_split3(documents, validation_fraction: float = 0.025, test_fraction: float = 0.025, seed: int = 0):
    """(train, validation, test) documents, split on a hash of each path (as corpus_split): a document's place
    never depends on the others, and no text is in two splits."""
    if not (0 < validation_fraction and 0 < test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"validation_fraction, test_fraction: expected positive fractions summing below 1, got "
                         f"{validation_fraction!r}, {test_fraction!r}")
    u = {p: _split_fraction(p, seed) for p, _ in documents}
    val = [d for d in documents if u[d[0]] < validation_fraction]
    test = [d for d in documents if validation_fraction <= u[d[0]] < validation_fraction + test_fraction]
    train = [d for d in documents if u[d[0]] >= validation_fraction + test_fraction]
    return train, val, test


def _in_validation(path: str, validation_fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{path}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction


def corpus_split(validation_fraction: float = 0.1, seed: int = 0, documents=None):
    """(train_docs, val_docs), split by document on a hash of its path: stable
    across runs and machines, and no document is ever in both halves."""
    documents = corpus_documents() if documents is None else documents
    train = [d for d in documents if not _in_validation(d[0], validation_fraction, seed)]
    val = [d for d in documents if _in_validation(d[0], validation_fraction, seed)]
    return train, val


def retokenization_example(words=(" return", " function", " tokenizer", " self", "return")):
    """(ids_sampled, text, ids_reencoded) with decode(ids_sampled) == text but
    encode(text) == ids_reencoded != ids_sampled.

    A word that is one token is instead emitted as two valid smaller tokens (as
    a sampler may do). Decoding gives the same text; re-encoding gives the
    canonical single token, so the ids the policy sampled are lost.
    """
    enc = load_tokenizer()
    for word in words:
        canonical = encode(word)
        data = word.encode("utf-8")
        if len(canonical) != 1:
            continue
        for k in range(1, len(data)):
            try:
                ids_sampled = [enc.encode_single_token(data[:k]), enc.encode_single_token(data[k:])]
            except KeyError:
                continue
            text = decode(ids_sampled)
            return ids_sampled, text, encode(text)
    # Fallback that always works: one token per byte.
    text = words[0]
    return list(text.encode("utf-8")), text, encode(text)
