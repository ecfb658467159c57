#!/usr/bin/env bash
# Runs every check HeliosProxy has: rustfmt, clippy and all tests, including the end-to-end
# suite that starts private PostgreSQL servers and the real proxy binary.
#
# On a fresh Debian machine it first installs what the end-to-end tests need (PostgreSQL
# server, psql, pgbench) and, when run as root, creates the unprivileged account `helios-test`
# that the tests run initdb/postgres as (PostgreSQL refuses to run as root). It also installs
# the client drivers tests/e2e_drivers.rs runs: psycopg 3 and asyncpg in a virtualenv at
# target/drivers/venv (pinned in tests/drivers/python/requirements.txt, with the
# prometheus_client parser the admin API tests use), node-postgres by `npm ci` in
# tests/drivers/node, Debian's JDK with pgjdbc (libpostgresql-jdbc-java), curl and jq (the
# admin API tests run the drain procedure with them), and Debian's PgBouncer for the
# benchmark harness's smoke test (perf/tests/smoke.rs).
# When all of that is already there it goes straight to cargo.
#
# Environment: HELIOS_TEST_TARGET=direct runs the end-to-end scenarios against PostgreSQL
# itself (harness validation); CARGO_TARGET_DIR and RUST_TEST_THREADS are honoured.
set -euo pipefail

cd "$(dirname "$0")/.."

TEST_USER=helios-test

log() { printf '==> %s\n' "$*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as root: directly, or through passwordless sudo.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        echo "scripts/test.sh: need root (or passwordless sudo) to run: $*" >&2
        return 1
    fi
}

# shellcheck source=scripts/lib.sh
. scripts/lib.sh

have_tool() {
    local bin
    bin=$(pg_bin_dir 2>/dev/null || true)
    { [ -n "$bin" ] && [ -x "$bin/$1" ]; } || command -v "$1" >/dev/null 2>&1
}

APT_UPDATED=0
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: missing $*, and this is not a Debian-like system: install them by hand" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    # Keep the package scripts from starting a system PostgreSQL on port 5432 (the tests
    # start their own); only when no policy is in place already, and removed afterwards.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi
    local rc=0
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" || rc=$?
    if [ "$added_policy" -eq 1 ]; then
        as_root rm -f "$policy"
    fi
    return "$rc"
}

install_postgresql() {
    local missing=()
    pg_bin_dir >/dev/null 2>&1 || missing+=(postgresql)
    have_tool psql || missing+=(postgresql-client)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    # pgbench ships with the server on Debian 12, in postgresql-contrib on older releases.
    if ! have_tool pgbench; then
        apt_install postgresql-contrib
    fi
    # tests/e2e_admin_api.rs runs the API reference's drain procedure with curl and jq.
    local tools=()
    command -v curl >/dev/null 2>&1 || tools+=(curl)
    command -v jq >/dev/null 2>&1 || tools+=(jq)
    if [ "${#tools[@]}" -gt 0 ]; then
        apt_install "${tools[@]}"
    fi
    # perf/tests/smoke.rs runs the benchmark harness, which compares against PgBouncer.
    if ! have_tool pgbouncer && [ ! -x /usr/sbin/pgbouncer ]; then
        apt_install pgbouncer
        # Debian's package may start a system instance; the harness runs its own.
        as_root sh -c 'command -v service >/dev/null 2>&1 && service pgbouncer stop >/dev/null 2>&1' || true
    fi
    pg_bin_dir >/dev/null || { echo "scripts/test.sh: PostgreSQL server still missing" >&2; exit 1; }
    have_tool psql || { echo "scripts/test.sh: psql still missing" >&2; exit 1; }
    have_tool pgbench || { echo "scripts/test.sh: pgbench still missing" >&2; exit 1; }
}

# PostgreSQL will not run as root: the harness runs it as $TEST_USER, which must exist.
ensure_test_user() {
    is_root || return 0
    id -u "$TEST_USER" >/dev/null 2>&1 && return 0
    log "creating system user $TEST_USER (runs the tests' PostgreSQL servers)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$TEST_USER"
}

