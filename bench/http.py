"""HTTP throughput of one taskapp instance vs. Flask hello-world under the same gunicorn settings.

    python -m bench.http [--quick] [--seconds 5] [--rounds 3] [--connections 16] [--only POST]
                         [--pin]

Endpoints: GET /tasks/{id} (random among the loaded tasks, each with 2 conversations),
GET /tasks/?limit=100, POST /tasks/ (2 conversations), PUT /tasks/{id}. The instance runs with
WORKER_ENABLED=0 so no background worker competes for the CPU. Both servers stay up for the
whole run, which goes in rounds: hello world, then each endpoint; one last hello world closes
the last round. Each endpoint's ratio in a round is to the mean of the hello-world runs that
bracket it, so drift on a shared machine over the minutes of a run cancels out; the figure is
the median over the rounds. `--pin` puts both servers on one CPU (taskapp with its own
CPU_AFFINITY, hello world with taskset). Targets: GET ≥ 0.5 x hello world, POST ≥ 0.35 x.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, replace

from bench.common import (
    HttpResult,
    Server,
    add_pin_arg,
    bench_database,
    cpu_seconds,
    hello_server,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
    pinned_cpu,
    print_table,
    taskapp_server,
    verdict,
    wrk,
)

TASKS_LOADED = 1000
TARGETS = {"GET /tasks/{id}": 0.5, "POST /tasks/": 0.35}
POST_BODY = {
    "title": "bench task",
    "description": "created by bench/http.py",
    "priority": 1,
    "conversations": [{"content": "first conversation"}, {"content": "second conversation"}],
}
PUT_BODY = {"title": "renamed by bench/http.py", "priority": 2}


@dataclass(frozen=True)
class Load:
    seconds: float
    connections: int
    warmup: float = 1.0


def add_load_args(p: argparse.ArgumentParser, *, rounds_help: str) -> None:
    """--seconds, --connections and --rounds, as every wrk benchmark here takes them."""
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per endpoint")
    p.add_argument("--connections", type=int, default=16, help="concurrent connections (wrk -c)")
    p.add_argument("--rounds", type=int, default=3, help=rounds_help)


def load_of(args: argparse.Namespace) -> tuple[Load, int]:
    """The load of each run and the number of rounds (--quick: 1 s, 1 round)."""
    load = Load(
        seconds=1.0 if args.quick else args.seconds,
        connections=args.connections,
        warmup=0.5 if args.quick else 1.0,
    )
    return load, 1 if args.quick else args.rounds


def measure(
    server: Server,
    name: str,
    path: str,
    load: Load,
    *,
    method: str = "GET",
    body: object | None = None,
    random_ids: tuple[int, int] | None = None,
) -> HttpResult:
    """One warm-up run (discarded), then the measured run, with the server's CPU time per
    request (all its worker processes): a figure the machine's noise moves much less."""

    def run_wrk(seconds: float) -> HttpResult:
        return wrk(
            name,
            server.url + path,
            seconds=seconds,
            connections=load.connections,
            method=method,
            body=body,
            random_ids=random_ids,
        )

    if load.warmup:
        run_wrk(load.warmup)
    pids = server.worker_pids()
    cpu_before = cpu_seconds(pids)
    result = run_wrk(load.seconds)
    cpu_ms = (cpu_seconds(pids) - cpu_before) * 1000 / max(result.requests, 1)
    result = replace(result, cpu_ms=cpu_ms)
    log(
        f"{name}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.1f} ms, "
        f"p99 {result.p99_ms:.1f} ms, {cpu_ms:.2f} CPU ms/req"
    )
    return result


def taskapp_suite(
    server: Server,
    load: Load,
    ids: tuple[int, int],
    put_ids: tuple[int, int] | None = None,
    only: str | None = None,
) -> list[HttpResult]:
    """The four endpoints of the issue: GET reads random tasks in ids, PUT updates random tasks
    in put_ids (default: ids), POST creates tasks with 2 conversations. `only`: just the
    endpoints whose name contains it (e.g. "POST")."""
    runs = [
        ("GET /tasks/{id}", "/tasks/__ID__", {"random_ids": ids}),
        ("GET /tasks/?limit=100", "/tasks/?limit=100", {}),
        ("POST /tasks/", "/tasks/", {"method": "POST", "body": POST_BODY}),
        (
            "PUT /tasks/{id}",
            "/tasks/__ID__",
            {"method": "PUT", "body": PUT_BODY, "random_ids": put_ids or ids},
        ),
    ]
    return [
        measure(server, name, path, load, **options)
        for name, path, options in runs
        if only is None or only in name
    ]


