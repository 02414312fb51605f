"""`processed` means the processor saw that content, on real gunicorn: conversations added or
edited while their task runs stay active, and a continuation run processes them."""

from __future__ import annotations

import json

import requests

from tests.support import EventLog, create_task, task_row, wait_for


def test_conversations_added_and_edited_mid_run_are_processed_only_once_seen(
    instances, db_conn, database_url, tmp_path
) -> None:
    record = tmp_path / "seen.jsonl"
    record.touch()
    instance = instances(
        TASK_PROCESSOR="tests.processors:record_contents",
        TEST_PROCESSOR_SECONDS=1,
        TEST_PROCESSOR_RECORD=record,
    )
    with EventLog(database_url) as events:
        task = create_task(instance.url, "edited mid-run", conversations=2)
        wait_for(lambda: task_row(db_conn, task["id"])["status"] == "processing", what="claim")
        first = task["conversations"][0]["id"]
        edited = requests.put(
            f"{instance.url}/conversations/{first}", json={"content": "edited"}, timeout=5
        ).json()
        added = requests.post(
            f"{instance.url}/tasks/{task['id']}/conversations/",
            json={"content": "added"},
            timeout=5,
        ).json()
        assert edited["status"] == added["status"] == "active"
        done = wait_for(
            lambda: (r := task_row(db_conn, task["id"]))["status"] == "completed" and r,
            timeout=10,
            what="completion after the continuation run",
        )
        types = [e["type"] for e in events.events(task_id=task["id"])]
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    # Two runs: the first saw the original two, the continuation the edited and the added one.
    assert [s["content"] for s in seen] == [
        "edited mid-run: conversation 0",
        "edited mid-run: conversation 1",
        "edited",
        "added",
    ]
    final = requests.get(f"{instance.url}/tasks/{task['id']}", timeout=5).json()
    for conversation in final["conversations"]:
        assert conversation["status"] == "processed"
        assert {"id": conversation["id"], "content": conversation["content"]} in seen
    assert done["attempts"] == 1  # the continuation spent no attempt
    assert types.count("task.claimed") == 2 and types.count("task.completed") == 1
    assert "task.updated" in types
