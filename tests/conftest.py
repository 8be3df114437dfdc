"""Shared test setup: every test runs torch with one intra-op thread.

The test machines have 2 shared cores: with more busy processes than cores, OpenMP's
spin-waiting makes tiny convolutions ~50x slower with 2 threads than with 1, and a
single thread also keeps CPU kernels' reduction order fixed. Builders of tiny data and
teachers live in ``helpers.py`` (``from helpers import tiny_prepared, tiny_teacher``).
"""

from __future__ import annotations

import pytest
from helpers import torch_threads


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    with torch_threads(1):
        yield
