"""LOG_FORMAT=json: one JSON object per line, with instance and task ids on worker lines."""

from __future__ import annotations

import json

from tests.support import create_task, get_task, wait_for


def test_json_logs_carry_instance_and_task_ids(instances):
    instance = instances(LOG_FORMAT="json")
    task = create_task(instance.url, "logged")
    wait_for(lambda: get_task(instance.url, task["id"])["status"] == "completed")
    instance_id = instance.status()["instance_id"]

    def worker_lines() -> list[dict]:
        lines = []
        for line in instance.log().splitlines():
            if line.startswith("{") and '"logger": "taskapp.worker"' in line:
                lines.append(json.loads(line))
        return lines

    lines = wait_for(
        lambda: (
            (found := worker_lines())
            and any(e.get("task_id") == task["id"] and "completed" in e["message"] for e in found)
            and found
        ),
        what="the completion log line",
    )
    assert all(entry["instance_id"] == instance_id for entry in lines)
    about_task = [entry for entry in lines if entry.get("task_id") == task["id"]]
    assert any(entry["message"].startswith(f"task {task['id']} completed") for entry in about_task)
    for entry in about_task:
        assert {"time", "level", "logger", "message", "instance_id", "task_id"} <= set(entry)


def test_text_logs_are_the_default(instances):
    instance = instances()
    task = create_task(instance.url, "plain")
    wait_for(lambda: get_task(instance.url, task["id"])["status"] == "completed")
    wait_for(lambda: f"task {task['id']} completed" in instance.log())
    assert not any(
        line.startswith("{") for line in instance.log().splitlines() if "taskapp.worker" in line
    )
