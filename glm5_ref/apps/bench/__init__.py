"""Benchmarks: `python -m glm5_ref bench NAME [--json] [--quick]`.

Each benchmark times a fast path against its baseline side by side in one run (a ratio, not an absolute
time: these machines are shared and noisy), prints a table, and with --json prints one JSON line last.
A benchmark lives in glm5_ref/bench/<name with _>.py and defines

    def run(quick: bool = False) -> dict | list[dict]

returning the rows to print. Register its name in BENCHMARKS below.

Devices (``--device auto|cpu|cuda|mps``, default cpu): a benchmark whose ``run`` takes ``device`` (a torch.device)
builds both sides there and every row gets a "device" key ("cpu", "cuda", "mps"; fp32 on
every device, so both sides compute the same thing); ``timeit`` waits for the GPU before it reads the clock. The
others run on the CPU only (rl-async: rollout worker processes and a toy model; vs-transformers; kernels picks the
GPU itself when there is one) and refuse another device with an error naming --device.
"""

from __future__ import annotations

import importlib
import inspect
import json
import time
from typing import Callable

from glm5_ref.devices import resolve_device, synchronize

BENCHMARKS: dict[str, str] = {
    "mla-decode": "one MLA decode step at GLM-5 layer size: absorbed latent cache vs expanded K/V cache",
    "muon": "Newton-Schulz 5 on the classroom model's matrices vs the raw matmuls it performs",
    "dsa-decode": "one decode step of a GLM-5 attention layer at 32K/128K: DSA (indexer + top-k) vs dense MLA",
    "decode": "classroom GLM-5 greedy generation, 128 tokens after 512: cached vs uncached tokens/s",
    "train-step": "classroom GLM-5 training step (fwd+bwd+optimizer) vs an all-dense model of matched active size",
    "vs-transformers": "glm5_ref vs transformers GlmMoeDsaForCausalLM, same weights: prefill, decode, train step",
    "spec-decode": "trained classroom GLM-5, 256 greedy tokens: MTP speculative decoding (3 drafts) vs plain",
    "moe": "MoE layer (256 experts, top-8): grouped dispatch vs per-expert loop",
    "rl-async": "sync vs async RL updates, rollout processes, tool latency 0.1x / 1x / 10x a rollout's compute",
    "kernels": "Triton kernels vs their PyTorch twins (GPU: time, TFLOP/s, GB/s; CPU: correctness checks only)",
}


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()  # GPU kernels run asynchronously: time what they do, not how fast they were queued
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def serving_batch(bytes_per_sequence: int, quick: bool = False, cap: int = 64) -> int:
    """The serving batch of the decode benchmarks: the most sequences whose caches fit the cache budget (12 GiB,
    half of this 24 GB machine, or half the memory available where that is less; 512 MiB in quick mode), at least 1
    and at most ``cap`` (beyond a few dozen sequences the layer's weight reads are already shared and a step
    only takes longer)."""
    budget = 512 * 2**20 if quick else min(12 * 2**30, available_memory() // 2)
    return max(1, min(cap, budget // max(int(bytes_per_sequence), 1)))


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (Linux); 8 GiB where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def format_table(rows: list[dict]) -> str:
    """A plain-text table of a list of flat dicts."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    table = [[cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(t[i]) for t in table)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


def run_benchmark(name: str, as_json: bool = False, quick: bool = False, ckpt: str | None = None,
                  device: str | None = None) -> dict | list[dict]:
    if name not in BENCHMARKS:
        raise ValueError(f"benchmark {name!r}: expected one of {sorted(BENCHMARKS)}")
    dev = resolve_device(device or "cpu", argument="--device")
    module = importlib.import_module(f"glm5_ref.apps.bench.{name.replace('-', '_')}")
    takes = inspect.signature(module.run).parameters
    if ckpt is not None and "ckpt" not in takes:
        raise ValueError(f"--ckpt: benchmark {name!r} does not take a checkpoint")
    if dev.type != "cpu" and "device" not in takes:
        raise ValueError(f"--device {dev.type}: benchmark {name!r} does not take a device (it runs on the CPU; "
                         "kernels on the CUDA GPU when there is one); leave --device out")
    kwargs = ({"ckpt": ckpt} if ckpt is not None else {}) | ({"device": dev} if "device" in takes else {})
    result = module.run(quick=quick, **kwargs)
    rows = result if isinstance(result, list) else [result]
    if "device" in takes:
        for row in rows:
            row["device"] = dev.type
    print(f"# bench {name}: {BENCHMARKS[name]}")
    print(format_table(rows))
    if as_json:
        print(json.dumps(result))
    return result
