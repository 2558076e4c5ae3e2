"""Training GLM-5 at classroom scale: the loss, the schedules, DSA stages, checkpoints, exact resume.

What one step does (GLM-5 report section 2 and appendix A; glm5_spec.md sections 4-7)
    batch  = (B, T + 1) random window of the training stream (data.BatchSampler)
    out    = model(batch, labels=batch, indexer_loss=stage != "dense")
    loss   = out.loss = L_LM + L_bal (+ L_MTP once the MTP module exists) (+ L_I, the indexer KL, when on)
             in the "warmup" stage: loss = L_I alone (only the indexers train)
    loss.backward(); clip the global gradient norm; optimizer.step(); LambdaLR.step()
    b_e   += gamma * sign(mean load - load_e)   for every MoE layer (aux-loss-free balancing, no gradient)

DSA stages (DeepSeek-V3.2 section 2.1.1, which GLM-5 follows after mid-training)
    dense    sparse=False everywhere, no indexer loss: plain MLA (the indexer gets no gradient).
    warmup   freeze_all_but_indexers, sparse=False, indexer_loss=True: the indexer learns to imitate the
             dense attention distribution (KL), nothing else changes; no router-bias update either.
    sparse   sparse=True, detach_indexer_input=True, indexer_loss=True: top-k attention, the model learns from
             L_LM (+ L_bal, L_MTP), the indexer from its KL on the selected keys only.
    A schedule such as "dense:0.8,warmup:0.05,sparse:0.15" switches stage by fractions of the run.

Schedules
    lr(p) = lr * p / warmup                                            p < warmup
          = lr * (min_ratio + (1 - min_ratio) (1 + cos(pi (p - w)/(1 - w))) / 2)   afterwards
    where p is the progress of the run: step / steps when ``steps`` is given (deterministic), else elapsed wall
    time / (minutes * 60) (the cosine ends exactly when the time budget does). LambdaLR drives it. Stages and
    evaluations are placed by the same p.

Checkpoints (out_dir/checkpoint/, all written into a staging folder that is renamed into place; checkpoint.py)
    config.json, model-*.safetensors, model.safetensors.index.json   model.save_pretrained: the released layout
    training_state.pt    optimizer, scheduler, data sampler (generator state), torch RNG, step, tokens, clock
    trainer_state.json   the same facts a person wants to read (step, stage, last evaluation, arguments)
    out_dir/log.jsonl    one JSON line per step ({"kind": "step", ...}) and per evaluation ({"kind": "eval", ...})
Resuming (resume=True) restores all of it; with ``steps`` it continues bit-identically to an uninterrupted run
on CPU (tested). ``steps``/``minutes`` are the TOTAL of the run, not an addition. Ctrl-C (KeyboardInterrupt) is
caught between steps and there only: the trainer writes a checkpoint of the last completed step, then lets the
interrupt go on; an interrupt during a save leaves the previous checkpoint untouched.

Choices where the paper is silent or does not apply at this scale
    * AdamW (betas 0.9, 0.95, weight decay 0.1) by default: Muon's Newton-Schulz costs more than it saves at
      classroom batch sizes on a CPU (``optimizer="muon"`` / ``"muon_split"`` select GLM-5's optimizer).
    * The router bias keeps gamma = bias_update_speed through the run (GLM-4.5 turns it off late).
    * Windows cross document boundaries (EOT marks them); there is no attention mask between documents.
Data parallelism (``data_parallel=DataParallel(...)``, which ``torchrun ... -m glm5_ref train`` sets up):
every rank draws the same global batch and trains on its slice through DDP, rank 0 alone writes the log and the
checkpoints, the clock is rank 0's; glm5_ref/distributed/data_parallel.py has the details, expert parallelism too.
Not handled: gradient accumulation, mixed precision.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glm5_ref.checkpoint import (CHECKPOINT, INFO_FILE, LOG_FILE, STATE_FILE, find_checkpoint, read_log,  # noqa: F401
                                 read_trainer_state, save_checkpoint, truncate_log)
from glm5_ref.config import GLM5Config
from glm5_ref.data import BatchSampler, build_splits, eval_windows, evaluate, token_byte_lengths
from glm5_ref.dsa import DSAAttention, freeze_all_but_indexers
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.muon import build_optimizer
from glm5_ref.tokenizer import VOCAB_SIZE

STAGES = ("dense", "warmup", "sparse")
OPTIMIZERS = ("adamw", "muon", "muon_split")



# ---- arguments ---------------------------------------------------------------------------------------------
def resolve_config(config: GLM5Config | str) -> GLM5Config:
    """A preset name or a GLM5Config; the vocabulary is widened to the project tokenizer's 4096 ids if smaller
    (the tiny test config has 256), since the corpus is encoded with that tokenizer."""
    if isinstance(config, str):
        config = GLM5Config.preset(config)  # ValueError naming an unknown preset
    if not isinstance(config, GLM5Config):
        raise TypeError(f"config: expected a GLM5Config or a preset name, got {type(config).__name__}")
    if config.vocab_size < VOCAB_SIZE:
        config = dataclasses.replace(config, vocab_size=VOCAB_SIZE)
    return config


def parse_dsa_schedule(dsa_stage: str | list | tuple) -> list[tuple[str, float]]:
    """"dense" / "warmup" / "sparse", or "dense:0.8,warmup:0.05,sparse:0.15" (fractions of the run, summing to 1),
    or a list of (stage, fraction) pairs -> [(stage, cumulative end), ...]."""
    if isinstance(dsa_stage, str) and dsa_stage in STAGES:
        return [(dsa_stage, 1.0)]
    parts = dsa_stage
    if isinstance(dsa_stage, str):
        try:
            parts = [(s.split(":")[0].strip(), float(s.split(":")[1])) for s in dsa_stage.split(",")]
        except (IndexError, ValueError):
            parts = None
    ok = isinstance(parts, (list, tuple)) and parts and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and p[0] in STAGES and isinstance(p[1], (int, float))
        and p[1] >= 0 for p in parts) and abs(sum(p[1] for p in parts) - 1) < 1e-6
    if not ok:
        raise ValueError(f"dsa_stage {dsa_stage!r}: expected one of {STAGES} or a schedule like "
                         "'dense:0.8,warmup:0.05,sparse:0.15' whose fractions sum to 1")
    out, end = [], 0.0
    for stage, fraction in parts:
        end += fraction
        out.append((stage, end))
    out[-1] = (out[-1][0], 1.0)
    return out


def stage_at(schedule: list[tuple[str, float]], progress: float) -> str:
    for stage, end in schedule:
        if progress < end:
            return stage
    return schedule[-1][0]


def lr_factor(progress: float, warmup: float, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over the first ``warmup`` of the run, then cosine down to ``min_lr_ratio``."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return p / warmup
    t = (p - warmup) / max(1.0 - warmup, 1e-12)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_dsa_stage(model: torch.nn.Module, stage: str) -> None:
    """Flip every DSAAttention (main layers and, when present, the MTP layer) to ``stage``; freeze for warm-up."""
    if stage not in STAGES:
        raise ValueError(f"dsa stage: expected one of {STAGES}, got {stage!r}")
    for module in model.modules():
        if isinstance(module, DSAAttention):
            module.sparse = stage == "sparse"
            module.detach_indexer_input = stage == "sparse"
    if stage == "warmup":
        freeze_all_but_indexers(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)


def matched_dense_config(config: GLM5Config) -> GLM5Config:
    """The all-dense twin of ``config`` with matched ACTIVE parameters: every layer dense, its SwiGLU as wide as
    the K routed + S shared experts a token uses ((K + S) * moe_intermediate_size), so the dense FFN has exactly
    the parameters one token touches in an MoE layer (the router's E * d are not matched). Attention, MTP and the
    rest are unchanged; the MTP block (layer index L >= first_k_dense_replace) stays an MoE block."""
    width = (config.num_experts_per_tok + config.n_shared_experts) * config.moe_intermediate_size
    return dataclasses.replace(config, name=f"{config.name}-dense", first_k_dense_replace=config.num_hidden_layers,
                               intermediate_size=width)


# ---- checkpoints (the files: checkpoint.py) -------------------------------------------------------------------
def load_model(path: str | os.PathLike) -> GLM5ForCausalLM:
    """A trained model, with its attention set as it was trained (dense unless the indexer was trained)."""
    ckpt = find_checkpoint(path)
    model = GLM5ForCausalLM.from_pretrained(ckpt)
    info = read_trainer_state(ckpt)
    set_dsa_stage(model, "sparse" if info.get("attention") == "sparse" else "dense")
    model.eval()
    return model


class _DeferInterrupt:
    """While active, Ctrl-C only sets a flag (checked between steps); a second Ctrl-C interrupts at once.
    Only in the main thread (signal handlers live there); elsewhere it does nothing."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)

            def handler(signum, frame):
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True
            signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ---- one step -----------------------------------------------------------------------------------------------
def train_step(model: GLM5ForCausalLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor, stage: str = "dense",
               grad_clip: float | None = 1.0, bias_update_speed: float | None = None, data_parallel=None,
               **forward_kwargs):
    """Forward, loss for the DSA ``stage`` (set with set_dsa_stage first), backward, clip, optimizer step, router
    bias update (gamma = ``bias_update_speed``, default config.bias_update_speed). ``batch`` (B, T + 1) is both
    input and labels (the model shifts). Returns (out, loss, grad norm). With ``data_parallel`` (a
    distributed.DataParallel that prepared ``model``) ``batch`` is the global batch and each rank trains on its
    slice (DataParallel.train_step)."""
    if data_parallel is not None:
        return data_parallel.train_step(model, optimizer, batch, stage, grad_clip, bias_update_speed,
                                        **forward_kwargs)
    out = model(batch, labels=batch, indexer_loss=stage != "dense", **forward_kwargs)
    loss = out.indexer_loss if stage == "warmup" else out.loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}: the run diverged; lower the learning rate")
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if stage != "warmup":  # the router bias is part of the model: frozen in the indexer warm-up
        with torch.no_grad():  # main layers, then the MTP block's when this step trained it (the model knows)
            model.update_router_biases(out.tokens_per_expert, bias_update_speed)
    return out, loss, grad_norm


