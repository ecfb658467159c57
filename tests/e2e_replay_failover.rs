//! Replay across a real failover: a primary with a synchronous standby (`sync1`), the
//! proxy with `failover.replay` and `failover.track_commit_outcome` on, and the primary's
//! postmaster killed (`kill -9`) while clients are in the middle of their work. The proxy
//! promotes the standby and every unit in flight is replayed there, settled from the new
//! primary's word, or answered `40001` for the client to retry:
//!
//! - pgbench's TPC-B-like script, 16 clients, `--max-tries 10`: no failed transaction,
//!   and the four balances agree afterwards on the new primary;
//! - a COMMIT in flight at the kill is answered as it ended: committed (its commit record
//!   reached the standby) or not (it never wrote one);
//! - a psycopg client in the middle of a multi-statement transaction finishes it without
//!   an error, a cursor fetched across the failover returns every row once; a client whose replayed read would differ gets `40001`, and its retry
//!   succeeds.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::http::get;
use common::{
    pgbench, proxy_only, sqlstate, wait_until, wait_until_async, PgCluster, Proxy, DATABASE,
    SUPERUSER, SUPERUSER_PASSWORD,
};

/// One failover at a time: each kills a cluster of its own under load, on two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A primary and its synchronous standby `sync1`.
struct Cluster {
    primary: PgCluster,
    sync: PgCluster,
}

impl Cluster {
    fn start() -> Cluster {
        let primary = PgCluster::start();
        let sync = primary.start_standby_named(Some("sync1"));
        primary.psql_admin(
            "postgres",
            // The harness turns synchronous_commit off for speed; a commit acknowledged
            // here must be on the synchronous standby.
            "ALTER SYSTEM SET synchronous_standby_names = 'sync1';\n\
             ALTER SYSTEM SET synchronous_commit = 'on';\n\
             SELECT pg_reload_conf();\n",
        );
        let mut seen = String::new();
        assert!(
            wait_until(Duration::from_secs(30), || {
                seen = primary.psql_admin(
                    "postgres",
                    "SELECT string_agg(application_name || ':' || sync_state, ',') FROM pg_stat_replication;\n",
                );
                seen.trim() == "sync1:sync"
            }),
            "standby not streaming synchronously: {seen}"
        );
        Cluster { primary, sync }
    }

    fn address(node: &PgCluster) -> String {
        format!("127.0.0.1:{}", node.port)
    }

    /// The proxy in `mode` in front of both, replaying.
    fn proxy(&self, mode: &str) -> Proxy {
        self.proxy_promoting(mode, true)
    }

    /// The same; `promotes`: it promotes the standby itself (else it follows another's
    /// promotion).
    fn proxy_promoting(&self, mode: &str, promotes: bool) -> Proxy {
        let proxy = Proxy::start(
            &self.primary,
            &format!(
                "[pool_mode]\nmode = \"{mode}\"\nmax_pool_size = 40\n\
                 [health]\ncheck_interval_secs = 1\ntimeout_ms = 1000\nfailure_threshold = 3\n\
                 [failover]\nfast_probe_ms = 100\nwrite_timeout_secs = 30\n\
                 replay = true\ntrack_commit_outcome = true\nauto_promote = {promotes}\n\
                 [[nodes]]\nname = \"primary\"\nhost = \"127.0.0.1\"\nport = {}\nrole = \"primary\"\n\
                 [[nodes]]\nname = \"sync1\"\nhost = \"127.0.0.1\"\nport = {}\nrole = \"standby\"\n",
                self.primary.port, self.sync.port
            ),
        );
        let primary = Cluster::address(&self.primary);
        assert!(
            wait_until(Duration::from_secs(30), || confirmed_primary(&proxy)
                .as_deref()
                == Some(primary.as_str())),
            "primary not confirmed: {}",
            topology(&proxy)
        );
        proxy
    }

    /// Kills the primary's postmaster and waits until the proxy has promoted the standby.
    async fn fail_over(&self, proxy: &Proxy) -> Duration {
        self.primary.kill_postmaster();
        let killed = Instant::now();
        let sync = Cluster::address(&self.sync);
        assert!(
            wait_until_async(Duration::from_secs(30), || async {
                confirmed_primary(proxy) == Some(sync.clone())
            })
            .await,
            "the synchronous standby did not become the primary: {}\n{}",
            topology(proxy),
            proxy.log()
        );
        killed.elapsed()
    }
}

fn topology(proxy: &Proxy) -> serde_json::Value {
    get(proxy.admin_port.unwrap(), "/topology").json()
}

