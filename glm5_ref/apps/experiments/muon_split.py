"""Experiment muon-split: AdamW vs Muon vs Muon Split on MLA, and a GQA-8 baseline under Muon (paper Table 1).

What it measures (GLM-5 report section 2.1, glm5_spec.md section 7)
    GLM-5 found that MLA trailed GQA-8 under Muon until each attention head's up-projection was orthogonalized
    on its own (Muon Split), and that the attention logits then stay bounded without QK-clip. This script
    trains the same small decoder, on the same batches and the same token budget, in four arms:

        adamw       MLA attention, every parameter AdamW
        muon        MLA attention, hidden matrices Muon (whole-matrix Newton-Schulz), the rest AdamW
        muon_split  MLA attention, as muon but q_b_proj / kv_b_proj orthogonalized per head (glm5_ref.muon)
        gqa_muon    the MLA module swapped for ``GQA`` below (grouped-query attention), hidden matrices Muon

    and records, per seed: the validation bits-per-byte curve (glm5_ref.training.data.evaluate on fixed windows), the
    spread across heads of the per-head update RMS of the attention up-projections (MLA arms), and the largest
    causal attention logit q.k * scale seen in the training batch (every arm). From these:

        final val bpb per arm (mean, std and per seed);
        steps_to_adamw_fraction = (first evaluated step at which Muon Split's val bpb <= AdamW's final val bpb)
                                  / AdamW's steps, per seed and mean (null, with a reason, if never reached);
        gap_mla_vs_gqa: val bpb(MLA) - val bpb(GQA-8 + Muon), paired by seed, with MLA under Muon and under
                        Muon Split (positive = MLA worse), mean +- std over seeds and the standard error.

    Per-head update RMS: for a parameter W with decoupled weight decay, the optimizer's step is
    W' = (1 - lr wd) W - lr D, so D = ((1 - lr wd) W - W') / lr is the update direction before the learning
    rate. Its RMS over each head's row block (q_h, k_h, v_h) is what Muon Split equalises: with the
    "match_rms_adamw" scale each block's D has RMS ~0.2, whatever its gradient. The spread is the coefficient
    of variation std/mean over the heads of one matrix (averaged over layers), and max/min.

Choices where the paper and the issue are silent (the paper does not give the proxy model's size)
    * Model: GLM5Config.classroom() scaled down to 2 layers, d = 128, 16 heads of (16 nope + 8 rope) q/k dims
      and 16 v dims, q_lora 64, kv_lora 32, dense SwiGLU FFN (no MoE: the optimizer comparison is about
      attention, and MoE routing noise would hide it), no MTP, no DSA indexer (dense MLA; at T = 128 the
      indexer's top-k would select everything anyway). Each layer's self_attn is replaced by ``TrackedMLA``
      (glm5_ref.mla.MLA plus a record of its largest logit) or by ``GQA``.
    * GQA-8: 8 KV groups for the 16 query heads, MLA's per-head dims, no low-rank compression (gqa.py).
    * The gap "under Muon Split" compares MLA + Muon Split with GQA-8 + (plain) Muon, as the paper's Table 1
      does; GQA is not itself trained with Muon Split.
    * Learning rates: every arm gets the same sweep (peak lr in LR_GRID, one tuning seed TUNE_SEED not among
      the reported seeds, a third of the step count with the schedule compressed to it, to fit the CPU
      budget); when the best lr is at an edge of the values tried, the grid is extended past that edge by its
      ratio (2.5), at most MAX_GRID_EXTENSIONS (2) times, the same rule for every arm (experiments.tune_lr). Each arm's lr with the
      lowest final val bpb is then run on the reported seeds (finished sweep runs are kept in
      <out>/muon_split_sweep.json: an interrupted full run resumes its sweep). The AdamW part of the Muon arms
      (embeddings, head, norms) uses the same lr (Muon's "match_rms_adamw" scale is designed for that). Weight decay 0.1, betas (0.9, 0.95), momentum 0.95
      Nesterov, grad clipping at norm 1, linear warm-up over 5% of the steps then cosine to 10% of the peak.
      The sweep and the final runs use the same validation windows (there is no third split); the sweep's
      numbers are in the JSON.
    * steps_to_adamw_fraction is read at the evaluation points (every ``eval_every`` steps), so it is an
      upper bound with that resolution; the Muon Split curve at step s is mid-schedule (lr not annealed yet).

Not handled: distributed training, the MLA-256 variant of Table 1, downstream benchmarks (we report validation
bits per byte, the classroom corpus has no HellaSwag), a held-out tuning split.

Run: ``python -m glm5_ref experiment muon-split [--quick] [--out DIR] [--seeds 0,1]``: the full run writes
figures/muon_split.json and .png; --quick (a tiny model, a few steps, no sweep) writes under --out. References: GLM-5 report (arXiv 2602.15763) section 2.1 and Table 1; Moonlight (arXiv 2502.16982).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from glm5_ref.apps.experiments import tune_lr, write_json
from glm5_ref.apps.experiments.gqa import attention_modules, build_model, default_kv_groups
from glm5_ref.config import GLM5Config
from glm5_ref.mla import MLA
from glm5_ref.training.data import BatchSampler, build_splits, eval_windows, evaluate, token_byte_lengths
from glm5_ref.training.engine import Trainer

STEM = "muon_split"
ARMS = {  # arm -> (attention, optimizer)
    "adamw": ("mla", "adamw"),
    "muon": ("mla", "muon"),
    "muon_split": ("mla", "muon_split"),
    "gqa_muon": ("gqa", "muon"),
}
LR_GRID = (2e-3, 5e-3, 1.25e-2)
TUNE_SEED = 100
WEIGHT_DECAY = 0.1
WARMUP = 0.05
MIN_LR_RATIO = 0.1
GRAD_CLIP = 1.0


# ---- the model (its attention arms: gqa.py) -------------------------------------------------------------------
def experiment_config(quick: bool = False) -> GLM5Config:
    """The scaled-down model (module docstring): dense FFN, no MTP; quick mode is smaller still."""
    base = GLM5Config.classroom()
    if quick:
        return dataclasses.replace(base, name="muon-split-quick", hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
                                   qk_rope_head_dim=4, v_head_dim=8, intermediate_size=64,
                                   first_k_dense_replace=1, num_nextn_predict_layers=0)
    return dataclasses.replace(base, name="muon-split", hidden_size=128, num_hidden_layers=2,
                               num_attention_heads=16, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, intermediate_size=384,
                               first_k_dense_replace=2, num_nextn_predict_layers=0)


# ---- per-head update RMS --------------------------------------------------------------------------------------
def head_row_blocks(attn: MLA) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """{"q": (param name, blocks), "k": ..., "v": ...}: the per-head rows of q_b_proj and kv_b_proj."""
    blocks = attn.muon_blocks(split_kv=True, split_q_rope=False)
    kv = blocks["kv_b_proj.weight"]  # [k_0, v_0, k_1, v_1, ...]
    return {"q": ("q_b_proj", blocks["q_b_proj.weight"]), "k": ("kv_b_proj", kv[0::2]),
            "v": ("kv_b_proj", kv[1::2])}


def per_head_update_rms(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], blocks: dict,
                        lr: float, weight_decay: float) -> dict[str, list[float]]:
    """RMS of D = ((1 - lr wd) W - W') / lr over each head's rows, for each of q, k, v (module docstring)."""
    out = {}
    for kind, (pname, rows) in blocks.items():
        D = ((1 - lr * weight_decay) * before[pname] - after[pname]) / lr  # (rows, cols)
        out[kind] = [D[s:e].pow(2).mean().sqrt().item() for s, e in rows]
    return out


def spread(values: list[float]) -> dict[str, float]:
    """Coefficient of variation (population std / mean) and max/min of per-head RMS values."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"cv": std / mean if mean > 0 else float("nan"),
            "max_over_min": max(values) / min(values) if min(values) > 0 else float("inf")}


