"""The work threads of an instance: claim, process, finish, and hand back at shutdown.

WORKER_CONCURRENCY threads each claim one task at a time. An idle thread sleeps until woken
(LISTEN/NOTIFY, via wake()), until the next scheduled task is due, or for at most
POLL_INTERVAL_SECONDS. No transaction or connection is held while a task's work runs: a claim
commits at once, and the result is written later, fenced by the claim's lease token. The
leases of held tasks are renewed by the housekeeper (taskapp.housekeeper), which reads them
through held_claims().

A running attempt's cancellation flag (processor.Context) is set by revoke(): on a cancel
(the listener hears it on taskapp_cancel), a lost lease (the housekeeper's renewal), the end
of a shutdown's grace, and by the watchdog thread at the attempt's timeout. An attempt still
running TIMEOUT_GRACE_SECONDS after its timeout is failed by the watchdog and its thread
abandoned: a new work thread takes its slot, and the lease the fail statement cleared fences
off whatever the old one writes when (if ever) its processor returns.

A Worker needs only a Database, the settings and a processor, so tests run it in-process.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg

from . import metrics, queue
from .config import Settings
from .database import Database
from .processor import (
    CancelReason,
    Context,
    Defer,
    LeaseLost,
    Processor,
    ProcessorContractError,
    adapt,
    encode_result,
)
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


class TaskTimeout(ProcessorContractError):
    """The attempt ran past its timeout (recorded in the error history)."""


class Deferred(Exception):
    """A deferral, as the error history records it."""


class DeferralsExhausted(ProcessorContractError):
    """A deferral past MAX_DEFERRALS: it fails the attempt instead."""


@dataclass
class Ending:
    """How an attempt ended, as the worker records it: a result, an error, or a deferral."""

    result: str | None = None
    error: str | None = None
    deferral: Defer | None = None


@dataclass(eq=False)
class Running:
    """An attempt whose processor is running on one of the work threads."""

    claim: Claim
    context: Context
    thread: threading.Thread
    timeout_seconds: float | None
    started: float = field(default_factory=time.monotonic)
    abandoned: bool = False

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_seconds is None else self.started + self.timeout_seconds


class AttemptWrites:
    """The fenced writes of one attempt's Context (processor.Writes)."""

    def __init__(self, worker: Worker, claimed: Claim) -> None:
        self._worker = worker
        self._claimed = claimed

    def _lost(self, what: str) -> LeaseLost:
        return LeaseLost(
            f"task {self._claimed.task.id}: this attempt no longer holds its lease; {what}"
        )

    def checkpoint(self, conversation_id: int, result: str | None) -> bool:
        outcome = queue.checkpoint(
            self._worker.database,
            self._claimed,
            instance_id=self._worker.instance_id,
            conversation_id=conversation_id,
            result=result,
        )
        if not outcome.applied:
            raise self._lost(f"conversation {conversation_id} was not checkpointed")
        return outcome.status == "processed"

    def progress(self, done: int, total: int | None, message: str | None) -> None:
        if not queue.report_progress(
            self._worker.database,
            self._claimed,
            instance_id=self._worker.instance_id,
            done=done,
            total=total,
            message=message,
        ):
            raise self._lost("its progress was not stored")

    def output(self, conversation_id: int, chunks: list[tuple[int, str]]) -> None:
        if not queue.emit_output(
            self._worker.database,
            self._claimed,
            instance_id=self._worker.instance_id,
            conversation_id=conversation_id,
            chunks=chunks,
        ):
            raise self._lost("its output was not sent")


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
        self._running: dict[int, Running] = {}
        # Held tasks revoked before their processor started: {task id: (claim, reason)}.
        self._revoked: dict[int, tuple[Claim, str]] = {}
        self._stopping = threading.Event()
        # The work threads that own a slot; an abandoned one leaves this list for the next.
        self._threads: list[threading.Thread] = []
        self._abandoned: list[threading.Thread] = []
        self._thread_count = 0
        # Wakes the watchdog when an attempt with an earlier deadline starts.
        self._watch = threading.Event()
        self._watch_until = float("inf")
        self._watchdog: threading.Thread | None = None
        self._watch_done = threading.Event()
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

    @property
    def abandoned_threads(self) -> int:
        """Work threads given up on after a timeout whose processor has not returned yet."""
        with self._lock:
            self._abandoned = [t for t in self._abandoned if t.is_alive()]
            return len(self._abandoned)

    def lease_really_lost(self, claimed: Claim) -> bool:
        """A renewal missed this claim: true unless it finished (or is finishing) meanwhile."""
        with self._lock:
            held = self._held.get(claimed.task.id)
            return held is claimed and claimed.task.id not in self._finishing

    def revoke(self, task_id: int, reason: str) -> bool:
        """Set the cancellation flag of the attempt holding task_id here, if any (one claimed
        but not started yet gets it as it starts)."""
        with self._lock:
            running = self._running.get(task_id)
            if running is None:
                held = self._held.get(task_id)
                if held is not None and task_id not in self._finishing:
                    self._revoked[task_id] = (held, reason)
                return held is not None
        running.context.cancel(reason)
        return True

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        count = self.settings.worker_concurrency if self.settings.worker_enabled else 0
        for _ in range(count):
            self._start_work_thread()
        if count:
            self._watchdog = threading.Thread(
                target=self._watch_timeouts, name="taskapp-watchdog", daemon=True
            )
            self._watchdog.start()
        log.info("worker started: %d thread(s), instance %s", count, self.instance_id)

    def _start_work_thread(self) -> None:
        with self._lock:
            n = self._thread_count
            self._thread_count += 1
            thread = threading.Thread(
                target=self._work_loop, name=f"taskapp-worker-{n}", daemon=True
            )
            self._threads.append(thread)
        thread.start()

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
        while True:
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            with self._lock:
                # A thread abandoned meanwhile was replaced: wait for its replacement too.
                if self._threads == threads or time.monotonic() >= deadline:
                    break
        with self._lock:
            unfinished = list(self._held.values())
            self._handed_back.update(c.task.id for c in unfinished)
            still_running = list(self._running.values())
        for running in still_running:
            running.context.cancel(CancelReason.SHUTDOWN)
        for claimed in unfinished:
            self._hand_back(claimed)
        self._watch_done.set()
        self._watch.set()
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
        me = threading.current_thread()
        while not self._stopping.is_set() and me in self._threads:
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
        """Run the task and record how it ended; return the next claims, if any were made."""
        task = claimed.task
        extra = {"task_id": task.id}
        # DEBUG: at thousands of tasks a second, a line per claim costs real CPU; the
        # completion line says which instance ran the task.
        log.debug("task %d claimed (attempt %d)", task.id, task.attempts, extra=extra)
        context = Context(task, AttemptWrites(self, claimed), self.settings.result_max_bytes)
        running = self._begin(claimed, context)
        ending = Ending()
        try:
            value = self.processor(task, context)
            ending.result = encode_result(value, self.settings.result_max_bytes)
        except Defer as deferral:
            ending.deferral = deferral
        except Exception as exc:
            ending.error = describe_error(exc)
        duration = time.monotonic() - running.started
        outcome: queue.Outcome | None = None
        next_claims: list[Claim] = []
        try:
            with self._lock:
                if self._running.get(task.id) is running:
                    self._running.pop(task.id)
                if running.abandoned:
                    log.warning(
                        "task %d: its processor returned %.1fs after its timeout, when the "
                        "attempt had been failed; nothing it did after that is recorded",
                        task.id,
                        duration - (running.timeout_seconds or 0),
                        extra=extra,
                    )
                    return []
                if task.id in self._handed_back:
                    log.info("task %d was handed back during shutdown", task.id, extra=extra)
                    return []
                self._finishing.add(task.id)
            reason = context.cancel_reason
            if reason in (CancelReason.CANCELLED, CancelReason.LEASE_LOST):
                log.info("task %d stopped (%s); nothing recorded", task.id, reason, extra=extra)
                return []
            if reason == CancelReason.TIMEOUT:
                metrics.task_timed_out(abandoned=False)
                ending = Ending(error=self._timeout_error(running, stopped=True))
            outcome, next_claims = self._record(claimed, ending, claim_next=claim_next)
        finally:
            with self._lock:
                # An abandoned attempt's task may be running here again under a new claim.
                if not running.abandoned:
                    self._held.pop(task.id, None)
                    self._finishing.discard(task.id)
        if outcome is not None:
            self._report(claimed, outcome, ending, duration)
        return next_claims

    def _begin(self, claimed: Claim, context: Context) -> Running:
        """Register the attempt as running, with its deadline for the watchdog."""
        timeout = claimed.task.timeout_seconds or self.settings.task_timeout_seconds or None
        running = Running(claimed, context, threading.current_thread(), timeout)
        with self._lock:
            self._running[claimed.task.id] = running
            revoked_claim, revoked = self._revoked.pop(claimed.task.id, (None, None))
            deadline = running.deadline
            wake_watchdog = deadline is not None and deadline < self._watch_until
            if deadline is not None and wake_watchdog:
                self._watch_until = deadline
        if wake_watchdog:
            self._watch.set()
        if revoked is not None and revoked_claim is claimed:
            context.cancel(revoked)
        return running

    def _timeout_error(self, running: Running, *, stopped: bool) -> str:
        how = (
            "its processor stopped when told"
            if stopped
            else f"its processor did not stop within {self.settings.timeout_grace_seconds:g}s "
            "of being told, and its thread was abandoned"
        )
        return describe_error(
            TaskTimeout(
                f"attempt {running.claim.task.attempts} ran past its timeout of "
                f"{running.timeout_seconds:g}s; {how}"
            )
        )

    # -- timeouts -----------------------------------------------------------------------------

    def _watch_timeouts(self) -> None:
        """The watchdog: set the flag of attempts past their deadline, and abandon those still
        running a grace period later."""
        grace = self.settings.timeout_grace_seconds
        while not self._watch_done.is_set():
            now = time.monotonic()
            overdue, abandon, next_due = [], [], float("inf")
            with self._lock:
                for running in self._running.values():
                    deadline = running.deadline
                    if deadline is None:
                        continue
                    finishing = running.claim.task.id in self._finishing
                    if now >= deadline + grace and not finishing:
                        abandon.append(running)
                    elif now >= deadline:
                        overdue.append(running)
                        next_due = min(next_due, deadline + grace)
                    else:
                        next_due = min(next_due, deadline)
                for running in abandon:
                    running.abandoned = True
                    self._running.pop(running.claim.task.id, None)
                    self._held.pop(running.claim.task.id, None)
                    if running.thread in self._threads:
                        self._threads.remove(running.thread)
                        self._abandoned.append(running.thread)
                self._watch_until = next_due
            for running in overdue:
                running.context.cancel(CancelReason.TIMEOUT)
            for running in abandon:
                self._abandon(running)
            self._watch.wait(max(0.0, min(next_due - time.monotonic(), 60.0)))
            self._watch.clear()

    def _abandon(self, running: Running) -> None:
        """Fail an attempt whose processor ignored its timeout, and give its slot to a new
        work thread (unless the instance is stopping)."""
        task = running.claim.task
        running.context.cancel(CancelReason.TIMEOUT)
        if not self._stopping.is_set():
            self._start_work_thread()
        log.warning(
            "task %d: its processor ignored its timeout of %gs; the attempt is failed and its "
            "thread abandoned to a new one (%d abandoned thread(s) still running)",
            task.id,
            running.timeout_seconds or 0,
            self.abandoned_threads,
            extra={"task_id": task.id},
        )
        metrics.task_timed_out(abandoned=True)
        ending = Ending(error=self._timeout_error(running, stopped=False))
        outcome, _ = self._record(running.claim, ending, claim_next=False)
        if outcome is not None:
            self._report(running.claim, outcome, ending, time.monotonic() - running.started)

    def _record(
        self, claimed: Claim, ending: Ending, *, claim_next: bool
    ) -> tuple[queue.Outcome | None, list[Claim]]:
        """Write how the attempt ended, retrying through database errors for a while; None
        when it could not be written (the lease runs out and the task runs again)."""
        task = claimed.task
        backoff = Backoff(first=0.2)
        give_up_at = time.monotonic() + max(self.settings.lease_seconds * 2, 30.0)
        while True:
            try:
                if ending.deferral is not None:
                    outcome = self._defer(claimed, ending.deferral)
                    if outcome.applied and outcome.status is None:
                        ending.error = describe_error(
                            DeferralsExhausted(
                                f"deferred {self.settings.max_deferrals} times already "
                                "(MAX_DEFERRALS), so this deferral fails the attempt: "
                                f"{ending.deferral.reason or 'no reason given'}"
                            )
                        )
                        ending.deferral = None
                        continue
                    return outcome, []
                if ending.error is not None:
                    outcome = queue.fail(
                        self.database,
                        claimed,
                        instance_id=self.instance_id,
                        error=ending.error,
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
                        result=ending.result,
                    )
                    return outcome, self._hold(next_claims)
                outcome = queue.complete(
                    self.database, claimed, instance_id=self.instance_id, result=ending.result
                )
                return outcome, []
            except Exception as exc:
                refused = isinstance(exc, psycopg.DataError) and ending.error is None
                if refused and ending.result is not None:
                    # PostgreSQL refused the result itself: retrying can't help; the attempt
                    # fails instead (other errors, outages among them, are retried below).
                    ending.error = describe_error(
                        ResultNotStorable(f"PostgreSQL refused the result: {short_error(exc)}")
                    )
                    ending.result = None
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

    def _defer(self, claimed: Claim, deferral: Defer) -> queue.Outcome:
        reason = deferral.reason or "no reason given"
        return queue.defer(
            self.database,
            claimed,
            instance_id=self.instance_id,
            delay_seconds=deferral.after_seconds,
            reason=describe_error(
                Deferred(f"{reason} (runs again in {deferral.after_seconds:g}s)")
            ),
            max_deferrals=self.settings.max_deferrals,
        )

    def _report(
        self, claimed: Claim, outcome: queue.Outcome, ending: Ending, duration: float
    ) -> None:
        task = claimed.task
        extra = {"task_id": task.id}
        if not outcome.applied:
            log.warning(
                "task %d: lost its lease (or was cancelled or deleted) while processing; "
                "result dropped",
                task.id,
                extra=extra,
            )
        elif ending.deferral is not None:
            metrics.task_deferred()
            log.info(
                "task %d deferred for %gs (%s); the attempt does not count",
                task.id,
                ending.deferral.after_seconds,
                ending.deferral.reason or "no reason given",
                extra=extra,
            )
        elif ending.error is None and outcome.status == "pending":
            self.processed_count += 1
            log.info(
                "task %d ran in %.3fs; conversations added or edited meanwhile are still "
                "active: back to pending for a continuation run",
                task.id,
                duration,
                extra=extra,
            )
        elif ending.error is None:
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
                ending.error,
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
