"""The options of a classroom training run (run.py): presets, the DSA stage schedule, every knob with its checks.

    resolve_config       a preset name or a GLM5Config, its vocabulary widened to the project tokenizer's
    parse_dsa_schedule   "dense:0.8,warmup:0.05,sparse:0.15" -> [(stage, cumulative end), ...]; stage_at reads it
    RunOptions           budgets (minutes / steps), optimizer and schedule, batch, DSA stages, evaluations,
                         checkpoints, MTP, seed, device; ``validate`` raises ValueError naming the option
    matched_dense_config the all-dense twin of a config with the same active parameters (compare_dense, bench)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from glm5_ref.config import GLM5Config
from glm5_ref.devices import resolve_device
from glm5_ref.tokenizer import VOCAB_SIZE
from glm5_ref.training.engine import STAGES
from glm5_ref.training.optim import OPTIMIZERS


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


@dataclass
class RunOptions:
    """Every option of a classroom run (the module docstring explains the budget, stage and MTP ones)."""
    minutes: float | None = None
    steps: int | None = None
    optimizer: str = "adamw"
    lr: float = 2e-3
    batch_size: int = 16
    seq_len: int = 256
    warmup: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dsa_stage: str | list = "dense"
    num_evals: int = 10
    eval_windows_n: int = 64
    eval_batch_size: int = 16
    checkpoint_every: int | None = None
    checkpoint_minutes: float = 2.0
    mtp_depths: int | None = None
    mtp_start: float = 0.0
    bias_update_speed: float | None = None
    seed: int = 0
    init_from: str | None = None      # start from this checkpoint's weights (fresh optimizer, schedule, data order)
    repeat_fraction: float = 0.0      # rows that carry a span written twice (synthetic.RepeatMixSampler; 0: none)
    random_copy: bool = False         # train on the pure copy task instead (synthetic.RandomCopySampler)
    copy_probe: int = 0               # spans of the copy probe at every evaluation (synthetic.copy_probe; 0: none)
    # where one process trains (devices.resolve_device: "auto", "cpu", "cuda", "mps"; bf16 autocast on GPUs).
    # None = the CPU, or under data parallelism the rank's own device. Not "auto" by default: the CPU gives the
    # same fp32 numbers on every machine (the tests, the recipe and the shipped model rely on it).
    device: str | None = None
    # the CPU's steps (forward, backward, Muon's Newton-Schulz) under bf16 autocast: on CPUs with AMX or
    # AVX512-BF16 about 1.3x less CPU time per classroom step (measured 2026-12-02); slower where bf16 is emulated.
    # Evaluations stay fp32. Off by default (the tests' exact-resume and fp32 numbers).
    cpu_bf16: bool = False

    def validate(self, config: GLM5Config) -> None:
        if self.minutes is None and self.steps is None:
            raise ValueError("train: give minutes (a wall-clock budget) or steps (a step count), or both")
        if self.minutes is not None and (isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float))
                                         or not math.isfinite(self.minutes) or self.minutes <= 0):
            raise ValueError(f"minutes: expected a number > 0, got {self.minutes!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a number > 0, got {value!r}")
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"warmup, min_lr_ratio: expected 0 <= warmup < 1 and 0 <= min_lr_ratio <= 1, got "
                             f"{self.warmup!r}, {self.min_lr_ratio!r}")
        for name in ("steps", "batch_size", "seq_len", "num_evals", "eval_windows_n"):
            value = getattr(self, name)
            if (value is not None or name != "steps") and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 1):
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.seq_len + 1 > config.max_position_embeddings:
            raise ValueError(f"seq_len: {self.seq_len} + 1 > max_position_embeddings = {config.max_position_embeddings}")
        if (isinstance(self.repeat_fraction, bool) or not isinstance(self.repeat_fraction, (int, float))
                or not 0 <= self.repeat_fraction <= 1):
            raise ValueError(f"repeat_fraction: expected a fraction of the rows in [0, 1], got "
                             f"{self.repeat_fraction!r}")
        if isinstance(self.copy_probe, bool) or not isinstance(self.copy_probe, int) or self.copy_probe < 0:
            raise ValueError(f"copy_probe: expected a number of spans >= 0, got {self.copy_probe!r}")
        for name in ("cpu_bf16", "random_copy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        if not 0 <= self.mtp_start <= 1:
            raise ValueError(f"mtp_start: expected a fraction of the run in [0, 1], got {self.mtp_start!r}")
        parse_dsa_schedule(self.dsa_stage)
        if self.device is not None:
            resolve_device(self.device)  # ValueError naming device: an unknown name, or not on this machine
        if self.init_from is not None and not isinstance(self.init_from, (str, os.PathLike)):
            raise ValueError(f"init_from: expected a checkpoint path or None, got {type(self.init_from).__name__}")

    def record(self, config: GLM5Config) -> dict:
        """The options as stored in the checkpoint (JSON-safe)."""
        out = dataclasses.asdict(self) | {"config": config.name}
        out["init_from"] = os.fspath(self.init_from) if self.init_from is not None else None
        out["dsa_stage"] = self.dsa_stage if isinstance(self.dsa_stage, str) else [list(p) for p in self.dsa_stage]
        out["eval_windows"] = out.pop("eval_windows_n")
        out["device"] = str(self.device) if self.device is not None else None
        return out


def matched_dense_config(config: GLM5Config) -> GLM5Config:
    """The all-dense twin of ``config`` with matched ACTIVE parameters: every layer dense, its SwiGLU as wide as
    the K routed + S shared experts a token uses ((K + S) * moe_intermediate_size), so the dense FFN has exactly
    the parameters one token touches in an MoE layer (the router's E * d are not matched). Attention, MTP and the
    rest are unchanged; the MTP block (layer index L >= first_k_dense_replace) stays an MoE block."""
    width = (config.num_experts_per_tok + config.n_shared_experts) * config.moe_intermediate_size
    return dataclasses.replace(config, name=f"{config.name}-dense", first_k_dense_replace=config.num_hidden_layers,
                               intermediate_size=width)
