"""Shared pytest setup: hypothesis profiles and determinism.

Profiles (select with HYPOTHESIS_PROFILE=dev, default "ci"):
  ci   derandomized, bounded examples, no deadline: cannot flake on a shared, noisy 2-core machine.
  dev  more examples, random seeds: for local bug hunting.
"""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
