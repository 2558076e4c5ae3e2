"""`python -m glm5_kernels.bench [--quick] [--out DIR] [--dry-run]`: the Triton kernels against their PyTorch twins.

On a CUDA GPU: first the correctness checks (every kernel against its twin at small odd sizes), then the
measured ceilings of the device (a bf16 torch.mm for TFLOP/s, a device copy for GB/s), then each kernel at GLM-5
shapes (performance_anchors.md, "Suggested performance goals (b)"): its time (triton.testing.do_bench, median),
TFLOP/s, GB/s, the fraction of the measured ceilings, the time of the PyTorch twin and of torch.compile of the
twin, the ratios, and the issue's goal with whether it was met. Writes DIR/kernels_bench.json and
DIR/kernels_bench.txt (DIR defaults to runs/kernels_bench) and prints the table.

On a CPU: sets TRITON_INTERPRET=1 (before any kernel module is imported), runs the correctness checks in the
interpreter, says that timings need a GPU, writes the same files, and exits 0. ``--dry-run`` also runs the whole
timing pipeline at tiny shapes in the interpreter (to exercise it; its numbers mean nothing and are marked so).

FLOP conventions: sparse MLA 2 T H K (D + d_v) (FlashMLA's tests/lib.py); indexer 2 pairs J I with the causal
pairs; X X^T counted as the full 2 s^2 n (so that TFLOP/s compares with cuBLAS X @ X.T; the kernel does about
half of it); grouped SwiGLU 6 S d I. Bytes are the compulsory traffic (each kernel's flops_bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any kernel module defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _tol(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]


# ------------------------------------------------------------------------------------------------------------
# correctness: every kernel against its twin at small odd sizes
def correctness_checks(device: str, dtypes=None) -> list[dict]:
    from glm5_ref.config import GLM5Config
    from glm5_ref.dsa import DSAAttention, Indexer, select_topk
    from glm5_ref.moe import MoE
    from glm5_ref.muon import newton_schulz as ns_twin
    from .indexer import indexer_scores, indexer_topk
    from .moe_gemm import grouped_gemm
    from .newton_schulz import newton_schulz, xxt
    from .sparse_mla import absorbed_sparse_attention, sparse_mla

    if dtypes is None:
        dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    cfg = GLM5Config.tiny()
    rows = []
    for dt in dtypes:
        tol = _tol(dt)
        # indexer: scores and top-k (top-k on the kernel's own scores must match select_topk exactly)
        J, I, B, T, S, topk = 3, 24, 2, 13, 37, 7
        q, k, w = randn(B, T, J, I, dtype=dt), randn(B, S, I, dtype=dt), randn(B, T, J)
        ind = Indexer(dataclasses.replace(cfg, index_n_heads=J, index_head_dim=I)).to(device)
        ref = ind.scores(q, k, w)
        sc = indexer_scores(q, k, w)
        idx = indexer_topk(q, k, w, topk, start=S - T)
        same = torch.equal(idx, select_topk(sc, torch.arange(S - T, S, device=device), topk))
        rows.append(dict(kernel="indexer_scores", shape=f"B{B} T{T} S{S} J{J} I{I}", dtype=str(dt)[6:],
                         rel_err=_rel(sc, ref), ok=_rel(sc, ref) < tol))
        rows.append(dict(kernel="indexer_topk", shape=f"B{B} T{T} S{S} k{topk}", dtype=str(dt)[6:],
                         rel_err=0.0 if same else 1.0, ok=same))
        # sparse MLA (absorbed, gathered) against MLA.attend_gathered
        m = DSAAttention(cfg).to(device=device, dtype=dt)
        H, N, P, C = m.num_heads, m.nope_dim, m.rope_dim, m.kv_lora_rank
        B, T, S, K = 2, 5, 23, 9
        qpos = torch.arange(S - T, S, device=device)
        kidx = torch.stack([torch.randperm(S - T + 1, generator=g)[:K] for _ in range(B * T)]).view(B, T, K).to(device)
        kidx[0, 0, K // 2:] = -1
        args = (randn(B, T, H, N, dtype=dt), randn(B, T, H, P, dtype=dt), randn(B, S, C, dtype=dt),
                randn(B, S, P, dtype=dt))
        with torch.no_grad():
            ref = m.attend_gathered(*args, qpos, kidx)[0]
            w_uk, w_uv = m.absorbed_weights()
            out = absorbed_sparse_attention(*args, kidx, w_uk, w_uv, m.scale)
        rows.append(dict(kernel="sparse_mla_fwd", shape=f"B{B} T{T} H{H} S{S} K{K} D{C + P}", dtype=str(dt)[6:],
                         rel_err=_rel(out, ref), ok=_rel(out, ref) < tol))
        # its backward: gradients of the absorbed path against autograd through the twin
        leaves = [a.detach().requires_grad_() for a in args]
        g_ref = torch.autograd.grad(m.attend_gathered(*leaves, qpos, kidx)[0].float().square().sum(), leaves)
        with torch.no_grad():
            qq = torch.cat([torch.einsum("bthn,hnc->bthc", leaves[0], w_uk), leaves[1]], -1)
            kvv = torch.cat([leaves[2], leaves[3]], -1)
        qq.requires_grad_()
        kvv.requires_grad_()
        o_lat = sparse_mla(qq, kvv, kidx, m.scale, d_v=C)
        dq, dkv = torch.autograd.grad(torch.einsum("bthc,hvc->bthv", o_lat, w_uv).float().square().sum(), (qq, kvv))
        g_k = (torch.einsum("bthc,hnc->bthn", dq[..., :C], w_uk), dq[..., C:], dkv[..., :C], dkv[..., C:])
        err = max(_rel(a, b) for a, b in zip(g_k, g_ref))
        rows.append(dict(kernel="sparse_mla backward", shape=f"B{B} T{T} H{H} S{S} K{K} D{C + P}", dtype=str(dt)[6:],
                         rel_err=err, ok=err < 3 * tol))
        # grouped GEMM against torch._grouped_mm's definition (per-segment matmuls in fp64)
        E, Sr, Kd, Nn = 5, 41, 24, 40
        counts = torch.tensor([9, 0, 17, 4, 11], device=device)
        offs = counts.cumsum(0).to(torch.int32)
        x, wt = randn(Sr, Kd, dtype=dt), randn(E, Nn, Kd, dtype=dt)
        ref = torch.cat([x[a:b].double() @ wt[e].double().T for e, (a, b) in
                         enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
        y = grouped_gemm(x, wt, offs)
        rows.append(dict(kernel="grouped_gemm", shape=f"S{Sr} K{Kd} N{Nn} E{E}", dtype=str(dt)[6:],
                         rel_err=_rel(y, ref), ok=_rel(y, ref) < tol))
        moe_cfg = dataclasses.replace(cfg, hidden_size=32, moe_intermediate_size=16)
        moe = MoE(moe_cfg).to(device=device, dtype=dt)
        xm = randn(2, 7, 32, dtype=dt)
        with torch.no_grad():
            ref = moe(xm, impl="loop")
            y = moe(xm, use_triton=True)
        rows.append(dict(kernel="moe_experts (MoE(use_triton=True))", shape=f"N14 d32 I16 E{moe_cfg.n_routed_experts}",
                         dtype=str(dt)[6:], rel_err=_rel(y, ref), ok=_rel(y, ref) < tol))
        # X X^T and Newton-Schulz
        X = randn(37, 53, dtype=dt)
        A = xxt(X)
        ref = X.double() @ X.double().T
        rows.append(dict(kernel="xxt", shape="37x53", dtype=str(dt)[6:], rel_err=_rel(A, ref),
                         ok=_rel(A, ref) < tol and torch.equal(A, A.T)))
        G = randn(45, 29)
        O = newton_schulz(G, dtype=dt)
        ref = ns_twin(G, dtype=dt)
        rows.append(dict(kernel="newton_schulz (NS5)", shape="45x29", dtype=str(dt)[6:], rel_err=_rel(O, ref),
                         ok=_rel(O, ref) < 10 * tol))
    return rows


# ------------------------------------------------------------------------------------------------------------
# timing
def _timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def cpu_time(fn) -> float:  # the dry run: wall time of one call, in the interpreter (meaningless)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return cpu_time


def measure_ceilings(device: str, quick: bool) -> dict:
    """The device's measured ceilings: bf16 (or fp16 off-GPU) GEMM TFLOP/s and device-copy GB/s."""
    t = _timer(device)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    n = (4096 if quick else 8192) if device == "cuda" else 64
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    ms = t(lambda: a @ b)
    nb = (2**28 if quick else 2**30) if device == "cuda" else 2**16
    x = torch.empty(nb, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms_copy = t(lambda: y.copy_(x))
    return {"gemm_tflops": 2 * n**3 / ms / 1e9, "copy_gbps": 2 * nb / ms_copy / 1e6, "gemm_n": n, "copy_bytes": nb}


def _compiled(fn):
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # noqa: BLE001 - no compiler here: the column stays empty
        return None


def gpu_rows(device: str, quick: bool, tiny: bool = False) -> list[dict]:
    """Each kernel at GLM-5 shapes (tiny: the dry run's shapes) with its twin and torch.compile of the twin."""
    from glm5_ref.dsa import select_topk
    from glm5_ref.muon import NS_COEFFICIENTS
    from glm5_ref.muon import newton_schulz as ns_twin
    from . import indexer as kidx
    from . import moe_gemm as kmoe
    from . import newton_schulz as kns
    from . import sparse_mla as kmla

    t = _timer(device)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    e = torch.empty((), dtype=dt).element_size()
    ceil = measure_ceilings(device, quick)
    rows: list[dict] = []
    times: dict[str, float] = {}

    def add(name, shape, flops, nbytes, fn, twin=None, twin_scale=1.0, goal="", goal_fn=None, note=""):
        row = dict(kernel=name, shape=shape, dtype=str(dt)[6:])
        try:
            ms = t(fn)
            times[name] = ms
            row.update(ms=ms, tflops=flops / ms / 1e9, gbps=nbytes / ms / 1e6)
            row.update(frac_gemm_ceiling=row["tflops"] / ceil["gemm_tflops"],
                       frac_copy_ceiling=row["gbps"] / ceil["copy_gbps"])
            if twin is not None:
                try:
                    row["twin_ms"] = t(twin) * twin_scale
                    row["speedup_vs_twin"] = row["twin_ms"] / ms
                except Exception as exc:  # noqa: BLE001 - e.g. the twin runs out of memory: say so
                    row["twin_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                ct = _compiled(twin) if device == "cuda" else None
                if ct is not None:
                    try:
                        row["compiled_ms"] = t(ct) * twin_scale
                        row["speedup_vs_compiled"] = row["compiled_ms"] / ms
                    except Exception as exc:  # noqa: BLE001
                        row["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
            if goal:
                row["goal"] = goal
                row["goal_met"] = bool(goal_fn(row)) if goal_fn else None
        except Exception as exc:  # noqa: BLE001 - one failing kernel must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        if note:
            row["note"] = note
        rows.append(row)

    # --- sparse MLA prefill: FlashMLA's shape s_q 4096, s_kv 32K, topk 2048, h_q 128, d_qk 576, d_v 512
    Tq, S, K, H, D, C = (4096, 32768, 2048, 128, 576, 512) if not tiny else (8, 64, 16, 4, 24, 16)
    if quick and not tiny:
        Tq = 1024
    q = torch.randn(1, Tq, H, D, device=device, dtype=dt)
    kv = torch.randn(1, S, D, device=device, dtype=dt)
    ind = torch.stack([torch.randperm(S, device=device)[:K] for _ in range(Tq)])[None].to(torch.int32)  # (1, T, K)
    scale = (192 + 64) ** -0.5
    fl, by = kmla.flops_bytes(1, Tq, H, K, D, C, e, block_h=16)
    sub = min(Tq, 128)

    def mla_twin():  # gathered absorbed attention in PyTorch on `sub` queries (scaled up: the (T, K, D)
        lat = kv[0][ind[0, :sub].long()]  # gather of all 4096 queries would need ~10 GB)   (sub, K, D)
        s = torch.einsum("thd,tkd->thk", q[0, :sub].float(), lat.float()) * scale
        return torch.einsum("thk,tkc->thc", torch.softmax(s, -1).to(dt), lat[..., :C])
    add("sparse_mla prefill", f"T{Tq} S{S} K{K} H{H} D{D}", fl, by,
        lambda: kmla.sparse_mla_fwd(q, kv, ind, scale, C, validate=False), mla_twin, Tq / sub,
        goal=">= 320 TFLOP/s (0.5x FlashMLA's 640 on H800)", goal_fn=lambda r: r["tflops"] >= 320,
        note=f"twin timed on {sub} queries and scaled")
    # backward (stretch goal) on a quarter of the queries: FLOPs 2 T H K (3 D + 2 C), ~2.5x the forward
    Tb = max(1, Tq // 4)
    qb, kvb = q[:, :Tb].clone().requires_grad_(), kv.clone().requires_grad_()
    ob = kmla.sparse_mla(qb, kvb, ind[:, :Tb], scale, C)
    dob = torch.randn_like(ob)
    add("sparse_mla backward", f"T{Tb} S{S} K{K} H{H} D{D}", 2.0 * Tb * H * K * (3 * D + 2 * C),
        float(Tb * K * D * e * 8 + 2 * Tb * H * D * e + 4 * S * D),
        lambda: torch.autograd.grad(ob, (qb, kvb), dob, retain_graph=True),
        note="reference: TileLang sparse_mla_bwd ~115 TF on H200 (performance_anchors.md)")
    del q, ind, qb, kvb, ob, dob
    # --- sparse MLA decode: b 128, s_q 2, h_q 128, topk 2048 (bf16 KV, not FlashMLA's FP8)
    Bd, Td, Sd = (128, 2, 32768 if not quick else 8192) if not tiny else (2, 2, 64)
    qd = torch.randn(Bd, Td, H, D, device=device, dtype=dt)
    kvd = torch.randn(Bd, Sd, D, device=device, dtype=dt)
    indd = torch.randint(0, Sd, (Bd, Td, K), device=device, dtype=torch.int32)
    fl, by = kmla.flops_bytes(Bd, Td, H, K, D, C, e, block_h=16)
    add("sparse_mla decode", f"B{Bd} T{Td} S{Sd} K{K} H{H}", fl, by,
        lambda: kmla.sparse_mla_fwd(qd, kvd, indd, scale, C, validate=False),
        goal=">= 205 TFLOP/s (0.5x FlashMLA FP8 sparse decode 410)", goal_fn=lambda r: r["tflops"] >= 205)
    del qd, kvd, indd
    # --- indexer + top-k, prefill chunk of 4096 queries at the end of a 32K context (J 32, I 128: GLM-5)
    J, I = (32, 128) if not tiny else (4, 16)
    Ti = Tq
    qi = torch.randn(1, Ti, J, I, device=device, dtype=dt)
    ki = torch.randn(1, S, I, device=device, dtype=dt)
    wi = torch.randn(1, Ti, J, device=device)
    start = S - Ti
    fl, by = kidx.flops_bytes(1, Ti, S, J, I, K, e, causal=True)
    fl = 2.0 * (Ti * (Ti + 1) / 2 + Ti * start) * J * I

    def indexer_twin():
        pos = torch.arange(start, S, device=device)
        out = []
        for c0 in range(0, Ti, 256):  # (256, J, S) fp32 logits per chunk
            qq = qi[:, c0:c0 + 256].float() * I ** -0.5
            sc = torch.einsum("btj,btjs->bts", wi[:, c0:c0 + 256],
                              torch.relu(torch.einsum("btji,bsi->btjs", qq, ki.float())))
            out.append(select_topk(sc, pos[c0:c0 + 256], K))
        return out
    add("indexer_topk (fused)", f"T{Ti} S{S} J{J} I{I} k{K}", fl, by,
        lambda: kidx.indexer_topk(qi, ki, wi, K, start), indexer_twin,
        goal="<= 0.5x sparse_mla prefill time",
        goal_fn=lambda r: "sparse_mla prefill" in times and r["ms"] <= 0.5 * times["sparse_mla prefill"])
    add("indexer_scores + torch.topk", f"T{Ti} S{S} J{J} I{I} k{K}", fl, by + 8.0 * Ti * S,
        lambda: select_topk(kidx.indexer_scores(qi, ki, wi), torch.arange(start, S, device=device), K),
        goal="<= 0.5x sparse_mla prefill time",
        goal_fn=lambda r: "sparse_mla prefill" in times and r["ms"] <= 0.5 * times["sparse_mla prefill"])
    del qi, ki, wi
    # --- grouped MoE SwiGLU: S 32K tokens, H 2048, FFN 768, E 128, top-8 (VeOmni's shape)
    Nt, d, Iw, E, top = (32768 if not quick else 8192, 2048, 768, 128, 8) if not tiny else (32, 32, 16, 8, 2)
    Sr = Nt * top
    counts = torch.bincount(torch.randint(0, E, (Sr,), device=device), minlength=E)
    offs = counts.cumsum(0).to(torch.int32)
    xs = torch.randn(Sr, d, device=device, dtype=dt)
    gate_up = torch.randn(E, 2 * Iw, d, device=device, dtype=dt) * d ** -0.5
    down = torch.randn(E, d, Iw, device=device, dtype=dt) * Iw ** -0.5
    gw = torch.rand(Sr, device=device)
    gmm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

    def moe_twin():
        gg, uu = gmm(xs, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        return gmm((torch.nn.functional.silu(gg) * uu * gw[:, None]).to(dt), down.transpose(1, 2), offs=offs)
    fl, by = kmoe.flops_bytes(Sr, d, Iw, E, e)
    add("moe_experts (grouped SwiGLU)", f"S{Sr} d{d} I{Iw} E{E}", fl, by,
        lambda: kmoe.moe_experts(xs, gate_up, down, offs, gw, validate=False), moe_twin if gmm else None,
        goal=">= 0.8x torch._grouped_mm speed", goal_fn=lambda r: r.get("speedup_vs_twin", 0) >= 0.8)
    del xs, gate_up, down
    # --- X X^T and the NS5 step
    for n in ((4096, 8192) if not quick else (4096,)) if not tiny else (48,):
        X = torch.randn(n, n, device=device, dtype=dt)
        fl = 2.0 * n**3
        add(f"xxt n={n}", f"{n}x{n}", fl, 2.0 * n * n * e, lambda: kns.xxt(X), lambda: X @ X.T,
            goal="<= 0.7x torch X @ X.T time", goal_fn=lambda r: r.get("speedup_vs_twin", 0) >= 1 / 0.7)
        a, b, c = NS_COEFFICIENTS

        def step_twin():
            A = X @ X.T
            return torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
        add(f"ns5_step n={n}", f"{n}x{n}", 6.0 * n**3, 7.0 * n * n * e, lambda: kns.ns5_step(X, a, b, c), step_twin,
            goal="<= 1.0x torch.compile of the step", goal_fn=lambda r: r.get("speedup_vs_compiled", 0) >= 1.0)
    G = torch.randn(1024 if not tiny else 40, 4096 if not tiny else 56, device=device, dtype=torch.float32)
    s_, n_ = G.shape
    add("newton_schulz (5 steps)", f"{tuple(G.shape)}", 5 * (4.0 * s_ ** 2 * n_ + 2.0 * s_ ** 3),
        0.0, lambda: kns.newton_schulz(G, dtype=dt), lambda: ns_twin(G, dtype=dt))
    for r in rows:
        if tiny:
            r.pop("goal_met", None)  # interpreter wall times say nothing about the goals
        r["device"] = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter (dry run)"
    rows.insert(0, dict(kernel="ceilings (measured)", shape=f"mm {ceil['gemm_n']}^3, copy {ceil['copy_bytes']} B",
                        dtype=str(dt)[6:], tflops=ceil["gemm_tflops"], gbps=ceil["copy_gbps"]))
    return rows


# ------------------------------------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """The rows as a plain-text table, one column per key seen (floats to 4 significant digits)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max([len(k)] + [len(c[i]) for c in cells]) for i, k in enumerate(keys)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [keys] + cells)


def run(quick: bool = False, out_dir: str | Path | None = None, dry_run: bool = False,
        timings: bool = True) -> list[dict]:
    """All rows (correctness, then timings on a GPU unless ``timings=False``); writes kernels_bench.json and .txt
    under out_dir."""
    from ._common import interpreter_ready, triton_available

    if not triton_available():
        rows = [dict(kernel="all", status="triton is not installed: nothing to check or time")]
    elif not interpreter_ready():
        rows = [dict(kernel="all", status="triton was imported before TRITON_INTERPRET=1 was set: the interpreter "
                                          "cannot run the kernels; run `python -m glm5_kernels.bench` in a fresh process")]
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows = [dict(section="correctness", **r) for r in correctness_checks(device)]
        if device == "cuda" and timings:
            rows += [dict(section="timing", **r) for r in gpu_rows(device, quick)]
        elif device == "cuda":
            rows.append(dict(section="timing", kernel="all", status="skipped (timings=False)"))
        else:
            if dry_run:
                rows += [dict(section="dry run (interpreter, not timings)", **r)
                         for r in gpu_rows("cpu", quick=True, tiny=True)]
            rows.append(dict(section="timing", kernel="all",
                             status="needs a CUDA GPU: timings not measured here (correctness checked in the "
                                    "Triton interpreter)"))
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                interpreter=os.environ.get("TRITON_INTERPRET", "0"), quick=quick)
    out = Path(out_dir) if out_dir is not None else ROOT / "runs" / "kernels_bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    (out / "kernels_bench.txt").write_text(f"# {meta}\n" + format_table(rows) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm5_kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller GPU shapes")
    p.add_argument("--out", default=None, help="directory for kernels_bench.json/.txt (default runs/kernels_bench)")
    p.add_argument("--dry-run", action="store_true", help="on CPU: also run the timing code at tiny shapes")
    args = p.parse_args(argv)
    rows = run(quick=args.quick, out_dir=args.out, dry_run=args.dry_run)
    print(format_table(rows))
    bad = [r for r in rows if r.get("ok") is False]
    if not torch.cuda.is_available():
        print("glm5_kernels.bench: timings need a CUDA GPU; correctness checks ran in the Triton interpreter"
              f" ({'all passed' if not bad else f'{len(bad)} FAILED'}).")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
