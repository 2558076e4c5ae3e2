"""Helpers shared by the kernels: where they can run, input checks, tile sizes.

The kernels run compiled on a CUDA GPU, or in Triton's interpreter (``TRITON_INTERPRET=1``, numpy, one program
instance at a time) on a CPU. The interpreter is chosen when a ``@triton.jit`` function is *defined*, so the
variable must be set before a kernel module is imported (tests/kernels/conftest.py and kernels/bench.py do it).
In the interpreter bf16 arithmetic is wrong without an error (Triton issues #11584, #11604): every kernel takes
a ``CAST`` constexpr that turns its loads into fp32 there, and the wrappers refuse bf16 on the interpreter.
"""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_ready() -> bool:
    """In interpreter mode, were triton's own library functions defined for it? Not if triton.language was
    imported before TRITON_INTERPRET=1 was set (transformers imports triton, for example): then every kernel
    that calls tl.max, tl.sort ... fails inside the interpreter. Set the variable first, in a fresh process."""
    if not interpreting() or not triton_available():
        return True
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(standard._indicator, InterpretedFunction)


def device_ok(t: torch.Tensor) -> bool:
    """Is t where the kernels run? CUDA tensors when compiled, CPU tensors when interpreted."""
    if not triton_available():
        return False
    return t.device.type == "cpu" if interpreting() else t.device.type == "cuda"


def can_run(t: torch.Tensor) -> bool:
    """Can a kernel take this tensor here: the right device and fp16/bf16/fp32 (not bf16 in the interpreter)?
    glm5_ref's opt-in flags ask this and fall back to the PyTorch twin when the answer is no."""
    if t.dtype not in FLOAT_DTYPES or (interpreting() and t.dtype == torch.bfloat16):
        return False
    return device_ok(t) and interpreter_ready()


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): Triton tiles are powers of two, tl.dot wants >= 16."""
    p = 1
    while p < max(n, minimum):
        p *= 2
    return p


def check_tensor(name: str, t, dims: int, dtypes=FLOAT_DTYPES, inner: int = 1) -> None:
    """TypeError/ValueError naming the argument: a tensor, ``dims`` dims, one of ``dtypes``, on a device the
    kernel can run on, its last ``inner`` dims packed (kernels take strides for the outer dims and assume
    unit stride, and packed rows, inside: slices along outer dims are fine, transposed views are not)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if interpreting() and t.dtype == torch.bfloat16:
        raise TypeError(f"{name}: bf16 is computed wrongly by the Triton interpreter (TRITON_INTERPRET=1); "
                        "use fp16/fp32 on CPU and bf16 on a GPU")
    if not device_ok(t):
        where = "CPU tensors (TRITON_INTERPRET=1 is set)" if interpreting() else "CUDA tensors"
        raise ValueError(f"{name}: the Triton kernels here take {where}, got a tensor on {t.device}"
                         + ("" if triton_available() else " (and triton is not installed)"))
    expected, packed = 1, True
    for size, stride in list(zip(t.shape, t.stride()))[::-1][:inner]:
        packed &= size == 1 or stride == expected
        expected *= size
    if not packed:
        raise ValueError(f"{name}: expected its last {inner} dim(s) contiguous (call .contiguous()), got shape "
                         f"{tuple(t.shape)} with strides {t.stride()}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: exact IEEE products (tf32 would cost ~1e-3 relative error); 16-bit inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"
