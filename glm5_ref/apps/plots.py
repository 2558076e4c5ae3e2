"""The figures of a training run: loss and bits per byte against tokens, with the DSA stages shaded, and the
experts' load over training (the demo, notebook 06 and the recipe's model card draw them from a run's log)."""

from __future__ import annotations

import os

import torch


def _stage_spans(steps: list[dict]) -> list[tuple[str, float, float]]:
    """(stage, first token, last token) of each DSA stage; a step's span starts where the previous one ended."""
    spans, before = [], 0
    for r in steps:
        if not spans or spans[-1][0] != r["stage"]:
            spans.append([r["stage"], before, r["tokens"]])
        spans[-1][2] = before = r["tokens"]
    return [tuple(s) for s in spans]


def plot_training(records: list[dict], path: str, uniform: float | None = None, title: str = "") -> str:
    """Train loss (LM part, smoothed) and validation loss per token, and validation bits/byte, against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = [r["tokens"] / 1e6 for r in steps]
        y = [r["lm_loss"] for r in steps]
        k = max(1, len(y) // 50)
        smooth = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
        ax1.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8)
        ax1.plot(x, smooth, color="tab:blue", label="train LM loss (smoothed)")
        if any(r.get("mtp_ce") for r in steps):
            ax1.plot(x, [sum(r["mtp_ce"]) / len(r["mtp_ce"]) if r.get("mtp_ce") else float("nan") for r in steps],
                     color="tab:green", alpha=0.7, lw=0.8, label="MTP cross-entropy (mean of depths)")
        colors = {"dense": None, "warmup": "tab:orange", "sparse": "tab:purple"}
        for stage, a, b in _stage_spans(steps):
            for ax in (ax1, ax2):
                if colors[stage]:
                    ax.axvspan(a / 1e6, b / 1e6, color=colors[stage], alpha=0.12,
                               label=f"DSA {stage}" if ax is ax1 else None)
    if evals:
        ax1.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red",
                 label="validation loss")
        ax2.plot([r["tokens"] / 1e6 for r in evals], [r["val_bpb"] for r in evals], "o-", color="tab:red",
                 label="validation")
    if uniform is not None:
        ax2.axhline(uniform, color="gray", ls="--", label=f"uniform over the vocabulary ({uniform:.2f})")
    ax1.set(xlabel="tokens trained (millions)", ylabel="nats per token", title="loss")
    ax2.set(xlabel="tokens trained (millions)", ylabel="bits per byte", title="validation bits per byte")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_expert_load(records: list[dict], path: str, title: str = "") -> str:
    """Heat map per MoE layer: tokens routed to each expert, relative to the mean, between evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if r["kind"] == "eval" and r.get("expert_load") and sum(map(sum, r["expert_load"]))]
    if not evals:
        raise ValueError("plot_expert_load: the log holds no expert loads (a model without MoE layers?)")
    loads = torch.tensor([r["expert_load"] for r in evals], dtype=torch.float64)  # (evals, L_moe, E)
    from matplotlib.colors import TwoSlopeNorm

    rel = loads / loads.mean(-1, keepdim=True).clamp_min(1e-9)  # load / mean load
    n_layers = rel.shape[1]
    fig, axes = plt.subplots(1, n_layers, figsize=(4.2 * n_layers, 3.8), squeeze=False, layout="constrained")
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max())))  # white = perfectly balanced
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(rel[:, i].numpy(), aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set(xlabel="expert", ylabel="training interval (between evaluations)",
               title=f"MoE layer {i + 1}: load / mean")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="tokens routed / mean over experts")
    if title:
        fig.suptitle(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
