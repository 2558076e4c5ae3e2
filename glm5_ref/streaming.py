"""Running a model larger than memory, one decoder layer at a time, reading only the experts a batch selects.

What it is
    ``LayerwiseGLM5(directory)`` keeps the embedding, the final norm and the LM head resident, and nothing else.
    A forward walks the layers; for each it reads the layer's attention, norms, router and shared expert from
    the checkpoint (hf_io.CheckpointReader: straight into their memory, FP8 dequantised on the way), runs the
    attention and the router, reads only the routed experts its tokens selected, runs them, and releases the
    layer before reading the next. It computes what ``GLM5ForCausalLM.from_pretrained(directory)`` with
    ``moe_impl="loop"`` computes, bitwise (tested), with or without a decode cache (GLM5Cache, kept in memory).

Memory: ``memory_cap_bytes`` bounds the weights held at once (resident + one layer's dense part + the experts
being run; activations and the cache not counted). Too small for the resident part, one layer's dense part and
one expert: ValueError naming the setting and the bytes needed. When the experts a batch selects do not fit
together, they are read and run in chunks that fit (the sum over experts is the same, in the same order).
``stats`` records the bytes read, the peak of weights held and the experts read per layer.

Bytes read per decoded token (batch 1, one forward per token): every layer's dense part plus K experts of each
MoE layer, i.e. the model's active parameters minus the resident embedding and head. For GLM-5 in bf16:
    attention + indexer + norms   78 x 0.174B params
    dense FFN (layers 0-2)         3 x 0.226B
    MoE layers (3-77)             75 x (router 1.6M + shared 37.7M + 8 of 256 experts x 37.7M)
    = 40.8B active - 0.95B head = 39.9B params = 79.8 GB per token in bf16 (39.9 GB in FP8): at 7 GB/s of NVMe,
    ~11 s per token (bf16) or ~6 s (FP8), whatever the RAM. A batch of B tokens reads each selected expert once,
    so its cost per token falls as the batch's experts overlap. (``bytes_per_token``.)

``keep_in_memory=True`` reads the stored tensors into memory once, as stored (an FP8 checkpoint stays FP8: one
byte per weight plus its scales), and dequantises each layer from there when it runs: FP8 storage with
dequantise-on-use, about half the memory of a bf16 model.
Not handled: overlapping the next layer's read with this layer's compute (prefetch), the MTP layer (so no
speculative decoding), training, the grouped expert path (the loop runs the experts one by one).
Axes: B batch, T tokens, N = B*T, d hidden, E experts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.execution import DEFAULT, Execution
from glm5_ref.fp8 import dequantize, is_fp8_weight, quantize
from glm5_ref.hf_io import INDEX_NAME, CheckpointReader, check_against, materialise, read_into
from glm5_ref.model import GLM5Cache, GLM5ForCausalLM


def bytes_per_token(config: GLM5Config, bytes_per_param: float = 2.0) -> float:
    """Weights read per decoded token by a layer-wise forward of batch 1: the active parameters of the decoder
    layers (K of E experts), without the resident embedding and LM head."""
    active = config.param_breakdown(active=True)
    return (sum(active.values()) - active["lm_head"]) * bytes_per_param


class _MemoryStore:
    """The checkpoint's tensors read into memory as stored (FP8 stays FP8), dequantised when read out."""

    def __init__(self, reader: CheckpointReader):
        self.infos, self.block, self.directory = reader.infos, reader.block, reader.directory
        self.raw = {n: read_into(i, torch.empty(i.shape, dtype=i.dtype)) for n, i in reader.infos.items()}
        self.scales = {n: read_into(i, torch.empty(i.shape, dtype=torch.float32)) for n, i in reader.scales.items()}

    def read(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name in self.scales:
            return dequantize(self.raw[name], self.scales[name], self.block, out=out)
        return out.copy_(self.raw[name])

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.raw.values(), *self.scales.values()))


