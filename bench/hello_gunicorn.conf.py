"""gunicorn settings for the hello-world baseline: exactly taskapp's gunicorn.conf.py settings
(worker class, threads, workers, keepalive, timeouts, logging), without its hooks that start
taskapp's background worker."""

import os
import runpy
import tempfile
from pathlib import Path

# gunicorn.conf.py makes a metrics directory when none is set; give it a throwaway one.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.gettempdir())
_root = os.environ.get("BENCH_TASKAPP_ROOT") or Path(__file__).resolve().parent.parent
_taskapp = runpy.run_path(str(Path(_root) / "gunicorn.conf.py"))

for _name, _value in _taskapp.items():
    if not _name.startswith("_") and isinstance(_value, str | int | float | bool | type(None)):
        globals()[_name] = _value