fn confirmed_primary(proxy: &Proxy) -> Option<String> {
    let t = topology(proxy);
    (t["state"] == "confirmed")
        .then(|| t["primary"].as_str().map(str::to_string))
        .flatten()
}

fn replays(proxy: &Proxy) -> serde_json::Value {
    get(proxy.admin_port.unwrap(), "/metrics").json()["replays"].clone()
}

async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// pgbench's four balances on `node`: accounts, history, tellers, branches.
async fn balances(node: &PgCluster) -> [i64; 4] {
    let admin = node.admin(DATABASE).await;
    let mut sums = [0; 4];
    for (sum, sql) in sums.iter_mut().zip([
        "SELECT COALESCE(sum(abalance), 0)::bigint FROM pgbench_accounts",
        "SELECT COALESCE(sum(delta), 0)::bigint FROM pgbench_history",
        "SELECT COALESCE(sum(tbalance), 0)::bigint FROM pgbench_tellers",
        "SELECT COALESCE(sum(bbalance), 0)::bigint FROM pgbench_branches",
    ]) {
        *sum = scalar(&admin, sql).await;
    }
    sums
}

/// The figure pgbench reports on the line starting with `label`.
fn pgbench_figure(output: &str, label: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// pgbench's TPC-B-like script through the proxy in `mode`, the primary killed part-way.
async fn pgbench_across_a_failover(mode: &str) {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Cluster::start();
    let init = pgbench(
        &Proxy::direct(&c.primary),
        &["-i", "-s", "1", "-q"],
        Duration::from_secs(120),
    );
    assert!(init.status.success(), "pgbench -i failed: {init}");
    let proxy = c.proxy(mode);
    let (run, took) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            pgbench(
                &proxy,
                &[
                    "-c",
                    "16",
                    "-j",
                    "2",
                    "-T",
                    "12",
                    "-n",
                    "--max-tries",
                    "10",
                    "-P",
                    "2",
                ],
                Duration::from_secs(120),
            )
        });
        std::thread::sleep(Duration::from_secs(4));
        let runtime = tokio::runtime::Handle::current();
        let took = std::thread::scope(|inner| {
            inner
                .spawn(|| runtime.block_on(c.fail_over(&proxy)))
                .join()
                .unwrap()
        });
        (load.join().unwrap(), took)
    });
    println!("{run}");
    println!(
        "failover confirmed {took:?} after the kill; replays: {}",
        replays(&proxy)
    );
    for line in proxy
        .log()
        .lines()
        .filter(|l| l.contains("replay") || l.contains("COMMIT"))
    {
        println!("{line}");
    }
    assert!(
        run.status.success(),
        "pgbench failed: {run}\n{}",
        proxy.log()
    );
    let processed = pgbench_figure(&run.stdout, "number of transactions actually processed:")
        .expect("pgbench reports its transactions");
    assert!(processed > 100, "too few transactions: {run}");
    assert_eq!(
        pgbench_figure(&run.stdout, "number of failed transactions:"),
        Some(0),
        "{run}\n{}",
        proxy.log()
    );
    let [accounts, history, tellers, branches] = balances(&c.sync).await;
    assert_eq!(
        (accounts, tellers, branches),
        (history, history, history),
        "balances disagree on the new primary"
    );
    assert!(
        replays(&proxy)["attempted"].as_u64().unwrap() > 0,
        "{}",
        replays(&proxy)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_in_transaction_mode_loses_nothing_across_a_failover() {
    if proxy_only(
        "replay_failover",
        "the proxy replays; PostgreSQL ends the sessions",
    ) {
        return;
    }
    pgbench_across_a_failover("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_tpcb_in_session_mode_loses_nothing_across_a_failover() {
    if proxy_only(
        "replay_failover",
        "the proxy moves sessions; PostgreSQL ends them",
    ) {
        return;
    }
    pgbench_across_a_failover("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_moves_to_the_new_primary() {
    if proxy_only(
        "replay_failover",
        "the proxy moves sessions; PostgreSQL ends them",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Cluster::start();
    let proxy = c.proxy("session");
    // Beside it, a transaction-pooling proxy that follows the promotion: its client is
    // pinned to its connection by a LISTEN.
    let pooled = c.proxy_promoting("transaction", false);
    let (pinned, mut pinned_notes) = listening_client(&pooled).await;
    pinned
        .batch_execute("SET statement_timeout = '42s'; LISTEN pooled_jobs")
        .await
        .unwrap();
    // A session with settings, protocol and SQL prepared statements, a LISTEN and an
    // advisory lock: all of it moves.
    let (mover, mut notes) = listening_client(&proxy).await;
    mover
        .batch_execute("SET work_mem = '7MB'; LISTEN jobs; SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    // (PREPARE alone in its query string: what PostgreSQL keeps is the whole string.)
    mover
        .batch_execute("PREPARE sq AS SELECT 40 + $1")
        .await
        .unwrap();
    let plus_one = mover.prepare("SELECT $1::int + 1").await.unwrap();
    // A WITH HOLD cursor, declared in a transaction block, it has fetched 30 rows of
    // (lone simple-Query FETCHes).
    mover.batch_execute("BEGIN").await.unwrap();
    mover.batch_execute("SELECT 1").await.unwrap();
    mover
        .batch_execute("DECLARE walk CURSOR WITH HOLD FOR SELECT g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    mover.batch_execute("COMMIT").await.unwrap();
    let mut walked: Vec<i32> = Vec::new();
    for _ in 0..3 {
        walked.extend(fetch_ten(&mover, "walk").await);
    }
    // One fetched through the extended protocol: the proxy cannot repeat that.
    let (opaque, opaque_conn) = proxy
        .pg_config(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let opaque_conn = tokio::spawn(opaque_conn);
    opaque
        .batch_execute("DECLARE blind CURSOR WITH HOLD FOR SELECT 1")
        .await
        .unwrap();
    opaque.query("FETCH 1 FROM blind", &[]).await.unwrap();
    opaque.batch_execute("SELECT 1").await.unwrap();
    // A session with a temporary table: it cannot move. (Its state is read after its
    // unit; the next round trip shows that is done.)
    let (tied, tied_conn) = proxy
        .pg_config(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let tied_conn = tokio::spawn(tied_conn);
    tied.batch_execute("CREATE TEMP TABLE scratch (x int)")
        .await
        .unwrap();
    tied.batch_execute("SELECT 1").await.unwrap();
    c.fail_over(&proxy).await;
    let work_mem: String = mover.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(work_mem, "7MB", "{}", proxy.log());
    let two: i32 = mover.query_one(&plus_one, &[&1i32]).await.unwrap().get(0);
    assert_eq!(two, 2);
    let answer: i32 = mover.query_one("EXECUTE sq(2)", &[]).await.unwrap().get(0);
    assert_eq!(answer, 42);
    // The cursor goes on where the client was: every row once, in order.
    loop {
        let rows = fetch_ten(&mover, "walk").await;
        if rows.is_empty() {
            break;
        }
        walked.extend(rows);
    }
    assert_eq!(walked, (1..=100).collect::<Vec<i32>>());
    assert_ended_naming(opaque_conn, "WITH HOLD cursor \"blind\"").await;
    let new_primary = c.sync.admin(DATABASE).await;
    let taken: bool = new_primary
        .query_one("SELECT pg_try_advisory_lock(4242)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        !taken,
        "the moved session holds its advisory lock on the new primary"
    );
    new_primary
        .batch_execute("NOTIFY jobs, 'after the failover'")
        .await
        .unwrap();
    // The notification arrives with the moved session's next exchange at the latest.
    mover.batch_execute("SELECT 1").await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(10), notes.recv())
        .await
        .expect("a notification after the failover")
        .unwrap();
    assert_eq!(
        (note.0.as_str(), note.1.as_str()),
        ("jobs", "after the failover")
    );
    // The session with the temporary table was told why it ended.
    assert_ended_naming(tied_conn, "temporary table \"scratch\"").await;
    assert!(tied.batch_execute("SELECT 1").await.is_err());
    let r = replays(&proxy);
    assert_eq!(r["refused"]["session_state"], 2, "{r}");
    // The pinned pooled session moved too, once its proxy followed the promotion.
    let sync = Cluster::address(&c.sync);
    assert!(
        wait_until_async(Duration::from_secs(30), || async {
            confirmed_primary(&pooled) == Some(sync.clone())
        })
        .await,
        "the pooled proxy did not follow the promotion: {}",
        topology(&pooled)
    );
    let timeout: String = pinned
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeout, "42s", "{}", pooled.log());
    new_primary
        .batch_execute("NOTIFY pooled_jobs, 'pinned'")
        .await
        .unwrap();
    pinned.batch_execute("SELECT 1").await.unwrap();
    let note = tokio::time::timeout(Duration::from_secs(10), pinned_notes.recv())
        .await
        .expect("a notification for the pinned session")
        .unwrap();
    assert_eq!(
        (note.0.as_str(), note.1.as_str()),
        ("pooled_jobs", "pinned")
    );
}

/// The session whose connection task is `conn` ended with `FATAL 08006` naming `what`.
async fn assert_ended_naming(
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    what: &str,
) {
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .unwrap_or_else(|_| panic!("the session with {what} did not end"))
        .unwrap();
    let err = ended.expect_err("the session ends with an error");
    let db = err
        .as_db_error()
        .map(|e| (e.code().code().to_string(), e.message().to_string()));
    let (code, message) = db.unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(code, "08006", "{message}");
    assert!(message.contains(what), "{message}");
}

/// `FETCH 10 FROM cursor` as a simple Query: the rows' first column.
async fn fetch_ten(client: &tokio_postgres::Client, cursor: &str) -> Vec<i32> {
    client
        .simple_query(&format!("FETCH 10 FROM {cursor}"))
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(|v| v.parse().unwrap()),
            _ => None,
        })
        .collect()
}

/// A client whose notifications arrive on the returned channel as (channel, payload).
async fn listening_client(
    proxy: &Proxy,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
) {
    let (client, mut conn) = proxy
        .pg_config(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = futures_util::StreamExt::next(&mut messages).await {
            if let tokio_postgres::AsyncMessage::Notification(n) = message {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_in_flight_at_the_kill_are_answered_as_they_ended() {
    if proxy_only(
        "replay_failover",
        "the proxy settles COMMITs; PostgreSQL ends the sessions",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Cluster::start();
    c.primary.psql_admin(
        DATABASE,
        "CREATE TABLE outcome (what text PRIMARY KEY);\n\
         CREATE FUNCTION slow_check() RETURNS trigger LANGUAGE plpgsql AS \
         $$BEGIN PERFORM pg_sleep(60); RETURN NULL; END$$;\n\
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON outcome DEFERRABLE INITIALLY DEFERRED \
         FOR EACH ROW WHEN (NEW.what LIKE 'never%') EXECUTE FUNCTION slow_check();\n",
    );
    let proxy = c.proxy("transaction");
    // The standby keeps what it receives but applies nothing: a commit waiting for
    // `remote_apply` has its commit record on the standby, not yet acknowledged.
    c.sync
        .psql_admin("postgres", "SELECT pg_wal_replay_pause();\n");
    let committed = proxy.client().await;
    committed
        .batch_execute(
            "BEGIN; SET LOCAL synchronous_commit = remote_apply; \
             INSERT INTO outcome VALUES ('committed')",
        )
        .await
        .unwrap();
    let never = proxy.client().await;
    never
        .batch_execute("BEGIN; INSERT INTO outcome VALUES ('never')")
        .await
        .unwrap();
    // The same two ways for autocommit writes.
    let auto_committed = proxy.client().await;
    auto_committed
        .batch_execute("SET synchronous_commit = remote_apply")
        .await
        .unwrap();
    let auto_never = proxy.client().await;
    let committing = tokio::spawn(async move { committed.batch_execute("COMMIT").await });
    let stuck = tokio::spawn(async move { never.batch_execute("COMMIT").await });
    let auto_committing = tokio::spawn(async move {
        auto_committed
            .batch_execute("INSERT INTO outcome VALUES ('auto-committed')")
            .await
    });
    let auto_stuck = tokio::spawn(async move {
        auto_never
            .batch_execute("INSERT INTO outcome VALUES ('never-auto')")
            .await
    });
    // Both COMMITs are on their way: one waits for the standby, one in its trigger.
    let admin = c.primary.admin("postgres").await;
    assert!(
        wait_until_async(Duration::from_secs(20), || async {
            scalar(
                &admin,
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                 AND (query = 'COMMIT' OR query LIKE 'INSERT INTO outcome%')",
            )
            .await
                == 4
        })
        .await,
        "the four commits are not all in flight"
    );
    drop(admin);
    c.fail_over(&proxy).await;
    let first = committing.await.unwrap();
    assert!(
        first.is_ok(),
        "the COMMIT that reached the standby is reported committed: {first:?}\n{}",
        proxy.log()
    );
    let second = stuck.await.unwrap();
    let err = second.expect_err("the COMMIT that wrote no commit record did not commit");
    assert_eq!(sqlstate(&err), "40001", "{err:?}");
    let third = auto_committing.await.unwrap();
    assert!(
        third.is_ok(),
        "the autocommit write that reached the standby is reported done: {third:?}"
    );
    let fourth = auto_stuck.await.unwrap();
    let err = fourth.expect_err("the autocommit write that never committed");
    assert_eq!(sqlstate(&err), "40001", "{err:?}");
    let new_primary = c.sync.admin(DATABASE).await;
    let rows: Vec<String> = new_primary
        .query("SELECT what FROM outcome ORDER BY what", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, ["auto-committed", "committed"]);
    let r = replays(&proxy);
    assert_eq!(r["succeeded"], 2, "{r}");
    assert_eq!(r["refused"]["not_committed"], 2, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_mid_transaction_finish_or_retry_across_a_failover() {
    if proxy_only(
        "replay_failover",
        "the proxy replays; PostgreSQL ends the sessions",
    ) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().await;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/drivers/venv/bin/python");
    assert!(
        python.is_file(),
        "the Python venv ({}) is missing: run scripts/test.sh",
        python.display()
    );
    let c = Cluster::start();
    c.primary.psql_admin(
        DATABASE,
        "CREATE TABLE replay_py (n int);\n\
         CREATE TABLE balance (id int PRIMARY KEY, v int);\n\
         INSERT INTO balance VALUES (1, 100);\n",
    );
    let proxy = c.proxy("transaction");
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let mut script = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers/python/replay_client.py"))
        .args([
            proxy.port.to_string().as_str(),
            SUPERUSER,
            SUPERUSER_PASSWORD,
            DATABASE,
            go.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the psycopg client");
    // A client that read a balance the new primary will show differently.
    let reader = proxy.client().await;
    reader.batch_execute("BEGIN").await.unwrap();
    let v: i32 = reader
        .query_one("SELECT v FROM balance WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 100);
    let admin = c.primary.admin(DATABASE).await;
    admin
        .execute("UPDATE balance SET v = 150 WHERE id = 1", &[])
        .await
        .unwrap();
    drop(admin);
    // A client part-way through a cursor.
    let fetcher = proxy.client().await;
    fetcher
        .batch_execute("BEGIN; DECLARE walk CURSOR FOR SELECT g FROM generate_series(1, 100) g")
        .await
        .unwrap();
    let mut walked: Vec<i32> = Vec::new();
    for _ in 0..3 {
        for row in fetcher.query("FETCH 10 FROM walk", &[]).await.unwrap() {
            walked.push(row.get(0));
        }
    }
    // The psycopg client is mid-transaction.
    let mut out = script.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains('\n') {
            if out.read(&mut byte).unwrap_or(0) == 0 {
                break;
            }
            seen.push(byte[0]);
        }
        (String::from_utf8_lossy(&seen).into_owned(), out)
    });
    let (line, mut out) = ready.await.unwrap();
    assert!(line.starts_with("ready 2"), "psycopg client: {line}");
    c.fail_over(&proxy).await;
    std::fs::write(&go, b"go").unwrap();
    let status = tokio::task::spawn_blocking(move || script.wait())
        .await
        .unwrap()
        .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(status.success(), "psycopg client: {rest}\n{}", proxy.log());
    assert_eq!(rest.trim(), "done 3");
    let new_primary = c.sync.admin(DATABASE).await;
    assert_eq!(
        scalar(&new_primary, "SELECT count(*) FROM replay_py").await,
        3
    );
    // The cursor goes on where the client was: every row once, in order.
    loop {
        let rows = fetcher.query("FETCH 10 FROM walk", &[]).await.unwrap();
        if rows.is_empty() {
            break;
        }
        walked.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    fetcher.batch_execute("COMMIT").await.unwrap();
    assert_eq!(walked, (1..=100).collect::<Vec<i32>>());
    // The reader's replay reads 150 where it saw 100: 40001, and a retry that works.
    let err = reader
        .execute("UPDATE balance SET v = v + 1 WHERE id = 1", &[])
        .await
        .expect_err("the replayed read differs");
    assert_eq!(sqlstate(&err), "40001", "{err:?}");
    reader.batch_execute("ROLLBACK").await.unwrap();
    reader.batch_execute("BEGIN").await.unwrap();
    let v: i32 = reader
        .query_one("SELECT v FROM balance WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    reader
        .execute("UPDATE balance SET v = $1 WHERE id = 1", &[&(v + 1)])
        .await
        .unwrap();
    reader.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        scalar(&new_primary, "SELECT v::bigint FROM balance WHERE id = 1").await,
        151
    );
    let r = replays(&proxy);
    assert!(r["succeeded"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["refused"]["diverged"], 1, "{r}");
}
