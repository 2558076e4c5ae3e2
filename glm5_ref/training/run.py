"""A classroom training run: budgets, DSA stage schedule, evaluations, checkpoints, exact resume, Ctrl-C.

``train(config, out_dir, **options)`` trains a preset (or any GLM5Config) on the classroom corpus with the
engine (engine.py: ``Trainer``, one ``train_step`` per batch) and keeps the run on disk (checkpoint.py):

    out_dir/checkpoint/   config.json + safetensors (the released layout), training_state.pt (optimizer,
                          scheduler, data sampler, torch RNG, step, tokens, clock), trainer_state.json (readable)
    out_dir/log.jsonl     one JSON line per step ({"kind": "step", ...}) and per evaluation ({"kind": "eval", ...})

Options (``RunOptions`` in options.py; every field is a keyword argument of ``train``)
    minutes / steps   the run's total budget. With ``steps`` the schedule is laid out in steps (deterministic)
                      and ``minutes``, if also given, only caps the wall time; with ``minutes`` alone the
                      schedule follows the clock (the cosine ends exactly when the time budget does).
    dsa_stage         "dense" / "warmup" / "sparse", or a schedule such as "dense:0.8,warmup:0.05,sparse:0.15"
                      (fractions of the run); stages, evaluations and mtp_start are placed by progress.
    mtp_start         train MTP only from this fraction of the run on (0: throughout, as GLM-5 does).
    num_evals         evaluations spread over the run, plus one at the start and one at the end, on
                      ``eval_windows_n`` fixed validation windows.
    repeat_fraction   rows of each batch that carry a span written twice (training/synthetic.py, copy data);
    random_copy       train on the pure copy task (random spans written twice) instead of the corpus
    copy_probe        spans of the copy probe logged with every evaluation (copy_first, copy_repeat; one process)
    cpu_bf16          the CPU's steps under bf16 autocast (evaluations stay fp32)
    device            "cpu" (None, the default), "cuda", "mps" or "auto" (glm5_ref/devices.py): the model,
                      every batch and evaluation window there, forwards under bf16 autocast on CUDA / MPS;
                      checkpoints hold CPU tensors, so a run resumes on another device (not bit-identically).
Resuming (``resume=True``) restores all of it; with ``steps`` it continues bit-identically to an uninterrupted
run on CPU (tested). ``steps``/``minutes`` are the TOTAL of the run, not an addition. Ctrl-C is caught between
steps and there only: the run writes a checkpoint of the last completed step, then lets the interrupt go on;
an interrupt during a save leaves the previous checkpoint untouched.

Choices where the paper is silent or does not apply at this scale
    * AdamW (betas 0.9, 0.95, weight decay 0.1) by default: Muon's Newton-Schulz costs more than it saves at
      classroom batch sizes on a CPU (``optimizer="muon"`` / ``"muon_split"`` select GLM-5's optimizer).
    * The router bias keeps gamma = bias_update_speed through the run (GLM-4.5 turns it off late).
    * Windows cross document boundaries (EOT marks them); there is no attention mask between documents.
Data parallelism (``data_parallel=DataParallel(...)``, which ``torchrun ... -m glm5_ref train`` sets up): every
rank draws the same global batch and trains on its slice, rank 0 alone writes the log and the checkpoints, the
clock is rank 0's (glm5_ref/distributed/data_parallel.py). Not handled: gradient accumulation, fp16 (bf16
autocast needs no loss scaling), bf16 weights or optimizer state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glm5_ref.config import GLM5Config
from glm5_ref.devices import autocast, resolve_device, to_cpu
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.training.checkpoint import (CHECKPOINT, STATE_FILE, RunLog, find_checkpoint, read_log,
                                          read_trainer_state, save_checkpoint)
from glm5_ref.training.data import build_splits, eval_windows, evaluate, token_byte_lengths
from glm5_ref.training.engine import Trainer, set_dsa_stage
from glm5_ref.training.synthetic import copy_probe, training_sampler
from glm5_ref.training.options import (RunOptions, matched_dense_config, parse_dsa_schedule,  # noqa: F401
                                       resolve_config, stage_at)


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


def load_model(path: str | os.PathLike) -> GLM5ForCausalLM:
    """A trained model, with its attention set as it was trained (dense unless the indexer was trained)."""
    ckpt = find_checkpoint(path)
    model = GLM5ForCausalLM.from_pretrained(ckpt)
    model.set_execution(sparse=read_trainer_state(ckpt).get("attention") == "sparse")
    return model.eval()


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


# ---- the run --------------------------------------------------------------------------------------------------
def train(config: GLM5Config | str, out_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, callback=None, splits=None, data_parallel=None, **options) -> TrainResult:
    """Train ``config`` on the classroom corpus into ``out_dir`` (module docstring; ``options``: RunOptions).

    resume          continue the checkpoint in out_dir (same config, batch_size, seq_len, optimizer); a fresh
                    start if there is none. Without it an existing checkpoint is an error unless ``overwrite``.
    callback        called as callback(step, record) after every completed step (between steps).
    splits          a data.CorpusSplits to use instead of the cached classroom corpus.
    data_parallel   a distributed.DataParallel (every rank calls train with the same arguments; batch_size is the
                    global batch); None: one process.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(RunOptions)})
    if unknown:
        raise TypeError(f"train: unknown option(s) {unknown}; options are {[f.name for f in dataclasses.fields(RunOptions)]}")
    run = ClassroomRun(resolve_config(config), Path(out_dir), RunOptions(**options), resume, overwrite,
                       progress, callback, splits, data_parallel)
    return run.run()


