"""The queue baseline: a raw psycopg claim-and-complete loop, in 1..N processes.

    python -m bench.raw_loop [--tasks 20000] [--processes 1 2] [--notify] [--quick]

Each process holds one autocommit connection and repeats two statements, both prepared by
psycopg after their fifth use:
  claim    — UPDATE tasks … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED) RETURNING the task,
             with its conversations as a JSON array (what a processor needs), lease set;
  complete — the task `completed` and its conversations `processed`, fenced by the lease token.
That is the same work taskapp's worker does per task, minus everything that makes it a
service. --notify adds the task.claimed / task.completed pg_notify events taskapp sends, and
--listen makes an idle process wait on `taskapp_wakeup` (used by bench/pickup.py).

bench/drain.py and bench/pickup.py import drain() and serving() from here.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

import psycopg

from bench.common import (
    BenchError,
    bench_database,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    print_table,
    truncate_tasks,
)

_EVENT = (
    "pg_notify('taskapp_events', json_build_object('type', '{type}', 'task_id', {id}, "
    "'status', '{status}', 'instance_id', CAST(%(worker)s AS text), 'at', now())::text)"
)

CLAIM = """
WITH claimed AS (
    UPDATE tasks
    SET status = 'processing', attempts = attempts + 1, processing_instance_id = %(worker)s,
        lease_token = gen_random_uuid(), lease_expires_at = now() + interval '30 seconds',
        updated_at = now()
    WHERE id = (SELECT id FROM tasks
                WHERE status = 'pending' AND run_after <= now()
                ORDER BY priority DESC, id
                LIMIT 1
                FOR UPDATE SKIP LOCKED)
    RETURNING id, title, description, priority, attempts, lease_token
)
SELECT c.id, c.title, c.description, c.priority, c.attempts, c.lease_token,
       (SELECT coalesce(json_agg(json_build_object('id', v.id, 'content', v.content)
                                 ORDER BY v.id), '[]'::json)
        FROM conversations AS v WHERE v.task_id = c.id) AS conversations
       {notify}
FROM claimed AS c
"""

COMPLETE = """
WITH done AS (
    UPDATE tasks
    SET status = 'completed', processed_at = now(), updated_at = now(),
        lease_token = NULL, lease_expires_at = NULL
    WHERE id = %(id)s AND lease_token = %(token)s
    RETURNING id
), processed AS (
    UPDATE conversations SET status = 'processed', updated_at = now()
    WHERE task_id IN (SELECT id FROM done) AND status <> 'processed'
)
SELECT id {notify} FROM done
"""


def statements(notify: bool) -> tuple[str, str]:
    claim_event = ", " + _EVENT.format(type="task.claimed", id="c.id", status="processing")
    done_event = ", " + _EVENT.format(type="task.completed", id="id", status="completed")
    return (
        CLAIM.format(notify=claim_event if notify else ""),
        COMPLETE.format(notify=done_event if notify else ""),
    )


@dataclass(frozen=True)
class Options:
    dsn: str
    notify: bool = False
    listen: bool = False
    poll_seconds: float = 5.0
    forever: bool = False


def _worker(
    options: Options,
    name: str,
    ready: Event,
    go: Event,
    stop: Event,
    done: Synchronized[int],
) -> None:
    """One process: claim and complete until the queue is empty (or until stopped)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    claim, complete = statements(options.notify)
    params = {"worker": name}
    with psycopg.connect(options.dsn, autocommit=True) as conn:
        if options.listen:
            conn.execute("LISTEN taskapp_wakeup")
        ready.set()
        go.wait()
        processed = 0
        while not stop.is_set():
            row = conn.execute(claim, params).fetchone()
            if row is None:
                if not options.forever:
                    break
                if options.listen:
                    for _ in conn.notifies(timeout=options.poll_seconds, stop_after=1):
                        break
                else:
                    time.sleep(options.poll_seconds)
                continue
            task_id, token = row[0], row[5]
            conn.execute(complete, {"id": task_id, "token": token, **params})
            processed += 1
        with done.get_lock():
            done.value += processed


class Pool:
    """N raw-loop processes that connect, then start together on go()."""

    def __init__(self, options: Options, processes: int) -> None:
        ctx = mp.get_context("fork")
        self.go_event, self.stop_event = ctx.Event(), ctx.Event()
        self.done = ctx.Value("q", 0)
        self.ready = [ctx.Event() for _ in range(processes)]
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(
                    options,
                    f"raw-{os.getpid()}-{n}",
                    self.ready[n],
                    self.go_event,
                    self.stop_event,
                    self.done,
                ),
                daemon=True,
            )
            for n in range(processes)
        ]

    def start(self, timeout: float = 30.0) -> None:
        for proc in self.procs:
            proc.start()
        for ready in self.ready:
            if not ready.wait(timeout):
                raise BenchError("a raw-loop process did not connect in time")

    def go(self) -> None:
        self.go_event.set()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        if any(proc.is_alive() for proc in self.procs):
            raise BenchError(f"raw loop still running after {timeout}s")
        if any(proc.exitcode for proc in self.procs):
            raise BenchError(f"raw loop exit codes {[p.exitcode for p in self.procs]}")

    def stop(self) -> None:
        self.stop_event.set()
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(10)


def drain(dsn: str, processes: int, *, notify: bool = False, timeout: float = 600) -> float:
    """Seconds for `processes` raw loops to empty the queue of dsn (tasks already loaded)."""
    pool = Pool(Options(dsn=dsn, notify=notify), processes)
    try:
        pool.start()
        started = time.perf_counter()
        pool.go()
        pool.join(timeout)
        return time.perf_counter() - started
    finally:
        pool.stop()


@contextlib.contextmanager
def serving(dsn: str, processes: int = 1, *, poll_seconds: float = 5.0) -> Iterator[Pool]:
    """Raw loops that LISTEN for taskapp_wakeup and send taskapp's events, until the block ends."""
    options = Options(dsn=dsn, notify=True, listen=True, poll_seconds=poll_seconds, forever=True)
    pool = Pool(options, processes)
    try:
        pool.start()
        pool.go()
        yield pool
    finally:
        pool.stop()


def run(args: argparse.Namespace) -> int:
    tasks = 2000 if args.quick else args.tasks
    stamp = machine_line()
    rows: list[list[object]] = []
    with bench_database("raw") as url:
        for processes in args.processes:
            truncate_tasks(url)
            ids = insert_tasks(url, tasks, wake=False)
            seconds = drain(url, processes, notify=args.notify)
            log(f"raw loop, {processes} process(es): {ids.count / seconds:,.0f} tasks/s")
            rows.append([processes, ids.count, seconds, ids.count / seconds])
    title = "raw psycopg loop" + (" with pg_notify events" if args.notify else "")
    print_table(f"{title} — {stamp}", ["processes", "tasks", "seconds", "tasks/s"], rows)
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=600)
    p.add_argument("--tasks", type=int, default=20_000)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--notify", action="store_true", help="send taskapp's pg_notify events too")
    main(run, p.parse_args())
