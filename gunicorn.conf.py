"""gunicorn settings: one worker process is one taskapp instance.

post_fork starts the instance's background worker; SIGTERM stops its claiming at once (and,
for DRAIN_SECONDS, the instance goes on serving requests, /readyz saying it is draining);
worker_exit lets the running task finish within SHUTDOWN_GRACE_SECONDS or hands it back,
then ends the process at once.
"""

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading

from taskapp.config import Settings

_settings = Settings.from_env()  # fail fast, in the master, on a malformed environment

bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# Threads serve requests and long-lived event streams (SSE, WebSocket) side by side.
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", str(_settings.max_event_streams + 16)))
# Long enough for the drain, the running task's grace period and the hand-back.
graceful_timeout = int(_settings.drain_seconds + _settings.shutdown_grace_seconds) + 10
timeout = 60
keepalive = 5
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOG_LEVEL", "info")
# Several instances may run side by side under one user: no shared control socket.
control_socket_disable = True

# Metrics from every worker process are summed through files in this directory.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="taskapp-metrics-")
    _own_metrics_dir = True
else:
    _own_metrics_dir = False


def post_fork(server, worker):
    from taskapp import runtime

    app = worker.app.wsgi()  # loads wsgi:app now; gunicorn reuses the same object later
    runtime.start_in_gunicorn_worker(app, preloaded=server.cfg.preload_app)


def post_worker_init(worker):
    from taskapp import runtime

    app = worker.wsgi
    instance = runtime.current(app)
    if instance is None:
        return

    def chain(signum, then, grace, drain=0.0):
        def handler(sig, frame):
            first = not instance.draining
            instance.begin_shutdown(grace)
            if drain <= 0:
                then(sig, frame)
            elif first:
                # Go on serving while the load balancer (a Kubernetes Service) notices from
                # /readyz that this instance is draining; then gunicorn stops accepting.
                later = threading.Timer(drain, then, args=(sig, None))
                later.daemon = True
                later.start()

        signal.signal(signum, handler)

    # gunicorn installs its handlers before this hook: ours run first, then gunicorn's.
    chain(signal.SIGTERM, signal.getsignal(signal.SIGTERM), None, _settings.drain_seconds)
    for quick in (signal.SIGINT, signal.SIGQUIT):
        chain(quick, signal.getsignal(quick), 0)


def worker_exit(server, worker):
    from taskapp import runtime

    app = getattr(worker, "wsgi", None)
    instance = runtime.current(app) if app is not None else None
    if instance is None:
        return
    instance.shutdown()
    # gunicorn calls this hook while its sys.exit() propagates; that tells a clean stop (0)
    # from a crash or a boot error, whose status the master must see.
    leaving = sys.exc_info()[1]
    if isinstance(leaving, SystemExit) and leaving.code in (0, None):
        # The stop is complete: tasks finished or handed back, every request answered or its
        # connection closed by gunicorn. Leave now rather than through interpreter shutdown,
        # which joins every non-daemon thread (gunicorn's request threads, one of them maybe
        # still in a stream's last write) and then spends about a second garbage-collecting
        # the heap that the OS frees at once anyway.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