# --- Client drivers for tests/e2e_drivers.rs -------------------------------------------------

DRIVERS_VENV=target/drivers/venv
PY_REQUIREMENTS=tests/drivers/python/requirements.txt
NODE_DIR=tests/drivers/node
JDBC_JAR=/usr/share/java/postgresql.jar

file_hash() { sha256sum "$1" | cut -d' ' -f1; }

# psycopg 3 and asyncpg in a virtualenv; reinstalled only when requirements.txt changes.
install_python_drivers() {
    local stamp="$DRIVERS_VENV/.requirements.sha256"
    if [ -x "$DRIVERS_VENV/bin/python" ] && "$DRIVERS_VENV/bin/python" -c '' 2>/dev/null &&
        [ "$(cat "$stamp" 2>/dev/null)" = "$(file_hash "$PY_REQUIREMENTS")" ]; then
        return 0
    fi
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-venv
    elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        # Debian splits venv's pip bootstrap out of python3.
        apt_install python3-venv
    fi
    if ! { [ -x "$DRIVERS_VENV/bin/python" ] && "$DRIVERS_VENV/bin/python" -c '' 2>/dev/null; }; then
        log "creating the driver virtualenv $DRIVERS_VENV"
        rm -rf "$DRIVERS_VENV"
        mkdir -p "$(dirname "$DRIVERS_VENV")"
        python3 -m venv "$DRIVERS_VENV"
    fi
    log "pip install -r $PY_REQUIREMENTS (into $DRIVERS_VENV)"
    "$DRIVERS_VENV/bin/python" -m pip install --disable-pip-version-check --no-input -q \
        -r "$PY_REQUIREMENTS"
    file_hash "$PY_REQUIREMENTS" > "$stamp"
}

# node-postgres (and pg-copy-streams) from package-lock.json; `npm ci` only when node_modules
# is missing or was installed from another lock file.
install_node_drivers() {
    if ! command -v node >/dev/null 2>&1; then
        apt_install nodejs npm
    elif ! command -v npm >/dev/null 2>&1; then
        apt_install npm
    fi
    local stamp="$NODE_DIR/node_modules/.helios-lock.sha256"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$(file_hash "$NODE_DIR/package-lock.json")" ]; then
        return 0
    fi
    log "npm ci in $NODE_DIR"
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --loglevel=error)
    file_hash "$NODE_DIR/package-lock.json" > "$stamp"
}

# True when `java` is a JDK's: the single-file source launcher needs the jdk.compiler module.
have_jdk() {
    local modules
    modules=$(java --list-modules 2>/dev/null) || return 1
    case "$modules" in *jdk.compiler@*) return 0 ;; *) return 1 ;; esac
}

# A JDK and pgjdbc, from Debian.
install_java_drivers() {
    local missing=()
    have_jdk || missing+=(default-jdk-headless)
    [ -f "$JDBC_JAR" ] || missing+=(libpostgresql-jdbc-java)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
    have_jdk || { echo "scripts/test.sh: a JDK (java with jdk.compiler) is still missing" >&2; exit 1; }
    [ -f "$JDBC_JAR" ] || { echo "scripts/test.sh: $JDBC_JAR still missing" >&2; exit 1; }
}

install_drivers() {
    install_python_drivers
    install_node_drivers
    install_java_drivers
}

ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ "${#missing[@]}" -gt 0 ]; then
        if command -v rustup >/dev/null 2>&1; then
            log "rustup component add ${missing[*]}"
            rustup component add "${missing[@]}"
        else
            echo "scripts/test.sh: cargo ${missing[*]} missing and no rustup to add it" >&2
            exit 1
        fi
    fi
}

command -v cargo >/dev/null 2>&1 || { echo "scripts/test.sh: cargo not found" >&2; exit 1; }
install_postgresql
ensure_test_user
install_drivers
ensure_rust_components
log "PostgreSQL binaries: $(pg_bin_dir)"

log "cargo fmt --all -- --check"
cargo fmt --all -- --check

log "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test --workspace"
cargo test --workspace
