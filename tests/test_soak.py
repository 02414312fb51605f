"""Soak: 1,000 tasks over 4 instances while instances are killed (-9) and restarted at random.

Not in the default run (it takes a minute or two). Run it with:

    TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres python -m pytest -m soak -s

It ends with every task completed exactly once: one `task.completed` event per task (the
event is sent by the completing statement itself, so it counts recorded completions), none
left pending or processing, every conversation processed. Attempts may exceed 1: a task
whose instance was killed under it runs again once its lease runs out.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from tests.support import EventLog, Instance, status_counts, wait_for

TASKS = 1000
INSTANCES = 4
CREATORS = 8
ENV = {
    "LEASE_SECONDS": 2,  # a killed instance's tasks come back within about 3 s
    "MAX_ATTEMPTS": 25,  # kills must not use up a task's attempts
    # Long enough for kills to catch tasks mid-processing, short enough to drain quickly.
    "PROCESSING_MIN_SECONDS": 0.05,
    "PROCESSING_MAX_SECONDS": 0.3,
    "WORKER_CONCURRENCY": 2,
    "RETRY_BASE_SECONDS": 0.1,
    "SHUTDOWN_GRACE_SECONDS": 1,
}
CREATE_DEADLINE_SECONDS = 120
FINISH_DEADLINE_SECONDS = 120


class Cluster:
    """INSTANCES slots; chaos kills one at random now and then and boots a replacement."""

    def __init__(self, start: Callable[..., Instance]) -> None:
        self._start = start
        self._lock = threading.Lock()
        self.slots = [start(wait=False, **ENV) for _ in range(INSTANCES)]
        for instance in self.slots:
            instance.wait_healthy()
        self.kills = 0

    def urls(self) -> list[str]:
        with self._lock:
            return [instance.url for instance in self.slots]

    def chaos(self, stop: threading.Event, rng: random.Random) -> None:
        # The replacement boots while the others work; it may be killed again before it
        # is up, as in a crash loop. Clients meanwhile get refused connections and move on.
        while not stop.wait(rng.uniform(0.3, 1.5)):
            slot = rng.randrange(INSTANCES)
            with self._lock:
                victim = self.slots[slot]
                victim.kill()
                self.kills += 1
                self.slots[slot] = self._start(wait=False, **ENV)


def create_all(
    cluster: Cluster,
    numbers: range,
    ids: dict[int, int],
    unexpected: list[str],
    rng: random.Random,
) -> None:
    """Create one task per number; a failed POST is repeated, with its key, on another instance."""
    deadline = time.monotonic() + CREATE_DEADLINE_SECONDS
    run = uuid.uuid4().hex[:8]
    for n in numbers:
        body = {"title": f"soak {n}", "conversations": [{"content": f"soak {n}"}]}
        headers = {"Idempotency-Key": f"soak-{run}-{n}"}
        while time.monotonic() < deadline:
            url = rng.choice(cluster.urls())
            try:
                response = requests.post(f"{url}/tasks/", json=body, headers=headers, timeout=10)
            except requests.RequestException:
                continue  # killed under us: the key makes the repeat safe
            if response.status_code == 201:
                ids[n] = response.json()["id"]
                break
            if response.status_code != 503:  # 503: that instance lost its database connection
                unexpected.append(f"{response.status_code} {response.text[:300]}")


@pytest.mark.soak
def test_a_thousand_tasks_complete_exactly_once_while_instances_die(
    instances, db_conn, database_url
):
    seed = int(os.environ.get("SOAK_SEED", random.randrange(1 << 30)))
    print(f"\nsoak seed {seed} (SOAK_SEED={seed} repeats the kill schedule)")
    started = time.monotonic()
    cluster = Cluster(instances)
    ids: dict[int, int] = {}
    unexpected: list[str] = []
    stop_chaos = threading.Event()

    with EventLog(database_url) as events:
        chaos = threading.Thread(target=cluster.chaos, args=(stop_chaos, random.Random(seed)))
        chaos.start()
        try:
            creators = [
                threading.Thread(
                    target=create_all,
                    args=(
                        cluster,
                        range(c, TASKS, CREATORS),
                        ids,
                        unexpected,
                        random.Random(seed + c + 1),
                    ),
                )
                for c in range(CREATORS)
            ]
            for creator in creators:
                creator.start()
            for creator in creators:
                creator.join()
            assert unexpected == []
            assert len(ids) == TASKS, f"only {len(ids)} tasks were created in time"
            created_in = time.monotonic() - started
            # Go on killing while the backlog drains, so tasks die mid-processing too.
            wait_for(
                lambda: status_counts(db_conn).get("completed", 0) >= TASKS * 0.9,
                timeout=FINISH_DEADLINE_SECONDS,
                what="90 % of the tasks completed",
            )
        finally:
            stop_chaos.set()
            chaos.join(10)
        for instance in cluster.slots:
            instance.wait_healthy()  # the last replacements, so that the backlog drains
        wait_for(
            lambda: status_counts(db_conn).get("completed", 0) == TASKS,
            timeout=FINISH_DEADLINE_SECONDS,
            what="every task completed",
        )
        # Completion events are delivered on commit; give the last ones a moment to arrive.
        wait_for(lambda: len(events.events("task.completed")) >= TASKS, timeout=10)
        completions = Counter(e["task_id"] for e in events.events("task.completed"))

    took = time.monotonic() - started
    attempts = Counter(
        a for (a,) in db_conn.execute("SELECT attempts FROM tasks ORDER BY id").fetchall()
    )
    print(
        f"soak: {TASKS} tasks on {INSTANCES} instances, {cluster.kills} kill -9s, "
        f"created in {created_in:.1f}s, all completed in {took:.1f}s; "
        f"tasks by attempts {dict(sorted(attempts.items()))}"
    )
    assert sorted(ids.values()) == sorted(set(ids.values())), "a key created two tasks"
    assert status_counts(db_conn) == {"completed": TASKS}
    assert set(completions) == set(ids.values())
    assert set(completions.values()) == {1}, "a task was completed more than once"
    (active,) = db_conn.execute(
        "SELECT count(*) FROM conversations WHERE status <> 'processed'"
    ).fetchone()
    assert active == 0
    (processed,) = db_conn.execute("SELECT count(*) FROM conversations").fetchone()
    assert processed == TASKS
    assert cluster.kills >= 10, "the soak should have killed instances along the way"
