"""glm5_ref.training.data: the document split, the cache, the sampler's exact resume, bits per byte by hand."""

import math

import numpy as np
import pytest
import torch

from glm5_ref.training import data
from glm5_ref.tokenizer import EOT_ID, VOCAB_SIZE, decode, encode


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLM5_REF_CACHE", str(cache))
        first = data.build_splits()
        second = data.build_splits()
    return first, second


def test_split_is_by_document_and_covers_the_corpus(splits):
    s, _ = splits
    train_names, val_names = set(s.train.doc_names), set(s.val.doc_names)
    assert train_names and val_names
    assert not train_names & val_names, "a document in both halves"
    from glm5_ref.tokenizer import corpus_documents

    assert train_names | val_names == {name for name, _ in corpus_documents()}


def test_streams_are_documents_joined_by_eot(splits):
    s, _ = splits
    ids, offsets = s.val.ids, s.val.doc_offsets + [len(s.val)]
    assert int((ids == EOT_ID).sum()) == len(s.val.doc_names)  # one EOT after each document, none inside
    for i in range(len(s.val.doc_names)):
        assert int(ids[offsets[i + 1] - 1]) == EOT_ID
    from glm5_ref.tokenizer import corpus_documents

    text = dict(corpus_documents())[s.val.doc_names[0]]
    assert decode(ids[offsets[0]:offsets[1] - 1].tolist()) == text
    assert s.val.num_bytes == sum(len(dict(corpus_documents())[n].encode()) for n in s.val.doc_names)


def test_cache_is_used_and_equal(splits):
    first, second = splits
    assert not first.from_cache and second.from_cache
    assert first.cache_path == second.cache_path and first.key in first.cache_path
    assert torch.equal(first.train.ids, second.train.ids) and torch.equal(first.val.ids, second.val.ids)
    assert first.val.doc_offsets == second.val.doc_offsets
    with np.load(first.cache_path) as z:
        assert z["train_ids"].dtype == np.uint16


def test_sampler_windows_and_exact_resume():
    ids = torch.arange(1000)
    a = data.BatchSampler(ids, batch_size=3, seq_len=7, seed=5)
    batch = a.next()
    assert batch.shape == (3, 8)
    assert torch.equal(batch - batch[:, :1], torch.arange(8).expand(3, 8))  # consecutive tokens
    state = a.state_dict()
    expected = [a.next() for _ in range(3)]
    b = data.BatchSampler(ids, batch_size=3, seq_len=7, seed=123)
    b.load_state_dict(state)
    assert all(torch.equal(x, b.next()) for x in expected)
    assert b.batches_drawn == a.batches_drawn == 4
    with pytest.raises(ValueError, match="seq_len"):
        data.BatchSampler(ids, batch_size=3, seq_len=8, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        data.BatchSampler(ids, batch_size=0, seq_len=7)


def test_bits_per_byte_by_hand():
    # "def" + "ine" style example: two targets whose bytes we count by hand
    assert data.bits_per_byte(math.log(2) * 12, 3) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="total_bytes"):
        data.bits_per_byte(1.0, 0)
    lengths = data.token_byte_lengths()
    assert lengths.shape == (VOCAB_SIZE,) and int(lengths[EOT_ID]) == 0 and int(lengths[ord("a")]) == 1
    text = "hello world"
    ids = encode(text)
    assert int(lengths[ids].sum()) == len(text.encode())

    class Uniform(torch.nn.Module):  # logits all zero: -ln p = ln V for every token
        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, VOCAB_SIZE)})()

    window = torch.tensor([[EOT_ID] + ids])  # the first token is context only; every other one is scored
    result = data.evaluate(Uniform(), window, byte_lengths=lengths)
    assert result["tokens"] == len(ids) and result["bytes"] == len(text.encode())
    assert result["loss"] == pytest.approx(math.log(VOCAB_SIZE))
    assert result["bpb"] == pytest.approx(len(ids) * math.log(VOCAB_SIZE) / (math.log(2) * len(text.encode())))
    assert result["bpb"] == pytest.approx(data.uniform_bpb(window, byte_lengths=lengths))


def test_evaluate_score_from_scores_only_the_later_tokens():
    """score_from = s scores targets s+1 .. T of each window (with the whole window as context): the nats of
    the two parts add up to the whole, and a model that is right only late in the window is perfect there."""
    V, T = 16, 9

    class LateOracle(torch.nn.Module):  # certain of the next token from position 4 on, uniform before
        def forward(self, ids):
            logits = torch.zeros(*ids.shape, V)
            nxt = torch.roll(ids, -1, dims=1)
            logits[:, 4:].scatter_(-1, nxt[:, 4:, None], 60.0)
            return type("Out", (), {"logits": logits})()

    windows = torch.randint(0, V, (3, T + 1), generator=torch.Generator().manual_seed(0))
    lengths = torch.ones(V, dtype=torch.long)
    whole = data.evaluate(LateOracle(), windows, byte_lengths=lengths)
    late = data.evaluate(LateOracle(), windows, byte_lengths=lengths, score_from=4)
    early_nats = 3 * 4 * math.log(V)  # targets 1..4 of each window under the uniform guess
    assert late["tokens"] == 3 * (T - 4) and late["loss"] < 1e-20
    assert whole["nats"] == pytest.approx(early_nats + late["nats"])
    with pytest.raises(ValueError, match="score_from"):
        data.evaluate(LateOracle(), windows, score_from=T)


def test_eval_windows_fixed_and_non_overlapping():
    ids = torch.arange(101)
    w = data.eval_windows(ids, seq_len=10)
    assert w.shape == (10, 11)
    targets = w[:, 1:].flatten()
    assert len(set(targets.tolist())) == targets.numel()  # every target token scored once
    few = data.eval_windows(ids, seq_len=10, max_windows=3)
    assert torch.equal(few, data.eval_windows(ids, seq_len=10, max_windows=3))
    assert few[0, 0] == 0 and few[-1, -1] == 100
    with pytest.raises(ValueError, match="seq_len"):
        data.eval_windows(ids, seq_len=200)


def test_the_pretraining_corpus_is_large_split_by_document_and_hash_checked(tmp_path, monkeypatch):
    from glm5_ref import tokenizer as tok

    docs = tok.pretrain_documents()
    train, val, test = tok.corpus_split3(docs)
    names = [{p for p, _ in part} for part in (train, val, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])  # by document, disjoint
    assert len(train) + len(val) + len(test) == len(docs) == len({p for p, _ in docs}) >= 1500
    assert any(p.startswith("test/") for p in names[0]) and "argparse.py" in set().union(*names)
    splits = data.build_splits(corpus="pretrain")
    assert len(splits.train) >= 5_000_000 and len(splits.val) > 50_000 and len(splits.test) > 50_000
    assert splits.test.doc_names == [p for p, _ in test]
    bad = tmp_path / "corpus.jsonl.gz"
    raw = tok.PRETRAIN_CORPUS_PATH.read_bytes()
    bad.write_bytes(raw[:-10] + bytes(10))
    monkeypatch.setattr(tok, "PRETRAIN_CORPUS_PATH", bad)
    with pytest.raises(ValueError, match="corrupted or modified.*build_corpus.py --pretrain"):
        tok.pretrain_documents()
    with pytest.raises(ValueError, match="corpus: expected one of"):
        data.build_splits(corpus="wikipedia")
