"""Hostile and broken clients against real gunicorn instances (and a real nginx in front):
stalled event streams, refused WebSockets, abandoned streams, SIGTERM among stalled clients,
malformed chunked bodies, repeated headers and slowloris. Each case checks what the instance
keeps (threads, descriptors, stream slots) and how another client is served meanwhile."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import random
import re
import shutil
import signal
import socket
import statistics
import string
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import websocket

from tests.support import ROOT, Instance, wait_for
from tools.gunicorn_process import free_port

WS_HANDSHAKE = (
    "GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SSE_REQUEST = "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def threads_of(pid: int) -> int:
    return int(re.search(r"^Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1])


def fds_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def rss_mb(pid: int) -> float:
    kb = re.search(r"^VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)[1]
    return int(kb) / 1024


def never_reading(port: int, request: str) -> socket.socket:
    """A client with a tiny receive buffer that sends its request and never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window
    sock.connect(("127.0.0.1", port))
    sock.sendall(request.encode())
    return sock


def publish(db_conn, count: int, pad: int = 4000) -> None:
    """`count` events of about `pad` bytes, as every instance hears them."""
    db_conn.execute(
        "SELECT pg_notify('taskapp_events', json_build_object('type', 'task.updated',"
        " 'task_id', i, 'status', 'pending', 'instance_id', 'x', 'at', now(),"
        " 'pad', repeat('x', %s))::text) FROM generate_series(1, %s) AS i",
        (pad, count),
    )


