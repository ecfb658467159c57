//! Transaction and statement pooling through the real proxy: backends are shared between
//! transactions, prepared statements and settings follow each client, connection-bound
//! state pins (or is refused), and clients that leave mid-transaction or mid-COPY never
//! leave a dirty backend behind.

mod common;

use std::time::Duration;

use common::{pgbench, sqlstate, target, RawConn, DATABASE, TRUST_USER};
use futures_util::future::join_all;

/// One worker and `backends` server connections, so sharing is certain; `extra` adds
/// `[pool_mode]` keys (default acquire timeout 3 s).
fn tx_config(mode: &str, backends: u32, extra: &str) -> String {
    let timeout = if extra.contains("acquire_timeout_ms") {
        ""
    } else {
        "acquire_timeout_ms = 3000\n"
    };
    format!(
        "workers = 1\n[pool_mode]\nmode = \"{mode}\"\nmax_pool_size = {backends}\n{timeout}{extra}"
    )
}

/// The server's message of a failed query.
fn message(err: &tokio_postgres::Error) -> String {
    err.as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| err.to_string())
}

fn skip(test: &str) -> bool {
    common::proxy_only(test, "pooling modes are the proxy's")
}

async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_share_one_backend_between_transactions() {
    if skip("clients_share_one_backend_between_transactions") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, ""));
    let a = proxy.client().await;
    let b = proxy.client().await;
    let c = proxy.client().await;
    // Three clients, one backend: each query runs on the same server process.
    let pid = backend_pid(&a).await;
    assert_eq!(backend_pid(&b).await, pid);
    assert_eq!(backend_pid(&c).await, pid);
    // A transaction keeps the backend until it ends; the others wait their turn.
    a.batch_execute("BEGIN").await.unwrap();
    a.execute("SELECT 1", &[]).await.unwrap();
    let waiting = tokio::spawn(async move { backend_pid(&b).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "b ran inside a's transaction");
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(waiting.await.unwrap(), pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_statement_names_with_different_sql_stay_apart() {
    if skip("same_statement_names_with_different_sql_stay_apart") {
        return;
    }
    // tokio-postgres names its statements s0, s1, … per connection: every client below
    // prepares "s0" with its own SQL, and all of them share two backends.
    let proxy = target(&tx_config("transaction", 2, ""));
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(proxy.client().await);
    }
    let runs = clients.iter().enumerate().map(|(i, client)| async move {
        let sql = format!("SELECT $1::int * {}", i + 2);
        let stmt = client.prepare(&sql).await.expect("prepare");
        for round in 0..40i32 {
            let got: i32 = client.query_one(&stmt, &[&round]).await.unwrap().get(0);
            assert_eq!(got, round * (i as i32 + 2), "client {i} round {round}");
        }
    });
    join_all(runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_each_client_and_reset_restores_them() {
    if skip("settings_follow_each_client_and_reset_restores_them") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, ""));
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("SET search_path = a_path, public; SET application_name = 'client-a'")
        .await
        .unwrap();
    b.batch_execute("SELECT set_config('search_path', 'b_path', false); SET helios.custom = 'b'")
        .await
        .unwrap();
    for _ in 0..5 {
        let row = a
            .query_one(
                "SELECT current_setting('search_path'), current_setting('application_name'), \
                 current_setting('helios.custom', true)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "a_path, public");
        assert_eq!(row.get::<_, String>(1), "client-a");
        assert_eq!(row.get::<_, Option<String>>(2).unwrap_or_default(), "");
        let row = b
            .query_one(
                "SELECT current_setting('search_path'), current_setting('helios.custom')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "b_path");
        assert_eq!(row.get::<_, String>(1), "b");
    }
    // SET LOCAL lasts one transaction; a rolled-back SET does not stick.
    a.batch_execute("BEGIN; SET LOCAL search_path = local_only; COMMIT")
        .await
        .unwrap();
    a.batch_execute("BEGIN; SET search_path = rolled_back; ROLLBACK")
        .await
        .unwrap();
    let path: String = a
        .query_one("SELECT current_setting('search_path')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, "a_path, public");
    a.batch_execute("RESET ALL").await.unwrap();
    let path: String = a
        .query_one("SELECT current_setting('search_path')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(path, "\"$user\", public");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_refuses_transaction_blocks_and_stays_usable() {
    if skip("statement_mode_refuses_transaction_blocks_and_stays_usable") {
        return;
    }
    let proxy = target(&tx_config("statement", 1, ""));
    let client = proxy.client().await;
    let err = client.batch_execute("BEGIN").await.expect_err("BEGIN");
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    assert!(message(&err).contains("statement pooling"), "{err:?}");
    // A whole transaction inside one Query is one statement as far as pooling goes.
    client
        .batch_execute("BEGIN; SELECT 1; COMMIT")
        .await
        .expect("one-query transaction");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let stmt = client.prepare("SELECT $1::int + 1").await.unwrap();
    let two: i32 = client.query_one(&stmt, &[&1i32]).await.unwrap().get(0);
    assert_eq!(two, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_is_refused_when_pinning_is_off() {
    if skip("session_state_is_refused_when_pinning_is_off") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, "pin_session_state = false\n"));
    let client = proxy.client().await;
    for sql in [
        "LISTEN chan",
        "CREATE TEMP TABLE t (a int)",
        "SELECT pg_advisory_lock(1)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE p AS SELECT 1",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&err), "0A000", "{sql}: {err:?}");
        assert!(
            message(&err).contains("pin_session_state"),
            "{sql}: {err:?}"
        );
    }
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_bound_state_pins_until_released() {
    if skip("connection_bound_state_pins_until_released") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, "acquire_timeout_ms = 400\n"));
    let holder = proxy.client().await;
    let other = proxy.client().await;
    holder
        .batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    // The only backend is pinned to the lock holder: the other client times out.
    let err = other
        .query_one("SELECT 1", &[])
        .await
        .expect_err("backend pinned by an advisory lock");
    assert_eq!(sqlstate(&err), "53300", "{err:?}");
    // The holder keeps working on its backend, and gives it up once the lock is gone.
    holder
        .batch_execute("SELECT pg_advisory_unlock(42)")
        .await
        .unwrap();
    let third = proxy.client().await;
    let one: i32 = third.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // Temp tables pin too, and dropping them releases.
    holder
        .batch_execute("CREATE TEMP TABLE scratch (a int)")
        .await
        .unwrap();
    holder
        .batch_execute("INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    let n: i64 = holder
        .query_one("SELECT count(*) FROM scratch", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    holder.batch_execute("DROP TABLE scratch").await.unwrap();
    let one: i32 = third.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    // A WITH HOLD cursor and an SQL-level prepared statement pin until closed/deallocated.
    for (create, use_it, release) in [
        (
            "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 7 AS v; COMMIT",
            "FETCH 1 FROM held",
            "CLOSE held",
        ),
        (
            "PREPARE sqlp AS SELECT 7 AS v",
            "EXECUTE sqlp",
            "DEALLOCATE sqlp",
        ),
    ] {
        // Logged in first: in transaction mode a login also waits for a backend.
        let waiter = proxy.client().await;
        holder.batch_execute(create).await.unwrap();
        let err = waiter
            .query_one("SELECT 1", &[])
            .await
            .expect_err("pinned backend");
        assert_eq!(sqlstate(&err), "53300", "{create}: {err:?}");
        let rows = holder.simple_query(use_it).await.unwrap();
        assert!(
            rows.iter().any(
                |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("7"))
            ),
            "{use_it} on the pinned backend"
        );
        holder.batch_execute(release).await.unwrap();
        let one: i32 = third.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1, "after {release}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_transaction_keeps_its_backend_until_rollback() {
    if skip("an_aborted_transaction_keeps_its_backend_until_rollback") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, "acquire_timeout_ms = 400\n"));
    let a = proxy.client().await;
    let b = proxy.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    let err = a.batch_execute("SELECT 1/0").await.expect_err("division");
    assert_eq!(sqlstate(&err), "22012");
    let err = a.batch_execute("SELECT 1").await.expect_err("aborted");
    assert_eq!(sqlstate(&err), "25P02");
    // The waiting client is told why (an ERROR: it held no backend, its session goes on).
    let err = b.batch_execute("SELECT 1").await.expect_err("pool busy");
    assert_eq!(sqlstate(&err), "53300");
    a.batch_execute("ROLLBACK").await.unwrap();
    let c = proxy.client().await;
    c.batch_execute("SELECT 1")
        .await
        .expect("free after rollback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_transaction_or_mid_copy_leaves_nothing_behind() {
    if skip("a_client_leaving_mid_transaction_or_mid_copy_leaves_nothing_behind") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, ""));
    let setup = proxy.client().await;
    setup
        .batch_execute("DROP TABLE IF EXISTS tx_leavers; CREATE TABLE tx_leavers (a int)")
        .await
        .unwrap();
    drop(setup);
    // Mid-transaction: an uncommitted insert, then the socket closes.
    {
        let mut raw = RawConn::connect(proxy.port);
        raw.startup_trust(TRUST_USER, DATABASE);
        assert_eq!(raw.simple_query("BEGIN").status, b'T');
        raw.simple_query("INSERT INTO tx_leavers VALUES (1)");
    }
    // Mid-COPY: some rows sent, no CopyDone.
    {
        let mut raw = RawConn::connect(proxy.port);
        raw.startup_trust(TRUST_USER, DATABASE);
        raw.send(b'Q', b"COPY tx_leavers FROM STDIN\0").unwrap();
        loop {
            let m = raw.read_message().unwrap().expect("CopyInResponse");
            if m.tag == b'G' {
                break;
            }
        }
        raw.send(b'd', b"2\n3\n").unwrap();
    }
    // The one backend comes back clean: in no transaction, and nothing was written.
    let check = proxy.client().await;
    let count = common::wait_until_async(Duration::from_secs(10), || async {
        check
            .query_one("SELECT count(*) FROM tx_leavers", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await;
    assert!(count, "rows from departed clients became visible");
    let mut raw = RawConn::connect(proxy.port);
    raw.startup_trust(TRUST_USER, DATABASE);
    let status = raw.simple_query("SELECT 1").status;
    assert_eq!(
        status, b'I',
        "the backend was handed over inside an open transaction"
    );
    check.batch_execute("DROP TABLE tx_leavers").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_pipelined_queries_work_in_transaction_mode() {
    if skip("copy_and_pipelined_queries_work_in_transaction_mode") {
        return;
    }
    let proxy = target(&tx_config("transaction", 2, ""));
    let client = proxy.client().await;
    client
        .batch_execute("DROP TABLE IF EXISTS tx_copy; CREATE TABLE tx_copy (a int, b text)")
        .await
        .unwrap();
    let sink = client
        .copy_in("COPY tx_copy FROM STDIN")
        .await
        .expect("copy in");
    let data: Vec<u8> = (0..500)
        .map(|i| format!("{i}\trow {i}\n"))
        .collect::<String>()
        .into_bytes();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let rows = sink.finish().await.unwrap();
    assert_eq!(rows, 500);
    // Many statements in flight on one connection at once (several Syncs outstanding).
    let stmt = client
        .prepare("SELECT b FROM tx_copy WHERE a = $1")
        .await
        .unwrap();
    let lookups = (0..100i32).map(|i| {
        let (client, stmt) = (&client, &stmt);
        async move {
            let b: String = client.query_one(stmt, &[&i]).await.unwrap().get(0);
            assert_eq!(b, format!("row {i}"));
        }
    });
    join_all(lookups).await;
    client.batch_execute("DROP TABLE tx_copy").await.unwrap();
}

#[test]
fn wire_level_statement_semantics_match_postgresql() {
    if skip("wire_level_statement_semantics_match_postgresql") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, ""));
    let mut raw = RawConn::connect(proxy.port);
    raw.startup_trust(TRUST_USER, DATABASE);
    let parse = |name: &str, sql: &str| {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        body
    };
    // Parse + Flush: the answer comes without a Sync.
    raw.send(b'P', &parse("st", "SELECT 42")).unwrap();
    raw.send(b'H', b"").unwrap();
    let m = raw.read_message().unwrap().unwrap();
    assert_eq!(m.tag, b'1', "ParseComplete after Flush");
    raw.send(b'S', b"").unwrap();
    assert_eq!(raw.read_message().unwrap().unwrap().tag, b'Z');
    // The same name again: 42P05, and the batch skips to Sync.
    raw.send(b'P', &parse("st", "SELECT 43")).unwrap();
    raw.send(b'B', b"\0st\0\0\0\0\0\0\0").unwrap();
    raw.send(b'E', b"\0\0\0\0\0").unwrap();
    raw.send(b'S', b"").unwrap();
    let m = raw.read_message().unwrap().unwrap();
    assert_eq!(m.tag, b'E');
    assert_eq!(m.sqlstate(), "42P05");
    assert_eq!(raw.read_message().unwrap().unwrap().tag, b'Z');
    // The statement still answers with its own SQL; an unknown one is 26000.
    raw.send(b'B', b"\0st\0\0\0\0\0\0\0").unwrap();
    raw.send(b'E', b"\0\0\0\0\0").unwrap();
    raw.send(b'B', b"\0nope\0\0\0\0\0\0\0").unwrap();
    raw.send(b'S', b"").unwrap();
    let tags: Vec<u8> = (0..5)
        .map(|_| raw.read_message().unwrap().unwrap())
        .map(|m| {
            if m.tag == b'D' {
                assert!(m.body.ends_with(b"42"), "{:?}", m.body);
            }
            if m.tag == b'E' {
                assert_eq!(m.sqlstate(), "26000");
            }
            m.tag
        })
        .collect();
    assert_eq!(tags, b"2DCEZ");
    // Close then Parse again under the same name with other SQL.
    raw.send(b'C', b"Sst\0").unwrap();
    raw.send(b'P', &parse("st", "SELECT 7")).unwrap();
    raw.send(b'B', b"\0st\0\0\0\0\0\0\0").unwrap();
    raw.send(b'E', b"\0\0\0\0\0").unwrap();
    raw.send(b'S', b"").unwrap();
    let mut seen = Vec::new();
    loop {
        let m = raw.read_message().unwrap().unwrap();
        if m.tag == b'D' {
            assert!(m.body.ends_with(b"7"), "{:?}", m.body);
        }
        seen.push(m.tag);
        if m.tag == b'Z' {
            break;
        }
    }
    assert_eq!(seen, b"312DCZ");
    // SQL DEALLOCATE of a protocol-level name is honoured.
    let r = raw.simple_query("DEALLOCATE st");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.tags, ["DEALLOCATE"]);
    raw.send(b'B', b"\0st\0\0\0\0\0\0\0").unwrap();
    raw.send(b'S', b"").unwrap();
    let m = raw.read_message().unwrap().unwrap();
    assert_eq!(m.sqlstate(), "26000");
    assert_eq!(raw.read_message().unwrap().unwrap().tag, b'Z');
}

#[test]
fn pgbench_prepared_and_extended_run_clean_in_transaction_mode() {
    if skip("pgbench_prepared_and_extended_run_clean_in_transaction_mode") {
        return;
    }
    let proxy = target("[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 4\n");
    let init = pgbench(&proxy, &["-i", "-s", "1", "-q"], Duration::from_secs(120));
    assert!(init.status.success(), "pgbench -i:\n{init}");
    for mode in ["prepared", "extended", "simple"] {
        // One thread per client: pgbench prepares synchronously, which would stall
        // other clients of its thread while they hold backends mid-transaction.
        let run = pgbench(
            &proxy,
            &["-c", "8", "-j", "8", "-t", "60", "-M", mode],
            Duration::from_secs(120),
        );
        assert!(run.status.success(), "pgbench -M {mode}:\n{run}");
        let text = run.to_string();
        assert!(
            text.contains("number of failed transactions: 0"),
            "-M {mode}:\n{text}"
        );
        assert!(!text.contains("aborted"), "-M {mode}:\n{text}");
        let select = pgbench(
            &proxy,
            &["-c", "16", "-j", "2", "-t", "200", "-S", "-M", mode],
            Duration::from_secs(120),
        );
        assert!(select.status.success(), "pgbench -S -M {mode}:\n{select}");
        assert!(!select.to_string().contains("aborted"), "{select}");
    }
    // The benchmark's prepared workload: 64 clients on 4 backends.
    let prepared = pgbench(
        &proxy,
        &["-c", "64", "-j", "2", "-t", "100", "-S", "-M", "prepared"],
        Duration::from_secs(180),
    );
    assert!(
        prepared.status.success(),
        "pgbench -S -M prepared -c 64:\n{prepared}"
    );
    let text = prepared.to_string();
    assert!(text.contains("number of failed transactions: 0"), "{text}");
    assert!(!text.contains("aborted"), "{text}");
}

#[test]
fn unnamed_statements_follow_their_client_and_never_leak() {
    if skip("unnamed_statements_follow_their_client_and_never_leak") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, ""));
    let login = || {
        let mut raw = RawConn::connect(proxy.port);
        raw.startup_trust(TRUST_USER, DATABASE);
        raw
    };
    let until_ready = |raw: &mut RawConn| {
        let mut seen = Vec::new();
        loop {
            let m = raw.read_message().unwrap().expect("message");
            seen.push(m.clone());
            if m.tag == b'Z' {
                return seen;
            }
        }
    };
    let parse_unnamed = |raw: &mut RawConn, sql: &str| {
        let mut body = vec![0u8];
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        raw.send(b'P', &body).unwrap();
        raw.send(b'S', b"").unwrap();
    };
    let run_unnamed = |raw: &mut RawConn| {
        raw.send(b'B', b"\0\0\0\0\0\0\0\0").unwrap();
        raw.send(b'E', b"\0\0\0\0\0").unwrap();
        raw.send(b'S', b"").unwrap();
    };
    let mut a = login();
    let mut b = login();
    parse_unnamed(&mut a, "SELECT 11");
    assert_eq!(until_ready(&mut a)[0].tag, b'1');
    // b replaces the unnamed statement on the one shared backend.
    parse_unnamed(&mut b, "SELECT 22");
    until_ready(&mut b);
    // a's Bind of its unnamed statement, in a later transaction, still runs a's SQL.
    run_unnamed(&mut a);
    let replies = until_ready(&mut a);
    let row = replies.iter().find(|m| m.tag == b'D').expect("a row");
    assert!(row.body.ends_with(b"11"), "{:?}", row.body);
    // A client that never parsed one gets PostgreSQL's error, not b's statement.
    let mut c = login();
    run_unnamed(&mut c);
    let replies = until_ready(&mut c);
    let err = replies.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(err.sqlstate(), "26000");
    assert!(
        replies.iter().all(|m| m.tag != b'D'),
        "c ran someone else's statement"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_can_choose_its_own_pooling_mode() {
    if skip("a_database_can_choose_its_own_pooling_mode") {
        return;
    }
    // Session pooling by default, transaction pooling for database `app`: with one
    // backend, several clients of `app` can only all be served if they share it.
    let proxy = target(&format!(
        "workers = 1\n[pool_mode]\nmode = \"session\"\nmax_pool_size = 1\nacquire_timeout_ms = 2000\n\n[[databases]]\nname = \"{DATABASE}\"\npool_mode = \"transaction\"\n"
    ));
    let a = proxy.client().await;
    let b = proxy.client().await;
    let c = proxy.client().await;
    let pid = backend_pid(&a).await;
    assert_eq!(backend_pid(&b).await, pid);
    assert_eq!(backend_pid(&c).await, pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_keeps_a_bounded_set_of_statements() {
    if skip("a_backend_keeps_a_bounded_set_of_statements") {
        return;
    }
    // Two statements per backend at most: cycling through five evicts (Close) and
    // re-prepares all the time, and every answer must still be the right one.
    let proxy = target(&tx_config(
        "transaction",
        1,
        "max_prepared_statements = 2\n",
    ));
    let client = proxy.client().await;
    let mut stmts = Vec::new();
    for k in 1..=5i32 {
        stmts.push((
            k,
            client
                .prepare(&format!("SELECT $1::int * {k}"))
                .await
                .unwrap(),
        ));
    }
    for round in 0..6i32 {
        for (k, stmt) in &stmts {
            let got: i32 = client.query_one(stmt, &[&round]).await.unwrap().get(0);
            assert_eq!(got, round * k, "statement {k} round {round}");
        }
    }
    let prepared: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_hx\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        prepared <= 3,
        "{prepared} statements kept on a backend limited to 2 (+1 in use)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_query_of_a_pooled_client() {
    if skip("cancel_reaches_the_query_of_a_pooled_client") {
        return;
    }
    let proxy = target(&tx_config("transaction", 2, ""));
    let client = proxy.client().await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let result = client.batch_execute("SELECT pg_sleep(30)").await;
        (client, result)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request");
    let (client, result) = common::guarded(Duration::from_secs(20), "cancelled sleep", sleeper)
        .await
        .unwrap();
    let err = result.expect_err("the sleep was cancelled");
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
}

#[test]
fn malformed_messages_in_pooled_mode_get_08p01_and_hurt_nobody_else() {
    if skip("malformed_messages_in_pooled_mode_get_08p01_and_hurt_nobody_else") {
        return;
    }
    let proxy = target(&tx_config("transaction", 1, ""));
    let cases: [(u8, &[u8]); 4] = [
        (b'B', b"portal-without-terminator"),
        (b'P', b"name\0query without terminator"),
        (b'D', b""),
        (0xF0, b"\0\0"),
    ];
    for (tag, body) in cases {
        let mut raw = RawConn::connect(proxy.port);
        raw.startup_trust(TRUST_USER, DATABASE);
        raw.send(tag, body).unwrap();
        match raw.read_ending(Duration::from_secs(10)) {
            common::raw::Ending::Error(m) => {
                assert_eq!(m.sqlstate(), "08P01", "tag {tag:#x}: {:?}", m.fields())
            }
            other => panic!("tag {tag:#x}: {other:?}\n{}", proxy.log()),
        }
        // The one backend is still there for the next client, clean.
        let mut next = RawConn::connect(proxy.port);
        next.startup_trust(TRUST_USER, DATABASE);
        let r = next.simple_query("SELECT 1");
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.status, b'I');
    }
    proxy.assert_running();
}

/// A pooled-mode login like one already welcomed needs no server connection: it gets the
/// same parameters (its own startup values included), and those values are in force at
/// its first statement. A login whose parameters the server refuses is refused every
/// time, never remembered.
#[test]
fn repeated_logins_are_welcomed_without_a_server_connection() {
    if skip("backend-less logins") {
        return;
    }
    let target = target(&tx_config("transaction", 1, ""));
    let admin = target.admin_port.unwrap();
    let params = [
        ("application_name", "welcome-test"),
        ("DateStyle", "ISO, DMY"),
        ("options", "-c search_path=welcome_path,public"),
    ];
    let first = {
        let mut raw = RawConn::connect(target.port);
        let startup = raw.startup_trust_with(TRUST_USER, DATABASE, &params);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        startup
    };
    let before = common::http::get(admin, "/metrics").json()["logins_without_server"]
        .as_u64()
        .unwrap();
    // The only server connection is held by another client: a login that needed it
    // would wait; this one does not.
    let mut holder = RawConn::connect(target.port);
    holder.startup_trust(TRUST_USER, DATABASE);
    holder.simple_query("BEGIN; SELECT 1");
    let mut raw = RawConn::connect(target.port);
    raw.set_read_timeout(Duration::from_secs(2));
    let again = raw.startup_trust_with(TRUST_USER, DATABASE, &params);
    assert!(again.error.is_none(), "{:?}", again.error);
    assert_eq!(
        again.params, first.params,
        "the same welcome as the first login"
    );
    assert_eq!(again.params["application_name"], "welcome-test");
    assert_eq!(again.params["DateStyle"], "ISO, DMY");
    let after = common::http::get(admin, "/metrics").json()["logins_without_server"]
        .as_u64()
        .unwrap();
    assert_eq!(after, before + 1);
    holder.simple_query("COMMIT");
    // Its startup values are in force at its first statement.
    raw.set_read_timeout(Duration::from_secs(10));
    let row = raw.simple_query(
        "SELECT current_setting('search_path') || '|' || current_setting('DateStyle') \
         || '|' || current_setting('application_name')",
    );
    assert_eq!(
        row.rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .as_deref(),
        Some("welcome_path,public|ISO, DMY|welcome-test"),
        "{row:?}"
    );
    // A value the server refuses: refused at the first login and at the next.
    for _ in 0..2 {
        let mut raw = RawConn::connect(target.port);
        let refused = raw.startup_trust_with(TRUST_USER, DATABASE, &[("DateStyle", "not-a-style")]);
        let error = refused.error.expect("an invalid DateStyle is refused");
        assert_eq!(error.sqlstate(), "22023", "{:?}", error.fields());
    }
}
