"""`python -m glm5_ref recipe ship`: measure the recipe's final model and ship it with its model card.

What it writes (atomically: a staging folder, then a rename), glm5_ref/assets/checkpoints/classroom-base/:
    config.json         the released Hugging Face layout (GLM5Config.to_hf)
    model.safetensors   the weights in bf16 (one file; about 33 MB for 16.6M parameters)
    metrics.json        every measured number, the recipe's stages, and the sha256 of model.safetensors
    README.md           the model card: recipe, tokens per stage, wall time, machine, seed, the numbers, sha256

What it measures, on the pretraining corpus's held-out TEST documents (never trained on, never used to choose
anything), with the shipped bf16 weights loaded in fp32:
    test_bpb / val_bpb      bits per byte on fixed windows of 512 tokens, the model's own (sparse) attention
    dense vs DSA            bits per byte on 1,024-token windows (where top-128 selects): the final model sparse,
                            the same model dense, and the mid-training checkpoint (dense, before DSA) dense
    speculative decoding    3 MTP drafts per round, greedy, on held-out code prompts (96 tokens of a test
                            document from its first def/class line, 128 new tokens): accept length, acceptance
                            by depth, and the speed-up over plain cached greedy decoding timed back to back
                            (alternating order), with the check that both emit the same ids
    completions             greedy completions of the demo's prompts
    copy probe              nats per token on 64 held-out spans of 96 tokens and on their repeat right after
                            (training/synthetic.py): whether the model copies from its context, which every
                            post-training task needs (the first shipped model did not: 3.48 first, 3.37 repeat)
    check_bpb               bits per byte on the first 4 validation windows of 128 tokens: what the test of the
                            shipped checkpoint (tests/test_pretrained.py) recomputes, to 0.01
    check_copy              the copy probe on 8 validation spans of 64, recorded for the same test to recompute
                            (the first shipped checkpoint predates it, so that test does not check it yet)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from glm5_ref.apps.demo import PROMPTS, complete, speculative_numbers
from glm5_ref.pretrained import CHECKPOINTS, REBUILD, write_shipped
from glm5_ref.tokenizer import encode
from glm5_ref.training.checkpoint import find_checkpoint, read_trainer_state
from glm5_ref.training.data import build_splits, eval_windows, evaluate, token_byte_lengths
from glm5_ref.training.run import load_model
from glm5_ref.training.synthetic import copy_probe


CHECK_LEN = 128  # the check windows' length: what tests/test_pretrained.py recomputes
CHECK_COPY = dict(n=8, span=64)  # the copy probe it recomputes (on the validation stream)


def held_out_prompts(n: int, length: int = 96) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens: each test document's text from its first top-level def/class on."""
    from glm5_ref.tokenizer import corpus_split3, pretrain_documents

    prompts = []
    for _, text in corpus_split3(pretrain_documents())[2]:
        starts = [i for i in (text.find("\ndef "), text.find("\nclass ")) if i >= 0]
        ids = encode(text[min(starts) + 1:]) if starts else []
        if len(ids) >= length:
            prompts.append(torch.tensor([ids[:length]]))
        if len(prompts) == n:
            return prompts
    raise ValueError(f"n: only {len(prompts)} test documents have {length} tokens of code, asked for {n}")


def bpb(model, windows, sparse: bool | None = None, score_from: int = 0) -> float:
    if sparse is not None:
        model = _with_attention(model, sparse)
    return evaluate(model, windows, batch_size=8, byte_lengths=token_byte_lengths(model.config.vocab_size),
                    score_from=score_from)["bpb"]


def _with_attention(model, sparse: bool):
    model.set_execution(sparse=sparse)
    return model


