"""Kernel tests: without a CUDA device the Triton kernels run in Triton's CPU interpreter.

Triton picks the interpreter when a ``@triton.jit`` function is defined, and triton.language defines its own
library functions (tl.sort, tl.max's helpers ...) when it is first imported. Other test files import triton early
(transformers does, in the same xdist worker), so tests/conftest.py sets TRITON_INTERPRET=1 before anything
else when there is no CUDA device; this file sets it again for a run of tests/kernels alone.
``interpreter_active`` checks that both the kernels and triton's library really were defined for the
interpreter, so a wrong order fails loudly instead of with an obscure error from inside a kernel.

``nan_empty``: torch.empty returns NaN-filled floats (and -123456789 for integers) while a test runs, so an
element a kernel forgets to write (outputs and split-KV partial buffers alike) fails the comparison.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError:  # the kernels need triton (Linux): nothing here can run
    collect_ignore_glob = ["test_*.py"]

ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="session")
def interpreter_active():
    if not ON_GPU:
        import triton.language.standard as tl_standard
        from triton.runtime.interpreter import InterpretedFunction

        from glm5_kernels.indexer import _indexer_scores_kernel
        for fn in (_indexer_scores_kernel, tl_standard._indicator):
            if not isinstance(fn, InterpretedFunction):
                pytest.fail(f"{fn} was defined before TRITON_INTERPRET=1 was set (triton was imported first): "
                            "the interpreter cannot run it. tests/conftest.py must set the variable before "
                            "anything imports triton", pytrace=False)


@pytest.fixture
def nan_empty(monkeypatch):
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-123456789)
        return t
    monkeypatch.setattr(torch, "empty", empty)
    yield

