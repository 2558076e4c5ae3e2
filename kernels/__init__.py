"""Triton kernels for GLM-5's hot spots, each next to the plain-PyTorch twin in glm5_ref that it must equal.

    kernels.indexer        lightning indexer: fused q.k, ReLU, weighted head sum; per-query causal top-k
                           (twins: glm5_ref.dsa.Indexer.scores, glm5_ref.dsa.select_topk)
    kernels.sparse_mla     sparse MLA forward over the top-k latents, absorbed form (576-wide keys, 512-wide
                           values at GLM-5 dims), online softmax; prefill and split-KV decode
                           (twin: glm5_ref.dsa.DSAAttention.attend_gathered)
    kernels.moe_gemm       grouped GEMM over expert-sorted segments and the fused SwiGLU gate|up epilogue
                           (twins: torch._grouped_mm, glm5_ref.moe.MoE._experts_grouped)
    kernels.newton_schulz  X X^T computing one triangle of tiles, the NS5 step and loop on it
                           (twin: glm5_ref.muon.newton_schulz)
    kernels.bench          `python -m kernels.bench`: GPU timings vs the twins; on a CPU, correctness only

Where they run: compiled on a CUDA GPU, or in Triton's CPU interpreter when TRITON_INTERPRET=1 is set BEFORE a
kernel module is imported (the tests and the CPU benchmark do that; the interpreter is slow, about a
millisecond per program instance, and gets bf16 wrong, so on CPU use fp32/fp16 at small sizes).
glm5_ref uses them only when asked (``DSAAttention.use_triton``, ``MoE.use_triton``,
``newton_schulz(..., use_triton=True)``, ``Muon(..., use_triton=True)``) and only where they can run; it never
imports triton at module level. Importing this package does not import triton either.
"""

from kernels._common import can_run, interpreting, triton_available

__all__ = ["can_run", "interpreting", "triton_available"]
