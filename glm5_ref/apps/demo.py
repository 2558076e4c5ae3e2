"""`python -m glm5_ref demo` (make demo): GLM-5 from its config, then a classroom GLM-5 trained on a CPU.

Parts, in order
    1. the tour (tour.run_tour): GLM-5's parameter and cache budgets, from the config alone (seconds);
    2. training: the classroom preset (MLA + DSA + 32-expert MoE + MTP: 16.6M parameters with the MTP layer,
       13.1M without) on the shipped Python-stdlib corpus for about 7 minutes on 2 CPU cores (training.run.train);
       a finished run in runs/classroom/
       is reused instead (delete the folder, or pass --fresh, to train again); an interrupted one is resumed;
    3. code completions for a few Python prompts, greedy and sampled;
    4. speculative decoding with the MTP layer (speculative.py);
    5. figures: figures/06_classroom_loss.png (loss and bits/byte), figures/06_classroom_expert_load.png;
    6. a summary table (parameters, tokens, wall time, validation bits/byte, a sample).

The hyper-parameters (DEMO_TRAIN) were chosen by 3-minute runs on a shared 2-core machine (validation bits/byte
on the same 64 windows; MTP off unless said): batch 16 x 256 at lr 2e-3: 2.17; lr 3e-3: 2.17; batch 8: 2.05;
batch 4: 2.16; batch 8 at lr 3e-3: 2.11; batch 16 with MTP over 3 depths from the start: 2.46 (a step costs 2.3x),
with 1 depth: 2.32. Router-bias gamma 1e-2 instead of 1e-3 balances the experts within ~100 steps but did not
lower bits/byte (2.24 at fewer tokens), so GLM's 1e-3 stays. A full demo run reaches 1.84-1.97 bits/byte
(0.6-1.1M tokens, depending on how busy the machine is), against 3.46 for a uniform guess.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from glm5_ref.speculative import speculative_generate
from glm5_ref.training.checkpoint import find_checkpoint, read_log, read_trainer_state
from glm5_ref.training.options import resolve_config
from glm5_ref.training.run import load_model, train

# The classroom recipe: what `make demo` and `python -m glm5_ref train` use unless told otherwise.
DEMO_TRAIN = dict(
    minutes=6.5,                 # training wall-clock budget (the whole demo stays under 10 minutes)
    batch_size=8,                # 8 x 256 = 2048 tokens per step (better than 4 or 16 in this budget)
    seq_len=256,
    lr=2e-3,                     # AdamW peak (better than 3e-3); 5% linear warm-up, cosine to 10%
    dsa_stage="dense:0.8,warmup:0.05,sparse:0.15",  # dense MLA, then indexer warm-up, then top-128 DSA
    mtp_start=0.7,               # MTP (3 depths) only in the last 30%: it more than doubles a step's cost
    num_evals=10,
    eval_windows_n=64,           # the fixed validation set: 64 windows x 256 tokens
)
QUICK_TRAIN = DEMO_TRAIN | dict(minutes=0.05, batch_size=2, seq_len=32, num_evals=2, eval_windows_n=4,
                                dsa_stage="dense:0.5,warmup:0.25,sparse:0.25", mtp_start=0.5)

# Each prompt ends where a line's text starts: the tokenizer makes "\n" + indentation ONE token, so a prompt ending
# in a bare "\n" would tell the model that the next line starts at column 0.
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    ',
    "import os\n\n\ndef list_python_files(path):\n    ",
    "class Stack:\n    def __init__(self):\n        self.",
    "def read_lines(filename):\n    with open(filename) as f:\n        ",
]


def complete(model, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 0.95,
             seed: int = 0) -> str:
    """The model's continuation of ``prompt`` (text only, without the prompt), stopping at end-of-text."""
    from glm5_ref.tokenizer import EOT_ID, decode, encode

    ids = encode(prompt)
    if not ids:
        raise ValueError("prompt: expected a non-empty string")
    room = model.config.max_position_embeddings - len(ids)
    max_new_tokens = min(max_new_tokens, room)
    out = model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_p=top_p,
                         stop_tokens=[EOT_ID], seed=seed)[0, len(ids):].tolist()
    if EOT_ID in out:
        out = out[:out.index(EOT_ID)]
    return decode(out)


