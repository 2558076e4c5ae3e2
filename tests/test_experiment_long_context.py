"""The long-context DSA experiment (glm5_ref/experiments/long_context.py): task, controls, cost, quick run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention, select_topk
from glm5_ref.apps.experiments import long_context as lc
from glm5_ref.apps.experiments import long_context_task as lct
from glm5_ref.mla import MLA
from glm5_ref.model import GLM5ForCausalLM
from tests.strategies import seeds

STREAM = torch.randint(0, lct.BASE_VOCAB, (5000,), generator=torch.Generator().manual_seed(0))


@settings(max_examples=30, deadline=None)
@given(seed=seeds, length=st.sampled_from([40, 63, 100, 257]), n_pairs=st.integers(1, 8))
def test_example_answer_is_where_the_generator_says(seed, length, n_pairs):
    ex = lct.make_example(np.random.default_rng(seed), length, n_pairs, STREAM)
    ids, labels = ex["ids"], ex["labels"]
    assert ids.shape == (length,) and ids.dtype == torch.int64
    q, ans, needle = ex["query_pos"], ex["answers"], ex["needle_pos"]
    assert q.shape == ans.shape == needle.shape == (n_pairs,)
    assert int(ids[length - 2 * n_pairs - 1]) == lct.SEP and int((ids == lct.SEP).sum()) == 1
    for p, a, n in zip(q.tolist(), ans.tolist(), needle.tolist()):
        key = int(ids[p])
        assert lct.KEY0 <= key < lct.VAL0 and lct.VAL0 <= a < lct.VOCAB
        assert (a - lct.VAL0) // lct.VALUES_PER_KEY == key - lct.KEY0  # the value belongs to its key's family
        assert int(ids[p + 1]) == a  # the query block shows the answer right after the key
        assert n < length - 2 * n_pairs - 1  # the needle is in the haystack
        assert int(ids[n - 1]) == key and int(ids[n]) == a  # ... as "key value"
        assert int((ids == key).sum()) == 2  # once in the haystack, once as the query: no ambiguity
    scored = (labels != -100).nonzero().flatten()
    assert torch.equal(scored, q + 1) and torch.equal(labels[scored], ans)
    haystack = ids[: length - 2 * n_pairs - 1]
    filler = haystack[haystack < lct.BASE_VOCAB]
    assert filler.numel() == length - 4 * n_pairs - 1  # everything else is filler from the stream


def test_examples_are_deterministic_and_seed_dependent():
    a = lct.make_batch(3, 128, 4, 8, STREAM)
    b = lct.make_batch(3, 128, 4, 8, STREAM)
    c = lct.make_batch(4, 128, 4, 8, STREAM)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ids"], c["ids"])
    # the filler is a contiguous window of the stream (code-like text, not shuffled tokens)
    ids = a["ids"][0]
    filler = ids[ids < lct.BASE_VOCAB]
    windows = STREAM.unfold(0, filler.numel(), 1)
    assert bool((windows == filler).all(-1).any())


def test_example_rejects_bad_arguments():
    with pytest.raises(ValueError, match="length"):
        lct.make_example(np.random.default_rng(0), 20, 8, STREAM)
    with pytest.raises(ValueError, match="n_pairs"):
        lct.make_example(np.random.default_rng(0), 200, 0, STREAM)


def test_attention_macs_hand_checked():
    # L = 4, k = 2: dense pairs 1+2+3+4 = 10, selected pairs 1+2+2+2 = 7; per pair H (d_qk + d_v) = 1*(2+1) = 3;
    # indexer J d_I = 1 per causal pair -> dense 30, DSA 21 + 10 = 31 (the indexer makes it MORE costly here)
    m = lct.attention_macs(4, 2, n_heads=1, qk_dim=2, v_dim=1, index_heads=1, index_dim=1)
    assert (m["pairs_dense"], m["pairs_sparse"], m["dense_macs"], m["dsa_macs"]) == (10, 7, 30, 31)
    assert m["saved_macs"] == -1
    # GLM-5 at 128K: per pair 64 * (256 + 256) = 32768 main vs 32 * 128 = 4096 indexer (glm5_spec.md section 4)
    g = lct.config_macs(GLM5Config.glm5(), 131072)
    L, k = 131072, 2048
    assert g["dense_macs"] == L * (L + 1) // 2 * 32768
    assert g["dsa_macs"] == (k * (k + 1) // 2 + (L - k) * k) * 32768 + L * (L + 1) // 2 * 4096
    with pytest.raises(ValueError, match="topk"):
        lct.attention_macs(4, 0, 1, 1, 1, 1, 1)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 70), k=st.integers(1, 20))
def test_attention_macs_pair_counts_match_brute_force(length, k):
    m = lct.attention_macs(length, k, 1, 1, 1, 1, 1)
    assert m["pairs_dense"] == sum(t + 1 for t in range(length))
    assert m["pairs_sparse"] == sum(min(k, t + 1) for t in range(length))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 40), k=st.integers(1, 12), seed=seeds, kind=st.sampled_from(["recency", "random"]))
def test_control_selection_is_a_valid_causal_selection_of_k_keys(T, k, seed, kind):
    q = torch.arange(T)
    sel = lct.control_selection(kind, q, T, k, batch_size=2, seed=seed)
    assert sel.shape == (2, T, min(k, T))
    for t in range(T):
        got = sorted(i for i in sel[0, t].tolist() if i >= 0)
        assert len(got) == min(k, t + 1) == len(set(got))  # exactly min(k, t + 1) distinct keys
        assert all(0 <= i <= t for i in got) and t in got  # causal, own key kept
        if kind == "recency":
            assert got == list(range(t - min(k, t + 1) + 1, t + 1))


def _tiny_attention(seed=0, topk=4):
    cfg = dataclasses.replace(GLM5Config.tiny(), index_topk=topk)
    torch.manual_seed(seed)
    return DSAAttention(cfg).eval(), cfg


def test_control_really_replaces_the_indexer_selection():
    attn, cfg = _tiny_attention()
    T = 31
    x = torch.randn(1, T, cfg.hidden_size)
    positions = torch.arange(T)
    selector = lct.control_selector("recency", cfg.index_topk)
    with torch.no_grad():
        indexer_sel = select_topk(attn.indexer(x, attn.q_latent(x), positions), positions, cfg.index_topk)
        by_indexer = attn.attend(x)
        window = lct.control_selection("recency", positions, T, cfg.index_topk, 1)
        by_window = attn.attend(x, key_selector=selector)
        expected = MLA.attend(attn, x, key_indices=window)  # MLA itself, told to attend to the window
        after = attn.attend(x)
    assert not torch.equal(indexer_sel, window)  # the two selections differ ...
    assert torch.equal(by_window.key_indices, window) and torch.equal(by_indexer.key_indices, indexer_sel)
    torch.testing.assert_close(by_window.out, expected.out, rtol=1e-6, atol=1e-6)  # the hook's keys are attended
    assert (by_window.out - by_indexer.out).abs().max() > 1e-4  # ... and so do the outputs
    torch.testing.assert_close(after.out, by_indexer.out, rtol=0, atol=0)  # no state left behind on the module
    with pytest.raises(ValueError, match="kind"):
        lct.control_selector("oracle", cfg.index_topk)


def test_answer_forward_equals_the_model_forward():
    cfg = dataclasses.replace(lct.experiment_config(index_topk=8), num_hidden_layers=2)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    batch = lct.make_batch(0, 48, 2, 4, STREAM)
    for indexer_loss in (False, True):
        ref = model(batch["ids"], labels=batch["labels"], indexer_loss=indexer_loss)
        got = lc.answer_forward(model, batch["ids"], batch["labels"], indexer_loss=indexer_loss,
                                positions_only=batch["query_pos"])
        torch.testing.assert_close(got.lm_loss, ref.lm_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
        rows = torch.arange(2)[:, None]
        torch.testing.assert_close(got.logits, ref.logits[rows, batch["query_pos"]], rtol=1e-5, atol=1e-5)


def test_mass_captured_is_a_fraction_and_full_when_k_covers_everything():
    cfg = lct.experiment_config(index_topk=8)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(cfg).eval()
    ids = lct.make_batch(0, 40, 1, 2, STREAM)["ids"]
    m = lc.mass_captured(model, ids)
    assert len(m["indexer"]) == cfg.num_hidden_layers
    assert all(0 < v < 1 for v in m["indexer"] + m["recency"])
    big = lc.mass_captured(GLM5ForCausalLM(lct.experiment_config(index_topk=64)).eval(), ids, query_only=True)
    assert all(abs(v - 1) < 1e-5 for v in big["indexer"])  # k >= T: the selection is every key


def test_quick_run_writes_the_schema(tmp_path):
    result = lc.run(quick=True, out_dir=str(tmp_path), seeds=[0])
    on_disk = json.loads((tmp_path / "long_context_dsa.json").read_text())
    assert (tmp_path / "long_context_dsa.png").stat().st_size > 0
    assert on_disk["lengths"] == result["lengths"] and len(on_disk["lengths"]) >= 1
    assert on_disk["index_topk"] <= max(on_disk["lengths"]) // 8 and on_disk["seeds"] == [0]
    for name in ("dense", "warmup_only", "dsa", "control"):
        vals = on_disk["accuracy"][name]
        assert len(vals) == len(on_disk["lengths"]) and all(0 <= v <= 1 for v in vals)
        assert list(on_disk["accuracy_per_seed"][name]) == ["0"]
    assert len(on_disk["attention_macs_per_layer"]) == len(on_disk["lengths"])
    assert all(0 <= v <= 1 for v in on_disk["mass_captured"]["dsa"]["indexer"])
