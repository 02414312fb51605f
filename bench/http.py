"""HTTP throughput of one taskapp instance vs. Flask hello-world under the same gunicorn settings.

    python -m bench.http [--quick] [--seconds 5] [--connections 16] [--only POST]

Endpoints: GET /tasks/{id} (random among the loaded tasks, each with 2 conversations),
GET /tasks/?limit=100, POST /tasks/ (2 conversations), PUT /tasks/{id}. The instance runs with
WORKER_ENABLED=0 so no background worker competes for the CPU. The baseline is measured before
and after the taskapp runs and averaged, so drift on a shared machine shows up as a gap between
the two. Targets: GET ≥ 0.5 x hello world, POST ≥ 0.35 x.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from bench.common import (
    HttpResult,
    Server,
    bench_database,
    cpu_seconds,
    hello_server,
    insert_tasks,
    log,
    machine_line,
    main,
    parser,
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


def result_rows(results: list[HttpResult], hello: HttpResult) -> list[list[object]]:
    """Ratios to hello world: by req/s (the target), and by server CPU per request."""
    rows: list[list[object]] = []
    for r in results:
        ratio = r.rps / hello.rps
        target = TARGETS.get(r.name)
        rows.append(
            [
                r.name,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.cpu_ms,
                f"{r.errors}/{r.requests}",
                f"{ratio:.2f}x",
                f"{hello.cpu_ms / r.cpu_ms:.2f}x",
                verdict(ratio, target, at_least=True) if target else "",
            ]
        )
    return rows


HEADERS = [
    "endpoint",
    "req/s",
    "p50 ms",
    "p99 ms",
    "CPU ms/req",
    "errors",
    "x hello (req/s)",
    "x hello (CPU/req)",
    "target (req/s)",
]


def hello_rows(before: HttpResult, after: HttpResult) -> tuple[HttpResult, list[list[object]]]:
    """The baseline: the mean of the runs before and after taskapp's."""
    mean = replace(
        before,
        name="hello world (mean: the baseline)",
        rps=(before.rps + after.rps) / 2,
        p50_ms=(before.p50_ms + after.p50_ms) / 2,
        p99_ms=(before.p99_ms + after.p99_ms) / 2,
        cpu_ms=(before.cpu_ms + after.cpu_ms) / 2,
        requests=before.requests + after.requests,
        errors=before.errors + after.errors,
    )
    rows: list[list[object]] = [
        [h.name, h.rps, h.p50_ms, h.p99_ms, h.cpu_ms, f"{h.errors}/{h.requests}", "", "", ""]
        for h in (before, after, mean)
    ]
    return mean, rows


def run(args: argparse.Namespace) -> int:
    seconds = 2.0 if args.quick else args.seconds
    load = Load(seconds=seconds, connections=args.connections, warmup=1.0)
    stamp = machine_line()
    with hello_server() as hello, bench_database("http") as url:
        hello.start()
        before = measure(hello, "hello world (before)", "/", load)
        with taskapp_server(url, WORKER_ENABLED=0) as app:
            app.start()
            ids = insert_tasks(url, TASKS_LOADED, wake=False)
            results = taskapp_suite(app, load, (ids.first, ids.last), only=args.only)
        after = measure(hello, "hello world (after)", "/", load)
    baseline, rows = hello_rows(before, after)
    rows += result_rows(results, baseline)
    print_table(
        f"HTTP, one instance vs. hello world ({load.connections} connections, "
        f"{seconds:g} s each) — {stamp}",
        HEADERS,
        rows,
    )
    failed = [r.name for r in [*results, before, after] if r.error_rate > 0.01]
    if failed:
        log(f"more than 1 % errors on: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    p = parser(__doc__.splitlines()[0], default_timeout=300)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per endpoint")
    p.add_argument("--connections", type=int, default=16, help="concurrent connections (wrk -c)")
    p.add_argument("--only", help='just the endpoints whose name contains this, e.g. "POST"')
    main(run, p.parse_args())
