"""The models that ship with the project: ``load_pretrained("classroom-base")`` (or "classroom-chat") -> (model,
tokenizer).

A shipped checkpoint lives in glm5_ref/assets/checkpoints/NAME/ in the released Hugging Face layout
(config.json, model.safetensors in bf16) with its model card (README.md: the recipe, tokens, wall time, machine,
seed, measured numbers) and metrics.json (the same numbers, and the sha256 of model.safetensors). It was made
by the project's own recipe command (``python -m glm5_ref recipe base``, then ``recipe ship``), never by hand.

Loading checks the weights' sha256 against metrics.json before reading them: a missing, truncated or altered
file raises ValueError saying how to rebuild it, and nothing half-loaded is ever returned. The model comes back
in eval mode, in fp32 by default (the bf16 weights are exact in fp32), with the attention it was trained with
(``Execution(sparse=True)`` after DSA training).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.tokenizer import load_tokenizer

CHECKPOINTS = Path(__file__).resolve().parent / "assets" / "checkpoints"
SHIPPED = ("classroom-base", "classroom-chat")
REBUILD = {"classroom-base": "python -m glm5_ref recipe base && python -m glm5_ref recipe ship",
           "classroom-chat": "python -m glm5_ref post-train --resume"}
MAX_BYTES = 40 * 2**20  # the most a shipped model.safetensors may take


def checkpoint_dir(name: str) -> Path:
    """The folder of a shipped checkpoint (ValueError for an unknown name)."""
    if name not in SHIPPED:
        raise ValueError(f"name: expected one of the shipped checkpoints {SHIPPED}, got {name!r}")
    return CHECKPOINTS / name


def read_metrics(name_or_dir: str | os.PathLike) -> dict:
    """metrics.json of a shipped checkpoint (by name or folder)."""
    folder = checkpoint_dir(name_or_dir) if isinstance(name_or_dir, str) and name_or_dir in SHIPPED \
        else Path(name_or_dir)
    path = folder / "metrics.json"
    if not path.is_file():
        raise ValueError(f"{os.fspath(folder)}: no metrics.json, so this is not a shipped checkpoint")
    return json.loads(path.read_text())


def verify(folder: str | os.PathLike, rebuild: str = REBUILD["classroom-base"]) -> dict:
    """Check that config.json, model.safetensors and metrics.json are there and the weights' sha256 is the
    recorded one; returns the metrics. ValueError (with how to rebuild) otherwise."""
    folder = Path(folder)
    missing = [f for f in ("config.json", "model.safetensors", "metrics.json") if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"shipped checkpoint {os.fspath(folder)} is missing {missing}; restore it from git "
                         f"(git checkout -- {os.fspath(folder)}) or rebuild it: {rebuild}")
    metrics = read_metrics(folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    if digest != metrics["sha256"]:
        raise ValueError(f"shipped checkpoint {os.fspath(folder)}: model.safetensors has sha256 {digest[:16]}..., "
                         f"its model card records {metrics['sha256'][:16]}...: the file is truncated or altered. "
                         f"Restore it from git or rebuild it: {rebuild}")
    return metrics


def load_pretrained(name: str = "classroom-base", dtype: torch.dtype = torch.float32, directory=None):
    """(GLM5ForCausalLM in eval mode, the project's tiktoken Encoding) for a shipped checkpoint (``directory``
    overrides where it is read from, e.g. a freshly shipped copy)."""
    folder = Path(directory) if directory is not None else checkpoint_dir(name)
    metrics = verify(folder, REBUILD.get(name, REBUILD["classroom-base"]))
    model = GLM5ForCausalLM.from_pretrained(folder, dtype=dtype)
    model.set_execution(sparse=metrics.get("attention", "dense") == "sparse")
    return model.eval(), load_tokenizer()


def write_shipped(model: GLM5ForCausalLM, dest: str | os.PathLike, metrics: dict, card: Callable[[dict], str],
                  rebuild: str) -> dict:
    """Write ``model`` as a shipped checkpoint to ``dest``: bf16 model.safetensors (at most MAX_BYTES),
    config.json, metrics.json (``metrics`` plus the sha256, sizes, machine and date) and README.md
    (``card(metrics)``). Everything is written to DEST.tmp-ship first and swapped in whole, then verified; the
    completed metrics are returned."""
    from safetensors.torch import save_file

    dest = Path(dest)
    stage = dest.with_name(dest.name + ".tmp-ship")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    weights = stage / "model.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.hf_state_dict().items()}, os.fspath(weights),
              metadata={"format": "pt"})
    if weights.stat().st_size > MAX_BYTES:
        size = weights.stat().st_size
        shutil.rmtree(stage)
        raise ValueError(f"{dest.name}: model.safetensors is {size / 2**20:.1f} MB, over the {MAX_BYTES >> 20} MB "
                         "a shipped checkpoint may take")
    os.chmod(weights, 0o644)
    (stage / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2, sort_keys=True) + "\n")
    metrics = dict(metrics)
    metrics.setdefault("attention", "sparse" if model.execution.sparse else "dense")
    metrics.setdefault("config", model.config.name)
    metrics.update(sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                   params=sum(p.numel() for p in model.parameters()), index_topk=model.config.index_topk,
                   experts=model.config.n_routed_experts,
                   python=platform.python_version(),
                   machine=f"{platform.machine()} Linux, {os.cpu_count()} cores, torch {torch.__version__}, fp32",
                   measured=time.strftime("%Y-%m-%d", time.gmtime()))
    (stage / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    (stage / "README.md").write_text(card(metrics))
    old = dest.with_name(dest.name + ".tmp-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(stage, dest)
    shutil.rmtree(old, ignore_errors=True)
    verify(dest, rebuild)
    return metrics
