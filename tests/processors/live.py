"""Processors that report as they go: progress and live output, slowly enough to watch.

Selected with TASK_PROCESSOR=tests.processors.live:NAME.
"""

from __future__ import annotations

import os

from taskapp.processor import Context, TaskSnapshot

CHUNKS = 5


def emit_slowly(task: TaskSnapshot, context: Context) -> dict[str, int]:
    """For each conversation, emit CHUNKS chunks of live output (`"<content> #k; "`), waiting
    TEST_PROCESSOR_SECONDS (default 0.2) before each and reporting progress after each, then
    checkpoint it with its number of chunks. Stops (Cancelled) once the task is cancelled."""
    seconds = float(os.environ.get("TEST_PROCESSOR_SECONDS", "0.2"))
    total = CHUNKS * len(task.conversations)
    done = 0
    for conversation in task.conversations:
        for k in range(CHUNKS):
            if context.wait(seconds):
                context.raise_if_cancelled()
            context.emit(conversation.id, f"{conversation.content} #{k}; ")
            done += 1
            context.progress(done, total, f"conversation {conversation.id}: chunk {k + 1}")
        context.checkpoint(conversation.id, {"chunks": CHUNKS})
    return {"chunks": done, "conversations": len(task.conversations)}
