"""streaming.py: a model larger than a memory cap runs layer by layer and equals the in-memory model."""

import dataclasses

import pytest
import torch

from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.streaming import LayerwiseGLM5, bytes_per_token, write_synthetic_checkpoint

CONFIG = dataclasses.replace(GLM5Config.tiny(), num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=2,
                             moe_intermediate_size=32, index_topk=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    torch.manual_seed(0)
    model = GLM5ForCausalLM(CONFIG)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    model.save_pretrained(root / "bf16", max_shard_bytes=40_000)
    model.save_pretrained(root / "fp8", fp8=True, block=(8, 8))
    return root


def _reference(directory, ids, cache=False):
    ref = GLM5ForCausalLM.from_pretrained(directory).eval()
    ref.set_execution(moe_impl="loop")
    with torch.no_grad():
        if not cache:
            return ref(ids).logits, ref
        c = ref.new_cache(ids.shape[0], ids.shape[1])
        return torch.cat([ref(ids[:, :10], cache=c).logits, ref(ids[:, 10:], cache=c).logits], 1), ref


@pytest.mark.parametrize("stored", ["bf16", "fp8"])
def test_layerwise_forward_under_a_memory_cap_equals_the_in_memory_model(checkpoint, stored):
    ids = torch.randint(0, CONFIG.vocab_size, (2, 21))  # T > index_topk: DSA selects
    ref, model = _reference(checkpoint / stored, ids)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    cap = total // 3  # the checkpoint is three times the memory the weights may take
    stream = LayerwiseGLM5(checkpoint / stored, memory_cap_bytes=cap)
    assert torch.equal(stream(ids), ref)
    assert stream.stats["peak_held_bytes"] <= cap
    # only the experts the batch selected were read, layer by layer
    h = model.model.embed_tokens(ids)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            out = layer(h, None, None, model.execution)
            want = sorted(set(out.moe_aux.topk_idx.flatten().tolist())) if out.moe_aux is not None else []
            assert stream.stats["experts_read"][i] == want
            h = out.hidden


def test_layerwise_decoding_with_a_cache_and_fp8_kept_in_memory(checkpoint):
    ids = torch.randint(0, CONFIG.vocab_size, (1, 16))
    ref, model = _reference(checkpoint / "fp8", ids, cache=True)
    kept = LayerwiseGLM5(checkpoint / "fp8", keep_in_memory=True)
    assert kept.reader.raw["model.layers.0.self_attn.q_b_proj.weight"].dtype == torch.float8_e4m3fn
    cache = kept.new_cache(1, 16)
    got = torch.cat([kept(ids[:, :10], cache=cache), kept(ids[:, 10:], cache=cache)], 1)
    assert torch.equal(got, ref)
    with torch.no_grad():
        model_ids = model.generate(ids[:, :5], 6)
    assert torch.equal(kept.generate(ids[:, :5], 6), model_ids)


def test_a_memory_cap_too_small_for_one_layer_names_the_setting(checkpoint):
    with pytest.raises(ValueError, match="memory_cap_bytes = 1000: too small for one layer"):
        LayerwiseGLM5(checkpoint / "bf16", memory_cap_bytes=1000)


def test_synthetic_checkpoints_stream_and_the_glm5_arithmetic(tmp_path):
    total = write_synthetic_checkpoint(tmp_path / "syn", CONFIG, max_shard_bytes=50_000)
    assert total > 50_000 and len(list((tmp_path / "syn").glob("*.safetensors"))) > 1
    model = GLM5ForCausalLM.from_pretrained(tmp_path / "syn").eval()
    model.set_execution(moe_impl="loop")
    ids = torch.randint(0, CONFIG.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(LayerwiseGLM5(tmp_path / "syn")(ids), model(ids).logits)
    glm5 = GLM5Config.glm5()
    assert bytes_per_token(glm5) == 2 * (glm5.num_params(active=True) - glm5.vocab_size * glm5.hidden_size)
    assert 79e9 < bytes_per_token(glm5) < 80.5e9  # ~80 GB of bf16 weights per decoded token
