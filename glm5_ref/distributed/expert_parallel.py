"""Expert parallelism for GLM-5's MoE: each rank holds E/W of the routed experts, tokens travel to them.

What it is
    GLM-5's 256 experts per layer hold 725 of its 744B parameters, far more than one accelerator keeps. Expert
    parallelism (GShard, arXiv 2006.16668; DeepSeek-V3 section 3.2.2; GLM-5 serves with EP64) splits them:
    rank r of W owns the E/W experts [r E/W, (r+1) E/W); the router and the shared expert are small and every
    rank keeps a replica. One forward on rank r, whose own tokens are h_r (N_r, d):

        idx, g   = gate(h_r)                    replicated router: top-K experts and gate weights per token
        slots    = the N_r K (token, expert) pairs, sorted by expert, hence by owner rank e // (E/W)
        send[q]  = slots bound for rank q                      counts first: all_to_all of (W, L) per-expert counts
        x_recv   = all_to_all(h_r[slots])                      first exchange, uneven splits, zeros allowed
        o_recv   = FFN_e(x_recv)  for the local experts e      moe.py's grouped GEMM (or its per-expert loop)
        o_slots  = all_to_all(o_recv)                          second exchange, the reverse splits
        y_r      = sum_k g_{t,k} o_slots[t, k] + FFN_shared(h_r)

    ``_AllToAll`` makes the exchange differentiable: the backward of a permutation across ranks is the reverse
    permutation, so the gradient of an all_to_all with splits (in -> out) is an all_to_all of the gradients
    with the splits swapped (out -> in). Gradients reach an expert's weights on its owner from every rank's
    tokens, so they equal the single-process gradients with nothing further to do. The router and the shared
    expert see only this rank's tokens: all-reduce (sum) their gradients, ``allreduce_replicated_grads``, to
    get the gradient of the sum of the ranks' losses, as data parallelism does for every replicated weight.

Choices where the papers are silent
    * No capacity factor and no token dropping (DeepSeek-V3 drops none either, section 2.1.2): splits are
      whatever the router chose, so the result equals the single-process MoE.
    * The gate weights multiply the expert outputs back on the token's own rank, after the second exchange:
      only hidden states travel, and the router's gradient stays local. (moe.py scales the down projection's
      input instead; linear, so equal up to rounding.)
    * The local experts reuse moe.py's code: ``_LocalExperts`` is a MoE holding only the E/W local SwiGLU
      experts (packed for one grouped GEMM), computed by MoE's public ``expert_outputs``, so the two twins (and
      the GPU/CPU grouped-GEMM rules, and any kernel path moe.py adds) are the ones moe.py tests.
    * Contiguous expert ranges per rank (expert e on rank e // (E/W)): the slots sorted by expert are then
      already sorted by destination, so one argsort serves both the dispatch and the per-expert segments.
    * Every rank must run forward AND backward of every EP layer, even with zero tokens: the exchanges are
      collectives. A rank with no tokens passes a (B, 0, d) or (0, T, d) tensor. So that the backward
      exchanges run on every rank whatever it holds, an exchange's output always requires grad in grad mode,
      and experts that receive no slot still return a function of their (empty) input: a rank whose experts
      got nothing, or whose input is frozen, would otherwise skip the reverse all_to_all and hang the others.

Not handled: capacity limits, overlap of communication with computation (DeepEP, DualPipe), node-limited
routing (DeepSeek-V3's M = 4 nodes per token), expert replication for hot experts (EPLB), FP8 dispatch.

Axes: N tokens on this rank, d hidden size, E experts, W world size (ranks in the group), L = E/W local experts,
K experts per token, S = N K slots sent, R slots received.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.moe import IMPLS, MoE, MoEAux, balance_loss, sort_by_expert, update_router_bias


def check_expert_split(n_experts: int, world_size: int) -> int:
    """E / W local experts per rank, or a ValueError naming both numbers."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"expert parallel world_size: expected a positive integer, got {world_size!r}")
    if n_experts % world_size:
        raise ValueError(f"expert parallel: n_routed_experts = {n_experts} is not divisible by the world size "
                         f"{world_size}; every rank must own the same number of experts")
    return n_experts // world_size


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits, differentiable: backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, anchor) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))  # (R, ...)
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))  # (S, ...)
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Send rows x[sum(in_splits[:q]) : ...] to rank q; receive out_splits[q] rows from rank q (autograd-aware).

    The backward is a collective too, so every rank must run it. In grad mode the output therefore always
    requires grad (an empty ``anchor`` input that does), even on a rank whose x does not (no tokens, a frozen
    input): every rank records the exchange, and a loss that depends on the output runs its backward.
    """
    anchor = x.new_empty(0).requires_grad_() if torch.is_grad_enabled() else None
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, anchor)


class _LocalExperts(MoE):
    """This rank's E/W routed experts, packed like MoE's and computed by MoE's own ``expert_outputs`` (grouped,
    loop, and whatever paths moe.py adds): a MoE without router or shared expert, over the local experts only."""

    def __init__(self, moe: MoE, experts: list[nn.Module]):
        nn.Module.__init__(self)  # not MoE.__init__: no router, no new experts
        self.config = moe.config  # only moe_intermediate_size is read
        for name, value in vars(moe).items():  # MoE's public switches (use_triton ...), as the full MoE has them
            if not name.startswith("_") and name not in ("config", "training"):
                setattr(self, name, value)
        self.gate = self.shared_experts = None
        self.experts = nn.ModuleList(experts)
        self._pack_experts()

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor, impl: str, use_triton: bool = False) -> torch.Tensor:
        """x (R, d) received slots, local_idx (R,) their local expert -> (R, d) unweighted expert outputs."""
        if x.shape[0] == 0:  # no slot for my experts: still return a function of x, so that the graph reaches
            return x.clone()  # the first exchange and its reverse runs here as on every other rank
        ones = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)  # (R, 1): weights applied later
        return self.expert_outputs(x, local_idx[:, None], ones, impl, use_triton)


class ExpertParallelMoE(nn.Module):
    """GLM-5's MoE with its routed experts sharded over the ranks of ``group`` (module docstring).

    Built from a full ``MoE`` (identical on every rank, e.g. the same seed or checkpoint): this rank keeps
    experts [rank L, (rank+1) L) and shares the router and shared expert with ``moe`` (same parameters; the
    other experts can be freed by dropping ``moe``). Local expert i is global expert ``expert_offset + i``.
    """

    def __init__(self, moe: MoE, group=None):
        super().__init__()
        if not isinstance(moe, MoE) or isinstance(moe, _LocalExperts):
            raise TypeError(f"ExpertParallelMoE moe: expected a glm5_ref.moe.MoE, got {type(moe).__name__}")
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE: torch.distributed is not initialised (init_process_group, "
                               "torchrun, or glm5_ref.distributed.launch)")
        self.config, self.group = moe.config, group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts = self.config.n_routed_experts
        self.n_local = check_expert_split(self.n_experts, self.world_size)  # L
        self.expert_offset = self.rank * self.n_local
        self.gate = moe.gate
        self.shared_experts = moe.shared_experts
        local = [moe.experts[e] for e in range(self.expert_offset, self.expert_offset + self.n_local)]
        self.local_experts = _LocalExperts(moe, local)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The router and shared-expert parameters, which every rank holds a copy of."""
        mods = [self.gate] + ([self.shared_experts] if self.shared_experts is not None else [])
        return [p for m in mods for p in m.parameters()]

    @torch.no_grad()
    def allreduce_replicated_grads(self, average: bool = False) -> None:
        """Sum (or average) the router's and shared expert's gradients over the group; local experts untouched.
        A missing gradient counts as zeros, so that every rank joins every all-reduce."""
        for p in self.replicated_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)
            if average:
                p.grad.div_(self.world_size)

    @torch.no_grad()
    def update_router_bias(self, tokens_per_expert: torch.Tensor, gamma: float | None = None) -> None:
        """Aux-loss-free bias update from the load summed over the group (the same on every rank)."""
        load = torch.as_tensor(tokens_per_expert).clone().to(torch.int64)
        dist.all_reduce(load, group=self.group)
        update_router_bias(self.gate, load, gamma)

    def forward(self, x: torch.Tensor, impl: str = "grouped", return_aux: bool = False, use_triton: bool = False):
        """x (B, T, d) this rank's tokens -> y (B, T, d), or (y, MoEAux) with return_aux (loads of this rank)."""
        c = self.config
        if impl not in IMPLS:
            raise ValueError(f"ExpertParallelMoE impl: expected one of {IMPLS}, got {impl!r}")
        if x.dim() != 3 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"ExpertParallelMoE input: expected (B, T, {c.hidden_size}), got shape "
                             f"{tuple(x.shape)}")
        dtype = self.local_experts.experts[0].down_proj.weight.dtype
        if x.dtype != dtype:
            raise TypeError(f"ExpertParallelMoE input: expected dtype {dtype} (the experts' dtype), got {x.dtype}")
        B, T, d = x.shape
        h = x.reshape(B * T, d)  # (N, d)
        topk_idx, topk_weight, scores = self.gate(h)  # (N, K), (N, K), (N, E)
        K = topk_idx.shape[1]

        # dispatch: slots sorted by expert are sorted by owner; tell every rank how many rows to expect
        order, token_of_slot, counts = sort_by_expert(topk_idx, self.n_experts)  # (S,), (S,), (E,)
        send_counts = counts.reshape(self.world_size, self.n_local)  # (W, L): slots for rank q's experts
        recv_counts = torch.empty_like(send_counts)  # (W, L): slots rank q sends to my experts
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits, recv_splits = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        x_recv = all_to_all(h[token_of_slot], recv_splits, send_splits, self.group)  # (R, d)

        # local experts: rows arrive grouped by source rank, then by local expert
        local_idx = torch.repeat_interleave(torch.arange(self.n_local, device=h.device).repeat(self.world_size),
                                            recv_counts.reshape(-1).to(h.device))  # (R,)
        o_recv = self.local_experts(x_recv, local_idx, impl, use_triton)  # (R, d)

        # combine: back to the token's rank, weight by the gate, sum the K slots of every token
        o_slots = all_to_all(o_recv, send_splits, recv_splits, self.group)  # (S, d), in `order`
        w = topk_weight.reshape(-1)[order, None]  # (S, 1) fp32
        y = torch.zeros_like(h).index_add_(0, token_of_slot, (o_slots * w).to(h.dtype))  # (N, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        y = y.reshape(B, T, d)
        if not return_aux:
            return y
        scores, topk_idx = scores.reshape(B, T, self.n_experts), topk_idx.reshape(B, T, K)
        aux = MoEAux(
            topk_idx=topk_idx, topk_weight=topk_weight.reshape(B, T, K), scores=scores, tokens_per_expert=counts,
            balance_loss=(balance_loss(scores, topk_idx, self.n_experts, K, c.aux_loss_alpha_seq) if B * T
                          else scores.new_zeros(())),  # no sequence on this rank: nothing to balance
        )
        return y, aux

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, experts={self.expert_offset}.."
                f"{self.expert_offset + self.n_local - 1} of {self.n_experts}")


