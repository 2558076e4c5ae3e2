"""`python -m glm5_ref demo` (make demo): GLM-5 from its config, the shipped classroom model, a live training run.

Parts, in order
    1. the tour (tour.run_tour): GLM-5's parameter and cache budgets, from the config alone (seconds);
    2. the shipped classroom-base model (glm5_ref.load_pretrained; trained by ``python -m glm5_ref recipe base``,
       GLM-5's pre-training recipe at classroom scale, about two hours on 2 CPU cores), in seconds:
         code completions of a few Python prompts (greedy);
         speculative decoding with its MTP layer: accept length, acceptance by depth, the speed-up over plain
           cached decoding, and the check that both emit the same ids;
         dense vs DSA on a long held-out document: keys each query attends to, time of the forward, and how
           often the two agree on the next token;
    3. a fresh classroom GLM-5 trained live, the first minutes of the same recipe's pre-training stage (Muon
       Split, MTP over 3 depths, a fixed number of steps, so the same tokens whatever the machine's load; the bar
       shows the ETA), then compared with the shipped model on the same held-out windows; a finished run in
       runs/classroom/ is reused (``--fresh`` trains again), an interrupted one resumed;
    4. figures of the live run (loss, bits/byte, expert load) in runs/demo/ (never over tracked files);
    5. a summary table.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from glm5_ref.speculative import speculative_generate
from glm5_ref.training.checkpoint import find_checkpoint, read_log, read_trainer_state
from glm5_ref.training.options import resolve_config
from glm5_ref.training.run import load_model, train

# The live run: the recipe's pre-training stage (apps/recipe.py FULL[1]) for its first 110 steps.
DEMO_TRAIN = dict(
    steps=110,                   # 110 x 8 x 256 = 225,280 tokens: about 4.5 minutes on 2 cores
    batch_size=8, seq_len=256,
    optimizer="muon_split",      # GLM-5's optimizer: Muon Split on the matrices, AdamW on the rest
    lr=8e-3, warmup=0.05,        # the recipe's peak lr; the cosine runs over these 110 steps
    dsa_stage="dense",           # pre-training is dense: the indexer is trained later (recipe stages 3-4)
    num_evals=5, eval_windows_n=32,
)
QUICK_TRAIN = DEMO_TRAIN | dict(steps=4, batch_size=2, seq_len=32, num_evals=1, eval_windows_n=2)

# Each prompt ends where a line's text starts: the tokenizer makes "\n" + indentation ONE token, so a prompt ending
# in a bare "\n" would tell the model that the next line starts at column 0.
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    ',
    "import os\n\n\ndef list_python_files(path):\n    ",
    "class Stack:\n    def __init__(self):\n        self.",
    "def read_lines(filename):\n    with open(filename) as f:\n        ",
]
RULE = "=" * 100


def complete(model, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 0.95,
             seed: int = 0) -> str:
    """The model's continuation of ``prompt`` (text only, without the prompt), stopping at end-of-text."""
    from glm5_ref.devices import model_device
    from glm5_ref.tokenizer import EOT_ID, decode, encode

    ids = encode(prompt)
    if not ids:
        raise ValueError("prompt: expected a non-empty string")
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    prompt = torch.tensor([ids], device=model_device(model))  # (1, T) where the model is
    out = model.generate(prompt, max_new_tokens, temperature=temperature, top_p=top_p, stop_tokens=[EOT_ID],
                         seed=seed)[0, len(ids):].tolist()
    return decode(out[:out.index(EOT_ID)] if EOT_ID in out else out)


@torch.no_grad()
def speculative_numbers(model, prompts: list[torch.Tensor], new: int = 128) -> dict:
    """Speculative decoding with the MTP layer (3 drafts per round, greedy) against plain cached decoding on
    ``prompts`` ((1, T) each; the order alternates so neither side always runs warm): accept length, acceptance
    by depth (None for a depth never tried), speed-up, tokens/s, identical ids (the model card's protocol)."""
    speculative_generate(model, prompts[0][:, :16], 8, 3)  # warm-up
    t_plain = t_spec = 0.0
    identical, lengths, tries, accepts = True, [], [0, 0, 0], [0, 0, 0]
    for i, p in enumerate(prompts):
        order = ("plain", "spec") if i % 2 == 0 else ("spec", "plain")
        for kind in order:
            t0 = time.perf_counter()
            if kind == "plain":
                plain = model.generate(p, new)
                t_plain += time.perf_counter() - t0
            else:
                spec, stats = speculative_generate(model, p, new, 3)
                t_spec += time.perf_counter() - t0
        identical &= torch.equal(plain, spec)
        lengths += stats.accept_lengths
        tries = [a + b for a, b in zip(tries, stats.depth_tries)]
        accepts = [a + b for a, b in zip(accepts, stats.depth_accepts)]
    return {"accept_length": sum(lengths) / len(lengths), "acceptance_by_depth": [a / t if t else None
                                                                                  for a, t in zip(accepts, tries)],
            "speedup": t_plain / t_spec, "plain_tok_s": len(prompts) * new / t_plain,
            "spec_tok_s": len(prompts) * new / t_spec, "identical": bool(identical), "prompts": len(prompts),
            "new_tokens": new, "threads": torch.get_num_threads()}


