"""A trained classroom GLM-5 with its MTP layer, for the speculative-decoding benchmark and notebook 05.

Speculative decoding needs a model whose MTP drafts mean something: random weights accept nothing. This module
finds one, or trains one in a bounded number of minutes:

    1. runs/classroom/      the demo's run (``python -m glm5_ref demo``), if it finished and has an MTP layer;
    2. runs/spec_bench/X/   a model this module trained before (X = "full" or "quick");
    3. otherwise it trains one (``train_mtp_model``) and saves it to runs/spec_bench/X/ for the next time.

The training runs on the engine (training/engine.py ``Trainer``; training/run.py is the full classroom run,
with evaluation, checkpoints and exact resume): the shipped corpus's training split (``tokenizer.corpus_split``,
by document), encoded and joined with EOT; random windows of seq_len + 1 tokens (data.BatchSampler); AdamW
(0.9, 0.95, weight decay 0.1) with a 5% warm-up and a cosine to 10% that ends with the time budget; per step

    loss = out.loss = L_LM + L_bal + (lambda / 3) * (L_MTP^1 + L_MTP^2 + L_MTP^3)     (model.py, mtp.py)
    clip the gradient norm at 1; AdamW step; model.update_router_biases(out.tokens_per_expert)

Attention is dense MLA (the "dense" DSA stage, Execution(sparse=False)): the indexer is not trained here, and an
untrained indexer would pick the keys of sequences longer than index_topk at random. The choice is stored as
``"attention": "dense"`` in trainer_state.json, as run.py does, so training.run.load_model reads these too. Paths are relative to the repository root, not the working
directory (notebooks run in notebooks/).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.training.data import BatchSampler
from glm5_ref.training.engine import Trainer, set_dsa_stage

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "runs"
CLASSROOM_RUN = RUNS / "classroom"
SPEC_BENCH_RUN = RUNS / "spec_bench"
INFO_FILE = "trainer_state.json"


def corpus_stream(split: str = "train") -> torch.Tensor:
    """The training (or validation) documents of the shipped corpus as one id stream: doc EOT doc EOT ... (N,)."""
    from glm5_ref.tokenizer import EOT_ID, corpus_split, load_tokenizer

    if split not in ("train", "val"):
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")
    enc = load_tokenizer()
    docs = corpus_split()[0 if split == "train" else 1]
    ids: list[int] = []
    for _, text in docs:
        ids += enc.encode(text, disallowed_special=()) + [EOT_ID]
    return torch.tensor(ids, dtype=torch.long)


def code_prompts(n: int, length: int = 96) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens from held-out code: in each validation document (in corpus order),
    the text from its first top-level ``def``/``class`` line on. Returns (1, length) id tensors."""
    from glm5_ref.tokenizer import corpus_split, load_tokenizer

    enc, prompts = load_tokenizer(), []
    for _, text in corpus_split()[1]:
        starts = [i for i in (text.find("\ndef "), text.find("\nclass ")) if i >= 0]
        if not starts:
            continue
        ids = enc.encode(text[min(starts) + 1:], disallowed_special=())
        if len(ids) >= length:
            prompts.append(torch.tensor([ids[:length]]))
        if len(prompts) == n:
            return prompts
    raise ValueError(f"n: only {len(prompts)} held-out documents have {length} tokens of code, asked for {n}")