class Latency:
    """A client that reads GET /tasks/?limit=5 in a loop, recording each request's time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Latency:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = session.get(f"{self.url}/tasks/?limit=5", timeout=10)
                    if response.status_code != 200:
                        self.failures.append(str(response.status_code))
                except requests.RequestException as exc:
                    self.failures.append(type(exc).__name__)
                self.times.append(time.monotonic() - started)
                self._stop.wait(0.02)

    def p99(self) -> float:
        return statistics.quantiles(self.times, n=100)[98] if len(self.times) > 1 else 0.0


def open_streams(instance: Instance) -> int:
    return int(instance.status()["event_streams"]["open"])


def test_stalled_stream_clients_give_their_threads_back(instances, db_conn):
    # 16 threads, 12 of them for streams: before, each stalled client kept its thread in
    # send() after it was cut off, so 4 more would have left the API with none.
    instance = instances(
        WORKER_ENABLED=0, GUNICORN_THREADS=16, MAX_EVENT_STREAMS=12, EVENT_SEND_TIMEOUT_SECONDS=2
    )
    pid = instance.worker_pid()
    idle_threads, idle_fds, idle_rss = threads_of(pid), fds_of(pid), rss_mb(pid)
    stalled = [never_reading(instance.port, WS_HANDSHAKE.format(query="")) for _ in range(6)]
    stalled += [never_reading(instance.port, SSE_REQUEST) for _ in range(6)]
    try:
        wait_for(lambda: open_streams(instance) == 12, what="12 stalled streams open")
        peak_threads = threads_of(pid)
        with Latency(instance.url) as other:
            # 1,500 events of 4 KB: more than a stalled client's socket buffers and its queue
            # hold; each stalled stream is disconnected, by its write's timeout or its queue.
            for _ in range(5):
                publish(db_conn, 300)
                time.sleep(0.2)  # paced, as events come, not a condition to wait for
            started = time.monotonic()
            wait_for(lambda: open_streams(instance) == 0, timeout=10, what="stalls released")
            released = time.monotonic() - started
            other_p99 = other.p99()
        assert not other.failures, other.failures
        # The threads are back: 12 new streams open and are served, with the API beside them.
        fresh = [requests.get(f"{instance.url}/events", stream=True, timeout=10) for _ in range(12)]
        try:
            for response in fresh:
                assert next(response.iter_lines()) == b": connected"
            assert requests.get(f"{instance.url}/tasks/", timeout=5).status_code == 200
        finally:
            for response in fresh:
                response.close()
        wait_for(lambda: open_streams(instance) == 0, timeout=5, what="fresh streams closed")
        settled_threads = threads_of(pid)
        settled_fds = wait_for(
            lambda: (n := fds_of(pid)) <= idle_fds + 4 and n, timeout=10, what="fds back"
        )
        rss = rss_mb(pid)
    finally:
        for sock in stalled:
            sock.close()
    print(
        f"\n12 stalled streams: released {released:.1f}s after the last events; other client's "
        f"p99 {other_p99 * 1000:.0f} ms over {len(other.times)} requests; threads idle "
        f"{idle_threads}, with streams {peak_threads}, after {settled_threads}; fds "
        f"{idle_fds} -> {settled_fds}; RSS {idle_rss:.0f} -> {rss:.0f} MB"
    )
    assert other_p99 < 1.0
    # One thread per stream and none beside it: only gunicorn's own pool grew.
    assert peak_threads <= idle_threads + 16
    assert settled_threads <= idle_threads + 16
    assert rss < idle_rss + 30


def test_refused_websockets_are_answered_before_the_upgrade_and_hold_nothing(instances):
    instance = instances(WORKER_ENABLED=0, GUNICORN_THREADS=8, MAX_EVENT_STREAMS=1)
    pid = instance.worker_pid()
    ws_url = f"ws://127.0.0.1:{instance.port}/ws"
    kept = websocket.create_connection(ws_url, timeout=5)
    try:
        wait_for(lambda: open_streams(instance) == 1)
        idle_threads = threads_of(pid)
        with pytest.raises(websocket.WebSocketBadStatusException) as full:
            websocket.create_connection(ws_url, timeout=5)
        assert full.value.status_code == 503
        with pytest.raises(websocket.WebSocketBadStatusException) as bad:
            websocket.create_connection(f"{ws_url}?task_id=%C2%B2", timeout=5)
        assert bad.value.status_code == 422
        # 30 refused clients that keep their connections open: each used to keep a reader
        # thread (and the socket) until it closed; now each got its answer and holds no thread.
        refused = [
            never_reading(instance.port, WS_HANDSHAKE.format(query=q))
            for q in ["", "?task_id=abc"] * 15
        ]
        try:
            for sock in refused:
                sock.settimeout(5)
                head = sock.recv(4096).decode()
                assert head.startswith(("HTTP/1.1 503", "HTTP/1.1 422")), head
                assert "application/problem+json" in head
            threads = threads_of(pid)
        finally:
            for sock in refused:
                sock.close()
        assert open_streams(instance) == 1
    finally:
        kept.close()
    print(f"\n30 refused WebSockets held open: threads {idle_threads} -> {threads}")
    assert threads <= idle_threads + 8  # at most gunicorn's pool; no thread per client


def test_an_abandoned_stream_frees_its_slot_within_seconds(instances):
    # The keep-alive that used to be the only way to notice is 15 s here.
    instance = instances(WORKER_ENABLED=0, EVENT_KEEPALIVE_SECONDS=15)
    for path, request in (("/events", SSE_REQUEST), ("/ws", WS_HANDSHAKE.format(query=""))):
        client = socket.create_connection(("127.0.0.1", instance.port), timeout=5)
        client.sendall(request.encode())
        wait_for(lambda: open_streams(instance) == 1, what=f"{path} open")
        started = time.monotonic()
        client.close()  # gone without a word (no close frame), as a crashed client
        wait_for(lambda: open_streams(instance) == 0, timeout=4, what=f"{path} slot freed")
        print(f"\n{path}: slot freed {time.monotonic() - started:.2f}s after the client left")


def test_sigterm_among_stalled_clients_is_not_held_up(instances, db_conn):
    grace = 2
    instance = instances(WORKER_ENABLED=0, SHUTDOWN_GRACE_SECONDS=grace)
    stalled = [never_reading(instance.port, WS_HANDSHAKE.format(query="")) for _ in range(10)]
    stalled += [never_reading(instance.port, SSE_REQUEST) for _ in range(10)]
    try:
        wait_for(lambda: open_streams(instance) == 20, what="20 stalled streams")
        publish(db_conn, 200)  # their buffers fill; their queues don't (yet)
        started = time.monotonic()
        instance.signal_master(signal.SIGTERM)
        assert instance.wait_exit(timeout=30) == 0
        took = time.monotonic() - started
    finally:
        for sock in stalled:
            sock.close()
    print(f"\nSIGTERM with 20 stalled stream clients: {took:.2f}s (grace {grace}s)")
    assert took < grace + 2  # was 22 s with 10 of them


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[bytes, bytes]:
    """One response on a keep-alive connection (head, body), by its Content-Length."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head)[1])
    while len(buffer) < end + length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        buffer += chunk
    body = bytes(buffer[end : end + length])
    del buffer[: end + length]
    return head, body


