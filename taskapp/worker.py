"""The work threads of an instance: claim, process, finish, and hand back at shutdown.

WORKER_CONCURRENCY threads each claim one task at a time. An idle thread sleeps until woken
(LISTEN/NOTIFY, via wake()), until the next scheduled task is due, or for at most
POLL_INTERVAL_SECONDS. No transaction or connection is held while a task's work runs: a claim
commits at once, and the result is written later, fenced by the claim's lease token. The
leases of held tasks are renewed by the housekeeper (taskapp.housekeeper), which reads them
through held_claims().

A Worker needs only a Database, the settings and a processor, so tests run it in-process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg

from . import metrics, queue
from .config import Settings
from .database import Database
from .processor import Context, LeaseLost, Processor, ProcessorContractError, adapt, encode_result
from .queue import Claim

log = logging.getLogger(__name__)

MAX_ERROR_LENGTH = 2000


def describe_error(exc: BaseException) -> str:
    """An exception as the error history keeps it: its type and message, bounded."""
    return f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LENGTH]


def short_error(exc: BaseException) -> str:
    """An exception on one log line."""
    return describe_error(exc).splitlines()[0][:300]


class ResultNotStorable(ProcessorContractError):
    """A result encode_result() let through but PostgreSQL refused."""


class Backoff:
    """Growing pauses after database errors, so an outage is not hammered."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        self.first, self.cap, self.current = first, cap, 0.0

    def next(self) -> float:
        self.current = min(self.cap, self.current * 2 if self.current else self.first)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


