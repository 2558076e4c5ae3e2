"""Zero-redundancy distributed Muon: every rank orthogonalizes only its share of the matrices (or, for Muon
Split, of the head blocks), keeps momentum only for that share, and the updates are all-gathered.

What it is
    Muon's cost is Newton-Schulz: about 5 (2 s^2 l + s^3) flops per (s x l) matrix, s = min(m, n), run on
    every hidden matrix at every step. Under data parallelism every rank has the same (all-reduced) gradients,
    so plain Muon on each rank repeats the same work W times. GLM-5 (section 2.1; glm5_spec.md section 7) uses
    a "zero-redundancy" distributed Muon instead, in the spirit of ZeRO-1 (arXiv 1910.02054):

        units   = every (parameter, row block) pair: one per plain-Muon matrix, one per head block under Muon
                  Split (the blocks of muon.py's param groups)
        owner   = a deterministic, size-balanced assignment of units to the W ranks (below), the same on every
                  rank because it is computed from shapes alone
        on rank r, for each unit u it owns:
            M_u = mu M_u + (1 - mu) G_u              momentum of u's rows, stored on r only
            O_u = NS5((1 - mu) G_u + mu M_u)         (Nesterov; M_u without it)
        all_gather the O_u of every rank (one collective per step, padded to the largest share)
        on every rank, for every parameter:  W <- W (1 - lr wd) - lr s(u) O_u  on each unit's rows

    So each rank runs Newton-Schulz on about 1/W of the flops and stores 1/W of the momentum, and all ranks end
    the step with identical parameters, equal to single-process Muon's (``glm5_ref.muon.Muon``) up to the
    rounding of batched versus single matrix products.

Assignment: longest-processing-time first. Units are sorted by NS cost s^2 (2 l + s), largest first (ties by
their position), and each goes to the rank with the smallest total so far (ties: lowest rank). Greedy LPT is
within 4/3 of the best possible makespan (Graham 1969). Units of one shape landing on one rank still share a
batched NS call (muon.py's ``_orthogonalize_all``).

Choices where the papers are silent
    * The unit is the row block, so Muon Split's many small head blocks spread over ranks even when a model has
      only a few matrices; plain Muon's unit is the whole matrix (its NS needs all of it).
    * Momentum is sharded by unit: ``state[p]["momentum_buffer"]`` holds the owned blocks' rows of p,
      concatenated in row order (the whole buffer, exactly Muon's, when a rank owns all of p), and
      ``state[p]["owned_rows"]`` the blocks, which a resumed run checks against its own assignment: resume
      with the same world size and param groups. ``from_muon`` shards a plain Muon (and its state).
    * The updates travel in the gradients' promoted dtype, so bf16 and fp32 round-trip exactly.
    * Gradients must be identical on all ranks (all-reduced by data parallelism) and present (not None) for
      the same parameters on all ranks: only the owner reads a unit's gradient, so a reduce-scatter would do
      (ZeRO-2), but the all-reduce keeps this optimizer a drop-in for Muon.

Not handled: sharding the parameters themselves (ZeRO-3/FSDP: a unit's owner would need to gather its
gradient rows first), expert-parallel matrices that live on one rank only (give each EP rank its own local
DistributedMuon over a group of size 1, or plain Muon), overlapping the gather with the next layer's compute,
AdamW's state (torch.distributed.optim.ZeroRedundancyOptimizer shards that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from glm5_ref.muon import Muon, _check_finite, _orthogonalize_all, closure_loss, scale_factor
from glm5_ref.training.optim import CombinedOptimizer, build_optimizer


@dataclass(frozen=True)
class Unit:
    """One matrix Newton-Schulz runs on: rows [start, stop) of param_groups[group]["params"][index]."""
    group: int
    index: int
    start: int
    stop: int
    cols: int
    owner: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def cost(self) -> int:
        """Newton-Schulz flops per step, up to the constant: s^2 (2 l + s), s = min(rows, cols), l = max."""
        s, l = min(self.rows, self.cols), max(self.rows, self.cols)
        return s * s * (2 * l + s)


def assign_units(shapes: list[tuple[int, int, int, int, int]], world_size: int) -> list[int]:
    """Owner rank of each (group, index, start, stop, cols) unit: greedy longest-processing-time first."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"assign_units world_size: expected a positive integer, got {world_size!r}")
    costs = [Unit(*u, owner=-1).cost for u in shapes]
    load = [0] * world_size
    owner = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return owner


