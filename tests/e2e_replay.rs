//! Transaction replay (`failover.replay`) on real servers. The server process behind a
//! client's unit is killed (`kill -9`: the server restarts itself, as after any crash) in
//! the middle of a transaction or a statement: the unit runs again on a new connection, and the client either sees nothing
//! of it or — when the replay's answers would differ from what it already received —
//! gets `40001` inside a transaction that really is aborted, and its retry succeeds.

mod common;

use std::time::Duration;

use common::http::get;
use common::{proxy_only, sqlstate, PgCluster, Proxy, DATABASE};

fn replay_proxy(cluster: &PgCluster, extra: &str) -> Proxy {
    Proxy::start(
        cluster,
        &format!(
            "[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 10\n\
             [failover]\nreplay = true\n{extra}\n"
        ),
    )
}

/// Kills (`kill -9`) the server process whose last statement carried `marker`: the
/// server restarts itself (crash recovery) and every connection to it is lost.
async fn crash_backend_of(cluster: &PgCluster, marker: &str) {
    let admin = cluster.admin("postgres").await;
    let find = format!(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE '%{marker}%' \
         AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    );
    let rows = admin.query(find.as_str(), &[]).await.unwrap();
    assert_eq!(rows.len(), 1, "one server connection ran {marker}");
    let pid: i32 = rows[0].get(0);
    // SAFETY: a signal to a process of the test's own PostgreSQL.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
}

