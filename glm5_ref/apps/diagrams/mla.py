"""MLA diagrams for notebook 01: the data flow of one MLA layer, and the absorbed decode path.

    from glm5_ref.apps.diagrams.mla import mla_dataflow, mla_absorbed
    show_figure(mla_dataflow(GLM5Config.glm5()), "01_mla_dataflow.png")
    show_figure(mla_absorbed(GLM5Config.glm5()), "01_mla_absorbed.png")

Both take their widths from a GLM5Config and name each weight as ``glm5_ref.mla.MLA`` (and the released
checkpoint) does, so they cannot drift from the code.
"""

from __future__ import annotations

from glm5_ref.apps.diagrams import COLORS, arrow, box, canvas, legend


def _dims(c):
    return dict(d=c.hidden_size, H=c.num_attention_heads, r_q=c.q_lora_rank, r_kv=c.kv_lora_rank,
                d_n=c.qk_nope_head_dim, d_r=c.qk_rope_head_dim, d_v=c.v_head_dim)


def _cache_panel(ax, x0, y0, x1, y1, text):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc=COLORS["cache"], ec="#8a5a9e", lw=1, ls="--", alpha=0.35))
    ax.text(x0 + 0.08, y0 + 0.06, text, fontsize=8, va="bottom", ha="left", color="#5b3a6b", style="italic")


def mla_dataflow(config):
    """One MLA layer in the expanded form (training and prefill): the query path through the q latent, the
    kv latent c_KV and the shared rotary key k_R (the two cached tensors), the per-head up-projections,
    attention and the output projection."""
    k = _dims(config)
    fig, ax = canvas(15, 7.4, f"MLA data flow, expanded path ({config.name}: d = {k['d']:,}, H = {k['H']} heads; "
                              "the weights' names are glm5_ref.mla.MLA's)")
    x = box(ax, (0.85, 3.9), f"x\n(T, d = {k['d']:,})\nnormed\nlayer input", kind="tensor", w=1.3)
    # query path (top row)
    wdq = box(ax, (3.05, 6.3), "W_DQ  q_a_proj\nthen RMSNorm\nq_a_layernorm", kind="weight", w=1.9)
    cq = box(ax, (5.35, 6.3), f"c_Q: q latent\n(T, r_q = {k['r_q']:,})", kind="tensor", w=1.8)
    wuq = box(ax, (7.55, 6.3), "W_UQ\nq_b_proj", kind="weight", w=1.3)
    qn = box(ax, (9.85, 6.75), f"q_nope\n(T, H, d_n = {k['d_n']})", kind="tensor", w=1.9)
    qr = box(ax, (9.85, 5.65), f"q_rope, RoPE at t\n(T, H, d_r = {k['d_r']})", kind="tensor", w=1.9)
    # kv path (middle row) and the shared rotary key (bottom row)
    wdkv = box(ax, (3.05, 3.9), f"W_DKV\nkv_a_proj_with_mqa\nrows 0..{k['r_kv'] - 1},\nthen RMSNorm\n"
                                "kv_a_layernorm", kind="weight", w=1.9)
    ckv = box(ax, (5.35, 3.9), f"c_KV: kv latent\n(S, r_kv = {k['r_kv']})", kind="cache", w=1.8)
    wuk = box(ax, (7.55, 4.45), "W_UK\nkv_b_proj\n(per head)", kind="weight", w=1.3)
    wuv = box(ax, (7.55, 3.05), "W_UV\nkv_b_proj\n(per head)", kind="weight", w=1.3)
    kn = box(ax, (9.85, 4.45), f"k_nope\n(S, H, d_n = {k['d_n']})", kind="tensor", w=1.9)
    v = box(ax, (9.85, 3.05), f"v\n(S, H, d_v = {k['d_v']})", kind="tensor", w=1.9)
    wkr = box(ax, (3.05, 1.35), f"W_KR\nkv_a_proj_with_mqa\nrows {k['r_kv']}..{k['r_kv'] + k['d_r'] - 1}",
              kind="weight", w=1.9)
    kr = box(ax, (5.35, 1.35), f"k_R: rotary key\n(S, d_r = {k['d_r']})\nRoPE at s", kind="cache", w=1.8)
    att = box(ax, (12.75, 4.45), "attention, each head i:\nsoftmax over s <= t of\n"
                                 "[q_nope; q_rope] . [k_nope; k_R]\n"
                                 f"/ sqrt(d_n + d_r) = / {(k['d_n'] + k['d_r']) ** 0.5:g}\n"
                                 "then the sum of weights x v", kind="op", w=2.9)
    wo = box(ax, (13.1, 2.25), f"W_O  o_proj\n(H x d_v = {k['H'] * k['d_v']:,} -> d)", kind="weight", w=2.3)
    out = box(ax, (13.1, 0.95), f"u: (T, d = {k['d']:,})", kind="tensor", w=1.9)
    for a, b in ((x, wdq), (wdq, cq), (cq, wuq), (wuq, qn), (wuq, qr), (x, wdkv), (wdkv, ckv), (ckv, wuk),
                 (ckv, wuv), (wuk, kn), (wuv, v), (x, wkr), (wkr, kr), (qn, att), (qr, att), (kn, att), (v, att),
                 (att, wo), (wo, out)):
        arrow(ax, a, b)
    # k_R runs under the per-head tensors and joins every head's key
    xr = 11.7
    ax.plot([kr.x + kr.w / 2, xr], [kr.y, kr.y], color="#333333", lw=1.2)
    arrow(ax, (xr, kr.y), (xr, att.y - att.h / 2))
    ax.text((kr.x + kr.w / 2 + xr) / 2, kr.y + 0.08, "k_R: one rotary key, shared by every head", fontsize=8,
            ha="center", va="bottom", color="#333333")
    _cache_panel(ax, 4.3, 0.5, 6.4, 4.85, "cached per token:\n"
                 f"r_kv + d_r = {k['r_kv'] + k['d_r']} values")
    ax.text(0.25, 6.95, "query path", fontsize=9, style="italic", color="#333333")
    ax.text(0.25, 0.35, "c_KV and k_R are all a decode step keeps of past tokens; keys and values are rebuilt "
            "from c_KV by W_UK and W_UV.", fontsize=8.5, color="#333333")
    legend(ax, ["tensor", "weight", "op", "cache"], xy=(0.3, 7.3))
    return fig


