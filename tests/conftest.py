"""Shared pytest setup: hypothesis profiles and determinism.

Profiles (select with HYPOTHESIS_PROFILE=dev, default "ci"):
  ci   derandomized, bounded examples, no deadline: cannot flake on a shared, noisy 2-core machine.
  dev  more examples, random seeds: for local bug hunting.
"""

import os

# Before torch is imported: idle OpenMP threads sleep instead of spinning, so that parallel pytest workers
# (and notebook kernels, which inherit the environment) do not steal each other's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Triton kernels (tests/kernels) run in Triton's CPU interpreter when there is no CUDA device. Triton reads
# TRITON_INTERPRET when triton.language is first imported (its own library functions are defined then), and
# other test modules import triton early (transformers does), so it is set here, before anything else; it is
# removed again below if torch finds a GPU (importing torch does not import triton).
_TRITON_INTERPRET_SET_HERE = "TRITON_INTERPRET" not in os.environ
if _TRITON_INTERPRET_SET_HERE:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

if _TRITON_INTERPRET_SET_HERE and torch.cuda.is_available():  # a GPU: the kernels compile for it
    del os.environ["TRITON_INTERPRET"]

settings.register_profile(
    "ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# one thread per pytest-xdist worker (make test runs one worker per core), two in a single process
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (two threads only add overhead to such small ops).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
