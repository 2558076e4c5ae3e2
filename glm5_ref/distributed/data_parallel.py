"""Data-parallel (and data + expert-parallel) training of the whole GLM-5 model, driven by train.py.

What it is
    W processes (``torchrun --nproc_per_node W -m glm5_ref train ...``; gloo on CPU, NCCL on GPUs) each hold a
    replica of the model and read a different slice of every global batch. One step on rank r:

        batch   = the global (B, T + 1) window batch, drawn by the SAME seeded sampler on every rank
        x_r     = batch[r B/W : (r+1) B/W]                          this rank's slice (B/W rows)
        L_r     = model(x_r).loss                                   mean over this rank's tokens / sequences
        g       = (1/W) sum_r dL_r/dtheta                           DDP all-reduces (averages) in backward
                = dL/dtheta, L = mean of all B T tokens             the single-process step on the whole batch
        clip by the global norm, optimizer step (the same update on every rank)
        b_e    += gamma sign(mean load - load_e),  load = sum_r load_r    (all-reduced expert loads)

    Every loss GLM-5 trains (LM cross-entropy, the sequence-wise balance loss, the MTP losses, the indexer KL)
    is a mean over equally many tokens or sequences per rank, so the mean of the ranks' losses IS the loss of
    the combined batch, and one DP step equals one single-process step on it (tested, AdamW and Muon).

    With ``expert_parallel=True`` every MoE layer (the MTP block's too) becomes an ExpertParallelMoE over all W
    ranks (expert_parallel.py): rank r keeps experts [r E/W, (r+1) E/W) and tokens travel to them by
    all_to_all. The DP group and the EP group are the same ranks (as in DeepSeek-V3 / GLM-5 training, where
    EP spans DP ranks); the exchanges run on a second process group so that they never interleave with DDP's
    asynchronous bucket all-reduces on the first. An expert's gradient on its owner already sums every rank's
    tokens (d sum_r L_r / d theta_e); dividing it by W gives the gradient of the mean. DDP skips the experts
    (``_set_params_and_buffers_to_ignore_for_model``) and averages only the replicated parameters.

Why DDP and not FSDP2 (torch.distributed.fsdp.fully_shard)
    FSDP2 shards every parameter into DTensor row shards. Three things here need whole, plain tensors:
    (1) Muon orthogonalizes whole matrices (or whole head blocks): a row shard of W_q is not what Newton-Schulz
        must see, so FSDP2 would have to all-gather every gradient again before the optimizer, which is DDP
        with extra steps; distributed/muon.py already shards the Muon WORK (ZeRO-1 style) instead;
    (2) moe.py keeps the experts' weights as views of two packed tensors for the grouped GEMM, rebuilt when a
        parameter is replaced; fully_shard replaces every parameter with a DTensor, on every unshard;
    (3) the expert-parallel experts differ per rank and must not be sharded or averaged at all.
    At classroom scale a replica fits easily; GLM-5 itself combines EP64 for the experts (the 725B that
    matter) with sharded data parallelism for the rest, which FSDP2 with an ignored-parameters list would be.

Checkpoints, logs, resume
    Only rank 0 writes (train.py's atomic staging-folder swap). Under expert parallelism rank 0 gathers the
    other ranks' experts first and writes the ordinary full checkpoint (any world size, or one process, can
    load its model). The optimizer state is per rank (DistributedMuon's momentum shards, local experts'
    moments): rank 0 gathers every rank's state_dict into training_state.pt, and a resumed run must use the
    same world size and the same --expert-parallel choice (checked). Every rank reads the checkpoint back, so
    the ranks must share a file system (one machine, or a shared disk).

Choices where the paper is silent
    * The global batch is B (``--batch-size``), split in W equal slices: B must be divisible by W.
    * The wall clock that drives a time-budgeted run (schedule, end, periodic checkpoints) is rank 0's,
      broadcast once per step, so every rank takes the same decisions.
    * Validation windows are split over the ranks and the nats / tokens / bytes summed (an exact split of the
      single-process sum); under expert parallelism the window count must be divisible by W (every rank must
      run the same number of forwards, since each forward is a collective).
    * Logged losses are the means over ranks (the combined batch's losses).

Not handled: gradient accumulation, sharded optimizer state for AdamW (ZeroRedundancyOptimizer), several
machines without a shared file system, an interrupt (Ctrl-C) saving a checkpoint under data parallelism (the
last periodic checkpoint stands), changing the world size on resume.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from glm5_ref.devices import to_cpu
from glm5_ref.training.data import bits_per_byte, evaluate
from glm5_ref.distributed.expert_parallel import ExpertParallelMoE, check_expert_split
from glm5_ref.distributed.muon import DistributedMuon
from glm5_ref.moe import MoE, update_router_bias
from glm5_ref.muon import Muon
from glm5_ref.training.optim import build_optimizer

MUON_HYPER = ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps", "ns_steps", "adjust_lr_fn",
              "ns_dtype", "split_scale")


def init_from_env(backend: str | None = None, timeout_s: float = 300.0) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR ... in the environment).

    Returns False when the environment describes no distributed job (plain ``python -m glm5_ref``). backend:
    "nccl" when CUDA is available, else "gloo". ``timeout_s`` bounds every collective, so a rank left alone
    by a dead peer raises instead of hanging."""
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"init_from_env timeout_s: expected a number > 0, got {timeout_s!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "gloo" and os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _moe_layers(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(decoder layer, "mlp") for every MoE block: the main layers, then the MTP block."""
    layers = list(model.model.layers) + ([model.mtp.block] if getattr(model, "mtp", None) is not None else [])
    return [(layer, "mlp") for layer in layers if layer.is_moe]


