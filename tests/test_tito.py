"""TITO trajectories and gateway (glm5_ref/tito.py): exact sampler ids and log-probs, the re-tokenization
trap, the prefix check, and concurrency."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.apps.tool_env import toy_config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.rl import sequence_logprobs
from glm5_ref.tito import (TITOGateway, first_divergence, mask_after_drift, retokenization_trap)
from glm5_ref.tokenizer import decode, encode, retokenization_example


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GLM5ForCausalLM(toy_config()).eval()


def test_gateway_ids_and_logprobs_equal_the_samplers(model):
    prompt = [4091, 3245, 43, 3409, 4092]
    gw = TITOGateway()
    gw.start("r0", prompt)
    new = gw.generate("r0", model, version=3, max_new_tokens=6, temperature=1.0, seed=7)
    ref_ids, ref_lp = model.generate(torch.tensor([prompt]), 6, temperature=1.0, seed=7, return_logprobs=True)
    assert new == ref_ids[0, len(prompt):].tolist()
    env = [4095, 1861, 4092]
    gw.record_environment("r0", env)
    ctx = prompt + new + env
    new2 = gw.generate("r0", model, version=4, max_new_tokens=3, temperature=1.0, seed=8)
    ref2_ids, ref2_lp = model.generate(torch.tensor([ctx]), 3, temperature=1.0, seed=8, return_logprobs=True)
    assert new2 == ref2_ids[0, len(ctx):].tolist()
    traj = gw.finish("r0", reward=1.0)
    assert traj.ids == ctx + new2
    assert traj.loss_mask == [0] * 5 + [1] * 6 + [0] * 3 + [1] * 3
    assert traj.versions == [-1] * 5 + [3] * 6 + [-1] * 3 + [4] * 3
    assert traj.model_versions == [3, 4] and traj.staleness(6) == 3
    got = torch.tensor(traj.logprobs)
    want = torch.zeros(len(traj.ids))
    want[5:11], want[14:] = ref_lp[0], ref2_lp[0]
    assert torch.equal(got, want)  # bit-for-bit the sampler's numbers
    # and the trainer's recomputation of the same tokens gives ratio ~ 1 (same weights, temperature 1)
    lp = sequence_logprobs(model(torch.tensor([traj.ids])).logits, torch.tensor([traj.ids]))[0]
    mask = torch.tensor(traj.loss_mask).bool()
    torch.testing.assert_close(lp[mask], got[mask], rtol=1e-4, atol=1e-4)
    assert gw.live() == []


def test_generation_is_cut_after_the_first_stop_token(model):
    gw = TITOGateway()
    gw.start("r", [4091, 3245])
    # every token is a stop token: the turn is exactly one token long
    new = gw.generate("r", model, 0, 5, temperature=1.0, stop_tokens=list(range(4096)), seed=0)
    assert len(new) == 1
    assert len(gw.finish("r").logprobs) == 3


def test_retokenization_changes_ids_on_a_constructed_example():
    ids_sampled, text, ids_reencoded = retokenization_example()
    assert decode(ids_sampled) == text and ids_reencoded == encode(text)
    fake_lp = [-0.1 * (k + 1) for k in range(len(ids_sampled))]
    trap = retokenization_trap(ids_sampled, fake_lp, decode, encode)
    assert not trap["same_ids"] and trap["text"] == text
    assert trap["ids_retokenized"] != ids_sampled
    # the stored log-probs now sit on ids the sampler never produced
    assert any(tok != ids_sampled[k] for k, (tok, _) in enumerate(trap["pairs"]) if k < len(ids_sampled))
    # canonical ids survive the round trip
    canon = encode(" the function returns")
    assert retokenization_trap(canon, [0.0] * len(canon), decode, encode)["same_ids"]


def test_toy_bpe_hello_round_trip():
    """TRL issue #5224: ["he", "llo"] decodes to "hello", which a BPE re-encodes as one token."""
    vocab = {0: "he", 1: "llo", 2: "hello"}
    dec = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    enc = lambda text: [2] if text == "hello" else [k for k, v in vocab.items() if v == text]  # noqa: E731
    trap = retokenization_trap([0, 1], [-0.5, -0.7], dec, enc)
    assert trap["ids_retokenized"] == [2] and not trap["same_length"]


def test_prefix_check_masks_after_drift():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 9, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2
    assert mask_after_drift([1, 2, 3, 4], [1, 2, 7, 4], [0, 1, 1, 1]) == [0, 1, 0, 0]
    assert mask_after_drift([1, 2], [1, 2], [1, 1]) == [1, 1]


@settings(max_examples=5, deadline=None)
@given(n=st.integers(2, 24), turns=st.integers(1, 5), seed=st.integers(0, 1000))
def test_concurrent_rollouts_stay_intact(n, turns, seed):
    gw = TITOGateway()
    barrier = threading.Barrier(n)
    errors = []

    def rollout(k: int) -> None:
        try:
            rng = random.Random(seed + k)
            gw.start(f"r{k}", [k])
            barrier.wait()
            for t in range(turns):  # interleave with the other threads as much as possible
                gw.record_generation(f"r{k}", [k, t], [-0.5, -float(k)], version=t)
                if rng.random() < 0.5:
                    threading.Event().wait(0.0005)
                gw.record_environment(f"r{k}", [1000 + k])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rollout, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert sorted(gw.live()) == sorted(f"r{k}" for k in range(n))
    for k in range(n):
        traj = gw.finish(f"r{k}", reward=float(k))
        assert traj.ids == [k] + [x for t in range(turns) for x in (k, t, 1000 + k)]
        assert traj.logprobs == [0.0] + [x for _ in range(turns) for x in (-0.5, -float(k), 0.0)]
        assert traj.model_versions == list(range(turns))
    assert gw.live() == []


def test_gateway_bad_inputs():
    gw = TITOGateway()
    gw.start("a", [1, 2])
    with pytest.raises(ValueError, match="already live"):
        gw.start("a", [1])
    with pytest.raises(ValueError, match="not live"):
        gw.record_environment("b", [1])
    with pytest.raises(ValueError, match="logprobs"):
        gw.record_generation("a", [1, 2], [-0.1], version=0)
    with pytest.raises(ValueError, match="logprobs"):
        gw.record_generation("a", [1], [float("nan")], version=0)
    with pytest.raises(TypeError, match="ids"):
        gw.record_environment("a", [1.5])
    with pytest.raises(ValueError, match="prompt_ids"):
        gw.start("c", [])
    gw.abort("a")
    with pytest.raises(ValueError, match="not live"):
        gw.finish("a")