# ---- training ----------------------------------------------------------------------------------------------
def train_arm(arm: str, lr: float, seed: int, config: GLM5Config, data: dict, steps: int, batch_size: int,
              seq_len: int, eval_every: int, track_every: int) -> dict:
    """Train one arm with one seed on the training engine (the same schedule for every arm); return its curves."""
    if arm not in ARMS:
        raise ValueError(f"train_arm arm: expected one of {sorted(ARMS)}, got {arm!r}")
    if not lr > 0:
        raise ValueError(f"train_arm lr: expected a number > 0, got {lr!r}")
    attention, opt_name = ARMS[arm]
    model = build_model(config, attention, seed=seed)
    trainer = Trainer(model, opt_name, lr, weight_decay=WEIGHT_DECAY, total_steps=steps, warmup=WARMUP,
                      min_lr_ratio=MIN_LR_RATIO, grad_clip=GRAD_CLIP)
    sampler = BatchSampler(data["train_ids"], batch_size, seq_len, seed=seed)  # same batches in every arm
    attns = attention_modules(model)
    blocks = [head_row_blocks(a) for a in attns] if attention == "mla" else None
    curve = {"step": [], "val_bpb": [], "val_loss": []}
    track = {"step": [], "max_logit": [], "train_loss": []}
    if blocks:
        track |= {f"{k}_{m}": [] for k in "qkv" for m in ("cv", "max_over_min")}
    head_rms_last = None
    t0 = time.perf_counter()

    def run_eval(step: int) -> None:
        ev = evaluate(model, data["windows"], batch_size=32, byte_lengths=data["byte_lengths"])
        curve["step"].append(step)
        curve["val_bpb"].append(ev["bpb"])
        curve["val_loss"].append(ev["loss"])

    run_eval(0)
    for step in range(1, steps + 1):
        tracked = step == 1 or step % track_every == 0 or step == steps
        for a in attns:
            a.track = tracked
        before = None  # the weights before this step (forward and backward leave them as they are)
        if tracked and blocks:
            before = [{n: getattr(a, n).weight.detach().clone() for n in ("q_b_proj", "kv_b_proj")} for a in attns]
        try:
            res = trainer.step(sampler.next())  # (B, T + 1)
        except FloatingPointError as e:
            raise FloatingPointError(f"{arm} seed {seed} lr {lr}: {e} at step {step}") from None
        if tracked:
            track["step"].append(step)
            track["train_loss"].append(res.out.lm_loss.item())
            track["max_logit"].append(max(a.max_logit.item() for a in attns))
            if before is not None:
                rms = [per_head_update_rms(b, {n: getattr(a, n).weight.detach() for n in b}, bl, res.lr,
                                           WEIGHT_DECAY) for a, b, bl in zip(attns, before, blocks)]
                for k in "qkv":
                    for m in ("cv", "max_over_min"):
                        track[f"{k}_{m}"].append(statistics.fmean(spread(r[k])[m] for r in rms))
                head_rms_last = rms[0]
        if step % eval_every == 0 or step == steps:
            run_eval(step)
    for a in attns:
        a.track, a.max_logit = False, None
    return {"arm": arm, "lr": lr, "seed": seed, "steps": steps, "tokens": steps * batch_size * seq_len,
            "final_val_bpb": curve["val_bpb"][-1], "final_val_loss": curve["val_loss"][-1],
            "curve": curve, "track": track, "layer0_head_update_rms_last": head_rms_last,
            "num_params": sum(p.numel() for p in model.parameters()), "wall_s": time.perf_counter() - t0}