def measure(final_dir, dense_dir, quick: bool = False) -> dict:
    """Every number of the card (module docstring) for the checkpoint in ``final_dir`` (fp32 from bf16)."""
    model = load_model(final_dir)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})  # as shipped
    dense = load_model(dense_dir)
    dense.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in dense.state_dict().items()})
    pre = build_splits(corpus="pretrain")
    n = 4 if quick else 64
    w512 = [eval_windows(s.ids, min(512, model.config.max_position_embeddings - 1), n) for s in (pre.test, pre.val)]
    L = min(1024, model.config.max_position_embeddings - 1)
    w1k = eval_windows(pre.test.ids, L, 2 if quick else 32)
    sparse_native = model.execution.sparse
    short = min(256, w512[0].shape[1] // 2)  # the pre-training context
    out = {"test_bpb": bpb(model, w512[0]), "val_bpb": bpb(model, w512[1]),
           "test_bpb_256": bpb(model, eval_windows(pre.test.ids, short, n)),
           "test_bpb_beyond_256": bpb(model, w512[0], score_from=short),
           "check_bpb": bpb(model, eval_windows(pre.val.ids, CHECK_LEN, 4)),
           "copy_probe": copy_probe(model, pre.test.ids, n=8 if quick else 64, span=min(96, short)),
           "check_copy": copy_probe(model, pre.val.ids, **CHECK_COPY),
           "dsa_vs_dense": {"context": L, "dsa_bpb": bpb(model, w1k, sparse=True),
                            "same_model_dense_bpb": bpb(model, w1k, sparse=False),
                            "before_dsa_dense_bpb": bpb(dense, w1k, sparse=False)}}
    out["dsa_vs_dense"]["gap"] = out["dsa_vs_dense"]["dsa_bpb"] - out["dsa_vs_dense"]["before_dsa_dense_bpb"]
    _with_attention(model, sparse_native)
    out["speculative"] = speculative_numbers(model, held_out_prompts(2 if quick else 8), 16 if quick else 128)
    out["completions"] = {p: complete(model, p, 12 if quick else 40) for p in PROMPTS}
    out["attention"] = "sparse" if sparse_native else "dense"
    return out


def training_curve(recipe: dict) -> list[dict]:
    """Every evaluation of every stage: stage name, tokens since the start of the recipe, validation bits/byte."""
    from glm5_ref.training.checkpoint import read_log

    curve, before = [], 0
    for st in recipe["stages"]:
        for r in read_log(st["checkpoint"]):
            if r["kind"] == "eval":
                curve.append({"stage_name": st["name"], "tokens_total": before + r["tokens"], "val_bpb": r["val_bpb"],
                              "val_loss": r["val_loss"]})
        before += st["tokens"]
    return curve


def _markdown(m: dict) -> str:
    rows = "\n".join(f"| {s['name']} | {s['seq_len']} | {s['batch_size']} | {s['steps']} | {s['tokens']:,} | "
                     f"{s['dsa_stage']} | {s['optimizer']} {s['lr']:g} | {s['train_s'] / 60:.1f} | "
                     f"{s['final_eval'].get('val_bpb', float('nan')):.3f} |" for s in m["recipe"]["stages"])
    d, sp, cp = m["dsa_vs_dense"], m["speculative"], m["copy_probe"]
    comp = "\n\n".join(f"```python\n{p}{c}\n```" for p, c in m["completions"].items())
    return f"""# classroom-base: a classroom GLM-5 trained by GLM-5's own recipe

A {m['params'] / 1e6:.1f}M-parameter GLM-5 (the `{m['config']}` preset: MLA, DSA with top-{m['index_topk']} keys, a
{m['experts']}-expert sigmoid-routed MoE, one MTP layer shared over 3 depths), trained on 2 CPU cores by
`python -m glm5_ref recipe base` and written here by `python -m glm5_ref recipe ship` (glm5_ref/apps/recipe.py).
Load it with `model, tokenizer = glm5_ref.load_pretrained("classroom-base")`.

## Recipe ({m['recipe']['tokens']:,} tokens, {m['recipe']['train_s'] / 60:.0f} min of training, seed {m['seed']})

| stage | context | batch | steps | tokens | attention | optimizer, peak lr | minutes | val bits/byte at its end |
|---|---|---|---|---|---|---|---|---|
{rows}

Data: the pretraining corpus (every pure-Python file of CPython {m['python']}'s standard library with its test
suite, PSF-2.0; 1,602 documents split by document into train / validation / test); mid-training and the DSA
stages read the long stream (related files packed together, long documents twice). Machine: {m['machine']}.

## Measured on held-out test documents ({m['measured']})

| | |
|---|---|
| test bits/byte (512-token windows, its own sparse attention) | **{m['test_bpb']:.3f}** (validation {m['val_bpb']:.3f}) |
| test bits/byte at the pre-training context (256-token windows) | **{m['test_bpb_256']:.3f}** |
| test bits/byte of the tokens after the first 256 of each 512-token window | {m['test_bpb_beyond_256']:.3f} (mid-training's 1K context is learned from {next(s['tokens'] for s in m['recipe']['stages'] if s['name'] == 'midtrain'):,} tokens only) |
| copy probe: nats per token on {cp['spans']} held-out spans of {cp['span_tokens']} tokens, then on their repeat | first **{cp['first']:.2f}**, repeat **{cp['repeat']:.2f}** |
| DSA vs dense at {d['context']} tokens | DSA {d['dsa_bpb']:.3f}, the same model dense {d['same_model_dense_bpb']:.3f}, before DSA (dense) {d['before_dsa_dense_bpb']:.3f}: gap {d['gap']:+.3f} |
| speculative decoding, 3 MTP drafts, greedy ({sp['prompts']} prompts x {sp['new_tokens']} tokens) | accept length **{sp['accept_length']:.2f}**, acceptance by depth {', '.join('-' if a is None else f'{a:.2f}' for a in sp['acceptance_by_depth'])}; **{sp['speedup']:.2f}x** plain cached decoding ({sp['spec_tok_s']:.0f} vs {sp['plain_tok_s']:.0f} tokens/s, {sp['threads']} threads); identical ids: {sp['identical']} |

Greedy completions of the demo's prompts:

{comp}

## Files

`model.safetensors` (bf16), sha256 `{m['sha256']}`; `config.json`; `metrics.json` (every number above).
"""


def ship(run_dir=None, quick: bool = False, dest=None) -> dict:
    """Measure the recipe run in ``run_dir`` and write the shipped checkpoint to ``dest`` (module docstring)."""
    from glm5_ref.apps.recipe import DEFAULT_OUT

    run = Path(run_dir) if run_dir is not None else (DEFAULT_OUT.with_name("recipe-base-quick") if quick else DEFAULT_OUT)
    if not (run / "recipe.json").is_file():
        raise ValueError(f"{os.fspath(run)}: no finished recipe run (recipe.json); run python -m glm5_ref recipe base "
                         f"{'--quick ' if quick else ''}first")
    recipe = json.loads((run / "recipe.json").read_text())
    final = find_checkpoint(recipe["final_checkpoint"])
    before_dsa = find_checkpoint(next(s["checkpoint"] for s in recipe["stages"] if s["name"] == "midtrain"))
    metrics = measure(final, before_dsa, quick)
    model = load_model(final)
    dest = Path(dest) if dest is not None else CHECKPOINTS / "classroom-base"
    info = read_trainer_state(final)
    metrics.update(curve=training_curve(recipe), seed=info.get("args", {}).get("seed", 0), recipe=recipe,
                   config=recipe["config"])
    metrics = write_shipped(model, dest, metrics, _markdown, REBUILD["classroom-base"])
    print(f"[ship] wrote {os.fspath(dest)}: test {metrics['test_bpb']:.3f} bits/byte, accept length "
          f"{metrics['speculative']['accept_length']:.2f}, sha256 {metrics['sha256'][:16]}...")
    return metrics
