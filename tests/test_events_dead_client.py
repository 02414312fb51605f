"""A stream client that vanishes without a word (its machine off, its network cut) frees its
stream slot within seconds, not when TCP gives up (~15 minutes).

Nothing on one machine's loopback stops acknowledging on its own, so the test makes a network
of its own: an instance and its clients in a fresh network namespace (`unshare --net`), whose
loopback is then taken down, as a cable pulled. The instance reaches PostgreSQL over a Unix
socket that this process forwards to the test database, so only the streams lose their
network. Run as a script, this file is the part inside the namespace.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SEND_TIMEOUT_SECONDS = 2
# Keep-alive comments far apart: TCP must find the dead peer, not the next comment's error.
KEEPALIVE_SECONDS = 30


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def postgres_over_unix_socket(database_url: str) -> Iterator[str]:
    """The database's URL through a Unix socket in a fresh directory, forwarded to its TCP
    address: reachable from any network namespace of this machine."""
    parts = urlsplit(database_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5432)
    directory = tempfile.mkdtemp(prefix="pg-", dir="/tmp")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{directory}/.s.PGSQL.5432")
    server.listen(64)
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                client, _ = server.accept()
                upstream = socket.create_connection(target)
            except OSError:
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        user = f"{parts.username}@" if parts.username else ""
        yield f"postgresql://{user}/{parts.path.lstrip('/')}?host={directory}&port=5432"
    finally:
        stopping.set()
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_a_vanished_client_frees_its_slot_within_seconds(database_url: str) -> None:
    missing = [tool for tool in ("unshare", "ip", "ss") if shutil.which(tool) is None]
    assert not missing, f"this test needs {missing} (util-linux, iproute2) and root"
    with postgres_over_unix_socket(database_url) as url:
        done = subprocess.run(
            ["unshare", "--net", sys.executable, __file__, url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print("vanished client released after", result)
    # Both streams (SSE and WebSocket) were released, each within the send timeout plus
    # keepalive's first probe and the stream's one-second look; 15 minutes without.
    assert result["open_before"] == 2 and result["open_after"] == 0, result
    assert result["seconds"] < SEND_TIMEOUT_SECONDS + 5, result


def _in_namespace(database_url: str) -> dict[str, object]:
    """Inside the fresh namespace: an instance, an SSE and a WebSocket client, a cut."""
    from websockets.sync.client import connect

    from tests.support import Instance, wait_for

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    instance = Instance(
        database_url,
        WORKER_ENABLED=0,
        EVENT_KEEPALIVE_SECONDS=KEEPALIVE_SECONDS,
        EVENT_SEND_TIMEOUT_SECONDS=SEND_TIMEOUT_SECONDS,
    ).start()
    try:
        sse = socket.create_connection(("127.0.0.1", instance.port))
        sse.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        assert b"200 OK" in sse.recv(4096)
        ws = connect(f"ws://127.0.0.1:{instance.port}/ws", ping_interval=None)

        def streams() -> int:
            return int(instance.status()["event_streams"]["open"])

        wait_for(lambda: streams() == 2, what="both streams")
        open_before = streams()
        subprocess.run(["ip", "link", "set", "lo", "down"], check=True)
        cut = time.monotonic()
        # The instance's own sockets of the streams (source port = its port) are gone once
        # TCP gave up on the peer; the streams notice within their one-second look.
        query = ["ss", "-tnH", "state", "established", f"( sport = :{instance.port} )"]
        while subprocess.run(query, capture_output=True, text=True).stdout.strip():
            assert time.monotonic() - cut < 20, "TCP did not give up on the vanished peer"
            time.sleep(0.1)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        wait_for(lambda: streams() == 0, timeout=10, what="the streams' slots")
        seconds = time.monotonic() - cut
        with contextlib.suppress(Exception):
            ws.close()
        sse.close()
        return {"open_before": open_before, "open_after": streams(), "seconds": seconds}
    finally:
        instance.stop(timeout=20)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_in_namespace(sys.argv[1])))
