"""Overview diagrams: the map of the notebooks (notebook 00) and one GLM-5 decoder layer (notebook 04).

    from glm5_ref.apps.diagrams.overview import notebook_map, decoder_layer
    show_figure(notebook_map(), "00_notebook_map.png")
    show_figure(decoder_layer(config), "04_decoder_layer.png")

Both return a matplotlib Figure drawn with the primitives of ``glm5_ref.apps.diagrams`` (canvas, box, arrow,
legend). The decoder-layer diagram takes its numbers (widths, experts, dense layers) from a GLM5Config, so it
cannot drift from the code.
"""

from __future__ import annotations

from glm5_ref.apps.diagrams import COLORS, arrow, box, canvas, legend

# the notebooks in reading order: (stem, label in the map, group)
NOTEBOOKS = [
    ("00_glm5_at_a_glance", "00 GLM-5 at a glance\nparameters, cache bytes", "foundations"),
    ("00a_foundations", "00a foundations\nBPE, RMSNorm, SwiGLU, RoPE", "foundations"),
    ("01_mla", "01 MLA\nthe latent KV cache", "architecture"),
    ("02_dsa_lightning_indexer", "02 DSA\nlightning indexer, top-k", "architecture"),
    ("03_moe_router", "03 MoE router\nsigmoid, bias, balance", "architecture"),
    ("04_assembling_glm5", "04 assembling GLM-5\nlayer, model, checkpoint", "architecture"),
    ("05_mtp_speculative_decoding", "05 MTP\nspeculative decoding", "architecture"),
    ("06_train_classroom_glm5", "06 training\nthe classroom GLM-5", "training"),
    ("07_muon_split", "07 Muon\nand Muon Split", "training"),
    ("08_tito_agentic_rl", "08 agentic RL\nTITO, IS, async loop", "RL"),
    ("12_post_training", "12 post-training\nSFT, RL stages, distill", "RL"),
    ("09_triton_kernels", "09 Triton kernels\nsparse MLA, roofline", "scale"),
    ("10_scaling_out", "10 scaling out\nEP, DP, all-to-all", "scale"),
    ("11_long_context_dsa", "11 long-context DSA\nrecall at 512-4K", "scale"),
]

# (A, B): read A before B. The main prerequisites, plus the reading order within the architecture row
PREREQUISITES = [
    ("00_glm5_at_a_glance", "00a_foundations"), ("00a_foundations", "01_mla"), ("01_mla", "02_dsa_lightning_indexer"),
    ("00a_foundations", "03_moe_router"), ("02_dsa_lightning_indexer", "03_moe_router"),
    ("03_moe_router", "04_assembling_glm5"), ("04_assembling_glm5", "05_mtp_speculative_decoding"),
    ("04_assembling_glm5", "06_train_classroom_glm5"), ("05_mtp_speculative_decoding", "06_train_classroom_glm5"),
    ("06_train_classroom_glm5", "07_muon_split"), ("06_train_classroom_glm5", "08_tito_agentic_rl"),
    ("08_tito_agentic_rl", "12_post_training"), ("01_mla", "09_triton_kernels"),
    ("02_dsa_lightning_indexer", "09_triton_kernels"), ("03_moe_router", "10_scaling_out"),
    ("06_train_classroom_glm5", "11_long_context_dsa"),
]

# where each box sits (x, y) on the 13 x 8.4 canvas, and each group's panel (x0, y0, x1, y1, colour kind)
_POS = {
    "00_glm5_at_a_glance": (3.6, 7.35), "00a_foundations": (7.6, 7.35),
    "01_mla": (1.45, 5.45), "02_dsa_lightning_indexer": (3.95, 5.45), "03_moe_router": (6.45, 5.45),
    "04_assembling_glm5": (8.95, 5.45), "05_mtp_speculative_decoding": (11.45, 5.45),
    "09_triton_kernels": (1.45, 3.35), "10_scaling_out": (3.95, 3.35), "11_long_context_dsa": (6.45, 3.35),
    "06_train_classroom_glm5": (8.95, 3.35), "07_muon_split": (11.45, 3.35),
    "08_tito_agentic_rl": (8.95, 1.25), "12_post_training": (11.45, 1.25),
}
_GROUPS = {
    "foundations": ((1.9, 6.65, 9.3, 8.05), "note", "foundations"),
    "architecture": ((0.2, 4.75, 12.8, 6.3), "tensor", "the architecture (01-05)"),
    "scale": ((0.2, 2.65, 7.7, 4.2), "cache", "scale (09-11)"),
    "training": ((7.75, 2.65, 12.8, 4.2), "weight", "training (06-07)"),
    "RL": ((7.75, 0.55, 12.8, 2.1), "op", "RL and post-training (08, 12)"),
}


