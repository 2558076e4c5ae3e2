"""Reading and writing checkpoints in the released Hugging Face layout, bf16 or block-wise FP8.

The layout (zai-org/GLM-5 on the Hub):

    config.json                              GLM5Config.to_hf()
    model-00001-of-000NN.safetensors ...     the tensors, split into shards of at most `max_shard_bytes`
    model.safetensors.index.json             {"metadata": {"total_size": bytes}, "weight_map": {name: shard}}

A small checkpoint may instead be one `model.safetensors` without an index; both are read. The FP8 layout
(zai-org/GLM-5-FP8, DeepSeek-V3; fp8.py) adds quantization_config to config.json and stores each quantised
weight as X.weight (F8_E4M3) beside X.weight_scale_inv (F32, one scale per 128 x 128 block).

Writing is all-or-nothing: everything goes into a sibling temporary directory that is renamed into place
at the end, so an interrupted save never leaves a half-written checkpoint where a good one was.

Reading never holds a tensor twice. ``CheckpointReader`` parses the safetensors headers (8 bytes of length, a JSON
header with each tensor's dtype, shape and byte range, then the raw bytes) and reads each tensor straight into
the memory that will keep it (``read_into``): same dtype, the bytes land there directly; another dtype, they are
converted 16 MiB at a time; FP8, dequantised one block row at a time. No memory map is involved, so nothing is
resident but the destination (safetensors' ``safe_open`` maps the file and keeps touched pages resident until it
is closed, which doubles the peak of a bf16 -> fp32 load). Every name, shape, dtype and FP8 pairing is checked
from the headers before a byte of data is read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glm5_ref.config import fp8_block_size
from glm5_ref.fp8 import dequantize, scale_shape

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


# ---- reading without a memory map --------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
CHUNK_BYTES = 16 * 2**20  # the staging buffer of a dtype-converting read


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, dtype, shape, absolute byte range [start, end)."""
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorInfo]:
    """name -> TensorInfo from one .safetensors file's header (no tensor data is read)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {meta.get('dtype')!r}, expected one of "
                             f"{sorted(SAFETENSORS_DTYPES)}")
        dtype, shape = SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"])
        start, end = meta["data_offsets"]
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} and dtype {meta['dtype']} spans "
                             f"{end - start} bytes")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + start, 8 + n + end)
    return out


def _readinto(fh, buffer: torch.Tensor) -> None:
    view = memoryview(buffer.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise ValueError(f"{fh.name}: file ends early (truncated checkpoint)")
        got += n


def read_into(info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
    """Read a stored tensor into ``out`` (contiguous, its shape, any dtype): the bytes themselves when the dtypes
    agree, else converted CHUNK_BYTES at a time."""
    if tuple(out.shape) != info.shape or not out.is_contiguous():
        raise ValueError(f"read_into out: expected a contiguous tensor of shape {info.shape}, got "
                         f"{tuple(out.shape)}")
    flat = out.reshape(-1)
    with open(info.path, "rb") as fh:
        fh.seek(info.start)
        if out.dtype == info.dtype:
            _readinto(fh, flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8))
            return out
        size = torch.empty((), dtype=info.dtype).element_size()
        per_chunk = max(1, CHUNK_BYTES // size)
        staging = torch.empty(min(per_chunk, flat.numel()) * size, dtype=torch.uint8)
        for i in range(0, flat.numel(), per_chunk):
            n = min(per_chunk, flat.numel() - i)
            _readinto(fh, staging[:n * size])
            flat[i:i + n].copy_(staging[:n * size].view(info.dtype))
    return out


class CheckpointReader:
    """The tensors of a checkpoint directory, read on demand into their final memory.

    ``infos``: name -> TensorInfo of every stored tensor except FP8 scales; ``scales``: weight name -> the
    TensorInfo of its weight_scale_inv; ``block``: the FP8 block (None: no quantization_config). The pairing is
    checked here: a scale without its weight, an FP8 weight without its scale, a scale of the wrong shape, FP8
    tensors without a quantization_config, or an unsupported one are ValueErrors naming the tensor or setting."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        names = checkpoint_tensor_names(self.directory)
        config_path = os.path.join(self.directory, "config.json")
        self.config = {}
        if os.path.isfile(config_path):
            with open(config_path) as fh:
                self.config = json.load(fh)
        qc = self.config.get("quantization_config")
        self.block = fp8_block_size(qc) if qc is not None else None
        headers: dict[str, dict[str, TensorInfo]] = {}
        infos: dict[str, TensorInfo] = {}
        for name, fname in names.items():
            if fname not in headers:
                headers[fname] = read_header(os.path.join(self.directory, fname))
            if name not in headers[fname]:
                raise ValueError(f"{self.directory}: the index puts tensor {name!r} in {fname}, which has no such "
                                 "tensor")
            infos[name] = headers[fname][name]
        self.scales = {n[:-len("_scale_inv")]: i for n, i in infos.items() if n.endswith(".weight_scale_inv")}
        self.infos = {n: i for n, i in infos.items() if not n.endswith(".weight_scale_inv")}
        for name, scale in self.scales.items():
            if name not in self.infos:
                raise ValueError(f"checkpoint tensor {name}_scale_inv: an FP8 scale without its weight {name!r}")
            if self.block is None:
                raise ValueError(f"checkpoint tensor {name}_scale_inv: FP8 scales but config.json has no "
                                 "quantization_config")
            expected = scale_shape(self.infos[name].shape, self.block) if len(self.infos[name].shape) == 2 else None
            if tuple(scale.shape) != expected or not scale.dtype.is_floating_point:
                raise ValueError(f"checkpoint tensor {name}_scale_inv: expected a float scale of shape {expected} for "
                                 f"a {self.infos[name].shape} weight in blocks of {self.block}, got "
                                 f"{scale.dtype} {tuple(scale.shape)}")
        for name, info in self.infos.items():
            if info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and name not in self.scales:
                raise ValueError(f"checkpoint tensor {name!r} is {info.dtype} but has no weight_scale_inv beside it")

    def stored_bytes(self, name: str) -> int:
        return self.infos[name].nbytes + (self.scales[name].nbytes if name in self.scales else 0)

    def read(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` with the tensor ``name`` (FP8 weights dequantised block row by block row)."""
        if name not in self.scales:
            return read_into(self.infos[name], out)
        info = self.infos[name]
        q = read_into(info, torch.empty(info.shape, dtype=info.dtype))  # 1 byte per weight
        scale = read_into(self.scales[name], torch.empty(self.scales[name].shape, dtype=torch.float32))
        return dequantize(q, scale, self.block, out=out)

    def load(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.read(name, torch.empty(self.infos[name].shape, dtype=dtype))


def mismatch_message(missing: list[str], unexpected: list[str], mismatched: list[str], strict: bool) -> str | None:
    """The one error text for a checkpoint that does not fit its model (None when it fits)."""
    problems = [f"{what} ({len(names)}): {names[:20]}{' ...' if len(names) > 20 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
                if names and (strict or what == "shape mismatch")]
    if problems and strict and missing and all(k.startswith("mtp.") for k in missing):
        problems.append("every missing tensor belongs to the MTP layer: the checkpoint has none (transformers "
                        "writes GLM-5 without it). Load it with strict=False (the MTP layer keeps its random "
                        "initialisation) or build the model with num_nextn_predict_layers=0")
    return "checkpoint does not match the model: " + "; ".join(problems) if problems else None


def check_against(model: nn.Module, reader: CheckpointReader, names: dict[str, str], skip: tuple[str, ...] = (),
                  strict: bool = True) -> list[str]:
    """Check a checkpoint against ``model`` from the headers alone. ``names``: checkpoint name -> state_dict name
    of every tensor the model wants; stored names starting with a ``skip`` prefix are ignored. Missing,
    unexpected, shape or non-float dtype: ValueError listing them (missing only with ``strict``). Returns the
    missing checkpoint names."""
    own = model.state_dict(keep_vars=True)
    given = {n for n in reader.infos if not n.startswith(skip)}
    missing = sorted(n for n in names if n not in given)
    unexpected = sorted(given - set(names))
    mismatched = sorted(f"{n}: checkpoint {reader.infos[n].shape} vs model {tuple(own[names[n]].shape)}"
                        for n in names if n in given and reader.infos[n].shape != tuple(own[names[n]].shape))
    mismatched += sorted(f"{n}: checkpoint dtype {reader.infos[n].dtype}, expected floating point" for n in names
                         if n in given and not reader.infos[n].dtype.is_floating_point)
    message = mismatch_message([names[n] for n in missing], unexpected, mismatched, strict)
    if message:
        raise ValueError(f"{reader.directory}: {message}")
    return missing


def materialise(model: nn.Module, reader, names: dict[str, str], views: dict[str, torch.Tensor] | None = None,
                init_std: float = 0.02, own: dict[str, torch.Tensor] | None = None) -> int:
    """Read each checkpoint tensor of ``names`` (checkpoint name -> state_dict name) into new memory of its meta
    tensor's dtype, or into ``views[name]``, and put it in the model; file by file, in byte order. A name the
    reader does not have gets a fresh initialisation (N(0, init_std) for matrices, ones for norm gains, zeros
    otherwise). ``reader``: a CheckpointReader or anything with its ``infos`` and ``read``; ``own``: the model's
    state_dict(keep_vars=True) before the call, when the caller has it. Returns bytes held."""
    views, own, held = views or {}, model.state_dict(keep_vars=True) if own is None else own, 0
    order = sorted(names, key=lambda n: (reader.infos[n].path, reader.infos[n].start) if n in reader.infos else ("", 0))
    for n in order:
        meta = own[names[n]]
        out = views.get(n)
        out = torch.empty(meta.shape, dtype=meta.dtype) if out is None else out
        if n in reader.infos:
            reader.read(n, out)
        else:  # strict=False: a fresh initialisation, as the model's own
            with torch.no_grad():
                norm_gain = out.dim() == 1 and "norm" in n and n.endswith(".weight")
                out.normal_(0.0, init_std) if out.dim() >= 2 else out.fill_(1.0 if norm_gain else 0.0)
        path, _, attr = names[n].rpartition(".")
        module = model.get_submodule(path)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(out, requires_grad=meta.requires_grad)
        else:
            module._buffers[attr] = out
        held += out.numel() * out.element_size()
    return held


def load_into_meta(model: nn.Module, reader: CheckpointReader, names: dict[str, str], skip: tuple[str, ...] = (),
                   views: dict[str, torch.Tensor] | None = None, strict: bool = True,
                   init_std: float = 0.02) -> list[str]:
    """``check_against`` then ``materialise``: everything is checked before a byte of data is read. Returns the
    missing names (with ``strict=False``; they got a fresh initialisation)."""
    missing = check_against(model, reader, names, skip, strict)
    materialise(model, reader, names, views, init_std)
    return missing