class Worker:
    """An instance's work threads. start() and stop() are idempotent."""

    def __init__(
        self, *, database: Database, settings: Settings, processor: Processor, instance_id: str
    ) -> None:
        self.database = database
        self.settings = settings
        # Either form of processor, called as (task, context); decided once, here.
        self.processor = adapt(processor)
        self.instance_id = instance_id
        self.started_at = datetime.now(UTC)
        self.processed_count = 0
        self.failed_count = 0
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._generation = 0
        self._held: dict[int, Claim] = {}
        # Tasks whose result is being written: their lease ends with that write, so a renewal
        # that misses them has not lost anything.
        self._finishing: set[int] = set()
        self._handed_back: set[int] = set()
        self._stopping = threading.Event()
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

    def held_claims(self) -> list[Claim]:
        """The claims whose leases must be kept alive."""
        with self._lock:
            return list(self._held.values())

    def lease_really_lost(self, claimed: Claim) -> bool:
        """A renewal missed this claim: true unless it finished (or is finishing) meanwhile."""
        with self._lock:
            held = self._held.get(claimed.task.id)
            return held is claimed and claimed.task.id not in self._finishing

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        count = self.settings.worker_concurrency if self.settings.worker_enabled else 0
        for n in range(count):
            thread = threading.Thread(
                target=self._work_loop, name=f"taskapp-worker-{n}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        log.info("worker started: %d thread(s), instance %s", count, self.instance_id)

    def begin_stop(self) -> None:
        """Stop claiming at once (the first thing a SIGTERM does)."""
        self._stopping.set()
        self.wake()

    def stop(self, grace: float | None = None) -> int:
        """Stop claiming, let running tasks finish within the grace period, hand back the rest;
        return how many were handed back."""
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return 0
            self._stopped = True
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        self.begin_stop()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            unfinished = list(self._held.values())
            self._handed_back.update(c.task.id for c in unfinished)
        for claimed in unfinished:
            self._hand_back(claimed)
        log.info("worker stopped, %d task(s) handed back", len(unfinished))
        return len(unfinished)

    def wake(self) -> None:
        """Wake idle work threads: a task may be claimable now."""
        with self._wakeup:
            self._generation += 1
            self._wakeup.notify_all()

    # -- work threads -------------------------------------------------------------------------

    def _work_loop(self) -> None:
        backoff = Backoff()
        ready: list[Claim] = []  # leased to us, not started yet
        while not self._stopping.is_set():
            if not ready:
                generation = self._generation
                try:
                    ready = self._hold(
                        queue.claim(
                            self.database,
                            instance_id=self.instance_id,
                            limit=1,
                            lease_seconds=self.settings.lease_seconds,
                        )
                    )
                    backoff.reset()
                except Exception as exc:
                    delay = backoff.next()
                    log.warning("claim failed (%s); retrying in %.1fs", short_error(exc), delay)
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
            due = queue.seconds_until_next_due(self.database)
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
        extra = {"task_id": task.id}
        # DEBUG: at thousands of tasks a second, a line per claim costs real CPU; the
        # completion line says which instance ran the task.
        log.debug("task %d claimed (attempt %d)", task.id, task.attempts, extra=extra)
        started = time.monotonic()
        error: str | None = None
        result: str | None = None
        context = Context(task, self._checkpointer(claimed), self.settings.result_max_bytes)
        try:
            result = encode_result(self.processor(task, context), self.settings.result_max_bytes)
        except Exception as exc:
            error = describe_error(exc)
        duration = time.monotonic() - started
        try:
            with self._lock:
                if task.id in self._handed_back:
                    log.info("task %d was handed back during shutdown", task.id, extra=extra)
                    return []
                self._finishing.add(task.id)
            outcome, next_claims = self._record(claimed, error, result, claim_next=claim_next)
        finally:
            with self._lock:
                self._held.pop(task.id, None)
                self._finishing.discard(task.id)
        if outcome is not None:
            self._report(claimed, outcome, error, duration)
        return next_claims

    def _checkpointer(self, claimed: Claim) -> Callable[[int, str | None], bool]:
        """The context's checkpoint write for this claim: True when the conversation is now
        processed; LeaseLost once the claim no longer holds the task."""

        def write(conversation_id: int, result: str | None) -> bool:
            outcome = queue.checkpoint(
                self.database,
                claimed,
                instance_id=self.instance_id,
                conversation_id=conversation_id,
                result=result,
            )
            if not outcome.applied:
                raise LeaseLost(
                    f"task {claimed.task.id}: this attempt no longer holds its lease; "
                    f"conversation {conversation_id} was not checkpointed"
                )
            return outcome.status == "processed"

        return write

    def _record(
        self, claimed: Claim, error: str | None, result: str | None, *, claim_next: bool
    ) -> tuple[queue.Outcome | None, list[Claim]]:
        """Write the attempt's result, retrying through database errors for a while; None
        when it could not be written (the lease runs out and the task runs again)."""
        task = claimed.task
        backoff = Backoff(first=0.2)
        give_up_at = time.monotonic() + max(self.settings.lease_seconds * 2, 30.0)
        while True:
            try:
                if error is not None:
                    outcome = queue.fail(
                        self.database,
                        claimed,
                        instance_id=self.instance_id,
                        error=error,
                        retry_base_seconds=self.settings.retry_base_seconds,
                    )
                    return outcome, []
                if claim_next and not self._stopping.is_set():
                    outcome, next_claims = queue.complete_and_claim(
                        self.database,
                        claimed,
                        instance_id=self.instance_id,
                        limit=1,
                        lease_seconds=self.settings.lease_seconds,
                        result=result,
                    )
                    return outcome, self._hold(next_claims)
                outcome = queue.complete(
                    self.database, claimed, instance_id=self.instance_id, result=result
                )
                return outcome, []
            except Exception as exc:
                if isinstance(exc, psycopg.DataError) and error is None and result is not None:
                    # PostgreSQL refused the result itself: retrying can't help; the attempt
                    # fails instead (other errors, outages among them, are retried below).
                    error = describe_error(
                        ResultNotStorable(f"PostgreSQL refused the result: {short_error(exc)}")
                    )
                    result = None
                    continue
                if not backoff.current:
                    log.warning(
                        "task %d: could not record its result yet (%s); retrying",
                        task.id,
                        short_error(exc),
                        extra={"task_id": task.id},
                    )
                # Retry without claiming: a claim made by a write whose answer was lost is
                # taken back when its lease runs out.
                claim_next = False
                if time.monotonic() > give_up_at:
                    log.error(
                        "task %d: could not record its result (%s); its lease will run out "
                        "and it will run again",
                        task.id,
                        short_error(exc),
                        extra={"task_id": task.id},
                    )
                    return None, []
                time.sleep(backoff.next())

    def _report(
        self, claimed: Claim, outcome: queue.Outcome, error: str | None, duration: float
    ) -> None:
        task = claimed.task
        extra = {"task_id": task.id}
        if not outcome.applied:
            log.warning(
                "task %d: lease lost or task deleted while processing; result dropped",
                task.id,
                extra=extra,
            )
        elif error is None and outcome.status == "pending":
            self.processed_count += 1
            log.info(
                "task %d ran in %.3fs; conversations added or edited meanwhile are still "
                "active: back to pending for a continuation run",
                task.id,
                duration,
                extra=extra,
            )
        elif error is None:
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

    def _hand_back(self, claimed: Claim) -> None:
        extra = {"task_id": claimed.task.id}
        try:
            outcome = queue.release(self.database, claimed, instance_id=self.instance_id)
        except Exception as exc:
            log.error(
                "task %d: could not hand it back (%s); its lease will run out",
                claimed.task.id,
                short_error(exc),
                extra=extra,
            )
            return
        if outcome.applied:
            log.info("task %d handed back to the queue", claimed.task.id, extra=extra)
