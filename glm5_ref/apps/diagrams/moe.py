"""The MoE routing diagram for notebook 03: sigmoid scores, the bias (selection only), the top-K, the gate
weights from the unbiased scores, the experts, and the bias update that needs no gradient.

    from glm5_ref.apps.diagrams.moe import moe_routing
    show_figure(moe_routing(GLM5Config.glm5()), "03_moe_routing.png")

E, K, the scale and gamma come from the GLM5Config; names are those of ``glm5_ref.moe.MoEGate``.
"""

from __future__ import annotations

from glm5_ref.apps.diagrams import arrow, box, canvas, legend


def moe_routing(config):
    """One token through GLM-5's router and experts, and the aux-loss-free bias update after each step."""
    c = config
    E, K, rho, gamma = c.n_routed_experts, c.num_experts_per_tok, c.routed_scaling_factor, c.bias_update_speed
    fig, ax = canvas(16, 6.6, f"Sigmoid routing with a selection bias ({c.name}: top-{K} of {E} routed experts, "
                              f"{c.n_shared_experts} shared, scale {rho:g})")
    u = box(ax, (0.9, 3.6), f"u_t\ntoken\n(d = {c.hidden_size:,})", kind="tensor", w=1.3)
    router = box(ax, (3.1, 3.6), f"router logits\nl = W u_t\nW (mlp.gate.weight):\n({E} x {c.hidden_size:,}), fp32",
                 kind="weight", w=2.3)
    sig = box(ax, (5.65, 3.6), f"s = sigmoid(l)\n{E} scores in (0, 1),\neach on its own", kind="op", w=2.0)
    # the weights row (top) and the selection row (bottom)
    gat = box(ax, (8.4, 5.0), f"s_e of the {K} chosen\n(UNbiased scores)", kind="op", w=2.4)
    norm = box(ax, (11.05, 5.0), f"g_e = {rho:g} x s_e / sum s\n(normalised, x {rho:g})", kind="op", w=2.4)
    bias = box(ax, (8.4, 2.2), "s + b, b = e_score_\ncorrection_bias:\nfor the selection only", kind="op", w=2.4)
    top = box(ax, (11.05, 2.2), f"top-{K} of s + b\n-> the {K} experts", kind="op", w=2.4)
    routed = box(ax, (13.65, 3.6), f"{K} routed experts\nsum_e g_e FFN_e(u_t)\nSwiGLU, width "
                                   f"{c.moe_intermediate_size:,}", kind="weight", w=2.4)
    shared_width = c.n_shared_experts * c.moe_intermediate_size
    shared = box(ax, (13.65, 5.45), f"shared expert\nFFN_shared(u_t)\nwidth {shared_width:,}", kind="weight", w=2.4)
    out = box(ax, (15.45, 4.5), "y_t\n(sum)", kind="tensor", w=0.9)
    for a, b in ((u, router), (router, sig), (sig, gat), (sig, bias), (bias, top), (gat, norm), (norm, routed),
                 (top, routed), (routed, out), (shared, out)):
        arrow(ax, a, b)
    arrow(ax, top, gat, "which experts", offset=0.12)
    # u_t also goes to the shared expert, over the top
    ax.plot([u.x, u.x, shared.x - shared.w / 2 - 0.3], [u.y + u.h / 2, 6.2, 6.2], color="#777777", lw=1.1, ls="--")
    arrow(ax, (shared.x - shared.w / 2 - 0.3, 6.2), (shared.x - shared.w / 2, shared.y + 0.15), color="#777777",
          ls="--")
    ax.text(6.5, 6.27, "u_t: every token also goes to the shared expert (and to the experts it is routed to)",
            fontsize=8, color="#555555", ha="center", va="bottom")
    # the bias update: after each optimizer step, from the load, no gradient
    load = box(ax, (11.7, 0.6), "load c_e: tokens each\nexpert got in the step", kind="tensor", w=2.3)
    upd = box(ax, (7.9, 0.6), f"b_e += {gamma:g} x sign(mean c - c_e)\nafter each step, no gradient",
              kind="op", w=3.1)
    arrow(ax, top, load, "count", offset=0.1)
    arrow(ax, load, upd)
    arrow(ax, upd, bias, "moves b", offset=0.1, ls="--")
    ax.text(0.25, 1.45, "The bias changes WHICH experts are\nchosen, never HOW MUCH they weigh:\nthe gate weights "
            "come from s alone.\nAn overloaded expert's b falls, an\nidle expert's b rises.", fontsize=8.5,
            va="top", color="#333333")
    legend(ax, ["tensor", "weight", "op"], xy=(12.9, 6.3))
    return fig
