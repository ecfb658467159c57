#!/usr/bin/env bash
# Quick start: builds the release proxy, starts a private PostgreSQL under
# target/quickstart-pg, puts HeliosProxy in front of it on 127.0.0.1:6432 (admin
# 127.0.0.1:9090), runs a short pgbench through the proxy, prints how to connect, and waits.
# Ctrl-C stops the proxy and PostgreSQL.
#
# Needs PostgreSQL's server binaries (initdb, postgres, pgbench, psql): scripts/test.sh
# installs them on Debian. Under root, PostgreSQL runs as the unprivileged user helios-test
# (created if missing), since it refuses to run as root.
#
# Environment:
#   QUICKSTART_NO_WAIT=1     stop everything right after the demo instead of waiting
#   QUICKSTART_LISTEN=ADDR   proxy address (default 127.0.0.1:6432)
#   QUICKSTART_ADMIN=ADDR    admin address (default 127.0.0.1:9090)
#   QUICKSTART_PROXY_BIN=P   use this proxy binary instead of building one
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
QS_DIR=$ROOT/target/quickstart-pg
CONFIG=$ROOT/target/quickstart.toml
PROXY_LOG=$ROOT/target/quickstart-proxy.log
LISTEN=${QUICKSTART_LISTEN:-127.0.0.1:6432}
ADMIN=${QUICKSTART_ADMIN:-127.0.0.1:9090}
DB_USER=app
DB_PASSWORD=quickstart
DB_NAME=app
RUN_AS_USER=helios-test

PG_PID=""
PROXY_PID=""

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'quickstart: %s\n' "$*" >&2; exit 1; }