class LayerwiseGLM5:
    """``model(input_ids, cache=None) -> logits (B, T, V)`` over a checkpoint directory, one layer in memory at a
    time (module docstring). ``generate(ids, n)``: greedy decoding over a GLM5Cache."""

    def __init__(self, directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 memory_cap_bytes: int | None = None, execution: Execution = DEFAULT, keep_in_memory: bool = False):
        reader = CheckpointReader(directory)
        self.config = GLM5Config.from_hf(directory)
        with torch.device("meta"):
            self.skeleton = GLM5ForCausalLM(dataclasses.replace(self.config, num_nextn_predict_layers=0)).to(dtype)
        self.dtype, self.execution = dtype, execution
        names = {n: n for n in self.skeleton.state_dict(keep_vars=True)}
        check_against(self.skeleton, reader, names, skip=(self.skeleton.mtp_prefix(),))  # every layer, up front
        self.reader = _MemoryStore(reader) if keep_in_memory else reader
        self.layer_names = [[n for n in names if n.startswith(f"model.layers.{i}.")]
                            for i in range(self.config.num_hidden_layers)]
        resident = {n: n for n in names if not n.startswith("model.layers.")}
        own = self.skeleton.state_dict(keep_vars=True)
        self._meta = dict(own)  # the meta tensors a released layer returns to

        def nbytes(ns):
            return sum(own[n].numel() * own[n].element_size() for n in ns)

        self._expert_bytes = nbytes([n for n in names if ".mlp.experts.0." in n and n.startswith("model.layers.")]
                                    ) // max(1, self.config.num_moe_layers)
        dense = max(nbytes([n for n in ns if ".mlp.experts." not in n]) for ns in self.layer_names)
        self.memory_cap_bytes = memory_cap_bytes
        need = nbytes(resident) + dense + (self._expert_bytes if self.config.num_moe_layers else 0)
        if memory_cap_bytes is not None and memory_cap_bytes < need:
            raise ValueError(f"memory_cap_bytes = {memory_cap_bytes}: too small for one layer; the embedding, norm "
                             f"and head ({nbytes(resident)} bytes), the largest layer's dense part ({dense}) and one "
                             f"expert ({self._expert_bytes}) need {need} bytes")
        self._resident = materialise(self.skeleton, self.reader, resident)
        self.stats = {"bytes_read": self._resident, "peak_held_bytes": self._resident, "experts_read": []}

    # ---- holding and releasing weights -------------------------------------------------------------------------
    def _hold(self, names: list[str]) -> int:
        held = materialise(self.skeleton, self.reader, {n: n for n in names}, own=self._meta)
        self.stats["bytes_read"] += held
        return held

    def _release(self, names: list[str]) -> None:
        for n in names:
            path, _, attr = n.rpartition(".")
            module = self.skeleton.get_submodule(path)
            (module._parameters if attr in module._parameters else module._buffers)[attr] = self._meta[n]

    def _note(self, held: int) -> None:
        self.stats["peak_held_bytes"] = max(self.stats["peak_held_bytes"], self._resident + held)

    # ---- the forward ----------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> GLM5Cache:
        return GLM5Cache(self.config, batch_size, max_len, dtype=self.dtype)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, cache: GLM5Cache | None = None) -> torch.Tensor:
        self.skeleton._check_ids(input_ids, cache)
        x = self.skeleton.model.embed_tokens(input_ids)  # (B, T, d)
        read = []
        for i, layer in enumerate(self.skeleton.model.layers):
            x = self._layer(i, layer, x, cache.layers[i] if cache is not None else None, read)
        self.stats["experts_read"] = read
        return self.skeleton.lm_head(self.skeleton.model.norm(x)).float()  # (B, T, V)

    def _layer(self, i: int, layer: nn.Module, x: torch.Tensor, cache, read: list) -> torch.Tensor:
        dense = [n for n in self.layer_names[i] if ".mlp.experts." not in n]
        held = self._hold(dense)
        self._note(held)
        try:  # DecoderLayer.forward, with the MoE's routed experts read as they are needed
            h = layer.input_layernorm(x)
            x = x + layer.self_attn.attend(h, None, cache, **self.execution.attention_kwargs(cache)).out
            h = layer.post_attention_layernorm(x)
            if not layer.is_moe:
                read.append([])
                return x + layer.mlp(h)
            B, T, d = h.shape
            y = self._experts(i, layer.mlp, h.reshape(B * T, d), held, read)  # (N, d)
            return x + y.reshape(B, T, d)
        finally:
            self._release(dense)

    def _experts(self, i: int, moe, h: torch.Tensor, held: int, read: list) -> torch.Tensor:
        """MoE.forward with impl="loop": the same gate, the same experts in the same order, read in chunks."""
        idx, weight, _ = moe.gate(h)  # (N, K), (N, K)
        chosen = [e for e, n in enumerate(torch.bincount(idx.flatten(), minlength=len(moe.experts)).tolist()) if n]
        room = len(chosen) if self.memory_cap_bytes is None else max(
            1, (self.memory_cap_bytes - self._resident - held) // max(1, self._expert_bytes))
        y = torch.zeros_like(h)  # (N, d)
        for start in range(0, len(chosen), room):
            chunk = chosen[start:start + room]
            names = [n for e in chunk for n in self.layer_names[i] if f".mlp.experts.{e}." in n]
            self._note(held + self._hold(names))
            for e in chunk:
                tok, slot = torch.where(idx == e)  # tokens that chose e, and in which of their K slots
                y.index_add_(0, tok, (moe.experts[e](h[tok]) * weight[tok, slot, None]).to(h.dtype))
            self._release(names)
        read.append(chosen)
        return y + moe.shared_experts(h) if moe.shared_experts is not None else y

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a cache: one layer-wise forward per new token."""
        B, T = input_ids.shape
        cache, ids = self.new_cache(B, T + max_new_tokens), input_ids
        for step in range(max_new_tokens):
            logits = self(ids if step == 0 else ids[:, -1:], cache=cache)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ids


def write_synthetic_checkpoint(directory: str | os.PathLike, config: GLM5Config, dtype: torch.dtype = torch.bfloat16,
                               seed: int = 0, max_shard_bytes: int = 2**30, fp8: bool = False) -> int:
    """A checkpoint of random weights (N(0, initializer_range), norms at one) in the released layout, generated
    and written one shard at a time, so it may be far larger than memory; atomically (temporary directory, then
    rename). ``fp8``: the block-wise FP8 layout. Returns the bytes written."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        skeleton = GLM5ForCausalLM(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.hf_state_dict().items()}
    directory = os.path.abspath(os.fspath(directory))
    tmp = directory + ".tmp-synthetic"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    gen = torch.Generator().manual_seed(seed)
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = 1
        for s in shape:
            n *= s
        if shards[-1] and size + n * 2 > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n * 2
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                t = torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)
            else:
                t = torch.randn(shape, generator=gen) * config.initializer_range
            t = t.float() if name.endswith(("mlp.gate.weight", "e_score_correction_bias")) else t.to(dtype)
            if fp8 and is_fp8_weight(name, shape):
                tensors[name], tensors[name + "_scale_inv"] = quantize(t)
            else:
                tensors[name] = t
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        del tensors
    cfg = config.to_hf(str(dtype).split(".")[-1])
    if fp8:
        cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                      "activation_scheme": "dynamic"}
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    with open(os.path.join(tmp, INDEX_NAME), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2, sort_keys=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return total
