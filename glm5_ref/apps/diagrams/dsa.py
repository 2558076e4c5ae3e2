"""The DSA diagram for notebook 02: the lightning indexer, top-k selection, and sparse MLA over the selection.

    from glm5_ref.apps.diagrams.dsa import dsa_pipeline
    show_figure(dsa_pipeline(GLM5Config.glm5(), GLM5Config.classroom()), "02_dsa_pipeline.png")

Widths, head counts and k come from the GLM5Config(s); the tensor names are those of ``glm5_ref.dsa.Indexer``
(and the released checkpoint's ``self_attn.indexer``).
"""

from __future__ import annotations

from glm5_ref.apps.diagrams import COLORS, arrow, box, canvas, legend


def dsa_pipeline(config, classroom=None):
    """One query token t through DSA: the indexer (H_I heads, ReLU, weighted sum over heads) scores every
    previous token, the top-k positions are kept, and absorbed MLA attends over those latent entries only.
    ``classroom``: a second config whose index_topk is named next to config's."""
    from matplotlib.patches import Rectangle

    c = config
    J, I, k = c.index_n_heads, c.index_head_dim, c.index_topk
    k_note = f"k = {k:,} ({c.name})" + (f", {classroom.index_topk} ({classroom.name})" if classroom else "")
    fig, ax = canvas(15.4, 6.6, f"DSA for one query token t ({c.name}: {J} indexer heads of width {I}, top-{k:,})")
    # the indexer panel
    ax.add_patch(Rectangle((2.05, 1.0), 7.0, 4.85, fc=COLORS["note"], ec="#999999", lw=0.8, alpha=0.6))
    ax.text(2.15, 5.75, "lightning indexer (glm5_ref.dsa.Indexer)", fontsize=9, style="italic", va="top")
    cq = box(ax, (0.95, 4.65), "c_Q_t\nMLA's q latent\n(notebook 01)", kind="tensor", w=1.6)
    xt = box(ax, (0.95, 3.25), "h_t\nlayer input\nof token t", kind="tensor", w=1.6)
    hs = box(ax, (0.95, 1.75), "h_s, s <= t\nevery previous\ntoken", kind="tensor", w=1.6)
    qi = box(ax, (3.7, 4.65), f"q^I_t = W^IQ c_Q_t  (wq_b)\n{J} heads x d_I = {I},\nRoPE on the first "
                              f"{c.qk_rope_head_dim}", kind="weight", w=2.9)
    wi = box(ax, (3.7, 3.25), f"w_t = W^Iw h_t / sqrt({J})\n(weights_proj): one\nweight per head, any sign",
             kind="weight", w=2.9)
    ki = box(ax, (3.7, 1.75), f"k^I_s = LayerNorm(W^IK h_s)\n(wk, k_norm): ONE key per\ntoken, d_I = {I}, cached",
             kind="cache", w=2.9)
    score = box(ax, (7.3, 3.25), "I[t, s] = sum_j w_t,j x\nReLU(q^I_t,j . k^I_s / sqrt(d_I))\n"
                                 f"no softmax, no values:\n{J} x {I} = {J * I:,} multiply-adds\nper key",
                kind="op", w=3.0)
    for a, b in ((cq, qi), (xt, wi), (hs, ki), (qi, score), (wi, score), (ki, score)):
        arrow(ax, a, b)
    # the scores of all previous tokens, and the top-k
    sc = box(ax, (10.55, 4.65), "index scores I[t, s]\nfor every s <= t", kind="tensor", w=2.2)
    arrow(ax, score, sc)
    vals = [0.2, 0.9, 0.1, 0.4, 0.8, 0.0, 0.3, 0.95, 0.15, 0.5, 0.7, 0.05, 0.35, 0.85]
    best = sorted(range(len(vals)), key=lambda i: -vals[i])[:4]
    x0, y0, cw = 9.5, 3.55, 0.15
    for i, v in enumerate(vals):
        ax.add_patch(Rectangle((x0 + i * cw, y0), cw, 0.32, fc=(1 - 0.8 * v, 1 - 0.5 * v, 1 - 0.2 * v),
                               ec="#222222" if i in best else "#bbbbbb", lw=1.6 if i in best else 0.5))
    ax.text(x0 + len(vals) * cw / 2, y0 - 0.08, "s = 0 ... t (dark outline: kept)", fontsize=7.5, ha="center",
            va="top", color="#333333")
    arrow(ax, sc, (x0 + len(vals) * cw / 2, y0 + 0.34))
    top = box(ax, (13.75, 4.65), f"top-k over s <= t\n{k_note}\ntorch.topk (deterministic),\nties -> most recent",
              kind="op", w=3.1)
    arrow(ax, sc, top)
    sel = box(ax, (13.75, 3.05), "S_t: k key positions\n(all of them while t < k)", kind="tensor", w=2.6)
    arrow(ax, top, sel)
    # sparse MLA over the selected latents
    cache = box(ax, (10.65, 1.75), f"MLA cache of all S tokens:\nc_KV ({c.kv_lora_rank}) + k_R ({c.qk_rope_head_dim})"
                                  " per token", kind="cache", w=2.9)
    gat = box(ax, (13.75, 1.75), "gather the k selected\nlatent entries", kind="op", w=2.6)
    att = box(ax, (13.75, 0.5), f"absorbed MLA over the k\nentries, all {c.num_attention_heads} heads",
              kind="op", w=2.6)
    for a, b in ((sel, gat), (cache, gat), (gat, att)):
        arrow(ax, a, b)
    ax.text(2.1, 0.55, "One selection per query token serves every head. The indexer still reads all S keys, "
            f"but only {I} values\neach; MLA's {c.kv_lora_rank + c.qk_rope_head_dim}-wide entries are read for "
            "k tokens only.", fontsize=8.5, va="center", color="#333333")
    legend(ax, ["tensor", "weight", "op", "cache"], xy=(9.7, 6.3))
    return fig
