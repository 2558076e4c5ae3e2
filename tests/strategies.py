"""Hypothesis strategies shared by the test files.

Odd sizes are the point: T = 63 finds the off-by-one a power of two hides.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config

# small dimensions that are deliberately not powers of two
odd_lengths = st.sampled_from([1, 2, 3, 5, 7, 13, 31, 63])
batch_sizes = st.integers(min_value=1, max_value=3)
seeds = st.integers(min_value=0, max_value=2**31 - 1)
even_dims = st.integers(min_value=1, max_value=16).map(lambda n: 2 * n)


def randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A seeded standard-normal tensor (reproducible from a drawn seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


@st.composite
def small_configs(draw, **overrides) -> GLM5Config:
    """Random tiny GLM-5 configs with odd head counts and widths; every feature on."""
    rope = draw(st.sampled_from([2, 4, 6]))
    n_group = draw(st.sampled_from([1, 1, 2]))
    experts = n_group * draw(st.integers(min_value=2, max_value=4))
    topk_group = draw(st.integers(min_value=1, max_value=n_group))
    kept = topk_group * (experts // n_group)
    cfg = dict(
        vocab_size=draw(st.integers(min_value=11, max_value=97)),
        hidden_size=draw(st.sampled_from([12, 20, 24])),
        num_hidden_layers=draw(st.integers(min_value=1, max_value=3)),
        max_position_embeddings=128,
        num_attention_heads=draw(st.integers(min_value=1, max_value=3)),
        q_lora_rank=draw(st.sampled_from([6, 10])),
        kv_lora_rank=draw(st.sampled_from([5, 8])),
        qk_nope_head_dim=draw(st.sampled_from([3, 6])),
        qk_rope_head_dim=rope,
        v_head_dim=draw(st.sampled_from([5, 7])),
        rope_theta=10_000.0,
        index_n_heads=draw(st.integers(min_value=1, max_value=3)),
        index_head_dim=rope + draw(st.sampled_from([0, 3])),
        index_topk=draw(st.integers(min_value=1, max_value=9)),
        intermediate_size=draw(st.sampled_from([9, 16])),
        first_k_dense_replace=draw(st.integers(min_value=0, max_value=1)),
        moe_intermediate_size=draw(st.sampled_from([5, 8])),
        n_routed_experts=experts,
        num_experts_per_tok=draw(st.integers(min_value=1, max_value=min(3, kept))),
        n_shared_experts=draw(st.integers(min_value=0, max_value=1)),
        n_group=n_group,
        topk_group=topk_group,
    )
    cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])
    cfg.update(overrides)
    return GLM5Config(name="hypothesis", **cfg)


def with_changes(config: GLM5Config, **changes) -> GLM5Config:
    """dataclasses.replace, which re-runs validation."""
    return dataclasses.replace(config, **changes)