def speculative_stats(model, prompt: str, max_new_tokens: int = 48) -> dict | None:
    """Speculative decoding with the MTP layer (speculative.py), 3 drafts per round, greedy: accept length and
    acceptance by depth. None when the model has no MTP layer."""
    if model.mtp is None:
        return None
    from glm5_ref.tokenizer import encode

    _, stats = speculative_generate(model, torch.tensor([encode(prompt)]), max_new_tokens, draft_steps=3)
    return {"rounds": stats.rounds, "accept_length": stats.accept_length,
            "acceptance_by_depth": stats.depth_acceptance}


# ---- figures -----------------------------------------------------------------------------------------------
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
        ax2.axhline(uniform, color="gray", ls="--", label=f"uniform over 4096 ids ({uniform:.2f})")
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


# ---- the demo ----------------------------------------------------------------------------------------------
def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def run_demo(config: str = "classroom", minutes: float | None = None, steps: int | None = None,
             out_dir: str = os.path.join("runs", "classroom"), figures_dir: str = "figures", fresh: bool = False,
             quick: bool = False, optimizer: str = "adamw", seed: int = 0, **overrides) -> dict:
    """The main job (see the module docstring). Returns the summary as a dict."""
    from glm5_ref.training.data import build_splits, eval_windows, uniform_bpb
    from glm5_ref.apps.tour import run_tour

    t_start = time.perf_counter()
    cfg = resolve_config(config)  # ValueError for an unknown preset, before anything runs
    recipe = dict(QUICK_TRAIN if quick else DEMO_TRAIN) | overrides
    if minutes is not None:
        recipe["minutes"] = minutes
    if steps is not None:
        recipe["steps"] = steps
    if recipe.get("minutes") is not None and recipe["minutes"] <= 0:
        raise ValueError(f"minutes: expected a number > 0, got {recipe['minutes']!r}")

    print("=" * 100 + "\n1. GLM-5 at a glance\n" + "=" * 100)
    run_tour(figures_dir=figures_dir)

    print("\n" + "=" * 100 + f"\n2. Training a classroom GLM-5 ({cfg.name} preset) on a CPU\n" + "=" * 100)
    print(f"{cfg.name} config: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense "
          f"+ {cfg.num_moe_layers} MoE, {cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + "
          f"{cfg.n_shared_experts} shared), d={cfg.hidden_size}, MLA {cfg.num_attention_heads} heads (kv latent "
          f"{cfg.kv_lora_rank}), DSA top-{cfg.index_topk}, MTP x{cfg.num_mtp_depths} depths, vocab {cfg.vocab_size}")
    info = read_trainer_state(out_dir)
    reused = False
    if info.get("finished") and not fresh and info.get("args", {}).get("config") == cfg.name:
        reused = True
        print(f"reusing the finished run in {out_dir}: {info['step']} steps, {info['tokens']:,} tokens, "
              f"{info['elapsed_s'] / 60:.1f} min of training (delete the folder or pass --fresh to train again)")
    else:
        same_config = info.get("args", {}).get("config") == cfg.name
        resume = bool(info) and not info.get("finished") and not fresh and same_config
        budget = (f"{recipe['minutes']:.2f} minutes" if recipe.get("minutes") else "") + \
                 (f" / {recipe['steps']} steps" if recipe.get("steps") else "")
        print(f"{'resuming the interrupted run' if resume else 'training'} in {out_dir} for {budget.strip(' /')}: "
              f"batch {recipe['batch_size']} x {recipe['seq_len']} tokens, AdamW lr {recipe['lr']:g}, "
              f"DSA stages {recipe['dsa_stage']}   (Ctrl-C saves a checkpoint; the next demo resumes it)")
        kwargs = {k: v for k, v in recipe.items() if k not in ("minutes", "steps")}
        train(cfg, out_dir, minutes=recipe.get("minutes"), steps=recipe.get("steps"), optimizer=optimizer, seed=seed,
              resume=resume, overwrite=True, progress=not quick, **kwargs)
    info = read_trainer_state(out_dir)
    records = read_log(out_dir)
    model = load_model(out_dir)
    torch.manual_seed(seed)

    print("\n" + "=" * 100 + "\n3. Code completions (greedy, then sampled at temperature 0.8, top-p 0.95)\n"
          + "=" * 100)
    n_new = 12 if quick else 48
    prompts = PROMPTS[:1] if quick else PROMPTS
    samples = []
    for i, prompt in enumerate(prompts):
        greedy = complete(model, prompt, n_new)
        sampled = complete(model, prompt, n_new, temperature=0.8, top_p=0.95, seed=seed + i)
        samples.append((prompt, greedy, sampled))
        b, e = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")  # the model's text in bold
        print(f"--- prompt {i + 1} ---\n{prompt}{b}{greedy}{e}\n--- sampled ---\n{prompt}{b}{sampled}{e}")

    print("\n" + "=" * 100 + "\n4. Speculative decoding with the MTP layer\n" + "=" * 100)
    stats = speculative_stats(model, prompts[0], n_new)
    if stats is None:
        print("(this model has no MTP layer: skipped)")
    else:
        print(f"prompt: {prompts[0]!r}, {n_new} new tokens, greedy, 3 drafts per round from the MTP layer")
        for k, v in stats.items():
            if isinstance(v, list):
                v = "[" + ", ".join(f"{x:.2f}" if isinstance(x, float) else str(x) for x in v) + "]"
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")

    print("\n" + "=" * 100 + "\n5. Figures\n" + "=" * 100)
    splits = build_splits()
    windows = eval_windows(splits.val.ids, info["args"]["seq_len"], info["args"]["eval_windows"])
    uniform = uniform_bpb(windows)
    prefix = "06_classroom" if cfg.name == "classroom" else f"06_{cfg.name}"
    loss_png = plot_training(records, os.path.join(figures_dir, f"{prefix}_loss.png"), uniform=uniform,
                             title=f"GLM-5 {cfg.name}: {info['tokens']:,} tokens in {info['elapsed_s'] / 60:.1f} min")
    print(f"figure written: {loss_png}")
    try:
        load_png = plot_expert_load(records, os.path.join(figures_dir, f"{prefix}_expert_load.png"),
                                    title="aux-loss-free balancing: tokens per expert / mean, over training")
        print(f"figure written: {load_png}")
    except ValueError as e:
        print(f"(no expert-load figure: {e})")

    final = info.get("last_eval", {})
    wall = time.perf_counter() - t_start
    n_params = info.get("num_params", sum(p.numel() for p in model.parameters()))
    summary = {
        "config": cfg.name, "params": n_params, "active_params": cfg.num_params(active=True),
        "tokens": info["tokens"], "steps": info["step"], "train_minutes": info["elapsed_s"] / 60,
        "demo_minutes": wall / 60, "val_loss": final.get("val_loss"), "val_bpb": final.get("val_bpb"),
        "uniform_bpb": uniform, "reused": reused, "attention": info.get("attention"),
        "sample": prompts[0] + samples[0][1], "sample_sampled": prompts[0] + samples[0][2], "speculative": stats,
    }
    print("\n" + "=" * 100 + "\n6. Summary\n" + "=" * 100)
    def one_line(text: str, n: int = 110) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= n else text[:n] + " ..."

    print(_table([
        ("model", f"GLM-5 {cfg.name}: {n_params / 1e6:.1f}M parameters (MTP layer included), "
                  f"{summary['active_params'] / 1e6:.1f}M active per token (main model)"),
        ("trained", f"{info['tokens']:,} tokens, {info['step']} steps, "
                    f"{'reused from ' + out_dir if reused else 'this run'}"),
        ("training wall time", f"{summary['train_minutes']:.1f} min"),
        ("demo wall time", f"{summary['demo_minutes']:.1f} min"),
        ("validation", f"{final.get('val_loss', math.nan):.3f} nats/token, {final.get('val_bpb', math.nan):.3f} "
                       f"bits/byte (uniform guess: {uniform:.2f}; {info.get('attention')} attention)"),
        ("sample (greedy)", one_line(summary["sample"])),
        ("sample (T = 0.8)", one_line(summary["sample_sampled"])),
        ("checkpoint", os.fspath(find_checkpoint(out_dir))),
    ]))
    return summary
