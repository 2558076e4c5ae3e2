"""The GLM-5 decoder: assembly, loss, decode caches, generation, checkpoints in the released layout.

What it is (GLM-5 report, Table 10; glm5_spec.md section 2)
    x_0 = Emb(ids)
    x   = x + DSAAttention(RMSNorm(x))          every layer: MLA with the lightning indexer's top-k (dsa.py)
    x   = x + FFN(RMSNorm(x))                   dense SwiGLU for layers < first_k_dense_replace, MoE after (moe.py)
    logits = lm_head(RMSNorm(x_L))              untied from the embedding

Module and parameter names are those of the released Hugging Face checkpoint (model.embed_tokens.weight,
model.layers.{i}.self_attn.*, model.layers.{i}.mlp.experts.{e}.gate_proj.weight, model.norm.weight,
lm_head.weight, ...), so ``state_dict()`` IS the checkpoint layout and ``from_pretrained`` needs no renaming.

Choices
    * ``loss`` = mean next-token cross-entropy (labels shifted inside, -100 ignored, as transformers does)
      + the MoE sequence-wise balance losses (alpha = config.aux_loss_alpha_seq, summed over MoE layers)
      + the indexer KL (mean over layers) when ``indexer_loss=True``. Each part is also returned alone.
    * ``hidden_states`` is the last layer's output BEFORE the final norm; the MTP layer reads it AFTER the norm,
      model.norm(hidden_states), as vLLM and SGLang feed the released weights (mtp.py, ``MTP_HIDDEN``).
    * The MTP layer's input at position 0 keeps the embedding of token 1. vLLM (deepseek_mtp.py) zeroes the MTP
      input embedding wherever positions == 0, so its first MTP position sees only hnorm(h_0); we train and
      draft with the embedding there, the same in both (``MTP_POSITION0 = "embedding"``; tested), because
      position 0 is an ordinary position of our MTP training loss. Only that one position differs from vLLM.
    * ``pad_token_id`` (config) is the embedding's padding_idx: its row starts at zero and gets no gradient.
    * How the model computes (absorbed or expanded MLA, sparse or dense DSA, grouped or loop MoE, Triton, FP8)
      is one ``Execution`` (execution.py), held in ``model.execution`` and changed with ``set_execution``; by
      default decoding runs the absorbed MLA path over the latent cache and the full forward the expanded
      path. Both compute the same function (tested).
    * ``generate`` samples with a torch.Generator seeded by ``seed``, so a seed fixes the output.
    * With ``config.num_nextn_predict_layers = 1`` the model owns the MTP layer (mtp.py) as ``self.mtp``;
      ``hf_state_dict()`` names it model.layers.{num_hidden_layers}.* as the checkpoint does. With labels,
      ``loss`` adds the MTP loss (lambda / D) * sum_k L_k over ``config.num_mtp_depths`` depths.

Checkpoints: ``save_pretrained`` (bf16/fp32, or ``fp8=True``: the block-wise FP8 layout of GLM-5-FP8) and
``from_pretrained``, which builds the model on the meta device and reads every tensor once, straight into the
memory that keeps it (hf_io.py; the routed experts straight into the MoE's packed storage), in the requested
dtype, dequantising FP8 on load; ``layers=[...]`` loads only some decoder layers (the rest are ``NotLoaded``).
A model larger than memory runs layer by layer with streaming.py; quantised execution is quant.py.

Not handled: padding / attention masks inside a batch (a batch shares one length), beam search,
tensor/pipeline parallelism (see distributed/), keeping FP8 weights in memory (streaming.py can).
Axes: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.block import DecoderLayer
from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSACache
from glm5_ref.execution import DEFAULT, Execution
from glm5_ref.fp8 import quantize_state_dict
from glm5_ref.hf_io import CheckpointReader, load_into_meta, mismatch_message, save_checkpoint
from glm5_ref.layers import RMSNorm
from glm5_ref.moe import MoE, update_router_bias
from glm5_ref.mtp import MTPLayer, mtp_losses
from glm5_ref.sampling import check_sampling, new_generator, pad_after_stop, sample_token

MTP_POSITION0 = "embedding"  # the MTP input at position 0 keeps its token embedding (vLLM zeroes it; docstring)


@dataclass
class GLM5Output:
    logits: torch.Tensor                           # (B, T, V) fp32
    loss: torch.Tensor | None = None               # lm_loss + balance_loss (+ indexer_loss), when labels given
    lm_loss: torch.Tensor | None = None            # next-token cross-entropy (nats per token)
    balance_loss: torch.Tensor | None = None       # sum over MoE layers of the sequence-wise balance loss (0 with
                                                   # a cache: decoding computes no routing statistics)
    indexer_loss: torch.Tensor | None = None       # mean over layers of the indexer KL (indexer_loss=True)
    mtp_loss: torch.Tensor | None = None           # (lambda / D) * sum of the per-depth MTP losses
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # CE of each MTP depth k = 1..D
    hidden_states: torch.Tensor | None = None      # (B, T, D) last layer output, before the final norm
    tokens_per_expert: list[torch.Tensor] = field(default_factory=list)  # per model.moe_layers() entry (E,);
                                                   # empty for a forward with a cache


class GLM5Cache:
    """One DSACache (MLA latents + indexer keys) per layer, all at the same length."""

    def __init__(self, config: GLM5Config, batch_size: int, max_len: int, dtype=torch.float32, device=None):
        self.layers = [DSACache.for_config(config, batch_size, max_len, dtype=dtype, device=device)
                       for _ in range(config.num_hidden_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def truncate(self, new_length: int) -> None:
        """Roll every layer back to ``new_length`` tokens (speculative decoding rejects drafts this way)."""
        for layer in self.layers:
            layer.truncate(new_length)


class NotLoaded(nn.Module):
    """A decoder layer that ``from_pretrained(..., layers=[...])`` left out: no weights, and it refuses to run."""
    is_moe = False

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        raise ValueError(f"model.layers.{self.layer_idx} was not loaded (from_pretrained(..., layers=...)): run the "
                         "loaded layers one at a time, model.model.layers[i](x, ...), or load them all")


class GLM5Model(nn.Module):
    def __init__(self, config: GLM5Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class GLM5ForCausalLM(nn.Module):
    """GLM-5: ``model(input_ids, labels=None, cache=None, ...) -> GLM5Output``; ``generate``; HF checkpoints."""

    def __init__(self, config: GLM5Config):
        super().__init__()
        self.config = config
        self.model = GLM5Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTPLayer(config) if config.num_nextn_predict_layers else None  # multi-token prediction
        self.execution = DEFAULT  # how forward computes (execution.py); change it with set_execution
        self._init_weights()

    def set_execution(self, execution: Execution | None = None, **changes) -> Execution:
        """Set how this model computes: a whole ``Execution``, or some of its fields (``sparse=False``,
        ``moe_impl="loop"`` ...). The one place execution choices change for a model; returns the new one."""
        base = self.execution if execution is None else execution
        if not isinstance(base, Execution):
            raise TypeError(f"execution: expected an Execution, got {type(base).__name__}")
        self.execution = base.replace(**changes)
        return self.execution

    @torch.no_grad()
    def _init_weights(self) -> None:
        """N(0, initializer_range) for every matrix (as transformers initialises GLM-5); RMSNorm gains start at
        one. The MoE router and experts already initialise themselves this way (in place: their packing stays)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.device.type != "meta":
                nn.init.normal_(module.weight, std=self.config.initializer_range)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()  # as transformers initialises the pad row

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: GLM5Cache | None = None,
                indexer_loss: bool = False, mtp_depths: int | None = None,
                execution: Execution | None = None) -> GLM5Output:
        """Logits (and, with labels, the losses). ``mtp_depths``: MTP depths to train (default
        config.num_mtp_depths when the model has an MTP layer; 0 = none). ``execution``: how to compute
        (execution.py); default ``self.execution``, which ``set_execution`` changes for the whole model."""
        ex = self.execution if execution is None else execution
        B, T = self._check_ids(input_ids, cache)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        kls, auxes = [], []
        for i, layer in enumerate(self.model.layers):  # positions: cache length + 0 .. T-1 (each layer's default)
            x, kl, aux = layer(x, None, cache.layers[i] if cache is not None else None, ex, indexer_loss)
            kls += [kl] if kl is not None else []
            auxes += [aux] if aux is not None else []
        normed = self.model.norm(x)  # (B, T, D)
        logits = self.lm_head(normed).float()  # (B, T, V)
        out = GLM5Output(logits=logits, hidden_states=x, tokens_per_expert=[a.tokens_per_expert for a in auxes])
        out.balance_loss = sum((a.balance_loss for a in auxes), logits.new_zeros(()))
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            out.lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                          ignore_index=-100)
            depths = self.config.num_mtp_depths if mtp_depths is None else mtp_depths
            if self.mtp is not None and depths > 0 and T > 2:
                ce, balance, mtp_kls, load = mtp_losses(self.mtp, self.model.embed_tokens, self.lm_head, normed,
                                                        labels, min(depths, T - 2), indexer_loss, ex)
                out.mtp_losses = ce
                out.mtp_loss = self.config.mtp_loss_weight / len(ce) * torch.stack(ce).sum()
                out.balance_loss = out.balance_loss + balance
                kls += mtp_kls
                if load is not None:
                    out.tokens_per_expert.append(load)
        if indexer_loss:
            out.indexer_loss = torch.stack(kls).mean()
        if labels is not None:
            out.loss = out.lm_loss + out.balance_loss
            out.loss = out.loss + (out.mtp_loss if out.mtp_loss is not None else 0.0)
            out.loss = out.loss + (out.indexer_loss if indexer_loss else 0.0)
        return out

    def moe_layers(self) -> list[MoE]:
        """The MoE modules, in the order of GLM5Output.tokens_per_expert (main layers, then the MTP block's)."""
        layers = [l.mlp for l in self.model.layers if l.is_moe]
        if self.mtp is not None and self.mtp.block.is_moe:
            layers.append(self.mtp.block.mlp)
        return layers

    def update_router_biases(self, tokens_per_expert: list[torch.Tensor], gamma: float | None = None) -> None:
        """The aux-loss-free balancing step (moe.update_router_bias) on every MoE layer, after an optimizer step.
        With MTP, pass the loads of a forward that trained it (the MTP entry is last)."""
        for moe, load in zip(self.moe_layers(), tokens_per_expert):
            update_router_bias(moe, load, gamma)

    def _check_ids(self, input_ids: torch.Tensor, cache: GLM5Cache | None) -> tuple[int, int]:
        V, limit = self.config.vocab_size, self.config.max_position_embeddings
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected shape (B, T) with T >= 1, got {shape}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids: expected an integer tensor, got {input_ids.dtype}")
        if input_ids.numel() and not torch.compiler.is_compiling() and (
                int(input_ids.min()) < 0 or int(input_ids.max()) >= V):
            raise ValueError(f"input_ids: expected token ids in [0, vocab_size = {V}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        start = cache.length if cache is not None else 0
        if start + input_ids.shape[1] > limit:
            raise ValueError(f"input_ids: {start} cached + {input_ids.shape[1]} new tokens exceed "
                             f"max_position_embeddings = {limit}")
        if cache is not None and start + input_ids.shape[1] > cache.max_len:
            raise ValueError(f"cache: full, length {start} + {input_ids.shape[1]} new tokens > max_len {cache.max_len}")
        return input_ids.shape

    def new_cache(self, batch_size: int, max_len: int) -> GLM5Cache:
        p = self.lm_head.weight
        return GLM5Cache(self.config, batch_size, max_len, dtype=p.dtype, device=p.device)

    # ---- generation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop_tokens: list[int] | None = None, seed: int | None = None, use_cache: bool = True,
                 return_logprobs: bool = False):
        """Greedy at temperature 0, else sampling (temperature, nucleus top_p) with a seeded generator
        (sampling.py). Returns ids (B, T + new); with return_logprobs also (B, new) log-probabilities of the
        emitted tokens under the distribution they were drawn from. A sequence that emitted a stop token repeats
        it. The ids come back on the model's device, whatever device ``input_ids`` was on (under bf16 autocast,
        devices.autocast, the caller's choice). Speculative decoding with the MTP layer:
        speculative.speculative_generate(model, ...)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected a non-negative integer, got {max_new_tokens!r}")
        check_sampling(temperature, top_p)
        B, T = self._check_ids(input_ids, None)
        input_ids = input_ids.to(self.lm_head.weight.device)  # the prompt, and all made from it, on the model's device
        gen = new_generator(seed, input_ids.device)
        stop = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long, device=input_ids.device)
        cache = self.new_cache(B, T + max_new_tokens) if use_cache and max_new_tokens else None
        ids, logprobs = input_ids, []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            step_ids = ids if cache is None or step == 0 else ids[:, -1:]
            logits = self(step_ids, cache=cache).logits[:, -1]  # (B, V)
            token, logprob = sample_token(logits, temperature, top_p, gen)  # (B,), (B,)
            logprob = torch.where(done, torch.zeros_like(logprob), logprob)  # after a stop: nothing drawn
            ids = torch.cat([ids, token[:, None]], dim=1)
            logprobs.append(logprob)
            if stop.numel():
                done = done | torch.isin(token, stop)
                if bool(done.all()):  # every sequence stopped: the rest is its stop token
                    logprobs += [torch.zeros_like(logprob)] * (max_new_tokens - step - 1)
                    break
        ids = pad_after_stop(ids, T, stop_tokens, T + max_new_tokens)
        if return_logprobs:
            return ids, (torch.stack(logprobs, 1) if logprobs else ids.new_zeros(B, 0, dtype=torch.float32))
        return ids

    # ---- checkpoints in the released Hugging Face layout -------------------------------------------------
    def mtp_prefix(self) -> str:
        return f"model.layers.{self.config.num_hidden_layers}."

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict() with the MTP layer named as in the checkpoint: mtp.X -> model.layers.{L}.X'."""
        return {self._hf_name(name): t for name, t in self.state_dict().items()}

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> dict[str, list[str]]:
        """Load tensors named as in the released checkpoint. Unknown or missing names and shape mismatches
        raise ValueError listing them (with strict); nothing is loaded unless everything fits."""
        own = self.state_dict()
        main, dropped = {}, []
        for k, v in state_dict.items():
            if k.startswith(self.mtp_prefix()) and self.mtp is not None:
                ours = self.mtp.our_name(k[len(self.mtp_prefix()):])
                if ours is None:  # a stored copy of the shared embedding or head
                    dropped.append(k)
                    continue
                k = "mtp." + ours
            main[k] = v
        missing = sorted(set(own) - set(main))
        unexpected = sorted(set(main) - set(own))
        mismatched = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                            for k, v in main.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
        message = mismatch_message(missing, unexpected, mismatched, strict)
        if message:
            raise ValueError(message)
        on_meta = any(p.device.type == "meta" for p in own.values())
        # cast to the model's dtypes (meta tensors carry theirs); a meta-built model takes the tensors themselves
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in main.items() if k in own}, strict=strict,
                             assign=on_meta)
        return {"missing": missing, "unexpected": unexpected, "dropped_shared_copies": sorted(dropped)}

    def save_pretrained(self, directory: str | os.PathLike, max_shard_bytes: int = 5 * 2**30, fp8: bool = False,
                        block: tuple[int, int] = (128, 128)) -> None:
        """config.json + sharded safetensors + index, written atomically (hf_io.save_checkpoint). ``fp8``: the
        block-wise FP8 layout of GLM-5-FP8 (fp8.py: e4m3 weights + weight_scale_inv per ``block``)."""
        state, config = self.hf_state_dict(), self.config.to_hf(str(self.lm_head.weight.dtype).split(".")[-1])
        if fp8:
            state = quantize_state_dict(state, block)
            config = {**config, "dtype": "bfloat16", "quantization_config": {
                "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block), "activation_scheme": "dynamic"}}
        save_checkpoint(directory, state, config, max_shard_bytes=max_shard_bytes)

    def _hf_name(self, name: str) -> str:
        """state_dict name -> checkpoint name (the MTP layer lives at model.layers.{L})."""
        return self.mtp_prefix() + self.mtp.hf_name(name[len("mtp."):]) if name.startswith("mtp.") else name

    def _packed_expert_views(self) -> dict[str, torch.Tensor]:
        """Allocate every MoE's packed expert storage (moe.py: gate|up (E, 2I, d), down (E, d, I)) and return the
        per-expert views the checkpoint is read into, so the packing needs no copy afterwards."""
        views = {}
        for name, moe in self.named_modules():
            if not isinstance(moe, MoE):
                continue
            E, I, d = len(moe.experts), self.config.moe_intermediate_size, self.config.hidden_size
            dtype = moe.experts[0].down_proj.weight.dtype
            gate_up, down = torch.empty(E, 2 * I, d, dtype=dtype), torch.empty(E, d, I, dtype=dtype)
            prefix = self._hf_name(name + ".experts.")
            for e in range(E):
                views[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :I]
                views[f"{prefix}{e}.up_proj.weight"] = gate_up[e, I:]
                views[f"{prefix}{e}.down_proj.weight"] = down[e]
            moe._packed = (gate_up, down)  # what moe._pack_experts builds, without its copy
        return views

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: torch.dtype | None = None, strict: bool = True,
                        layers: list[int] | None = None) -> "GLM5ForCausalLM":
        """Read config.json, build the model on the meta device, then read every tensor once, straight into the
        memory that keeps it, in ``dtype`` (default fp32; the router stays fp32): a bf16 -> fp32 load never holds
        the bf16 copy, and an FP8 checkpoint (GLM-5-FP8) is dequantised block row by block row (hf_io.py).

        ``layers``: load only these decoder layers, plus the embedding, the final norm and the head (the MTP layer
        too when its index, num_hidden_layers, is listed); the others become ``NotLoaded``. A laptop can then run
        and inspect real GLM-5 layers: ``model.model.layers[i](x)``. Names, shapes and dtypes are checked from the
        file headers before any data is read: a ValueError lists the problems, nothing half-loaded is returned."""
        reader = CheckpointReader(directory)
        config = GLM5Config.from_hf(directory)
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        L = config.num_hidden_layers
        skip = [model.mtp_prefix() + "embed_tokens.", model.mtp_prefix() + "shared_head.head."]  # shared copies
        if layers is not None:
            keep = set(layers)
            bad = sorted(i for i in keep if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= L)
            if bad or not (config.num_nextn_predict_layers or L not in keep):
                raise ValueError(f"layers: expected decoder layer indices in [0, {L}) (and {L}, the MTP layer, if "
                                 f"the config has one), got {sorted(layers, key=str)}")
            for i in sorted(set(range(L)) - keep):
                model.model.layers[i] = NotLoaded(i)
                skip.append(f"model.layers.{i}.")
            if L not in keep and model.mtp is not None:
                model.mtp, skip = None, skip + [f"model.layers.{L}."]
        names = {model._hf_name(n): n for n in model.state_dict(keep_vars=True)}
        load_into_meta(model, reader, names, tuple(skip), model._packed_expert_views(), strict,
                       config.initializer_range)
        for moe in model.moe_layers():
            moe._packed_addresses = [p.data_ptr() for p in moe._expert_params()]
        leftover = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
        if leftover:
            raise ValueError(f"checkpoint {os.fspath(directory)} left tensors unset: {leftover[:20]}")
        return model
