"""Tests for the glm5-ref tokenizer (glm5_ref/tokenizer.py) and the shipped corpus."""

from __future__ import annotations

import json

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from glm5_ref import tokenizer as tok


@pytest.fixture(scope="module")
def enc():
    return tok.load_tokenizer()


@pytest.fixture(scope="module")
def split():
    return tok.corpus_split()


def reference_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """Slow pure-Python BPE: split with PAT_STR, then repeatedly merge the adjacent
    pair whose joined bytes has the lowest rank (what tiktoken does in Rust)."""
    ids = []
    for chunk in regex.findall(tok.PAT_STR, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], 1 << 30))
            if parts[best] + parts[best + 1] not in ranks:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


# --- encode / decode ---------------------------------------------------------------------------

@given(st.text())
def test_roundtrip_arbitrary_unicode(text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=True)) == text


@given(st.text(alphabet=st.sampled_from(list("ab _\n\t(:)'s1é€😀")) | st.characters(), max_size=40))
def test_tiktoken_matches_reference_bpe(text):
    # tiktoken (Rust fancy-regex) and the trainer's `regex` split agree, and merging by rank
    # reproduces the shipped vocabulary.
    assert tok.encode(text) == reference_encode(text, tok.read_ranks())


def test_tiktoken_matches_reference_bpe_on_a_document(split):
    path, text = split[1][0]
    assert tok.encode(text[:5000]) == reference_encode(text[:5000], tok.read_ranks())


def test_special_tokens_only_when_allowed(enc):
    assert tok.EOT_ID == tok.SPECIAL_TOKENS["<|endoftext|>"] == 4088
    assert list(tok.SPECIAL_TOKENS.values()) == list(range(4088, 4112))  # the first 8 kept their ids
    for name, sid in tok.SPECIAL_TOKENS.items():
        assert tok.encode(name, allow_special=True) == [sid]
        assert tok.decode([sid]) == name
        plain = tok.encode(name)  # not allowed: ordinary text, several ordinary tokens
        assert len(plain) > 1 and max(plain) < tok.NUM_MERGEABLE
        assert tok.decode(plain) == name
        with pytest.raises(ValueError):
            enc.encode(name)  # tiktoken's own default rejects special text outright
    text = "<|user|>hi<|assistant|>hello<|endoftext|>"
    ids = tok.encode(text, allow_special=True)
    assert [i for i in ids if i >= tok.NUM_MERGEABLE] == [4091, 4092, 4088]
    assert tok.decode(ids) == text


def test_load_is_cached(enc):
    assert tok.load_tokenizer() is enc


def test_named_loader_error_is_clear(monkeypatch):
    def fail(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tok.tiktoken, "get_encoding", fail)
    with pytest.raises(RuntimeError, match="network"):
        tok.load_tiktoken_named("cl100k_base")


# --- vocabulary and shipped files --------------------------------------------------------------

def test_vocab_is_exactly_4112_and_dense(enc):
    assert enc.n_vocab == tok.VOCAB_SIZE == 4112 == 257 * 16
    assert enc.max_token_value == 4111
    ranks = tok.read_ranks()
    assert sorted(ranks.values()) == list(range(4088))
    assert len(ranks) == 4088  # token bytes are unique
    for b in range(256):
        assert ranks[bytes([b])] == b  # rank of a single byte is its value
    assert all(enc.decode_single_token_bytes(i) for i in range(4112))
    assert set(tok.SPECIAL_TOKENS.values()) == set(range(4088, 4112))


def test_rank_file_agrees_with_metadata(monkeypatch):
    from tiktoken.load import load_tiktoken_bpe

    meta = json.loads(tok.META_PATH.read_text(encoding="utf-8"))
    manifest = json.loads(tok.MANIFEST_PATH.read_text(encoding="utf-8"))
    assert meta["ranks_sha256"] == tok.sha256_file(tok.RANKS_PATH)
    assert meta["corpus_sha256"] == manifest["sha256"] == tok.sha256_file(tok.CORPUS_PATH)
    assert meta["num_merges"] == tok.NUM_MERGES == 3832
    assert meta["vocab_size"] == 4112 and meta["num_byte_tokens"] == 256
    assert meta["pat_str"] == tok.PAT_STR
    assert meta["special_tokens"] == tok.SPECIAL_TOKENS
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the local file, no cache
    assert load_tiktoken_bpe(str(tok.RANKS_PATH)) == tok.read_ranks()


# --- corpus ------------------------------------------------------------------------------------

def test_corpus_matches_manifest():
    docs = tok.corpus_documents()
    manifest = json.loads(tok.MANIFEST_PATH.read_text(encoding="utf-8"))
    assert len(docs) == manifest["num_documents"]
    assert sum(len(t.encode("utf-8")) for _, t in docs) == manifest["total_text_bytes"]
    paths = [p for p, _ in docs]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert manifest["license"] == "PSF-2.0"
    assert all("\r" not in t for _, t in docs)


def test_corpus_hash_check_fails_loudly(tmp_path):
    lines = tok.CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
    doc = json.loads(lines[3])
    doc["text"] = doc["text"].replace("def ", "def  ", 1)
    lines[3] = json.dumps(doc, ensure_ascii=False) + "\n"
    tampered = tmp_path / "python_stdlib.jsonl"
    tampered.write_text("".join(lines), encoding="utf-8")
    expected = json.loads(tok.MANIFEST_PATH.read_text(encoding="utf-8"))["sha256"]
    with pytest.raises(ValueError) as err:
        tok.corpus_documents(tampered)
    msg = str(err.value)
    assert str(tampered) in msg and expected in msg and tok.sha256_file(tampered) in msg


def test_split_is_disjoint_complete_and_stable(split):
    train, val = split
    all_paths = [p for p, _ in tok.corpus_documents()]
    train_paths, val_paths = {p for p, _ in train}, {p for p, _ in val}
    assert not train_paths & val_paths
    assert train_paths | val_paths == set(all_paths)
    assert 0.03 < len(val) / len(all_paths) < 0.2
    assert tok.corpus_split() == split
    other_train, other_val = tok.corpus_split(seed=1)
    assert {p for p, _ in other_val} != val_paths
    meta = json.loads(tok.META_PATH.read_text(encoding="utf-8"))
    assert meta["split"]["validation_documents"] == len(val)  # trained on this train split


# --- TITO and compression ----------------------------------------------------------------------

def test_retokenization_example_differs():
    ids_sampled, text, ids_reencoded = tok.retokenization_example()
    assert ids_sampled != ids_reencoded
    assert tok.decode(ids_sampled) == text == tok.decode(ids_reencoded)
    assert tok.encode(text) == ids_reencoded


def test_compression_on_validation_split(split, enc):
    texts = [t for _, t in split[1]]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts))
    ratio = n_bytes / n_tokens
    print(f"validation: {n_bytes} bytes / {n_tokens} tokens = {ratio:.3f} bytes per token")
    assert ratio > 2.5
