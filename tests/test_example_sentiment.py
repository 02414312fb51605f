"""The example processor (examples/sentiment.py) end to end, on real gunicorn: VADER scores
each conversation sentence by sentence as live output, checkpoints it, reports progress, and
the task's result sums them up."""

from __future__ import annotations

import requests

from tests.support import wait_for
from tests.test_events import SseClient


def test_the_sentiment_example_scores_each_conversation_and_sums_up(instances) -> None:
    instance = instances(TASK_PROCESSOR="examples.sentiment:process")
    stream = SseClient(f"{instance.url}/events")
    wait_for(lambda: stream.comments, what="the stream to open")
    body = {
        "title": "feedback",
        "conversations": [
            {"content": "I love this app, it is wonderful and so fast!"},
            {"content": "This is terrible. I hate it, it crashes all the time."},
        ],
    }
    created = requests.post(f"{instance.url}/tasks/", json=body, timeout=10).json()
    task = wait_for(
        lambda: (
            (t := requests.get(f"{instance.url}/tasks/{created['id']}", timeout=5).json())["status"]
            == "completed"
            and t
        ),
        timeout=20,
        what="the task completed",
    )
    positive, negative = (c["result"] for c in task["conversations"])
    assert positive["sentiment"] == "positive" and positive["compound"] > 0.5
    assert negative["sentiment"] == "negative" and negative["compound"] < -0.5
    assert all(c["status"] == "processed" and c["processed_at"] for c in task["conversations"])
    assert {k: task["progress"][k] for k in ("done", "total")} == {"done": 2, "total": 2}
    second = task["conversations"][1]["id"]
    lines = [
        stream.wait_for_event(type="conversation.output", conversation_id=second)["output"]
        for _ in range(2)
    ]
    stream.close()
    assert [line["seq"] for line in lines] == [0, 1]
    assert lines[0]["text"].startswith("-") and "negative: This is terrible." in lines[0]["text"]
    assert lines[1]["text"].endswith("I hate it, it crashes all the time.\n")
    summary = task["result"]
    assert (summary["conversations"], summary["positive"], summary["negative"]) == (2, 1, 1)
    assert summary["mean_compound"] == round((positive["compound"] + negative["compound"]) / 2, 4)