def ep_moe_demo(rank: int, world_size: int, config: GLM5Config, tokens: list[int], seed: int = 0,
                impl: str = "grouped") -> dict:
    """One expert-parallel forward and backward, for notebooks (``launch(ep_moe_demo, W, config, tokens)``).

    Every rank builds the same seeded MoE(config) (``torch.manual_seed(seed)``), keeps its experts, and runs its
    own tokens x_r (1, tokens[r], d) (seeded by seed + 1 + r, drawn from N(0, 1)) with the output gradient
    ones. Returns this rank's y, x.grad, its experts' weight gradients under their global names
    (experts.{e}.*), the router's and shared expert's all-reduced gradients, the tokens per expert, and the
    bytes it sent to other ranks (rows of d values, dispatch plus combine)."""
    if len(tokens) != world_size:
        raise ValueError(f"ep_moe_demo tokens: expected one token count per rank ({world_size}), got {len(tokens)}")
    torch.manual_seed(seed)
    moe = MoE(config)
    ep = ExpertParallelMoE(moe)
    g = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(1, tokens[rank], config.hidden_size, generator=g).requires_grad_(True)  # (1, T_r, d)
    y, aux = ep(x, impl=impl, return_aux=True)
    y.sum().backward()
    ep.allreduce_replicated_grads()
    grads = {f"experts.{ep.expert_offset + int(n.split('.')[0])}.{n.split('.', 1)[1]}": p.grad
             for n, p in ep.local_experts.experts.named_parameters()}
    grads.update({n: p.grad for n, p in ep.named_parameters() if not n.startswith("local_experts.")})
    owner = aux.topk_idx.reshape(-1) // ep.n_local  # (S,) the rank owning each slot's expert
    off_rank = int((owner != rank).sum())
    return dict(y=y.detach(), x_grad=x.grad, grads=grads, load=aux.tokens_per_expert, slots=int(owner.numel()),
                off_rank_slots=off_rank, bytes_sent=2 * off_rank * config.hidden_size * x.element_size())
