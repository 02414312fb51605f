#!/usr/bin/env bash
# Run the test suite: installs what the tests need (.venv, and Chromium and wrk with apt-get
# when missing), then runs pytest. Uses TEST_DATABASE_URL's server when set, else starts an
# embedded PostgreSQL in .pgdata-test/.
# Arguments go to pytest (e.g. ./test.sh -k queue, ./test.sh -m soak).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
source tools/venv.sh
source tools/system_packages.sh
ensure_venv
ensure_system_packages
exec .venv/bin/python -m pytest "$@"