def speculative_stats(model, prompt: str, max_new_tokens: int = 48) -> dict | None:
    """speculative_numbers on one prompt; None when the model has no MTP layer."""
    if model.mtp is None:
        return None
    from glm5_ref.tokenizer import encode

    return speculative_numbers(model, [torch.tensor([encode(prompt)])], max_new_tokens)


@torch.no_grad()
def dense_vs_dsa(model, length: int = 1024, scored: int = 256) -> dict:
    """One held-out test document of ``length`` tokens through the model with DSA (its top-k keys) and dense:
    keys attended per query (mean), forward time, top-1 agreement and KL(dense || DSA) over the last ``scored``
    positions."""
    from glm5_ref.training.data import build_splits

    length = min(length, model.config.max_position_embeddings)
    ids = build_splits(corpus="pretrain").test.ids[:length][None]  # (1, L)
    out = {}
    for name, sparse in (("dsa", True), ("dense", False)):
        t0 = time.perf_counter()
        out[name] = model(ids, execution=model.execution.replace(sparse=sparse)).logits[0, -scored:]  # (S, V)
        out[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3
    k = model.config.index_topk
    logp_d, logp_s = out["dense"].log_softmax(-1), out["dsa"].log_softmax(-1)
    return {"length": length, "index_topk": k,
            "keys_dsa": sum(min(k, t + 1) for t in range(length)) / length,
            "keys_dense": (length + 1) / 2, "dsa_ms": out["dsa_ms"], "dense_ms": out["dense_ms"],
            "top1_agreement": float((out["dense"].argmax(-1) == out["dsa"].argmax(-1)).float().mean()),
            "kl_dense_dsa": float((logp_d.exp() * (logp_d - logp_s)).sum(-1).mean())}


def _section(title: str) -> None:
    print("\n" + RULE + "\n" + title + "\n" + RULE)


def show_shipped(quick: bool, directory=None) -> dict:
    """Part 2 (module docstring): the shipped model, in seconds. Returns what it printed, as numbers."""
    from glm5_ref.pretrained import load_pretrained, read_metrics

    model, _ = load_pretrained(directory=directory)
    card = read_metrics(directory if directory is not None else "classroom-base")
    print(f"glm5_ref.load_pretrained('classroom-base'): {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, trained on {card['recipe']['tokens']:,} tokens by the recipe (pre-train, mid-train, DSA "
          f"warm-up, sparse adaptation); test {card['test_bpb']:.3f} bits/byte (model card: "
          "glm5_ref/assets/checkpoints/classroom-base/README.md)")
    b, e = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")  # the model's text in bold
    for prompt in PROMPTS[:1] if quick else PROMPTS:
        print(f"--- greedy ---\n{prompt}{b}{complete(model, prompt, 12 if quick else 40)}{e}")
    spec = speculative_stats(model, PROMPTS[0], 16 if quick else 96)
    print(f"speculative decoding (3 MTP drafts per round, greedy): accept length {spec['accept_length']:.2f}, by "
          f"depth {', '.join('-' if a is None else f'{a:.2f}' for a in spec['acceptance_by_depth'])}; "
          f"{spec['speedup']:.2f}x plain cached decoding on this prompt; identical ids: {spec['identical']}")
    dd = dense_vs_dsa(model, 128 if quick else 1024, 32 if quick else 256)
    print(f"dense vs DSA on a held-out document of {dd['length']} tokens: each query attends to {dd['keys_dsa']:.0f} "
          f"keys on average with DSA (top-{dd['index_topk']}) against {dd['keys_dense']:.0f} dense; forward "
          f"{dd['dsa_ms']:.0f} vs {dd['dense_ms']:.0f} ms; the next token agrees at {dd['top1_agreement']:.0%} of "
          f"the last positions, KL(dense || DSA) = {dd['kl_dense_dsa']:.3f} nats")
    return {"model": model, "card": card, "speculative": spec, "dense_vs_dsa": dd}


def train_live(cfg, out_dir: str, recipe: dict, fresh: bool, quick: bool, seed: int) -> bool:
    """Part 3: train (or reuse / resume) the live run; returns True if a finished run was reused."""
    info = read_trainer_state(out_dir)
    same = info.get("args", {}).get("config") == cfg.name and info.get("args", {}).get("steps") == recipe["steps"]
    if info.get("finished") and same and not fresh:
        print(f"reusing the finished run in {out_dir}: {info['step']} steps, {info['tokens']:,} tokens, "
              f"{info['elapsed_s'] / 60:.1f} min of training (delete the folder or pass --fresh to train again)")
        return True
    resume = bool(info) and not info.get("finished") and same and not fresh
    print(f"{'resuming the interrupted run' if resume else 'training'} in {out_dir}: {recipe['steps']} steps of "
          f"{recipe['batch_size']} x {recipe['seq_len']} tokens on the pretraining corpus, Muon Split lr "
          f"{recipe['lr']:g}, MTP over {cfg.num_mtp_depths} depths (Ctrl-C saves a checkpoint; the next demo resumes)")
    from glm5_ref.training.data import build_splits

    train(cfg, out_dir, seed=seed, resume=resume, overwrite=True, progress=not quick,
          splits=build_splits(corpus="pretrain"), **recipe)
    return False


def run_demo(config: str = "classroom", steps: int | None = None, out_dir: str = os.path.join("runs", "classroom"),
             figures_dir: str = os.path.join("runs", "demo"), fresh: bool = False, quick: bool = False,
             seed: int = 0, shipped_dir=None, **overrides) -> dict:
    """The main job (see the module docstring). Returns the summary as a dict."""
    from glm5_ref.apps.plots import plot_expert_load, plot_training
    from glm5_ref.apps.tour import run_tour
    from glm5_ref.training.data import build_splits, eval_windows, evaluate, token_byte_lengths, uniform_bpb

    t_start = time.perf_counter()
    cfg = resolve_config("tiny" if quick and config == "classroom" else config)
    recipe = dict(QUICK_TRAIN if quick else DEMO_TRAIN) | overrides | ({"steps": steps} if steps else {})
    _section("1. GLM-5 at a glance")
    run_tour(figures_dir=figures_dir)
    _section("2. The shipped classroom GLM-5 (trained by GLM-5's recipe, glm5_ref/assets/checkpoints/classroom-base)")
    shipped = show_shipped(quick, shipped_dir)
    _section(f"3. Training a fresh classroom GLM-5 ({cfg.name} preset) live, then comparing it with the shipped one")
    reused = train_live(cfg, out_dir, recipe, fresh, quick, seed)
    info, records, live = read_trainer_state(out_dir), read_log(out_dir), load_model(out_dir)
    test = build_splits(corpus="pretrain").test.ids
    windows = eval_windows(test, min(256, cfg.max_position_embeddings - 1), 4 if quick else 32)
    scores = {name: evaluate(m, windows, batch_size=8, byte_lengths=token_byte_lengths(m.config.vocab_size))["bpb"]
              for name, m in (("live", live), ("shipped", shipped["model"]))}
    print(f"held-out test bits/byte on the same {windows.shape[0]} windows: live run {scores['live']:.3f} after "
          f"{info['tokens']:,} tokens; shipped model {scores['shipped']:.3f} after "
          f"{shipped['card']['recipe']['tokens']:,} (uniform guess: {uniform_bpb(windows, cfg.vocab_size):.2f})")
    print(f"--- the live model, greedy ---\n{PROMPTS[0]}{complete(live, PROMPTS[0], 12 if quick else 40)}")
    _section("4. Figures")
    for png in (plot_training(records, os.path.join(figures_dir, "live_loss.png"), uniform=uniform_bpb(windows),
                              title=f"live run: {info['tokens']:,} tokens in {info['elapsed_s'] / 60:.1f} min"),
                plot_expert_load(records, os.path.join(figures_dir, "live_expert_load.png"),
                                 title="aux-loss-free balancing: tokens per expert / mean, over training")):
        print(f"figure written: {png}")
    wall = time.perf_counter() - t_start
    spec, dd = shipped["speculative"], shipped["dense_vs_dsa"]
    summary = {"config": cfg.name, "steps": info["step"], "tokens": info["tokens"], "reused": reused,
               "train_minutes": info["elapsed_s"] / 60, "demo_minutes": wall / 60, "live_test_bpb": scores["live"],
               "shipped_test_bpb": scores["shipped"], "speculative": spec, "dense_vs_dsa": dd}
    _section("5. Summary")
    rows = [("shipped model", f"{shipped['card']['test_bpb']:.3f} test bits/byte (card); {scores['shipped']:.3f} here"),
            ("speculative decoding", f"accept length {spec['accept_length']:.2f}, {spec['speedup']:.2f}x, identical "
                                     f"ids: {spec['identical']}"),
            ("DSA vs dense", f"{dd['keys_dsa']:.0f} vs {dd['keys_dense']:.0f} keys per query, next token agrees "
                             f"{dd['top1_agreement']:.0%}"),
            ("live run", f"{info['tokens']:,} tokens, {info['step']} steps, {summary['train_minutes']:.1f} min "
                         f"({'reused' if reused else 'this run'}): {scores['live']:.3f} test bits/byte"),
            ("demo wall time", f"{summary['demo_minutes']:.1f} min"),
            ("checkpoint", os.fspath(find_checkpoint(out_dir)))]
    w = max(len(k) for k, _ in rows)
    print("\n".join(f"  {k:<{w}}  {v}" for k, v in rows))
    return summary
