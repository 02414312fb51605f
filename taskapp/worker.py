"""The instance's background worker: claim, process, finish; plus leases and heartbeats.

Threads, all daemons of one instance (one gunicorn worker process):
- WORKER_CONCURRENCY work threads, each claiming one task at a time. An idle thread sleeps
  until woken (LISTEN/NOTIFY, via wake()), until the next scheduled task is due, or for at
  most POLL_INTERVAL_SECONDS.
- one housekeeper thread that renews the leases of tasks in progress, records the instance's
  heartbeat and re-queues tasks whose lease ran out anywhere in the cluster.

No transaction or connection is held while a task's work runs: a claim commits at once,
and the result is written later, fenced by the claim's lease token.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from datetime import UTC, datetime

from sqlalchemy.engine import Engine

from . import metrics, queue
from .config import Settings
from .processor import Processor
from .queue import Claim

log = logging.getLogger(__name__)

MAX_RETRY_DELAY_SECONDS = 3600.0
MAX_ERROR_LENGTH = 2000
FORGET_INSTANCES_AFTER_SECONDS = 3600.0


def retry_delay(settings: Settings, attempt: int) -> float:
    """Exponential backoff with jitter: about base * 2^(attempt-1), ±25 %."""
    base = settings.retry_base_seconds * 2 ** max(attempt - 1, 0)
    return min(base * random.uniform(0.75, 1.25), MAX_RETRY_DELAY_SECONDS)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]


class _Backoff:
    """Growing pauses after database errors, so an outage is not hammered."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class Worker:
    """Everything one instance runs in the background. start() and stop() are idempotent."""

    def __init__(
        self, *, engine: Engine, settings: Settings, processor: Processor, instance_id: str
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.processor = processor
        self.instance_id = instance_id
        self.started_at = datetime.now(UTC)
        self.processed_count = 0
        self.failed_count = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._generation = 0
        self._held: dict[int, Claim] = {}
        self._handed_back: set[int] = set()
        self._stopping = threading.Event()
        self._housekeeper_done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while work threads claim tasks."""
        return self._started and not self._stopping.is_set() and self.settings.worker_enabled

    @property
    def current_task_ids(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        count = self.settings.worker_concurrency if self.settings.worker_enabled else 0
        for n in range(count):
            self._spawn(self._work_loop, f"taskapp-worker-{n}")
        self._spawn(self._housekeeping_loop, "taskapp-housekeeper")
        log.info(
            "worker started: %d thread(s), instance %s",
            count,
            self.instance_id,
            extra={"instance_id": self.instance_id},
        )

    def begin_stop(self) -> None:
        """Stop claiming at once (the first thing a SIGTERM does)."""
        self._stopping.set()
        self.wake()

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming, let running tasks finish within the grace period, hand back the rest."""
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self.begin_stop()
        deadline = time.monotonic() + grace
        workers = [t for t in self._threads if t.name.startswith("taskapp-worker")]
        for thread in workers:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            unfinished = list(self._held.values())
            self._handed_back.update(c.task.id for c in unfinished)
        for claimed in unfinished:
            self._hand_back(claimed)
        self._housekeeper_done.set()
        for thread in self._threads:
            if thread.name == "taskapp-housekeeper":
                thread.join(5)
        try:
            queue.instance_stopped(self.engine, instance_id=self.instance_id)
        except Exception as exc:
            log.warning("could not record the instance as stopped: %s", exc)
        log.info("worker stopped, %d task(s) handed back", len(unfinished))

    def wake(self) -> None:
        """Wake idle work threads: a task may be claimable now."""
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify_all()

    def _spawn(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    # -- work threads -------------------------------------------------------------------------

    def _work_loop(self) -> None:
        backoff = _Backoff()
        ready: list[Claim] = []  # leased to us, not started yet
        while not self._stopping.is_set():
            if not ready:
                generation = self._generation
                try:
                    ready = self._hold(
                        queue.claim(
                            self.engine,
                            instance_id=self.instance_id,
                            limit=1,
                            lease_seconds=self.settings.lease_seconds,
                        )
                    )
                    backoff.reset()
                except Exception as exc:
                    delay = backoff.next()
                    log.warning("claim failed (%s); retrying in %.1fs", _short(exc), delay)
                    self._stopping.wait(delay)
                    continue
                if not ready:
                    self._wait_for_work(generation)
                    continue
            claimed = ready.pop(0)
            # While busy, the completion also claims the next task: one round trip a task.
            ready.extend(self._process(claimed, claim_next=not ready))
        # Claims never started are still held: stop() hands them back.

    def _hold(self, claims: list[Claim]) -> list[Claim]:
        """Track new claims, so their leases are renewed and a stop hands them back."""
        with self._lock:
            for claimed in claims:
                self._held[claimed.task.id] = claimed
        metrics.tasks_claimed(len(claims))
        return claims

    def _wait_for_work(self, generation: int) -> None:
        timeout = self.settings.poll_interval_seconds
        try:
            due = queue.seconds_until_next_due(self.engine)
        except Exception:
            due = None
        if due is not None:
            timeout = min(timeout, due)
        deadline = time.monotonic() + timeout
        with self._wakeup:
            while generation == self._generation and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._wakeup.wait(remaining)

    def _process(self, claimed: Claim, *, claim_next: bool) -> list[Claim]:
        """Run the task and record its result; return the next claims, if any were made."""
        task = claimed.task
        extra = {"instance_id": self.instance_id, "task_id": task.id}
        # DEBUG: at thousands of tasks a second, a line per claim costs real CPU; the
        # completion line says which instance ran the task.
        log.debug("task %d claimed (attempt %d)", task.id, task.attempts, extra=extra)
        started = time.monotonic()
        error: str | None = None
        try:
            self.processor(task)
        except Exception as exc:
            error = describe_error(exc)
        duration = time.monotonic() - started
        try:
            with self._lock:
                if task.id in self._handed_back:
                    log.info("task %d was handed back during shutdown", task.id, extra=extra)
                    return []
            return self._finish(claimed, error, duration, claim_next=claim_next)
        finally:
            with self._lock:
                self._held.pop(task.id, None)

    def _finish(
        self, claimed: Claim, error: str | None, duration: float, *, claim_next: bool
    ) -> list[Claim]:
        task = claimed.task
        extra = {"instance_id": self.instance_id, "task_id": task.id}
        backoff = _Backoff(first=0.2)
        give_up_at = time.monotonic() + max(self.settings.lease_seconds * 2, 30.0)
        next_claims: list[Claim] = []
        while True:
            try:
                if error is None and claim_next and not self._stopping.is_set():
                    outcome, next_claims = queue.complete_and_claim(
                        self.engine,
                        claimed,
                        instance_id=self.instance_id,
                        limit=1,
                        lease_seconds=self.settings.lease_seconds,
                    )
                    self._hold(next_claims)
                elif error is None:
                    outcome = queue.complete(self.engine, claimed, instance_id=self.instance_id)
                else:
                    outcome = queue.fail(
                        self.engine,
                        claimed,
                        instance_id=self.instance_id,
                        error=error,
                        retry_delay=retry_delay(self.settings, task.attempts),
                    )
                break
            except Exception as exc:
                if not backoff.current:
                    log.warning(
                        "task %d: could not record its result yet (%s); retrying",
                        task.id,
                        _short(exc),
                        extra=extra,
                    )
                # Retry without claiming: a claim made by a write whose answer was lost is
                # taken back when its lease runs out.
                claim_next = False
                if time.monotonic() > give_up_at:
                    log.error(
                        "task %d: could not record its result (%s); its lease will run out "
                        "and it will run again",
                        task.id,
                        _short(exc),
                        extra=extra,
                    )
                    return []
                time.sleep(backoff.next())
        if not outcome.applied:
            log.warning(
                "task %d: lease lost or task deleted while processing; result dropped",
                task.id,
                extra=extra,
            )
            return next_claims
        if error is None:
            self.processed_count += 1
            metrics.task_completed(duration)
            log.info(
                "task %d completed in %.3fs (attempt %d)",
                task.id,
                duration,
                task.attempts,
                extra=extra,
            )
        else:
            self.failed_count += 1
            metrics.task_failed(duration, final=outcome.status == "failed")
            log.warning(
                "task %d attempt %d failed (%s); now %s",
                task.id,
                task.attempts,
                error,
                outcome.status,
                extra=extra,
            )
        return next_claims

    def _hand_back(self, claimed: Claim) -> None:
        extra = {"instance_id": self.instance_id, "task_id": claimed.task.id}
        try:
            outcome = queue.release(self.engine, claimed, instance_id=self.instance_id)
        except Exception as exc:
            log.error(
                "task %d: could not hand it back (%s); its lease will run out",
                claimed.task.id,
                _short(exc),
                extra=extra,
            )
            return
        if outcome.applied:
            log.info("task %d handed back to the queue", claimed.task.id, extra=extra)

    # -- housekeeping -------------------------------------------------------------------------

    def _housekeeping_loop(self) -> None:
        # Several renewals fit in one lease, so one missed beat costs nothing.
        interval = self.settings.heartbeat_seconds
        hostname, pid = socket.gethostname(), os.getpid()
        rounds = 0
        while not self._housekeeper_done.is_set():
            try:
                self._renew_leases()
                queue.heartbeat(
                    self.engine,
                    instance_id=self.instance_id,
                    hostname=hostname,
                    pid=pid,
                    worker_running=self.running,
                    current_task_ids=self.current_task_ids,
                    processed_count=self.processed_count,
                    failed_count=self.failed_count,
                    started_at=self.started_at,
                )
                rescued = queue.rescue_expired(self.engine, instance_id=self.instance_id)
                if rescued:
                    metrics.tasks_rescued(len(rescued))
                    for task_id, status in rescued:
                        log.warning(
                            "task %d: lease ran out, now %s",
                            task_id,
                            status,
                            extra={"instance_id": self.instance_id, "task_id": task_id},
                        )
                if rounds % 60 == 0:
                    queue.forget_instances(
                        self.engine, older_than_seconds=FORGET_INSTANCES_AFTER_SECONDS
                    )
            except Exception as exc:
                log.warning("housekeeping failed (%s); will retry", _short(exc))
            rounds += 1
            self._housekeeper_done.wait(interval)

    def _renew_leases(self) -> None:
        with self._lock:
            held = list(self._held.values())
        if not held:
            return
        still_held = queue.renew_leases(
            self.engine, held, lease_seconds=self.settings.lease_seconds
        )
        for claimed in held:
            if claimed.task.id not in still_held and claimed.task.id in self._held:
                log.warning(
                    "task %d: lease lost (deleted, or taken back after a stall)",
                    claimed.task.id,
                    extra={"instance_id": self.instance_id, "task_id": claimed.task.id},
                )


def _short(exc: BaseException) -> str:
    return describe_error(exc).splitlines()[0][:300]
