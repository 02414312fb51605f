"""The work threads of an instance: run claimed tasks, report how they ended, and hand back
at shutdown.

The dispatcher (taskapp.dispatcher) claims tasks for free work slots and writes completions
in batches. Each queue the instance serves (WORKER_QUEUES; by default `default` with
WORKER_CONCURRENCY threads) has its own work threads and processor; each thread waits for a
claim of its queue, runs the processor
with no transaction or connection held, and hands the result back to the dispatcher (a
failure or a deferral it writes itself). Every write is fenced by the claim's lease token.
The leases of held tasks are renewed by the housekeeper (taskapp.housekeeper), which reads
them through held_claims().

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
import queue as queues
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from . import metrics, queue, tracing
from .attempt import (
    AttemptWrites,
    Backoff,
    DeferralsExhausted,
    Deferred,
    Ending,
    ResultNotStorable,
    Running,
    TaskTimeout,
    Throttled,
    describe_error,
    retry_writes_for,
    short_error,
)
from .config import Settings
from .database import Database
from .dispatcher import Completion, Dispatcher
from .processor import CancelReason, Context, Defer, Processor, adapt, encode_result
from .queue import Claim
from .states import TaskStatus

__all__ = ["Worker", "describe_error", "short_error"]

log = logging.getLogger(__name__)


class Worker:
    """An instance's work threads and dispatcher. start() and stop() are idempotent."""

    def __init__(
        self,
        *,
        database: Database,
        settings: Settings,
        processor: Processor,
        instance_id: str,
        processors: Mapping[str, Processor] | None = None,
    ) -> None:
        self.database = database
        self.settings = settings
        # Work threads per queue served (none when the worker is disabled).
        self.slots = dict(settings.served_queues) if settings.worker_enabled else {}
        # Either form of processor, called as (task, context); decided once, here. `processor`
        # serves every queue that `processors` does not name.
        self._processors = {
            name: adapt((processors or {}).get(name, processor)) for name in self.slots
        }
        self.instance_id = instance_id
        self.started_at = datetime.now(UTC)
        self.processed_count = 0
        self.failed_count = 0
        self._lock = threading.Lock()
        self._held: dict[int, Claim] = {}
        # Tasks whose result is being written: their lease ends with that write, so a renewal
        # that misses them has not lost anything.
        self._finishing: set[int] = set()
        self._handed_back: set[int] = set()
        self._running: dict[int, Running] = {}
        # Held tasks revoked before their processor started: {task id: (claim, reason)}.
        self._revoked: dict[int, tuple[Claim, str]] = {}
        # Claims for the work threads of each queue; None tells one thread to end.
        self._claims: dict[str, queues.SimpleQueue[Claim | None]] = {
            name: queues.SimpleQueue() for name in self.slots
        }
        self._stopping = threading.Event()
        # The work threads that own a slot, with their queue; an abandoned one leaves this
        # list for the next.
        self._threads: list[threading.Thread] = []
        self._queue_of: dict[threading.Thread, str] = {}
        self._abandoned: list[threading.Thread] = []
        self._thread_count = 0
        self.dispatcher = Dispatcher(
            database=database,
            settings=settings,
            instance_id=instance_id,
            slots=self.slots,
            claimed=self._on_claimed,
            held=self.held_claims,
            finished=self._on_finished,
            refused=self._on_refused,
        )
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

    def dead_threads(self) -> list[str]:
        """The threads this worker needs that have died (work threads, the dispatcher, the
        watchdog), for the instance's liveness; none before start and once stopping."""
        if not self._started or self._stopping.is_set():
            return []
        with self._lock:
            needed = [*self._threads, self._watchdog, self.dispatcher._thread]
        return [thread.name for thread in needed if thread is not None and not thread.is_alive()]

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
        if not self.slots:
            log.info("worker disabled: this instance claims nothing")
            return
        for name, count in self.slots.items():
            for _ in range(count):
                self._start_work_thread(name)
        self._watchdog = threading.Thread(
            target=self._watch_timeouts, name="taskapp-watchdog", daemon=True
        )
        self._watchdog.start()
        self.dispatcher.start()
        log.info(
            "worker started: %s, instance %s",
            ", ".join(f"{name} ({count} thread(s))" for name, count in self.slots.items()),
            self.instance_id,
        )

    def _start_work_thread(self, queue_name: str) -> None:
        with self._lock:
            n = self._thread_count
            self._thread_count += 1
            thread = threading.Thread(
                target=self._work_loop,
                args=(queue_name,),
                name=f"taskapp-worker-{n}",
                daemon=True,
            )
            self._threads.append(thread)
            self._queue_of[thread] = queue_name
        thread.start()

    def begin_stop(self) -> None:
        """Stop claiming at once (the first thing a SIGTERM does); completions are still
        written while running tasks finish."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.dispatcher.stop_claiming()
        with self._lock:
            idle_or_not = [self._queue_of[thread] for thread in self._threads]
        for name in idle_or_not:
            self._claims[name].put(None)

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
            # Not finishing: still running, or claimed and never started.
            unfinished = [c for c in self._held.values() if c.task.id not in self._finishing]
            self._handed_back.update(c.task.id for c in unfinished)
            still_running = list(self._running.values())
        self.dispatcher.stop()  # writes the completions still waiting
        for claimed in unfinished:
            self._hand_back(claimed)
        # After the hand-back, so a processor that looks finds its lease gone.
        for running in still_running:
            running.context.cancel(CancelReason.SHUTDOWN)
        self._watch_done.set()
        self._watch.set()
        log.info("worker stopped, %d task(s) handed back", len(unfinished))
        return len(unfinished)

    def wake(self) -> None:
        """A task may be claimable now."""
        self.dispatcher.wake()

    # -- work threads -------------------------------------------------------------------------

    def _on_claimed(self, claims: list[Claim]) -> None:
        """The dispatcher's new claims, one per free slot: hold them, hand them out."""
        with self._lock:
            for claimed in claims:
                self._held[claimed.task.id] = claimed
        metrics.tasks_claimed(len(claims))
        for claimed in claims:
            self._claims[claimed.task.queue].put(claimed)

    def _work_loop(self, queue_name: str) -> None:
        me = threading.current_thread()
        claims = self._claims[queue_name]
        while True:
            claimed = claims.get()
            if claimed is None or self._stopping.is_set():
                return  # a claim never started is still held: stop() hands it back
            task = claimed.task
            with tracing.task_span(task.id, task.queue, task.attempts):
                completion = self._process(claimed)
            with self._lock:
                if me not in self._threads:
                    # Abandoned at a timeout (so _process returned no completion): its slot
                    # went to a new thread.
                    return
            # The result and the free slot in one hand-over: the next round writes one and
            # claims for the other.
            self.dispatcher.slot_freed(queue_name, completion=completion)

    def _process(self, claimed: Claim) -> Completion | None:
        """Run the task; return its result for the dispatcher to write, or record how it
        failed (None)."""
        task = claimed.task
        extra = {"task_id": task.id}
        # DEBUG: at thousands of tasks a second, a line per claim costs real CPU; the
        # completion line says which instance ran the task.
        log.debug("task %d claimed (attempt %d)", task.id, task.attempts, extra=extra)
        writes = AttemptWrites(self.database, self.instance_id, claimed)
        context = Context(task, writes, self.settings.result_max_bytes)
        running = self._begin(claimed, context)
        ending = Ending()
        try:
            value = self._processors[task.queue](task, context)
            ending.result = encode_result(value, self.settings.result_max_bytes)
        except Defer as deferral:
            ending.deferral = deferral
        except Exception as exc:
            ending.error = describe_error(exc)
            tracing.failed(exc)
        duration = time.monotonic() - running.started
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
                return None
            if task.id in self._handed_back:
                if self._held.get(task.id) is claimed:
                    del self._held[task.id]
                log.info("task %d was handed back during shutdown", task.id, extra=extra)
                return None
            self._finishing.add(task.id)
        reason = context.cancel_reason
        if reason in (CancelReason.CANCELLED, CancelReason.LEASE_LOST):
            self._let_go(claimed)
            log.info("task %d stopped (%s); nothing recorded", task.id, reason, extra=extra)
            return None
        if reason == CancelReason.TIMEOUT:
            metrics.task_timed_out(abandoned=False)
            ending = Ending(error=self._timeout_error(running, stopped=True))
        if ending.error is None and ending.deferral is None:
            return Completion(claimed, ending.result, duration)
        self._record_and_report(claimed, ending, duration)
        return None

    def _record_and_report(self, claimed: Claim, ending: Ending, duration: float) -> None:
        """Write a failed or deferred attempt, let go of its claim, and log it."""
        outcome = self._record(claimed, ending)
        self._let_go(claimed)
        if outcome is not None:
            self._report(claimed, outcome, ending, duration)

    def _let_go(self, claimed: Claim) -> None:
        """This claim's attempt is over: stop renewing its lease."""
        with self._lock:
            self._forget(claimed)

    def _forget(self, claimed: Claim) -> None:
        # Called with self._lock held.
        if self._held.get(claimed.task.id) is claimed:
            del self._held[claimed.task.id]
            self._finishing.discard(claimed.task.id)

    def _on_finished(self, results: list[tuple[Completion, queue.Outcome | None]]) -> None:
        """The dispatcher wrote a round of completions (outcome None: it could not). The tasks
        completed are counted and logged together, a line a round: at thousands of tasks a
        second a line per task cost a fifth of the instance's CPU."""
        with self._lock:
            for completion, _ in results:
                self._forget(completion.claim)
        completed: list[Completion] = []
        for completion, outcome in results:
            if outcome is None:
                continue
            if outcome.applied and outcome.status == TaskStatus.COMPLETED:
                completed.append(completion)
            else:
                ending = Ending(result=completion.result)
                self._report(completion.claim, outcome, ending, completion.duration)
        if completed:
            self._report_completed(completed)

    def _report_completed(self, completed: list[Completion]) -> None:
        self.processed_count += len(completed)
        metrics.tasks_completed([c.duration for c in completed])
        if len(completed) == 1:
            task = completed[0].claim.task
            log.info(
                "task %d completed in %.3fs (attempt %d)",
                task.id,
                completed[0].duration,
                task.attempts,
                extra={"task_id": task.id},
            )
            return
        log.info(
            "%d tasks completed: %s",
            len(completed),
            ", ".join(
                f"{c.claim.task.id} in {c.duration:.3f}s"
                + (f" (attempt {c.claim.task.attempts})" if c.claim.task.attempts > 1 else "")
                for c in completed
            ),
            extra={"task_ids": [c.claim.task.id for c in completed]},
        )

    def _on_refused(self, completion: Completion, exc: Exception) -> None:
        """PostgreSQL refused a result encode_result() let through: retrying can't help, so
        the attempt fails instead."""
        error = ResultNotStorable(f"PostgreSQL refused the result: {short_error(exc)}")
        self._record_and_report(
            completion.claim, Ending(error=describe_error(error)), completion.duration
        )

    def _begin(self, claimed: Claim, context: Context) -> Running:
        """Register the attempt as running, with its deadline for the watchdog."""
        timeout = claimed.task.timeout_seconds or self.settings.task_timeout_seconds or None
        running = Running(claimed, context, threading.current_thread(), timeout)
        with self._lock:
            self._running[claimed.task.id] = running
            revoked_claim, revoked = self._revoked.pop(claimed.task.id, (None, None))
            deadline = running.deadline
            wake_watchdog = False
            if deadline is not None and deadline < self._watch_until:
                self._watch_until, wake_watchdog = deadline, True
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
                        self._queue_of.pop(running.thread, None)
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
            self._start_work_thread(task.queue)
            self.dispatcher.slot_freed(task.queue)
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
        self._record_and_report(running.claim, ending, time.monotonic() - running.started)

    def _record(self, claimed: Claim, ending: Ending) -> queue.Outcome | None:
        """Write a failed or deferred attempt, retrying through database errors for a while;
        None when it could not be written (the lease runs out and the task runs again)."""
        task = claimed.task
        backoff = Backoff(first=0.2)
        give_up_at = time.monotonic() + retry_writes_for(self.settings.lease_seconds)
        while True:
            try:
                if ending.deferral is not None:
                    outcome = self._defer(claimed, ending.deferral)
                    if not (outcome.applied and outcome.status is None):
                        return outcome
                    ending.error = describe_error(
                        DeferralsExhausted(
                            f"deferred {self.settings.max_deferrals} times already "
                            "(MAX_DEFERRALS), so this deferral fails the attempt: "
                            f"{ending.deferral.reason or 'no reason given'}"
                        )
                    )
                    ending.deferral = None
                assert ending.error is not None
                return queue.fail(
                    self.database,
                    claimed,
                    instance_id=self.instance_id,
                    error=ending.error,
                    retry_base_seconds=self.settings.retry_base_seconds,
                )
            except Exception as exc:
                if not backoff.current:
                    log.warning(
                        "task %d: could not record its failure yet (%s); retrying",
                        task.id,
                        short_error(exc),
                        extra={"task_id": task.id},
                    )
                if time.monotonic() > give_up_at:
                    log.error(
                        "task %d: could not record its failure (%s); its lease will run out "
                        "and it will run again",
                        task.id,
                        short_error(exc),
                        extra={"task_id": task.id},
                    )
                    return None
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
                if not deferral.throttle
                else Throttled(
                    f"{reason} (its {'key' if claimed.task.concurrency_key else 'queue'} "
                    f"starts nothing for {deferral.after_seconds:g}s)"
                )
            ),
            max_deferrals=self.settings.max_deferrals,
            throttle=deferral.throttle,
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
        with self._lock:
            if self._held.get(claimed.task.id) is claimed and claimed.task.id not in self._running:
                del self._held[claimed.task.id]
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
