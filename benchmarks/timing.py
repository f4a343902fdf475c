"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timings(action: Callable[[], object], runs: int) -> list[float]:
    """Seconds per call of ``action``, after one warm-up call."""
    action()
    result = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        result.append(time.perf_counter() - start)
    return result


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]
