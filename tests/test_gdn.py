"""Tests of glm5_ref.gdn: the chunked (WY / UT) delta rule against the token-by-token recurrence (forward, final
state and gradients, odd lengths, several chunk sizes), decoding with a recurrent state against the full forward
for GDN and SimpleGDN, SimpleGDN's mapping of MLA's weights (and nothing else) into the recurrence, errors, and
a hybrid model (DSA, SWA, GDN and SimpleGDN layers swapped in from the dense weights) decoding as it runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_ref.gdn import (GDN_OPTIONS, NEW_PARAMETERS, SIMPLE_GDN_OPTIONS, DeltaNetCache, DeltaNetOptions,
                          GatedDeltaNet, SimpleGDN, adamw_names, causal_conv, delta_rule_chunked,
                          delta_rule_recurrent)
from glm5_ref.model import GLM5Cache, GLM5ForCausalLM
from glm5_ref.swa import SlidingWindowMLA
from tests.strategies import batch_sizes, odd_lengths, randn, seeds, small_configs, with_changes
from tests.test_mla import FP64_TOL, make_mla, rel

pytestmark = pytest.mark.usefixtures("one_thread")
chunk_sizes = st.sampled_from([1, 2, 3, 4, 7, 16, 64])


def delta_inputs(seed: int, B: int, T: int, H: int, K: int, V: int, dtype=torch.float64):
    """Unit q, k; v; log alpha < 0; beta in (0, 1); an initial state: all leaves that require grad."""
    q = F.normalize(randn(seed, B, T, H, K, dtype=dtype), dim=-1)
    k = F.normalize(randn(seed + 1, B, T, H, K, dtype=dtype), dim=-1)
    v = randn(seed + 2, B, T, H, V, dtype=dtype)
    log_alpha = F.logsigmoid(randn(seed + 3, B, T, H, dtype=dtype) + 2)
    beta = torch.sigmoid(randn(seed + 4, B, T, H, dtype=dtype))
    state = randn(seed + 5, B, H, V, K, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, log_alpha, beta, state)]


def make_layer(config: GLM5Config, seed: int, options=GDN_OPTIONS, dtype=torch.float64) -> GatedDeltaNet:
    """A layer from a seeded MLA, with its new parameters (conv taps, gates) drawn too, so none is trivial."""
    layer = GatedDeltaNet.from_mla(make_mla(config, seed, dtype), options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.split(".")[0] in NEW_PARAMETERS:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return layer


# --- the recurrence: chunked == recurrent -----------------------------------------------------------------------
@given(B=batch_sizes, T=st.sampled_from([1, 2, 3, 5, 7, 13, 31]), H=st.integers(1, 3), K=st.sampled_from([3, 5]),
       V=st.sampled_from([2, 7]), C=chunk_sizes, seed=seeds, with_state=st.booleans())
def test_chunked_equals_recurrent_forward_state_and_gradients(B, T, H, K, V, C, seed, with_state):
    inputs = delta_inputs(seed, B, T, H, K, V)
    state = inputs[5] if with_state else None
    probe_o = randn(seed + 6, B, T, H, V, dtype=torch.float64)
    probe_s = randn(seed + 7, B, H, V, K, dtype=torch.float64)
    results = []
    for f in (lambda: delta_rule_recurrent(*inputs[:5], state), lambda: delta_rule_chunked(*inputs[:5], C, state)):
        o, s = f()
        leaves = inputs[:5] + ([state] if with_state else [])
        grads = torch.autograd.grad((o * probe_o).sum() + (s * probe_s).sum(), leaves)
        results.append([o, s, *grads])
    for a, b in zip(*results):
        assert rel(a, b) < 1e-10


@given(T=odd_lengths, C=chunk_sizes, seed=seeds)
def test_splitting_the_sequence_carries_the_state(T, C, seed):
    q, k, v, log_alpha, beta, _ = (t.detach() for t in delta_inputs(seed, 2, T, 2, 3, 4))
    o, s = delta_rule_chunked(q, k, v, log_alpha, beta, C)
    j = T // 2
    o1, s1 = delta_rule_chunked(q[:, :j], k[:, :j], v[:, :j], log_alpha[:, :j], beta[:, :j], C)
    o2, s2 = delta_rule_chunked(q[:, j:], k[:, j:], v[:, j:], log_alpha[:, j:], beta[:, j:], C, s1)
    assert rel(torch.cat([o1, o2], dim=1), o) < 1e-12 and rel(s2, s) < 1e-12


def test_the_delta_rule_reads_back_what_it_wrote():
    k = F.normalize(torch.tensor([[[[1.0, 2.0, 2.0]]]], dtype=torch.float64), dim=-1)  # (1, 1, 1, 3)
    v = torch.tensor([[[[5.0, -1.0]]]], dtype=torch.float64)
    ones = torch.ones(1, 1, 1, dtype=torch.float64)
    state = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    o, s = delta_rule_recurrent(k, k, v, 0 * ones, ones, state)  # alpha = beta = 1: overwrite the value at k
    assert torch.allclose(o, v) and torch.allclose(s @ k[0, 0, 0], v[0, 0, 0])


# --- the layers: decode == forward ------------------------------------------------------------------------------------
@given(config=small_configs(), B=batch_sizes, T=st.sampled_from([1, 5, 13, 31]), seed=seeds,
       simple=st.booleans(), C=chunk_sizes, data=st.data())
def test_decoding_with_the_recurrent_state_equals_the_full_forward(config, B, T, seed, simple, C, data):
    options = dataclasses.replace(SIMPLE_GDN_OPTIONS if simple else GDN_OPTIONS, chunk_size=C)
    layer = make_layer(config, seed, options)
    x = randn(seed, B, T, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        assert rel(layer(x, impl="recurrent"), full) < FP64_TOL
        cache = layer.new_cache(B, dtype=torch.float64)
        p = data.draw(st.integers(0, T), label="prefill")
        bounds = ([(0, p)] if p else []) + [(t, t + 1) for t in range(p, T)]
        for a, b in bounds:
            assert rel(layer(x[:, a:b], cache=cache), full[:, a:b]) < FP64_TOL, (a, b)
    assert cache.length == T


@settings(max_examples=8)  # each example differentiates every parameter twice
@given(seed=seeds, T=st.sampled_from([5, 13]), C=st.sampled_from([2, 4]), simple=st.booleans())
def test_layer_gradients_chunked_equal_recurrent(seed, T, C, simple):
    c = GLM5Config.tiny()
    layer = make_layer(c, seed, dataclasses.replace(SIMPLE_GDN_OPTIONS if simple else GDN_OPTIONS, chunk_size=C))
    x = randn(seed, 2, T, c.hidden_size, dtype=torch.float64).requires_grad_()
    probe = randn(seed + 1, 2, T, c.hidden_size, dtype=torch.float64)
    grads = [torch.autograd.grad((layer(x, impl=impl) * probe).sum(), [x, *layer.parameters()])
             for impl in ("chunked", "recurrent")]
    for a, b in zip(*grads):
        assert rel(a, b) < 1e-6  # the output RMSNorm runs in fp32 (layers.py)


def test_causal_conv_equals_a_padded_conv_and_carries_its_state():
    x, w = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    y, past = causal_conv(x, w, None)
    assert torch.allclose(y, F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], groups=5).transpose(1, 2))
    y1, p1 = causal_conv(x[:, :2], w, None)  # fewer new tokens than taps - 1
    y2, p2 = causal_conv(x[:, 2:], w, p1)
    assert torch.allclose(torch.cat([y1, y2], 1), y) and torch.equal(p2, past) and torch.equal(past, x[:, -3:])


# --- SimpleGDN: MLA's weights mapped into the recurrence, nothing added ---------------------------------------------
@given(config=small_configs(), T=st.sampled_from([1, 2, 3, 5, 7, 13, 31]), seed=seeds)
def test_simple_gdn_is_mla_weights_in_the_plain_delta_rule(config, T, seed):
    mla = make_mla(config, seed, torch.float64)
    simple = SimpleGDN.from_mla(mla)
    assert set(simple.state_dict()) == set(mla.state_dict())  # no new parameter, the same names
    assert all(torch.equal(v, mla.state_dict()[k]) for k, v in simple.state_dict().items())
    x = randn(seed, 2, T, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():  # by hand: MLA's expanded-path q, k, v (RoPE on), L2 norm, alpha = beta = 1
        pos = torch.arange(T)
        q_nope, q_rope = mla.project_q(mla.q_latent(x), pos)
        latent, k_rope = mla.project_kv_latent(x, pos)
        H = mla.num_heads
        k_nope, v = mla.kv_b_proj(latent).view(2, T, H, -1).split([mla.nope_dim, mla.v_dim], dim=-1)
        q = F.normalize(torch.cat([q_nope, q_rope], -1), dim=-1)
        k = F.normalize(torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, H, -1)], -1), dim=-1)
        zeros = torch.zeros(2, T, H, dtype=torch.float64)
        o, _ = delta_rule_recurrent(q, k, v, zeros, zeros + 1, None)
        assert rel(simple(x), mla.o_proj(o.flatten(-2))) < FP64_TOL
        # one token: S_1 = v_1 k_1^T, so the output is MLA's value scaled by cos(q_1, k_1)
        first = mla.o_proj((v[:, :1] * (q[:, :1] * k[:, :1]).sum(-1, keepdim=True)).flatten(-2))
        assert rel(simple(x[:, :1]), first) < FP64_TOL


def test_gdn_adds_conv_gates_and_output_gate_to_mla_and_loads_a_dense_checkpoint():
    c = GLM5Config.tiny()
    dsa = DSAAttention(c)
    gdn = GatedDeltaNet.from_mla(dsa)
    mla_names = set(make_mla(c, 0).state_dict())
    added = set(gdn.state_dict()) - mla_names
    assert mla_names <= set(gdn.state_dict()) and {n.split(".")[0] for n in added} == set(NEW_PARAMETERS)
    assert all(torch.equal(gdn.state_dict()[k], dsa.state_dict()[k]) for k in mla_names)
    H, K, V, D = c.num_attention_heads, c.qk_head_dim, c.v_head_dim, c.hidden_size
    assert sum(gdn.state_dict()[n].numel() for n in added) == 4 * H * (2 * K + V) + D * H * (V + 2) + V + 2 * H
    assert torch.equal(gdn.q_conv1d.weight[:, 0], torch.tensor([0.0, 0, 0, 1]).expand(H * K, 4))  # the identity


# --- errors ---------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    q, k, v, log_alpha, beta, state = (t.detach() for t in delta_inputs(0, 2, 5, 2, 3, 4))
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=rf"chunk_size: expected a positive integer, got {bad!r}"):
            delta_rule_chunked(q, k, v, log_alpha, beta, bad)
    with pytest.raises(ValueError, match=r"chunk_size: expected an integer >= 1, got 0"):
        DeltaNetOptions(chunk_size=0)
    with pytest.raises(ValueError, match=r"k: expected shape \(2, 5, 2, 3\) \(as q\), got \(2, 5, 2, 4\)"):
        delta_rule_recurrent(q, v, v, log_alpha, beta)
    with pytest.raises(ValueError, match=r"beta: expected shape \(2, 5, 2\) \(as q\), got \(2, 5\)"):
        delta_rule_chunked(q, k, v, log_alpha, beta[..., 0])
    with pytest.raises(ValueError, match=r"v: expected shape \(2, 5, 2, V\), got \(2, 4, 2, 4\)"):
        delta_rule_recurrent(q, k, v[:, :4], log_alpha, beta)
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 2, 4, 3\) \(B, H, V, K\), got \(2, 2, 3, 4\)"):
        delta_rule_chunked(q, k, v, log_alpha, beta, 2, state.transpose(-1, -2))
    with pytest.raises(ValueError, match=r"q: expected shape \(B, T, H, K\), got \(2, 5, 6\)"):
        delta_rule_recurrent(q.flatten(2), k, v, log_alpha, beta)
    for name in ("alpha", "beta"):
        with pytest.raises(ValueError, match=rf"{name}: expected a number in \(0, 1\], got 0"):
            DeltaNetOptions(**{name: 0})
    c = GLM5Config.tiny()
    with pytest.raises(ValueError, match="options: expected no conv, gates or output gate"):
        SimpleGDN(c, options=GDN_OPTIONS)
    layer = SimpleGDN(c).double()
    x = torch.zeros(1, 2, c.hidden_size, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 32\)"):
        layer(x[..., :7])
    with pytest.raises(ValueError, match="impl: expected 'chunked' or 'recurrent', got 'fast'"):
        layer(x, impl="fast")
    with pytest.raises(ValueError, match="cache: expected a DeltaNetCache"):
        layer(x, cache=object())
    cache = layer.new_cache(1, max_len=3, dtype=torch.float64)
    layer(x, cache=cache)
    with pytest.raises(ValueError, match="room for 2 tokens"):
        layer(x, cache=cache)
    with pytest.raises(ValueError, match="positions: with a cache of length 2"):
        layer(x[:, :1], positions=torch.tensor([0]), cache=cache)
    with pytest.raises(ValueError, match="truncate new_length: expected 2 .*cannot be rolled back.*got 1"):
        cache.truncate(1)
    assert cache.length == 2 and isinstance(cache, DeltaNetCache)


# --- a hybrid model: the layers swapped in as the efficient-attention experiment will -------------------------------
def test_a_hybrid_model_decodes_as_it_runs_and_names_its_adamw_parameters():
    c = with_changes(GLM5Config.tiny(), num_hidden_layers=4)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(c).double()
    layers = model.model.layers  # F S G L: DSA kept, then SWA, GDN, SimpleGDN from the dense weights
    layers[1].self_attn = SlidingWindowMLA.from_mla(layers[1].self_attn, window=3)
    layers[2].self_attn = make_layer(c, 0).double()
    layers[3].self_attn = SimpleGDN.from_mla(layers[3].self_attn)
    ids = torch.randint(0, c.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = GLM5Cache(c, 2, 9, dtype=torch.float64)
        for i, layer in enumerate(layers):  # the proposed model.new_cache: each layer's own cache where it has one
            if hasattr(layer.self_attn, "new_cache"):
                cache.layers[i] = layer.self_attn.new_cache(2, 9, dtype=torch.float64)
        steps = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                            for t in range(4, 9)]
    assert rel(torch.cat(steps, dim=1), full) < FP64_TOL
    names = adamw_names(model)  # build_optimizer (training/optim.py) refuses a Muon parameter that is not 2-D
    assert set(names) == {n for n, p in model.named_parameters() if p.dim() > 2} and len(names) == 3
