//! Pool limits and load: a client that cannot get a backend in time gets 53300 naming the
//! pool, and pgbench runs clean through the proxy.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{sqlstate, target, DATABASE, SUPERUSER, SUPERUSER_PASSWORD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_timeout_is_53300_naming_the_pool() {
    if common::proxy_only(
        "acquire_timeout_is_53300_naming_the_pool",
        "pool limits are the proxy's",
    ) {
        return;
    }
    let proxy = target("workers = 1\n[pool_mode]\nmax_pool_size = 2\nacquire_timeout_ms = 300\n");
    let first = proxy.client().await;
    let second = proxy.client().await;
    for client in [&first, &second] {
        client
            .simple_query("SELECT 1")
            .await
            .expect("session holding a backend");
    }
    let third = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
        .await;
    let err = match third {
        Err(e) => e,
        Ok(client) => client
            .simple_query("SELECT 1")
            .await
            .expect_err("a third session got a backend beyond max_pool_size = 2"),
    };
    assert_eq!(sqlstate(&err), "53300", "{err:?}");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    for part in ["pool", DATABASE, SUPERUSER] {
        assert!(
            message.contains(part),
            "53300 message does not name the pool: {message}"
        );
    }
    // The held sessions are unaffected, and a freed backend serves the next client.
    second.simple_query("SELECT 2").await.expect("held session");
    drop(first);
    let reused = common::wait_until_async(Duration::from_secs(10), || async {
        match proxy
            .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
            .await
        {
            Ok(client) => client.simple_query("SELECT 3").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        reused,
        "no client got the backend released by a closed session\n{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_clean() {
    let target = Arc::new(target("[pool_mode]\nmax_pool_size = 80\n"));
    let t = target.clone();
    let init = tokio::task::spawn_blocking(move || {
        common::pgbench(&t, &["-i", "-s", "1"], Duration::from_secs(180))
    })
    .await
    .expect("pgbench -i task");
    assert!(init.status.success(), "pgbench -i failed:\n{init}");
    let accounts = common::cluster().psql_admin(DATABASE, "SELECT count(*) FROM pgbench_accounts");
    assert_eq!(accounts.trim(), "100000");

    let t = target.clone();
    let run = tokio::task::spawn_blocking(move || {
        common::pgbench(
            &t,
            &["-S", "-c", "32", "-j", "2", "-T", "10"],
            Duration::from_secs(120),
        )
    })
    .await
    .expect("pgbench -S task");
    assert!(run.status.success(), "pgbench -S failed:\n{run}");
    assert!(
        run.stdout.contains("number of failed transactions: 0"),
        "pgbench reported failures:\n{run}"
    );
    assert!(
        !run.stdout.contains("aborted") && !run.stderr.contains("aborted"),
        "pgbench clients aborted:\n{run}"
    );
    let processed: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in pgbench output:\n{run}"));
    assert!(processed > 0, "pgbench processed no transactions:\n{run}");
    target.assert_running();
}

/// The worker a transaction-pooling client's made-up pid names (see `cancel.rs`).
fn worker_of(pid: i32) -> i32 {
    (pid - 4_194_304) & 0xff
}

#[test]
fn a_client_never_waits_while_a_server_connection_of_its_pool_sits_idle() {
    if common::proxy_only(
        "a_client_never_waits_while_a_server_connection_of_its_pool_sits_idle",
        "pool budgets are the proxy's",
    ) {
        return;
    }
    // max_pool_size is one budget for both workers: the kernel spreads clients unevenly,
    // and a client must not wait on one worker while the other keeps a connection idle.
    let proxy = target(
        "workers = 2\n[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 2\nacquire_timeout_ms = 5000\n",
    );
    let db = "budget_shared";
    common::cluster().psql_admin("postgres", &format!("CREATE DATABASE {db}"));
    // Log in until two clients share a worker and one is on the other.
    let mut by_worker: [Vec<common::RawConn>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..64 {
        if by_worker.iter().any(|w| w.len() >= 2) && by_worker.iter().all(|w| !w.is_empty()) {
            break;
        }
        let mut conn = common::RawConn::connect(proxy.port);
        let startup = conn.startup_trust(common::TRUST_USER, db);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        let (pid, _) = startup.backend_key.expect("BackendKeyData");
        by_worker[worker_of(pid) as usize].push(conn);
    }
    let busy = usize::from(by_worker[1].len() >= 2);
    let [mut first, mut second] = [by_worker[busy].remove(0), by_worker[busy].remove(0)];
    let mut other = by_worker[1 - busy].remove(0);
    drop(by_worker);

    // The other worker ends up with an idle connection, this one's first client holds one:
    // the budget of two is spent.
    assert!(other.simple_query("SELECT 1").error.is_none());
    assert!(first.simple_query("BEGIN").error.is_none());
    assert!(first.simple_query("SELECT 1").error.is_none());
    // The second client of the busy worker is served: the idle connection is given back
    // and opened again where it is needed, within the acquire timeout.
    let result = second.simple_query("SELECT 2");
    assert!(
        result.error.is_none(),
        "waited while a connection sat idle: {:?}\n{}",
        result.error.map(|e| e.fields()),
        proxy.log()
    );
    assert_eq!(result.rows, [[Some("2".to_string())]]);
    let connections: i64 = common::cluster()
        .psql_admin(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
        )
        .trim()
        .parse()
        .expect("count");
    assert!(
        connections <= 2,
        "{connections} server connections for a budget of 2"
    );
    assert!(first.simple_query("COMMIT").error.is_none());
    assert!(other.simple_query("SELECT 3").error.is_none());
}