class DistributedMuon(Muon):
    """Muon (and Muon Split) with Newton-Schulz and momentum sharded over the ranks of ``group``.

    Same arguments as ``glm5_ref.muon.Muon`` plus ``group`` (default: the whole world). After ``step()``,
    ``ns_matrices`` is the number of matrices this rank orthogonalized.
    """

    def __init__(self, params, group=None, **kwargs):
        if not dist.is_initialized():
            raise RuntimeError("DistributedMuon: torch.distributed is not initialised (init_process_group, "
                               "torchrun, or glm5_ref.distributed.launch)")
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.ns_matrices = 0
        super().__init__(params, **kwargs)

    @classmethod
    def from_muon(cls, muon: Muon, group=None) -> "DistributedMuon":
        """The same param groups (names, blocks, hyper-parameters), with this rank's share of muon's momentum."""
        if not isinstance(muon, Muon):
            raise TypeError(f"DistributedMuon.from_muon: expected a glm5_ref.muon.Muon, got {type(muon).__name__}")
        groups = []
        for g in muon.param_groups:
            g = dict(g)
            names = g.pop("param_names", None)
            g["params"] = list(zip(names, g["params"])) if names else list(g["params"])
            groups.append(g)
        out = cls(groups, group=group, **{k: v for k, v in muon.defaults.items() if k != "blocks"})
        for p, state in muon.state.items():
            if "momentum_buffer" in state:
                rows = out._owned_rows(p)
                if rows:
                    out.state[p] = {"momentum_buffer": _take_rows(state["momentum_buffer"], rows).clone(),
                                    "owned_rows": rows}
        return out

    # ---- the assignment -------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        """Every unit of every param group with its owner; a function of the shapes only (same on all ranks)."""
        shapes = []
        for gi, g in enumerate(self.param_groups):
            for i, p in enumerate(g["params"]):
                blocks = (g["blocks"] or [None] * len(g["params"]))[i] or [(0, p.shape[0])]
                shapes += [(gi, i, s, e, p.shape[1]) for s, e in blocks]
        return [Unit(*u, owner=r) for u, r in zip(shapes, assign_units(shapes, self.world_size))]

    def _owned_rows(self, p: torch.Tensor) -> list[tuple[int, int]]:
        return [(u.start, u.stop) for u in self.units()
                if u.owner == self.rank and self.param_groups[u.group]["params"][u.index] is p]

    # ---- the step ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        _check_finite(self)
        groups = self.param_groups
        units = [u for u in self.units() if groups[u.group]["params"][u.index].grad is not None]
        mine: dict[int, torch.Tensor] = {}  # position in `units` -> O_u, this rank's share
        for gi, g in enumerate(groups):
            owned = [(k, u) for k, u in enumerate(units) if u.group == gi and u.owner == self.rank]
            if not owned:
                continue
            mats = []
            for i in sorted({u.index for _, u in owned}):
                rows = [(u.start, u.stop) for _, u in owned if u.index == i]
                mats += self._nesterov_rows(g, g["params"][i], rows)
            outs = _orthogonalize_all(mats, steps=g["ns_steps"], eps=g["eps"], dtype=g["ns_dtype"],
                                      coefficients=g["ns_coefficients"])
            order = sorted(owned, key=lambda ku: (ku[1].index, ku[1].start))  # the order mats were built in
            mine.update({k: O for (k, _), O in zip(order, outs)})
        self.ns_matrices = len(mine)
        updates = self._all_gather(units, mine)
        for gi, g in enumerate(groups):
            lr = g["lr"]
            for i in sorted({u.index for u in units if u.group == gi}):
                g["params"][i].mul_(1 - lr * g["weight_decay"])  # decoupled weight decay, plain lr (as Muon)
        for u, O in zip(units, updates):
            g, p = groups[u.group], groups[u.group]["params"][u.index]
            shape = (u.rows, u.cols) if g["split_scale"] == "block" else p.shape
            p[u.start:u.stop].add_(O, alpha=-g["lr"] * scale_factor(shape, g["adjust_lr_fn"]))
        return loss

    def _nesterov_rows(self, g: dict, p: torch.Tensor, rows: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Update the momentum of p's owned rows; return the matrices to orthogonalize, one per block."""
        state = self.state[p]
        whole = rows == [(0, p.shape[0])]
        grad = p.grad if whole else _take_rows(p.grad, rows)  # (owned rows, n)
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["owned_rows"] = rows
        elif state["owned_rows"] != rows:
            raise ValueError(f"DistributedMuon: momentum of a parameter of shape {tuple(p.shape)} holds rows "
                             f"{state['owned_rows']}, but rank {self.rank} of {self.world_size} now owns {rows}: "
                             "resume with the world size and param groups the state was saved with")
        buf = state["momentum_buffer"]
        buf.lerp_(grad, 1 - g["momentum"])  # M = mu M + (1 - mu) G
        U = grad.lerp(buf, g["momentum"]) if g["nesterov"] else buf  # (1 - mu) G + mu M
        return list(U.split([e - s for s, e in rows]))

    def _all_gather(self, units: list[Unit], mine: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        """Every unit's O_u on every rank: each rank contributes its share, flattened and padded."""
        if not units:
            return []
        ps = [self.param_groups[u.group]["params"][u.index] for u in units]
        dtype = ps[0].grad.dtype
        for p in ps[1:]:
            dtype = torch.promote_types(dtype, p.grad.dtype)
        sizes = [0] * self.world_size
        for u in units:
            sizes[u.owner] += u.rows * u.cols
        send = ps[0].grad.new_zeros(max(sizes), dtype=dtype)  # (largest share,)
        if mine:
            flat = torch.cat([mine[k].reshape(-1).to(dtype) for k in sorted(mine)])
            send[:flat.numel()] = flat
        recv = [torch.empty_like(send) for _ in range(self.world_size)]
        dist.all_gather(recv, send, group=self.group)
        offset, out = [0] * self.world_size, []
        for u, p in zip(units, ps):
            n = u.rows * u.cols
            out.append(recv[u.owner][offset[u.owner]:offset[u.owner] + n].view(u.rows, u.cols).to(p.grad.dtype))
            offset[u.owner] += n
        return out


def _take_rows(t: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    return t[rows[0][0]:rows[0][1]] if len(rows) == 1 else torch.cat([t[s:e] for s, e in rows])


def build_distributed_optimizer(model: nn.Module, name: str, lr: float, group=None, **kwargs) -> CombinedOptimizer:
    """``glm5_ref.muon.build_optimizer`` with its Muon part replaced by a DistributedMuon over ``group``.

    The AdamW part (embeddings, head, norms) stays replicated; the model's gradients must be all-reduced
    before ``step()`` (data parallelism), so that every rank applies the same updates.
    """
    opt = build_optimizer(model, name, lr, **kwargs)
    if "muon" in opt.optimizers:
        opt.optimizers["muon"] = DistributedMuon.from_muon(opt.optimizers["muon"], group)
    return opt
