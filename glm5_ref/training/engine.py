"""The training engine: one learning-rate schedule, the DSA stages, one optimizer step, and ``Trainer``.

Every training loop of the project runs on this file: the classroom run and the train CLI (run.py), the demo,
the experiments (muon-split, long-context, quantization), the recipe's stages (apps/recipe.py), the RL warm
start and updates (apps/tool_env.py, apps/agentic.py), post-training (apps/post_train/) and
scripts/compare_dense.py.

One step (``train_step``; GLM-5 report section 2 and appendix A, glm5_spec.md sections 4-7)
    loss, out = loss_fn(model, batch)     default: out = model(batch, labels=batch, indexer_loss=stage != "dense")
                                          loss = L_LM + L_bal (+ L_MTP) (+ L_I); the indexer KL L_I alone in "warmup"
    loss.backward(); clip the global gradient norm; optimizer.step(); zero the gradients
    b_e += gamma * sign(mean load - load_e)   every MoE layer, from out.tokens_per_expert (aux-loss-free balancing;
                                              not in "warmup", where the router is frozen with the rest)

The schedule (``lr_factor``), the one used everywhere
    lr(p) = lr * p / w                                                        p < w (linear warm-up)
          = lr * (r + (1 - r) (1 + cos(pi (p - w) / (1 - w))) / 2)           afterwards (cosine down to r * lr)
    p is the progress of the run when the step is taken: (s + 1) / total for step s = 0, 1, ..., so the first
    step already has a positive lr and the last one ends exactly at r * lr. A run with a wall-clock budget
    passes its own progress (elapsed / budget).

DSA stages (DeepSeek-V3.2 section 2.1.1, which GLM-5 follows after mid-training; ``set_dsa_stage``)
    dense    Execution(sparse=False): plain MLA, no indexer loss (the indexer gets no gradient).
    warmup   sparse=False, only the indexers trainable, indexer loss alone: the indexer learns to imitate the
             dense attention distribution (KL), nothing else changes, no router-bias update either.
    sparse   sparse=True, detach_indexer_input=True, indexer loss on: top-k attention; the model learns from
             L_LM (+ L_bal, L_MTP), the indexer from its KL on the selected keys only.

``Trainer`` bundles a model with its optimizer (training/optim.py: AdamW, Muon or Muon Split), the LambdaLR
schedule, gradient clipping, the router-bias rate and an optional data-parallel wrapper; ``Trainer.step(batch)``
is one step and ``state_dict()`` what exact resume needs. Files (checkpoints, logs) are checkpoint.py's, the
evaluation is data.evaluate, the classroom run with its budgets and stages is run.py.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, NamedTuple

import torch

from glm5_ref.devices import autocast, model_device
from glm5_ref.dsa import freeze_all_but_indexers
from glm5_ref.training.optim import OPTIMIZERS, build_optimizer

STAGES = ("dense", "warmup", "sparse")


def lr_factor(progress: float, warmup: float, min_lr_ratio: float) -> float:
    """Linear warm-up to 1 over the first ``warmup`` of the run, then cosine down to ``min_lr_ratio``."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return p / warmup
    t = (p - warmup) / max(1.0 - warmup, 1e-12)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def set_dsa_stage(model: torch.nn.Module, stage: str) -> None:
    """Put ``model`` (a GLM5ForCausalLM, MTP layer included) into a DSA training stage: its execution
    (model.set_execution) and which parameters train (only the indexers in "warmup", all otherwise)."""
    if stage not in STAGES:
        raise ValueError(f"dsa stage: expected one of {STAGES}, got {stage!r}")
    model.set_execution(sparse=stage == "sparse", detach_indexer_input=stage == "sparse")
    if stage == "warmup":
        freeze_all_but_indexers(model)
    else:
        for p in model.parameters():
            p.requires_grad_(True)


def lm_loss(model, batch: torch.Tensor, stage: str = "dense", **forward_kwargs):
    """The default objective: next-token prediction on ``batch`` (B, T + 1), both input and labels (the model
    shifts), with the losses of the DSA ``stage``. Returns (loss, GLM5Output)."""
    out = model(batch, labels=batch, indexer_loss=stage != "dense", **forward_kwargs)
    return (out.indexer_loss if stage == "warmup" else out.loss), out