class DataParallel:
    """The data-parallel machinery train.py calls (module docstring). Build it on every rank, after
    ``init_from_env`` (or inside ``glm5_ref.distributed.launch``)."""

    def __init__(self, expert_parallel: bool = False, group=None):
        if not dist.is_initialized():
            raise RuntimeError("DataParallel: torch.distributed is not initialised (torchrun + init_from_env, or "
                               "glm5_ref.distributed.launch)")
        if not isinstance(expert_parallel, bool):
            raise TypeError(f"DataParallel expert_parallel: expected a bool, got {type(expert_parallel).__name__}")
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.is_main = self.rank == 0
        self.expert_parallel = expert_parallel
        self.backend = dist.get_backend(group)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))
        # the experts' all_to_all on its own communicator: never interleaved with DDP's async all-reduces
        self.ep_group = dist.new_group(backend=self.backend) if expert_parallel else None
        self.ddp: DistributedDataParallel | None = None

    # ---- checks (every rank raises the same ValueError) -------------------------------------------------
    def check_same(self, **facts) -> None:
        """Every rank must be launched with the same config and arguments: compare them with rank 0's."""
        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, facts, group=self.group)
        for r, theirs in enumerate(everyone):
            for key in facts:
                if theirs.get(key) != everyone[0].get(key):
                    diff = everyone[0][key], theirs.get(key)
                    if isinstance(diff[0], dict) and isinstance(diff[1], dict):  # name the differing fields
                        diff = ({k: v for k, v in diff[0].items() if diff[1].get(k) != v},
                                {k: v for k, v in diff[1].items() if diff[0].get(k) != v})
                    raise ValueError(f"data parallel: rank {r} was given {key} {diff[1]!r} but rank 0 {diff[0]!r}; "
                                     "every rank must run the same config and arguments")

    def check_sizes(self, config, batch_size: int, eval_windows_n: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"batch_size: the global batch of {batch_size} sequences is not divisible by the "
                             f"world size {self.world_size} (every rank reads an equal slice)")
        if self.expert_parallel:
            check_expert_split(config.n_routed_experts, self.world_size)
            if eval_windows_n % self.world_size:
                raise ValueError(f"eval_windows_n: {eval_windows_n} validation windows are not divisible by the "
                                 f"world size {self.world_size} (expert parallelism: every rank runs the same "
                                 "number of forwards)")

    # ---- the model and the optimizer ---------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to this rank's device, shard the experts (expert_parallel), wrap in DDP. Returns ``model``
        (changed in place; the DDP wrapper is ``self.ddp``, used for the training forward only)."""
        model.to(self.device)
        if self.expert_parallel:
            for layer, attr in _moe_layers(model):
                if isinstance(getattr(layer, attr), MoE):
                    setattr(layer, attr, ExpertParallelMoE(getattr(layer, attr), group=self.ep_group))
        local = {id(p) for p in self.expert_params(model)}
        ignore = [n for n, p in model.named_parameters() if id(p) in local]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
        # find_unused_parameters: the indexer gets no gradient in the dense stage, only it in the warm-up,
        # the MTP block none while it is off, and the loop path skips experts that got no token
        self.ddp = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           process_group=self.group, forward_sync_buffers=False,
                                           find_unused_parameters=True)
        return model

    @staticmethod
    def expert_params(model: nn.Module) -> list[nn.Parameter]:
        """This rank's own (expert-parallel) experts: the parameters not replicated over the ranks."""
        return [p for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.local_experts.parameters()]

    def build_optimizer(self, model: nn.Module, name: str, lr: float, **kwargs):
        """muon.build_optimizer with its Muon part a DistributedMuon over the ranks for the replicated matrices;
        the local experts (expert parallelism) get a plain Muon of their own, "muon_experts"."""
        opt = build_optimizer(model, name, lr, **kwargs)
        if "muon" not in opt.optimizers:
            return opt
        muon = opt.optimizers["muon"]
        (g,) = muon.param_groups
        local = {id(p) for p in self.expert_params(model)}
        names = g.get("param_names") or [f"params[{i}]" for i in range(len(g["params"]))]
        blocks = g["blocks"] or [None] * len(g["params"])

        def part(mine: bool) -> list[dict]:
            idx = [i for i, p in enumerate(g["params"]) if (id(p) in local) == mine]
            return [{"params": [(names[i], g["params"][i]) for i in idx], "blocks": [blocks[i] for i in idx]}]

        hyper = {k: g[k] for k in MUON_HYPER}
        rest = {k: o for k, o in opt.optimizers.items() if k != "muon"}
        opt.optimizers = {"muon": DistributedMuon.from_muon(Muon(part(False), **hyper), self.group)}
        if local:
            opt.optimizers["muon_experts"] = Muon(part(True), **hyper)
        opt.optimizers.update(rest)
        return opt

    # ---- one step ---------------------------------------------------------------------------------------
    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch (B, T + 1) -> (B / W, T + 1), on this rank's device."""
        if batch.dim() != 2 or batch.shape[0] % self.world_size:
            raise ValueError(f"batch: expected (B, T + 1) with B divisible by the world size {self.world_size}, "
                             f"got {tuple(batch.shape)}")
        n = batch.shape[0] // self.world_size
        return batch[self.rank * n:(self.rank + 1) * n].to(self.device)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a float tensor (the same on every rank)."""
        out = values.detach().double().clone()
        dist.all_reduce(out, group=self.group)
        return out / self.world_size

    def network(self, model: nn.Module) -> nn.Module:
        """What a step runs forward: the DDP wrapper of ``model`` (the model given to prepare())."""
        if self.ddp is None or self.ddp.module is not model:
            raise ValueError("DataParallel: expected the model given to prepare()")
        return self.ddp

    def reduce_losses(self, out, loss: torch.Tensor, stage: str) -> torch.Tensor:
        """Before backward: the logged losses in ``out`` replaced by their means over the ranks (the combined
        batch's), so that a non-finite loss stops every rank at once. Returns the mean of ``loss``."""
        fields = ["loss", "lm_loss", "balance_loss", "indexer_loss", "mtp_loss"]
        parts = [getattr(out, f) for f in fields] + list(out.mtp_losses)
        means = self.mean(torch.stack([loss.detach().float()] + [(p if p is not None else loss.new_zeros(()))
                                                                  .detach().float() for p in parts]))
        for f, v in zip(fields, means[1:]):
            if getattr(out, f) is not None:
                setattr(out, f, v.to(torch.float32))
        out.mtp_losses = [v.to(torch.float32) for v in means[1 + len(fields):]]
        return means[0].to(torch.float32)

    def after_backward(self, model: nn.Module) -> None:
        """DDP has averaged the replicated gradients; an expert's owner summed every rank's tokens, so the
        gradient of the mean loss is 1/W of it."""
        for p in self.expert_params(model):
            if p.grad is not None:
                p.grad.div_(self.world_size)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> torch.Tensor:
        """Clip by the norm of the WHOLE model's gradient: replicated gradients are equal on every rank (count
        once), the expert-parallel ones are summed over their owners."""
        local = {id(p) for p in self.expert_params(model)}
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        max_norm = max_norm if max_norm else float("inf")
        if not local:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        rep = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in local])
        own = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in local])
        sq = (own.double() ** 2).reshape(1)
        dist.all_reduce(sq, group=self.group)
        total = (rep.double() ** 2 + sq[0]).sqrt().to(rep.dtype)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def global_loads(self, loads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tokens per expert summed over the ranks, one (E,) tensor per MoE layer (one all-reduce)."""
        if not loads:
            return []
        stacked = torch.stack([l.to(torch.int64) for l in loads])  # (L_moe, E)
        dist.all_reduce(stacked, group=self.group)
        return list(stacked.cpu().unbind(0))

    @staticmethod
    @torch.no_grad()
    def update_router_biases(model: nn.Module, loads: list[torch.Tensor], gamma: float | None = None) -> None:
        """model.update_router_biases for MoE and ExpertParallelMoE layers alike (via their gates)."""
        for moe, load in zip(model.moe_layers(), loads):
            update_router_bias(moe.gate, load, gamma)

    # ---- evaluation -------------------------------------------------------------------------------------
    def evaluate(self, model, windows: torch.Tensor, batch_size: int = 16, byte_lengths=None) -> dict:
        """data.evaluate over this rank's share of the windows, summed over the ranks (same result everywhere)."""
        mine = windows.tensor_split(self.world_size)[self.rank].to(self.device)  # (W_r, T + 1)
        bl = byte_lengths.to(self.device) if byte_lengths is not None else None
        if mine.shape[0]:
            r = evaluate(model, mine, batch_size=batch_size, byte_lengths=bl)
        else:
            r = {"nats": 0.0, "tokens": 0, "bytes": 0}
        totals = torch.tensor([r["nats"], r["tokens"], r["bytes"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals, group=self.group)
        nats, tokens, nbytes = totals.tolist()
        return {"loss": nats / tokens, "bpb": bits_per_byte(nats, int(nbytes)), "tokens": int(tokens),
                "bytes": int(nbytes), "nats": nats}

    # ---- checkpoints ------------------------------------------------------------------------------------
    def broadcast_float(self, value: float) -> float:
        """Rank 0's value on every rank (the run's clock)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                       group=self.group)
        return float(t.item())

    def gather_objects(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (a list by rank), None elsewhere."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                           group=self.group)
        return out

    def full_model(self, model: nn.Module) -> nn.Module | None:
        """On rank 0, a model holding every expert (for save_pretrained); None on the others.
        Without expert parallelism that is ``model`` itself; with it, the other ranks' experts are gathered."""
        if not self.expert_parallel:
            return model if self.is_main else None
        mine = {}
        for name, m in model.named_modules():
            if isinstance(m, ExpertParallelMoE):
                for pname, p in m.local_experts.experts.named_parameters():
                    i, rest = pname.split(".", 1)
                    mine[f"{name}.experts.{m.expert_offset + int(i)}.{rest}"] = p.detach().cpu()
        gathered = self.gather_objects(mine)
        if not self.is_main:
            return None
        state = {k.replace(".local_experts.experts.", ".experts."): v.detach().cpu()
                 for k, v in model.state_dict().items() if ".local_experts." not in k}
        for part in gathered:
            state.update(part)
        with torch.device("meta"):
            full = type(model)(model.config)
        full.load_state_dict(state, strict=True, assign=True)
        return full

    def load_optimizer_state(self, optimizer, saved: dict) -> None:
        """Restore this rank's optimizer state from a checkpoint written by ``optimizer_states``."""
        if saved.get("world_size", 1) != self.world_size or saved.get("expert_parallel", False) != \
                self.expert_parallel:
            raise ValueError(f"resume: the checkpoint was written by {saved.get('world_size', 1)} process(es), "
                             f"expert_parallel={saved.get('expert_parallel', False)}; this run has "
                             f"{self.world_size}, expert_parallel={self.expert_parallel}: resume with the same")
        optimizer.load_state_dict(saved["optimizer"][self.rank])

    def optimizer_states(self, optimizer) -> dict:
        """{"optimizer": [state_dict of rank 0, 1, ...], "world_size", "expert_parallel"} (rank 0; {} elsewhere)."""
        states = self.gather_objects(to_cpu(optimizer.state_dict()))  # CPU tensors: loadable anywhere
        if not self.is_main:
            return {}
        return {"optimizer": states, "world_size": self.world_size, "expert_parallel": self.expert_parallel}

    def __repr__(self) -> str:
        return (f"DataParallel(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r}, "
                f"expert_parallel={self.expert_parallel})")


__all__ = ["DataParallel", "init_from_env"]
