"""GLM5Config: exact published parameter counts, HF config.json in/out, validation errors."""

import dataclasses
import json

import pytest
from hypothesis import given

from glm5_ref.config import GLM5Config
from tests.strategies import small_configs

# What the released zai-org/GLM-5 config.json says (its informational keys included).
RELEASED_CONFIG = {
    "architectures": ["GlmMoeDsaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "dtype": "bfloat16", "eos_token_id": [154820, 154827, 154829], "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "head_dim": 64, "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32,
    "index_topk": 2048, "indexer_rope_interleave": True, "initializer_range": 0.02, "intermediate_size": 12288,
    "kv_lora_rank": 512, "max_position_embeddings": 202752, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "model_type": "glm_moe_dsa", "n_group": 1, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8, "num_hidden_layers": 78,
    "num_key_value_heads": 64, "num_nextn_predict_layers": 1, "pad_token_id": 154820, "pretraining_tp": 1,
    "q_lora_rank": 2048, "qk_head_dim": 256, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05, "rope_interleave": True, "rope_scaling": None, "rope_theta": 1000000,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "noaux_tc", "transformers_version": "5.0.2.dev0", "use_cache": True, "v_head_dim": 256,
    "vocab_size": 154880,
}


def test_glm5_total_parameters_are_the_published_744b():
    assert GLM5Config.glm5().num_params() == 743_911_199_232


def test_glm5_active_parameters_are_the_published_40b():
    assert GLM5Config.glm5().num_params(active=True) == 40_833_126_912


def test_glm5_with_mtp_layer():
    c = GLM5Config.glm5()
    # one MTP layer = a full MoE decoder block + enorm, hnorm, eh_proj (2d -> d), shared_head.norm
    assert c.num_params(include_mtp=True) == 753_864_119_552
    assert c.num_params(include_mtp=True) - c.num_params() == 9_952_920_320


def test_breakdown_components_by_hand():
    c = GLM5Config.glm5()
    b = c.param_breakdown()
    assert b["routed_experts"] == 75 * 256 * 3 * 6144 * 2048  # 725B: the bulk of the model
    assert b["embedding"] == b["lm_head"] == 154880 * 6144
    assert b["dense_ffn"] == 3 * 3 * 6144 * 12288
    # per layer MLA: q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o
    mla = 6144 * 2048 + 2048 + 2048 * 64 * 256 + 6144 * 576 + 512 + 512 * 64 * 448 + 64 * 256 * 6144
    assert b["attention"] == 78 * mla
    assert b["indexer"] == 78 * (2048 * 32 * 128 + 6144 * 128 + 256 + 6144 * 32)
    active = c.param_breakdown(active=True)
    assert active["embedding"] == 0 and active["routed_experts"] == 75 * 8 * 3 * 6144 * 2048


def test_kv_cache_per_token():
    c = GLM5Config.glm5()
    assert c.kv_cache_values_per_token(include_indexer=False) == 576
    assert c.kv_cache_values_per_token() == 704
    assert c.kv_cache_bytes_per_token() == 78 * 704 * 2
    assert c.softmax_scale == 1 / 16 and c.qk_head_dim == 256


def test_scaled_down_presets_are_in_their_intended_range():
    assert 10e6 <= GLM5Config.classroom().num_params() <= 30e6
    assert GLM5Config.tiny().num_params() < 100_000


@pytest.mark.parametrize("name", ["glm5", "classroom", "tiny"])
def test_to_hf_from_hf_round_trip(name):
    c = GLM5Config.preset(name)
    assert GLM5Config.from_hf(c.to_hf()) == c
    assert GLM5Config.from_hf(json.loads(json.dumps(c.to_hf()))) == c


@given(small_configs())
def test_round_trip_random_configs(c):
    assert GLM5Config.from_hf(c.to_hf()) == c


def test_released_config_json_reads_as_glm5(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    assert GLM5Config.from_hf(tmp_path) == GLM5Config.glm5()
    assert GLM5Config.from_hf(tmp_path / "config.json") == GLM5Config.glm5()


def test_rope_parameters_form_of_transformers_5():
    d = dict(RELEASED_CONFIG)
    d.pop("rope_theta"), d.pop("rope_scaling")
    d["rope_parameters"] = {"rope_theta": 8e6, "rope_type": "default"}
    assert GLM5Config.from_hf(d).rope_theta == 8e6


def test_transformers_reads_our_config_and_we_read_its_output():
    transformers = pytest.importorskip("transformers")
    ours = GLM5Config.classroom()
    hf = transformers.GlmMoeDsaConfig(**{k: v for k, v in ours.to_hf().items() if k not in ("architectures", "model_type")})
    for key in ("hidden_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                "n_routed_experts", "num_experts_per_tok", "index_topk", "index_head_dim", "first_k_dense_replace"):
        assert getattr(hf, key) == getattr(ours, key), key
    assert hf.rope_parameters["rope_theta"] == ours.rope_theta
    assert hf.qk_head_dim == ours.qk_head_dim
    assert GLM5Config.from_hf(hf.to_dict(), strict=False) == ours


def test_save_is_atomic_and_readable(tmp_path):
    c = GLM5Config.tiny()
    c.save(tmp_path)
    assert GLM5Config.from_hf(tmp_path) == c
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("field, value, expected", [
    ("num_experts_per_tok", 300, "num_experts_per_tok"),
    ("qk_rope_head_dim", 63, "even"),
    ("index_topk", 0, "index_topk"),
    ("hidden_size", -4, "positive integer"),
    ("hidden_size", 12.5, "positive integer"),
    ("n_group", 3, "divisible by n_group"),
    ("topk_group", 2, "topk_group"),
    ("first_k_dense_replace", 79, "first_k_dense_replace"),
    ("rms_norm_eps", 0.0, "rms_norm_eps"),
    ("hidden_act", "gelu", "silu"),
    ("tie_word_embeddings", True, "tie_word_embeddings"),
    ("index_head_dim", 32, "index_head_dim"),
    ("num_nextn_predict_layers", 2, "num_nextn_predict_layers"),
])
def test_validation_names_the_field(field, value, expected):
    with pytest.raises(ValueError, match=expected) as info:
        dataclasses.replace(GLM5Config.glm5(), **{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_experts_in_kept_groups():
    with pytest.raises(ValueError, match="kept groups"):
        dataclasses.replace(GLM5Config.glm5(), n_group=8, topk_group=1, num_experts_per_tok=40)


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}}, "rope_parameters"),
    ({"indexer_types": ["full", "shared"] * 39}, "GLM-5.2"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantis"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}, "disagrees"),
    ({"mlp_layer_types": ["sparse"] * 78}, "mlp_layer_types"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"num_hidden_layers": "78"}, "num_hidden_layers"),
    ({"some_new_architecture_switch": 1}, "some_new_architecture_switch"),
])
def test_unsupported_config_json_is_a_clear_error(change, match):
    d = {**RELEASED_CONFIG, **change}
    if "mlp_layer_types" in change or "num_hidden_layers" in change:
        d.pop("mlp_layer_types", None) if "num_hidden_layers" in change else None
    with pytest.raises(ValueError, match=match):
        GLM5Config.from_hf(d)


