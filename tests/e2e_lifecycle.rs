//! The process: `--check-config` on good and bad configurations, and a graceful SIGTERM that
//! lets an in-flight query finish, tells idle clients 57P01 and exits 0.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    guarded,
    proxy::{base_config, merge, proxy_command},
    raw::{Ending, RawConn},
    run_tool, ToolOutput, DATABASE, TRUST_USER,
};

/// Runs `--check-config` on `config` (TOML text) with extra environment variables.
fn check_config(config: &str, env: &[(&str, &str)]) -> ToolOutput {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("write config");
    check_config_file(&path, env)
}

fn check_config_file(path: &Path, env: &[(&str, &str)]) -> ToolOutput {
    let mut cmd = proxy_command();
    cmd.arg("--config").arg(path).arg("--check-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_tool(cmd, None, Duration::from_secs(30))
}

/// A valid configuration (no server needs to be running for --check-config).
fn good_config() -> toml::Table {
    base_config(5432, 16432, 19090)
}

fn with(overrides: &str) -> String {
    let mut config = good_config();
    merge(&mut config, overrides);
    toml::to_string(&config).expect("serialise config")
}

#[test]
fn check_config_accepts_valid_files() {
    if common::proxy_only("check_config_accepts_valid_files", "runs the proxy binary") {
        return;
    }
    let out = check_config(&with(""), &[]);
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(out.stdout.contains("configuration OK"), "{out}");

    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for name in ["heliosdb-proxy.toml", "minimal.toml"] {
        let out = check_config_file(&shipped.join(name), &[]);
        assert_eq!(out.status.code(), Some(0), "config/{name}:\n{out}");
        assert!(
            out.stdout.contains("configuration OK"),
            "config/{name}:\n{out}"
        );
    }
    // An environment override that keeps it valid.
    let out = check_config(&with(""), &[("HELIOS_POOL_MODE__MAX_POOL_SIZE", "50")]);
    assert_eq!(out.status.code(), Some(0), "{out}");
}

/// (what is wrong, config text, extra environment, key the error must name)
type BadCase = (
    &'static str,
    String,
    Vec<(&'static str, &'static str)>,
    &'static str,
);

#[test]
fn check_config_rejects_bad_files_naming_the_key() {
    if common::proxy_only(
        "check_config_rejects_bad_files_naming_the_key",
        "runs the proxy binary",
    ) {
        return;
    }
    let cases: Vec<BadCase> = vec![
        (
            "unknown key",
            with("[pool_mode]\nmax_pool_sizee = 3\n"),
            vec![],
            "max_pool_sizee",
        ),
        (
            "zero pool size",
            with("[pool_mode]\nmax_pool_size = 0\n"),
            vec![],
            "max_pool_size",
        ),
        (
            "bad listen address",
            with("listen_address = \"not-an-address\"\n"),
            vec![],
            "listen_address",
        ),
        (
            "buffer too small",
            with("[limits]\nbuffer_size = 100\n"),
            vec![],
            "buffer_size",
        ),
        (
            "message limit too small",
            with("[limits]\nmax_message_size = 10\n"),
            vec![],
            "max_message_size",
        ),
        (
            "zero acquire timeout",
            with("[pool_mode]\nacquire_timeout_ms = 0\n"),
            vec![],
            "acquire_timeout_ms",
        ),
        (
            "node port 0",
            with("[[nodes]]\nhost = \"127.0.0.1\"\nport = 0\n"),
            vec![],
            "port",
        ),
        (
            "no primary",
            with("[[nodes]]\nhost = \"127.0.0.1\"\nrole = \"replica\"\n"),
            vec![],
            "primary",
        ),
        (
            "password missing",
            with("[[users]]\nname = \"nopass\"\n"),
            vec![],
            "password",
        ),
        (
            "bad override value",
            with(""),
            vec![("HELIOS_POOL_MODE__MAX_POOL_SIZE", "0")],
            "max_pool_size",
        ),
        (
            "override of a missing key",
            with(""),
            vec![("HELIOS_NO_SUCH_KEY", "1")],
            "no_such_key",
        ),
    ];
    for (what, config, env, key) in cases {
        let out = check_config(&config, &env);
        assert_eq!(out.status.code(), Some(2), "{what}:\n{out}");
        let said = format!("{}{}", out.stdout, out.stderr);
        assert!(
            said.contains(key),
            "{what}: the error does not name `{key}`:\n{out}"
        );
        assert!(!said.contains("configuration OK"), "{what}:\n{out}");
    }
    // Not TOML at all, and a file that does not exist.
    let out = check_config("listen_address = [unclosed", &[]);
    assert_eq!(out.status.code(), Some(2), "{out}");
    let out = check_config_file(Path::new("/nonexistent/helios.toml"), &[]);
    assert_eq!(out.status.code(), Some(2), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_query_finish() {
    sigterm_scenario("sigterm_lets_the_running_query_finish", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_query_finish_in_transaction_mode() {
    sigterm_scenario(
        "sigterm_lets_the_running_query_finish_in_transaction_mode",
        "[pool_mode]\nmode = \"transaction\"\n",
    )
    .await;
}

/// SIGTERM while one client runs a query and another sits idle: the query finishes, the
/// idle client is told 57P01, and the proxy exits 0.
async fn sigterm_scenario(test: &str, overrides: &str) {
    if common::proxy_only(test, "signals the proxy process") {
        return;
    }
    let proxy = common::target(overrides);
    let port = proxy.port;
    let mut idle = tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(port);
        let startup = conn.startup_trust(TRUST_USER, DATABASE);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        conn
    })
    .await
    .expect("idle client");
    let client = proxy.client().await;
    // Each test marks its query, so tests running at once do not count each other's.
    let sql = format!("SELECT 'finished'::text FROM pg_sleep(2) /* {test} */");
    let query = tokio::spawn(async move { client.query_one(&sql, &[]).await });
    let cluster = common::cluster();
    let running = common::wait_until_async(Duration::from_secs(10), || async {
        cluster
            .admin_i64(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                 AND query LIKE '%/* {test} */%' AND pid <> pg_backend_pid()"
            ))
            .await
            == 1
    })
    .await;
    assert!(
        running,
        "the query never started on PostgreSQL\n{}",
        proxy.log()
    );

    proxy.signal(libc::SIGTERM);
    let row = guarded(
        Duration::from_secs(20),
        "in-flight query after SIGTERM",
        query,
    )
    .await
    .expect("query task")
    .unwrap_or_else(|e| {
        panic!(
            "in-flight query failed after SIGTERM: {e:?}\n{}",
            proxy.log()
        )
    });
    assert_eq!(row.get::<_, &str>(0), "finished");

    let ending = tokio::task::spawn_blocking(move || idle.read_ending(Duration::from_secs(15)))
        .await
        .expect("idle client task");
    match ending {
        Ending::Error(m) => assert_eq!(m.sqlstate(), "57P01", "{:?}", m.fields()),
        other => panic!(
            "idle client got {other:?} instead of FATAL 57P01\n{}",
            proxy.log()
        ),
    }
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("proxy still running 20 s after SIGTERM\n{}", proxy.log()));
    assert_eq!(
        status.code(),
        Some(0),
        "proxy exit status after SIGTERM\n{}",
        proxy.log()
    );
}
