#!/usr/bin/env bash
# Run every benchmark in turn; the result tables go to stdout (and bench/results/<date>.md),
# progress to stderr.
#   bench/run_all.sh           full run (35-45 min on 2 cores; bench.sustained alone is 10)
#   bench/run_all.sh --quick   smoke run with small counts and short runs (2-3 min)
# Needs: wrk (apt-get install -y wrk), PostgreSQL reachable as $BENCH_PG_URL
# (default postgresql://postgres@127.0.0.1:5432/postgres, a role that may create databases),
# and the dev requirements installed in the active Python (pip install -r requirements-dev.txt).
# bench.peers also installs PgQueuer and procrastinate into bench/.venv-peers on its first run
# (from the package index; see bench/requirements-peers.txt), bench.seed the seed's FastAPI
# stack into bench/.venv-seed (bench/requirements-seed.txt).
# BENCH_RESULTS_DIR: where the tables are saved (default bench/results).
# BENCH_SKIP: benchmarks to leave out, space-separated (e.g. BENCH_SKIP="peers growth").
set -euo pipefail

cd "$(dirname "$0")/.."
quick=()
case "${1:-}" in
  --quick) quick=(--quick) ;;
  "") ;;
  *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac

command -v wrk >/dev/null || { echo "wrk not found: apt-get install -y wrk" >&2; exit 2; }
python=${PYTHON:-python}
results=${BENCH_RESULTS_DIR:-bench/results}
mkdir -p "$results"
out="$results/$(date -u +%Y%m%dT%H%M%SZ)${quick:+-quick}.md"

run_all() {
  local status=0
  echo "# taskapp benchmarks $(date -u '+%Y-%m-%d %H:%M UTC')${quick:+ (quick)}"
  for bench in http drain flow pickup growth memory retention sustained inflight live_output peers seed; do
    case " ${BENCH_SKIP:-} " in
      *" $bench "*) echo "[run_all] bench.$bench skipped (BENCH_SKIP)" >&2; continue ;;
    esac
    echo "[run_all] bench.$bench" >&2
    local started=$SECONDS
    "$python" -m "bench.$bench" "${quick[@]}" || {
      status=$?
      echo "[run_all] bench.$bench failed ($status)" >&2
    }
    echo "[run_all] bench.$bench took $((SECONDS - started)) s" >&2
  done
  return "$status"
}

set +e
run_all | tee "$out"
status=${PIPESTATUS[0]}
set -e
echo "[run_all] tables saved in $out" >&2
exit "$status"
