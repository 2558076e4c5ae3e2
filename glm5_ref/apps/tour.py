"""GLM-5 at a glance: where the parameters and the cache bytes sit, computed from the config alone.

Used by notebook 00 and by `python -m glm5_ref demo` / `params`. Nothing here builds a model: every number
is arithmetic on GLM5Config (see config.py for the formulas).
"""

from __future__ import annotations

import os

from glm5_ref.config import GLM5Config

# Component names for tables and charts, in reading order.
COMPONENT_LABELS = {
    "embedding": "token embedding",
    "attention": "MLA attention",
    "indexer": "DSA lightning indexer",
    "norms": "RMSNorms",
    "dense_ffn": "dense FFN (first layers)",
    "router": "MoE routers",
    "routed_experts": "routed experts",
    "shared_experts": "shared experts",
    "lm_head": "LM head",
    "mtp": "MTP layer (extra)",
}

NOTEBOOK_MAP = [
    ("00_glm5_at_a_glance", "the config, the parameter budget, the cache budget"),
    ("01_mla", "Multi-head Latent Attention: latent KV cache, absorbed decode, why RoPE is decoupled"),
    ("02_dsa_lightning_indexer", "DeepSeek Sparse Attention: the lightning indexer and top-k attention"),
    ("03_moe_router", "sigmoid router, bias-corrected top-k, aux-loss-free balancing"),
    ("04_assembling_glm5", "the full model, checkpoints in the released layout, checked against transformers"),
    ("05_mtp_speculative_decoding", "multi-token prediction shared across depths, speculative decoding"),
    ("06_train_classroom_glm5", "training a tiny GLM-5 on a laptop CPU"),
    ("07_muon_split", "Muon and Muon Split, the MLA vs GQA experiment"),
    ("08_tito_agentic_rl", "token-in-token-out trajectories, double-sided IS, asynchronous RL"),
    ("09_triton_kernels", "Triton kernels next to their PyTorch twins"),
    ("10_scaling_out", "expert parallelism, data parallelism, distributed Muon, DP-aware routing"),
    ("11_long_context_dsa", "reproducing the DSA long-context result at classroom scale"),
]


def component_counts(config: GLM5Config) -> tuple[dict[str, int], dict[str, int]]:
    """(total, active) parameters by component; the MTP layer is one separate entry in both."""
    total = config.param_breakdown()
    active = config.param_breakdown(active=True)
    total["mtp"] = config.num_params(include_mtp=True) - config.num_params()
    active["mtp"] = config.num_params(active=True, include_mtp=True) - config.num_params(active=True)
    for d in (total, active):
        d.pop("mtp_extra")
    return total, active


def params_table(config: GLM5Config) -> str:
    """A text table of total and active parameters by component."""
    total, active = component_counts(config)
    n, n_active = config.num_params(), config.num_params(active=True)
    lines = [f"GLM5Config.{config.name}: {config.num_hidden_layers} layers "
             f"({config.first_k_dense_replace} dense + {config.num_moe_layers} MoE), d={config.hidden_size}, "
             f"{config.n_routed_experts} experts (top-{config.num_experts_per_tok}), vocab {config.vocab_size}",
             f"{'component':28s} {'total':>20s} {'share':>7s} {'active':>18s}"]
    for key, label in COMPONENT_LABELS.items():
        lines.append(f"{label:28s} {total[key]:>20,d} {100 * total[key] / n:>6.2f}% {active[key]:>18,d}")
    lines.append(f"{'total (without MTP)':28s} {n:>20,d} {'':>7s} {n_active:>18,d}")
    lines.append(f"{'total with the MTP layer':28s} {config.num_params(include_mtp=True):>20,d}")
    return "\n".join(lines)


def cache_table(config: GLM5Config, contexts: tuple[int, ...] = (4096, 32768, 131072, 202752)) -> str:
    """Decode-cache bytes (bf16) per token and per sequence (GB = 10^9 bytes), for MLA+indexer and plain MHA."""
    per_tok = config.kv_cache_bytes_per_token()
    per_tok_mla = config.kv_cache_bytes_per_token(include_indexer=False)
    mha = config.num_hidden_layers * 2 * config.num_attention_heads * config.qk_head_dim * 2  # K and V, bf16
    lines = [f"per token: MLA latent + rope key {per_tok_mla:,d} B, + indexer key {per_tok:,d} B; "
             f"MHA with the same heads would cache {mha:,d} B ({mha / per_tok:.0f}x more)"]
    for t in contexts:
        lines.append(f"  {t:>7,d} tokens: {per_tok * t / 1e9:8.2f} GB per sequence (MHA: {mha * t / 1e9:8.1f} GB)")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def plot_param_breakdown(config: GLM5Config, path: str) -> str:
    """Bar chart of total and active parameters by component (log scale); returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total, active = component_counts(config)
    keys = list(COMPONENT_LABELS)
    fig, ax = plt.subplots(figsize=(9, 5))
    y = range(len(keys))
    floor = 1e5  # the left edge of the log axis; an active count of 0 (the embedding) draws no bar
    for offset, counts, label in ((0.2, total, "total"), (-0.2, active, "active per token")):
        bars = ax.barh([i + offset for i in y], [max(counts[k], floor) for k in keys], height=0.4, label=label)
        for bar, k in zip(bars, keys):
            ax.text(bar.get_width() * 1.15, bar.get_y() + bar.get_height() / 2, _human(counts[k]),
                    va="center", fontsize=7)
    ax.set_yticks(list(y), [COMPONENT_LABELS[k] for k in keys])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(floor, max(total.values()) * 20)
    ax.set_xlabel("parameters (log scale)")
    ax.set_title(f"GLM-5 ({config.name}): {config.num_params() / 1e9:.1f}B total, "
                 f"{config.num_params(active=True) / 1e9:.1f}B active (without MTP)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_tour(figures_dir: str = os.path.join("runs", "figures")) -> None:
    """What `make demo` prints until the classroom model exists: GLM-5 from its config."""
    config = GLM5Config.glm5()
    print("GLM-5 (arXiv 2602.15763) from its config, as in the released config.json\n")
    print(params_table(config))
    print()
    print(cache_table(config))
    print(f"\nrouted experts hold {100 * config.param_breakdown()['routed_experts'] / config.num_params():.1f}% "
          f"of the parameters; a token uses {config.num_experts_per_tok} of {config.n_routed_experts} of them")
    path = plot_param_breakdown(config, os.path.join(figures_dir, "00_param_breakdown.png"))
    print(f"\nfigure written: {path}")
    print("\nthe notebooks, in order:")
    for name, text in NOTEBOOK_MAP:
        print(f"  notebooks/{name}.ipynb  {text}")