# ---- summaries ----------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    return {"mean": mean, "std": std, "sem": std / math.sqrt(n) if std is not None else None, "n": n,
            "per_seed": values}


def steps_to_reach(curve: dict, target: float) -> int | None:
    """The first evaluated step whose val bpb is <= target (None if never)."""
    return next((s for s, b in zip(curve["step"], curve["val_bpb"]) if b <= target), None)


def steps_to_adamw_fraction(runs: dict, seeds: list[int]) -> dict:
    per_seed, reasons = {}, []
    for seed in seeds:
        adamw, split = runs["adamw"][seed], runs["muon_split"][seed]
        s = steps_to_reach(split["curve"], adamw["final_val_bpb"])
        per_seed[str(seed)] = None if s is None else s / adamw["steps"]
        if s is None:
            reasons.append(f"seed {seed}: Muon Split never reached AdamW's final val bpb "
                           f"{adamw['final_val_bpb']:.4f} (its best: {min(split['curve']['val_bpb']):.4f})")
    vals = list(per_seed.values())
    return {"per_seed": per_seed, "mean": None if None in vals else statistics.fmean(vals),
            "reason": "; ".join(reasons) or None,
            "definition": "first evaluated step at which muon_split's val bpb <= adamw's final val bpb (same seed), "
                          "divided by adamw's steps; resolution = eval_every steps"}


def gap(runs: dict, seeds: list[int], mla_arm: str) -> dict:
    diffs = [runs[mla_arm][s]["final_val_bpb"] - runs["gqa_muon"][s]["final_val_bpb"] for s in seeds]
    return mean_std(diffs) | {"definition": f"final val bpb({mla_arm}, MLA) - final val bpb(gqa_muon), paired by "
                                            "seed; positive = MLA worse; std over seeds, sem = std/sqrt(n)"}


