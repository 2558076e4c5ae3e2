"""bench vs-transformers in quick form: the two models agree before anything is timed, every row is a positive
ratio, and the prompt prefill runs in chunks on both sides (an 8K prompt at batch 8 in one call needs 64 GB in
transformers)."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from glm5_ref.apps.bench import vs_transformers  # noqa: E402
from glm5_ref.config import GLM5Config  # noqa: E402


def test_quick_rows_with_chunked_prefill(monkeypatch):
    monkeypatch.setattr(vs_transformers, "PREFILL_CHUNK", 48)  # the quick 128-token prompt: three chunks each side
    rows = vs_transformers.run(quick=True)
    assert [r["name"] for r in rows] == ["prefill", "decode 128", "train step"]
    for r in rows:
        assert r["logits_rel_err"] < 1e-4
        assert r["ours"] > 0 and r["theirs"] > 0 and r["ratio"] == pytest.approx(r["ours"] / r["theirs"])
    assert 0 < rows[1]["of_memory_bound"] < 1


def test_both_sides_prefill_in_chunks_then_decode_one_token_per_call(monkeypatch):
    monkeypatch.setattr(vs_transformers, "PREFILL_CHUNK", 48)
    config = dataclasses.replace(GLM5Config.classroom(), rms_norm_eps=1e-6)
    prompt = torch.randint(0, config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    for model, decode in zip(vs_transformers.models(config), (vs_transformers._decode_ours,
                                                             vs_transformers._decode_theirs)):
        lengths = []
        model.register_forward_pre_hook(lambda module, args: lengths.append(tuple(args[0].shape)))
        assert decode(model, prompt, 3) > 0
        assert lengths == [(2, 48), (2, 48), (2, 32)] + [(2, 1)] * 3, type(model).__name__
