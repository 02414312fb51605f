"""The example processor (examples/sentiment.py) end to end, on real gunicorn: VADER scores
each conversation, checkpoints it, and the task's result sums them up."""

from __future__ import annotations

import requests

from tests.support import wait_for


def test_the_sentiment_example_scores_each_conversation_and_sums_up(instances) -> None:
    instance = instances(TASK_PROCESSOR="examples.sentiment:process")
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
    summary = task["result"]
    assert (summary["conversations"], summary["positive"], summary["negative"]) == (2, 1, 1)
    assert summary["mean_compound"] == round((positive["compound"] + negative["compound"]) / 2, 4)
