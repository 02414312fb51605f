# Sourced by test.sh: the Debian packages some tests drive (Chromium for the dashboard's browser
# tests, wrk for the benchmarks' smoke test, nginx for the slowloris test through
# deploy/nginx.conf, PgBouncer for tests/test_pgbouncer.py, Java for openapi-generator in
# tests/test_generated_clients.py), installed with apt-get when
# missing and possible.
# Where they can't be installed, those tests fail saying what is missing; none is skipped.

SYSTEM_PACKAGES=(chromium chromium-driver wrk nginx pgbouncer default-jre-headless)

ensure_system_packages() {
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
        && command -v wrk >/dev/null \
        && { command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null \
        && { command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ]; } \
        && command -v java >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing ${SYSTEM_PACKAGES[*]} with apt-get"
        apt-get update -qq && apt-get install -y -qq "${SYSTEM_PACKAGES[@]}" >/dev/null && return 0
    fi
    echo "warning: could not install ${SYSTEM_PACKAGES[*]} (needs root and apt-get);" \
        "the browser, benchmark, PgBouncer and generated-client tests will fail until they are installed" >&2
}
