"""The serving-batch rows of bench mla-decode and dsa-decode: the batch follows the cache budget, and a batched
step computes what the unbatched paths compute (checked inside each row as rel_diff)."""

import pytest
import torch

from glm5_ref.apps import bench
from glm5_ref.apps.bench import dsa_decode, mla_decode
from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_ref.mla import MLA

pytestmark = pytest.mark.usefixtures("one_thread")


def test_serving_batch_is_the_most_sequences_that_fit_the_budget(monkeypatch):
    monkeypatch.setattr(bench, "available_memory", lambda: 64 * 2**30)
    assert bench.serving_batch(2**30) == 12  # 12 GiB of caches
    assert bench.serving_batch(2**20) == 64  # the cap
    assert bench.serving_batch(100 * 2**30) == 1  # never below one sequence
    monkeypatch.setattr(bench, "available_memory", lambda: 4 * 2**30)
    assert bench.serving_batch(2**29) == 4  # half of what is available, when that is less than 12 GiB
    assert bench.serving_batch(100 * 2**20, quick=True) == 5  # 512 MiB in quick mode


def test_batched_mla_decode_row_matches_the_expanded_path():
    config = GLM5Config.classroom()
    with torch.no_grad():
        row = mla_decode.measure(MLA(config).eval(), config, L=40, B=3, repeats=1, device=torch.device("cpu"))
    assert row["batch"] == 3 and row["context"] == 40
    assert row["rel_diff"] < 1e-5 and row["expanded_ms"] > 0 and row["absorbed_ms"] > 0


def test_batched_dsa_decode_row_selects_top_k_and_matches_the_masked_path():
    config = GLM5Config.classroom()  # index_topk 128 < 200 cached keys: the indexer really selects
    torch.manual_seed(0)
    with torch.no_grad():
        dsa = DSAAttention(config).eval()
        row = dsa_decode.measure(dsa, dsa_decode.shared_mla(dsa), L=200, B=2, repeats=1, device=torch.device("cpu"))
    assert row["batch"] == 2 and row["index_topk"] == 128
    assert row["rel_diff"] < 1e-5 and row["dense_vs_mla"] < 1e-6
    assert row["mac_ratio"] > 1  # DSA's attention core does less work than dense over 201 keys
