# One taskapp container: `gunicorn -c gunicorn.conf.py wsgi:app` on port 8000 (PORT).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8000

WORKDIR /app

# Dependencies first, in their own layer, so code changes don't reinstall them.
# Runtime only: requirements-dev.txt (tests, embedded PostgreSQL) stays out of the image.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY wsgi.py gunicorn.conf.py ./
COPY migrations/ migrations/
COPY taskapp/ taskapp/
# The `taskapp` command (`docker compose exec app1 taskapp list`), run from /app's package and
# talking to this container's own instance unless TASKAPP_URL says otherwise. A wrapper, not
# `pip install .`: the image installs the pinned runtime requirements and nothing else.
RUN printf '#!/bin/sh\nexport PYTHONPATH=/app\nTASKAPP_URL="${TASKAPP_URL:-http://127.0.0.1:${PORT:-8000}}" exec python -m taskapp.cli "$@"\n' \
        >/usr/local/bin/taskapp && chmod 755 /usr/local/bin/taskapp

# The files stay root-owned and read-only to the service user.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin app
USER app

EXPOSE 8000

# The slim image has no curl; /health answers 503 (urlopen raises) when the database is away.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4)"]

# gunicorn is PID 1 and gets `docker stop`'s SIGTERM itself: a graceful stop of every instance.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
