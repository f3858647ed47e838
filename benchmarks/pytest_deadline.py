"""pytest plugin for benchmarks/gpu_check.sh (`-p benchmarks.pytest_deadline`): a test that
would start after the time in $GPU_CHECK_TESTS_DEADLINE (seconds since the epoch) is
skipped, so that a run given a share of a time budget ends within it with its report."""
from __future__ import annotations

import os
import time

import pytest

SKIP_REASON = "gpu_check: the tests' share of the time is spent"


def pytest_runtest_setup(item: pytest.Item) -> None:
  deadline = os.environ.get("GPU_CHECK_TESTS_DEADLINE")
  if deadline and time.time() > float(deadline):
    pytest.skip(SKIP_REASON)
