"""GLM5Config: the one configuration every glm5_ref module reads.

What it is
    A dataclass holding the architecture of GLM-5 (arXiv 2602.15763, Table 10) under the key names of the released
    Hugging Face checkpoint (``zai-org/GLM-5/config.json``, ``model_type = "glm_moe_dsa"``), plus a few training
    knobs the paper describes but the checkpoint does not store (MTP depth and weight, balancing rates). Presets:
    ``glm5()`` (the published model), ``classroom()`` (~13M parameters, 2 CPU cores) and ``tiny()`` (tests).

Exact parameter counting (``num_params`` / ``param_breakdown``) is done from the arithmetic of the config,
without building a model:

    per layer   attention  q_a (d*r_q) + q_a_norm (r_q) + q_b (r_q * H*(d_n+d_r))
                           + kv_a (d*(r_kv+d_r)) + kv_a_norm (r_kv) + kv_b (r_kv * H*(d_n+d_v)) + o (H*d_v*d)
                indexer    wq_b (r_q * H_I*d_I) + wk (d*d_I) + k_norm (2*d_I, LayerNorm with bias)
                           + weights_proj (d*H_I)
                norms      2*d (input_layernorm, post_attention_layernorm)
                FFN        dense: 3*d*d_ff;   MoE: router (E*d) + E * 3*d*d_e + shared 3*d*(S*d_e)
    model       embedding (V*d) + final norm (d) + LM head (V*d, untied)

For ``glm5()`` this gives exactly 743,911,199,232 parameters (the published "744B"), and 40,833,126,912
active per token (the published "40B"; 8 of 256 routed experts, the embedding matrix excluded because a
token reads one row of it, the LM head included). The ``e_score_correction_bias`` of the router is a buffer,
not a parameter, and is not counted (counting it would add 75 * 256 = 19,200). With ``include_mtp=True``
the one MTP layer (``model.layers.78``: enorm, hnorm, eh_proj 2d->d, a full MoE decoder block,
shared_head.norm; it shares the embedding and LM head with the main model) adds 9,952,920,320, giving
753,864,119,552 ("753.9B"). The paper's Table 10 caption says "744B" includes MTP; the arithmetic says it
does not (reference/glm5_spec.md section 10).

Choices and contradictions
    * 78 layers (Table 10 and config.json), although the paper's prose says 80.
    * ``rope_interleave`` / ``indexer_rope_interleave`` are released keys transformers ignores: its glm_moe_dsa
      code pairs RoPE dims interleaved in MLA and the indexer only since its June 2026 fixes (PRs #46372, #46842;
      earlier 5.x rotated the indexer half-split). Both flags stay, for DeepSeek-V3.2's half-split indexer.
    * RoPE: the release stores only ``rope_parameters`` {"rope_theta": 1000000, "rope_type": "default"};
      ``from_hf`` also reads the older rope_theta / rope_scaling keys, ``to_hf`` writes rope_parameters alone.
    * ``to_hf(glm5())`` equals the released config.json key for key and value for value (tested), but adds
      PROJECT_KEYS and leaves out ``transformers_version`` (it names the program that wrote the file).
    * ``pad_token_id`` (release: 154820, also the first stop token) is the embedding's padding_idx, as in
      transformers: that row starts at zero and gets no gradient; lookups read the stored row. The classroom
      presets have none (their batches are never padded).
    * ``quantization_config``: only the block-wise FP8 layout (DeepSeek-V3, GLM-5-FP8; ``fp8_block_size``).

Not handled (a clear ValueError instead): RoPE scaling other than "default" (YaRN, linear, ...), indexer layers
marked "shared" (IndexShare, GLM-5.2 only), quantised checkpoints other than block-wise FP8, tied embeddings,
attention biases, activations other than SiLU, routing other than sigmoid + noaux_tc, MoE on every k-th layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

# Keys of a released (or transformers-written) config.json that describe the file, the tokenizer or inference
# settings and do not change the computation: accepted, not stored.
INFORMATIONAL_HF_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id", "use_cache",
    "attention_dropout", "pretraining_tp", "ep_size", "output_router_logits", "initializer_range", "layer_types",
    "_name_or_path", "auto_map", "output_hidden_states", "output_attentions", "return_dict", "num_key_value_heads",
    "head_dim", "qk_head_dim", "moe_layer_freq", "scoring_func", "topk_method", "mlp_layer_types", "indexer_types",
    "rope_scaling", "rope_parameters", "rope_theta", "mlp_bias", "moe_router_dtype", "router_aux_loss_coef",
    "seq_aux", "aux_loss_alpha", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "problem_type", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id", "quantization_config",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "add_cross_attention",
})
RELEASED_CONSTANTS = {"attention_dropout": 0.0, "ep_size": 1, "pretraining_tp": 1, "use_cache": True}  # as released
# The block-wise FP8 layout (DeepSeek-V3, GLM-5-FP8): e4m3 weights, one fp32 weight_scale_inv per weight block.
FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
# Keys this project adds to config.json (the paper describes them, the checkpoint does not store them).
PROJECT_KEYS = ("num_mtp_depths", "mtp_loss_weight", "aux_loss_alpha_seq", "bias_update_speed")


@dataclass
class GLM5Config:
    # --- sizes of the trunk -----------------------------------------------------------------------------
    vocab_size: int = 154880                 # token ids are in [0, vocab_size); embeddings untied from the head
    hidden_size: int = 6144                  # d, the residual stream width
    num_hidden_layers: int = 78              # decoder layers (3 dense + 75 MoE); the MTP layer is extra
    max_position_embeddings: int = 202752    # longest sequence (198 * 1024, the paper's "200K")
    rms_norm_eps: float = 1e-5               # epsilon of every RMSNorm
    tie_word_embeddings: bool = False        # GLM-5 unties embedding and LM head (only False is supported)
    # --- MLA attention (section 3 of the spec) ------------------------------------------------------------
    num_attention_heads: int = 64            # H, query heads; MLA is MHA-style (num_key_value_heads == H)
    q_lora_rank: int = 2048                  # r_q, width of the compressed query latent c^Q (q_a_proj)
    kv_lora_rank: int = 512                  # r_kv, width of the compressed KV latent c^KV (kv_a_proj_with_mqa)
    qk_nope_head_dim: int = 192              # d_n, per-head query/key dims WITHOUT position (from the latents)
    qk_rope_head_dim: int = 64               # d_r, per-head query dims and the ONE shared key with RoPE
    v_head_dim: int = 256                    # d_v, per-head value dims
    attention_bias: bool = False             # no bias in any attention projection (only False is supported)
    rope_theta: float = 1_000_000.0          # RoPE base; GLM-5 uses 1e6 with no scaling ("default" type)
    rope_interleave: bool = True             # MLA RoPE pairs adjacent dims (2j, 2j+1); False = half-split
    # --- DSA lightning indexer (section 4) ---------------------------------------------------------------
    index_n_heads: int = 32                  # H_I, indexer heads
    index_head_dim: int = 128                # d_I, indexer query/key width; RoPE on its first d_r dims
    index_topk: int = 2048                   # k, keys each query attends to once the context is longer
    indexer_rope_interleave: bool = True     # GLM-5: interleaved pairs; DeepSeek-V3.2: half-split (False)
    # --- feed-forward: dense layers and MoE (section 5) ---------------------------------------------------
    intermediate_size: int = 12288           # d_ff of the dense SwiGLU FFN in the first layers
    first_k_dense_replace: int = 3           # the first k layers use the dense FFN, the rest use MoE
    moe_intermediate_size: int = 2048        # d_e, hidden width of each routed expert
    n_routed_experts: int = 256              # E, routed experts per MoE layer
    num_experts_per_tok: int = 8             # K, routed experts each token uses
    n_shared_experts: int = 1                # S, shared experts (fused into one SwiGLU of width S * d_e)
    n_group: int = 1                         # expert groups for group-limited routing (1 = plain top-k)
    topk_group: int = 1                      # groups kept per token before the top-K
    norm_topk_prob: bool = True              # normalise the K gate weights to sum to 1 (before scaling)
    routed_scaling_factor: float = 2.5       # multiplies the (normalised) gate weights
    hidden_act: str = "silu"                 # SwiGLU gate activation (only "silu" is supported)
    # --- multi-token prediction (section 6) --------------------------------------------------------------
    num_nextn_predict_layers: int = 1        # MTP modules stored in the checkpoint (at model.layers.{L})
    num_mtp_depths: int = 3                  # depths the one MTP module is unrolled over (shared weights)
    mtp_loss_weight: float = 0.3             # lambda in L = L_LM + lambda/D * sum_k L_k (GLM-4.5's value)
    # --- load balancing (section 5; GLM-4.5 values, which GLM-5 says it inherits) ---------------------------
    aux_loss_alpha_seq: float = 1e-4         # alpha of the sequence-wise balance loss
    bias_update_speed: float = 1e-3          # gamma of the aux-loss-free bias update
    # --- informational ------------------------------------------------------------------------------------
    initializer_range: float = 0.02          # std of the normal init of every matrix
    pad_token_id: int | None = None          # the embedding's padding_idx (release: 154820); None = no padding row
    eos_token_id: int | tuple[int, ...] | None = None  # stop tokens, informational (release: 154820, 154827, 154829)
    name: str = field(default="custom", compare=False)  # preset name, for printing only

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):  # config.json stores a list; a tuple keeps the config hashable
            self.eos_token_id = tuple(self.eos_token_id)
        self.validate()

    # validation
    def validate(self) -> None:
        """Raise ValueError naming the field, its value and what was expected."""

        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"GLM5Config.{name} = {getattr(self, name)!r}: expected {expected}")

        positive_ints = (
            "vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "num_attention_heads",
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
            "index_head_dim", "index_topk", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
            "num_experts_per_tok", "n_group", "topk_group", "num_mtp_depths")
        real = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        for names, ok, expected in (
                (positive_ints, lambda v: type(v) is int and v >= 1, "a positive integer"),
                (("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"),
                 lambda v: type(v) is int and v >= 0, "a non-negative integer"),
                (("rms_norm_eps", "rope_theta", "routed_scaling_factor", "initializer_range"),
                 lambda v: real(v) and v > 0, "a finite positive number"),
                (("mtp_loss_weight", "aux_loss_alpha_seq", "bias_update_speed"),
                 lambda v: real(v) and v >= 0, "a finite non-negative number")):
            for name in names:
                if not ok(getattr(self, name)):
                    raise bad(name, expected)
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "an even number (RoPE rotates pairs of dimensions)")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise bad("index_head_dim", f">= qk_rope_head_dim = {self.qk_rope_head_dim} (RoPE covers its first dims)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"<= num_hidden_layers = {self.num_hidden_layers}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"<= n_routed_experts = {self.n_routed_experts}")
        if self.n_routed_experts % self.n_group:
            raise bad("n_routed_experts", f"divisible by n_group = {self.n_group}")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"<= n_group = {self.n_group}")
        kept = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > kept:
            raise bad("num_experts_per_tok", f"<= the {kept} experts in the {self.topk_group} kept groups")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise bad("n_group", "at most n_routed_experts / 2 (a group's score is the sum of its top-2 scores)")
        if self.num_nextn_predict_layers > 1:
            raise bad("num_nextn_predict_layers", "0 or 1 (GLM-5 has one MTP module shared across depths)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "'silu' (SwiGLU)")
        if self.tie_word_embeddings is not False:
            raise bad("tie_word_embeddings", "False (GLM-5 unties embedding and LM head)")
        if self.attention_bias is not False:
            raise bad("attention_bias", "False (GLM-5's projections have no bias)")
        for name in ("rope_interleave", "indexer_rope_interleave", "norm_topk_prob"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)
        for name, values in (("pad_token_id", (self.pad_token_id,)), ("eos_token_id", eos)):
            if any(v is not None and (type(v) is not int or not 0 <= v < self.vocab_size) for v in values):
                raise bad(name, f"None or token ids in [0, vocab_size = {self.vocab_size})")

    # derived sizes
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width d_n + d_r (256 for GLM-5: "MLA-256")."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim): 1/16 for GLM-5 (no YaRN mscale: the RoPE type is "default")."""
        return self.qk_head_dim ** -0.5

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    def kv_cache_values_per_token(self, include_indexer: bool = True) -> int:
        """Cached values per token per layer: the KV latent, the shared rope key, the indexer key."""
        return self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if include_indexer else 0)

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2, include_indexer: bool = True) -> int:
        """Bytes of decode cache per token over all main layers (bf16 by default)."""
        return self.num_hidden_layers * self.kv_cache_values_per_token(include_indexer) * bytes_per_value

    # parameter counting from the arithmetic
    def param_breakdown(self, active: bool = False, include_mtp: bool = False) -> dict[str, int]:
        """Parameters by component. ``active``: what one token touches (K of E experts, no embedding)."""
        d, H = self.hidden_size, self.num_attention_heads
        attention = (d * self.q_lora_rank + self.q_lora_rank
                     + self.q_lora_rank * H * self.qk_head_dim
                     + d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                     + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
                     + H * self.v_head_dim * d)
        indexer = (self.q_lora_rank * self.index_n_heads * self.index_head_dim + d * self.index_head_dim
                   + 2 * self.index_head_dim + d * self.index_n_heads)
        layer_norms = 2 * d
        swiglu = 3 * d  # gate, up, down: 3 * d * width
        experts_used = self.num_experts_per_tok if active else self.n_routed_experts
        n_moe = self.num_moe_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        n_attn = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        parts = {
            "embedding": 0 if active else self.vocab_size * d,
            "attention": n_attn * attention,
            "indexer": n_attn * indexer,
            "norms": n_attn * layer_norms + d,  # two per block, plus the final norm
            "dense_ffn": self.first_k_dense_replace * swiglu * self.intermediate_size,
            "router": n_moe * self.n_routed_experts * d,
            "routed_experts": n_moe * experts_used * swiglu * self.moe_intermediate_size,
            "shared_experts": n_moe * swiglu * self.n_shared_experts * self.moe_intermediate_size,
            "lm_head": self.vocab_size * d,
            "mtp_extra": 0,
        }
        if include_mtp and self.num_nextn_predict_layers:
            # enorm, hnorm, eh_proj (2d -> d), shared_head.norm; embedding and head are shared
            parts["mtp_extra"] = self.num_nextn_predict_layers * (3 * d + 2 * d * d)
        return parts

    def num_params(self, active: bool = False, include_mtp: bool = False) -> int:
        """Exact parameter count (see the module docstring for the formula and the published numbers)."""
        return sum(self.param_breakdown(active=active, include_mtp=include_mtp).values())

    # presets
    @classmethod
    def glm5(cls) -> "GLM5Config":
        """The published GLM-5 (744B total, 40B active), as in zai-org/GLM-5/config.json."""
        return cls(name="glm5", pad_token_id=154820, eos_token_id=(154820, 154827, 154829))

    @classmethod
    def classroom(cls) -> "GLM5Config":
        """~13M parameters (~4M active): MLA + DSA + MoE + MTP that train on 2 CPU cores in minutes."""
        return cls(
            name="classroom", vocab_size=4112, hidden_size=256, num_hidden_layers=4, max_position_embeddings=4096,
            num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
            v_head_dim=32, rope_theta=10_000.0, index_n_heads=4, index_head_dim=32, index_topk=128,
            intermediate_size=768, first_k_dense_replace=1, moe_intermediate_size=128, n_routed_experts=32,
            num_experts_per_tok=4, n_shared_experts=1,
        )

    @classmethod
    def tiny(cls) -> "GLM5Config":
        """A few thousand parameters with every feature switched on, for tests."""
        return cls(
            name="tiny", vocab_size=256, hidden_size=32, num_hidden_layers=2, max_position_embeddings=256,
            num_attention_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, rope_theta=10_000.0, index_n_heads=2, index_head_dim=8, index_topk=4,
            intermediate_size=48, first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1,
        )

    @classmethod
    def preset(cls, name: str) -> "GLM5Config":
        if name not in ("classroom", "glm5", "tiny"):
            raise ValueError(f"config name {name!r}: expected one of ['classroom', 'glm5', 'tiny']")
        return getattr(cls, name)()

    # Hugging Face config.json in and out
    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """A config.json dict in the released checkpoint's format, key for key (the module docstring says which
        keys differ), readable by transformers' GlmMoeDsaConfig. ``dtype``: the stored weights' dtype."""
        out: dict[str, Any] = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
                               "dtype": dtype, **RELEASED_CONSTANTS}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name not in ("name", "rope_theta")})
        out["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out.update({
            "num_key_value_heads": self.num_attention_heads, "qk_head_dim": self.qk_head_dim,
            "head_dim": self.qk_rope_head_dim, "moe_layer_freq": 1, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        })
        return out

    @classmethod
    def from_hf(cls, source: dict[str, Any] | str | os.PathLike, strict: bool = True) -> "GLM5Config":
        """Read a config.json (a dict, a path to the file, or a checkpoint directory holding it). ``strict``: an
        unknown key raises ValueError (it might change the architecture); with ``strict=False`` it only warns."""
        d = _read_config_source(source)
        fields = {f.name for f in dataclasses.fields(cls)} - {"name"}
        kwargs: dict[str, Any] = {k: v for k, v in d.items() if k in fields}

        def expect(key: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"config.json key {key!r} = {d[key]!r}: expected {expected}; glm5_ref implements GLM-5")

        # RoPE: the released rope_parameters, or the older rope_theta + rope_scaling (both: they must agree).
        scaling = d.get("rope_scaling")
        if scaling is not None:
            expect("rope_scaling", isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type"))
                   == "default", "null or a 'default' type (YaRN and other scalings are not implemented)")
        params = d.get("rope_parameters")
        if params is not None:
            expect("rope_parameters", isinstance(params, dict) and params.get("rope_type", "default") == "default"
                   and "rope_theta" in params, "{'rope_theta': ..., 'rope_type': 'default'}")
            if "rope_theta" in d and float(d["rope_theta"]) != float(params["rope_theta"]):
                raise ValueError(f"config.json: rope_theta = {d['rope_theta']!r} disagrees with "
                                 f"rope_parameters['rope_theta'] = {params['rope_theta']!r}")
            kwargs["rope_theta"] = float(params["rope_theta"])
        elif "rope_theta" in d:
            kwargs["rope_theta"] = float(d["rope_theta"])
        # Keys that must hold GLM-5's value, because nothing else is implemented.
        if "indexer_types" in d:
            expect("indexer_types", d["indexer_types"] is None or all(t == "full" for t in d["indexer_types"]),
                   "every layer 'full' (IndexShare / 'shared' indexer layers are GLM-5.2 only)")
        for key, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1),
                           ("mlp_bias", False), ("moe_router_dtype", "float32")):
            if key in d:
                expect(key, d[key] == value, repr(value))
        if "quantization_config" in d:
            fp8_block_size(d["quantization_config"])  # the block-wise FP8 layout, or a ValueError
        if d.get("num_key_value_heads") is not None and "num_attention_heads" in d:
            expect("num_key_value_heads", d["num_key_value_heads"] == d["num_attention_heads"],
                   "== num_attention_heads (MLA is MHA-style)")
        if d.get("qk_head_dim") is not None and "qk_nope_head_dim" in d and "qk_rope_head_dim" in d:
            expect("qk_head_dim", d["qk_head_dim"] == d["qk_nope_head_dim"] + d["qk_rope_head_dim"],
                   "qk_nope_head_dim + qk_rope_head_dim")
        unknown = sorted(set(d) - fields - INFORMATIONAL_HF_KEYS)
        if unknown:
            message = f"config.json has keys glm5_ref does not know: {unknown}"
            if strict:
                raise ValueError(message + " (pass strict=False to ignore them)")
            warnings.warn(message, stacklevel=2)
        try:
            config = cls(**kwargs)
        except TypeError as e:  # a value of the wrong type deep in validate()
            raise ValueError(f"config.json: {e}") from None
        if "mlp_layer_types" in d and d["mlp_layer_types"] is not None:
            expected = ["sparse" if config.is_moe_layer(i) else "dense" for i in range(config.num_hidden_layers)]
            if list(d["mlp_layer_types"]) != expected:
                raise ValueError(f"config.json key 'mlp_layer_types' = {d['mlp_layer_types']!r}: expected "
                                 f"first_k_dense_replace = {config.first_k_dense_replace} dense layers, then MoE")
        return config

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json atomically (temporary file, then rename)."""
        path = os.fspath(path)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def fp8_block_size(quantization_config: Any) -> tuple[int, int]:
    """(rows, cols) of the weight block of a block-wise FP8 quantization_config (FP8_QUANTIZATION plus
    ``weight_block_size``; other keys, e.g. modules_to_not_convert, are allowed). ValueError for anything else."""
    qc = quantization_config
    block = qc.get("weight_block_size") if isinstance(qc, dict) else None
    if (not isinstance(qc, dict) or any(qc.get(k) != v for k, v in FP8_QUANTIZATION.items()) or not
            isinstance(block, (list, tuple)) or len(block) != 2 or any(type(b) is not int or b < 1 for b in block)):
        raise ValueError(f"config.json quantization_config = {qc!r}: expected the block-wise FP8 layout "
                         f"{{**{FP8_QUANTIZATION}, 'weight_block_size': [rows, cols] (positive integers)}}; other "
                         "quantised checkpoints are not supported")
    return int(block[0]), int(block[1])


def _read_config_source(source: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    if isinstance(source, dict):
        return dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"config source: expected a dict or a path, got {type(source).__name__}")
    path = os.fspath(source)
    path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise ValueError(f"config.json not found: {path}")
    try:
        with open(path) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d
