"""Tests of glm5_ref.swa: sliding-window MLA against its plainly written twin, the ring cache against the full
forward (rings that wrap many times), the reduction to MLA when the window covers the sequence, checkpoint
loading, key selection inside the window, rollback, and errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_ref.swa import RingMLACache, SlidingWindowMLA, naive_sliding_window_mla, window_key_indices
from tests.strategies import batch_sizes, odd_lengths, randn, seeds, small_configs
from tests.test_mla import FP64_TOL, make_mla, random_key_indices, rel

pytestmark = pytest.mark.usefixtures("one_thread")
windows = st.sampled_from([1, 2, 3, 5, 8])


def make_swa(config: GLM5Config, seed: int, window: int, dtype=torch.float64) -> SlidingWindowMLA:
    return SlidingWindowMLA.from_mla(make_mla(config, seed, dtype), window)


def chunk_bounds(data, T: int) -> list[tuple[int, int]]:
    """A drawn prefill, then single tokens and small chunks up to T."""
    p = data.draw(st.integers(0, T), label="prefill")
    bounds = [(0, p)] if p else []
    while p < T:
        size = data.draw(st.sampled_from([1, 1, 2, 3, 7]), label="chunk")
        bounds.append((p, min(T, p + size)))
        p = bounds[-1][1]
    return bounds


# --- the window in the full forward ----------------------------------------------------------------------------
@given(config=small_configs(), B=batch_sizes, T=odd_lengths, W=windows, seed=seeds, absorbed=st.booleans(),
       impl=st.sampled_from(["masked", "gathered"]))
def test_full_forward_equals_the_naive_twin(config, B, T, W, seed, absorbed, impl):
    m = make_swa(config, seed, W)
    x = randn(seed, B, T, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        out = m.attend(x, absorbed=absorbed, sparse_impl=impl).out
        assert rel(out, naive_sliding_window_mla(m, x, W)) < FP64_TOL


@given(seed=seeds, T=st.sampled_from([5, 13]), W=windows)
def test_gradients_equal_the_naive_twin(seed, T, W):
    c = GLM5Config.tiny()
    m = make_swa(c, seed, W)
    x = randn(seed, 2, T, c.hidden_size, dtype=torch.float64).requires_grad_()
    grads = []
    for f in (lambda: m(x), lambda: naive_sliding_window_mla(m, x, W)):
        m.zero_grad()
        x.grad = None
        (f() * randn(seed + 1, 2, T, c.hidden_size, dtype=torch.float64)).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert rel(a, b) < FP64_TOL


@given(config=small_configs(), B=batch_sizes, T=odd_lengths, seed=seeds, absorbed=st.booleans(),
       extra=st.integers(0, 9))
def test_a_window_covering_the_sequence_is_mla_exactly(config, B, T, seed, absorbed, extra):
    mla = make_mla(config, seed)
    x = randn(seed, B, T, config.hidden_size)
    with torch.no_grad():
        assert torch.equal(SlidingWindowMLA.from_mla(mla, T + extra)(x, absorbed=absorbed), mla(x, absorbed=absorbed))


def test_a_key_outside_the_window_has_no_influence():
    c = GLM5Config.tiny()
    m = make_swa(c, 0, window=3)
    x = randn(1, 1, 9, c.hidden_size, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 2] += 1.0  # token 2 is inside the windows of queries 2, 3, 4 only
    with torch.no_grad():
        y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :2], y2[:, :2]) and torch.equal(y[:, 5:], y2[:, 5:])
    assert not torch.allclose(y[:, 2:5], y2[:, 2:5])


# --- the ring cache -----------------------------------------------------------------------------------------------
@given(config=small_configs(), B=batch_sizes, T=st.sampled_from([1, 5, 13, 31]), W=windows, seed=seeds,
       absorbed=st.booleans(), data=st.data())
def test_ring_decode_equals_the_full_forward(config, B, T, W, seed, absorbed, data):
    m = make_swa(config, seed, W)
    x = randn(seed, B, T, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(B, dtype=torch.float64)
        for a, b in chunk_bounds(data, T):
            out = m(x[:, a:b], cache=cache, absorbed=absorbed)
            assert rel(out, full[:, a:b]) < FP64_TOL, (a, b)
    assert cache.length == T and cache.latent.shape[1] == W  # a fixed buffer of W slots, whatever T


def test_the_ring_holds_token_p_in_slot_p_mod_w():
    c = GLM5Config.tiny()
    m = make_swa(c, 2, window=4)
    x = randn(3, 1, 11, c.hidden_size, dtype=torch.float64)
    cache = m.new_cache(1, dtype=torch.float64)
    with torch.no_grad():
        for t in range(11):
            m(x[:, t:t + 1], cache=cache, absorbed=True)
        latent, _ = m.project_kv_latent(x, torch.arange(11))
    for p in range(7, 11):  # the last W tokens
        assert torch.equal(cache.latent[:, p % 4], latent[:, p])
    assert torch.equal(cache.recent(3)[0], latent[:, 8:11])


@given(seed=seeds, T=st.sampled_from([7, 13]), W=windows, absorbed=st.booleans())
def test_key_selection_is_intersected_with_the_window_also_at_decode(seed, T, W, absorbed):
    c = GLM5Config.tiny()
    m = make_swa(c, seed, W)
    mla = make_mla(c, seed, torch.float64)
    x = randn(seed, 2, T, c.hidden_size, dtype=torch.float64)
    idx = random_key_indices(seed, 2, T)
    inside = torch.where(idx > torch.arange(T)[None, :, None] - W, idx, -1)
    with torch.no_grad():
        full = m(x, key_indices=idx)
        assert rel(full, mla(x, key_indices=inside)) < FP64_TOL
        cache = m.new_cache(2, dtype=torch.float64)
        for t in range(T):
            out = m(x[:, t:t + 1], cache=cache, absorbed=absorbed, key_indices=idx[:, t:t + 1])
            assert rel(out, full[:, t:t + 1]) < FP64_TOL


def test_window_key_indices():
    assert window_key_indices(torch.arange(4), 3).tolist() == [[-1, -1, 0], [-1, 0, 1], [0, 1, 2], [1, 2, 3]]


def test_truncate_rolls_back_within_the_spare_capacity():
    c = GLM5Config.tiny()
    m = make_swa(c, 1, window=3)
    x = randn(2, 1, 10, c.hidden_size, dtype=torch.float64)
    draft = randn(3, 1, 2, c.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache = RingMLACache.for_config(c, 1, window=3, capacity=5, dtype=torch.float64)
        m(x[:, :6], cache=cache)
        m(draft, cache=cache)  # two draft tokens, both rejected: capacity - window + 1 = 3 may be undone
        cache.truncate(6)
        assert rel(m(x[:, 6:], cache=cache, absorbed=True), full[:, 6:]) < FP64_TOL
    with pytest.raises(ValueError, match=r"truncate new_length: expected an int in \[7, 10\]"):
        cache.truncate(6)


# --- checkpoints and errors ---------------------------------------------------------------------------------------
def test_a_dense_checkpoint_loads_unchanged():
    c = GLM5Config.tiny()
    mla, dsa = make_mla(c, 0), DSAAttention(c)
    swa = SlidingWindowMLA(c, window=4)
    swa.load_state_dict(mla.state_dict())  # strict: the same names and shapes
    assert set(swa.state_dict()) == set(mla.state_dict())
    from_dsa = SlidingWindowMLA.from_mla(dsa, 4)  # the indexer is left out
    assert all(torch.equal(v, dsa.state_dict()[k]) for k, v in from_dsa.state_dict().items())


def test_bad_inputs_raise_value_errors_naming_the_argument():
    c = GLM5Config.tiny()
    for bad in (0, -1, True, 2.5, None):
        with pytest.raises(ValueError, match=rf"window: expected a positive integer .*got {bad!r}"):
            SlidingWindowMLA(c, window=bad)
    with pytest.raises(ValueError, match="window: expected a positive integer"):
        naive_sliding_window_mla(make_mla(c, 0), torch.zeros(1, 2, c.hidden_size), 0)
    with pytest.raises(ValueError, match="capacity: expected >= window = 4, got 3"):
        RingMLACache.for_config(c, 1, window=4, capacity=3)
    m = make_swa(c, 0, window=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 32\)"):
        m(torch.zeros(1, 3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="cache: expected a RingMLACache"):
        m(torch.zeros(1, 1, c.hidden_size, dtype=torch.float64), cache=object())
    with pytest.raises(ValueError, match="cache: expected a ring for window 4, got window 2"):
        m(torch.zeros(1, 1, c.hidden_size, dtype=torch.float64), cache=RingMLACache.for_config(c, 1, 2))
    with pytest.raises(ValueError, match="sparse_impl: expected one of"):
        m.attend(torch.zeros(1, 1, c.hidden_size, dtype=torch.float64), sparse_impl="dense")
    cache = m.new_cache(1, max_len=3, dtype=torch.float64)
    m(torch.zeros(1, 2, c.hidden_size, dtype=torch.float64), cache=cache)
    with pytest.raises(ValueError, match="positions: with a cache of length 2"):
        m(torch.zeros(1, 1, c.hidden_size, dtype=torch.float64), positions=torch.tensor([5]), cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        m(torch.zeros(1, 2, c.hidden_size, dtype=torch.float64), cache=cache)
    assert cache.length == 2  # refused calls changed nothing
