"""`python -m glm5_ref recipe base`: GLM-5's pre-training recipe, run end to end at classroom scale.

GLM-5 (report section 2) pre-trains at short context, mid-trains with longer context on up-sampled long
documents and synthetic long-range data, then adapts to DSA: a dense warm-up that trains the lightning indexer
alone with the base frozen (1,000 steps), then sparse training of everything (20B tokens). MTP with three shared
depths trains throughout, and Muon Split updates the matrices. The same stages here, each one a run of the
training engine (training/run.py) that starts from the previous stage's weights:

    stage         context  what trains                              data                               DSA
    copy-warmup   32       everything, AdamW at a constant lr       the pure copy task (random spans   dense
                                                                    written twice; no corpus)
    pretrain      256      everything, Muon Split + AdamW, MTP x3   pretraining corpus (train split)   dense
    midtrain      1024     everything, lower lr, MTP x3             long documents up-sampled, related dense
                                                                    documents packed together
    dsa-warmup    1024     the indexers alone (KL to the attention) the same long stream               warmup
    dsa-sparse    1024     everything, top-k attention, MTP x3      the same long stream               sparse

The long stream (``long_stream``): the training documents reordered so that related files sit next to each other
in the token stream (a module, then its tests: ``json/decoder.py`` before ``test/test_json/test_decoder.py``), and
every document of 2,048 tokens or more twice. A window of 1,024 tokens that spans a module and its test then
holds long-range dependencies the short windows never see: the test calls functions defined far back (the
"interleaved packing of similar documents" of the paper's mid-training data, section 2.3, at file scale).

Copy data in every stage (training/synthetic.py): a quarter of the rows carry a span of the corpus written
twice (16 tokens up to half the window, at random places), and every evaluation logs the copy probe. The first
shipped base, trained without it, never learned to copy from its context (its loss on a repeated span was no
lower than on the first occurrence), which every post-training task needs; at 5-6M tokens natural code alone
does not make the mechanism form. GLM-5's mid-training mixes synthetic long-range data (section 2.3); here it
starts with pre-training. Measured 2026-12-02: with a quarter of the rows carrying copies, the recipe's own
pre-training still showed no copying by step 600 (probe 4.21 first / 4.17 repeat), and on the pure copy task
(training/synthetic.py, RandomCopySampler) the classroom model starts copying only after ~1,600 steps of 16 x 32
tokens (a plain GPT of the same width: ~550, ~800 with RoPE). The same classroom model without MoE and MTP
(first_k_dense_replace = 4, no MTP module) had not started by step 1,250, nor the full one with kv_lora_rank 256
by 900 or at lr 6e-3 by 1,100 (2026-12-02).
What decides is the learning rate, and lower is sooner (the full classroom model, fp32, AdamW at a constant lr
after 100 warm-up steps, 2026-12-02/03): at 5e-4 the repeat's loss leaves the plateau near step 650 (repeat / first
7.45 / 8.33 at 900, 4.13 / 8.34 at 1,600, 3.01 at 2,050); at 2.5e-4 near step 950; at 1e-3 nothing by 1,100; at
2e-3 nothing by 2,000 (the recipe's own stage, bf16, stopped); with a cosine from 2e-3 copying started near step
1,600, once the lr had decayed. Hence the first stage, ``copy-warmup``: 2,000 steps of the pure copy task at a
constant 5e-4, so that pre-training starts from a model that copies and its copy rows keep the mechanism while code
is learned. The second full run (``--cpu-bf16``, 2026-12-03) showed two things. Under bf16 autocast the warm-up
barely started (its loss left the plateau only near step 1,500: the pretrain stage's first probe read 8.77 first /
8.65 repeat). And pre-training at 8e-3 suppresses copying while the lr is high: the probe's gap (first - repeat)
was 0.03 nats at step 520, 0.07 at 1,040, 0.08 at 1,560 and grew only as the cosine decayed (0.16 at 2,080, 0.28 at
2,600, lr 8e-4), while validation reached 1.277 bits/byte (v1: 1.302). Hence pre-training's peak lr of 3e-3, and an
evaluation every 200 steps so that the probe shows early whether the warm-up's copying survives. The third run
(fp32 warm-up, then pre-training at 3e-3; stopped at pre-training step 480, resumable) answered neither hope: the
warm-up in fp32 left its plateau as late (near step 1,650 of 2,000; so bf16 was not the cause, and it stays as
fast), and pre-training's probe gap was 0.03 nats at steps 186 and 372, as at 8e-3 (its training loss matched the
8e-3 run's: 4.31 vs 4.38 at step 480). Worse, the pure copy task writes the repeat at a fixed offset
(synthetic.RandomCopySampler), so a positional head solves it without copying by content; at its step 2,000 the
probe on code was worse on the repeat (8.93) than on the first occurrence (8.33). Two pilots (2026-12-03, 1 thread,
throwaway scripts, not part of the recipe) found no faster route: random ids with a span repeated at random places
(content matching needed; 16 x 64 tokens, AdamW 5e-4 from scratch) showed no onset by step 1,500, and v2's
pre-trained model on code rows with half the rows of that task (Muon Split 8e-4) kept its gap at 0.28-0.34 nats
over 300 steps while its validation rose from 1.274 to 1.302 bits/byte. The warm-up stays as the one stage that
does start copying. Why the classroom model is so slow on it is open; ``experiment copy-onset`` measures it over
seeds against a plain GPT (synthetic.RandomCopySampler and the README summarise what it found).
The shipped classroom-base v1 was trained by the four stages without the warm-up (its model card lists them).

Each stage writes OUT/<nn>_<stage>/ (checkpoint/, log.jsonl) and is resumable: a finished stage is skipped, an
interrupted one resumes exactly where its last checkpoint left it (``--resume``). The budgets are in steps, so the
recipe is the same on a busy or an idle machine (only the wall time differs). OUT/recipe.json records the stages,
their tokens, wall time and final validation numbers. ``--cpu-bf16`` trains under bf16 autocast on the CPU
(RunOptions.cpu_bf16: about 1.3x less CPU per step where the CPU has AMX / AVX512-BF16). ``--quick`` runs the
same stages on the tiny config for a few steps (CI). ``ship`` (python -m glm5_ref recipe ship) exports the final
stage to the shipped layout (glm5_ref/assets/checkpoints/classroom-base/, apps/model_card.py measures and writes
the card).

Choices where the paper is silent or does not fit a CPU: the lengths (256 and 1,024 instead of 4K and 32K-200K);
the token budgets (set by a two-hour CPU budget: a classroom step with MTP x3 costs ~2.3 s for 2,048 tokens on 2
cores); Muon Split at lr 3e-3 ("match_rms_adamw", so AdamW shares it; v1 and v2 used 8e-3) with a 3% warm-up and a
cosine to 10%; mid-training from where pre-training's cosine ended (3e-4, then a cosine to 10% of it); the indexer
warm-up at lr 1e-3 (AdamW, the base frozen); sparse adaptation at half the mid-training lr; MTP loss weight 0.3
(config.mtp_loss_weight, GLM-4.5's; the paper gives none). The first full run re-warmed mid-training to 2.5e-3 and
sparse adaptation to 1e-3: the 256-token validation loss rose from 1.367 to 1.478 bits/byte in mid-training
(forgetting, not a longer-context gain: at 512 tokens it reached 1.523) and the shipped model measured 1.547 on the
test windows; continuing from the decayed lr is the usual practice for mid-training and annealing. Not done:
contexts beyond 1,024 (the classroom model's positions go to 4,096, but a 4K step costs ~4x a 1K step here),
MRCR-style synthetic recall data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.devices import resolve_device
from glm5_ref.training.checkpoint import find_checkpoint, read_trainer_state
from glm5_ref.training.data import CorpusSplits, Split, build_splits
from glm5_ref.training.options import resolve_config
from glm5_ref.training.run import train

DEFAULT_OUT = Path("runs") / "recipe-base"


@dataclass(frozen=True)
class Stage:
    name: str
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    dsa_stage: str            # "dense", "warmup" or "sparse" (training.engine.set_dsa_stage)
    data: str                 # "short": the pretraining corpus as it is; "long": long_stream(); "copy": the pure
                              # copy task (synthetic.RandomCopySampler; validation on the corpus)
    optimizer: str = "muon_split"
    warmup: float = 0.03
    min_lr_ratio: float = 0.1
    repeat: float = 0.25      # rows with a span written twice (training/synthetic.py: the copy data)
    evals: int = 4            # evaluations (validation and the copy probe) over the stage


FULL = (
    Stage("copy-warmup", 32, 16, 2000, 5e-4, "dense", "copy", optimizer="adamw", warmup=0.05, min_lr_ratio=1.0,
          repeat=0.0),
    Stage("pretrain", 256, 8, 2600, 3e-3, "dense", "short", evals=13),
    Stage("midtrain", 1024, 2, 150, 3e-4, "dense", "long"),
    Stage("dsa-warmup", 1024, 2, 100, 1e-3, "warmup", "long", optimizer="adamw", warmup=0.1, min_lr_ratio=1.0),
    Stage("dsa-sparse", 1024, 2, 150, 1.5e-4, "sparse", "long", warmup=0.1),
)
QUICK = (
    Stage("copy-warmup", 32, 4, 4, 2e-3, "dense", "copy", optimizer="adamw", warmup=0.25, min_lr_ratio=1.0,
          repeat=0.0),
    Stage("pretrain", 64, 4, 8, 1e-2, "dense", "short"),
    Stage("midtrain", 128, 2, 4, 3e-3, "dense", "long"),
    Stage("dsa-warmup", 128, 2, 4, 1e-3, "warmup", "long", optimizer="adamw", warmup=0.25, min_lr_ratio=1.0),
    Stage("dsa-sparse", 128, 2, 4, 1e-3, "sparse", "long", warmup=0.25),
)


def _module_key(path: str) -> str:
    """The module a file belongs to: json/decoder.py -> json.decoder; test/test_json/test_decoder.py ->
    json.decoder; test/test_argparse.py -> argparse (tests point at what they test)."""
    parts = path[:-3].split("/") if path.endswith(".py") else path.split("/")
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    if parts and parts[0] == "test":
        parts = [p[5:] if p.startswith("test_") else p for p in parts[1:]]
    return ".".join(p for p in parts if p) or path


def long_stream(train: Split, min_long_tokens: int = 2048, seed: int = 0) -> Split:
    """The mid-training stream (module docstring): documents grouped by the module they belong to (modules before
    their tests), groups in a seeded random order, every document of >= min_long_tokens tokens twice."""
    ends = train.doc_offsets[1:] + [len(train)]
    docs = [(name, train.ids[a:b]) for name, a, b in zip(train.doc_names, train.doc_offsets, ends)]
    groups: dict[str, list] = {}  # top-level module -> its files and their tests
    for name, ids in docs:
        groups.setdefault(_module_key(name).split(".")[0], []).append((name.startswith("test/"), name, ids))
    keys = sorted(groups)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    pieces, names, offsets, n = [], [], [], 0
    for i in order:
        for _, name, ids in sorted(groups[keys[i]], key=lambda d: (d[0], d[1])):  # modules first, then tests
            for _ in range(2 if len(ids) >= min_long_tokens else 1):
                pieces.append(ids)
                names.append(name)
                offsets.append(n)
                n += len(ids)
    return Split(torch.cat(pieces), names, offsets, train.num_bytes)


def stage_dir(out: Path, i: int, stage: Stage) -> Path:
    return out / f"{i + 1:02d}_{stage.name}"


def run_recipe(quick: bool = False, out_dir: str | os.PathLike | None = None, resume: bool = False,
               progress: bool = True, config: GLM5Config | None = None, device: str | None = None,
               cpu_bf16: bool = False) -> dict:
    """Run (or resume) every stage; returns the summary written to OUT/recipe.json. ``device``: where every
    stage trains (training.run's device option: None = the CPU; "auto", "cuda", "mps": bf16 autocast there).
    ``cpu_bf16``: the CPU's training steps under bf16 autocast too (RunOptions.cpu_bf16; the shipped run's)."""
    out = Path(out_dir) if out_dir is not None else (DEFAULT_OUT.with_name("recipe-base-quick") if quick else DEFAULT_OUT)
    stages = QUICK if quick else FULL
    cfg = config if config is not None else resolve_config("tiny" if quick else "classroom")
    if out.exists() and any(out.iterdir()) and not resume:
        raise ValueError(f"out_dir {os.fspath(out)} already holds a recipe run: continue it with --resume, or "
                         "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    pre = build_splits(corpus="pretrain")
    data = {"short": pre, "long": CorpusSplits(long_stream(pre.train), pre.val, pre.test), "copy": pre}
    summary = {"recipe": "base", "quick": quick, "config": cfg.name, "stages": [], "started": time.time(),
               "device": str(resolve_device(device or "cpu")), "cpu_bf16": cpu_bf16}
    previous = None
    for i, st in enumerate(stages):
        folder = stage_dir(out, i, st)
        info = read_trainer_state(folder)
        if info.get("finished"):
            print(f"[recipe] {st.name}: finished earlier ({info['step']} steps), skipped")
        else:
            print(f"[recipe] stage {i + 1}/{len(stages)} {st.name}: {st.steps} steps of {st.batch_size} x "
                  f"{st.seq_len} tokens, {st.dsa_stage} attention, {st.optimizer} lr {st.lr:g}")
            train(cfg, folder, steps=st.steps, batch_size=st.batch_size, seq_len=st.seq_len, lr=st.lr,
                  optimizer=st.optimizer, warmup=st.warmup, min_lr_ratio=st.min_lr_ratio, dsa_stage=st.dsa_stage,
                  num_evals=st.evals, eval_windows_n=8 if quick else 48, eval_batch_size=8,
                  init_from=None if previous is None else os.fspath(previous), resume=bool(info),
                  overwrite=not info, progress=progress, splits=data[st.data], checkpoint_minutes=5.0,
                  device=device, repeat_fraction=st.repeat, copy_probe=8 if quick else 32, cpu_bf16=cpu_bf16,
                  random_copy=st.data == "copy")
            info = read_trainer_state(folder)
        summary["stages"].append({**dataclasses.asdict(st), "tokens": info["tokens"], "train_s": info["elapsed_s"],
                                  "final_eval": info.get("last_eval", {}), "checkpoint": os.fspath(folder)})
        previous = find_checkpoint(folder)
    summary["tokens"] = sum(s["tokens"] for s in summary["stages"])
    summary["train_s"] = sum(s["train_s"] for s in summary["stages"])
    summary["final_checkpoint"] = os.fspath(previous)
    tmp = out / "recipe.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(out / "recipe.json")
    print(f"[recipe] done: {summary['tokens']:,} tokens in {summary['train_s'] / 60:.1f} min of training; "
          f"final checkpoint {summary['final_checkpoint']}")
    return summary
