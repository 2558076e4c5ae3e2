"""MoE vs dense at matched active parameters: does GLM-5's MoE pay off at classroom scale?

Trains the classroom GLM-5 (3 of its 4 layers MoE: 32 experts, top-4 + 1 shared) and its all-dense twin
(train.matched_dense_config: every layer a SwiGLU of width (K + S) * d_e = 640, so a token touches the same FFN
parameters) on the same token budget, with the same recipe (batch, sequence length, lr schedule, seed, data
order), and compares their validation curves in bits per byte
    * at equal tokens (the budget; what the MoE buys per training token), and
    * at equal wall-clock (the MoE step is slower on a CPU: what it buys per second), interpolating both curves at
      the moment the faster run finished.
MTP is off in both runs (mtp_depths=0): it is the same MoE block in both models, and without it the comparison
is about the trunk and runs twice as fast. DSA stays dense (sequences of 256 tokens fit the top-128 budget
twice; the DSA stages are the demo's concern).

Usage
    python scripts/compare_dense.py            # full: 256 steps x 8 x 256 tokens each (~10 min on 2 cores)
    python scripts/compare_dense.py --quick    # CI smoke test: the tiny config, a few steps, seconds
The recipe is the demo's (batch 8 x 256 tokens, AdamW lr 2e-3, 5% warm-up, cosine to 10%). Full results go to
figures/compare_dense.json and figures/compare_dense.png; --quick writes to runs/compare_dense/quick/ instead,
so a smoke test never overwrites the committed numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see glm5_ref/__main__.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from glm5_ref.training.options import matched_dense_config, resolve_config  # noqa: E402
from glm5_ref.training.run import train  # noqa: E402


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a curve [(x, y), ...] sorted by x; clamped at both ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def run(quick: bool = False, out_json: str | None = None, out_png: str | None = None, steps: int | None = None,
        batch_size: int | None = None, seq_len: int | None = None, lr: float = 2e-3,
        runs_dir: str | os.PathLike | None = None) -> dict:
    config = resolve_config("tiny" if quick else "classroom")
    variants = {"glm5_moe": config, "dense": matched_dense_config(config)}
    steps = steps or (6 if quick else 256)
    batch_size = batch_size or (2 if quick else 8)
    seq_len = seq_len or (32 if quick else 256)
    runs_dir = Path(runs_dir) if runs_dir else ROOT / "runs" / "compare_dense" / ("quick" if quick else "full")
    figures = ROOT / "figures"
    out_json = out_json or os.fspath(runs_dir / "compare_dense.json" if quick else figures / "compare_dense.json")
    out_png = out_png or os.fspath(runs_dir / "compare_dense.png" if quick else figures / "compare_dense.png")
    results = {}
    for name, cfg in variants.items():
        t0 = time.perf_counter()
        r = train(cfg, runs_dir / name, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, mtp_depths=0,
                  dsa_stage="dense", num_evals=3 if quick else 8, eval_windows_n=4 if quick else 64,
                  checkpoint_minutes=0, overwrite=True, progress=not quick)
        evals = [e for e in r.log if e["kind"] == "eval"]
        results[name] = {
            "params": cfg.num_params(), "active_params": cfg.num_params(active=True),
            "intermediate_size": cfg.intermediate_size, "first_k_dense_replace": cfg.first_k_dense_replace,
            "tokens": r.tokens, "steps": r.step, "train_s": r.elapsed_s, "wall_s": time.perf_counter() - t0,
            "tok_s": r.tokens / r.elapsed_s, "final_val_bpb": r.final_eval["bpb"],
            "final_val_loss": r.final_eval["loss"],
            "curve": [{"tokens": e["tokens"], "elapsed_s": e["elapsed_s"], "val_bpb": e["val_bpb"],
                       "val_loss": e["val_loss"]} for e in evals],
        }
        print(f"{name}: {r.tokens:,} tokens in {r.elapsed_s:.0f} s ({results[name]['tok_s']:.0f} tok/s), "
              f"val {r.final_eval['bpb']:.4f} bits/byte")
    moe, dense = results["glm5_moe"], results["dense"]
    t_equal = min(moe["curve"][-1]["elapsed_s"], dense["curve"][-1]["elapsed_s"])
    at_time = {name: interpolate([(0.0, res["curve"][0]["val_bpb"])] + [(c["elapsed_s"], c["val_bpb"])
                                                                         for c in res["curve"]], t_equal)
               for name, res in results.items()}
    summary = {
        "config": config.name, "quick": quick, "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
        "threads": torch.get_num_threads(), "mtp_depths": 0, "dsa_stage": "dense",
        "equal_tokens": {"tokens": moe["tokens"], "glm5_moe_bpb": moe["final_val_bpb"],
                         "dense_bpb": dense["final_val_bpb"]},
        "equal_wall_clock": {"seconds": t_equal, "glm5_moe_bpb": at_time["glm5_moe"], "dense_bpb": at_time["dense"]},
        "runs": results,
        "note": ("val_bpb on the fixed validation windows; equal wall-clock interpolates each curve at the time the "
                 "faster run finished (the slower run's schedule was laid out for the full token budget)"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=2)
        fh.write("\n")
    os.replace(out_json + ".tmp", out_json)
    plot(summary, out_png)
    print(f"\n{'':12s} {'total':>10s} {'active':>10s} {'tok/s':>8s} {'bpb @ equal tokens':>20s} "
          f"{'bpb @ equal time':>18s}")
    for name, res in results.items():
        print(f"{name:12s} {res['params']:>10,} {res['active_params']:>10,} {res['tok_s']:>8.0f} "
              f"{res['final_val_bpb']:>20.4f} {at_time[name]:>18.4f}")
    print(f"(equal time = {t_equal:.0f} s)\nwritten: {out_json}, {out_png}")
    return summary


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"glm5_moe": "GLM-5 MoE", "dense": "dense, matched active"}
    for name, res in summary["runs"].items():
        label = f"{labels[name]} ({res['active_params'] / 1e6:.2f}M active, {res['params'] / 1e6:.1f}M total)"
        axes[0].plot([c["tokens"] / 1e6 for c in res["curve"]], [c["val_bpb"] for c in res["curve"]], "o-",
                     label=label)
        axes[1].plot([c["elapsed_s"] for c in res["curve"]], [c["val_bpb"] for c in res["curve"]], "o-", label=label)
    axes[1].axvline(summary["equal_wall_clock"]["seconds"], color="gray", ls="--", lw=0.8)
    axes[0].set(xlabel="tokens trained (millions)", ylabel="validation bits per byte", title="at equal tokens")
    axes[1].set(xlabel="wall-clock seconds (training + evaluation)", ylabel="validation bits per byte",
                title="at equal wall-clock")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"{summary['config']}: MoE vs dense of matched active parameters "
                 f"({summary['steps']} steps x {summary['batch_size']} x {summary['seq_len']} tokens)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, a few steps (CI smoke test)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--out", default=None, help="JSON results path")
    parser.add_argument("--figure", default=None, help="PNG path")
    args = parser.parse_args()
    run(quick=args.quick, out_json=args.out, out_png=args.figure, steps=args.steps, batch_size=args.batch_size,
        seq_len=args.seq_len, lr=args.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