def run_device(device: str | None, data_parallel) -> torch.device:
    """Where the run trains: ``device`` (RunOptions.device; None = the CPU) in one process; under data
    parallelism the rank's own device (DataParallel.device), which an explicit ``device`` must agree with."""
    if data_parallel is None:
        return resolve_device(device or "cpu")
    mine = data_parallel.device
    if device not in (None, "auto") and resolve_device(device).type != mine.type:
        raise ValueError(f"device: data parallel trains every rank on its own device ({mine.type} here, from the "
                         f"{data_parallel.backend} backend), got {device!r}; leave --device out under torchrun")
    return mine


class ClassroomRun:
    """One run of ``train``: set up (fresh or resumed), then ``run()`` the loop."""

    def __init__(self, config: GLM5Config, out_dir: Path, opts: RunOptions, resume: bool, overwrite: bool,
                 progress: bool, callback, splits, data_parallel):
        opts.validate(config)
        self.config, self.out_dir, self.opts, self.callback, self.dp = config, out_dir, opts, callback, data_parallel
        self.schedule = parse_dsa_schedule(opts.dsa_stage)
        if self.dp is not None:  # the first collective: every rank must have been given the same run
            self.dp.check_same(config=dataclasses.asdict(config), run=dict(
                out_dir=os.fspath(out_dir), resume=resume, overwrite=overwrite, schedule=self.schedule,
                expert_parallel=self.dp.expert_parallel, **dataclasses.asdict(opts)))
            self.dp.check_sizes(config, opts.batch_size, opts.eval_windows_n)
        self.main = self.dp is None or self.dp.is_main  # the process that writes files
        self.device = run_device(opts.device, self.dp)
        has_ckpt = self._prepare_dir(resume, overwrite)
        splits = splits if splits is not None else build_splits()
        self.sampler = training_sampler(splits.train.ids, opts.batch_size, opts.seq_len, opts.seed,
                                        repeat_fraction=opts.repeat_fraction, random_copy=opts.random_copy)
        self.val_ids = splits.val.ids
        self.val = eval_windows(splits.val.ids, opts.seq_len, opts.eval_windows_n)  # (W, T + 1), always the same
        self.byte_lengths = token_byte_lengths(config.vocab_size)
        self.state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "evals_done": 0, "indexer_trained": False}
        self.clock = {"start": time.perf_counter(), "offset": 0.0}
        self.budget_s = opts.minutes * 60.0 if opts.minutes is not None else None
        self.model = self._build_model(has_ckpt and resume)
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.trainer = Trainer(self.model, opts.optimizer, opts.lr, weight_decay=opts.weight_decay,
                               progress=lambda step: self.progress_at(step + 1), warmup=opts.warmup,
                               min_lr_ratio=opts.min_lr_ratio, grad_clip=opts.grad_clip,
                               bias_update_speed=opts.bias_update_speed, data_parallel=self.dp,
                               mixed_precision=True)  # bf16 autocast on CUDA / MPS, nothing on the CPU
        self.log = RunLog(out_dir, enabled=self.main)
        self.moes = [layer.mlp for layer in self.model.model.layers if layer.is_moe]  # main layers, for load plots
        self.load_acc = torch.zeros(len(self.moes), config.n_routed_experts, dtype=torch.int64)  # since last eval
        self.last_eval: dict = {}
        self.stage = None
        if has_ckpt and resume:
            self._restore()
        else:
            self.log.clear()
        self.bar = self._progress_bar() if progress and self.main else None

    # ---- set-up --------------------------------------------------------------------------------------------
    def _prepare_dir(self, resume: bool, overwrite: bool) -> bool:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise ValueError(f"out_dir {os.fspath(out)} exists and is not a directory")
        has_ckpt = (out / CHECKPOINT).is_dir() or (out / (CHECKPOINT + ".tmp-old")).is_dir()
        if has_ckpt and not resume and not overwrite:
            raise ValueError(f"out_dir {os.fspath(out)} already holds a checkpoint: resume it (resume=True, "
                             "--resume) or start over (overwrite=True, --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
        return has_ckpt

    def _build_model(self, from_checkpoint: bool) -> GLM5ForCausalLM:
        torch.manual_seed(self.opts.seed)
        model = GLM5ForCausalLM(self.config)
        source = self.out_dir if from_checkpoint else self.opts.init_from
        if source is not None:  # this run's own checkpoint (resume), or the weights it starts from (init_from)
            ckpt = find_checkpoint(source)
            saved_config = GLM5Config.from_hf(ckpt)
            if saved_config != self.config:
                what = "resume" if from_checkpoint else "init_from"
                raise ValueError(f"{what}: the checkpoint in {os.fspath(ckpt)} has a different config "
                                 f"({saved_config.name}) than the one given ({self.config.name})")
            model = GLM5ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        if self.dp is not None:
            self.dp.prepare(model)  # to the rank's device, experts sharded (expert parallel), DDP
        else:
            model.to(self.device)
        return model.train()

    def _restore(self) -> None:
        # saved from CPU tensors (save): the optimizer moves its state onto the parameters' device when it loads
        saved = torch.load(find_checkpoint(self.out_dir) / STATE_FILE, weights_only=False, map_location="cpu")
        if saved["args"]["optimizer"] != self.opts.optimizer:
            raise ValueError(f"resume: the checkpoint was trained with optimizer {saved['args']['optimizer']!r}, "
                             f"not {self.opts.optimizer!r}")
        if self.dp is None and saved.get("world_size", 1) != 1:
            raise ValueError(f"resume: the checkpoint was written by {saved['world_size']} data-parallel processes; "
                             "resume it with torchrun and the same --nproc_per_node")
        self.trainer.load_state_dict(saved)
        self.sampler.load_state_dict(saved["sampler"])
        torch.set_rng_state(saved["torch_rng"])
        self.state.update(saved["loop"])
        self.clock["offset"] = self.state["elapsed_s"]
        self.log.truncate(self.state["step"])

    def _progress_bar(self):
        from tqdm.auto import tqdm
        if self.opts.steps is None:  # the bar counts seconds of the budget, not steps
            return tqdm(total=int(self.budget_s), unit="s", dynamic_ncols=True, desc=f"train {self.config.name}",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} s{postfix}")
        return tqdm(total=self.opts.steps, initial=self.state["step"], unit="step", dynamic_ncols=True,
                    desc=f"train {self.config.name}")

    # ---- the clock and progress ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        if self.dp is not None and "synced" in self.clock:  # rank 0's clock, as last synchronised
            return self.clock["synced"]
        return self.clock["offset"] + time.perf_counter() - self.clock["start"]

    def sync_clock(self) -> None:
        if self.dp is not None:
            self.clock.pop("synced", None)
            self.clock["synced"] = self.dp.broadcast_float(self.elapsed())

    def progress_at(self, step: int) -> float:
        """The fraction of the run done after ``step`` steps (by steps, or by the clock without them)."""
        steps = self.opts.steps
        p_steps = step / steps if steps is not None else 0.0
        p_time = self.elapsed() / self.budget_s if self.budget_s is not None and steps is None else 0.0
        return min(1.0, max(p_steps, p_time))

    def done(self) -> bool:
        if self.opts.steps is not None and self.state["step"] >= self.opts.steps:
            return True
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    # ---- evaluation and checkpoints --------------------------------------------------------------------------
    def evaluate(self) -> dict:
        fn = self.dp.evaluate if self.dp is not None else evaluate
        with autocast(self.device):
            result = fn(self.model, self.val, batch_size=self.opts.eval_batch_size, byte_lengths=self.byte_lengths)
        s = self.state
        record = {"kind": "eval", "step": s["step"], "tokens": s["tokens"], "elapsed_s": round(self.elapsed(), 3),
                  "val_loss": result["loss"], "val_bpb": result["bpb"], "stage": self.stage,
                  "expert_load": self.load_acc.tolist()}
        if self.opts.copy_probe and self.dp is None:  # one process (a probe on rank 0 alone would stall DP)
            with autocast(self.device):
                probe = copy_probe(self.model, self.val_ids, n=self.opts.copy_probe,
                                   span=min(64, (self.opts.seq_len + 1) // 2))
            record["copy_first"], record["copy_repeat"] = probe["first"], probe["repeat"]
        self.load_acc = torch.zeros_like(self.load_acc)
        self.log.append(record)
        return record

    def save(self, finished: bool = False) -> Path:
        """Checkpoint the run (a collective under data parallelism: every rank takes part, rank 0 writes)."""
        self.state["elapsed_s"] = self.elapsed()
        args = self.opts.record(self.config)
        saved = self.trainer.state_dict() | {"sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                                             "loop": dict(self.state), "args": args}
        full = self.model
        if self.dp is not None:
            saved.update(self.dp.optimizer_states(self.trainer.optimizer))
            full = self.dp.full_model(self.model)
        saved = to_cpu(saved)  # a checkpoint written on a GPU loads on any machine (the weights: save_pretrained)
        info = {"step": self.state["step"], "tokens": self.state["tokens"], "elapsed_s": self.state["elapsed_s"],
                "finished": finished, "stage": self.stage,
                "attention": "sparse" if self.state["indexer_trained"] else "dense",
                "last_eval": {k: v for k, v in self.last_eval.items() if k != "expert_load"},
                "num_params": self.num_params, "args": args, "device": str(self.device)}
        if not self.main:
            return self.out_dir / CHECKPOINT
        return save_checkpoint(self.out_dir, full, saved, info)

    # ---- one step and what follows it --------------------------------------------------------------------------
    def step(self) -> dict:
        p = self.progress_at(self.state["step"])
        stage = stage_at(self.schedule, p)
        if stage != self.stage:
            self.stage = stage
            set_dsa_stage(self.model, stage)
        depths = self.opts.mtp_depths if p >= self.opts.mtp_start else 0
        kwargs = {} if depths is None else {"mtp_depths": depths}
        t0 = time.perf_counter()
        try:
            with (torch.autocast("cpu", dtype=torch.bfloat16) if self.opts.cpu_bf16 and self.device.type == "cpu"
                  else contextlib.nullcontext()):
                out, loss, grad_norm, lr = self.trainer.step(self.sampler.next(), stage, **kwargs)
        except FloatingPointError as e:
            raise FloatingPointError(f"step {self.state['step'] + 1}: {e} (lr {self.trainer.lr:.3g}); the last "
                                     f"checkpoint is in {os.fspath(self.out_dir)}") from None
        for i, tpe in enumerate(out.tokens_per_expert[:len(self.moes)]):  # main layers' loads, for the plots
            self.load_acc[i] += tpe.to("cpu", self.load_acc.dtype)
        s, tokens = self.state, self.opts.batch_size * self.opts.seq_len
        s["indexer_trained"] |= stage != "dense"
        s["step"], s["tokens"] = s["step"] + 1, s["tokens"] + tokens
        self.sync_clock()
        record = {"kind": "step", "step": s["step"], "tokens": s["tokens"], "elapsed_s": round(self.elapsed(), 3),
                  "loss": loss.item(), "lm_loss": out.lm_loss.item(), "balance_loss": out.balance_loss.item(),
                  "lr": lr, "grad_norm": grad_norm.item(), "tok_s": round(tokens / (time.perf_counter() - t0), 1),
                  "stage": stage}
        if out.indexer_loss is not None:
            record["indexer_loss"] = out.indexer_loss.item()
        if out.mtp_loss is not None:
            record["mtp_loss"] = out.mtp_loss.item()  # lambda / D * sum_k CE_k, as added to the loss
            record["mtp_ce"] = [ce.item() for ce in out.mtp_losses]  # CE of depth k = 1..D
        self.log.append(record)
        return record

    def after_step(self, record: dict) -> None:
        """Progress bar, periodic evaluation and checkpoint (placed by progress), then the callback."""
        s, opts = self.state, self.opts
        if self.bar is not None:
            tok_s = record["tok_s"]
            left = (self.budget_s - self.elapsed() if opts.steps is None
                    else (opts.steps - s["step"]) * opts.batch_size * opts.seq_len / tok_s)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:.0f}",
                                 left=f"{int(max(left, 0)) // 60}m{int(max(left, 0)) % 60:02d}s", refresh=False)
            self.bar.update(1) if opts.steps is not None else self.bar.update(
                min(int(self.elapsed()), int(self.budget_s)) - self.bar.n)
        if self.progress_at(s["step"]) >= (s["evals_done"] + 1) / (opts.num_evals + 1) and not self.done():
            s["evals_done"] += 1
            self.last_eval = self.evaluate()
            if self.bar is not None:
                self.bar.write(f"step {s['step']}: val loss {self.last_eval['val_loss']:.3f} nats/token, "
                               f"{self.last_eval['val_bpb']:.3f} bits/byte")
        if ((opts.checkpoint_every and s["step"] % opts.checkpoint_every == 0)
                or (opts.checkpoint_minutes and self.elapsed() - self.last_save > 60 * opts.checkpoint_minutes)):
            self.save()
            self.last_save = self.elapsed()
        if self.callback is not None:
            self.callback(s["step"], record)

    def run(self) -> TrainResult:
        if self.state["step"] == 0:
            self.stage = self.schedule[0][0]
            set_dsa_stage(self.model, self.stage)
            self.evaluate()  # the untrained model: where the curves start
        self.sync_clock()
        self.last_save = self.elapsed()
        at_boundary = True  # False while a step is half done: an interrupt there must not be saved
        try:
            with _DeferInterrupt() as interrupt:
                while not self.done():
                    at_boundary = False
                    record = self.step()
                    at_boundary = True
                    self.after_step(record)
                    if interrupt.requested:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            self._close_bar()
            if self.state["step"] > 0 and at_boundary and self.dp is None:  # a save is a collective under DP
                path = self.save()
                print(f"interrupted after step {self.state['step']}: checkpoint saved in {path}; continue with "
                      "resume=True (--resume)")
            raise
        self._close_bar()
        self.last_eval = self.evaluate()
        path = self.save(finished=True)
        return TrainResult(out_dir=os.fspath(self.out_dir), checkpoint=os.fspath(path), step=self.state["step"],
                           tokens=self.state["tokens"], elapsed_s=self.state["elapsed_s"],
                           final_eval={"loss": self.last_eval["val_loss"], "bpb": self.last_eval["val_bpb"]},
                           num_params=self.num_params, stage=self.stage or self.schedule[-1][0],
                           log=read_log(self.log.path))

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