def notebook_map():
    """The 14 notebooks, grouped, with arrows from each main prerequisite (and along the reading order)."""
    from matplotlib.patches import Rectangle

    fig, ax = canvas(13, 8.4, "The notebook map (an arrow from A to B: read A before B)")
    for (x0, y0, x1, y1), kind, label in _GROUPS.values():
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc=COLORS[kind], ec="#999999", lw=0.8, alpha=0.45))
        ax.text(x0 + 0.1, y1 - 0.08, label, fontsize=9, va="top", ha="left", style="italic", color="#333333")
    boxes = {}
    for stem, label, group in NOTEBOOKS:
        w = 2.6 if stem == "00a_foundations" else 2.25
        boxes[stem] = box(ax, _POS[stem], label, kind=_GROUPS[group][1], w=w, h=0.62, fontsize=8.5)
    for a, b in PREREQUISITES:
        arrow(ax, boxes[a], boxes[b])
    ax.text(0.3, 1.9, "Reading order: by number (00, 00a, 01, 02, ..., 12).\nThe glossary at the end of "
            "notebook 00 says\nin which notebook each term is derived.", fontsize=8.5, va="top", color="#333333")
    return fig


def decoder_layer(config):
    """One GLM-5 decoder layer: pre-norm MLA (with DSA) and a residual add, then pre-norm MoE (sigmoid router,
    routed experts, shared expert) and a residual add; the first ``first_k_dense_replace`` layers use a dense
    SwiGLU instead of the MoE."""
    c = config
    d, E, K = c.hidden_size, c.n_routed_experts, c.num_experts_per_tok
    fig, ax = canvas(14, 5.6, f"One GLM-5 decoder layer ({c.name}: d = {d:,}, {c.num_hidden_layers} layers, "
                              f"layers 0-{c.first_k_dense_replace - 1} dense, the rest MoE)")
    y = 2.2
    x_in = box(ax, (0.75, y), f"x\n(B, T, {d})", kind="tensor", w=1.1)
    n1 = box(ax, (2.45, y), "RMSNorm\ninput_layernorm", kind="op", w=1.45)
    attn = box(ax, (4.4, y), f"MLA + DSA\n{c.num_attention_heads} heads, top-{c.index_topk}\nself_attn",
               kind="weight", w=1.8)
    add1 = box(ax, (6.0, y), "+", kind="op", w=0.5, h=0.5)
    n2 = box(ax, (7.45, y), "RMSNorm\npost_attention_\nlayernorm", kind="op", w=1.45)
    router = box(ax, (9.3, 3.85), f"router (mlp.gate)\nsigmoid scores + bias\n-> top-{K} of {E}",
                 kind="op", w=1.9)
    experts = box(ax, (11.5, 3.85), f"{K} of {E} routed experts\nSwiGLU, width {c.moe_intermediate_size}\n"
                                    "x router weights", kind="weight", w=2.1)
    shared = box(ax, (10.4, 0.95), f"shared expert\nSwiGLU, width {c.n_shared_experts * c.moe_intermediate_size}"
                                   "\nevery token", kind="weight", w=1.9)
    mix = box(ax, (12.6, y), "sum", kind="op", w=0.65, h=0.5)
    add2 = box(ax, (13.45, y), "+", kind="op", w=0.5, h=0.5)
    for a, b in ((x_in, n1), (n1, attn), (attn, add1), (add1, n2), (n2, router), (router, experts), (n2, shared),
                 (experts, mix), (shared, mix), (mix, add2)):
        arrow(ax, a, b)
    arrow(ax, (n2.x + n2.w / 2, n2.y + 0.25), (experts.x - experts.w / 2, experts.y - 0.4), color="#777777",
          ls="--")
    # the two residual paths: branch off the stream, run over the top, add back in
    for xa, b, top in ((1.49, add1, 3.3), (6.46, add2, 5.0)):
        ax.plot([xa, xa, b.x], [y, top, top], color="#333333", lw=1.2)
        ax.plot([xa], [y], "o", color="#333333", ms=4)
        arrow(ax, (b.x, top), (b.x, y + b.h / 2))
        ax.text((xa + b.x) / 2, top + 0.08, "residual", fontsize=8, ha="center", va="bottom")
    ax.text(0.2, 0.45, f"Layers 0-{c.first_k_dense_replace - 1}: the MoE (router, routed and shared experts) "
                       f"is one dense SwiGLU\nof width {c.intermediate_size:,} instead. Dashed: the routed "
                       "experts read the normed\ninput; the router decides which experts and their weights.",
            fontsize=8.5, va="center", color="#333333")
    legend(ax, ["tensor", "weight", "op"], xy=(0.3, 5.2))
    return fig
