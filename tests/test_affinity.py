"""CPU_AFFINITY: each gunicorn worker process, every one of its threads, on one CPU."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from taskapp import affinity
from taskapp.config import ConfigError, Settings
from tests.support import Instance, wait_for
from tools.gunicorn_process import children

ALLOWED = tuple(sorted(os.sched_getaffinity(0)))


def test_auto_is_every_cpu_this_process_may_use():
    assert Settings.from_env({"CPU_AFFINITY": "auto"}).cpu_affinity == ALLOWED
    assert Settings.from_env({}).cpu_affinity == ()


def test_lists_and_ranges():
    first = ALLOWED[0]
    assert affinity.parse(f"{first}") == (first,)
    assert affinity.parse(f"{first}-{first}, {first}") == (first,)
    if len(ALLOWED) > 1 and ALLOWED[1] == first + 1:
        assert affinity.parse(f"{first}-{first + 1}") == (first, first + 1)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("x", "must be auto or a list of CPUs"),
        ("0,,1", "must be auto or a list of CPUs"),
        ("1-0", "is not a range of CPUs"),
        ("-1", "must be auto or a list of CPUs"),
        (str(max(ALLOWED) + 1), "is not one this process may run on"),
    ],
)
def test_a_bad_list_is_refused_naming_the_variable(raw: str, says: str):
    with pytest.raises(ConfigError, match="CPU_AFFINITY") as refused:
        Settings.from_env({"CPU_AFFINITY": raw})
    assert says in str(refused.value)


def test_each_new_worker_gets_the_cpu_fewest_live_workers_have():
    assert affinity.choose((0, 1), []) == 0
    assert affinity.choose((0, 1), [0]) == 1
    assert affinity.choose((0, 1), [0, 1]) == 0
    assert affinity.choose((0, 1), [1, None]) == 0  # a worker started without a CPU
    assert affinity.choose((2, 3), [3, 2, 2]) == 3


def cpus_of_every_thread(pid: int) -> set[str]:
    allowed = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as status:
            for line in status:
                if line.startswith("Cpus_allowed_list:"):
                    allowed.add(line.split(":", 1)[1].strip())
    return allowed


def test_every_thread_of_each_worker_stays_on_its_cpu_and_a_replacement_takes_the_freed_one(
    instances: Callable[..., Instance],
):
    instance = instances(WEB_CONCURRENCY=2, WORKER_CONCURRENCY=4, CPU_AFFINITY="auto")
    assert instance.pid is not None
    expected = sorted(str(ALLOWED[n % len(ALLOWED)]) for n in range(2))

    def pinned_workers() -> dict[int, str] | None:
        pids = children(instance.pid)  # type: ignore[arg-type]
        if len(pids) != 2:
            return None
        found = {}
        for pid in pids:
            # The work threads, the dispatcher and gunicorn's request threads are all there.
            if len(os.listdir(f"/proc/{pid}/task")) < 4:
                return None
            cpus = cpus_of_every_thread(pid)
            if len(cpus) != 1:
                return None
            found[pid] = cpus.pop()
        return found

    workers = wait_for(pinned_workers, timeout=30, what="two workers, each on one CPU")
    assert sorted(workers.values()) == expected, workers
    assert "worker process pinned to CPU" in instance.log()

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: (w := pinned_workers()) and victim not in w and w,
        timeout=60,
        what="the killed worker replaced, on one CPU",
    )
    assert sorted(replaced.values()) == expected, replaced
