"""A training run's files: the checkpoint folder (written atomically), trainer_state.json, the JSONL log.

    out_dir/checkpoint/  config.json + safetensors (model.save_pretrained, the released layout),
                         training_state.pt (optimizer, sampler, RNG, step ...), trainer_state.json (readable facts)
    out_dir/log.jsonl    one JSON line per step and per evaluation
A checkpoint is written into checkpoint.tmp-stage/ and swapped with checkpoint/ by renames, so a crash leaves
the previous one (possibly at checkpoint.tmp-old/, which find_checkpoint also finds). run.py drives it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from glm5_ref.model import GLM5ForCausalLM

CHECKPOINT = "checkpoint"
STATE_FILE = "training_state.pt"
INFO_FILE = "trainer_state.json"
LOG_FILE = "log.jsonl"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder for ``path``: a checkpoint itself, or a training run's out_dir holding one.
    A crash in the middle of the final rename leaves the previous checkpoint at ``checkpoint.tmp-old``: found too."""
    path = Path(path)
    for candidate in (path, path / CHECKPOINT, path / (CHECKPOINT + ".tmp-old")):
        if (candidate / "config.json").is_file() and ((candidate / "model.safetensors.index.json").is_file()
                                                      or (candidate / "model.safetensors").is_file()):
            return candidate
    raise ValueError(f"{os.fspath(path)} is not a checkpoint (no config.json + safetensors there or in "
                     f"{os.fspath(path / CHECKPOINT)})")


def read_trainer_state(path: str | os.PathLike) -> dict:
    """trainer_state.json of a checkpoint (or of a run's out_dir); {} if there is none."""
    try:
        with open(find_checkpoint(path) / INFO_FILE) as fh:
            return json.load(fh)
    except (ValueError, OSError, json.JSONDecodeError):
        return {}


def save_checkpoint(out_dir: Path, model: GLM5ForCausalLM, state: dict, info: dict) -> Path:
    """Write everything into checkpoint.tmp-stage/, then swap it with checkpoint/ (old one removed last)."""
    final = out_dir / CHECKPOINT
    stage = out_dir / (CHECKPOINT + ".tmp-stage")
    old = out_dir / (CHECKPOINT + ".tmp-old")
    shutil.rmtree(stage, ignore_errors=True)
    model.save_pretrained(stage)
    torch.save(state, stage / STATE_FILE)
    (stage / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(stage, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


class RunLog:
    """out_dir/log.jsonl, one JSON object per line, appended as the run goes (a no-op writer when not
    ``enabled``: the data-parallel ranks other than 0)."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled = Path(out_dir) / LOG_FILE, enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def clear(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def truncate(self, step: int) -> None:
        if self.enabled:
            truncate_log(self.path, step)


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if not log_path.exists():
        return
    kept = [r for r in read_log(log_path) if r.get("step", 0) <= step]
    tmp = log_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, log_path)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The JSONL log of a run (a path to log.jsonl or to the run's out_dir); a torn last line is skipped."""
    path = Path(path)
    path = path / LOG_FILE if path.is_dir() else path
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
