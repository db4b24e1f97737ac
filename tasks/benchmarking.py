"""Timing shared by the `versvideo bench` benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def best_seconds(steps: dict[str, Callable[[], object]], repeats: int, synchronize: Callable[[], None] | None = None) -> dict[str, float]:
    """Best wall time of each step over `repeats` runs, after one warm-up run each.

    Steps run round-robin, so that a noisy moment on a shared machine hits every entry alike;
    `synchronize` (e.g. torch.cuda.synchronize) brackets each run when work is asynchronous.
    """
    sync = synchronize or (lambda: None)
    for step in steps.values():
        step()  # warm-up: allocations, kernel selection, file caches
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            best[name] = min(best[name], time.perf_counter() - start)
    return best