def summarise(runs: dict, seeds: list[int]) -> dict:
    final = {arm: mean_std([runs[arm][s]["final_val_bpb"] for s in seeds]) for arm in runs}
    spread_summary = {}
    for arm in ("adamw", "muon", "muon_split"):
        per = {}
        for k in "qkv":
            # the mean over the training steps (after the first) of the layer-averaged coefficient of variation
            per[f"{k}_cv_mean"] = statistics.fmean(
                statistics.fmean(runs[arm][s]["track"][f"{k}_cv"][1:] or runs[arm][s]["track"][f"{k}_cv"])
                for s in seeds)
        spread_summary[arm] = per
    max_logit = {arm: {"max_over_training": max(max(runs[arm][s]["track"]["max_logit"]) for s in seeds),
                       "final_mean": statistics.fmean(runs[arm][s]["track"]["max_logit"][-1] for s in seeds)}
                 for arm in runs}
    return {"final_val_bpb": final, "steps_to_adamw_fraction": steps_to_adamw_fraction(runs, seeds),
            "gap_mla_vs_gqa": {"muon": gap(runs, seeds, "muon"), "muon_split": gap(runs, seeds, "muon_split")},
            "head_update_rms_spread": spread_summary, "max_attention_logit": max_logit}


# ---- the figure -----------------------------------------------------------------------------------------------
COLORS = {"adamw": "tab:gray", "muon": "tab:blue", "muon_split": "tab:red", "gqa_muon": "tab:green"}
LABELS = {"adamw": "MLA + AdamW", "muon": "MLA + Muon", "muon_split": "MLA + Muon Split", "gqa_muon": "GQA-8 + Muon"}


