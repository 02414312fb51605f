"""The README, as a new user runs it: its "Try it" block and its by-hand command, executed.

The Try-it block is taken from README.md and run by bash as one script against two fresh
instances started the way ./run.sh starts them (tools.run_local, on an empty database that
they migrate), with only the ports changed. Each call's status is written in the comment
above it (`# 201: ...`); the script records what every call got and the test compares.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests
from psycopg import sql

from tests.support import ROOT, free_port, wait_for
from tests.test_run_local import RunLocal, copy_checkout

README = ROOT / "README.md"
# The ports the README's examples use, one per instance of ./run.sh.
README_PORTS = (12000, 12001)
# A call is a line that starts with curl (continued by trailing backslashes); its status is
# the one comment line above it that starts with three digits.
STATUS_COMMENT = re.compile(r"^#\s*(\d{3})\b")
# The whole block, waits included: the built-in processor takes 6 to 7 s a task.
SCRIPT_TIMEOUT_SECONDS = 180


def section(markdown: str, heading: str) -> str:
    """The text of the `## heading` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def bash_blocks(markdown: str) -> list[str]:
    """The ```bash fenced blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```$", markdown, re.M | re.S)


@dataclass
class Call:
    """One curl command of the block: where it starts, its text, the status the README shows."""

    line: int  # index of its first line in the block
    text: str
    expected: int


def parse_calls(block: str) -> list[Call]:
    """Every curl command and its documented status; fails on a call without exactly one."""
    lines = block.splitlines()
    calls = []
    n = 0
    while n < len(lines):
        if not lines[n].startswith("curl "):
            n += 1
            continue
        start = n
        while lines[n].endswith("\\"):
            n += 1
        comments = []
        above = start - 1
        while above >= 0 and lines[above].startswith("#"):
            comments.append(lines[above])
            above -= 1
        statuses = [int(m.group(1)) for c in comments if (m := STATUS_COMMENT.match(c))]
        text = "\n".join(lines[start : n + 1])
        assert len(statuses) == 1, f"want one '# <status>' comment above:\n{text}\n{comments}"
        calls.append(Call(start, text, statuses[0]))
        n += 1
    return calls


# Defined before the block: runs one call with curl's own -w to learn its status, prints what
# it answered, and notes "<call> <status> <curl's exit status>" in $TRYIT_RESULTS. A curl
# ended by its own --max-time (28) still got its status.
CHECK_FUNCTION = textwrap.dedent(
    """\
    __call() {
        local n=$1; shift
        local body rc
        body=$("$@" --silent --show-error --write-out '\\n%{http_code}')
        rc=$?
        printf '%s %s %s\\n' "$n" "${body##*$'\\n'}" "$rc" >>"$TRYIT_RESULTS"
        printf -- '--- call %s: %s\\n%s\\n' "$n" "${body##*$'\\n'}" "${body%$'\\n'*}"
    }
    """
)


def script_for(block: str, calls: list[Call], ports: tuple[int, int]) -> str:
    """The block as a script: each call goes through __call, the README's ports replaced."""
    lines = block.splitlines()
    for number, call in enumerate(calls):
        lines[call.line] = f"__call {number} {lines[call.line]}"
    script = "\n".join(lines)
    for readme_port, port in zip(README_PORTS, ports, strict=True):
        script = script.replace(f"localhost:{readme_port}", f"127.0.0.1:{port}")
    assert "localhost" not in script, "a call the ports were not substituted in"
    return CHECK_FUNCTION + script + "\n"


@pytest.fixture
def empty_database_url(server_url: str) -> Iterator[str]:
    """A database with no schema (the instances migrate it at start), dropped afterwards."""
    name = f"taskapp_tryit_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield server_url.rpartition("/")[0] + "/" + name
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_the_try_it_calls_are_all_found_with_their_statuses() -> None:
    blocks = bash_blocks(section(README.read_text(), "Try it"))
    assert len(blocks) == 1
    calls = parse_calls(blocks[0])
    assert len(calls) >= 20
    # Not only successes: the block shows what a 404, a 409 and a 422 look like.
    assert {404, 409, 422} <= {call.expected for call in calls}


def test_the_try_it_block_runs_top_to_bottom_on_a_fresh_database(
    empty_database_url: str, tmp_path: Path
) -> None:
    block = bash_blocks(section(README.read_text(), "Try it"))[0]
    calls = parse_calls(block)
    ports = (free_port(), free_port())
    script = tmp_path / "tryit.sh"
    script.write_text(script_for(block, calls, ports))
    results = tmp_path / "results"

    # As ./run.sh runs it, on the database given: the default processor, its 6 to 7 s included.
    env = {"DATABASE_URL": empty_database_url}
    with RunLocal(["--ports", ",".join(map(str, ports))], env=env) as launcher:
        launcher.wait_banner()
        try:
            run = subprocess.run(
                ["bash", str(script)],
                env={**os.environ, "TRYIT_RESULTS": str(results)},
                capture_output=True,
                text=True,
                timeout=SCRIPT_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # a wait for a state that never came
            pytest.fail(f"the block did not finish in {exc.timeout}s:\n{exc.stdout!r}")
        assert launcher.stop() == 0, launcher.text()
    transcript = f"{run.stdout}\n{run.stderr}"
    assert run.returncode == 0, transcript

    got = [line.split() for line in results.read_text().splitlines()]
    assert [int(n) for n, _, _ in got] == list(range(len(calls))), transcript
    wrong = [
        f"call {n} got {status} (curl exit {rc}), the README says {calls[int(n)].expected}:\n"
        f"{calls[int(n)].text}"
        for n, status, rc in got
        if status != str(calls[int(n)].expected) or rc not in ("0", "28")
    ]
    assert not wrong, "\n".join(wrong) + "\n\n" + transcript


def parent_pid(pid: int) -> int:
    """The parent of a process (Linux /proc)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


BY_HAND_URL = "postgresql://user:password@localhost:5432/taskdb"


def test_the_by_hand_command_runs_as_written_in_a_fresh_clone(
    empty_database_url: str, tmp_path: Path
) -> None:
    run_it = section(README.read_text(), "Run it")
    intro = "One instance by hand"
    assert intro in run_it
    block = bash_blocks(run_it[run_it.index(intro) :])[0]
    assert BY_HAND_URL in block
    clone = copy_checkout(tmp_path / "clone")
    port = free_port()
    log = tmp_path / "by-hand.log"
    # Literally, the placeholder database aside; PORT is what the comment says it serves on.
    command = block.replace(BY_HAND_URL, empty_database_url)
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    with open(log, "wb") as output:
        shell = subprocess.Popen(
            ["bash", "-c", command],
            cwd=clone,
            env={**env, "PORT": str(port)},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so the test can stop gunicorn and its workers at once
        )
    try:

        def healthy() -> bool:
            assert shell.poll() is None, log.read_text(errors="replace")
            return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200

        wait_for(healthy, timeout=240, interval=0.5, what="the by-hand instance's /health")
        created = requests.post(
            f"http://127.0.0.1:{port}/tasks/", json={"title": "by hand"}, timeout=10
        )
        assert created.status_code == 201, created.text
        # The clone's own venv serves, not this test's.
        worker = requests.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["pid"]
        master = parent_pid(worker)
        command_line = Path(f"/proc/{master}/cmdline").read_text().split("\0")
        assert command_line[0].startswith(f"{clone}/.venv/bin/python"), command_line
        # gunicorn's master stops gracefully on SIGTERM; the shell then ends with its status.
        os.kill(master, signal.SIGTERM)
        assert shell.wait(timeout=60) == 0, log.read_text(errors="replace")
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait()