# Sends $2 to process $1, waits up to $3 seconds, then SIGKILLs it.
stop_pid() {
    local pid=$1 sig=$2 limit=$3 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill "-$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "quickstart: pid $pid ignored SIG$sig for ${limit}s, killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$PROXY_PID" ]; then
        log "stopping the proxy (pid $PROXY_PID)"
        stop_pid "$PROXY_PID" TERM 15
    fi
    if [ -n "$PG_PID" ]; then
        log "stopping PostgreSQL (pid $PG_PID)"
        stop_pid "$PG_PID" INT 30
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# A client program beside the server binaries, else from PATH.
pg_tool() {
    if [ -x "$PG_BIN/$1" ]; then echo "$PG_BIN/$1"; else command -v "$1" || die "$1 not found"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local i port
    for ((i = 0; i < 50; i++)); do
        port=$((20000 + RANDOM % 20000))
        if ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found in 50 tries"
}

# Runs a server program as the unprivileged account when we are root.
as_pg() {
    if [ -n "${PG_UID:-}" ]; then
        setpriv --reuid="$PG_UID" --regid="$PG_GID" --init-groups -- "$@"
    else
        "$@"
    fi
}

# --- build ----------------------------------------------------------------------------------
if [ -n "${QUICKSTART_PROXY_BIN:-}" ]; then
    PROXY_BIN=$QUICKSTART_PROXY_BIN
else
    log "cargo build --release"
    cargo build --release --bin heliosdb-proxy
    PROXY_BIN=$TARGET_DIR/release/heliosdb-proxy
fi
[ -x "$PROXY_BIN" ] || die "no proxy binary at $PROXY_BIN"

PG_BIN=$(pg_bin_dir) || die "PostgreSQL server binaries (initdb, postgres) not found: run scripts/test.sh or apt-get install postgresql"
PSQL=$(pg_tool psql)
PGBENCH=$(pg_tool pgbench)
for addr in "$LISTEN" "$ADMIN"; do
    port_in_use "${addr##*:}" && die "port ${addr##*:} is taken: stop what listens there or set QUICKSTART_LISTEN/QUICKSTART_ADMIN"
done

# --- PostgreSQL -----------------------------------------------------------------------------
if [ "$(id -u)" -eq 0 ]; then
    if ! id -u "$RUN_AS_USER" >/dev/null 2>&1; then
        log "creating system user $RUN_AS_USER (PostgreSQL refuses to run as root)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$RUN_AS_USER"
    fi
    PG_UID=$(id -u "$RUN_AS_USER")
    PG_GID=$(id -g "$RUN_AS_USER")
fi

if [ -f "$QS_DIR/data/postmaster.pid" ]; then
    old_pid=$(head -n 1 "$QS_DIR/data/postmaster.pid")
    if kill -0 "$old_pid" 2>/dev/null; then
        die "an earlier quickstart PostgreSQL still runs (pid $old_pid): stop it with: kill -INT $old_pid"
    fi
fi
rm -rf "$QS_DIR"
mkdir -p "$QS_DIR"
chmod 700 "$QS_DIR"
if [ -n "${PG_UID:-}" ]; then
    chown "$PG_UID:$PG_GID" "$QS_DIR"
    if ! as_pg test -w "$QS_DIR"; then
        # The checkout's parent directories are closed to other users: use a temp dir instead.
        rm -rf "$QS_DIR"
        QS_DIR=$(mktemp -d /tmp/helios-quickstart-pg.XXXXXX)
        chown "$PG_UID:$PG_GID" "$QS_DIR"
        log "$RUN_AS_USER cannot reach target/; PostgreSQL lives in $QS_DIR instead"
    fi
fi

PG_PORT=$(free_port)
printf '%s\n' "$DB_PASSWORD" >"$QS_DIR/pwfile"
chmod 600 "$QS_DIR/pwfile"
[ -n "${PG_UID:-}" ] && chown "$PG_UID:$PG_GID" "$QS_DIR/pwfile"
log "initdb $QS_DIR/data"
(cd "$QS_DIR" && as_pg "$PG_BIN/initdb" -D "$QS_DIR/data" -U "$DB_USER" --pwfile="$QS_DIR/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C --no-sync --no-instructions \
    >"$QS_DIR/initdb.log" 2>&1) || { cat "$QS_DIR/initdb.log" >&2; die "initdb failed"; }
rm -f "$QS_DIR/pwfile"
cat >>"$QS_DIR/data/postgresql.conf" <<EOF

# quickstart
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$QS_DIR'
max_connections = 100
EOF

log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
cd "$QS_DIR"
# A simple command (not a function) so that $! is postgres itself: setpriv execs it.
if [ -n "${PG_UID:-}" ]; then
    setpriv --reuid="$PG_UID" --regid="$PG_GID" --init-groups -- \
        "$PG_BIN/postgres" -D "$QS_DIR/data" >"$QS_DIR/postgres.log" 2>&1 &
else
    "$PG_BIN/postgres" -D "$QS_DIR/data" >"$QS_DIR/postgres.log" 2>&1 &
fi
PG_PID=$!
cd "$ROOT"
ready=0
for ((i = 0; i < 300; i++)); do
    kill -0 "$PG_PID" 2>/dev/null || { cat "$QS_DIR/postgres.log" >&2; die "PostgreSQL exited"; }
    if "$PSQL" -X -h "$QS_DIR" -p "$PG_PORT" -U "$DB_USER" -d postgres -Atc 'SELECT 1' >/dev/null 2>&1; then
        ready=1
        break
    fi
    sleep 0.1
done
[ "$ready" -eq 1 ] || { cat "$QS_DIR/postgres.log" >&2; die "PostgreSQL not ready after 30 s"; }
"$PSQL" -X -q -h "$QS_DIR" -p "$PG_PORT" -U "$DB_USER" -d postgres -c "CREATE DATABASE $DB_NAME" >/dev/null

# --- proxy ----------------------------------------------------------------------------------
cat >"$CONFIG" <<EOF
# Written by scripts/quickstart.sh: the proxy in front of the private PostgreSQL.
listen_address = "$LISTEN"
admin_address = "$ADMIN"

[pool_mode]
max_pool_size = 20

[[nodes]]
name = "quickstart"
host = "127.0.0.1"
port = $PG_PORT
role = "primary"

[[users]]
name = "$DB_USER"
password = "$DB_PASSWORD"
EOF
"$PROXY_BIN" --config "$CONFIG" --check-config >/dev/null || die "the generated $CONFIG does not validate"

log "starting heliosdb-proxy on $LISTEN (log: $PROXY_LOG)"
RUST_LOG=${RUST_LOG:-info} "$PROXY_BIN" --config "$CONFIG" >"$PROXY_LOG" 2>&1 &
PROXY_PID=$!
ready=0
for ((i = 0; i < 300; i++)); do
    kill -0 "$PROXY_PID" 2>/dev/null || { cat "$PROXY_LOG" >&2; die "the proxy exited"; }
    if port_in_use "${LISTEN##*:}"; then
        ready=1
        break
    fi
    sleep 0.1
done
[ "$ready" -eq 1 ] || { cat "$PROXY_LOG" >&2; die "the proxy is not accepting after 30 s"; }

# --- demo -----------------------------------------------------------------------------------
PROXY_HOST=${LISTEN%:*}
PROXY_PORT=${LISTEN##*:}
export PGPASSWORD=$DB_PASSWORD
log "pgbench -i -s 1 through the proxy"
"$PGBENCH" -h "$PROXY_HOST" -p "$PROXY_PORT" -U "$DB_USER" -i -s 1 -q "$DB_NAME"
log "pgbench -S -T 5 -c 4 -j 2 through the proxy"
"$PGBENCH" -h "$PROXY_HOST" -p "$PROXY_PORT" -U "$DB_USER" -S -T 5 -c 4 -j 2 "$DB_NAME"
unset PGPASSWORD

cat <<EOF

HeliosProxy is running on $LISTEN in front of PostgreSQL on 127.0.0.1:$PG_PORT.
Connect with:

    PGPASSWORD=$DB_PASSWORD psql "host=$PROXY_HOST port=$PROXY_PORT user=$DB_USER dbname=$DB_NAME"

Config: $CONFIG    Proxy log: $PROXY_LOG    PostgreSQL: $QS_DIR
EOF

if [ "${QUICKSTART_NO_WAIT:-0}" = "1" ]; then
    log "QUICKSTART_NO_WAIT=1: stopping"
    exit 0
fi
echo "Press Ctrl-C to stop the proxy and PostgreSQL."
wait "$PROXY_PID" || true
log "the proxy exited"