def plot(result: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, seeds = result["runs"], [str(s) for s in result["seeds"]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for arm in runs:
        for i, s in enumerate(seeds):
            c = runs[arm][s]["curve"]
            ax.plot(c["step"][1:], c["val_bpb"][1:], color=COLORS[arm], alpha=0.85, lw=1.3,
                    ls="-" if i == 0 else "--", label=LABELS[arm] if i == 0 else None)
    lo = min(min(runs[a][s]["curve"]["val_bpb"]) for a in runs for s in seeds)
    hi = max(runs[a][s]["curve"]["val_bpb"][len(runs[a][s]["curve"]["val_bpb"]) // 4] for a in runs for s in seeds)
    ax.set_ylim(lo - 0.02, hi + 0.02)
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("validation bpb (solid / dashed: seeds)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for arm in ("adamw", "muon", "muon_split"):
        for i, s in enumerate(seeds):
            t = runs[arm][s]["track"]
            cv = [(a + b + c) / 3 for a, b, c in zip(t["q_cv"], t["k_cv"], t["v_cv"])]
            ax.plot(t["step"], cv, color=COLORS[arm], ls="-" if i == 0 else "--", lw=1.2,
                    label=LABELS[arm] if i == 0 else None)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.set_ylabel("std / mean of per-head update RMS")
    ax.set_title("spread of per-head update RMS (q, k, v up-projections)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for arm in runs:
        for i, s in enumerate(seeds):
            t = runs[arm][s]["track"]
            ax.plot(t["step"], t["max_logit"], color=COLORS[arm], ls="-" if i == 0 else "--", lw=1.2,
                    label=LABELS[arm] if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("max causal attention logit")
    ax.set_title("largest attention logit (no QK-clip)")
    ax.legend(fontsize=8)
    fig.suptitle(f"Muon Split at classroom scale: {result['steps']} steps x {result['batch_size']} x "
                 f"{result['seq_len']} tokens, seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the experiment -------------------------------------------------------------------------------------------
def load_data(seq_len: int, eval_windows_count: int) -> dict:
    splits = build_splits()
    return {"train_ids": splits.train.ids, "windows": eval_windows(splits.val.ids, seq_len, eval_windows_count),
            "byte_lengths": token_byte_lengths()}


def run(quick: bool = False, out_dir: str | None = None, seeds: list[int] | None = None,
        lr_grid: tuple[float, ...] | None = None, steps: int | None = None, progress: bool = True,
        sweep_cache: bool | None = None) -> dict:
    """Sweep the lr of every arm on TUNE_SEED, train every arm on ``seeds`` at its best lr, write
    <out_dir>/muon_split.json and .png; return the JSON. quick: tiny model, 12 steps, one lr, no sweep.
    ``sweep_cache`` (default: on for full runs) reuses finished sweep runs stored in <out_dir>."""
    from glm5_ref.apps.experiments import default_out_dir

    seeds = list(seeds) if seeds is not None else [0, 1]
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    out = Path(out_dir) if out_dir is not None else default_out_dir("muon-split", quick)
    config = experiment_config(quick)
    if quick:
        steps, batch_size, seq_len, n_windows, eval_every = steps or 12, 4, 32, 8, 4
        lr_grid = tuple(lr_grid or (4e-3,))
    else:
        steps, batch_size, seq_len, n_windows, eval_every = steps or 300, 8, 128, 64, 20
        lr_grid = tuple(lr_grid or LR_GRID)
    if any(not lr > 0 for lr in lr_grid):
        raise ValueError(f"lr_grid: expected learning rates > 0, got {lr_grid!r}")
    track_every = max(1, eval_every // 2)
    sweep_steps = steps if quick else max(1, steps // 3)
    sweep_cache = (not quick) if sweep_cache is None else sweep_cache
    torch.set_num_threads(1)
    data = load_data(seq_len, n_windows)
    kw = dict(config=config, data=data, steps=steps, batch_size=batch_size, seq_len=seq_len,
              eval_every=eval_every, track_every=track_every)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if progress:
            print(f"[muon-split {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    sweep, best_lr = {}, {}
    cache_path = out / f"{STEM}_sweep.json"  # finished sweep runs, so an interrupted full run resumes its sweep
    cache = json.loads(cache_path.read_text()) if sweep_cache and cache_path.is_file() else {}
    for arm in ARMS:
        if len(lr_grid) == 1:
            best_lr[arm] = lr_grid[0]
            continue
        sweep[arm] = {}

        def trial(lr: float) -> float:
            key = f"{config.name}|{arm}|{lr!r}|seed={TUNE_SEED}|steps={sweep_steps}|B={batch_size}|T={seq_len}"
            if key in cache:
                val = cache[key]["val_bpb"]
            else:
                try:
                    val = train_arm(arm, lr, TUNE_SEED, **(kw | dict(steps=sweep_steps, eval_every=sweep_steps)))[
                        "final_val_bpb"]
                except FloatingPointError as e:
                    val = None
                    log(f"sweep {arm} lr {lr}: diverged ({e})")
                cache[key] = {"val_bpb": val}
                if sweep_cache:
                    write_json(cache_path, cache)
            sweep[arm][repr(lr)] = val
            log(f"sweep {arm:10s} lr {lr:g}: val bpb {val}")
            return math.inf if val is None else val

        best_lr[arm] = tune_lr(trial, lr_grid)[0]
        log(f"sweep {arm}: best lr {best_lr[arm]:g}")
    runs: dict[str, dict[str, dict]] = {arm: {} for arm in ARMS}
    for seed in seeds:
        for arm in ARMS:
            r = train_arm(arm, best_lr[arm], seed, **kw)
            runs[arm][seed] = r
            log(f"{arm:10s} seed {seed} lr {best_lr[arm]:g}: val bpb {r['final_val_bpb']:.4f} ({r['wall_s']:.0f}s)")
    summary = summarise(runs, seeds)
    result = {
        "experiment": "muon-split", "quick": quick, "config": {k: v for k, v in dataclasses.asdict(config).items()},
        "arms": {arm: {"attention": a, "optimizer": o, "label": LABELS[arm]} for arm, (a, o) in ARMS.items()},
        "gqa_kv_groups": default_kv_groups(config), "seeds": seeds, "tune_seed": TUNE_SEED,
        "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "tokens_per_run": steps * batch_size * seq_len,
        "eval_every": eval_every, "eval_windows": n_windows, "track_every": track_every,
        "schedule": {"warmup": WARMUP, "min_lr_ratio": MIN_LR_RATIO, "weight_decay": WEIGHT_DECAY,
                     "grad_clip": GRAD_CLIP, "adamw_betas": [0.9, 0.95], "muon_adjust_lr_fn": "match_rms_adamw"},
        "lr_grid": list(lr_grid), "lr_sweep_steps": sweep_steps, "lr_sweep": sweep,
        "lr_sweep_sources": {k: v["source"] for k, v in cache.items() if v.get("source")}, "lr": best_lr, "threads": torch.get_num_threads(),
        **summary,
        "runs": {arm: {str(s): r for s, r in per.items()} for arm, per in runs.items()},
        "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{STEM}.json", result)
    plot(result, out / f"{STEM}.png")
    log(f"wrote {out / STEM}.json and .png")
    return result
