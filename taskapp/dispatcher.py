"""The dispatcher of an instance: the one thread that claims tasks and writes completions.

Work threads no longer claim for themselves. The dispatcher claims as many tasks of each
queue the instance serves as it has free work slots for that queue, in one statement, and
hands each to a waiting work thread of its queue;
completions come back to it and are written many at a time, each fenced by its own lease
token, in the same statement that claims the next tasks for the slots they free. A
completion waits at most for the statement in flight (about a millisecond): the dispatcher
writes as soon as one arrives, and whatever arrives meanwhile goes into the next batch. So
one round trip serves a whole batch at high load, and a single task at low load.

An idle dispatcher sleeps until woken (LISTEN/NOTIFY, via wake()), until the next scheduled
task is due, or for at most POLL_INTERVAL_SECONDS: one statement per poll per instance,
whatever WORKER_CONCURRENCY is. Failures, deferrals and checkpoints are rare or belong to the
attempt: the work threads write those themselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import psycopg

from . import queue, tracing
from .attempt import Backoff, retry_writes_for, short_error
from .config import Settings
from .database import Database
from .queue import Claim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A finished attempt waiting to be written: its claim, its result (JSON text or None)
    and how long the processor took."""

    claim: Claim
    result: str | None
    duration: float


class Dispatcher:
    """Claims for free slots and writes completions in batches; start() and stop() once.

    `claimed(claims)` is called with each batch of new claims (the worker holds them and
    hands them to work threads); `held()` returns every claim the worker holds;
    `finished(results)` with the (completion, outcome) pairs of each round (outcome None: it
    could not be written, and its lease will run out); `refused(completion, error)` for a
    result PostgreSQL would not store."""

    def __init__(
        self,
        *,
        database: Database,
        settings: Settings,
        instance_id: str,
        slots: Mapping[str, int],
        claimed: Callable[[list[Claim]], None],
        held: Callable[[], list[Claim]],
        finished: Callable[[list[tuple[Completion, queue.Outcome | None]]], None],
        refused: Callable[[Completion, Exception], None],
    ) -> None:
        self.database = database
        self.settings = settings
        self.instance_id = instance_id
        self._claimed = claimed
        self._held = held
        self._finished = finished
        self._refused = refused
        self._cond = threading.Condition()
        # Free work slots per queue served.
        self._free = dict(slots)
        # Rounds in a row whose candidates the limits refused and that claimed nothing.
        self._refused_rounds = 0
        self._completions: list[Completion] = []
        # True when a claim may find something: set by wake() and by a poll, cleared when a
        # claim finds fewer tasks than it asked for.
        self._maybe_ready = True
        self._generation = 0
        self._claiming = True
        self._done = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="taskapp-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A task may be claimable now."""
        with self._cond:
            self._generation += 1
            self._maybe_ready = True
            self._cond.notify()

    def slot_freed(
        self, queue_name: str, count: int = 1, *, completion: Completion | None = None
    ) -> None:
        """A work thread of this queue is free for another task (or a new one replaced an
        abandoned one), with the result of the task it ran to write, if any."""
        with self._cond:
            self._free[queue_name] += count
            if completion is not None:
                self._completions.append(completion)
            self._cond.notify()

    def stop_claiming(self) -> None:
        with self._cond:
            self._claiming = False
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Write the completions still waiting, then end the thread."""
        with self._cond:
            self._claiming = False
            self._done = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        failing_since: float | None = None
        backoff = Backoff()
        # A round failed with its answer unknown: it may have committed. Its claims would
        # leave tasks leased to this instance that nothing here runs (for a whole lease):
        # taken back first. Its completions, written again, find their leases gone: asked
        # after (_confirmed), so a task completed here is not reported as lost.
        claim_unsure = False
        unsure_completions: set[int] = set()
        while True:
            batch, limits, generation = self._next_round()
            if batch is None:
                return
            if not batch and not limits:
                continue
            try:
                if claim_unsure:
                    self._take_back_unheld()
                    claim_unsure = False
                with tracing.claim_round(len(batch), limits) as traced:
                    done = queue.complete_and_claim_many(
                        self.database,
                        [(c.claim, c.result) for c in batch],
                        instance_id=self.instance_id,
                        limits=limits,
                        lease_seconds=self.settings.lease_seconds,
                    )
                    traced.claimed(len(done.claims))
            except psycopg.DataError:
                # One result PostgreSQL won't store spoils the batch: write them one by one.
                self._one_by_one(batch)
                continue
            except Exception as exc:
                claim_unsure = claim_unsure or bool(limits)
                unsure_completions.update(c.claim.task.id for c in batch)
                failing_since = failing_since or time.monotonic()
                self._after_failure(batch, exc, failing_since, first=not backoff.current)
                time.sleep(backoff.next())
                continue
            failing_since = None
            backoff.reset()
            claims = done.claims
            with self._cond:
                for claimed in claims:
                    self._free[claimed.task.queue] -= 1
                # Refused candidates (a key just reached its limit, a rate ran out) leave
                # others unclaimed: look again at once, as those keys are skipped now; but
                # not forever if the limits keep refusing without anything starting.
                self._refused_rounds = (
                    self._refused_rounds + 1 if done.refused and not claims else 0
                )
                again = done.refused and self._refused_rounds <= 3
                if (
                    len(claims) < sum(limits.values())
                    and not again
                    and generation == self._generation
                ):
                    self._maybe_ready = False
            if claims:
                self._claimed(claims)
            outcomes = done.outcomes
            if unsure_completions:
                outcomes = self._confirmed(batch, outcomes, unsure_completions)
            if batch:
                self._finished(list(zip(batch, outcomes, strict=True)))

    def _next_round(self) -> tuple[list[Completion] | None, dict[str, int], int]:
        """Wait for something to do; return the completions to write, how many tasks of each
        queue to claim, and the wake-up generation seen (None: the dispatcher is done)."""
        with self._cond:
            while True:
                free = {name: n for name, n in self._free.items() if n > 0}
                if not self._claiming:
                    free = {}
                if self._completions or (free and self._maybe_ready):
                    batch, self._completions = self._completions, []
                    return batch, free, self._generation
                if self._done:
                    return None, {}, self._generation
                timeout = self.settings.poll_interval_seconds
                if free:
                    # Idle with free slots: sleep until a task of those queues may be due.
                    self._cond.release()
                    try:
                        due = queue.seconds_until_next_due(self.database, free)
                    except Exception:
                        due = None
                    finally:
                        self._cond.acquire()
                    if due is not None:
                        timeout = min(timeout, due)
                    if self._completions or self._maybe_ready or self._done:
                        continue
                if not self._cond.wait(timeout):
                    self._maybe_ready = True  # a poll: tasks may have come without a wake-up

    def _take_back_unheld(self) -> None:
        taken = queue.take_back_unheld(self.database, self._held(), instance_id=self.instance_id)
        if taken:
            log.warning(
                "handed back %d task(s) claimed by a statement whose answer was lost: %s",
                len(taken),
                ", ".join(map(str, taken)),
            )

    def _confirmed(
        self, batch: list[Completion], outcomes: list[queue.Outcome], unsure: set[int]
    ) -> list[queue.Outcome]:
        """The outcomes, with each completion that found its lease gone after a lost answer
        counted as applied when the task stands completed by this instance."""
        doubtful = [
            c.claim.task.id
            for c, o in zip(batch, outcomes, strict=True)
            if not o.applied and c.claim.task.id in unsure
        ]
        unsure.difference_update(c.claim.task.id for c in batch)
        if not doubtful:
            return outcomes
        try:
            done = queue.completed_by(self.database, doubtful, instance_id=self.instance_id)
        except Exception as exc:
            log.warning("could not confirm %d earlier completion(s): %s", len(doubtful), exc)
            return outcomes
        return [
            queue.Outcome(applied=True, status="completed") if c.claim.task.id in done else o
            for c, o in zip(batch, outcomes, strict=True)
        ]

    def _one_by_one(self, batch: list[Completion]) -> None:
        for completion in batch:
            try:
                outcome = queue.complete(
                    self.database,
                    completion.claim,
                    instance_id=self.instance_id,
                    result=completion.result,
                )
            except psycopg.DataError as exc:
                self._refused(completion, exc)
            except Exception:
                with self._cond:
                    self._completions.append(completion)  # the next round tries again
            else:
                self._finished([(completion, outcome)])

    def _after_failure(
        self, batch: list[Completion], exc: Exception, failing_since: float, *, first: bool
    ) -> None:
        """Keep the batch for the next round, until it has failed for longer than the leases
        would last anyway. The next round claims again too (after the backoff): a wake-up sent
        while the statement was failing must not be lost for a whole poll interval. (Tasks a
        lost answer leased to this instance are taken back first: _take_back_unheld.)"""
        give_up = time.monotonic() - failing_since > retry_writes_for(self.settings.lease_seconds)
        if give_up:
            log.error(
                "could not record %d result(s) (%s); their leases will run out and they will "
                "run again",
                len(batch),
                short_error(exc),
            )
            self._finished([(completion, None) for completion in batch])
        else:
            if first:
                log.warning(
                    "could not record %d result(s) yet (%s); retrying", len(batch), short_error(exc)
                )
            with self._cond:
                self._completions[:0] = batch
