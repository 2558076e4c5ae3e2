"""The assembled model: transformers' GlmMoeDsaForCausalLM as an outside oracle, checkpoints in the released
layout (round trip, sharding, errors), cached decoding, generation, meta-device parameter count, training."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.hf_io import to_transformers_layout
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.sampling import nucleus_probs, sample_token
from tests.strategies import seeds, small_configs

# transformers builds q_a_layernorm / kv_a_layernorm with eps 1e-6 whatever config.rms_norm_eps says (glm5_ref
# uses config.rms_norm_eps everywhere, see mla.py); an oracle config with eps 1e-6 makes the two agree exactly.
ORACLE = dataclasses.replace(GLM5Config.tiny(), rms_norm_eps=1e-6, index_n_heads=8, index_head_dim=8,
                             index_topk=6, n_routed_experts=8, num_experts_per_tok=3, vocab_size=97)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_model(config: GLM5Config, seed: int = 0) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(config)
    with torch.no_grad():  # non-trivial norms and router bias, so a missing one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("k_norm.bias"):
                p.uniform_(-0.3, 0.3)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    return model


def to_transformers(model: GLM5ForCausalLM):
    """The same weights in transformers' GlmMoeDsaForCausalLM (experts fused: gate_up (E, 2I, d), down (E, d, I))."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_config = transformers.GlmMoeDsaConfig(**{k: v for k, v in c.to_hf().items()
                                                 if k not in ("architectures", "model_type")})
    hf_config._attn_implementation = "eager"
    hf_config._experts_implementation = "eager"  # its per-expert loop: no alignment rules on odd widths
    hf = transformers.GlmMoeDsaForCausalLM(hf_config).eval()
    state = to_transformers_layout({k: v.detach() for k, v in model.hf_state_dict().items()}, c.num_hidden_layers)
    # transformers keeps a zero-width shared expert when n_shared_experts = 0; glm5_ref has none
    state.update({k: v for k, v in hf.state_dict().items() if k not in state and v.numel() == 0})
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.mark.parametrize("T", [5, 23], ids=["T<=topk", "T>topk"])
@pytest.mark.parametrize("variant", ["tiny", "groups", "no_shared"])
def test_logits_match_transformers(T, variant):
    config = {"tiny": ORACLE,
              "groups": dataclasses.replace(ORACLE, n_group=4, topk_group=2, num_experts_per_tok=3),
              "no_shared": dataclasses.replace(ORACLE, n_shared_experts=0, first_k_dense_replace=0)}[variant]
    model = make_model(config, seed=T).eval()
    hf = to_transformers(model)
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert T <= config.index_topk or T > config.index_topk  # both regimes are parametrized
    assert rel(ours, theirs) < 1e-4


@settings(max_examples=6)
@given(config=small_configs(index_n_heads=8, rms_norm_eps=1e-6), seed=seeds, T=st.sampled_from([3, 12]))
def test_random_configs_match_transformers(config, seed, T):
    model = make_model(config, seed).eval()
    hf = to_transformers(model)
    ids = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert rel(model(ids).logits, hf(ids).logits) < 1e-4


def count_params(model: GLM5ForCausalLM) -> tuple[int, int]:
    """(parameters without the MTP layer, all parameters)."""
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    return main, sum(p.numel() for p in model.parameters())


def test_meta_device_glm5_has_exactly_the_published_parameter_count():
    with torch.device("meta"):
        model = GLM5ForCausalLM(GLM5Config.glm5())
    assert count_params(model) == (GLM5Config.glm5().num_params(), GLM5Config.glm5().num_params(include_mtp=True))
    assert count_params(model)[0] == 743_911_199_232
    # the router bias is a buffer: 75 MoE layers + the MTP layer, x 256 experts
    assert sum(b.numel() for b in model.buffers()) == 76 * 256


@pytest.mark.parametrize("name", ["tiny", "classroom"])
def test_parameter_count_equals_the_config_arithmetic(name):
    config = GLM5Config.preset(name)
    with torch.device("meta"):
        model = GLM5ForCausalLM(config)
    assert count_params(model) == (config.num_params(), config.num_params(include_mtp=True))
    with torch.device("meta"):
        no_mtp = GLM5ForCausalLM(dataclasses.replace(config, num_nextn_predict_layers=0))
    assert count_params(no_mtp) == (config.num_params(), config.num_params())