# ---- the loop ------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out_dir: str
    checkpoint: str
    step: int
    tokens: int
    elapsed_s: float
    final_eval: dict
    num_params: int
    stage: str
    log: list[dict] = field(default_factory=list)


def _check_budget(minutes, steps) -> None:
    if minutes is None and steps is None:
        raise ValueError("train: give minutes (a wall-clock budget) or steps (a step count), or both")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes <= 0):
        raise ValueError(f"minutes: expected a number > 0, got {minutes!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps: expected an integer > 0, got {steps!r}")


def train(config: GLM5Config | str, out_dir: str | os.PathLike, minutes: float | None = None,
          steps: int | None = None, optimizer: str = "adamw", lr: float = 2e-3, batch_size: int = 16,
          seq_len: int = 256, warmup: float = 0.05, min_lr_ratio: float = 0.1, weight_decay: float = 0.1,
          grad_clip: float = 1.0, dsa_stage: str | list = "dense", num_evals: int = 10, eval_windows_n: int = 64,
          eval_batch_size: int = 16, checkpoint_every: int | None = None, checkpoint_minutes: float = 2.0,
          mtp_depths: int | None = None, mtp_start: float = 0.0, bias_update_speed: float | None = None,
          seed: int = 0, resume: bool = False,
          overwrite: bool = False, progress: bool = True, callback=None, splits=None,
          data_parallel=None) -> TrainResult:
    """Train ``config`` on the classroom corpus into ``out_dir`` (see the module docstring).

    minutes / steps   the run's total budget: with ``steps`` the schedule is laid out in steps (deterministic)
                      and ``minutes``, if also given, only caps the wall time; with ``minutes`` alone the
                      schedule follows the clock. Evaluations: ``num_evals`` spread over the run + the final one,
                      on ``eval_windows_n`` fixed validation windows.
    resume            continue the checkpoint in out_dir (same config, batch_size, seq_len, optimizer); a fresh
                      start if there is none. Without it an existing checkpoint is an error unless ``overwrite``.
    mtp_depths        MTP depths trained per step (None: the model's default, config.num_mtp_depths; 0: none).
    mtp_start         train MTP only from this fraction of the run on (0: throughout, as GLM-5 does; the demo
                      starts it late, because three MTP depths more than double a classroom step on a CPU).
    bias_update_speed gamma of the router-bias update (None: config.bias_update_speed, GLM-4.5's 1e-3).
    callback          called as callback(step, record) after every completed step (between steps).
    splits            a data.CorpusSplits to use instead of the cached classroom corpus.
    data_parallel     a distributed.DataParallel (every rank calls train with the same arguments; batch_size is
                      the global batch); None: one process.
    """
    dp = data_parallel
    config = resolve_config(config)
    _check_budget(minutes, steps)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    for name, value in (("lr", lr), ("grad_clip", grad_clip)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    if not 0 <= warmup < 1 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"warmup, min_lr_ratio: expected 0 <= warmup < 1 and 0 <= min_lr_ratio <= 1, got "
                         f"{warmup!r}, {min_lr_ratio!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_evals", num_evals),
                        ("eval_windows_n", eval_windows_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if seq_len + 1 > config.max_position_embeddings:
        raise ValueError(f"seq_len: {seq_len} + 1 > max_position_embeddings = {config.max_position_embeddings}")
    if not 0 <= mtp_start <= 1:
        raise ValueError(f"mtp_start: expected a fraction of the run in [0, 1], got {mtp_start!r}")
    schedule = parse_dsa_schedule(dsa_stage)
    if dp is not None:  # the first collective: every rank must have been given the same run
        dp.check_same(config=dataclasses.asdict(config), run=dict(
            out_dir=os.fspath(out_dir), minutes=minutes, steps=steps, optimizer=optimizer, lr=lr, batch_size=batch_size,
            seq_len=seq_len, warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip,
            dsa_stage=schedule, num_evals=num_evals, eval_windows_n=eval_windows_n, mtp_depths=mtp_depths,
            mtp_start=mtp_start, bias_update_speed=bias_update_speed, seed=seed, resume=resume, overwrite=overwrite,
            expert_parallel=dp.expert_parallel))
        dp.check_sizes(config, batch_size, eval_windows_n)
    main = dp is None or dp.is_main  # the process that writes files
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {os.fspath(out_dir)} exists and is not a directory")
    has_ckpt = (out_dir / CHECKPOINT).is_dir() or (out_dir / (CHECKPOINT + ".tmp-old")).is_dir()
    if has_ckpt and not resume and not overwrite:
        raise ValueError(f"out_dir {os.fspath(out_dir)} already holds a checkpoint: resume it (resume=True, "
                         "--resume) or start over (overwrite=True, --overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_FILE
    budget_s = minutes * 60.0 if minutes is not None else None

    # ---- data, model, optimizer, schedules --------------------------------------------------------------
    splits = splits if splits is not None else build_splits()
    sampler = BatchSampler(splits.train.ids, batch_size, seq_len, seed=seed)
    val = eval_windows(splits.val.ids, seq_len, eval_windows_n)  # (W, T + 1), the same every time
    byte_lengths = token_byte_lengths(config.vocab_size)
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(config)
    state: dict = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "evals_done": 0, "indexer_trained": False}
    ckpt = None
    if resume and has_ckpt:
        ckpt = find_checkpoint(out_dir)
        saved_config = GLM5Config.from_hf(ckpt)
        if saved_config != config:
            raise ValueError(f"resume: the checkpoint in {os.fspath(ckpt)} has a different config "
                             f"({saved_config.name}) than the one given ({config.name})")
        model = GLM5ForCausalLM.from_pretrained(ckpt)
    num_params = sum(p.numel() for p in model.parameters())
    if dp is not None:
        dp.prepare(model)  # to the rank's device, experts sharded (expert parallel), DDP
    model.train()
    make_opt = dp.build_optimizer if dp is not None else build_optimizer
    opt = make_opt(model, optimizer, lr, weight_decay=weight_decay)  # every parameter, before any freezing
    clock = {"start": time.perf_counter(), "offset": 0.0}

    def elapsed() -> float:  # under data parallelism: rank 0's clock, as last synchronised (sync_clock)
        if dp is not None and "synced" in clock:
            return clock["synced"]
        return clock["offset"] + time.perf_counter() - clock["start"]

    def sync_clock() -> None:
        if dp is not None:
            clock.pop("synced", None)
            clock["synced"] = dp.broadcast_float(elapsed())

    def progress_now(step: int) -> float:
        p_steps = step / steps if steps is not None else 0.0
        p_time = elapsed() / budget_s if budget_s is not None and steps is None else 0.0
        return min(1.0, max(p_steps, p_time))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(progress_now(step), warmup, min_lr_ratio))
    if ckpt is not None:
        saved = torch.load(ckpt / STATE_FILE, weights_only=False)
        if saved["args"]["optimizer"] != optimizer:
            raise ValueError(f"resume: the checkpoint was trained with optimizer {saved['args']['optimizer']!r}, "
                             f"not {optimizer!r}")
        if dp is not None:
            dp.load_optimizer_state(opt, saved)
        elif saved.get("world_size", 1) != 1:
            raise ValueError(f"resume: the checkpoint was written by {saved['world_size']} data-parallel processes; "
                             "resume it with torchrun and the same --nproc_per_node")
        else:
            opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        sampler.load_state_dict(saved["sampler"])
        torch.set_rng_state(saved["torch_rng"])
        state.update(saved["loop"])
        clock["offset"] = state["elapsed_s"]
        if main:
            truncate_log(log_path, state["step"])
    elif log_path.exists() and main:
        log_path.unlink()

    args = dict(config=config.name, minutes=minutes, steps=steps, optimizer=optimizer, lr=lr, batch_size=batch_size,
                seq_len=seq_len, warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay,
                grad_clip=grad_clip, dsa_stage=dsa_stage if isinstance(dsa_stage, str) else list(dsa_stage),
                mtp_depths=mtp_depths, mtp_start=mtp_start, bias_update_speed=bias_update_speed, seed=seed,
                eval_windows=eval_windows_n)
    moes = [layer.mlp for layer in model.model.layers if layer.is_moe]  # the main layers, for the load plots
    load_acc = torch.zeros(len(moes), config.n_routed_experts, dtype=torch.int64)  # (L_moe, E) since last eval
    last_eval: dict = {}
    records: list[dict] = []
    stage = None

    def write(record: dict) -> None:
        records.append(record)
        if main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def run_eval() -> dict:
        nonlocal load_acc
        result = (dp.evaluate if dp is not None else evaluate)(model, val, batch_size=eval_batch_size,
                                                               byte_lengths=byte_lengths)
        record = {"kind": "eval", "step": state["step"], "tokens": state["tokens"], "elapsed_s": round(elapsed(), 3),
                  "val_loss": result["loss"], "val_bpb": result["bpb"], "stage": stage,
                  "expert_load": load_acc.tolist()}
        load_acc = torch.zeros_like(load_acc)
        write(record)
        return record

    def checkpoint(finished: bool = False) -> Path:
        state["elapsed_s"] = elapsed()
        saved = {"optimizer": opt.state_dict() if dp is None else None, "scheduler": sched.state_dict(),
                 "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(), "loop": dict(state), "args": args}
        full = model
        if dp is not None:  # collectives: every rank takes part, rank 0 writes
            saved.update(dp.optimizer_states(opt))
            full = dp.full_model(model)
        info = {"step": state["step"], "tokens": state["tokens"], "elapsed_s": state["elapsed_s"],
                "finished": finished, "stage": stage, "attention": "sparse" if state["indexer_trained"] else "dense",
                "last_eval": {k: v for k, v in last_eval.items() if k != "expert_load"},
                "num_params": num_params, "args": args}
        if not main:
            return out_dir / CHECKPOINT
        return save_checkpoint(out_dir, full, saved, info)

    def done(step: int) -> bool:
        if steps is not None and step >= steps:
            return True
        return budget_s is not None and elapsed() >= budget_s

    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        timed = steps is None  # the bar counts seconds of the budget, not steps
        bar = tqdm(total=int(budget_s) if timed else steps, initial=0 if timed else state["step"],
                   unit="s" if timed else "step", dynamic_ncols=True, desc=f"train {config.name}",
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s{postfix}" if timed else None)
    tokens_per_step = batch_size * seq_len
    if state["step"] == 0:
        stage = schedule[0][0]
        set_dsa_stage(model, stage)
        run_eval()  # the untrained model: where the curves start
    sync_clock()
    last_save = elapsed()
    tok_s = None
    at_boundary = True  # False while a step is half done: an interrupt there must not be saved
    try:
        with _DeferInterrupt() as interrupt:
            while not done(state["step"]):
                at_boundary = False
                new_stage = stage_at(schedule, progress_now(state["step"]))
                if new_stage != stage:
                    stage = new_stage
                    set_dsa_stage(model, stage)
                t0 = time.perf_counter()
                batch = sampler.next()  # (B, T + 1)
                lr_now = sched.get_last_lr()[0]
                mtp_on = progress_now(state["step"]) >= mtp_start
                depths = mtp_depths if mtp_on else 0
                mtp_kwargs = {} if depths is None else {"mtp_depths": depths}
                try:
                    out, loss, grad_norm = train_step(model, opt, batch, stage, grad_clip, bias_update_speed,
                                                      data_parallel=dp, **mtp_kwargs)
                except FloatingPointError as e:
                    raise FloatingPointError(f"step {state['step'] + 1}: {e} (lr {lr_now:.3g}); the last checkpoint "
                                             f"is in {os.fspath(out_dir)}") from None
                sched.step()
                for i, tpe in enumerate(out.tokens_per_expert[:len(moes)]):  # main layers' loads, for the plots
                    load_acc[i] += tpe.to(load_acc.dtype)
                state["indexer_trained"] |= stage != "dense"
                state["step"] += 1
                state["tokens"] += tokens_per_step
                sync_clock()
                at_boundary = True
                dt = time.perf_counter() - t0
                tok_s = tokens_per_step / dt if tok_s is None else 0.9 * tok_s + 0.1 * tokens_per_step / dt
                record = {"kind": "step", "step": state["step"], "tokens": state["tokens"],
                          "elapsed_s": round(elapsed(), 3), "loss": loss.item(), "lm_loss": out.lm_loss.item(),
                          "balance_loss": out.balance_loss.item(), "lr": lr_now, "grad_norm": grad_norm.item(),
                          "tok_s": round(tokens_per_step / dt, 1), "stage": stage}
                if out.indexer_loss is not None:
                    record["indexer_loss"] = out.indexer_loss.item()
                if getattr(out, "mtp_loss", None) is not None:
                    record["mtp_loss"] = out.mtp_loss.item()  # lambda / D * sum_k CE_k, as added to the loss
                    record["mtp_ce"] = [ce.item() for ce in getattr(out, "mtp_losses", [])]  # CE of depth k = 1..D
                write(record)
                if bar is not None:
                    left = (budget_s - elapsed() if steps is None
                            else (steps - state["step"]) * tokens_per_step / tok_s)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:.0f}",
                                    left=f"{int(max(left, 0)) // 60}m{int(max(left, 0)) % 60:02d}s", refresh=False)
                    bar.update(1) if steps is not None else bar.update(min(int(elapsed()), int(budget_s)) - bar.n)
                # periodic evaluation and checkpoints, placed by progress
                if (progress_now(state["step"]) >= (state["evals_done"] + 1) / (num_evals + 1)
                        and not done(state["step"])):
                    state["evals_done"] += 1
                    last_eval = run_eval()
                    if bar is not None:
                        bar.write(f"step {state['step']}: val loss {last_eval['val_loss']:.3f} nats/token, "
                                  f"{last_eval['val_bpb']:.3f} bits/byte")
                if ((checkpoint_every and state["step"] % checkpoint_every == 0)
                        or (checkpoint_minutes and elapsed() - last_save > 60 * checkpoint_minutes)):
                    checkpoint()
                    last_save = elapsed()
                if callback is not None:
                    callback(state["step"], record)
                if interrupt.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        # between steps (a callback, a deferred Ctrl-C, during an evaluation or a save) the state is whole: save
        # it; in the middle of a step (a second Ctrl-C) it is not, and the last checkpoint stays as it was
        if bar is not None:
            bar.close()
        if state["step"] > 0 and at_boundary and dp is None:  # a save is a collective under data parallelism
            path = checkpoint()
            print(f"interrupted after step {state['step']}: checkpoint saved in {path}; continue with resume=True "
                  "(--resume)")
        raise
    if bar is not None:
        bar.close()
    last_eval = run_eval()
    path = checkpoint(finished=True)
    return TrainResult(out_dir=os.fspath(out_dir), checkpoint=os.fspath(path), step=state["step"],
                       tokens=state["tokens"], elapsed_s=state["elapsed_s"],
                       final_eval={"loss": last_eval["val_loss"], "bpb": last_eval["val_bpb"]},
                       num_params=num_params, stage=stage or schedule[-1][0],
                       log=read_log(log_path))
