"""Shared by the Python driver scenario programs: settings from the environment, unique
object names, a scenario runner printing `ok NAME` / `FAIL NAME: reason`, and a watchdog
that bounds the whole run.

Environment: HELIOS_HOST, HELIOS_PORT, HELIOS_USER, HELIOS_PASSWORD, HELIOS_DB (where to
connect), HELIOS_TAG (suffix for table and channel names so concurrent runs never share
objects), HELIOS_TIMEOUT_SECS (overall bound, default 120), HELIOS_ONLY (comma-separated
scenario names to run, default all), HELIOS_KNOWN_GAPS (comma-separated scenarios known to
fail on this target: their failure prints `xfail NAME: reason` and does not count, and their
passing is a failure, so the list is kept up to date).
"""

import os
import re
import sys
import threading
import time
import traceback

HOST = os.environ.get("HELIOS_HOST", "127.0.0.1")
PORT = int(os.environ.get("HELIOS_PORT", "5432"))
USER = os.environ.get("HELIOS_USER", "helios")
PASSWORD = os.environ.get("HELIOS_PASSWORD", "")
DB = os.environ.get("HELIOS_DB", "app")
TAG = re.sub(r"[^a-z0-9_]", "_", os.environ.get("HELIOS_TAG", "local").lower())
TIMEOUT_SECS = float(os.environ.get("HELIOS_TIMEOUT_SECS", "120"))
ONLY = {s for s in os.environ.get("HELIOS_ONLY", "").split(",") if s}
KNOWN_GAPS = {s for s in os.environ.get("HELIOS_KNOWN_GAPS", "").split(",") if s}

# What RESET and RESET ALL return to on a connection that sent no startup parameters for
# them: the test cluster's server defaults of application_name, search_path and
# statement_timeout (PostgreSQL's built-in defaults).
SERVER_DEFAULTS = ("", '"$user", public', "0")


def name(driver, what):
    """A table or channel name unique to this driver, run tag and scenario."""
    return f"drv_{driver}_{TAG}_{what}"


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def check_eq(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def sqlstate_of(exc):
    """SQLSTATE of a driver exception (psycopg: .sqlstate, asyncpg: .sqlstate)."""
    return getattr(exc, "sqlstate", None) or getattr(getattr(exc, "diag", None), "sqlstate", None)


def expect_error(sqlstate, fn, what):
    """Runs fn(), which must raise an error with `sqlstate`; returns the exception."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - any driver error is inspected below
        got = sqlstate_of(exc)
        if got != sqlstate:
            raise AssertionError(f"{what}: want SQLSTATE {sqlstate}, got {got}: {exc!r}") from exc
        return exc
    raise AssertionError(f"{what}: want SQLSTATE {sqlstate}, but it succeeded")


class Runner:
    """Runs scenarios in order, one line each, under an overall watchdog."""

    def __init__(self, driver):
        self.driver = driver
        self.current = "start-up"
        self.failed = []
        self.passed = 0
        self.started = time.monotonic()
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        watchdog.start()

    def _watchdog(self):
        time.sleep(TIMEOUT_SECS)
        print(f"FAIL {self.current}: timed out ({self.driver}: whole run exceeded "
              f"{TIMEOUT_SECS:.0f} s)", flush=True)
        os._exit(3)

    def run(self, scenario, fn):
        if ONLY and scenario not in ONLY:
            return
        self.current = scenario
        t0 = time.monotonic()
        try:
            note = fn()
        except Exception as exc:  # noqa: BLE001 - report every failure and go on
            reason = f"{type(exc).__name__}: {exc}".replace("\n", " | ")
            if scenario in KNOWN_GAPS:
                print(f"xfail {scenario}: {reason} (known gap, in HELIOS_KNOWN_GAPS)", flush=True)
                self.passed += 1
                return
            print(f"FAIL {scenario}: {reason}", flush=True)
            traceback.print_exc(file=sys.stderr)
            self.failed.append(scenario)
            return
        if scenario in KNOWN_GAPS:
            print(f"FAIL {scenario}: passed although listed in HELIOS_KNOWN_GAPS; remove it "
                  f"from the known gaps in tests/e2e_drivers.rs", flush=True)
            self.failed.append(scenario)
            return
        extra = f" ({note})" if note else ""
        print(f"ok {scenario}{extra} [{time.monotonic() - t0:.2f}s]", flush=True)
        self.passed += 1

    def finish(self):
        total = time.monotonic() - self.started
        print(f"summary {self.driver}: {self.passed} ok, {len(self.failed)} failed "
              f"in {total:.1f}s", flush=True)
        sys.stdout.flush()
        os._exit(1 if self.failed else 0)
