"""glm5_ref.distributed: GLM-5's components scaled over several processes with torch.distributed.

    expert_parallel.py  ExpertParallelMoE: routed experts sharded over ranks, tokens exchanged by all_to_all
    muon.py             DistributedMuon: zero-redundancy Muon / Muon Split (Newton-Schulz and momentum sharded)
    routing.py          HashRing, RolloutRouter: DP-aware rollout routing by consistent hashing, bounded loads
    launch.py           launch(fn, world_size): N local gloo processes that fail fast with the failing rank's error
    data_parallel.py    DataParallel: DDP training of the whole model by train.py (torchrun), optionally with EP

Everything runs on CPU with the gloo backend (``launch``) and under ``torchrun`` with any backend.
"""

from glm5_ref.distributed.expert_parallel import ExpertParallelMoE, all_to_all, check_expert_split
from glm5_ref.distributed.data_parallel import DataParallel, init_from_env
from glm5_ref.distributed.launch import RankFailedError, launch
from glm5_ref.distributed.muon import DistributedMuon, assign_units, build_distributed_optimizer
from glm5_ref.distributed.routing import HashRing, RolloutRouter, stable_hash

__all__ = [
    "ExpertParallelMoE", "all_to_all", "check_expert_split", "RankFailedError", "launch", "DistributedMuon",
    "DataParallel", "init_from_env",
    "assign_units", "build_distributed_optimizer", "HashRing", "RolloutRouter", "stable_hash",
]
