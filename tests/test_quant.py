"""quant.py: W8A8 / W4A8 fake quantization against naive twins, packed int4, the Hadamard rotation, the grouped and
loop expert paths, and INT4 QAT whose weights equal the offline-quantized ones bit for bit."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref import quant
from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.moe import MoE

CONFIG = dataclasses.replace(GLM5Config.tiny(), moe_intermediate_size=32, n_routed_experts=8, index_topk=8)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-30))


def naive_quantize(w: torch.Tensor, bits: int, group: int | None):
    """The twin: Python loops over rows and groups, one scale each, the rounding spelled out."""
    qmax = 2 ** (bits - 1) - 1
    rows, n = w.shape
    g = n if group is None else group
    q, scale = torch.zeros(rows, n, dtype=torch.int8), torch.zeros(rows, n // g)
    for r in range(rows):
        for j in range(n // g):
            block = w[r, j * g:(j + 1) * g].float()
            s = max(float(block.abs().max()), 1e-12) / qmax
            scale[r, j] = s
            q[r, j * g:(j + 1) * g] = torch.round(block / torch.tensor(s, dtype=torch.float32)).clamp(-qmax, qmax)
    return q, scale


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 4), g=st.sampled_from([2, 4, 8, 16]),
       bits=st.sampled_from([4, 8]), per_channel=st.booleans(), seed=st.integers(0, 2**16))
def test_weight_quantization_equals_its_naive_twin(rows, groups, g, bits, per_channel, seed):
    w = torch.randn(rows, groups * g, generator=torch.Generator().manual_seed(seed)) * 3
    group = None if per_channel else g
    q, scale = quant.quantize_weight(w, bits, group)
    nq, nscale = naive_quantize(w, bits, group)
    assert torch.equal(q, nq) and torch.allclose(scale, nscale, rtol=1e-6, atol=0)
    deq = quant.dequantize_weight(q, scale)
    per_weight = scale.repeat_interleave(w.shape[1] // scale.shape[1], 1)
    assert bool(((deq - w).abs() <= per_weight / 2 * (1 + 1e-5)).all())  # round to nearest: half a step


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 8)), seed=st.integers(0, 2**16))
def test_packed_int4_round_trips(shape, seed):
    q = torch.randint(-8, 8, (shape[0], 2 * shape[1]), generator=torch.Generator().manual_seed(seed)).to(torch.int8)
    packed = quant.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1])
    assert torch.equal(quant.unpack_int4(packed), q)
    assert int(quant.pack_int4(torch.tensor([[-1, 2]], dtype=torch.int8))) == 0x2F  # low nibble first, two's complement
    with pytest.raises(ValueError, match="pack_int4"):
        quant.pack_int4(torch.tensor([[9, 0]], dtype=torch.int8))


def test_activation_quantization_is_per_token_and_the_rotation_orthogonal():
    x = torch.randn(5, 768)
    x[:, 7] *= 50  # an outlier channel
    fq = quant.fake_quantize_activation(x)
    assert torch.equal(fq[2], quant.fake_quantize_activation(x[2:3])[0])  # each token alone
    assert quant.hadamard_block(768) == 256 and quant.hadamard_block(6144) == 2048
    y = torch.randn(3, 768)
    assert torch.allclose(quant.rotate(x) @ quant.rotate(y).T, x @ y.T, rtol=1e-4, atol=1e-3)
    err = lambda v: float((quant.fake_quantize_activation(v) - v).norm() / v.norm())  # noqa: E731
    assert err(quant.rotate(x)) < err(x) / 3  # the outlier spread over its block: finer steps for the rest


def test_quant_linear_is_the_formula():
    lin = torch.nn.Linear(64, 24, bias=False)
    x = torch.randn(3, 7, 64)
    for rotate in (False, True):
        spec = quant.QuantSpec(8, None, 8, rotate)
        xr, wr = (quant.rotate(x), quant.rotate(lin.weight)) if rotate else (x, lin.weight)
        want = quant.fake_quantize_activation(xr) @ quant.fake_quantize_weight(wr, 8).T
        assert torch.equal(quant.QuantLinear(lin, spec)(x), want)


def _model(seed=0):
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(CONFIG).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("scheme, rotate", [("w8a8", False), ("w4a8", False), ("w4a8", True)])
def test_quantized_model_paths_agree_and_the_original_is_untouched(scheme, rotate):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quant.quantize_model(model, scheme, rotate, group_size=8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert set(q.state_dict()) == set(before)  # the checkpoint's names
    assert sum(isinstance(m, quant.QuantMoE) for m in q.modules()) == len(model.moe_layers())
    assert not any(isinstance(m, quant.QuantLinear) for moe in q.moe_layers() for m in moe.experts.modules())
    ids = torch.randint(0, CONFIG.vocab_size, (2, 19))
    with torch.no_grad():
        ref = q(ids).logits
        assert _rel(q(ids, execution=q.execution.replace(moe_impl="loop")).logits, ref) < 1e-5  # the twins
        cache = q.new_cache(2, 19)
        steps = torch.cat([q(ids[:, :12], cache=cache).logits] + [q(ids[:, t:t + 1], cache=cache).logits
                                                                  for t in range(12, 19)], 1)
        assert _rel(steps, ref) < 1e-3  # absorbed decode = expanded forward (kv_b_proj is weight-only)
        assert 1e-4 < _rel(ref, model(ids).logits) < 0.5  # it is quantised, and still the model


def test_grouped_and_loop_experts_agree_forward_and_backward_under_qat():
    model = _model(1)
    moe = quant.quantize_model(model, "w4a8", True, group_size=8, qat=True).moe_layers()[0].train()
    x = torch.randn(2, 11, CONFIG.hidden_size, requires_grad=True)
    grads = []
    for impl in ("grouped", "loop"):
        y = moe(x, impl=impl)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, moe.experts[3].down_proj.weight))
        grads.append((y, gx, gw))
    for a, b in zip(*grads):
        assert _rel(a, b) < 1e-5


def test_qat_weights_equal_the_offline_quantized_weights_bit_for_bit(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(2)
    qat = quant.quantize_model(model, "w4a8", True, group_size=8, qat=True).train()
    opt = torch.optim.SGD(qat.parameters(), lr=0.5)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12))
    for _ in range(2):  # a few QAT steps move the master weights
        opt.zero_grad()
        qat(ids, labels=ids).loss.backward()
        opt.step()
    seen = {}  # the weights the QAT forward multiplies by, captured in the forward itself
    for name, m in qat.named_modules():
        if isinstance(m, quant.QuantLinear):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, mod.quantized_weight().detach()))
    qat(ids)
    experts = {n: [t.detach() for t in m.quantized_experts()] for n, m in qat.named_modules()
               if isinstance(m, quant.QuantMoE)}
    save_file(quant.export_quantized(qat), tmp_path / "w4a8.safetensors")  # offline: integers and scales on disk
    plain = GLM5ForCausalLM(CONFIG)
    plain.load_state_dict(qat.state_dict())  # the trained master weights
    served = quant.load_quantized(quant.quantize_model(plain.eval(), "w4a8", True, group_size=8),
                                  load_file(tmp_path / "w4a8.safetensors"))
    packed = load_file(tmp_path / "w4a8.safetensors")
    assert packed["model.layers.1.mlp.experts.0.down_proj.weight_packed"].dtype == torch.uint8
    modules = dict(served.named_modules())
    assert len(seen) > 10
    for name, w in seen.items():
        assert torch.equal(modules[name]._cache, w), name
    for name, (gate_up, down) in experts.items():
        assert torch.equal(modules[name]._cache[0], gate_up) and torch.equal(modules[name]._cache[1], down), name
    qat.eval()
    with torch.no_grad():  # the QAT model in eval and the served model: the same function
        frozen = quant.quantize_model(plain, "w4a8", True, group_size=8)
        assert torch.equal(served(ids).logits, frozen(ids).logits)


def test_bad_quantization_settings_are_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="scheme"):
        quant.quantize_model(model, "w2a2")
    with pytest.raises(ValueError, match="group_size: expected a divisor of the input width 32"):
        quant.quantize_model(model, "w4a8", group_size=5)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize_weight(torch.randn(2, 4), 3)
    assert isinstance(model.model.layers[1].mlp, MoE) and not isinstance(model.model.layers[1].mlp, quant.QuantMoE)


def test_the_fp8_indexer_simulation_takes_ue8m0_scales():
    from glm5_ref.dsa import DSAAttention, fp8_simulate, fp8_topk_agreement

    x = torch.randn(3, 256) * torch.logspace(-2, 2, 256)
    for fmt in ("amax", "ue8m0"):
        y = fp8_simulate(x, 128, scale_format=fmt)
        assert torch.isfinite(y).all() and _rel(y, x) < 0.05
    blocks = x.unflatten(-1, (2, 128))
    s = blocks.abs().amax(-1) / 448
    ue8m0 = torch.exp2(torch.ceil(torch.log2(s)))
    assert bool((ue8m0 >= s).all()) and bool((ue8m0 < 2 * s).all())  # rounded up, by less than a factor 2
    want = ((blocks / ue8m0[..., None]).to(torch.float8_e4m3fn).float() * ue8m0[..., None]).flatten(-2)
    assert torch.equal(fp8_simulate(x, 128, scale_format="ue8m0"), want)
    with pytest.raises(ValueError, match="scale_format"):
        fp8_simulate(x, scale_format="e8m0")
    torch.manual_seed(0)
    attn = DSAAttention(dataclasses.replace(CONFIG, index_head_dim=128, index_topk=8))
    h = torch.randn(1, 40, CONFIG.hidden_size)
    for fmt in ("amax", "ue8m0"):
        assert 0.8 < fp8_topk_agreement(attn.indexer, h, attn.q_latent(h), 8, scale_format=fmt) <= 1.0
