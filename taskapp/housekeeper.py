"""The housekeeper thread of an instance: leases, heartbeats, rescue, retention, forgetting
instances.

Every heartbeat interval (several per lease, so one missed round costs nothing) it renews the
leases of the tasks this instance's worker holds (one statement whatever their number),
records the instance's heartbeat for /status, re-queues any task in the cluster whose lease
ran out (its instance died or stalled), deletes finished tasks past their retention
(RETENTION_*_SECONDS; in batches, for at most PRUNE_BUDGET_SECONDS a round), and now and then
forgets instances long gone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from . import metrics, queue
from .attempt import short_error
from .config import Settings
from .database import Database
from .processor import CancelReason
from .worker import Worker

log = logging.getLogger(__name__)

FORGET_INSTANCES_AFTER_SECONDS = 3600.0
# Forgetting instances is rare work: every this many rounds.
FORGET_EVERY_ROUNDS = 60
# Retention deletes this many tasks per statement (each a short transaction, with their
# conversations and errors), for at most this long a round: leases are renewed on time and
# a backlog of a million expired tasks still goes within minutes.
PRUNE_BATCH = 1000
PRUNE_BUDGET_SECONDS = 1.0


class Housekeeper:
    """start() and stop() are idempotent; run_once() is one round, for tests."""

    def __init__(
        self, *, database: Database, settings: Settings, instance_id: str, worker: Worker
    ) -> None:
        self.database = database
        self.settings = settings
        self.instance_id = instance_id
        self.worker = worker
        self._hostname, self._pid = socket.gethostname(), os.getpid()
        self._rounds = 0
        # When the loop last came round (time.monotonic()), failed rounds too: for liveness.
        self.round_at = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._loop, name="taskapp-housekeeper", daemon=True
            )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the loop, then record the instance as cleanly stopped."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None or self._done.is_set():
                return
            self._done.set()
        thread.join(timeout)
        try:
            queue.instance_stopped(self.database, instance_id=self.instance_id)
        except Exception as exc:
            log.warning("could not record the instance as stopped: %s", short_error(exc))

    def run_once(self) -> None:
        """One round: renew, beat, rescue (and sometimes forget)."""
        self.renew_leases()
        queue.heartbeat(
            self.database,
            instance_id=self.instance_id,
            hostname=self._hostname,
            pid=self._pid,
            worker_running=self.worker.running,
            current_task_ids=self.worker.current_task_ids,
            processed_count=self.worker.processed_count,
            failed_count=self.worker.failed_count,
            started_at=self.worker.started_at,
        )
        self.rescue()
        self.prune()
        if self._rounds == 0:
            self.check_autovacuum()
        if self._rounds % FORGET_EVERY_ROUNDS == 0:
            queue.forget_instances(self.database, older_than_seconds=FORGET_INSTANCES_AFTER_SECONDS)
        self._rounds += 1

    def renew_leases(self) -> None:
        held = self.worker.held_claims()
        if not held:
            return
        still_held = queue.renew_leases(
            self.database, held, lease_seconds=self.settings.lease_seconds
        )
        for claimed in held:
            if claimed.task.id not in still_held and self.worker.lease_really_lost(claimed):
                # Cancelled or deleted (if its NOTIFY was missed), or taken over.
                self.worker.revoke(claimed.task.id, CancelReason.LEASE_LOST)
                log.warning(
                    "task %d: lease lost (deleted, or taken back after a stall)",
                    claimed.task.id,
                    extra={"task_id": claimed.task.id},
                )

    def check_autovacuum(self) -> None:
        """Say once, at start, when the server runs no autovacuum: every claim and finish
        leaves a dead row, and without vacuum the claim wades through them ever slower."""
        if not self.database.fetchone("autovacuum_on").running:
            log.warning(
                "autovacuum is off on this PostgreSQL server: the tasks table will bloat and "
                "claims slow down as it does; turn it on, or VACUUM tasks, conversations and "
                "task_counts often (docs/design.md, Table hygiene)"
            )

    def rescue(self) -> None:
        rescued = queue.rescue_expired(self.database, instance_id=self.instance_id)
        if rescued:
            metrics.tasks_rescued(len(rescued))
        for task_id, status in rescued:
            log.warning(
                "task %d: lease ran out, now %s", task_id, status, extra={"task_id": task_id}
            )

    def prune(self, budget_seconds: float = PRUNE_BUDGET_SECONDS) -> int:
        """Delete finished tasks past their retention, a batch at a time, within the budget;
        return how many."""
        pruned = 0
        deadline = time.monotonic() + budget_seconds
        for status, keep_seconds in self.settings.retention.items():
            while time.monotonic() < deadline:
                count = queue.prune_finished(
                    self.database, status=status, keep_seconds=keep_seconds, batch=PRUNE_BATCH
                )
                if count:
                    metrics.tasks_pruned(status, count)
                pruned += count
                if count < PRUNE_BATCH:
                    break
        if pruned:
            log.info("retention: deleted %d finished task(s)", pruned)
        return pruned

    def _loop(self) -> None:
        while not self._done.is_set():
            self.round_at = time.monotonic()
            try:
                self.run_once()
            except Exception as exc:
                log.warning("housekeeping failed (%s); will retry", short_error(exc))
            self._done.wait(self.settings.heartbeat_seconds)