def train_step(model, optimizer: torch.optim.Optimizer, batch, stage: str = "dense", grad_clip: float | None = 1.0,
               bias_update_speed: float | None = None, data_parallel=None, loss_fn: Callable | None = None,
               *, mixed_precision: bool = False, **forward_kwargs):
    """One optimizer step (module docstring); returns (out, loss, grad norm). ``loss_fn(model, batch) ->
    (loss, out)`` replaces the default objective (out may be None: no router-bias update then). With
    ``data_parallel`` (a distributed.DataParallel that prepared ``model``) ``batch`` is the global batch: each
    rank trains on its slice, losses and expert loads are the combined batch's; without it a tensor ``batch``
    moves to the model's device. ``mixed_precision``: the forward
    under devices.autocast of the model's device (bf16 on CUDA / MPS, a no-op on the CPU)."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    dp = data_parallel
    x = dp.shard(batch) if dp is not None else batch.to(model_device(model)) if torch.is_tensor(batch) else batch
    net = dp.network(model) if dp is not None else model
    with autocast(model_device(model)) if mixed_precision else contextlib.nullcontext():
        loss, out = loss_fn(net, x) if loss_fn is not None else lm_loss(net, x, stage, **forward_kwargs)
    reported = dp.reduce_losses(out, loss, stage) if dp is not None else loss
    if not torch.isfinite(reported):
        raise FloatingPointError(f"loss is {reported.item()}: the run diverged; lower the learning rate")
    loss.backward()
    if dp is not None:
        dp.after_backward(model)
        grad_norm = dp.clip_grad_norm(model, grad_clip)
    else:
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loads = getattr(out, "tokens_per_expert", None)
    if dp is not None and loads:
        loads = out.tokens_per_expert = dp.global_loads(loads)  # every rank's tokens
    if loads and stage != "warmup":  # the router bias is part of the model: frozen in the indexer warm-up
        with torch.no_grad():  # main layers, then the MTP block's when this step trained it (the model knows)
            if dp is not None:
                dp.update_router_biases(model, loads, bias_update_speed)
            else:
                model.update_router_biases(loads, bias_update_speed)
    return out, reported.detach(), grad_norm


class StepResult(NamedTuple):
    out: object              # what the objective returned (a GLM5Output for the default one)
    loss: torch.Tensor       # () the loss that was minimised (mean over ranks under data parallelism)
    grad_norm: torch.Tensor  # () the global gradient norm before clipping
    lr: float                # the peak-relative lr of this step times the peak lr (first param group)


class Trainer:
    """A model, its optimizer and lr schedule, and the step (module docstring).

    optimizer          "adamw", "muon", "muon_split" (training/optim.py) or a ready torch optimizer
    total_steps        the schedule's length in steps; or ``progress(step) -> [0, 1]`` for other clocks
    warmup, min_lr_ratio   the schedule (``lr_factor``); warmup 0 and min_lr_ratio 1 give a constant lr
    grad_clip          global gradient-norm clip (None: no clipping, the norm is still reported)
    bias_update_speed  gamma of the router-bias update (None: config.bias_update_speed)
    data_parallel      a distributed.DataParallel (which prepares the model and builds its optimizer)
    mixed_precision    every forward under bf16 autocast where the model's device has it (devices.autocast)
    """

    def __init__(self, model, optimizer="adamw", lr: float = 2e-3, *, weight_decay: float = 0.1,
                 total_steps: int | None = None, progress: Callable[[int], float] | None = None,
                 warmup: float = 0.05, min_lr_ratio: float = 0.1, grad_clip: float | None = 1.0,
                 bias_update_speed: float | None = None, data_parallel=None, mixed_precision: bool = False,
                 **optimizer_kwargs):
        if (total_steps is None) == (progress is None):
            raise ValueError("Trainer: give total_steps (a step count) or progress (a function of the step), not "
                             f"both or neither (got total_steps={total_steps!r}, progress={progress!r})")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(f"total_steps: expected a positive integer, got {total_steps!r}")
        if not 0 <= warmup < 1 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"warmup, min_lr_ratio: expected 0 <= warmup < 1 and 0 <= min_lr_ratio <= 1, got "
                             f"{warmup!r}, {min_lr_ratio!r}")
        self.model, self.data_parallel = model, data_parallel
        self.grad_clip, self.bias_update_speed, self.mixed_precision = grad_clip, bias_update_speed, mixed_precision
        self.warmup, self.min_lr_ratio = warmup, min_lr_ratio
        self.progress = progress if progress is not None else (lambda step: (step + 1) / total_steps)
        if isinstance(optimizer, str):
            if optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer: expected one of {OPTIMIZERS} or a torch optimizer, got {optimizer!r}")
            make = data_parallel.build_optimizer if data_parallel is not None else build_optimizer
            optimizer = make(model, optimizer, lr, weight_decay=weight_decay, **optimizer_kwargs)
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(self.progress(step), self.warmup, self.min_lr_ratio))
        self.step_count = 0

    @property
    def lr(self) -> float:
        """The lr the next step will use (first param group)."""
        return self.scheduler.get_last_lr()[0]

    def step(self, batch, stage: str = "dense", loss_fn: Callable | None = None, **forward_kwargs) -> StepResult:
        """One step on ``batch`` (see train_step), then the schedule advances."""
        lr = self.lr
        out, loss, grad_norm = train_step(self.model, self.optimizer, batch, stage, self.grad_clip,
                                          self.bias_update_speed, self.data_parallel, loss_fn,
                                          mixed_precision=self.mixed_precision, **forward_kwargs)
        self.scheduler.step()
        self.step_count += 1
        return StepResult(out, loss, grad_norm, lr)

    def state_dict(self) -> dict:
        """Optimizer, scheduler and step count (under data parallelism the optimizer's state is gathered by
        DataParallel.optimizer_states instead)."""
        opt = self.optimizer.state_dict() if self.data_parallel is None else None
        return {"optimizer": opt, "scheduler": self.scheduler.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        if self.data_parallel is not None:
            self.data_parallel.load_optimizer_state(self.optimizer, state)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = state.get("step", self.scheduler.last_epoch)
