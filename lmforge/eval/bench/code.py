"""Functional correctness of generated code: run the tests in the sandbox, estimate pass@k.

pass@k is the probability that at least one of k samples passes. Drawing k of the n
samples generated for a problem, of which c pass, the chance that all k fail is
C(n-c, k) / C(n, k), so the unbiased estimate is 1 - C(n-c, k) / C(n, k), averaged over
problems. Computing it as a running product avoids the huge binomials. With n = k = 1
and greedy decoding it is simply the fraction of problems solved.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence

from ..sandbox import Isolation, SandboxLimits, SandboxResult, require_isolation, run_python


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` passed."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Average pass@k over problems given (n, c) per problem."""
    if not counts:
        return float("nan")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def run_programs(programs: Sequence[str], limits: SandboxLimits, workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 isolation: Isolation | None = None) -> list[SandboxResult]:
    """Run each program in its own sandbox, `workers` at a time (the work is in the children).

    `isolation` defaults to `require_isolation()`: where the machine cannot isolate, this
    refuses before running anything.
    """
    isolation = isolation or require_isolation()
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    results: list[SandboxResult | None] = [None] * len(programs)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_python, code, limits, isolation=isolation): i for i, code in enumerate(programs)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                done += 1
                if progress is not None:
                    progress(done, len(programs))
        except BaseException:  # Ctrl-C or a failed run: start no more programs, let the running ones end
            pool.shutdown(cancel_futures=True)
            raise
    return results  # type: ignore[return-value]
