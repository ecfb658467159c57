# Shared by scripts/test.sh and scripts/quickstart.sh (sourced, not run).

# The newest /usr/lib/postgresql/*/bin with initdb and postgres, else initdb's directory on PATH.
pg_bin_dir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    if command -v initdb >/dev/null 2>&1; then
        dir=$(dirname "$(readlink -f "$(command -v initdb)")")
        if [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    fi
    return 1
}
