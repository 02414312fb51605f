"""Take docs/dashboard.png: the dashboard while two instances work through 50 tasks.

    python docs/screenshot.py [--server-url postgresql://postgres@127.0.0.1:5432/postgres]

It creates a scratch database on that PostgreSQL server (default: $TEST_DATABASE_URL), starts
two gunicorn instances on it (1-2 s of simulated work per task), opens the dashboard in
headless Chromium (see tests/browser.py), creates 50 tasks, cancels two of them, and takes the
screenshot once most are done while both instances are still busy. Everything it started is
stopped and the database dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

import psycopg
import requests
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import chromium, missing_browser  # noqa: E402
from tests.support import Instance, wait_for  # noqa: E402

TASKS = 50
SHOOT_AT_COMPLETED = 36  # late enough for a chart, early enough that both are still working
WORDS = ["invoice", "report", "thumbnail", "email digest", "export", "sync", "index", "backup"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server-url", default=os.environ.get("TEST_DATABASE_URL"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    if not args.server_url:
        parser.error("--server-url (or TEST_DATABASE_URL) must name a PostgreSQL server")
    if reason := missing_browser():
        parser.error(reason)

    name = f"taskapp_shot_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = args.server_url.rpartition("/")
    started: list[Instance] = []
    try:
        env = {"PROCESSING_MIN_SECONDS": 1, "PROCESSING_MAX_SECONDS": 2}
        first = Instance(f"{base}/{name}", **env).start()
        started.append(first)
        started.append(Instance(f"{base}/{name}", **env).start())
        shoot(first.url, args.out)
    finally:
        for instance in started:
            instance.stop(timeout=20)
        with psycopg.connect(args.server_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    print(f"wrote {args.out}")
    return 0


def shoot(url: str, out: Path) -> None:
    with chromium(width=1440, height=1200) as driver:
        driver.get(f"{url}/dashboard/")
        wait_for(
            lambda: (
                driver.execute_script("return document.getElementById('connection').dataset.mode")
                == "live"
            ),
            what="the dashboard's event stream",
        )
        for n in range(1, TASKS + 1):
            body = {
                "title": f"{WORDS[n % len(WORDS)]} #{n}",
                "priority": (n * 7) % 4,
                "conversations": [{"content": f"step {i} of task {n}"} for i in range(n % 3 + 1)],
            }
            requests.post(f"{url}/tasks/", json=body, timeout=10).raise_for_status()
        for task_id in (TASKS - 1, TASKS - 4):
            requests.post(f"{url}/tasks/{task_id}/cancel", timeout=10)

        def busy_and_far_enough() -> bool:
            status = requests.get(f"{url}/status", timeout=5).json()
            working = [i for i in status["instances"] if i["current_tasks"]]
            return status["queue"]["completed"] >= SHOOT_AT_COMPLETED and len(working) == 2

        wait_for(busy_and_far_enough, timeout=120, interval=0.2, what="both instances busy")
        time.sleep(0.8)  # let the page's debounced refresh catch up with what /status said
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1440, height + 120)
        time.sleep(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))


if __name__ == "__main__":
    sys.exit(main())
