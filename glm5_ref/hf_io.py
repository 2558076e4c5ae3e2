"""Reading and writing checkpoints in the released Hugging Face layout.

The layout (zai-org/GLM-5 on the Hub):

    config.json                              GLM5Config.to_hf()
    model-00001-of-000NN.safetensors ...     the tensors, split into shards of at most `max_shard_bytes`
    model.safetensors.index.json             {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}

A small checkpoint may instead be one `model.safetensors` without an index; both are read.

Writing is all-or-nothing: everything goes into a sibling temporary directory that is renamed into place
at the end, so an interrupted save never leaves a half-written checkpoint where a good one was.
Reading is lazy: tensors are opened with safetensors' `safe_open` and read one by one, so a caller can
stream a large checkpoint into a model that was built on the meta device.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def shard_state_dict(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in insertion order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive number, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_checkpoint(directory: str | os.PathLike, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
                    max_shard_bytes: int = 5 * 2**30, extra_files: dict[str, bytes] | None = None) -> None:
    """Write config.json + sharded safetensors + index atomically (temporary directory, then rename)."""
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    for name, t in state_dict.items():
        if t.device.type == "meta":
            raise ValueError(f"save_checkpoint: tensor {name!r} is on the meta device (no data to save)")
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.abspath(directory) + ".tmp-save"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    shards = shard_state_dict(state_dict, max_shard_bytes)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in shard.items()}, os.path.join(tmp, fname),
                  metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    with open(os.path.join(tmp, INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
    for fname, data in (extra_files or {}).items():
        with open(os.path.join(tmp, fname), "wb") as fh:
            fh.write(data)
    # swap into place: the old checkpoint (if any) is removed only after the new one is complete
    old = os.path.abspath(directory) + ".tmp-old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(directory):
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_tensor_names(directory: str | os.PathLike) -> dict[str, str]:
    """name -> shard file, from the index (or the single file). ValueError if the directory is no checkpoint."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint directory not found: {directory}")
    index_path = os.path.join(directory, INDEX_NAME)
    single_path = os.path.join(directory, SINGLE_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(directory, f))})
        if missing:
            raise ValueError(f"{index_path} names shard files that do not exist: {missing}")
        return dict(weight_map)
    if os.path.isfile(single_path):
        from safetensors import safe_open

        with safe_open(single_path, framework="pt") as f:
            return {k: SINGLE_NAME for k in f.keys()}
    raise ValueError(f"{directory} is not a checkpoint: neither {INDEX_NAME} nor {SINGLE_NAME} is there")


def iter_checkpoint_tensors(directory: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, shard by shard (lazy: one tensor in memory at a time)."""
    from safetensors import safe_open

    directory = os.fspath(directory)
    by_file: dict[str, list[str]] = {}
    for name, fname in checkpoint_tensor_names(directory).items():
        by_file.setdefault(fname, []).append(name)
    for fname in sorted(by_file):
        with safe_open(os.path.join(directory, fname), framework="pt") as f:
            for name in by_file[fname]:
                yield name, f.get_tensor(name)


def to_transformers_layout(state_dict: dict[str, torch.Tensor], num_hidden_layers: int) -> dict[str, torch.Tensor]:
    """The checkpoint's per-expert tensors fused the way transformers' GlmMoeDsaForCausalLM keeps them in memory:
    mlp.experts.gate_up_proj (E, 2I, d) = [gate_proj; up_proj] per expert, and mlp.experts.down_proj (E, d, I).
    Every other name is unchanged; an MTP layer (model.layers.{num_hidden_layers}.*) is left out, as
    transformers ignores it."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in state_dict.items():
        if name.startswith(f"model.layers.{num_hidden_layers}."):
            continue
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.")
            e, proj, _ = rest.split(".")  # "{e}.gate_proj.weight"
            experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = t
        else:
            out[name] = t
    for prefix, by_expert in experts.items():
        order = sorted(by_expert)
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]]) for e in order])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([by_expert[e]["down_proj"] for e in order])
    return out
