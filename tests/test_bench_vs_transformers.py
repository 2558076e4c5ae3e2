"""bench vs-transformers in quick form: the two models agree before anything is timed, every row is a positive
ratio, and the prompt prefill runs in chunks on both sides (an 8K prompt at batch 8 in one call needs 64 GB in
transformers)."""

import pytest

pytest.importorskip("transformers")

from glm5_ref.apps.bench import vs_transformers  # noqa: E402


def test_quick_rows_with_chunked_prefill(monkeypatch):
    monkeypatch.setattr(vs_transformers, "PREFILL_CHUNK", 48)  # the quick 128-token prompt: three chunks each side
    rows = vs_transformers.run(quick=True)
    assert [r["name"] for r in rows] == ["prefill", "decode 128", "train step"]
    for r in rows:
        assert r["logits_rel_err"] < 1e-4
        assert r["ours"] > 0 and r["theirs"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["theirs"])
    assert 0 < rows[1]["of_memory_bound"] < 1
