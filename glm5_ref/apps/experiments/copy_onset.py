"""copy-onset: when does a model start copying from its context? A plain GPT against the classroom GLM-5, seeds.

The task is training/synthetic.py's RandomCopySampler, the recipe's copy warm-up: rows of 32 tokens, 16 random
ordinary ids then the same 16 again. The first half is unpredictable (about ln 4,096 = 8.3 nats per token); the
second half is free to a model that looks back 16 positions. Every arm trains on the same batches (16 rows per
step) with the same plain loop: torch AdamW at a constant lr, betas 0.9 / 0.95, weight decay 0.1, no clipping,
next-token cross-entropy only (no MTP loss, no router-bias updates), fp32, one thread per run. Every 50 steps the
same 64 held-out rows are scored: mean nats on the repeat (the second half's 16 targets) and on the first half.

    arm                 model
    gpt-full-rope       a 4-layer, 256-wide GPT (4 heads of 64, GELU MLP 1,024, RMSNorm, no biases, PyTorch's
                        default init), RoPE on all 64 dims of each head, rope_theta 10,000
    gpt-decoupled-rope  the same GPT with MLA's rotary layout: RoPE on 16 of each head's 64 query-key dims, and
                        those 16 key dims one vector shared by all heads (MLA's k^R), rope_theta 10,000
    glm5-classroom      GLM5Config.classroom() (MLA with DSA dense, MoE, 16 of 48 query-key dims rotated), lr 2e-3
    glm5-classroom-5e-4 the same at lr 5e-4 (the recipe's warm-up lr)
    gpt-decoupled-theta100, gpt-decoupled-rope32, glm5-classroom-theta100, glm5-classroom-rope32: the decoupled
                        GPT and the classroom model with rope_theta 100 (faster rotations), or with 32 rotated
                        query-key dims (the GPT: 32 of 64; the classroom: 16 nope + 32 rope, the same 48 in all)
    gpt-full-rope-swiglu  gpt-full-rope with GLM-5's SwiGLU FFN (3 x 256 = 768 wide, as the classroom's dense
                        layer) instead of GELU: with no biases anywhere, a SwiGLU's output has no constant part at
                        initialisation, while a GELU's does (its mean is positive), and a head that attends by
                        position alone needs a query that does not depend on the token
    *-prefix            every row read after GLM's sequence prefix [gMASK]<sop> (a fixed start that any head can
                        attend to, token-independent); the loss and the halves are the row's own positions
    gpt-full-rope-init0.02, -init0.02-5e-4, -embed0.02, -linear0.02: the GPT with GLM-5's init (N(0, 0.02), what
                        transformers and GLM5ForCausalLM use) instead of PyTorch's default (N(0, 1) embeddings,
                        U(+-1/sqrt(fan_in)) matrices: std 0.036 from 256 inputs), on everything (at lr 2e-3 or
                        5e-4), on the embeddings only, or on the matrices only
    glm5-classroom-dense-ffn, -dense-ffn-torch-init, -torch-init, -torch-init-5e-4, -embed1-5e-4: the classroom
                        model without MoE (first_k_dense_replace = 4: every layer a 768-wide SwiGLU), with PyTorch's
                        default init of every Linear and Embedding (the MoE's experts too; the router keeps
                        N(0, 0.02)), or with N(0, 1) embeddings only

The onset of a run is the first evaluation at which the repeat's loss is at least ONSET_GAP nats below the first
half's; a run with none is reported as not started. Why it matters: post-training needs a base that copies from
its context, and single-seed pilots (2026-12-03) disagreed with each other: one GPT (decoupled RoPE at rope_theta
100) written in two throwaway scripts started copying by step 800 in 3 of 3 seeds in one and 1 of 3 in the other,
so an arm's onset is a distribution and only several seeds compare arms.

    python -m glm5_ref experiment copy-onset [--quick] [--out DIR] [--seeds 0,1,2]

Full run: figures/copy_onset.json and .png; 60 runs (20 arms x 3 seeds) of about 4.5 (GPT) or 6 (classroom)
minutes each, two at a time (one per core), so about 2.7 hours on a 2-core machine; every finished run is kept in
runs/experiments/copy-onset-runs/ and an interrupted run resumes from there. --quick: two arms, 12 steps, one
seed, a few seconds.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.apps.experiments import FIGURES_DIR, write_json
from glm5_ref.layers import apply_rope
from glm5_ref.training.synthetic import RandomCopySampler, span_nll

STEM = "copy_onset"
ONSET_GAP = 1.0  # nats: repeat this far below the first half counts as copying
SPAN = 16  # ids per half row
FULL = dict(steps=800, eval_every=50, batch=16, eval_rows=64, seeds=[0, 1, 2])
QUICK = dict(steps=12, eval_every=6, batch=4, eval_rows=8, seeds=[0])
ARMS = {  # name: (model kind, lr, options); PlainGPT's options, or GLM5Config overrides and build_glm5's options
    "gpt-full-rope": ("gpt", 2e-3, dict(rope_dims=64, shared_rope_key=False)),
    "gpt-full-rope-init0.02": ("gpt", 2e-3, dict(rope_dims=64, shared_rope_key=False, embed_std=0.02,
                                                  linear_std=0.02)),
    "gpt-full-rope-init0.02-5e-4": ("gpt", 5e-4, dict(rope_dims=64, shared_rope_key=False, embed_std=0.02,
                                                       linear_std=0.02)),
    "gpt-full-rope-embed0.02": ("gpt", 2e-3, dict(rope_dims=64, shared_rope_key=False, embed_std=0.02)),
    "gpt-full-rope-linear0.02": ("gpt", 2e-3, dict(rope_dims=64, shared_rope_key=False, linear_std=0.02)),
    "gpt-full-rope-swiglu": ("gpt", 2e-3, dict(rope_dims=64, shared_rope_key=False, swiglu=True)),
    "gpt-full-rope-swiglu-prefix": ("gpt", 2e-3, dict(rope_dims=64, shared_rope_key=False, swiglu=True,
                                                      prefix=True)),
    "gpt-decoupled-rope": ("gpt", 2e-3, dict(rope_dims=16, shared_rope_key=True)),
    "gpt-decoupled-theta100": ("gpt", 2e-3, dict(rope_dims=16, shared_rope_key=True, theta=100.0)),
    "gpt-decoupled-rope32": ("gpt", 2e-3, dict(rope_dims=32, shared_rope_key=True)),
    "glm5-classroom": ("glm5", 2e-3, {}),
    "glm5-classroom-5e-4": ("glm5", 5e-4, {}),
    "glm5-classroom-theta100": ("glm5", 2e-3, dict(rope_theta=100.0)),
    "glm5-classroom-rope32": ("glm5", 2e-3, dict(qk_nope_head_dim=16, qk_rope_head_dim=32)),
    "glm5-classroom-prefix": ("glm5", 2e-3, dict(prefix=True)),
    "glm5-classroom-dense-ffn": ("glm5", 2e-3, dict(first_k_dense_replace=4)),
    "glm5-classroom-dense-ffn-torch-init": ("glm5", 2e-3, dict(first_k_dense_replace=4, torch_init=True)),
    "glm5-classroom-torch-init": ("glm5", 2e-3, dict(torch_init=True)),
    "glm5-classroom-torch-init-5e-4": ("glm5", 5e-4, dict(torch_init=True)),
    "glm5-classroom-embed1-5e-4": ("glm5", 5e-4, dict(embed_std=1.0)),
}


class PlainGPT(nn.Module):
    """The reference arm: pre-norm GPT, RMSNorm, no biases, RoPE (``rope_dims`` of each head's ``head_dim``,
    optionally one rotary key shared by every head as in MLA), a GELU MLP of 4 x dim or (``swiglu``) GLM-5's
    SwiGLU of 3 x dim (about the same parameters). Experiment code, no cache.
    forward(ids (B, T)) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int, dim: int = 256, layers: int = 4, heads: int = 4, rope_dims: int = 64,
                 shared_rope_key: bool = False, theta: float = 10_000.0, swiglu: bool = False,
                 embed_std: float | None = None, linear_std: float | None = None):
        super().__init__()
        head_dim = dim // heads
        if not 0 < rope_dims <= head_dim or rope_dims % 2:
            raise ValueError(f"rope_dims: expected an even number in (0, {head_dim}], got {rope_dims}")
        self.heads, self.head_dim, self.rope_dims, self.shared, self.theta = heads, head_dim, rope_dims, \
            shared_rope_key, theta
        hidden = 3 * dim if swiglu else 4 * dim  # up holds gate and up for SwiGLU: (2 * hidden, dim)
        self.swiglu = swiglu
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.RMSNorm(dim), qkv=nn.Linear(dim, 3 * dim, bias=False), out=nn.Linear(dim, dim, bias=False),
            norm2=nn.RMSNorm(dim), up=nn.Linear(dim, (1 + swiglu) * hidden, bias=False),
            down=nn.Linear(hidden, dim, bias=False),
        )) for _ in range(layers))
        self.norm, self.head = nn.RMSNorm(dim), nn.Linear(dim, vocab, bias=False)
        for kind, std in ((nn.Embedding, embed_std), (nn.Linear, linear_std)):  # N(0, std), GLM-5's kind of init,
            for m in self.modules():  # instead of PyTorch's default (N(0, 1) embeddings, U(+-1/sqrt(fan_in)) linears)
                if isinstance(m, kind) and std is not None:
                    nn.init.normal_(m.weight, std=std)

    def attention(self, block: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = block["qkv"](x).view(B, T, 3, self.heads, self.head_dim).unbind(2)  # each (B, T, H, E)
        r, pos = self.rope_dims, torch.arange(T)
        k_rot = k[:, :, :1, :r].expand(-1, -1, self.heads, -1) if self.shared else k[..., :r]  # MLA: one k^R
        q = torch.cat([apply_rope(q[..., :r], pos, self.theta, True), q[..., r:]], dim=-1)
        k = torch.cat([apply_rope(k_rot, pos, self.theta, True), k[..., r:]], dim=-1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return block["out"](a.transpose(1, 2).reshape(B, T, -1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = x + self.attention(b, b["norm1"](x))
            h = b["up"](b["norm2"](x))
            if self.swiglu:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
            else:
                h = F.gelu(h)
            x = x + b["down"](h)
        return self.head(self.norm(x))


def build(kind: str, options: dict) -> tuple[nn.Module, callable]:
    """(model, ids -> logits) for an arm. Option ``prefix``: every row is read after GLM's sequence prefix
    [gMASK]<sop> (the logits of the row's own positions are returned, so the loss and its split are unchanged)."""
    from glm5_ref.config import GLM5Config
    from glm5_ref.tokenizer import SPECIAL_TOKENS

    cfg, options = GLM5Config.classroom(), dict(options)
    prefixed = options.pop("prefix", False)
    if kind == "gpt":
        model = forward = PlainGPT(cfg.vocab_size, **options)
    else:
        model = build_glm5(cfg, options)

        def forward(ids):
            return model(ids).logits
    if not prefixed:
        return model, forward
    prefix = torch.tensor([SPECIAL_TOKENS["[gMASK]"], SPECIAL_TOKENS["<sop>"]])
    return model, lambda ids: forward(torch.cat([prefix.expand(len(ids), -1), ids], dim=1))[:, len(prefix):]


def build_glm5(cfg, options: dict) -> nn.Module:
    """The classroom GLM5ForCausalLM with config overrides and the init options (``torch_init``, ``embed_std``),
    DSA dense."""
    from glm5_ref.model import GLM5ForCausalLM
    from glm5_ref.training.engine import set_dsa_stage

    torch_init, embed_std = options.pop("torch_init", False), options.pop("embed_std", None)
    model = GLM5ForCausalLM(dataclasses.replace(cfg, **options))  # the other options: config overrides
    with torch.no_grad():
        if torch_init:  # PyTorch's default init of every Linear and Embedding (as PlainGPT's) instead of GLM-5's;
            for m in model.modules():  # in place, so the MoE's packed expert storage sees it (the router stays)
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.reset_parameters()
        if embed_std is not None:
            model.model.embed_tokens.weight.normal_(0.0, embed_std)
    set_dsa_stage(model, "dense")
    return model


def split_losses(logits: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
    """(first, repeat): mean nats predicting ids 1 .. SPAN-1 of the first half, and all SPAN ids of the second
    (its id 0 too: at a fixed offset it is as copyable as the rest)."""
    first, repeat = span_nll(logits, rows, SPAN, repeat_from=0)
    return float(first.mean()), float(repeat.mean())


def onset(curve: list[dict], gap: float = ONSET_GAP) -> int | None:
    """The first step whose repeat loss is at least ``gap`` below its first-half loss, or None."""
    return next((c["step"] for c in curve if c["first"] - c["repeat"] >= gap), None)


def run_arm(name: str, seed: int, p: dict) -> dict:
    """Train one arm from one seed (in a worker process) and return its curve."""
    torch.set_num_threads(1)
    kind, lr, options = ARMS[name]
    torch.manual_seed(seed)
    model, logits_of = build(kind, options)
    opt = torch.optim.AdamW(model.parameters(), lr, betas=(0.9, 0.95), weight_decay=0.1)
    train = RandomCopySampler(p["batch"], 2 * SPAN - 1, seed=seed)
    held_out = RandomCopySampler(p["eval_rows"], 2 * SPAN - 1, seed=1_000_003).next()  # the same for every run
    curve, t0 = [], time.perf_counter()
    for step in range(p["steps"] + 1):
        if step % p["eval_every"] == 0:
            model.eval()
            with torch.no_grad():
                first, repeat = split_losses(logits_of(held_out), held_out)
            model.train()
            curve.append({"step": step, "first": round(first, 4), "repeat": round(repeat, 4)})
            print(f"  {name} seed {seed}: step {step} repeat {repeat:.3f} first {first:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if step == p["steps"]:
            break
        rows = train.next()
        loss = F.cross_entropy(logits_of(rows)[:, :-1].transpose(1, 2), rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {"arm": name, "seed": seed, "lr": lr, "curve": curve, "onset": onset(curve),
            "params": sum(q.numel() for q in model.parameters()), "wall_s": round(time.perf_counter() - t0, 1)}


def summarize(runs: list[dict], arms: list[str], steps: int) -> dict:
    """Per arm: onsets per seed, how many started, and the median onset (None if fewer than half started)."""
    out = {}
    for arm in arms:
        onsets = [r["onset"] for r in sorted(runs, key=lambda r: r["seed"]) if r["arm"] == arm]
        started = sorted(o for o in onsets if o is not None)
        median = started[len(onsets) // 2] if 2 * len(started) > len(onsets) else None  # missing ones sort last
        final = [r["curve"][-1]["repeat"] for r in runs if r["arm"] == arm]
        out[arm] = {"onsets": onsets, "started": len(started), "seeds": len(onsets), "median_onset": median,
                    "final_repeat_mean": round(sum(final) / len(final), 3), "of_steps": steps}
    return out


def plot(result: dict, path: Path) -> None:
    """The repeat's loss over training, one line per (arm, seed): the plain-GPT arms left, the classroom right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {"gpt": "plain GPT (4 x 256)", "glm5": "classroom GLM-5"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, kind in zip(axes, kinds):
        arms = [a for a in result["arms"] if a.startswith(kind)]
        colors = {a: plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")(i) for i, a in enumerate(arms)}
        for r in result["runs"]:
            if r["arm"] not in colors:
                continue
            first_seed = r["seed"] == min(q["seed"] for q in result["runs"] if q["arm"] == r["arm"])
            ax.plot([c["step"] for c in r["curve"]], [c["repeat"] for c in r["curve"]], color=colors[r["arm"]],
                    alpha=0.8, lw=1.2, label=r["arm"] if first_seed else None)
        ax.axhline(result["runs"][0]["curve"][0]["first"], color="gray", ls=":", label="no copying (first half)")
        ax.set(xlabel="step (16 rows x 32 tokens)", title=f"{kinds[kind]}, one line per seed")
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("nats per token on the repeat")
    fig.suptitle(f"Copy onset ({len(result['seeds'])} seeds per arm)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def trained(tasks: list[tuple[str, int]], p: dict, jobs: int):
    """run_arm for every (arm, seed) in ``tasks``, yielded in order as they finish: in this process, or in
    ``jobs`` spawned worker processes."""
    if jobs == 1 or len(tasks) < 2:
        yield from (run_arm(arm, seed, p) for arm, seed in tasks)
        return
    with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(run_arm, *zip(*tasks), [p] * len(tasks))


def run(quick: bool = False, out_dir: str | None = None, seeds: list[int] | None = None,
        jobs: int | None = None, arms: list[str] | None = None) -> dict:
    """Train every arm from every seed (``jobs`` processes at a time; default one per core, at most 2) and write
    <out_dir>/copy_onset.json and .png."""
    p = dict(QUICK if quick else FULL)
    p["seeds"] = list(seeds) if seeds else p["seeds"]
    arms = list(arms or (ARMS if not quick else ["gpt-decoupled-rope", "glm5-classroom"]))
    if unknown := sorted(set(arms) - set(ARMS)):
        raise ValueError(f"arms: expected names from {sorted(ARMS)}, got unknown {unknown}")
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    out, t0 = Path(out_dir or "runs/experiments/copy-onset"), time.perf_counter()
    # one file per finished (arm, seed), so an interrupted run resumes; kept out of figures/ (runs/ is ignored)
    cache = Path("runs/experiments/copy-onset-runs") if out.resolve() == FIGURES_DIR.resolve() else out / f"{STEM}_runs"
    setting = {k: p[k] for k in ("steps", "eval_every", "batch", "eval_rows")}

    def setting_of(arm: str) -> dict:  # what a cached run must have been trained with to be reused
        kind, lr, options = ARMS[arm]
        return {**setting, "kind": kind, "lr": lr, "options": options}

    def cached(arm: str, seed: int) -> dict | None:
        f = cache / f"{arm}-seed{seed}.json"
        saved = json.loads(f.read_text()) if f.exists() else None
        return saved["run"] if saved and saved.get("setting") == setting_of(arm) else None

    done = {(a, s): r for a in arms for s in p["seeds"] if (r := cached(a, s)) is not None}
    tasks = sorted(((a, s) for s in p["seeds"] for a in arms if (a, s) not in done),
                   key=lambda t: ARMS[t[0]][0] != "glm5")  # the slow arms first
    if tasks:
        print(f"[copy-onset] {len(tasks)} runs to train, {len(done)} from {cache}", flush=True)
    for r in trained(tasks, p, jobs):
        write_json(cache / f"{r['arm']}-seed{r['seed']}.json", {"setting": setting_of(r["arm"]), "run": r})
        done[r["arm"], r["seed"]] = r
    runs = [done[a, s] for a in arms for s in p["seeds"]]
    result = {"task": {"rows": "16 random ids from RandomCopySampler's vocabulary, then the same 16",
                       "batch": p["batch"], "eval_rows": p["eval_rows"], "onset_gap_nats": ONSET_GAP},
              "arms": arms, "arm_lr": {a: ARMS[a][1] for a in arms}, "seeds": p["seeds"], "steps": p["steps"],
              "summary": summarize(runs, arms, p["steps"]), "runs": runs,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads_per_run": 1, "jobs": jobs,
                          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json(out / f"{STEM}.json", result)
    plot(result, out / f"{STEM}.png")
    for arm, s in result["summary"].items():
        print(f"[copy-onset] {arm}: started in {s['started']}/{s['seeds']} seeds, onsets {s['onsets']}")
    print(f"[copy-onset] wrote {out / STEM}.json and .png; the README's table:\n" + markdown(result), flush=True)
    return result


def markdown(result: dict) -> str:
    """The README's table of a result (python -c "...copy_onset import markdown; ...")."""
    lines = ["| arm | lr | parameters | started copying by step %d | onset step per seed | repeat loss at the end "
             "(mean, nats) |" % result["steps"], "|---|---|---|---|---|---|"]
    params = {r["arm"]: r["params"] for r in result["runs"]}
    for arm in result["arms"]:
        s = result["summary"][arm]
        onsets = ", ".join("-" if o is None else str(o) for o in s["onsets"])
        lines.append(f"| {arm} | {result['arm_lr'][arm]:g} | {params[arm] / 1e6:.1f}M | {s['started']} of "
                     f"{s['seeds']} | {onsets} | {s['final_repeat_mean']:.2f} |")
    return "\n".join(lines)
