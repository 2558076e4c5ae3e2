"""`python -m glm5_ref bench kernels`: the Triton kernels (top-level package ``kernels``) against their twins.

A thin wrapper over ``glm5_kernels.bench``: on a CUDA GPU it times every kernel at GLM-5 shapes (ms, TFLOP/s, GB/s,
fraction of the measured ceilings, speed-up over the PyTorch twin and over torch.compile of it); on a CPU it
runs the correctness checks in the Triton interpreter and one row says that timings need a GPU. The rows are
also written to runs/kernels_bench/kernels_bench.json and .txt.
"""

from __future__ import annotations

import os

import torch


def run(quick: bool = False) -> list[dict]:
    if not torch.cuda.is_available():  # before glm5_kernels.bench imports any kernel module
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from glm5_kernels import bench
    except ImportError as exc:  # e.g. an installed glm5_ref without the kernels package
        return [dict(kernel="all", status=f"the kernels package is not importable here ({exc})")]
    return bench.run(quick=quick)
