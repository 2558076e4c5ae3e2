"""MTP diagrams (notebook 05): the one MTP layer unrolled over its depths, and the verifying forward.

    from glm5_ref.apps.diagrams.mtp import mtp_unrolled
    show_figure(mtp_unrolled(config), "05_mtp_unrolled.png")

What it draws (glm5_ref/mtp.py, glm5_ref/speculative.py): the main model ends in h_t (after its final norm) and
predicts x_{t+1}. Depth k concatenates [enorm(Emb(x_{t+k})) ; hnorm(h^{k-1})], projects 2d -> d (eh_proj), runs the
ONE shared MTP decoder layer, and predicts x_{t+k+1} through shared_head.norm and the main model's LM head. Its
hidden state h^k feeds depth k + 1. In training x_{t+k} is the true token; when drafting it is the previous
prediction. Below: the drafts and the newest token are verified by one forward of the main model.
The numbers (layers, depths, width) come from a GLM5Config.
"""

from __future__ import annotations

from glm5_ref.apps.diagrams import arrow, box, canvas, legend


def mtp_unrolled(config, depths: int | None = None):
    """The MTP layer unrolled over ``depths`` (default config.num_mtp_depths) with shared weights, and the one
    main-model forward that verifies the drafts. Returns a matplotlib Figure."""
    c = config
    D = depths or c.num_mtp_depths
    d, L = c.hidden_size, c.num_hidden_layers
    gap = 3.6
    width = 2.2 + gap * (D + 1)
    fig, ax = canvas(width, 10.2, f"MTP in {c.name}: ONE layer, unrolled over {D} depths with the same weights, "
                                  "then one verifying forward")
    xs = [1.5 + gap * k for k in range(D + 1)]
    y_tok, y_norm, y_proj, y_layer, y_head, y_pred = 8.6, 7.55, 6.5, 5.45, 4.4, 3.3

    def sub(k):  # "t+k" as text
        return "t" if k == 0 else f"t+{k}"

    # the main model (column 0)
    tok0 = box(ax, (xs[0], y_tok), f"x_1 .. x_t\n(the context)", kind="tensor", w=2.0)
    main = box(ax, (xs[0], (y_norm + y_proj) / 2), f"main model\n{L} decoder layers\n(MLA + DSA, MoE)",
               kind="weight", w=2.0)
    hfin = box(ax, (xs[0], y_layer), f"final RMSNorm\n-> h^0 = h_t  (d = {d:,})", kind="op", w=2.3)
    head0 = box(ax, (xs[0], y_head), "LM head", kind="weight", w=2.0)
    pred = [box(ax, (xs[0], y_pred), "predicts x_{t+1}\n(the main model's token)", kind="tensor", w=2.3)]
    for a, b in ((tok0, main), (main, hfin), (hfin, head0), (head0, pred[0])):
        arrow(ax, a, b)
    h_prev = hfin

    for k in range(1, D + 1):
        x = xs[k]
        emb = box(ax, (x + 0.7, y_tok), f"Emb(x_{{{sub(k)}}})\n(shared embedding)", kind="weight", w=1.75)
        en = box(ax, (x + 0.7, y_norm), "enorm\n(RMSNorm)", kind="op", w=1.3)
        hn = box(ax, (x - 0.75, y_norm), "hnorm\n(RMSNorm)", kind="op", w=1.3)
        proj = box(ax, (x, y_proj), f"concat [enorm ; hnorm]\neh_proj: {2 * d:,} -> {d:,}", kind="weight", w=2.45)
        layer = box(ax, (x, y_layer), "the shared MTP layer\n(one decoder layer)", kind="weight", w=2.45)
        head = box(ax, (x, y_head), "shared_head.norm\n+ the main LM head", kind="weight", w=2.45)
        p = box(ax, (x, y_pred), f"predicts x_{{{sub(k + 1)}}}\n(draft d_{k})", kind="tensor", w=2.0)
        for a, b in ((emb, en), (en, proj), (hn, proj), (proj, layer), (layer, head), (head, p)):
            arrow(ax, a, b)
        # h^{k-1} from the previous depth (or the main model): right, up between the columns, into hnorm
        xh = h_prev.x + h_prev.w / 2 + 0.25
        ax.plot([h_prev.x + h_prev.w / 2, xh, xh], [y_layer, y_layer, y_norm], color="#1f5fa8", lw=1.2)
        arrow(ax, (xh, y_norm), (hn.x - hn.w / 2, y_norm), color="#1f5fa8")
        ax.text(xh + 0.07, (y_layer + y_norm) / 2 - 0.15, f"h^{k - 1}", fontsize=9, color="#1f5fa8", ha="left")
        # the previous prediction becomes this depth's input token: right, up between the columns, into Emb
        prev = pred[-1]
        xm = x - 1.6
        ax.plot([prev.x + prev.w / 2, xm, xm, emb.x], [prev.y, prev.y, 9.45, 9.45], color="#b35900", lw=1.1, ls="--")
        arrow(ax, (emb.x, 9.45), (emb.x, emb.y + emb.h / 2), color="#b35900", ls="--")
        pred.append(p)
        h_prev = layer
        ax.text(x, y_pred - 0.5, f"depth {k}", fontsize=9.5, ha="center", va="top", style="italic")
    ax.text(xs[0] + 1.35, 9.6, "dashed: the token each depth embeds (training: the TRUE next token; "
            "drafting: the previous prediction)", fontsize=8.5, color="#b35900", va="bottom")

    # the verifying forward
    y_v = 1.35
    ax.plot([0.2, width - 0.2], [2.45, 2.45], color="#999999", lw=0.8, ls=":")
    ax.text(0.25, 2.3, f"then: verify all {D} drafts in ONE forward of the main model", fontsize=9.5, va="top",
            style="italic")
    drafts = ", ".join(f"d_{j}" for j in range(1, D + 1))
    blk = box(ax, (2.0, y_v), f"[x_{{t+1}}, {drafts}]\n{D + 1} positions", kind="tensor", w=2.4)
    fwd = box(ax, (5.3, y_v), f"ONE main-model forward\nover its KV cache ({L} layers)", kind="weight", w=2.8)
    ps = box(ax, (8.55, y_v), f"p_1 .. p_{D + 1}: the main model's\nnext-token distributions", kind="tensor", w=2.9)
    acc = box(ax, (width - 2.35, y_v), "accept d_j while d_j = argmax p_j,\nthen emit argmax p_{a+1}:\n"
              f"1 to {D + 1} tokens per round", kind="op", w=3.6)
    for a, b in ((blk, fwd), (fwd, ps), (ps, acc)):
        arrow(ax, a, b)
    ax.text(0.25, 0.32, "Rejected drafts are rolled back from both caches; the output is exactly what the main "
            "model alone would emit (greedy), or has its distribution (sampling, with the rejection rule).",
            fontsize=8.5, va="center", color="#333333")
    legend(ax, ["tensor", "weight", "op"], xy=(width - 3.6, 2.2))
    return fig
