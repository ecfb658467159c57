#!/usr/bin/env bash
# Benchmark harness entry point: builds the release proxy and helios-perf, installs
# PgBouncer when missing (Debian package), then runs the harness.
#
#   ./perf/run.sh [--quick|--full] [--only WORKLOAD] [--list]
#
# Quick mode (default) takes about 3 minutes, full mode under 20. Results: a table on the
# terminal, target/perf/report.md and target/perf/report.json. See perf/README.md.
# Extra flags (--scale N, --duration SECS, --reps N) are passed to helios-perf.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "run.sh: pgbouncer is missing: sudo apt-get install -y pgbouncer" >&2
        exit 1
    fi
    echo "==> installing pgbouncer (apt-get)" >&2
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer
    # Debian's package may start a system instance; the harness runs its own.
    if command -v service >/dev/null 2>&1; then service pgbouncer stop >/dev/null 2>&1 || true; fi
fi
export PATH=$PATH:/usr/sbin

if ! pg_bin_dir >/dev/null; then
    echo "run.sh: PostgreSQL server binaries (initdb, postgres) not found: scripts/test.sh installs them" >&2
    exit 1
fi

echo "==> cargo build --release (heliosdb-proxy, helios-perf)" >&2
cargo build --release --bin heliosdb-proxy -p heliosdb-proxy
cargo build --release -p helios-perf

exec "$TARGET_DIR/release/helios-perf" --proxy-bin "$TARGET_DIR/release/heliosdb-proxy" \
    --out "$ROOT/target/perf" "$@"