def mean_result(name: str, results: list[HttpResult]) -> HttpResult:
    """The mean of several runs of one endpoint (errors and requests summed)."""
    n = len(results)
    return replace(
        results[0],
        name=name,
        rps=sum(r.rps for r in results) / n,
        p50_ms=sum(r.p50_ms for r in results) / n,
        p99_ms=sum(r.p99_ms for r in results) / n,
        cpu_ms=sum(r.cpu_ms for r in results) / n,
        requests=sum(r.requests for r in results),
        errors=sum(r.errors for r in results),
    )


ROUND_HEADERS = [
    "endpoint",
    "req/s (median)",
    "p50 ms",
    "p99 ms",
    "CPU ms/req",
    "errors",
    "x hello per round",
    "x hello (median)",
    "x hello CPU/req (median)",
    "target (median req/s ratio)",
]


def round_rows(
    hellos: list[HttpResult], rounds: list[list[HttpResult]]
) -> tuple[list[list[object]], dict[str, float]]:
    """Each endpoint against the hello-world runs just before and after it (its round), so
    that drift over the minutes a run takes cancels out; the median over rounds is the figure."""
    rows: list[list[object]] = []
    medians: dict[str, float] = {}
    for hello in hellos:
        rows.append(
            [hello.name, hello.rps, hello.p50_ms, hello.p99_ms, hello.cpu_ms,
             f"{hello.errors}/{hello.requests}", "", "", "", ""]
        )  # fmt: skip
    for column in zip(*rounds, strict=True):
        name = column[0].name
        ratios, cpu_ratios = [], []
        for n, result in enumerate(column):
            baseline = mean_result("hello", [hellos[n], hellos[n + 1]])
            ratios.append(result.rps / baseline.rps)
            cpu_ratios.append(baseline.cpu_ms / result.cpu_ms)
        medians[name] = statistics.median(ratios)
        target = TARGETS.get(name)
        rows.append(
            [
                name,
                statistics.median(r.rps for r in column),
                statistics.median(r.p50_ms for r in column),
                statistics.median(r.p99_ms for r in column),
                statistics.median(r.cpu_ms for r in column),
                f"{sum(r.errors for r in column)}/{sum(r.requests for r in column)}",
                " ".join(f"{ratio:.2f}" for ratio in ratios),
                f"{medians[name]:.2f}x",
                f"{statistics.median(cpu_ratios):.2f}x",
                verdict(medians[name], target, at_least=True) if target else "",
            ]
        )
    return rows, medians


def run(args: argparse.Namespace) -> int:
    load, rounds = load_of(args)
    stamp = machine_line()
    hellos: list[HttpResult] = []
    results: list[list[HttpResult]] = []
    # --pin: both on the same CPU; only one is loaded at a time.
    cpu = pinned_cpu(0) if args.pin else None
    with hello_server(cpu=cpu) as hello, bench_database("http") as url:
        hello.start()
        with taskapp_server(url, WORKER_ENABLED=0, cpu=cpu) as app:
            app.start()
            ids = insert_tasks(url, TASKS_LOADED, wake=False)
            for n in range(rounds):
                hellos.append(measure(hello, f"hello world (round {n + 1})", "/", load))
                results.append(taskapp_suite(app, load, (ids.first, ids.last), only=args.only))
            hellos.append(measure(hello, "hello world (after)", "/", load))
    rows, _ = round_rows(hellos, results)
    print_table(
        f"HTTP, one instance vs. hello world ({load.connections} connections, "
        f"{load.seconds:g} s each, {rounds} round(s){'' if cpu is None else ', both on one CPU'})"
        f" — {stamp}",
        ROUND_HEADERS,
        rows,
    )
    failed = [r.name for r in [*hellos, *(r for rs in results for r in rs)] if r.error_rate > 0.01]
    if failed:
        log(f"more than 1 % errors on: {', '.join(sorted(set(failed)))}")
        return 1
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=300)
    add_load_args(p, rounds_help="rounds of hello world then every endpoint")
    p.add_argument("--only", help='just the endpoints whose name contains this, e.g. "POST"')
    add_pin_arg(p)
    main(run, p.parse_args())
