"""The kernels benchmark's CPU path and the opt-in boundary of glm5_ref (never imports triton at load)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_glm5_ref_does_not_import_triton():
    code = ("import sys, glm5_ref, glm5_ref.dsa, glm5_ref.moe, glm5_ref.muon, glm5_ref.model, kernels; "
            "assert 'triton' not in sys.modules, 'triton imported at module level'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_bench_cpu_path_writes_rows(tmp_path):
    """On CPU: the correctness checks pass in the interpreter, a row says timings need a GPU, JSON written.
    On a GPU the same checks run compiled (the timings take minutes: `python -m glm5_kernels.bench` by hand)."""
    from glm5_ref.apps.bench.kernels import run as bench_run
    from glm5_kernels import bench

    rows = bench.run(quick=True, out_dir=tmp_path, timings=False)
    data = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert (tmp_path / "kernels_bench.txt").read_text().strip()
    assert set(data) == {"meta", "rows"} and data["rows"] == json.loads(json.dumps(rows, default=str))
    checks = [r for r in rows if r["section"] == "correctness"]
    assert len(checks) >= 7 and all(r["ok"] for r in checks), [r for r in checks if not r["ok"]]
    assert {"kernel", "shape", "dtype", "rel_err", "ok"} <= set(checks[0])
    names = {r["kernel"] for r in checks}
    assert {"indexer_topk", "sparse_mla_fwd", "grouped_gemm", "xxt", "newton_schulz (NS5)"} <= names
    if not torch.cuda.is_available():
        assert any("needs a CUDA GPU" in r.get("status", "") for r in rows)
        wrapped = bench_run(quick=True)  # `python -m glm5_ref bench kernels`: the same rows
        assert [r["kernel"] for r in wrapped] == [r["kernel"] for r in rows]


def test_bench_module_exits_zero_on_cpu(tmp_path):
    if torch.cuda.is_available():
        return  # the GPU run takes minutes: run `python -m glm5_kernels.bench` by hand
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}  # it must set it itself
    p = subprocess.run([sys.executable, "-m", "glm5_kernels.bench", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "needs a CUDA GPU" in p.stdout and "all passed" in p.stdout
