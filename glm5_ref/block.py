"""The GLM-5 decoder block: pre-norm attention (MLA + DSA) and a pre-norm feed-forward (dense SwiGLU or MoE).

    h   = x + DSAAttention(RMSNorm(x))        input_layernorm, self_attn          (dsa.py, over mla.py)
    out = h + FFN(RMSNorm(h))                 post_attention_layernorm, mlp       SwiGLU (layers.py) in the
                                                                                  first layers, MoE (moe.py) after
Every main layer of the model (model.py) is one of these, and so is the body of the MTP layer (mtp.py), which
is why the block has a file of its own: both import it, neither imports the other.

The block is also the one place where an ``Execution`` (execution.py: absorbed or expanded MLA, dense or
sparse DSA, grouped or loop MoE, Triton, FP8) becomes the keyword arguments of the components, so that the
components themselves take plain arguments and copy out on their own.

Any attention module with MLA's call ``attn(x, positions, cache, absorbed=...) -> (B, T, D)`` can replace
``self_attn`` (the muon-split experiment swaps in grouped-query attention); DSAAttention additionally returns
its indexer loss through ``attend``. Parameter names are the released checkpoint's (model.layers.{i}.*).
Axes: B batch, T tokens, D hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.dsa import DSAAttention
from glm5_ref.execution import DEFAULT, Execution
from glm5_ref.layers import RMSNorm, SwiGLU
from glm5_ref.moe import MoE, MoEAux


class BlockOutput(NamedTuple):
    hidden: torch.Tensor                 # (B, T, D) the block's output (residual stream)
    indexer_loss: torch.Tensor | None    # () the indexer KL, when asked for
    moe_aux: MoEAux | None               # routing, loads and balance loss of an MoE block (None with a cache)


class DecoderLayer(nn.Module):
    def __init__(self, config: GLM5Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DSAAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                execution: Execution = DEFAULT, indexer_loss: bool = False) -> BlockOutput:
        """(B, T, D) -> BlockOutput. ``cache``: this layer's DSACache (or None); ``indexer_loss``: also return the
        indexer KL of this call (DSA attention only)."""
        h = self.input_layernorm(x)
        kl = None
        if isinstance(self.self_attn, DSAAttention):
            res = self.self_attn.attend(h, positions, cache, indexer_loss=indexer_loss,
                                        **execution.attention_kwargs(cache))
            h, kl = res.out, res.indexer_loss
        else:
            h = self.self_attn(h, positions, cache, absorbed=execution.absorbed_for(cache))
        x = x + h
        h = self.post_attention_layernorm(x)
        aux = None
        if self.is_moe and cache is None:  # routing statistics (loads, balance loss) are for training
            h, aux = self.mlp(h, return_aux=True, **execution.moe_kwargs())
        elif self.is_moe:  # a cached forward decodes: no statistics (about 20 aten calls per layer and token)
            h = self.mlp(h, **execution.moe_kwargs())
        else:
            h = self.mlp(h)
        return BlockOutput(x + h, kl, aux)
