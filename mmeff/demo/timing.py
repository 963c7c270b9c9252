"""Warm wall-clock timing for the demo's tables: single cold runs make the first (dense) run look slow."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMING_REPEATS = 3
"""Timed runs after the warm-up; the tables show their median."""


def warm_median(fn: Callable[[], T], repeats: int = TIMING_REPEATS) -> tuple[T, float]:
    """Call ``fn`` once untimed (warm-up), then ``repeats`` times; the last result and the median seconds."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    result = fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t0)
    return result, statistics.median(seconds)
