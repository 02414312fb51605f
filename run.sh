#!/usr/bin/env bash
# Run taskapp without Docker: two instances (ports 12000, 12001) and an embedded PostgreSQL.
# Needs only Python 3.11+ (PYTHON=/path/to/python3.x picks another interpreter).
# With DATABASE_URL set, uses that database instead. Arguments go to tools/run_local.py (--help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/venv.sh
ensure_venv
exec .venv/bin/python -m tools.run_local "$@"