def train_mtp_model(config: GLM5Config, minutes: float, max_steps: int | None = None, batch_size: int = 16,
                    seq_len: int = 256, lr: float = 2e-3, seed: int = 0, progress: bool = True,
                    stream: torch.Tensor | None = None) -> tuple[GLM5ForCausalLM, dict]:
    """Train ``config`` (with its MTP layer, 3 depths) for ``minutes`` of wall time (or ``max_steps`` steps,
    whichever comes first) on ``stream`` (default: the corpus's training split), on the training engine with
    dense attention. Returns (model in eval mode, info dict with steps, tokens, seconds and the last losses)."""
    if config.num_nextn_predict_layers < 1:
        raise ValueError("config: expected num_nextn_predict_layers >= 1 (a model with an MTP layer)")
    if not minutes > 0:
        raise ValueError(f"minutes: expected a number > 0, got {minutes!r}")
    stream = corpus_stream("train") if stream is None else stream
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(config).train()
    set_dsa_stage(model, "dense")
    sampler = BatchSampler(stream, batch_size, seq_len, seed=seed)
    budget, t0, last = minutes * 60.0, time.perf_counter(), {}

    def run_progress(step: int) -> float:  # of the run, 0 .. 1: by the clock, or by the steps when capped
        return max((time.perf_counter() - t0) / budget, step / max_steps if max_steps else 0.0)

    trainer = Trainer(model, "adamw", lr, progress=run_progress)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(budget), desc="training (s)", leave=False)
    while time.perf_counter() - t0 < budget and (max_steps is None or trainer.step_count < max_steps):
        out = trainer.step(sampler.next()).out
        last = {"loss": out.loss.item(), "lm_loss": out.lm_loss.item(),
                "mtp_losses": [round(x.item(), 4) for x in out.mtp_losses]}
        if bar is not None:
            bar.n = min(int(time.perf_counter() - t0), int(budget))
            bar.set_postfix(step=trainer.step_count, lm=f"{last['lm_loss']:.3f}", mtp1=f"{last['mtp_losses'][0]:.3f}")
    if bar is not None:
        bar.close()
    step = trainer.step_count
    info = {"attention": "dense", "finished": True, "step": step, "tokens": step * batch_size * seq_len,
            "elapsed_s": round(time.perf_counter() - t0, 1), "last": last,
            "args": {"config": config.name, "minutes": minutes, "max_steps": max_steps, "batch_size": batch_size,
                     "seq_len": seq_len, "lr": lr, "seed": seed, "optimizer": "adamw"}}
    return model.eval(), info


def _checkpoint_dir(path: Path) -> Path | None:
    """The folder holding config.json + safetensors: ``path`` or ``path/checkpoint`` (train.py's layout)."""
    for candidate in (path, path / "checkpoint"):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    return None


def load_trained(path: str | os.PathLike) -> tuple[GLM5ForCausalLM, dict] | None:
    """A finished checkpoint with an MTP layer at ``path`` (or path/checkpoint) -> (model, info), else None.
    Attention is set as trainer_state.json says it was trained (dense when it says nothing)."""
    ckpt = _checkpoint_dir(Path(path))
    if ckpt is None:
        return None
    info = {}
    if (ckpt / INFO_FILE).is_file():
        info = json.loads((ckpt / INFO_FILE).read_text())
        if not info.get("finished", True):  # a run still in progress: not the trained model yet
            return None
    model = GLM5ForCausalLM.from_pretrained(ckpt)
    if model.mtp is None:
        return None
    model.set_execution(sparse=info.get("attention") == "sparse")
    return model.eval(), {**info, "path": os.path.relpath(ckpt, ROOT)}


# The recipes of the two cached models. "full": the classroom preset for 6 minutes; "quick": a narrower
# 2-layer model for 40 seconds, enough for drafts to be accepted sometimes (CI, smoke tests).
RECIPES = {
    "full": dict(config=GLM5Config.classroom(), minutes=6.0, batch_size=16, seq_len=256, lr=2e-3),
    "quick": dict(config=dataclasses.replace(GLM5Config.classroom(), name="classroom-small", hidden_size=128,
                                             num_hidden_layers=2, intermediate_size=384, moe_intermediate_size=64,
                                             q_lora_rank=64, kv_lora_rank=32),
                  minutes=0.67, batch_size=8, seq_len=128, lr=3e-3),
}


def trained_model(quick: bool = False, use_classroom: bool = True, progress: bool = True
                  ) -> tuple[GLM5ForCausalLM, dict]:
    """(model, info): the demo's classroom run if finished, else the cached runs/spec_bench model of this mode
    (quick mode also takes the full one), else one trained now and cached. info["source"] says which."""
    candidates = [("classroom run", CLASSROOM_RUN)] if use_classroom else []
    candidates += [("cached spec_bench model", SPEC_BENCH_RUN / "full")]
    candidates += [("cached spec_bench model", SPEC_BENCH_RUN / "quick")] if quick else []
    for source, path in candidates:
        found = load_trained(path)
        if found is not None:
            return found[0], {**found[1], "source": source}
    mode = "quick" if quick else "full"
    recipe = dict(RECIPES[mode])
    model, info = train_mtp_model(recipe.pop("config"), progress=progress, **recipe)
    out = SPEC_BENCH_RUN / mode
    model.save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return model, {**info, "path": os.path.relpath(out, ROOT), "source": "trained now"}
