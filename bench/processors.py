"""Processors the benchmarks run in taskapp instances (TASK_PROCESSOR=bench.processors:NAME).

Imported by gunicorn from the repository root (bench/live_output.py puts it on PYTHONPATH).
"""

from __future__ import annotations

import json
import time

from taskapp.processor import Context, TaskSnapshot


def emit_timestamps(task: TaskSnapshot, context: Context) -> dict[str, int]:
    """Live output whose chunks carry the wall clock at their emit: for each conversation,
    `chunks` chunks `"<k> <time.time()>\\n"`, `interval` seconds apart (both from the task's
    description, JSON: {"chunks": 200, "interval": 0.01}), then a checkpoint."""
    params = json.loads(task.description or "{}")
    chunks = int(params.get("chunks", 200))
    interval = float(params.get("interval", 0.0))
    for conversation in task.conversations:
        for k in range(chunks):
            context.emit(conversation.id, f"{k} {time.time():.6f}\n")
            if interval and context.wait(interval):
                context.raise_if_cancelled()
        context.checkpoint(conversation.id, {"chunks": chunks})
    return {"chunks": chunks * len(task.conversations)}
