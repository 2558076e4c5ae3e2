"""Experiments: `python -m glm5_ref experiment NAME [--quick] [--out DIR]`.

An experiment is a longer measurement than a benchmark: it trains or simulates, and its full run writes
``figures/<stem>.json`` (every number, per seed) and ``figures/<stem>.png``; ``--quick`` runs the same code at
a size CI can afford (seconds to a minute) and writes into ``--out`` (default: a folder under runs/), so a
quick run never overwrites the committed full results. An experiment lives in
glm5_ref/apps/experiments/<name with _>.py and defines

    def run(quick: bool = False, out_dir: str | None = None, seeds: list[int] | None = None) -> dict

returning the JSON it wrote. Register its name in EXPERIMENTS below.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

EXPERIMENTS: dict[str, str] = {
    "muon-split": "AdamW vs Muon vs Muon Split on MLA, and GQA-8 under Muon, same token budget (paper Table 1)",
    "long-context": "DSA keeps long-context recall: dense vs warm-up only vs DSA vs random selection (paper Table 3)",
    "rl-toy": "asynchronous agentic RL on a toy tool-use task, with and without staleness",
    "copy-onset": "when a plain GPT and the classroom GLM-5 start copying from their context, over seeds",
    "quantization": "W8A8 / W4A8 (+ Hadamard) and FP8 on the classroom checkpoint, INT4 QAT vs PTQ, layer-wise streaming",
}

MAX_GRID_EXTENSIONS = 2  # lr values added past a grid's edge when an edge wins (tune_lr)
FIGURES_DIR = Path(__file__).resolve().parents[3] / "figures"


def default_out_dir(name: str, quick: bool) -> Path:
    """figures/ for a full run (the committed results), runs/experiments/<name>-quick for a quick one."""
    if quick:
        return Path("runs") / "experiments" / f"{name}-quick"
    return FIGURES_DIR


def write_json(path: str | os.PathLike, obj: dict) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def run_experiment(name: str, quick: bool = False, out_dir: str | None = None,
                   seeds: list[int] | None = None) -> dict:
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment {name!r}: expected one of {sorted(EXPERIMENTS)}")
    module = importlib.import_module(f"glm5_ref.apps.experiments.{name.replace('-', '_')}")
    if out_dir is None:
        out_dir = str(default_out_dir(name, quick))
    return module.run(quick=quick, out_dir=out_dir, seeds=seeds)


def tune_lr(trial, lr_grid, max_extensions: int = MAX_GRID_EXTENSIONS) -> tuple[float, dict[float, float]]:
    """Evaluate ``trial(lr)`` (lower is better) on the grid; while the best lr is at an edge of the values tried,
    try one more beyond that edge (the grid's ratio), at most ``max_extensions`` times. Returns (best, tried)."""
    grid = sorted(lr_grid)
    if len(grid) < 2 or len(set(grid)) != len(grid):
        raise ValueError(f"tune_lr lr_grid: expected at least two distinct learning rates, got {lr_grid!r}")
    ratio = grid[1] / grid[0]
    tried = {lr: trial(lr) for lr in grid}
    for _ in range(max_extensions):  # the same rule for every arm: extend the grid past a winning edge
        best = min(tried, key=tried.get)
        if best == max(tried):
            tried[best * ratio] = trial(best * ratio)
        elif best == min(tried):
            tried[best / ratio] = trial(best / ratio)
        else:
            break
    return min(tried, key=tried.get), tried
