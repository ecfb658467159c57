//! Real client drivers through the proxy: psycopg 3, asyncpg, node-postgres and pgjdbc each
//! run the same scenario list (tests/drivers/*: prepared statements on many connections,
//! statement-name collisions, close and re-prepare, DDL under a prepared `SELECT *`, session
//! state, errors in transactions and pipelines, pipelining, COPY, transactions,
//! LISTEN/NOTIFY, startup parameters) against the proxy in each pool mode, or once against
//! PostgreSQL with HELIOS_TEST_TARGET=direct.
//!
//! The drivers are installed by scripts/test.sh: a Python virtualenv at
//! `target/drivers/venv` (tests/drivers/python/requirements.txt), `npm ci` in
//! tests/drivers/node, and Debian's JDK and libpostgresql-jdbc-java. A missing driver fails
//! its test with a message saying so; nothing is skipped silently.
//!
//! Each program prints `ok NAME`, `xfail NAME: …` (a known gap of the target, listed below)
//! or `FAIL NAME: reason` per scenario and exits non-zero when any failed. HELIOS_ONLY
//! (comma-separated scenario names) in the test's environment narrows every program to those
//! scenarios, for debugging.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_tool, Proxy, DATABASE, SUPERUSER, SUPERUSER_PASSWORD};

/// The scenarios every program runs, in order.
const SCENARIOS: &[&str] = &[
    "prepared_concurrent",
    "same_name_different_sql",
    "deallocate_reprepare",
    "ddl_between_executions",
    "session_state",
    "errors_recover",
    "pipeline_100",
    "copy_in_out",
    "transactions",
    "listen_notify",
    "startup_params",
];

/// Scenarios known to fail through the proxy today, per mode (the programs report them as
/// `xfail` and fail if they pass, so these lists must shrink as the proxy closes the gaps):
/// - `startup_params` in session mode: the proxy applies a client's startup parameters
///   with `set_config(…, false)`, so `RESET name` / `RESET ALL` return to the pooled
///   backend's own start-up values instead of the client's (PostgreSQL returns to the
///   client's). Transaction mode restores them after a RESET.
fn proxy_known_gaps(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::Session => &["startup_params"],
        Mode::Transaction | Mode::Statement => &[],
    }
}

/// Whole-program bound; each program also stops itself after HELIOS_TIMEOUT_SECS.
const PROGRAM_LIMIT: Duration = Duration::from_secs(180);
const PROGRAM_TIMEOUT_SECS: &str = "120";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Session,
    Transaction,
    Statement,
}

