"""gunicorn settings: one worker process is one taskapp instance.

At start, with AUTO_MIGRATE on, the master connects to the database once: if it can't, it says
so in one line and exits 3 before any worker is forked (a worker that still finds it
unreachable says the same and exits 3, which makes gunicorn stop instead of forking another).

With CPU_AFFINITY, pre_fork picks each worker's CPU and post_fork pins the worker to it before
anything else (taskapp/affinity.py). post_fork starts the instance's background worker;
SIGTERM stops its claiming at once (and, for DRAIN_SECONDS, the instance goes on serving
requests, /readyz saying it is draining);
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

from taskapp import DatabaseUnreachable, affinity, logs, probe_database, tracing
from taskapp.config import ConfigError, Settings

# gunicorn's exit status for a worker that failed to boot: it stops rather than fork again.
BOOT_ERROR = 3

try:
    _settings = Settings.from_env()  # fail fast, in the master, on a malformed environment
except ConfigError as exc:
    sys.exit(f"taskapp: {exc}")  # one line (gunicorn would print a traceback)
logs.configure(_settings, instance=False)  # the master is no instance: no instance id

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
# LOG_FORMAT for gunicorn's own lines too; with text, its usual access line and the request id.
logger_class = logs.GunicornLogger
access_log_format = (
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({x-request-id}o)s'
)
# Several instances may run side by side under one user: no shared control socket.
control_socket_disable = True

# Metrics from every worker process are summed through files in this directory.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="taskapp-metrics-")
    _own_metrics_dir = True
else:
    _own_metrics_dir = False


def on_starting(server):
    if not _settings.auto_migrate:
        return  # it can start without the database, and waits for it (/readyz says so)
    try:
        probe_database(_settings)
    except DatabaseUnreachable as exc:
        logging.getLogger("taskapp").error("%s", exc)
        on_exit(server)
        sys.exit(BOOT_ERROR)


def pre_fork(server, worker):
    if _settings.cpu_affinity:
        taken = (getattr(w, "taskapp_cpu", None) for w in server.WORKERS.values())
        worker.taskapp_cpu = affinity.choose(_settings.cpu_affinity, taken)


# A stop signal that reaches a worker while post_fork runs (it loads the app and starts the
# instance's threads, a good part of a second): gunicorn gives the worker its own handlers only
# after this hook, and until then the master's, copied by the fork, queue a signal where nothing
# reads it. The worker then ran on until the master killed it at graceful_timeout, its claims
# left to their leases. Noted here; post_worker_init sends them again.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
_early_signals: list[int] = []


def _note_early_signal(signum, frame):
    _early_signals.append(signum)


def _deliver_early_signals():
    for signum in _early_signals:
        os.kill(os.getpid(), signum)
    _early_signals.clear()


def post_fork(server, worker):
    for signum in _STOP_SIGNALS:  # first: the imports below take a while
        signal.signal(signum, _note_early_signal)
    from taskapp import runtime

    cpu = getattr(worker, "taskapp_cpu", None)
    if cpu is not None:
        # First: every thread the instance starts from here on inherits it.
        affinity.pin(cpu)
        logging.getLogger("taskapp").info("worker process pinned to CPU %d (CPU_AFFINITY)", cpu)
    try:
        app = worker.app.wsgi()  # loads wsgi:app now; gunicorn reuses the same object later
    except DatabaseUnreachable as exc:
        logging.getLogger("taskapp").error("%s", exc)
        sys.exit(BOOT_ERROR)
    runtime.start_in_gunicorn_worker(app, preloaded=server.cfg.preload_app)


def post_worker_init(worker):
    from taskapp import runtime

    app = worker.wsgi
    instance = runtime.current(app)
    if instance is None:
        _deliver_early_signals()  # to gunicorn's own handlers
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
    _deliver_early_signals()


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
        tracing.shutdown()  # the spans still buffered
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
