"""Tests of the copy-onset experiment (glm5_ref/apps/experiments/copy_onset.py): the onset rule and the summary
read curves as documented, the reference GPT is causal and its shared rotary key really is one key for every
head, the loss split scores the halves it names, and the quick mode writes the JSON the README reads."""

from __future__ import annotations

import json

import pytest
import torch

from glm5_ref.apps import experiments
from glm5_ref.apps.experiments import copy_onset as co


def curve(pairs):
    return [{"step": 50 * i, "first": f, "repeat": r} for i, (f, r) in enumerate(pairs)]


def test_onset_is_the_first_evaluation_with_the_gap():
    c = curve([(8.3, 8.3), (8.3, 7.5), (8.3, 7.2), (8.3, 8.0), (8.3, 6.0)])
    assert co.onset(c) == 100  # 8.3 - 7.2 >= 1.0; step 50's 0.8 is not enough
    assert co.onset(c, gap=0.5) == 50
    assert co.onset(curve([(8.3, 8.29)] * 4)) is None


def test_summary_counts_seeds_and_needs_a_majority_for_a_median():
    runs = [{"arm": "a", "seed": s, "onset": o, "curve": curve([(8.3, 8.3), (8.3, r)])}
            for s, o, r in ((0, 300, 1.0), (1, None, 8.3), (2, 100, 2.0))]
    runs += [{"arm": "b", "seed": s, "onset": o, "curve": curve([(8.3, 8.3)])}
             for s, o in ((0, None), (1, None), (2, 400))]
    s = co.summarize(runs, ["a", "b"], steps=800)
    assert s["a"]["onsets"] == [300, None, 100] and s["a"]["started"] == 2 and s["a"]["median_onset"] == 300
    assert s["b"]["started"] == 1 and s["b"]["median_onset"] is None  # one of three is no majority
    assert s["a"]["final_repeat_mean"] == pytest.approx((1.0 + 8.3 + 2.0) / 3, abs=1e-3)


def test_split_losses_score_the_named_halves():
    rows = torch.randint(0, 50, (3, 2 * co.SPAN))
    logits = torch.zeros(3, 2 * co.SPAN, 50)
    logits[:, co.SPAN - 1:-1].scatter_(-1, rows[:, co.SPAN:, None], 30.0)  # perfect on the second half only
    first, repeat = co.split_losses(logits, rows)
    assert repeat < 1e-6 and first == pytest.approx(torch.log(torch.tensor(50.0)).item(), rel=1e-5)


@pytest.mark.parametrize("shared, swiglu", [(False, False), (True, False), (False, True)])
def test_gpt_is_causal_and_the_shared_rotary_key_is_one_key(shared, swiglu):
    torch.manual_seed(0)
    m = co.PlainGPT(97, dim=32, layers=2, heads=4, rope_dims=4, shared_rope_key=shared, swiglu=swiglu).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        out = m(ids)
        changed = ids.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 97
        assert torch.allclose(m(changed)[:, :7], out[:, :7], atol=1e-5)  # the future does not leak
        head_dim, qkv = 8, m.blocks[0]["qkv"].weight
        other_heads_rot_k = [32 + h * head_dim + d for h in range(1, 4) for d in range(4)]  # rotated k dims, heads 1-3
        qkv[other_heads_rot_k] += torch.randn(len(other_heads_rot_k), 32)
        moved = (m(ids) - out).abs().max().item()
    assert (moved < 1e-6) if shared else (moved > 1e-3)  # shared: heads 1-3 read head 0's rotary key


def test_gpt_rejects_bad_rope_dims():
    with pytest.raises(ValueError, match="rope_dims"):
        co.PlainGPT(10, dim=32, heads=4, rope_dims=9)


def test_quick_run_writes_the_documented_json_and_resumes(tmp_path, monkeypatch):
    assert "copy-onset" in experiments.EXPERIMENTS
    result = co.run(quick=True, out_dir=str(tmp_path), jobs=1)
    saved = json.loads((tmp_path / "copy_onset.json").read_text())
    assert (tmp_path / "copy_onset.png").stat().st_size > 0
    assert saved["arms"] == result["arms"] and set(saved["summary"]) == set(saved["arms"])
    assert {"task", "arm_lr", "seeds", "steps", "runs", "machine"} <= set(saved)
    for r in saved["runs"]:
        assert [c["step"] for c in r["curve"]] == list(range(0, co.QUICK["steps"] + 1, co.QUICK["eval_every"]))
        assert r["onset"] == co.onset(r["curve"])
    table = co.markdown(saved).splitlines()
    assert len(table) == 2 + len(saved["arms"]) and all(f"| {a} |" in "\n".join(table) for a in saved["arms"])
    # a second run finds every (arm, seed) in the cache and trains nothing
    def no_training(*args):
        raise AssertionError("trained a run that was cached")

    monkeypatch.setattr(co, "run_arm", no_training)
    again = co.run(quick=True, out_dir=str(tmp_path), jobs=1)
    assert again["runs"] == result["runs"]
    with pytest.raises(ValueError, match="arms"):
        co.run(quick=True, out_dir=str(tmp_path), jobs=1, arms=["no-such-arm"])


def test_init_options_set_the_documented_scales():
    """The init arms: PlainGPT's embed_std / linear_std, and the classroom model's torch_init (PyTorch's default
    init, reaching the MoE's packed experts) and embed_std; every other weight keeps its init."""
    torch.manual_seed(0)
    gpt = co.PlainGPT(4000, embed_std=0.02)
    assert gpt.embed.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert gpt.blocks[0]["qkv"].weight.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.02)  # default
    gpt = co.PlainGPT(4000, linear_std=0.02)
    assert gpt.embed.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert gpt.blocks[0]["qkv"].weight.std().item() == pytest.approx(0.02, rel=0.02)
    model, _ = co.build("glm5", dict(torch_init=True))
    moe, attn = model.model.layers[1].mlp, model.model.layers[0].self_attn
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert moe.experts[3].up_proj.weight.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.05)
    assert attn.kv_b_proj.weight.std().item() == pytest.approx(1 / (3 * 64) ** 0.5, rel=0.05)
    with torch.no_grad():
        gate_up, down = moe.packed_expert_weights()  # what the forward reads: the in-place init reached it
    assert gate_up.std().item() == pytest.approx(1 / (3 * 256) ** 0.5, rel=0.02)
    assert down.std().item() == pytest.approx(1 / (3 * 128) ** 0.5, rel=0.02)
    model, _ = co.build("glm5", dict(embed_std=1.0))
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(1.0, rel=0.02)
    assert model.model.layers[0].self_attn.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_every_arm_builds():
    for name, (kind, _, options) in co.ARMS.items():
        model, logits_of = co.build(kind, options)
        assert logits_of(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 4112), name


def test_prefix_reads_each_row_after_gmask_sop():
    from glm5_ref.tokenizer import SPECIAL_TOKENS

    torch.manual_seed(0)
    model, logits_of = co.build("gpt", dict(rope_dims=64, prefix=True))
    ids = torch.randint(0, 4000, (2, 6))
    full = torch.cat([torch.tensor([[SPECIAL_TOKENS["[gMASK]"], SPECIAL_TOKENS["<sop>"]]] * 2), ids], dim=1)
    with torch.no_grad():
        assert torch.equal(logits_of(ids), model(full)[:, 2:])
        assert not torch.allclose(logits_of(ids), model(ids), atol=1e-4)  # the prefix changes what a row sees
