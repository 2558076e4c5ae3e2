"""GLM-5's mixture of experts: a sigmoid router with bias-corrected selection, 256 routed SwiGLU experts of which
each token uses 8, one shared expert, and the two load-balancing mechanisms (aux-loss-free bias, sequence loss).

725 of GLM-5's 744B parameters sit in routed experts; the router decides which 8 of 256 each token uses. The
formulas are DeepSeek-V3's (report arXiv 2412.19437, section 2.1.2, eqs. 12-20), which GLM-5 adopts with
E = 256, K = 8, one shared expert, n_group = topk_group = 1, norm_topk_prob, scale 2.5 (glm5_spec.md section 5):

    s_{t,e} = sigmoid(u_t . w_e)                        router affinity, fp32                       (eq. 15)
    sel_t   = TopK_K(s_{t,e} + b_e)                     b = e_score_correction_bias: SELECTION only (eq. 16)
    g_{t,e} = rho * s_{t,e} / (sum_{e' in sel_t} s_{t,e'} + 1e-20)   e in sel_t; rho = routed_scaling_factor
    y_t     = sum_{e in sel_t} g_{t,e} FFN_e(u_t) + FFN_shared(u_t)                                 (eq. 12-13)
  group-limited routing (n_group > 1): a group's score is the sum of its two best s + b; only the topk_group
  best groups stay eligible (a no-op for GLM-5's 1/1, kept for DeepSeek-V3's 8/4).
  Balancing, aux-loss-free: after each step b_e += gamma * sign(mean load - load_e), no gradient (gamma 1e-3).
  Balancing, sequence-wise loss (eqs. 17-20), per sequence of T tokens, averaged over the batch:
    L_bal = alpha * sum_e f_e P_e,  f_e = E/(K T) sum_t 1[e in sel_t],  P_e = (1/T) sum_t s_{t,e} / sum_e' s_{t,e'}

Two twins compute the experts, and a test holds them equal (forward and gradients):
  impl="loop"     for each expert that got tokens: gather them, run its SwiGLU, add back weighted by the gate.
  impl="grouped"  sort the N*K token-slots by expert (one argsort), gather the tokens into that order once,
                  run all experts as ONE grouped GEMM per projection over the contiguous segments
                  (torch._grouped_mm; gate and up fused), scale by the gate weights, and index_add back to
                  the tokens (unpermute + combine). Where no grouped GEMM can run (fp64; widths whose rows are
                  not 16-byte aligned; non-bf16 on GPU) the same segments go through one expert call each.
                  On an accelerator, with fewer token-slots than experts (decoding a few tokens), the non-empty
                  segments run one call each on views of the packed weights: no call for the empty ones (on
                  the CPU the grouped GEMM is faster there too).
A grouped GEMM needs all experts' weights in one (E, ...) tensor. The checkpoint (and ``impl="loop"``) want one
SwiGLU per expert, so at build time the experts' parameters become VIEWS of two packed tensors, gate|up
(E, 2I, d) (the layout transformers calls gate_up_proj) and down (E, d, I): no copy at forward time, gradients
reach the per-expert parameters through ``_PackedView``. Anything that replaces a parameter (``.to(dtype)``,
``load_state_dict(assign=True)``, deepcopy) is detected by address and the packing is rebuilt once.

Choices where the papers are silent (the Hugging Face GLM-5 code, transformers GlmMoeDsaMoE, decides them):
  * router logits in fp32 whatever the model dtype; the router weight and bias stay fp32 under .to(bf16);
  * masked-out groups get -inf before the top-K, as transformers and DeepSeek-V3's inference code do (the
    DeepSeek-V3 Hub remote code used 0.0, which an expert of a kept group with negative s + b loses to);
  * gate weights are returned in fp32; weighted expert outputs are cast to the input dtype before they are
    summed (as transformers does), so bf16 accumulates in bf16. The loop weights each expert's output; the
    grouped path weights the input of the down projection (linear, so the same; an (S, I) product, not (S, d));
  * the sequence-wise loss uses unbiased scores and is differentiable through P_e only (f_e is a count);
  * top-K indices come sorted by biased score (transformers leaves them unsorted: compare as sets).
Not handled: capacity limits and token dropping (no token is ever dropped), expert parallelism (see
glm5_ref/distributed/), the all-reduce of loads before the bias update across data-parallel ranks, softmax
gating and other scoring functions, MoE with biases.

Axes: B batch, T sequence, N = B*T tokens, d hidden size, E routed experts, K experts per token, G groups,
M = E/G experts per group, I expert width (moe_intermediate_size), S = N*K token-slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.layers import SwiGLU, grouped_mm, grouped_mm_supported, triton_usable

IMPLS = ("grouped", "loop")


def select_experts(biased: torch.Tensor, k: int, n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """Indices (N, K) of the top-k experts by ``biased`` score (N, E), restricted to the topk_group best groups."""
    if n_group > 1:
        groups = rearrange(biased, "n (g m) -> n g m", g=n_group)  # (N, G, M)
        group_score = groups.topk(2, dim=-1).values.sum(-1)  # (N, G): sum of each group's two best
        kept = group_score.topk(topk_group, dim=-1).indices  # (N, topk_group)
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)  # (N, G)
        keep = keep[:, :, None].expand_as(groups)  # (N, G, M)
        biased = rearrange(groups.masked_fill(~keep, float("-inf")), "n g m -> n (g m)")  # (N, E)
    return biased.topk(k, dim=-1).indices  # (N, K), best first


class MoEGate(nn.Module):
    """The router: fp32 sigmoid scores, selection on scores + bias, gate weights from the unbiased scores."""

    def __init__(self, config: GLM5Config):
        super().__init__()
        self.n_experts, self.hidden_size = config.n_routed_experts, config.hidden_size
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.bias_update_speed = config.bias_update_speed
        self.weight = nn.Parameter(torch.randn(self.n_experts, self.hidden_size) * config.initializer_range)  # (E, d)
        # b: moved by update_router_bias, never by gradients; persistent so it travels in the checkpoint
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., d) -> topk_idx (N, K) int64, topk_weight (N, K) fp32, scores (N, E) fp32 (fp64 routers: fp64)."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoEGate input: expected last dim hidden_size = {self.hidden_size}, got shape "
                             f"{tuple(x.shape)}")
        bias = self.e_score_correction_bias
        if bias.shape != (self.n_experts,):
            raise ValueError(f"MoEGate.e_score_correction_bias: expected shape ({self.n_experts},), got "
                             f"{tuple(bias.shape)}")
        h = x.reshape(-1, self.hidden_size)  # (N, d)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)  # fp32 (fp64 if the router was made fp64)
        scores = F.linear(h.to(dtype), self.weight.to(dtype)).sigmoid()  # (N, E)
        topk_idx = select_experts(scores + bias.to(dtype), self.top_k, self.n_group, self.topk_group)  # (N, K)
        topk_weight = scores.gather(1, topk_idx)  # (N, K): the UNBIASED scores of the chosen experts
        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, scores

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(), .half(), .cuda() ... then keep the router in (at least) fp32
        with torch.no_grad():
            if self.weight.dtype in (torch.float16, torch.bfloat16):
                self.weight.data = self.weight.data.float()
            if self.e_score_correction_bias.dtype in (torch.float16, torch.bfloat16):
                self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, shape in (("weight", (self.n_experts, self.hidden_size)), ("e_score_correction_bias",
                                                                             (self.n_experts,))):
            t = state_dict.get(prefix + name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"state dict {prefix + name}: expected shape {shape}, got {tuple(t.shape)}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class MoEAux:
    """What MoE.forward(..., return_aux=True) reports next to its output."""
    topk_idx: torch.Tensor           # (B, T, K) int64, chosen experts, best biased score first
    topk_weight: torch.Tensor        # (B, T, K) fp32 gate weights
    scores: torch.Tensor             # (B, T, E) fp32 sigmoid affinities (unbiased)
    tokens_per_expert: torch.Tensor  # (E,) int64, the load that update_router_bias consumes
    balance_loss: torch.Tensor       # () sequence-wise balance loss, alpha = config.aux_loss_alpha_seq


class _PackedView(torch.autograd.Function):
    """The packed (E, ...) tensor, as a function of the per-expert parameters that view it: no copy forward,
    and backward hands each parameter its slice of the gradient."""

    @staticmethod
    def forward(ctx, packed, *pieces):
        ctx.piece_shape = pieces[0].shape
        return packed.view_as(packed)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.reshape(-1, *ctx.piece_shape).unbind(0))


class MoE(nn.Module):
    """Routed experts + shared expert. Checkpoint names (under mlp.): gate.weight, gate.e_score_correction_bias,
    experts.{e}.{gate,up,down}_proj.weight, shared_experts.{gate,up,down}_proj.weight."""

    def __init__(self, config: GLM5Config):
        super().__init__()
        self.config = config
        d, I = config.hidden_size, config.moe_intermediate_size
        self.gate = MoEGate(config)
        self.experts = nn.ModuleList(SwiGLU(d, I) for _ in range(config.n_routed_experts))
        self.shared_experts = SwiGLU(d, config.n_shared_experts * I) if config.n_shared_experts else None
        for name, p in self.named_parameters():
            if not name.startswith("gate.") and p.device.type != "meta":  # meta: shapes only, nothing to fill
                nn.init.normal_(p, std=config.initializer_range)  # as transformers initialises GLM-5
        self._pack_experts()

    # ---- packed expert storage ------------------------------------------------------------------------
    def _expert_params(self) -> list[torch.Tensor]:
        # plain dict look-ups: this runs on every forward, and nn.Module.__getattr__ costs ~0.5 us a call
        return [e._modules[n]._parameters["weight"] for e in self.experts._modules.values()
                for n in ("gate_proj", "up_proj", "down_proj")]

    @torch.no_grad()
    def _pack_experts(self) -> None:
        """Copy the experts' weights into two packed tensors and make every parameter a view of them."""
        I = self.config.moe_intermediate_size
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])  # (E,2I,d)
        down = torch.stack([e.down_proj.weight for e in self.experts])  # (E, d, I)
        for i, e in enumerate(self.experts):
            e.gate_proj.weight.data, e.up_proj.weight.data = gate_up[i, :I], gate_up[i, I:]
            e.down_proj.weight.data = down[i]
        self._packed = (gate_up, down)
        self._packed_addresses = [p.data_ptr() for p in self._expert_params()]

    def packed_expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """gate|up (E, 2I, d) and down (E, d, I), differentiable views of the experts' own parameters.
        Under torch.compile they are stacked instead (a copy the compiler can trace; data_ptr() cannot be)."""
        if torch.compiler.is_compiling():
            return (torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts]),
                    torch.stack([e.down_proj.weight for e in self.experts]))
        if [p.data_ptr() for p in self._expert_params()] != self._packed_addresses:
            self._pack_experts()  # a parameter was replaced (.to(), assign=True, deepcopy ...): re-pack once
        if not torch.is_grad_enabled():  # inference: no gradient to route back, skip the autograd views
            return self._packed
        gates = [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight)]
        return (_PackedView.apply(self._packed[0], *gates),
                _PackedView.apply(self._packed[1], *(e.down_proj.weight for e in self.experts)))

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, impl: str = "grouped", return_aux: bool = False, use_triton: bool = False):
        """x (B, T, d) -> y (B, T, d), or (y, MoEAux) with return_aux. ``use_triton``: the routed experts through
        the grouped GEMM kernel (glm5_kernels.moe_gemm) where it can run (inference)."""
        if impl not in IMPLS:
            raise ValueError(f"MoE impl: expected one of {IMPLS}, got {impl!r}")
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size:
            raise ValueError(f"MoE input: expected (B, T, {self.config.hidden_size}), got shape {tuple(x.shape)}")
        if x.dtype != self.experts[0].down_proj.weight.dtype:
            raise TypeError(f"MoE input: expected dtype {self.experts[0].down_proj.weight.dtype} (the experts' "
                            f"dtype), got {x.dtype}")
        B, T, d = x.shape
        h = x.reshape(B * T, d)  # (N, d)
        topk_idx, topk_weight, scores = self.gate(h)  # (N, K), (N, K), (N, E)
        y = self.expert_outputs(h, topk_idx, topk_weight, impl, use_triton)  # (N, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        y = y.reshape(B, T, d)
        if not return_aux:
            return y
        c = self.config
        K, E = c.num_experts_per_tok, c.n_routed_experts
        aux = MoEAux(
            topk_idx=topk_idx.reshape(B, T, K), topk_weight=topk_weight.reshape(B, T, K),
            scores=scores.reshape(B, T, E),
            tokens_per_expert=expert_counts(topk_idx, E),
            balance_loss=balance_loss(scores.reshape(B, T, E), topk_idx.reshape(B, T, K), E, K,
                                      c.aux_loss_alpha_seq),
        )
        return y, aux

    def expert_outputs(self, h: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                       impl: str = "grouped", use_triton: bool = False) -> torch.Tensor:
        """The routed experts alone: y_t = sum_k topk_weight[t, k] FFN_{topk_idx[t, k]}(h_t), h (N, d) -> (N, d).
        The public entry point of the expert computation (distributed/expert_parallel.py runs its local experts
        through it); indices refer to ``self.experts``."""
        if impl not in IMPLS:
            raise ValueError(f"MoE impl: expected one of {IMPLS}, got {impl!r}")
        if impl == "loop":
            return self._experts_loop(h, topk_idx, topk_weight)
        return self._experts_grouped(h, topk_idx, topk_weight, use_triton)

    def _experts_loop(self, h: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """The readable twin: one expert at a time, skipping experts that got no token."""
        y = torch.zeros_like(h)  # (N, d)
        counts = torch.bincount(topk_idx.flatten(), minlength=len(self.experts)).tolist()
        for e, expert in enumerate(self.experts):
            if counts[e] == 0:
                continue
            tok, slot = torch.where(topk_idx == e)  # tokens that chose e, and in which of their K slots
            out = expert(h[tok]) * topk_weight[tok, slot, None]  # (n_e, d), fp32 weight
            y.index_add_(0, tok, out.to(h.dtype))
        return y

    def _experts_grouped(self, h: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                         use_triton: bool = False) -> torch.Tensor:
        """Sort token-slots by expert, one grouped GEMM per projection, unsort with index_add."""
        N, K = topk_idx.shape
        if N == 0:
            return torch.zeros_like(h)
        order, token_of_slot, counts = sort_by_expert(topk_idx, len(self.experts))  # (S,), (S,), (E,)
        xs = h[token_of_slot]  # (S, d): permute, contiguous segment per expert
        w = topk_weight.reshape(-1)[order, None]  # (S, 1) fp32 gate weight of each sorted slot
        I = self.config.moe_intermediate_size
        if use_triton and triton_usable(h, self.experts[0].down_proj.weight):
            from glm5_kernels.moe_gemm import moe_experts  # lazy: glm5_ref never imports triton at module level
            gate_up, down = self.packed_expert_weights()  # (E, 2I, d), (E, d, I)
            offs = counts.cumsum(0).to(torch.int32)  # (E,)
            ys = moe_experts(xs.contiguous(), gate_up, down, offs, w.reshape(-1).contiguous())  # (S, d)
            return torch.zeros_like(h).index_add_(0, token_of_slot, ys)
        gate_up, down = self.packed_expert_weights()  # (E, 2I, d), (E, d, I)
        # decode on an accelerator: most segments empty, one call per non-empty one. On the CPU the grouped GEMM
        # is faster even for one token (classroom MoE, 1 thread, 2026-12-03: 460 vs 540 us at N = 1, 756 vs
        # 1,148 us at N = 4, the verify block of speculative decoding) and gives the same bits.
        few = (N * K < len(self.experts) and h.device.type != "cpu" and not torch.compiler.is_compiling())
        if not few and grouped_mm_supported(h.dtype, h.device, h.shape[1], I):
            offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's segment
            g, u = grouped_mm(xs, gate_up.transpose(1, 2), offs).chunk(2, dim=-1)  # (S, I) each
            # down_proj is linear, so the gate weight can scale its (S, I) input instead of its (S, d) output
            ys = grouped_mm((F.silu(g) * u * w).to(h.dtype), down.transpose(1, 2), offs)  # (S, d)
        else:  # decode-sized, or no usable grouped GEMM (fp64, unaligned widths): one call per non-empty segment
            pieces, start = [], 0  # on views of the packed weights: no copy, no call for an empty segment
            for e, n in enumerate(counts.tolist()):
                if n:
                    g, u = F.linear(xs[start:start + n], gate_up[e]).chunk(2, dim=-1)  # (n_e, I) each
                    pieces.append(F.linear((F.silu(g) * u * w[start:start + n]).to(h.dtype), down[e]))  # (n_e, d)
                start += n
            ys = torch.cat(pieces).to(h.dtype)  # (S, d): bf16 under autocast, the residual stream's dtype
        return torch.zeros_like(h).index_add_(0, token_of_slot, ys)  # unpermute + combine: (N, d)


def sort_by_expert(topk_idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The permutation of grouped dispatch. topk_idx (N, K) -> order (S,) slot ids sorted by expert (stable),
    token_of_slot (S,) = order // K, counts (E,) token-slots per expert."""
    flat = topk_idx.reshape(-1)  # (S,)
    order = flat.argsort(stable=True)  # (S,)
    return order, order // topk_idx.shape[1], expert_counts(flat, n_experts)


def expert_counts(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64: how many token-slots chose each expert. A scatter-add into E counters rather than bincount,
    whose output size depends on the values (which torch.compile cannot trace)."""
    flat = topk_idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, k: int, alpha: float) -> torch.Tensor:
    """Sequence-wise balance loss alpha * sum_e f_e P_e (DeepSeek-V3 eqs. 17-20), mean over sequences.

    scores (B, T, E) or (T, E) unbiased sigmoid affinities; topk_idx (B, T, K) or (T, K) chosen experts.
    """
    if scores.dim() == 2:
        scores, topk_idx = scores[None], topk_idx[None]  # (1, T, E), (1, T, K)
    if scores.dim() != 3 or scores.shape[-1] != n_experts:
        raise ValueError(f"balance_loss scores: expected (B, T, {n_experts}), got {tuple(scores.shape)}")
    if topk_idx.shape != scores.shape[:2] + (k,):
        raise ValueError(f"balance_loss topk_idx: expected {tuple(scores.shape[:2]) + (k,)}, got "
                         f"{tuple(topk_idx.shape)}")
    B, T, E = scores.shape
    if B == 0 or T == 0:  # no token: no imbalance (and never a 0/0 NaN)
        return scores.new_zeros((), dtype=torch.float32)
    chosen = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, topk_idx.reshape(B, T * k), torch.ones(B, T * k, device=scores.device))  # (B, E) selections
    f = chosen * (E / (k * T))  # (B, E), 1 on average
    s = scores.float()
    P = (s / s.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return alpha * (f * P).sum(-1).mean()


@torch.no_grad()
def update_router_bias(gate: MoEGate | MoE, tokens_per_expert: torch.Tensor, gamma: float | None = None) -> None:
    """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2): b_e += gamma * sign(mean load - load_e), in place.

    Call after each optimizer step with the step's tokens_per_expert (E,) (summed over layers' micro-batches,
    and all-reduced across data-parallel ranks when there are several). gamma defaults to bias_update_speed.
    """
    gate = gate.gate if isinstance(gate, MoE) else gate
    if not isinstance(gate, MoEGate):
        raise TypeError(f"update_router_bias gate: expected MoEGate or MoE, got {type(gate).__name__}")
    bias = gate.e_score_correction_bias
    load = torch.as_tensor(tokens_per_expert, device=bias.device).float()
    if load.shape != bias.shape:
        raise ValueError(f"update_router_bias tokens_per_expert: expected shape {tuple(bias.shape)} (one count per "
                         f"expert), got {tuple(load.shape)}")
    gamma = gate.bias_update_speed if gamma is None else float(gamma)
    if not gamma >= 0 or gamma == float("inf"):
        raise ValueError(f"update_router_bias gamma: expected a finite non-negative number, got {gamma}")
    bias.add_(gamma * torch.sign(load.mean() - load))


def router_stats(tokens_per_expert: torch.Tensor) -> dict:
    """Load summary for plots: tokens per expert, max / mean load, coefficient of variation (std / mean)."""
    load = torch.as_tensor(tokens_per_expert).double()
    if load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"router_stats tokens_per_expert: expected a non-empty (E,) tensor, got {tuple(load.shape)}")
    mean = load.mean().item()
    return {
        "tokens_per_expert": load.tolist(),
        "max_load": load.max().item(),
        "mean_load": mean,
        "max_over_mean": load.max().item() / mean if mean > 0 else float("nan"),
        "cv": load.std(unbiased=False).item() / mean if mean > 0 else float("nan"),
    }
