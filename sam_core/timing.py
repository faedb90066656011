"""Choosing between equivalent ways of computing something by timing them where they run.

Used for the per-machine choices (``sam_core.modeling.cpu_linear``, ``sam_core.amg.tuning``):
which is fastest depends on the processor (vector units, caches, which library has kernels for
it), so it is measured, never assumed. The candidates are timed round by round, interleaved, and
each keeps its best round: on a shared machine a busy moment then slows one round of every
candidate instead of every round of one.
"""
from __future__ import annotations

import time
from typing import Callable, Hashable, Mapping


def best_times(candidates: Mapping[Hashable, Callable[[], object]], rounds: int = 3) -> dict[Hashable, float]:
    """Best wall time in seconds of each candidate over ``rounds`` interleaved rounds, after one
    untimed warm-up call each (first calls pay for allocation and kernel set-up)."""
    for run in candidates.values():
        run()
    best = {key: float("inf") for key in candidates}
    for _ in range(rounds):
        for key, run in candidates.items():
            start = time.perf_counter()
            run()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def fastest(candidates: Mapping[Hashable, Callable[[], object]], rounds: int = 3) -> Hashable:
    """The key of the candidate with the best time (the first one listed on a tie)."""
    times = best_times(candidates, rounds)
    return min(times, key=times.__getitem__)
