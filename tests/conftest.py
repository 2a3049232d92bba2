"""Hypothesis profiles and shared fixtures.

Profiles: ``dev`` (default, quick), ``ci`` (derandomized, chosen when ``CI`` is set),
``nightly`` (many examples). Pick one with ``HYPOTHESIS_PROFILE=nightly``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_common)
settings.register_profile("nightly", max_examples=1000, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny matmuls: threads gain nothing there, and on a shared 2-core
    machine their hand-offs cost far more than the arithmetic. Restored after the module.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
