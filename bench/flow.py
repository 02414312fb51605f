"""Flow control's cost to the claim: the drain with no limits, with a key on every task, and
on the tree before flow control, in the same run.

    python -m bench.flow [--quick] [--tasks 20000] [--concurrency N] [--keys 64]
                         [--rounds 3] [--before 6771baa]

Each drain is bench/drain.py's with 2 instances: the instances start on an empty queue, the
tasks (2 conversations each) are inserted in one transaction that notifies `taskapp_wakeup`,
and the clock runs from that commit until every task is `completed`. Three runs, in
alternating order over --rounds rounds (the median of each is the figure):
- "no limits": nothing configured (no row in `queues`);
- "keyed": every task carries one of --keys concurrency keys, round robin, and the queue's
  `key_concurrency_limit` (PUT /queues/default) is 100, higher than the slots (it never binds:
  what is measured is the cost of looking, locking and counting);
- "before": the tree at --before (default 6771baa, the commit before flow control), exported
  with `git archive` into a temporary directory and served by the same harness, its own
  database migrated by its own code (`--before ''` leaves it out).
Targets (issue 13): no limits ≥ 0.9 x before, keyed ≥ 0.6 x before (and x no limits).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    BENCH_DIR,
    ROOT,
    BenchError,
    bench_database,
    connect,
    http_json,
    insert_tasks,
    log,
    machine_line,
    main,
    migrate_schema,
    parser,
    print_table,
    taskapp_server,
    truncate_tasks,
    venv_python,
    verdict,
    wait_completed,
)
from bench.drain import add_drain_args

TARGET_NO_LIMITS = 0.9  # x before
TARGET_KEYED = 0.6  # x before
KEY_LIMIT = 100
BEFORE = "6771baa"


@dataclass(frozen=True)
class Variant:
    name: str
    url: str
    root: Path
    keys: int  # 0: no keys, no limits configured
    # The Python that runs it: a venv with its tree's own requirements.
    python: Path = Path(sys.executable)


def drain(variant: Variant, tasks: int, concurrency: int, timeout: float) -> float:
    """One drain of `tasks` on 2 fresh instances of the variant's tree; tasks/s."""
    truncate_tasks(variant.url)
    with contextlib.ExitStack() as stack:
        servers = []
        for n in range(2):
            server = taskapp_server(
                variant.url,
                name=f"{variant.name}-{n}",
                root=variant.root,
                python=variant.python,
                WORKER_CONCURRENCY=concurrency,
            )
            stack.enter_context(server)
            servers.append(server.start())
        if variant.keys:
            http_json(
                "PUT", f"{servers[0].url}/queues/default", {"key_concurrency_limit": KEY_LIMIT}
            )
        ids = insert_tasks(variant.url, tasks, keys=variant.keys)
        seconds = wait_completed(variant.url, ids, timeout=timeout)
    rate = ids.count / seconds
    log(f"{variant.name}: {rate:,.0f} tasks/s")
    return rate


@contextlib.contextmanager
def exported_tree(revision: str) -> Iterator[Path]:
    """The repository's tree at `revision`, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix=f"taskapp-{revision}-") as path:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision],
            capture_output=True,
            timeout=60,
        )
        if archive.returncode != 0:
            raise BenchError(f"git archive {revision} failed: {archive.stderr.decode()[-500:]}")
        subprocess.run(["tar", "-x", "-C", path], input=archive.stdout, check=True, timeout=60)
        yield Path(path)


def run(args: argparse.Namespace) -> int:
    tasks = 1000 if args.quick else args.tasks
    rounds = 1 if args.quick else args.rounds
    stamp = machine_line()
    rates: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(bench_database("flow"))
        variants = [
            Variant("no limits", url, ROOT, 0),
            Variant(f"keyed ({args.keys} keys)", url, ROOT, args.keys),
        ]
        if args.before:
            before_root = stack.enter_context(exported_tree(args.before))
            # Its own requirements (it had flask-sock, say), in a venv made once and kept.
            python = venv_python(
                BENCH_DIR / f".venv-before-{args.before}",
                (before_root / "requirements.txt").read_text(),
                f"the requirements of {args.before}",
            )
            # Its own schema (migration 0006), brought up by its own code.
            before_url = stack.enter_context(bench_database("flow_before", migrate=False))
            migrate_schema(before_url, before_root, python)
            variants.append(Variant(f"before ({args.before})", before_url, before_root, 0, python))
        for n in range(rounds):
            order = variants if n % 2 == 0 else variants[::-1]
            for variant in order:
                if variant.keys == 0 and variant.root == ROOT:
                    with connect(url) as conn:  # "no limits": nothing configured at all
                        conn.execute("DELETE FROM queues; DELETE FROM concurrency_keys")
                rate = drain(variant, tasks, args.concurrency, args.drain_timeout)
                rates.setdefault(variant.name, []).append(rate)
    median = {name: statistics.median(values) for name, values in rates.items()}
    no_limits, keyed = median[variants[0].name], median[variants[1].name]
    before = median[variants[2].name] if args.before else None
    rows: list[list[object]] = []
    for variant in variants:
        rate = median[variant.name]
        per_round = " ".join(f"{r:,.0f}" for r in rates[variant.name])
        if variant is variants[0]:
            vs_before = f"{rate / before:.2f}x" if before else ""
            target = verdict(rate / before, TARGET_NO_LIMITS, at_least=True) if before else ""
            vs_none = "1.00x"
        elif variant is variants[1]:
            vs_before = f"{rate / before:.2f}x" if before else ""
            target = verdict(rate / (before or no_limits), TARGET_KEYED, at_least=True)
            vs_none = f"{rate / no_limits:.2f}x"
        else:
            vs_before, target, vs_none = "1.00x", "", f"{rate / no_limits:.2f}x"
        rows.append([variant.name, tasks, rate, per_round, vs_none, vs_before, target])
    print_table(
        f"Flow control: drain of {tasks:,} tasks, 2 instances x {args.concurrency} thread(s), "
        f"median of {rounds} alternating round(s) — {stamp}",
        ["run", "tasks", "tasks/s", "tasks/s per round", "x no limits", "x before", "target"],
        rows,
    )
    log(
        f"keyed / no limits = {keyed / no_limits:.2f}"
        + (f"; no limits / before = {no_limits / before:.2f}" if before else "")
    )
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=1800)
    add_drain_args(p)
    p.add_argument("--keys", type=int, default=64, help="concurrency keys, round robin")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--before",
        default=BEFORE,
        help=f"the commit to compare with (default {BEFORE}); '' leaves it out",
    )
    main(run, p.parse_args())
