"""Example processors: run the stack with one, e.g. TASK_PROCESSOR=examples.sentiment:process."""
