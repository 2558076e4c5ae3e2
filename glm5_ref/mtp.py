"""Multi-token prediction: ONE MTP layer, unrolled over three depths with shared weights (GLM-5 report, "MTP").

What it is (DeepSeek-V3 report, arXiv 2412.19437, section 2.2, eqs. 21-25; GLM-5 Table 10)
    Depth k = 1..D predicts the token k+1 steps ahead. It combines the previous depth's hidden state with the
    embedding of the token k steps ahead and runs one full decoder block (MLA with DSA, MoE):

        h'^k_i = eh_proj [ enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i) ]      (that order, as in the checkpoint)
        h^k    = Block(h'^k)                                              (causal over i)
        P^k_i  = softmax(lm_head(shared_head.norm(h^k_i)))  predicts t_{i+k+1}
        L_MTP  = (lambda / D) * sum_k CE(P^k, t)        L = L_LM + L_MTP (+ balance losses)

    DeepSeek-V3 trains D separate modules; GLM-5 trains ONE module unrolled over D = 3 depths with shared
    parameters, so the same layer can draft 3 tokens recursively at inference and is trained the way it is
    used (DeepSeek-V3 trained 1 depth but drafted 2, which hurts acceptance of the second). The embedding and
    the LM head are the main model's (shared, not copied).

Choices where the paper is silent
    * h^0 is the main model's output AFTER its final norm: inference engines (vLLM, SGLang) pass that to the
      MTP layer of the released checkpoint, so the released weights expect it. hnorm normalises it again.
      ``MTP_HIDDEN = "normed"`` records the choice (tested).
    * lambda = config.mtp_loss_weight = 0.3 (GLM-4.5's value; the GLM-5 paper states none), equal weight per
      depth. Each depth's CE is a mean over its valid positions (T - k - 1 of them).
    * The MTP block is an MoE block when the config's layer index L is past first_k_dense_replace (GLM-5: yes);
      its balance loss joins the model's and its expert loads join the bias update (model.moe_layers()).
    * Checkpoint layout: the layer lives at model.layers.{num_hidden_layers}.* (enorm, hnorm, eh_proj,
      input_layernorm, self_attn.*, post_attention_layernorm, mlp.*, shared_head.norm). Copies of the
      embedding and head that some checkpoints store there (embed_tokens, shared_head.head) are accepted and
      dropped on load: the paper says the MTP head shares the main head's parameters.

Not handled: several distinct MTP modules (DeepSeek-V3 with D > 1 separate layers), tree drafting.
Axes: B batch, T tokens, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.block import BlockOutput, DecoderLayer
from glm5_ref.config import GLM5Config
from glm5_ref.execution import DEFAULT, Execution
from glm5_ref.layers import RMSNorm

MTP_HIDDEN = "normed"  # h^0 = the main model's final-norm output (see the module docstring)


class MTPLayer(nn.Module):
    """The one MTP module: enorm, hnorm, eh_proj, a decoder block, shared_head.norm."""

    def __init__(self, config: GLM5Config):
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.enorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = DecoderLayer(config, config.num_hidden_layers)  # the same block as the main layers
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(d, eps=config.rms_norm_eps)

    def step(self, h_prev: torch.Tensor, next_embeds: torch.Tensor, positions=None, cache=None,
             execution: Execution = DEFAULT, indexer_loss: bool = False) -> BlockOutput:
        """One depth: h_prev (B, T, D) and the embeddings of the tokens one step ahead (B, T, D) -> BlockOutput
        (h (B, T, D), the block's indexer KL or None, its MoE aux or None)."""
        x = self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(h_prev)], dim=-1))  # (B, T, D)
        return self.block(x, positions, cache, execution, indexer_loss)

    def logits(self, h: torch.Tensor, lm_head: nn.Linear) -> torch.Tensor:
        return lm_head(self.shared_head.norm(h)).float()  # (B, T, V)

    def hf_name(self, name: str) -> str:
        """Our parameter name -> its name relative to model.layers.{L} in the checkpoint."""
        return name[len("block."):] if name.startswith("block.") else name

    def our_name(self, hf_name: str) -> str | None:
        """Checkpoint name (relative to model.layers.{L}) -> ours; None for the shared copies we drop."""
        if hf_name.startswith(("embed_tokens.", "shared_head.head.")):
            return None
        if hf_name.startswith(("enorm.", "hnorm.", "eh_proj.", "shared_head.")):
            return hf_name
        return "block." + hf_name


def mtp_losses(mtp: MTPLayer, embed: nn.Embedding, lm_head: nn.Linear, h0: torch.Tensor, labels: torch.Tensor,
               depths: int, indexer_loss: bool = False, execution: Execution = DEFAULT):
    """Unroll the shared MTP layer over ``depths`` depths during training.

    h0 (B, T, D): the main model's normed output; labels (B, T): the token ids (-100 = ignore).
    Returns (per-depth CE losses [D], balance loss sum, indexer KLs [..], tokens_per_expert summed over depths).
    Depth k reads positions i = 0..T-k-1 and predicts labels[i + k + 1] for i <= T-k-2.
    """
    T = h0.shape[1]
    if depths < 1 or depths > T - 2:
        raise ValueError(f"mtp depths: expected 1 <= depths <= T - 2 = {T - 2}, got {depths}")
    h, ce, kls, balance, load = h0, [], [], h0.new_zeros(()), None
    ids = labels.clamp_min(0)  # ignored positions still need an embedding row; their CE is masked
    for k in range(1, depths + 1):
        n = T - k  # positions this depth can read
        h, kl, aux = mtp.step(h[:, :n], embed(ids[:, k:k + n]), torch.arange(n, device=h0.device),
                              execution=execution, indexer_loss=indexer_loss)
        logits = mtp.logits(h[:, :n - 1], lm_head)  # (B, n-1, V): position i predicts t_{i+k+1}
        ce.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, k + 1:].reshape(-1),
                                  ignore_index=-100))
        kls += [kl] if kl is not None else []
        if aux is not None:
            balance = balance + aux.balance_loss
            load = aux.tokens_per_expert if load is None else load + aux.tokens_per_expert
    return ce, balance, kls, load