def mla_absorbed(config):
    """The absorbed (decode) path: W_UK folded into the query, W_UV applied after the weighted sum, attention
    over the cached latents themselves (every head reads the same c_KV and k_R)."""
    k = _dims(config)
    C = k["r_kv"] + k["d_r"]
    fig, ax = canvas(14, 6.0, f"MLA absorbed (decode) path ({config.name}): attend over the cached latent, "
                              "never expand it")
    qn = box(ax, (1.35, 4.9), f"q_nope\n(H, d_n = {k['d_n']})", kind="tensor", w=1.8)
    fold = box(ax, (3.8, 4.9), f"fold W_UK per head:\nq^ = W_UK^T q_nope\n(d_n -> r_kv = {k['r_kv']})",
               kind="weight", w=2.3)
    qhat = box(ax, (6.5, 4.9), f"q^  (H, r_kv = {k['r_kv']})\n+ q_rope (H, d_r = {k['d_r']})",
               kind="tensor", w=2.3)
    kr = box(ax, (1.7, 3.3), f"k_R cache\n(S, d_r = {k['d_r']})", kind="cache", w=1.9)
    ckv = box(ax, (1.7, 2.05), f"c_KV cache\n(S, r_kv = {k['r_kv']})", kind="cache", w=1.9)
    logit = box(ax, (6.5, 3.3), f"logit per head and cached token:\n[q^; q_rope] . [c_KV; k_R]\n"
                                f"one {C}-wide dot product,\nscale 1 / sqrt(d_n + d_r), softmax over s",
                kind="op", w=3.4)
    avg = box(ax, (6.5, 0.95), f"o_latent = sum_s a_s c_KV,s  (H, r_kv = {k['r_kv']}):\n"
                               f"one {k['r_kv']}-wide multiply-add per cached token", kind="op", w=3.9)
    uv = box(ax, (10.3, 0.95), f"apply W_UV per head\n(r_kv -> d_v = {k['d_v']})", kind="weight", w=2.2)
    wo = box(ax, (12.7, 0.95), "W_O  o_proj\n-> u (d)", kind="weight", w=1.5)
    for a, b in ((qn, fold), (fold, qhat), (qhat, logit), (kr, logit), (ckv, logit), (avg, uv), (uv, wo)):
        arrow(ax, a, b)
    arrow(ax, logit, avg, "weights a_s", offset=0.1)
    arrow(ax, ckv, avg)
    ax.text(3.35, 1.2, "the values are\nthe latents too", fontsize=8, color="#333333", ha="left", va="center")
    _cache_panel(ax, 0.3, 0.45, 3.1, 3.85, f"{C} values per token,\nshared by all {k['H']} heads")
    ax.text(0.3, 5.75, "once per new token (the cost does not grow with S):", fontsize=8.5, style="italic",
            color="#333333")
    ax.text(8.9, 4.1, "Associativity:\n  q . (W_UK c) = (W_UK^T q) . c\n  sum_s a_s (W_UV c_s) = W_UV (sum_s a_s c_s)\n"
            "The logits are the same numbers as in the\nexpanded path; only the order of the products\n"
            "changes, so the scale stays 1 / sqrt(d_n + d_r).", fontsize=8.5, va="top", color="#333333")
    legend(ax, ["tensor", "weight", "op", "cache"], xy=(9.6, 5.75))
    return fig