@given(seed=seeds, prefill=st.sampled_from([1, 4, 9]), steps=st.sampled_from([1, 5]))
@settings(max_examples=8)
def test_cached_decoding_equals_the_full_forward(seed, prefill, steps):
    model = make_model(ORACLE, seed).double()
    T = prefill + steps
    ids = torch.randint(0, ORACLE.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, T)
        parts = [model(ids[:, :prefill], cache=cache).logits]
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(prefill, T)]
    assert rel(torch.cat(parts, 1), full) < 1e-6


def test_cached_generation_equals_uncached_and_a_seed_fixes_sampling():
    model = make_model(ORACLE, 1)
    prompt = torch.randint(0, ORACLE.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))
    greedy = model.generate(prompt, 12)
    assert torch.equal(greedy, model.generate(prompt, 12, use_cache=False))
    assert greedy.shape == (2, 16) and torch.equal(greedy[:, :4], prompt)
    a = model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=7)
    b = model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=7, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, model.generate(prompt, 12, temperature=1.0, top_p=0.9, seed=7))


def test_generate_stops_and_reports_logprobs():
    model = make_model(ORACLE, 2)
    prompt = torch.randint(0, ORACLE.vocab_size, (1, 3), generator=torch.Generator().manual_seed(2))
    ids, logprobs = model.generate(prompt, 8, return_logprobs=True)
    assert logprobs.shape == (1, 8) and bool((logprobs <= 0).all())
    first = int(ids[0, 3])
    stopped = model.generate(prompt, 8, stop_tokens=[first])
    assert stopped.shape == (1, 11) and bool((stopped[0, 3:] == first).all())
    # greedy log-probabilities are those of the full forward
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, 2:-1], -1)
    torch.testing.assert_close(logprobs[0], logp.gather(-1, ids[0, 3:, None])[:, 0], rtol=1e-4, atol=1e-4)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 1.0), torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    token, logp = sample_token(logits, 0.0, 1.0)
    assert int(token) == 0 and abs(float(logp) - float(torch.log(torch.tensor(0.5)))) < 1e-6


def test_save_pretrained_from_pretrained_round_trip_is_bit_exact(tmp_path):
    model = make_model(ORACLE, 3)
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=20_000)  # several shards
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.hf_state_dict())
    L = ORACLE.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in index["weight_map"]  # the MTP layer, named as released
    assert f"model.layers.{L}.self_attn.kv_b_proj.weight" in index["weight_map"]
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    ids = torch.randint(0, ORACLE.vocab_size, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_mtp_layer_loads_from_the_checkpoint_layout_and_shared_copies_are_dropped():
    model = make_model(ORACLE, 4)
    other = make_model(ORACLE, 5)
    state = dict(other.hf_state_dict())
    L = ORACLE.num_hidden_layers
    state[f"model.layers.{L}.embed_tokens.weight"] = other.model.embed_tokens.weight  # copies some checkpoints keep
    state[f"model.layers.{L}.shared_head.head.weight"] = other.lm_head.weight
    report = model.load_hf_state_dict(state)
    assert report["dropped_shared_copies"] == [f"model.layers.{L}.embed_tokens.weight",
                                               f"model.layers.{L}.shared_head.head.weight"]
    assert torch.equal(model.mtp.eh_proj.weight, other.mtp.eh_proj.weight)
    assert torch.equal(model.mtp.block.self_attn.q_b_proj.weight, other.mtp.block.self_attn.q_b_proj.weight)
    assert model.mtp.our_name("self_attn.indexer.wk.weight") == "block.self_attn.indexer.wk.weight"


def test_checkpoint_errors_list_the_problems(tmp_path):
    model = make_model(ORACLE, 5)
    state = dict(model.state_dict())
    state.pop("model.norm.weight")
    state["model.layers.0.self_attn.surprise.weight"] = torch.zeros(3)
    state["lm_head.weight"] = torch.zeros(5, 5)
    before = model.lm_head.weight.clone()
    with pytest.raises(ValueError) as info:
        model.load_hf_state_dict(state)
    msg = str(info.value)
    assert "model.norm.weight" in msg and "surprise" in msg and "lm_head.weight" in msg
    assert torch.equal(model.lm_head.weight, before)  # nothing half-loaded
    # a checkpoint whose config does not match its tensors
    model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["hidden_size"] = 48
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="not a checkpoint|not found"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "nothing")


def test_bad_inputs_are_clear_errors():
    model = make_model(ORACLE, 6)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, ORACLE.vocab_size]]))
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, ORACLE.max_position_embeddings + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))
    cache = model.new_cache(1, 4)
    model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), -1)


