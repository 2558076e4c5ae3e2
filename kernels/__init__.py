"""Triton kernels for GLM-5's hot spots, each next to the plain-PyTorch twin in glm5_ref that it must equal.

    indexer        lightning indexer: fused q.k, ReLU, weighted head sum; per-query causal top-k
                   (twins: glm5_ref.dsa.Indexer.scores, glm5_ref.dsa.select_topk)
    sparse_mla     sparse MLA forward over the top-k latents, absorbed form (576-wide keys, 512-wide values at
                   GLM-5 dims), online softmax; prefill and split-KV decode (twin: glm5_ref.mla.MLA.attend_gathered)
    moe_gemm       grouped GEMM over expert-sorted segments and the fused SwiGLU gate|up epilogue
                   (twins: torch._grouped_mm, glm5_ref.moe.MoE._experts_grouped)
    newton_schulz  X X^T computing one triangle of tiles, the NS5 step and loop on it (twin: glm5_ref.muon.newton_schulz)
    bench          `python -m glm5_kernels.bench`: GPU timings vs the twins; on a CPU, correctness only

Where they run: compiled on a CUDA GPU, or in Triton's CPU interpreter when TRITON_INTERPRET=1 is set BEFORE a
kernel module is imported (the tests and the CPU benchmark do that; the interpreter is slow, about a
millisecond per program instance, and gets bf16 wrong, so on CPU use fp32/fp16 at small sizes).
The installed package is named ``glm5_kernels`` (this folder is kernels/; the bare name "kernels" is a PyPI
distribution of its own). The kernel modules import only torch, triton and each other; ``glm5_kernels.bench``
also imports the glm5_ref twins it checks. glm5_ref uses the kernels only when asked (``Execution(use_triton=True)``
for a model, ``use_triton=True`` on DSAAttention.attend, MoE.forward, ``newton_schulz`` and ``Muon``), only where
glm5_ref.layers.triton_usable says they can run, and never imports triton at module level. Importing this package
does not import triton either.
"""

from ._common import can_run, interpreting, triton_available

__all__ = ["can_run", "interpreting", "triton_available"]