/// Scenarios that open transaction blocks or LISTEN: statement pooling must refuse them
/// with its clear error (each program reports them as `FAIL name: …statement pooling…`).
/// pgjdbc's `executeBatch` runs inside a transaction, so its pipeline is refused too.
fn refused_in_statement_mode(driver: Driver) -> &'static [&'static str] {
    match driver {
        Driver::Pgjdbc => &[
            "session_state",
            "errors_recover",
            "pipeline_100",
            "transactions",
            "listen_notify",
        ],
        _ => &[
            "session_state",
            "errors_recover",
            "transactions",
            "listen_notify",
        ],
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Session => "session",
            Mode::Transaction => "transaction",
            Mode::Statement => "statement",
        }
    }

    /// Session mode holds a backend per client for its whole life, so it gets enough
    /// backends for every connection a program opens at once (8, with plenty of room);
    /// transaction mode shares 4 (one budget for both workers) among them all.
    fn overrides(self) -> String {
        let pool = match self {
            Mode::Session => 40,
            Mode::Transaction | Mode::Statement => 4,
        };
        format!(
            "[pool_mode]\nmode = \"{}\"\nmax_pool_size = {pool}\n",
            self.name()
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Driver {
    Psycopg,
    Asyncpg,
    NodePostgres,
    Pgjdbc,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn venv_python() -> PathBuf {
    repo().join("target/drivers/venv/bin/python")
}

const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

fn not_installed(what: &str) -> ! {
    panic!(
        "{what} is not installed: run scripts/test.sh (as root on Debian it installs the \
         driver test dependencies: the Python venv at target/drivers/venv, npm ci in \
         tests/drivers/node, openjdk-17-jdk-headless and libpostgresql-jdbc-java)"
    )
}

/// Fails loudly unless a quick probe of the driver's runtime works.
fn probe(mut cmd: Command, what: &str) {
    cmd.current_dir(repo());
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => not_installed(&format!("{what} ({e})")),
    };
    if !out.status.success() {
        not_installed(&format!(
            "{what} ({}{})",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Psycopg => "psycopg",
            Driver::Asyncpg => "asyncpg",
            Driver::NodePostgres => "node-postgres",
            Driver::Pgjdbc => "pgjdbc",
        }
    }

    /// The scenario program's command, after checking the driver is installed.
    fn command(self) -> Command {
        match self {
            Driver::Psycopg | Driver::Asyncpg => {
                let python = venv_python();
                if !python.is_file() {
                    not_installed(&format!("the Python venv ({})", python.display()));
                }
                let module = match self {
                    Driver::Psycopg => "psycopg",
                    _ => "asyncpg",
                };
                let mut check = Command::new(&python);
                check.args(["-c", &format!("import {module}")]);
                probe(check, &format!("{module} in {}", python.display()));
                let script = match self {
                    Driver::Psycopg => "tests/drivers/python/psycopg_scenarios.py",
                    _ => "tests/drivers/python/asyncpg_scenarios.py",
                };
                let mut cmd = Command::new(python);
                cmd.arg(repo().join(script));
                cmd
            }
            Driver::NodePostgres => {
                let mut check = Command::new("node");
                check.arg("--version");
                probe(check, "node");
                let modules = repo().join("tests/drivers/node/node_modules");
                for package in ["pg", "pg-copy-streams"] {
                    if !modules.join(package).join("package.json").is_file() {
                        not_installed(&format!("npm package {package} ({})", modules.display()));
                    }
                }
                let mut cmd = Command::new("node");
                cmd.arg(repo().join("tests/drivers/node/scenarios.js"));
                cmd
            }
            Driver::Pgjdbc => {
                let mut check = Command::new("java");
                check.arg("-version");
                probe(check, "java");
                if !Path::new(JDBC_JAR).is_file() {
                    not_installed(&format!("pgjdbc ({JDBC_JAR})"));
                }
                let mut cmd = Command::new("java");
                cmd.args(["-cp", JDBC_JAR])
                    .arg(repo().join("tests/drivers/java/Scenarios.java"));
                cmd
            }
        }
    }
}

/// Runs `driver`'s scenarios against the proxy in `mode`, or against PostgreSQL in direct
/// mode (session-mode tests only; the others return at once there).
fn run_driver(driver: Driver, mode: Mode) {
    run_driver_with(driver, mode, false);
}

/// The same with the result cache on (`[cache] enabled = true`): the drivers' scenarios
/// must not notice it.
fn run_driver_cached(driver: Driver, mode: Mode) {
    run_driver_with(driver, mode, true);
}

fn run_driver_with(driver: Driver, mode: Mode, cached: bool) {
    let suffix = if cached { "_cached" } else { "" };
    let test = format!("{}_{}{suffix}", driver.name(), mode.name());
    if cached && common::is_direct() {
        println!("note: {test} skipped with HELIOS_TEST_TARGET=direct: the cache is the proxy's");
        return;
    }
    if common::is_direct() && mode != Mode::Session {
        println!(
            "note: {test} skipped with HELIOS_TEST_TARGET=direct: the session-mode test \
             already runs these scenarios against PostgreSQL"
        );
        return;
    }
    // Check the driver first: a missing one must fail before any server starts.
    let mut cmd = driver.command();
    let mut overrides = mode.overrides();
    if cached {
        overrides.push_str("[cache]\nenabled = true\n");
    }
    let target = common::target(&overrides);
    let tag = if target.is_direct() {
        "direct".to_string()
    } else {
        format!("{}{suffix}", mode.name())
    };
    // (With the cache on, session mode follows settings as the pooled modes do: the
    // session-mode gap below is closed there.)
    let gaps = if target.is_direct() || cached {
        String::new()
    } else {
        proxy_known_gaps(mode).join(",")
    };
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("PG") || (key.starts_with("HELIOS_") && key != "HELIOS_ONLY") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.current_dir(repo())
        .env("HELIOS_HOST", &target.host)
        .env("HELIOS_PORT", target.port.to_string())
        .env("HELIOS_USER", SUPERUSER)
        .env("HELIOS_PASSWORD", SUPERUSER_PASSWORD)
        .env("HELIOS_DB", DATABASE)
        .env("HELIOS_TAG", &tag)
        .env("HELIOS_TIMEOUT_SECS", PROGRAM_TIMEOUT_SECS)
        .env("HELIOS_KNOWN_GAPS", gaps)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let out = run_tool(cmd, None, PROGRAM_LIMIT);
    println!("{test}:\n{out}");
    let refused = if mode == Mode::Statement {
        refused_in_statement_mode(driver)
    } else {
        &[]
    };
    let failed_as_designed = |line: &str| {
        line.strip_prefix("FAIL ").is_some_and(|rest| {
            refused
                .iter()
                .any(|name| rest.starts_with(&format!("{name}:")))
                && rest.contains("statement pooling mode")
        })
    };
    let unexpected: Vec<&str> = out
        .stdout
        .lines()
        .filter(|line| line.starts_with("FAIL ") && !failed_as_designed(line))
        .collect();
    if !unexpected.is_empty() && !target.is_direct() {
        println!("{test}: proxy log:\n{}", target.log());
    }
    assert!(unexpected.is_empty(), "{test}: scenarios failed:\n{out}");
    if refused.is_empty() {
        assert!(
            out.status.success(),
            "{test}: scenario program failed:\n{out}"
        );
    }
    for name in refused {
        let prefix = format!("FAIL {name}:");
        assert!(
            out.stdout
                .lines()
                .any(|l| l.starts_with(&prefix) && failed_as_designed(l)),
            "{test}: {name} was not refused with the statement-mode error:\n{out}"
        );
    }
    let only: Vec<String> = std::env::var("HELIOS_ONLY")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    for scenario in SCENARIOS {
        if (!only.is_empty() && !only.iter().any(|s| s == scenario)) || refused.contains(scenario) {
            continue;
        }
        let reported = out.stdout.lines().any(|line| {
            line.strip_prefix("ok ")
                .or_else(|| line.strip_prefix("xfail "))
                .is_some_and(|rest| {
                    rest.split([' ', ':'])
                        .next()
                        .is_some_and(|name| name == *scenario)
                })
        });
        assert!(
            reported,
            "{test}: scenario {scenario} did not report ok:\n{out}"
        );
    }
    if !target.is_direct() {
        target.assert_running();
    }
    drop::<Proxy>(target);
}

#[test]
fn psycopg_session() {
    run_driver(Driver::Psycopg, Mode::Session);
}

#[test]
fn psycopg_transaction() {
    run_driver(Driver::Psycopg, Mode::Transaction);
}

#[test]
fn psycopg_statement() {
    run_driver(Driver::Psycopg, Mode::Statement);
}

#[test]
fn asyncpg_statement() {
    run_driver(Driver::Asyncpg, Mode::Statement);
}

#[test]
fn node_postgres_statement() {
    run_driver(Driver::NodePostgres, Mode::Statement);
}

#[test]
fn pgjdbc_statement() {
    run_driver(Driver::Pgjdbc, Mode::Statement);
}

#[test]
fn asyncpg_session() {
    run_driver(Driver::Asyncpg, Mode::Session);
}

#[test]
fn asyncpg_transaction() {
    run_driver(Driver::Asyncpg, Mode::Transaction);
}

#[test]
fn node_postgres_session() {
    run_driver(Driver::NodePostgres, Mode::Session);
}

#[test]
fn node_postgres_transaction() {
    run_driver(Driver::NodePostgres, Mode::Transaction);
}

#[test]
fn pgjdbc_session() {
    run_driver(Driver::Pgjdbc, Mode::Session);
}

#[test]
fn pgjdbc_transaction() {
    run_driver(Driver::Pgjdbc, Mode::Transaction);
}

#[test]
fn psycopg_transaction_cached() {
    run_driver_cached(Driver::Psycopg, Mode::Transaction);
}

#[test]
fn asyncpg_transaction_cached() {
    run_driver_cached(Driver::Asyncpg, Mode::Transaction);
}

#[test]
fn node_postgres_session_cached() {
    run_driver_cached(Driver::NodePostgres, Mode::Session);
}

#[test]
fn pgjdbc_statement_cached() {
    run_driver_cached(Driver::Pgjdbc, Mode::Statement);
}