def test_loss_decreases_when_overfitting_a_tiny_batch_and_seed_determinism():
    def run():
        model = make_model(GLM5Config.tiny(), 7)
        ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(40):
            out = model(ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(float(out.lm_loss))
        return losses

    first = run()
    assert first[-1] < 0.5 * first[0]
    assert first == run()  # same seed, same losses, bit for bit


def test_indexer_loss_and_tokens_per_expert_are_reported():
    model = make_model(ORACLE, 8)
    ids = torch.randint(0, ORACLE.vocab_size, (2, 20))
    out = model(ids, labels=ids, indexer_loss=True)
    assert out.indexer_loss is not None and float(out.indexer_loss) >= 0
    moe = model.moe_layers()
    assert len(out.tokens_per_expert) == len(moe) == sum(l.is_moe for l in model.model.layers) + 1  # + MTP block
    K, D = ORACLE.num_experts_per_tok, ORACLE.num_mtp_depths
    assert all(int(t.sum()) == 2 * 20 * K for t in out.tokens_per_expert[:-1])
    assert int(out.tokens_per_expert[-1].sum()) == 2 * K * sum(20 - k for k in range(1, D + 1))  # MTP depths
    torch.testing.assert_close(out.loss, out.lm_loss + out.balance_loss + out.mtp_loss + out.indexer_loss)
    before = [m.gate.e_score_correction_bias.clone() for m in moe]
    model.update_router_biases(out.tokens_per_expert)
    assert all(not torch.equal(b, m.gate.e_score_correction_bias) for b, m in zip(before, moe))


# ---- fidelity to the release (issue 22) ---------------------------------------------------------------------------
def test_the_embedding_pads_with_pad_token_id_as_transformers_does(tmp_path):
    from glm5_ref.model import MTP_POSITION0  # noqa: F401  (the documented MTP choice, tested below)

    with torch.device("meta"):
        assert GLM5ForCausalLM(GLM5Config.glm5()).model.embed_tokens.padding_idx == 154820
    config = dataclasses.replace(GLM5Config.tiny(), pad_token_id=3)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(config)
    emb = model.model.embed_tokens
    assert emb.padding_idx == 3 and not emb.weight[3].any()  # starts at zero
    ids = torch.tensor([[3, 5, 3, 7]])
    model(ids, labels=ids).loss.backward()
    assert not emb.weight.grad[3].any() and emb.weight.grad[5].any()  # no gradient for the pad row
    with torch.no_grad():
        emb.weight[3] = 1.0  # a checkpoint's pad row is whatever it stored: lookups read it
    model.save_pretrained(tmp_path)
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.embed_tokens.padding_idx == 3
    assert torch.equal(loaded.model.embed_tokens(torch.tensor([3])), torch.ones(1, config.hidden_size))


def test_mtp_reads_the_normed_hidden_state_and_keeps_the_embedding_at_position_0():
    from glm5_ref.model import MTP_POSITION0
    from glm5_ref.mtp import MTP_HIDDEN

    assert MTP_HIDDEN == "normed" and MTP_POSITION0 == "embedding"
    torch.manual_seed(0)
    model = GLM5ForCausalLM(GLM5Config.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        h0 = model.model.norm(model(ids).hidden_states)  # what speculative decoding and mtp_losses pass
        embeds = model.model.embed_tokens(ids[:, 1:])  # the token one step ahead of each position
        ours = model.mtp.step(h0[:, :-1], embeds, torch.arange(7)).hidden
        vllm = embeds.clone()
        vllm[:, 0] = 0  # vLLM: inputs_embeds[positions == 0] = 0
        zeroed = model.mtp.step(h0[:, :-1], vllm, torch.arange(7)).hidden
    assert not torch.allclose(ours[:, 0], zeroed[:, 0])  # position 0 sees token 1's embedding here, not in vLLM


def test_a_cached_forward_decodes_without_routing_statistics():
    """With a cache the MoE blocks skip their loads and balance loss (decoding needs neither); the logits are
    those of the uncached forward, which still reports both."""
    config = GLM5Config.tiny()
    torch.manual_seed(0)
    model = GLM5ForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 16)
        cached = model(ids, cache=cache)
    assert full.tokens_per_expert and float(full.balance_loss) > 0
    assert cached.tokens_per_expert == [] and float(cached.balance_loss) == 0
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5)