/// An admin session whose commits survive a crash (the harness turns
/// `synchronous_commit` off for speed).
async fn durable_admin(cluster: &PgCluster) -> tokio_postgres::Client {
    // (Right after a crash the server is in recovery for a moment.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let admin = loop {
        match cluster
            .admin_config(DATABASE)
            .connect(tokio_postgres::NoTls)
            .await
        {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                break client;
            }
            Err(e) if std::time::Instant::now() > deadline => panic!("no admin session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    admin
        .batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    admin
}

fn replays(proxy: &Proxy) -> serde_json::Value {
    get(proxy.admin_port.unwrap(), "/metrics").json()["replays"].clone()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_whose_connection_dies_finishes_as_if_nothing_happened() {
    if proxy_only("replay", "the proxy replays; PostgreSQL ends the session") {
        return;
    }
    let cluster = PgCluster::start();
    let proxy = replay_proxy(&cluster, "");
    let admin = durable_admin(&cluster).await;
    admin
        .batch_execute("DROP TABLE IF EXISTS replay_rows; CREATE TABLE replay_rows (id int PRIMARY KEY, note text)")
        .await
        .unwrap();
    let client = proxy.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    // Extended protocol, with a named statement prepared inside the transaction.
    let insert = client
        .prepare("INSERT INTO replay_rows VALUES ($1, $2)")
        .await
        .unwrap();
    client.execute(&insert, &[&1i32, &"one"]).await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM replay_rows /* victim-a */").await,
        1
    );
    crash_backend_of(&cluster, "victim-a").await;
    // The next statements run on a new connection after the replay: same transaction.
    client.execute(&insert, &[&2i32, &"two"]).await.unwrap();
    assert_eq!(count(&client, "SELECT count(*) FROM replay_rows").await, 2);
    client.batch_execute("COMMIT").await.unwrap();
    let admin = durable_admin(&cluster).await;
    assert_eq!(
        count(&admin, "SELECT count(*) FROM replay_rows").await,
        2,
        "both rows committed once"
    );
    let r = replays(&proxy);
    assert_eq!(r["attempted"], 1, "{r}");
    assert_eq!(r["succeeded"], 1, "{r}");
    // The session goes on.
    assert_eq!(count(&client, "SELECT 7::bigint").await, 7);
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_whose_reads_differ_gets_40001_and_the_retry_succeeds() {
    if proxy_only("replay", "the proxy replays; PostgreSQL ends the session") {
        return;
    }
    let cluster = PgCluster::start();
    let proxy = replay_proxy(&cluster, "");
    let admin = durable_admin(&cluster).await;
    admin
        .batch_execute(
            "DROP TABLE IF EXISTS replay_balance; CREATE TABLE replay_balance (id int PRIMARY KEY, v int); \
             INSERT INTO replay_balance VALUES (10, 100)",
        )
        .await
        .unwrap();
    let client = proxy.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    let seen: i32 = client
        .query_one(
            "SELECT v FROM replay_balance WHERE id = 10 /* victim-b */",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 100);
    // Someone else changes what the client read, and the client's connection dies.
    admin
        .execute("UPDATE replay_balance SET v = 101 WHERE id = 10", &[])
        .await
        .unwrap();
    crash_backend_of(&cluster, "victim-b").await;
    let err = client
        .execute("UPDATE replay_balance SET v = v + 1 WHERE id = 10", &[])
        .await
        .expect_err("the replay read 101 where the client saw 100");
    assert_eq!(sqlstate(&err), "40001", "{err:?}");
    // The transaction is aborted, as PostgreSQL would have it after an error.
    let err = client.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&err), "25P02", "{err:?}");
    client.batch_execute("ROLLBACK").await.unwrap();
    // The retry succeeds.
    client.batch_execute("BEGIN").await.unwrap();
    let seen: i32 = client
        .query_one("SELECT v FROM replay_balance WHERE id = 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 101);
    client
        .execute("UPDATE replay_balance SET v = v + 1 WHERE id = 10", &[])
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    let admin = durable_admin(&cluster).await;
    assert_eq!(
        count(&admin, "SELECT v::bigint FROM replay_balance WHERE id = 10").await,
        102
    );
    let r = replays(&proxy);
    assert_eq!(r["refused"]["diverged"], 1, "{r}");
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_outside_a_transaction_runs_again_and_a_write_does_not() {
    if proxy_only("replay", "the proxy replays; PostgreSQL ends the session") {
        return;
    }
    let cluster = PgCluster::start();
    let proxy = replay_proxy(&cluster, "");
    let admin = durable_admin(&cluster).await;
    admin
        .batch_execute("DROP TABLE IF EXISTS replay_log; CREATE TABLE replay_log (n int)")
        .await
        .unwrap();
    let client = proxy.client().await;
    // A read cut off while it runs: the client gets its answer.
    let reader = {
        let client = proxy.client().await;
        tokio::spawn(async move {
            client
                .query_one("SELECT 42::bigint /* victim-c */, pg_sleep(2)::text", &[])
                .await
                .map(|row| row.get::<_, i64>(0))
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    crash_backend_of(&cluster, "victim-c").await;
    assert_eq!(reader.await.unwrap().expect("the read was replayed"), 42);
    // A write cut off while it runs may have committed: 08007, and the session goes on.
    let writer = {
        let client = proxy.client().await;
        tokio::spawn(async move {
            let outcome = client
                .execute(
                    "INSERT INTO replay_log SELECT 1 FROM pg_sleep(2) /* victim-d */",
                    &[],
                )
                .await;
            let after = client
                .query_one("SELECT 5::bigint", &[])
                .await
                .map(|r| r.get::<_, i64>(0));
            (outcome, after)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    crash_backend_of(&cluster, "victim-d").await;
    let (outcome, after) = writer.await.unwrap();
    let err = outcome.expect_err("a write outside a transaction is not replayed");
    assert!(
        ["08007", "08006"].contains(&sqlstate(&err).as_str()),
        "{err:?}"
    );
    assert_eq!(
        after.unwrap_or_else(|e| panic!("the session goes on: {e:?}\n{}", proxy.log())),
        5
    );
    let admin = durable_admin(&cluster).await;
    assert_eq!(count(&admin, "SELECT count(*) FROM replay_log").await, 0);
    let r = replays(&proxy);
    // The read, and any unit that happened to take a connection the crash killed.
    assert!(r["succeeded"].as_u64() >= Some(1), "{r}");
    assert_eq!(r["refused"]["unknown_outcome"], 1, "{r}");
    assert_eq!(count(&client, "SELECT 1::bigint").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_the_journal_is_not_replayed() {
    if proxy_only("replay", "the proxy replays; PostgreSQL ends the session") {
        return;
    }
    let cluster = PgCluster::start();
    let proxy = replay_proxy(&cluster, "replay_journal_max_bytes = 2048");
    let client = proxy.client().await;
    client.batch_execute("BEGIN").await.unwrap();
    let big = "x".repeat(4096);
    client
        .query_one(&format!("SELECT /* victim-e */ length('{big}')"), &[])
        .await
        .unwrap();
    crash_backend_of(&cluster, "victim-e").await;
    let err = client.batch_execute("SELECT 1").await.unwrap_err();
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert!(
        code.as_deref() == Some("08006") || err.is_closed(),
        "the session ends: {err:?}"
    );
    let r = replays(&proxy);
    assert_eq!(r["refused"]["journal_full"], 1, "{r}");
    // Others are unaffected.
    let other = proxy.client().await;
    assert_eq!(count(&other, "SELECT 3::bigint").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_tracking_answers_as_postgresql_and_never_commits_early() {
    use common::raw::{msg, RawConn};
    if proxy_only("replay", "the proxy's commit tracking") {
        return;
    }
    let cluster = PgCluster::start();
    let proxy = replay_proxy(&cluster, "track_commit_outcome = true");
    let admin = durable_admin(&cluster).await;
    admin
        .batch_execute("DROP TABLE IF EXISTS tracked; CREATE TABLE tracked (n int)")
        .await
        .unwrap();
    let mut raw = RawConn::connect(proxy.port);
    raw.startup_trust(common::TRUST_USER, DATABASE);
    admin
        .batch_execute("GRANT ALL ON tracked TO PUBLIC")
        .await
        .unwrap();
    // An autocommit INSERT: exactly PostgreSQL's answer, committed once.
    raw.send_all(&[msg(b'Q', b"INSERT INTO tracked VALUES (1)\0")]);
    let answer = raw.read_until_ready();
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"CZ", "{answer:?}");
    assert_eq!(answer[0].body, b"INSERT 0 1\0");
    assert_eq!(answer[1].body, b"I");
    // A failing one: its error, and the session is idle after it.
    raw.send_all(&[msg(b'Q', b"INSERT INTO tracked VALUES ('x')\0")]);
    let answer = raw.read_until_ready();
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"EZ", "{answer:?}");
    assert_eq!(answer[0].sqlstate(), "22P02");
    assert_eq!(answer[1].body, b"I");
    // BEGIN and an INSERT pipelined: the INSERT is inside the client's transaction, which
    // the client rolls back; nothing of it is committed.
    raw.send_all(&[
        msg(b'Q', b"BEGIN\0"),
        msg(b'Q', b"INSERT INTO tracked VALUES (2)\0"),
    ]);
    raw.read_until_ready();
    let answer = raw.read_until_ready();
    assert_eq!(answer.last().unwrap().body, b"T", "{answer:?}");
    raw.send_all(&[msg(b'Q', b"ROLLBACK\0")]);
    raw.read_until_ready();
    // A transaction committed with COMMIT: the client sees COMMIT.
    raw.send_all(&[msg(b'Q', b"BEGIN\0")]);
    raw.read_until_ready();
    raw.send_all(&[msg(b'Q', b"INSERT INTO tracked VALUES (3)\0")]);
    raw.read_until_ready();
    raw.send_all(&[msg(b'Q', b"COMMIT\0")]);
    let answer = raw.read_until_ready();
    let tags: Vec<u8> = answer.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"CZ", "{answer:?}");
    assert_eq!(answer[0].body, b"COMMIT\0");
    let rows: Vec<i32> = admin
        .query("SELECT n FROM tracked ORDER BY n", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [1, 3]);
}