def test_unknown_key_only_warns_when_not_strict():
    with pytest.warns(UserWarning, match="new_key"):
        GLM5Config.from_hf({**RELEASED_CONFIG, "new_key": 1}, strict=False)


def test_missing_or_malformed_config_json(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        GLM5Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GLM5Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        GLM5Config.from_hf(tmp_path)


def test_unknown_preset_name():
    with pytest.raises(ValueError, match="config name 'huge'"):
        GLM5Config.preset("huge")


# zai-org/GLM-5's config.json as released (every field confirmed against copies of the file: the msModelSlim W8A8
# recipe quotes it whole, and GLM-5.1's config.json has the same keys): rope_parameters, no rope_theta/rope_scaling.
RELEASED_GLM5_CONFIG_JSON = {
    "architectures": ["GlmMoeDsaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "dtype": "bfloat16",
    "eos_token_id": [154820, 154827, 154829], "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "head_dim": 64, "hidden_size": 6144, "index_head_dim": 128, "index_n_heads": 32, "index_topk": 2048,
    "indexer_rope_interleave": True, "initializer_range": 0.02, "intermediate_size": 12288, "kv_lora_rank": 512,
    "max_position_embeddings": 202752, "moe_intermediate_size": 2048, "moe_layer_freq": 1, "model_type": "glm_moe_dsa",
    "n_group": 1, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64,
    "num_experts_per_tok": 8, "num_hidden_layers": 78, "num_key_value_heads": 64, "num_nextn_predict_layers": 1,
    "pad_token_id": 154820, "pretraining_tp": 1, "q_lora_rank": 2048, "qk_head_dim": 256, "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_interleave": True,
    "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"}, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
    "transformers_version": "5.0.2.dev0", "use_cache": True, "v_head_dim": 256, "vocab_size": 154880,
}


def test_to_hf_of_glm5_is_the_released_config_json_key_for_key():
    from glm5_ref.config import PROJECT_KEYS

    ours = json.loads(json.dumps(GLM5Config.glm5().to_hf()))
    documented_additions, documented_omissions = set(PROJECT_KEYS), {"transformers_version"}
    assert set(ours) - documented_additions == set(RELEASED_GLM5_CONFIG_JSON) - documented_omissions
    for key in set(ours) - documented_additions:
        assert ours[key] == RELEASED_GLM5_CONFIG_JSON[key], key
    assert "rope_theta" not in ours and "rope_scaling" not in ours
    assert GLM5Config.from_hf(RELEASED_GLM5_CONFIG_JSON) == GLM5Config.glm5()
    assert GLM5Config.glm5().pad_token_id == 154820 and GLM5Config.glm5().eos_token_id == (154820, 154827, 154829)


def test_the_fp8_release_config_reads_and_other_quantizations_do_not():
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic",
           "modules_to_not_convert": ["lm_head"]}
    assert GLM5Config.from_hf({**RELEASED_GLM5_CONFIG_JSON, "quantization_config": fp8}) == GLM5Config.glm5()
    for bad in ({**fp8, "weight_block_size": [128]}, {**fp8, "weight_block_size": [0, 128]}, {**fp8, "fmt": "e5m2"},
                {**fp8, "activation_scheme": "static"}, {"quant_method": "compressed-tensors"}):
        with pytest.raises(ValueError, match="quantization_config"):
            GLM5Config.from_hf({**RELEASED_GLM5_CONFIG_JSON, "quantization_config": bad})


@pytest.mark.parametrize("field, value", [("pad_token_id", 154880), ("pad_token_id", -1), ("eos_token_id", (1, 10**6)),
                                          ("pad_token_id", True)])
def test_token_ids_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(GLM5Config.glm5(), **{field: value})
