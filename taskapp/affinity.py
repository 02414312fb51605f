"""CPU_AFFINITY: each gunicorn worker process, with every thread it starts, on one CPU.

An instance is one process of many threads (request threads, work threads, the dispatcher)
that hand Python's GIL to one another at every database call and every wake-up. With the
process free to run on every core those hand-overs cross cores, and on a VM each one costs a
wake-up of another virtual CPU; with all of the process's threads on one core they stay on
it. bench/README.md has the figures (2 cores: GET /tasks/{id} ~1.9 x, the drain ~1.1 x;
PgQueuer, one thread per process, gains nothing from the same pinning). PostgreSQL and other
processes still run on every core.

The master picks a worker's CPU before it forks it (the CPU the fewest live workers have,
so a replaced worker gets the one its predecessor freed); the worker pins itself first
thing after the fork, before it starts a thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence


class AffinityError(ValueError):
    """CPU_AFFINITY names no usable CPU list."""


def allowed_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (a container's cpuset, taskset's list, or all)."""
    if not hasattr(os, "sched_getaffinity"):
        raise AffinityError("CPU_AFFINITY needs Linux (os.sched_setaffinity)")
    return tuple(sorted(os.sched_getaffinity(0)))


def parse(raw: str) -> tuple[int, ...]:
    """`auto` (every CPU this process may use), or a list such as `0,2` or `0-3,6`; each CPU
    must be one this process may run on."""
    allowed = allowed_cpus()
    if raw.strip().lower() == "auto":
        return allowed
    cpus: list[int] = []
    for part in raw.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise AffinityError(
                f"CPU_AFFINITY must be auto or a list of CPUs such as 0,2 or 0-3, got {raw!r}"
            ) from None
        if low < 0 or high < low:
            raise AffinityError(f"CPU_AFFINITY: {part.strip()!r} is not a range of CPUs")
        cpus.extend(cpu for cpu in range(low, high + 1) if cpu not in cpus)
    outside = [cpu for cpu in cpus if cpu not in allowed]
    if outside:
        raise AffinityError(
            f"CPU_AFFINITY: CPU {outside[0]} is not one this process may run on "
            f"({', '.join(map(str, allowed))})"
        )
    return tuple(cpus)


def choose(cpus: Sequence[int], taken: Iterable[int | None]) -> int:
    """The CPU for a new worker: of `cpus`, the first that the fewest live workers have."""
    load = dict.fromkeys(cpus, 0)
    for cpu in taken:
        if cpu in load:
            load[cpu] += 1
    return min(cpus, key=lambda cpu: load[cpu])


def pin(cpu: int) -> None:
    """Keep this process (its calling thread, and every thread it starts after) on `cpu`."""
    os.sched_setaffinity(0, {cpu})
