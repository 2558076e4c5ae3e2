"""Where the model runs: ``resolve_device("auto" | "cpu" | "cuda" | "mps")`` and ``autocast(device)``.

    resolve_device(name)   "auto": CUDA if available, else Apple's MPS if available, else the CPU; an explicit
                           "cuda" / "mps" that this machine lacks raises ValueError (what it has is named)
    autocast(device)       bf16 autocast on CUDA (GPUs with bf16) and on MPS (where torch supports it there);
                           a no-op on the CPU, so every CPU result stays fp32 and bit-identical run to run
    model_device(module)   the device of a module's parameters (where its inputs and caches must be made)
    to_cpu(obj)            every tensor of a nested state moved to the CPU (checkpoints load anywhere)
    synchronize()          wait for queued GPU work (timings: CUDA and MPS kernels run asynchronously)

What runs where (``--device`` of train, generate, recipe base, bench)
    cpu    everything, fp32: the default of every command and of ``train(...)``, so tests, the recipe and the
           shipped numbers are the same on every machine (tested here).
    cuda   single-process training and evaluation, generation (plain and speculative) and the recipe's stages
           under bf16 autocast (fp32 weights and optimizer state; losses, softmax and norms in fp32); the
           benchmarks that compare two implementations, both sides in fp32. Data parallel (torchrun) keeps its
           own rank device: NCCL ranks each use their GPU. The MoE experts run one matmul per expert (torch's GPU
           grouped GEMM takes bf16 operands only, the weights are fp32). Not tested on a GPU by this project.
    mps    the same as cuda in one process (no data parallel: torch.distributed has no MPS backend). RoPE angles
           are fp32 there (MPS has no float64; off by < 1e-3 rad at 4K positions, fp64 elsewhere), and the
           opt-in FP8 indexer simulation rounds on the CPU (MPS has no float8). Untested here.
    The autocast paths are checked for dtype mixing under the CPU's own bf16 autocast (tests/test_devices.py).

Why bf16 and not fp16: bf16 has fp32's exponent range, so no loss scaling (GradScaler) is needed. Why not on the
CPU: CPU bf16 matmuls are slower than fp32 ones on most machines, and fp32 keeps results exactly reproducible.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device types this machine can run on, CPU first."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if mps_available() else [])


def resolve_device(name: str | torch.device | None = "auto", argument: str = "device") -> torch.device:
    """``name`` as a torch.device: "auto" (None too) picks cuda, then mps, then cpu; "cpu", "cuda", "mps" (or a
    torch.device of those types) must be available. ValueError naming ``argument`` otherwise."""
    if name is None or name == "auto":
        have = available_devices()
        return torch.device("cuda" if "cuda" in have else "mps" if "mps" in have else "cpu")
    device = name if isinstance(name, torch.device) else None
    if device is None and name in DEVICES:
        device = torch.device(name)
    if device is None or device.type not in DEVICES:
        raise ValueError(f"{argument}: expected one of {', '.join(DEVICES)}, got {name!r}")
    if device.type not in available_devices():
        raise ValueError(f"{argument}: {device.type} was asked for, but this machine has no usable "
                         f"{'CUDA GPU' if device.type == 'cuda' else 'Apple MPS device'} (available: "
                         f"{', '.join(available_devices())}; auto picks the first of cuda, mps, cpu)")
    return device


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """The dtype ``autocast`` uses on ``device``: bfloat16 on CUDA GPUs that support it and on MPS where torch
    has bf16 autocast (torch >= 2.5: older versions only autocast MPS to fp16, which would need loss scaling,
    so MPS stays fp32 there); None (fp32, no autocast) on the CPU and everywhere else."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    if device.type == "mps":
        major, minor = (int(v) for v in torch.__version__.split(".")[:2])
        return torch.bfloat16 if (major, minor) >= (2, 5) and mps_available() else None
    return None


def autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` where ``autocast_dtype`` gives one, else a no-op context (the CPU: fp32,
    today's results bit for bit). Wrap forwards only (backward and the optimizer run outside, as torch advises)."""
    device = torch.device(device)
    dtype = autocast_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    with warnings.catch_warnings():  # a torch that cannot autocast here warns and disables itself: fp32 then
        warnings.simplefilter("ignore")
        return torch.autocast(device.type, dtype=dtype)


def model_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters live (the CPU for a module without parameters)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def to_cpu(obj):
    """``obj`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU: what a checkpoint stores,
    so that it loads on any machine (torch.load(..., map_location="cpu") then needs no GPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def synchronize() -> None:
    """Wait for every queued CUDA / MPS kernel (a no-op on the CPU): call before reading a clock."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if mps_available():
        torch.mps.synchronize()


def describe(device: torch.device) -> str:
    """One line for logs and benchmark rows: "cpu (fp32)", "cuda (NVIDIA ..., bf16 autocast)"."""
    dtype = autocast_dtype(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    precision = "bf16 autocast" if dtype is not None else "fp32"
    return f"{device.type} ({name + ', ' if name else ''}{precision})"
