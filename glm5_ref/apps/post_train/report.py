"""The post-training results: the issue's goals checked on the results document, and the figure
(figures/post_training.png, with the document next to it as post_training.json).

Goals (issue #19): reasoning accuracy after reasoning RL at least 15 points above SFT's; agentic success after
agentic RL at least 0.9; instruction pass rate after general RL at least 20 points above SFT's; after distillation
every skill within 2 points of the best stage that held it (reasoning, agentic, instruction; style too, on its
0-1 scale); keep-recent-k and hierarchical each above no management.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SKILL_ROWS = ("reasoning", "agentic", "instruction", "style")


def goals(doc: dict) -> dict:
    e, cm = doc["eval"], doc["context_management"]
    out = {"reasoning_rl_+15": e["reasoning_rl"]["reasoning"] - e["sft"]["reasoning"] >= 0.15,
           "agentic_rl_0.9": e["agentic_rl"]["agentic"] >= 0.9,
           "general_rl_+20": e["general_rl"]["instruction"] - e["sft"]["instruction"] >= 0.20,
           "keep_recent_above_none": cm["keep-recent-k"] > cm["none"],
           "hierarchical_above_none": cm["hierarchical"] > cm["none"]}
    for skill in SKILL_ROWS:
        values = [e[s][skill] for s in doc["stages"][1:-1] if e[s].get(skill) is not None]
        if values and e["distill"].get(skill) is not None:
            out[f"distill_{skill}_within_2"] = e["distill"][skill] >= max(values) - 0.02
    return out


def write_figure(doc: dict, stem) -> tuple[str, str]:
    """``stem``.json (the document) and ``stem``.png: the stage x skill matrix, answer length by stage, context
    management, and the general-RL rewards compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stages, e = doc["stages"], doc["eval"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.4), gridspec_kw={"width_ratios": [1.5, 0.9, 0.8, 1.3]})
    ax = axes[0]
    grid = [[e[s].get(k) if e[s].get(k) is not None else float("nan") for s in stages] for k in SKILL_ROWS]
    ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right")
    ax.set_yticks(range(len(SKILL_ROWS)), SKILL_ROWS)
    ax.set_title("held-out skills by stage (greedy)")
    ax = axes[1]
    ax.bar(range(len(stages)), [e[s]["mean_tokens"] for s in stages], color="tab:gray")
    ax.set_xticks(range(len(stages)), stages, rotation=30, ha="right")
    ax.set_title("instruction answer length (tokens)")
    ax = axes[2]
    cm = doc["context_management"]
    ax.bar(list(cm), list(cm.values()), color=["tab:red", "tab:blue", "tab:green"][:len(cm)])
    ax.set_ylim(0, 1)
    d = doc.get("context_management_details", {})
    ax.set_title(f"long-horizon success\n(window {d.get('window')}, k={d.get('k')}, T={d.get('threshold')})")
    ax = axes[3]
    runs = doc.get("general_rl_rewards", {}).get("runs", {})
    names = ["before"] + list(runs)
    rows = [doc["general_rl_rewards"]["before"]] + [runs[k] for k in runs] if runs else []
    width = 0.2
    for i, (key, color) in enumerate((("instruction", "tab:blue"), ("style", "tab:orange"),
                                      ("formulaic", "tab:red"), ("filler", "tab:purple"))):
        ax.bar([j + (i - 1.5) * width for j in range(len(rows))], [r[key] for r in rows], width, label=key,
               color=color)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("general RL: each reward alone and the hybrids")
    fig.suptitle("GLM-5 post-training at classroom scale" + (" (quick run)" if doc.get("quick") else ""))
    fig.tight_layout()
    png = os.fspath(stem.with_suffix(".png"))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    js = os.fspath(stem.with_suffix(".json"))
    Path(js).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return js, png
