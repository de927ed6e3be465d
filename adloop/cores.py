"""How many cores a CPU-heavy step of this process should use: the ones that are free.

torch and BLAS size their thread pools from the cores present. On a small machine with
another busy process that oversubscribes the cores, and a step's threads then wait on
each other (on 2 cores, pretraining ran 16× slower beside one busy process). Sizing the
pool from the cores that are free avoids it.
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask; the count present elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def free_cores(load: float | None = None) -> int:
    """The usable cores minus the ones other work keeps busy: ``load`` (default: the
    one-minute load average) rounded, at least 1."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(usable_cores(), usable_cores() - round(load)))
