"""Execution choices: HOW the model computes, never WHAT it computes (GLM5Config is the what).

Every switch that changes the path a forward pass takes, but not the function it computes (up to floating-point
rounding, which the tests bound), lives in one frozen dataclass, ``Execution``. A model holds one
(``GLM5ForCausalLM.execution``), replaces it with ``model.set_execution(**changes)``, and hands it down to
every decoder block in ``forward``; a single call can override it with ``model(ids, execution=...)``. The
decoder block (block.py) is the one place that turns these fields into the keyword arguments of the
components, so mla.py, dsa.py and moe.py take plain arguments and never read this file: they stay copyable.

    absorbed              MLA path: False = expanded (keys and values per head; training, prefill),
                          True = absorbed (attend over the 512-d latents; decode), None = absorbed iff a
                          cache is given (the default: decode absorbed, train expanded). mla.py
    sparse                DSA top-k attention on (GLM-5 after DSA training) or off (dense MLA: the "dense"
                          and "warmup" stages of DSA training, a model whose indexer never trained). dsa.py
    sparse_impl           "gathered" (gather the k selected latents, cost independent of the context) or
                          "masked" (dense logits masked outside the selection). Equal; tested. mla.py
    detach_indexer_input  the indexer reads detached inputs, so it learns only from its KL loss (the sparse
                          stage of DSA training). A training choice that changes gradients, not outputs.
    moe_impl              "grouped" (one grouped GEMM per projection) or "loop" (one expert at a time, the
                          readable twin). Equal; tested. moe.py
    use_triton            run the Triton kernels (package glm5_kernels, folder kernels/) where they can:
                          CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; forward only. layers.py
                          ``triton_usable`` decides, without importing the kernels.
    fp8_indexer           simulate the production Hadamard rotation + FP8 e4m3 block quantisation of the
                          indexer's queries and keys (dsa.py); changes the scores slightly, by design.
    key_selector          replace the indexer's top-k by your own selection (experiments: a recency window,
                          random keys): ``key_selector(layer_idx, query_pos, num_keys, batch_size)`` returns
                          (B, T, K) key positions, -1 = padding (dsa.py DSAAttention.attend).

DSA training stages are expressed with these fields (training/engine.py ``set_dsa_stage``): dense = sparse off;
warm-up = sparse off + only the indexers trainable; sparse = sparse on + detach_indexer_input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

SPARSE_IMPLS = ("gathered", "masked")
MOE_IMPLS = ("grouped", "loop")


@dataclass(frozen=True)
class Execution:
    absorbed: bool | None = None           # MLA path; None = absorbed iff decoding with a cache
    sparse: bool = True                    # DSA top-k attention (False: dense MLA)
    sparse_impl: str = "gathered"          # "gathered" or "masked" sparse attention
    detach_indexer_input: bool = False     # the indexer learns only from its KL loss
    moe_impl: str = "grouped"              # "grouped" or "loop" expert computation
    use_triton: bool = False               # Triton kernels where they can run (inference only)
    fp8_indexer: bool = False              # simulate the FP8 indexer (Hadamard + e4m3 blocks of 128)
    key_selector: Callable | None = None   # your own key selection instead of the indexer's top-k

    def __post_init__(self) -> None:
        for name in ("sparse", "detach_indexer_input", "use_triton", "fp8_indexer"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Execution.{name}: expected True or False, got {getattr(self, name)!r}")
        if not (self.absorbed is None or isinstance(self.absorbed, bool)):
            raise ValueError(f"Execution.absorbed: expected None, True or False, got {self.absorbed!r}")
        if self.sparse_impl not in SPARSE_IMPLS:
            raise ValueError(f"Execution.sparse_impl: expected one of {SPARSE_IMPLS}, got {self.sparse_impl!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"Execution.moe_impl: expected one of {MOE_IMPLS}, got {self.moe_impl!r}")
        if self.key_selector is not None and not callable(self.key_selector):
            raise ValueError(f"Execution.key_selector: expected a callable or None, got "
                             f"{type(self.key_selector).__name__}")

    def replace(self, **changes) -> "Execution":
        """A copy with some fields changed (unknown names raise TypeError naming them)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Execution: unknown field(s) {unknown}; fields are "
                            f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def absorbed_for(self, cache) -> bool:
        """The MLA path for a forward with (or without) a cache."""
        return cache is not None if self.absorbed is None else self.absorbed

    def attention_kwargs(self, cache=None) -> dict:
        """Keyword arguments of DSAAttention.attend (dsa.py) for this execution."""
        return dict(absorbed=self.absorbed_for(cache), sparse=self.sparse, sparse_impl=self.sparse_impl,
                    detach_indexer_input=self.detach_indexer_input, use_triton=self.use_triton,
                    fp8=self.fp8_indexer, key_selector=self.key_selector)

    def moe_kwargs(self) -> dict:
        """Keyword arguments of MoE.forward (moe.py) for this execution."""
        return dict(impl=self.moe_impl, use_triton=self.use_triton)


DEFAULT = Execution()