def random_methods(port: int, count: int) -> collections.Counter[bytes]:
    """`count` requests `XXXXXXXXXXXX /health` with random 12-letter methods, one after the
    other on one keep-alive connection; the status lines they got."""
    statuses: collections.Counter[bytes] = collections.Counter()
    buffer = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(count):
            method = "".join(random.choices(string.ascii_uppercase, k=12))
            sock.sendall(f"{method} /health HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, _ = read_response(sock, buffer)
            statuses[head.split(b"\r\n", 1)[0]] += 1
    return statuses


def test_20000_random_methods_grow_neither_the_memory_nor_the_metrics(instances) -> None:
    instance = instances(WORKER_ENABLED=0, DB_POOL_SIZE=3)
    pid = instance.worker_pid()
    random_methods(instance.port, 500)  # first-time paths (the 405, its metric series) warm
    metrics_before = len(requests.get(f"{instance.url}/metrics", timeout=10).content)
    rss_before = rss_mb(pid)
    started = time.monotonic()
    connections = 4
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        counts = list(pool.map(random_methods, [instance.port] * connections, [5000] * 4))
    took = time.monotonic() - started
    statuses = sum(counts, collections.Counter())
    rss_after = rss_mb(pid)
    metrics = requests.get(f"{instance.url}/metrics", timeout=10)
    print(
        f"\n20,000 random methods in {took:.1f}s over {connections} connections "
        f"({dict(statuses)}): RSS {rss_before:.1f} -> {rss_after:.1f} MB, /metrics "
        f"{metrics_before / 1000:.1f} -> {len(metrics.content) / 1000:.1f} KB in "
        f"{metrics.elapsed.total_seconds() * 1000:.0f} ms"
    )
    assert sum(statuses.values()) == 20_000
    assert set(statuses) == {b"HTTP/1.1 405 METHOD NOT ALLOWED"}, statuses
    assert rss_after - rss_before < 5  # was 82 -> 376 MB
    assert len(metrics.content) < 100_000  # was 31.8 MB
    assert metrics.elapsed.total_seconds() < 1


def stalled_streams(port: int, each: int) -> list[socket.socket]:
    """`each` never-reading WebSocket clients and as many never-reading SSE clients."""
    socks = [never_reading(port, WS_HANDSHAKE.format(query="")) for _ in range(each)]
    return socks + [never_reading(port, SSE_REQUEST) for _ in range(each)]


def test_400_never_reading_stream_clients_leave_the_api_served(instances, db_conn) -> None:
    # 200 WebSocket and 200 SSE clients that never read, each holding a request thread until
    # its write times out (EVENT_SEND_TIMEOUT_SECONDS, 5 s by default) while events flow.
    streams, send_timeout = 400, 5
    instance = instances(
        WORKER_ENABLED=0,
        DB_POOL_SIZE=4,
        MAX_EVENT_STREAMS=streams,
        GUNICORN_THREADS=streams + 16,
        EVENT_SEND_TIMEOUT_SECONDS=send_timeout,
        EVENT_KEEPALIVE_SECONDS=15,
    )
    pid = instance.worker_pid()
    cold_threads = threads_of(pid)
    # gunicorn's thread pool grows to GUNICORN_THREADS and never shrinks: the baseline is the
    # pool grown once, by as many streams and the two API clients beside them, then idle.
    with Latency(instance.url), Latency(instance.url):
        readers = stalled_streams(instance.port, streams // 2)
        wait_for(lambda: open_streams(instance) == streams, timeout=30, what="streams open")
        time.sleep(1)
        for sock in readers:
            sock.close()
        wait_for(lambda: open_streams(instance) == 0, timeout=10, what="readers gone")
    baseline = threads_of(pid)
    stalled = stalled_streams(instance.port, streams // 2)
    try:
        wait_for(lambda: open_streams(instance) == streams, timeout=30, what="stalls open")
        peak = threads_of(pid)
        with Latency(instance.url) as other, Latency(instance.url) as another:
            # 300 events of 4 KB over 3 s: more than a stalled client's socket buffers hold
            # (so each write comes to wait), fewer than would cut it off (1,000 behind): each
            # stalled stream ends by its write's timeout.
            first_events = time.monotonic()
            for _ in range(6):
                publish(db_conn, 50)
                time.sleep(0.5)
            stalls_end = time.monotonic()
            wait_for(lambda: open_streams(instance) == 0, timeout=15, what="stalls released")
            released = time.monotonic() - stalls_end
            since_first = time.monotonic() - first_events
            time.sleep(1)  # the API measured past the release too
        times = other.times + another.times
        p99 = statistics.quantiles(times, n=100)[98]
        after = threads_of(pid)
        assert not other.failures + another.failures, other.failures + another.failures
        # Every thread is free again: as many new streams as the cap are served at once.
        fresh = stalled_streams(instance.port, streams // 2)
        try:
            wait_for(lambda: open_streams(instance) == streams, timeout=15, what="fresh streams")
            assert requests.get(f"{instance.url}/tasks/", timeout=5).status_code == 200
        finally:
            for sock in fresh:
                sock.close()
        back = time.monotonic() - stalls_end
        with_fresh = threads_of(pid)
    finally:
        for sock in stalled:
            sock.close()
    print(
        f"\n{streams} never-reading stream clients: released {since_first:.1f}s after the first "
        f"events, {released:.1f}s after the last, every thread free again {back:.1f}s after "
        f"them; other clients' p99 "
        f"{p99 * 1000:.0f} ms (max {max(times) * 1000:.0f} ms) over {len(times)} requests; "
        f"threads cold {cold_threads}, pool grown {baseline}, with stalls {peak}, after {after}, "
        f"with {streams} fresh streams {with_fresh}"
    )
    assert p99 < 1.0
    # Nothing beyond gunicorn's pool (no thread per client, none left behind); the pool itself
    # may grow by a few threads for the API clients beside 400 streams.
    pool = cold_threads + streams + 16
    assert after <= pool and with_fresh <= pool and after <= baseline + 4, "threads left behind"
    assert since_first < send_timeout + 5 and back < 10


def test_sigterm_among_400_never_reading_stream_clients(instances, db_conn) -> None:
    grace, streams = 3, 400
    instance = instances(
        WORKER_ENABLED=0,
        DB_POOL_SIZE=3,
        SHUTDOWN_GRACE_SECONDS=grace,
        MAX_EVENT_STREAMS=streams,
        GUNICORN_THREADS=streams + 16,
    )
    stalled = stalled_streams(instance.port, streams // 2)
    try:
        wait_for(lambda: open_streams(instance) == streams, timeout=30, what="stalls open")
        publish(db_conn, 200)  # their buffers fill; their writes wait
        time.sleep(1)
        started = time.monotonic()
        instance.signal_master(signal.SIGTERM)
        assert instance.wait_exit(timeout=30) == 0
        took = time.monotonic() - started
    finally:
        for sock in stalled:
            sock.close()
    print(f"\nSIGTERM with {streams} never-reading stream clients: {took:.2f}s (grace {grace}s)")
    assert took < grace + 2


def raw_request(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes, read until the server closes (or is quiet for a moment): the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError):
            sock.settimeout(1.5)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is not hex
        b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the chunk
        b"2;a=\x01\r\n{}\r\n0\r\n\r\n",  # a bad chunk extension
    ],
    ids=["bad-size", "missing-crlf", "bad-extension"],
)
def test_a_malformed_chunked_body_is_one_400_problem_and_the_connection_ends(
    instances, chunks: bytes
) -> None:
    instance = instances(WORKER_ENABLED=0)
    answer = raw_request(instance.port, post("/tasks/", chunks, "Transfer-Encoding: chunked"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"application/problem+json" in head
    problem = json.loads(body.split(b"\r\n\r\n")[0])
    assert problem["status"] == 400 and "malformed" in problem["detail"]
    assert answer.count(b"HTTP/1.1") == 1  # nothing after it on the connection
    assert "Traceback" not in instance.log()


def test_chunked_and_sized_bodies_meet_the_same_limit(instances) -> None:
    limit = 2000
    instance = instances(WORKER_ENABLED=0, MAX_CONTENT_LENGTH=limit)
    head = b'{"title": "t", "description": "'
    for size, status in ((limit, b"201"), (limit + 1, b"413")):
        body = head + b"x" * (size - len(head) - 2) + b'"}'
        chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        sized = raw_request(instance.port, post("/tasks/", body, f"Content-Length: {size}"))
        streamed = raw_request(
            instance.port, post("/tasks/", chunked, "Transfer-Encoding: chunked")
        )
        assert sized.startswith(b"HTTP/1.1 " + status), (size, sized[:200])
        assert streamed.startswith(b"HTTP/1.1 " + status), (size, streamed[:200])


def test_a_repeated_idempotency_key_is_a_400_naming_it(instances) -> None:
    instance = instances(WORKER_ENABLED=0)
    answer = raw_request(
        instance.port,
        post(
            "/tasks/",
            b'{"title": "t"}',
            "Content-Length: 14",
            "Idempotency-Key: a",
            "Idempotency-Key: b",
            "Connection: close",
        ),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert "Idempotency-Key" in json.loads(body)["errors"]
    assert requests.get(f"{instance.url}/tasks/", timeout=5).headers["X-Total-Count"] == "0"


def test_65000_conversations_are_refused_in_under_50_ms(instances) -> None:
    instance = instances(WORKER_ENABLED=0)
    body = {"title": "t", "conversations": [{"content": ""}] * 65_000}
    body = json.dumps(body, separators=(",", ":"))  # just under 1 MiB, as the issue sent it
    with requests.Session() as session:
        times = []
        for _ in range(5):
            started = time.monotonic()
            response = session.post(
                f"{instance.url}/tasks/", data=body, headers={"Content-Type": "application/json"}
            )
            times.append(time.monotonic() - started)
            assert response.status_code == 422 and len(response.content) < 1000
    print(f"\n65,000 conversations refused in {min(times) * 1000:.1f} ms (best of 5)")
    assert min(times) < 0.05


# -- slowloris, direct and through deploy/nginx.conf ----------------------------------------


class Nginx:
    """deploy/nginx.conf as the pod's sidecar runs it (its upstream the one instance on
    localhost, deploy/nginx-upstream-pod.conf), with the ports set, run as a real nginx."""

    def __init__(self, upstream_port: int, tmp: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            pytest.fail("nginx is not installed: apt-get install nginx (tools/system_packages.sh)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        upstream = (ROOT / "deploy" / "nginx-upstream-pod.conf").read_text()
        assert "server 127.0.0.1:8000;" in upstream
        upstream = upstream.replace(":8000;", f":{upstream_port};")
        (tmp / "taskapp-upstream.conf").write_text(upstream)  # next to nginx.conf, as mounted
        text = (ROOT / "deploy" / "nginx.conf").read_text()
        assert "listen 8080;" in text
        text = text.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        # Run as this user, with everything it writes in tmp.
        temp = "".join(
            f"    {kind}_temp_path {tmp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        text = text.replace("http {\n", f"http {{\n    access_log off;\n{temp}", 1)
        self.config = tmp / "nginx.conf"
        self.config.write_text(text)
        self.command = [
            binary, "-p", str(tmp), "-c", str(self.config),
            "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Nginx:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        wait_for(
            lambda: requests.get(f"{self.url}/health", timeout=2).status_code == 200,
            what="nginx in front of the instance",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


@contextlib.contextmanager
def slowloris(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that send a request head one byte a second and never finish it."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /tasks/ HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(b"X")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield socks
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()


def served(url: str, rounds: int, timeout: float = 3) -> tuple[list[float], list[str]]:
    times, failures = [], []
    for _ in range(rounds):
        started = time.monotonic()
        try:
            response = requests.get(f"{url}/tasks/?limit=5", timeout=timeout)
            if response.status_code != 200:
                failures.append(str(response.status_code))
        except requests.RequestException as exc:
            failures.append(type(exc).__name__)
        times.append(time.monotonic() - started)
    return times, failures


def test_slowloris_starves_a_bare_instance_but_not_one_behind_nginx(instances, tmp_path):
    instance = instances(WORKER_ENABLED=0, GUNICORN_THREADS=8, MAX_EVENT_STREAMS=4)
    # Bare: 8 threads, 20 trickling heads; gunicorn gives each one a thread once it has data.
    with slowloris(instance.port, 20):
        time.sleep(2)  # past the first trickled byte, so every head holds its thread
        # A starved request never gets a thread: 1.5 s (a served one takes milliseconds), not
        # the 3 s each that the requests behind nginx are allowed.
        _, bare_failures = served(instance.url, 3, timeout=1.5)
    assert bare_failures, "a bare gthread instance was expected to be starved"
    wait_for(lambda: served(instance.url, 1)[1] == [], timeout=30, what="the instance back")
    # Behind nginx: 500 such connections, and everyone else is served as usual.
    with Nginx(instance.port, tmp_path) as nginx, slowloris(nginx.port, 500) as socks:
        time.sleep(2)
        times, failures = served(nginx.url, 100)
        # nginx gives up on them at client_header_timeout (10 s): a 408, or just closed.
        held = sum(1 for sock in socks if sock.fileno() != -1)
    p99 = statistics.quantiles(times, n=100)[98]
    print(
        f"\nslowloris: bare instance {len(bare_failures)}/3 requests failed; behind nginx with "
        f"500 connections ({held} open) 100/100 served, p50 {statistics.median(times) * 1000:.1f}"
        f" ms, p99 {p99 * 1000:.1f} ms"
    )
    assert not failures, failures
    assert p99 < 1.0
