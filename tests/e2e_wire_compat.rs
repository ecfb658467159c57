//! Answers PostgreSQL gives and a pooler must give too, checked on the raw wire where a
//! driver would hide them: prepared statements across DDL and failed Parses, the pids a
//! client is shown, one FATAL when a server ends a session, statements that need a
//! database to themselves, startup noise, slow logins. Each scenario runs through the
//! proxy in session and transaction pooling (or once against PostgreSQL itself with
//! HELIOS_TEST_TARGET=direct, which is how the expected answers were checked).

mod common;

use std::time::Duration;

use common::raw::{
    bind, describe_statement, errors, execute, first_column, parse, query, sync, Ending, Message,
};
use common::{cluster, is_direct, target, Proxy, RawConn, DATABASE, TRUST_USER};

/// Linux never hands out a pid at or above this (PID_MAX_LIMIT on 64-bit).
const LINUX_PID_MAX_LIMIT: i32 = 4_194_304;

/// The targets a scenario runs on: PostgreSQL itself, or the proxy in each mode with one
/// worker and `pool` server connections (session pooling: one per client, so four).
fn modes(pool: u32) -> Vec<(&'static str, String)> {
    if is_direct() {
        return vec![("direct", String::new())];
    }
    ["session", "transaction"]
        .into_iter()
        .map(|mode| {
            let pool = if mode == "session" { 4 } else { pool };
            (
                mode,
                format!(
                    "workers = 1\n[pool_mode]\nmode = \"{mode}\"\nmax_pool_size = {pool}\nacquire_timeout_ms = 10000\n"
                ),
            )
        })
        .collect()
}

fn login(target: &Proxy) -> (RawConn, i32) {
    let mut conn = RawConn::connect(target.port);
    let startup = conn.startup_trust(TRUST_USER, DATABASE);
    assert!(startup.error.is_none(), "login: {:?}", startup.error);
    let (pid, _) = startup.backend_key.expect("BackendKeyData");
    (conn, pid)
}

fn assert_no_errors(what: &str, messages: &[Message]) {
    let errs: Vec<_> = errors(messages).iter().map(|m| m.fields()).collect();
    assert!(errs.is_empty(), "{what}: {errs:?}");
}

fn sqlstates(messages: &[Message]) -> Vec<String> {
    errors(messages).iter().map(|m| m.sqlstate()).collect()
}

fn run_ok(conn: &mut RawConn, sql: &str) {
    let result = conn.simple_query(sql);
    assert!(
        result.error.is_none(),
        "{sql}: {:?}",
        result.error.map(|e| e.fields())
    );
}

#[test]
fn a_table_dropped_and_created_alike_is_replanned_silently() {
    for (mode, config) in modes(1) {
        let target = target(&config);
        let table = format!("recreated_{mode}");
        let (mut a, _) = login(&target);
        let (mut b, _) = login(&target);
        let recreate = |columns: &str| {
            format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} ({columns}); \
                 INSERT INTO {table} VALUES (1, 'x')"
            )
        };
        run_ok(&mut b, &recreate("id int, v text"));
        let select = format!("SELECT * FROM {table}");
        a.send_all(&[parse("s1", &select), bind("s1"), execute(), sync()]);
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: first run"), &got);
        assert_eq!(first_column(&got), [Some("1".to_string())]);

        // Another client recreates the table with the same columns: PostgreSQL re-plans.
        run_ok(&mut b, &recreate("id int, v text"));
        a.send_all(&[bind("s1"), execute(), sync()]);
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: after another client recreated it"), &got);
        assert_eq!(first_column(&got), [Some("1".to_string())]);

        // The client itself does.
        run_ok(&mut a, &recreate("id int, v text"));
        a.send_all(&[describe_statement("s1"), bind("s1"), execute(), sync()]);
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: after it recreated it itself"), &got);

        // A real change of the result type is PostgreSQL's 0A000, on every Bind.
        run_ok(&mut b, &recreate("id bigint, v text"));
        for attempt in 0..2 {
            a.send_all(&[bind("s1"), execute(), sync()]);
            let got = a.read_until_ready();
            assert_eq!(
                sqlstates(&got),
                ["0A000"],
                "{mode}: changed type, Bind {attempt}"
            );
        }
        // Prepared again under a new name, it runs.
        a.send_all(&[parse("s2", &select), bind("s2"), execute(), sync()]);
        assert_no_errors(&format!("{mode}: prepared again"), &a.read_until_ready());
        run_ok(&mut b, &format!("DROP TABLE {table}"));
    }
}

#[test]
fn a_parse_the_server_rejected_leaves_no_statement_behind() {
    for (mode, config) in modes(1) {
        let target = target(&config);
        let (mut a, _) = login(&target);

        // A syntax error, then the name again.
        a.send_all(&[parse("bad", "SELEC 1"), sync()]);
        assert_eq!(sqlstates(&a.read_until_ready()), ["42601"], "{mode}");
        a.send_all(&[parse("bad", "SELECT 1"), bind("bad"), execute(), sync()]);
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: the name after a failed Parse"), &got);
        assert_eq!(first_column(&got), [Some("1".to_string())]);

        // The same, pipelined: the second Parse is sent before the first is answered.
        a.send_all(&[
            parse("p1", "SELEC"),
            sync(),
            parse("p1", "SELECT 11"),
            bind("p1"),
            execute(),
            sync(),
        ]);
        assert_eq!(sqlstates(&a.read_until_ready()), ["42601"], "{mode}");
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: pipelined re-Parse"), &got);
        assert_eq!(first_column(&got), [Some("11".to_string())]);

        // A Parse the server skipped after an earlier error prepared nothing.
        a.send_all(&[parse("x1", "SELEC"), parse("x2", "SELECT 12"), sync()]);
        assert_eq!(sqlstates(&a.read_until_ready()), ["42601"], "{mode}");
        a.send_all(&[parse("x2", "SELECT 12"), bind("x2"), execute(), sync()]);
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: a skipped Parse's name"), &got);
        assert_eq!(first_column(&got), [Some("12".to_string())]);

        // In a failed transaction every Parse is 25P02, even of a statement the server
        // connection already has (here "SELECT 1", prepared above as "bad").
        run_ok(&mut a, "BEGIN");
        assert!(a.simple_query("SELECT 1/0").error.is_some());
        a.send_all(&[parse("t1", "SELECT 13"), sync()]);
        assert_eq!(sqlstates(&a.read_until_ready()), ["25P02"], "{mode}: new");
        a.send_all(&[parse("t2", "SELECT 1"), sync()]);
        assert_eq!(sqlstates(&a.read_until_ready()), ["25P02"], "{mode}: known");
        run_ok(&mut a, "ROLLBACK");
        a.send_all(&[bind("t2"), execute(), sync()]);
        assert_eq!(
            sqlstates(&a.read_until_ready()),
            ["26000"],
            "{mode}: t2 exists"
        );
        a.send_all(&[
            parse("t1", "SELECT 13"),
            parse("t2", "SELECT 1"),
            bind("t1"),
            execute(),
            bind("t2"),
            execute(),
            sync(),
        ]);
        let got = a.read_until_ready();
        assert_no_errors(&format!("{mode}: names after the rollback"), &got);
        assert_eq!(
            first_column(&got),
            [Some("13".to_string()), Some("1".to_string())]
        );
    }
}

fn backend_pid(conn: &mut RawConn) -> i32 {
    let result = conn.simple_query("SELECT pg_backend_pid()");
    result.rows[0][0]
        .as_deref()
        .and_then(|p| p.parse().ok())
        .expect("pg_backend_pid()")
}

/// The next NotificationResponse: (sender pid, payload).
fn next_notification(conn: &mut RawConn) -> (i32, String) {
    conn.set_read_timeout(Duration::from_secs(10));
    loop {
        let m = conn.read_message().expect("read").expect("connection open");
        if m.tag == b'A' {
            let payload = m.body[4..]
                .split(|&b| b == 0)
                .nth(1)
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            return (m.i32_at(0), payload);
        }
    }
}

#[test]
fn pids_clients_see_are_their_own_or_impossible() {
    for (mode, config) in modes(2) {
        let target = target(&config);
        let (mut a, pid) = login(&target);
        let (mut b, b_pid) = login(&target);
        if mode == "transaction" {
            // No backend of its own: a pid no process on any host can have.
            assert!(pid >= LINUX_PID_MAX_LIMIT, "{mode}: made-up pid {pid}");
            assert!(b_pid >= LINUX_PID_MAX_LIMIT && b_pid != pid);
        } else {
            assert_eq!(pid, backend_pid(&mut a), "{mode}: BackendKeyData pid");
        }
        let channel = format!("pids_{mode}");
        run_ok(&mut a, &format!("LISTEN {channel}"));
        // Its own notification carries its own pid, as drivers expect.
        a.send_all(&[query(&format!("NOTIFY {channel}, 'self'"))]);
        let (sender, payload) = next_notification(&mut a);
        assert_eq!(
            (sender, payload.as_str()),
            (pid, "self"),
            "{mode}: own notification"
        );
        a.read_until_ready();
        // Another session's carries another pid.
        run_ok(&mut b, &format!("NOTIFY {channel}, 'other'"));
        let (sender, payload) = next_notification(&mut a);
        assert_eq!(payload, "other");
        assert_ne!(sender, pid, "{mode}: another session's notification");
        run_ok(&mut a, &format!("UNLISTEN {channel}"));
    }
}

#[test]
fn a_terminated_backend_gives_one_fatal() {
    for (mode, config) in modes(1) {
        let target = target(&config);
        for in_transaction in [false, true] {
            let (mut a, _) = login(&target);
            if in_transaction {
                run_ok(&mut a, "BEGIN");
            } else if mode == "transaction" {
                // Idle clients hold no backend in transaction pooling: nothing to end.
                continue;
            }
            let pid = backend_pid(&mut a);
            cluster().psql_admin("postgres", &format!("SELECT pg_terminate_backend({pid})"));
            let got = a.read_until_closed(Duration::from_secs(10));
            assert_eq!(
                sqlstates(&got),
                ["57P01"],
                "{mode}, in transaction {in_transaction}: {got:?}"
            );
            target.assert_running();
        }
    }
}

#[test]
fn noise_before_the_startup_packet_is_closed_silently() {
    let target = target("");
    // A Terminate where the startup packet belongs, as some drivers send when closing a
    // connection they never started.
    let mut conn = RawConn::connect(target.port);
    conn.write_all(b"X\0\0\0\x04").expect("send Terminate");
    match conn.read_ending(Duration::from_secs(8)) {
        Ending::Closed => {}
        other => panic!("Terminate before startup: expected a silent close, got {other:?}"),
    }
    // A client that connects and closes its side without a word.
    let mut conn = RawConn::connect(target.port);
    conn.shutdown_write();
    match conn.read_ending(Duration::from_secs(8)) {
        Ending::Closed => {}
        other => panic!("empty connection: expected a silent close, got {other:?}"),
    }
    target.assert_running();
}

#[test]
fn a_slow_but_valid_login_is_not_cut_short() {
    // PostgreSQL gives a client authentication_timeout (60 s) to log in; the proxy's
    // default must not be shorter than the 11 s this client takes.
    let target = target("");
    let mut conn = RawConn::connect(target.port);
    std::thread::sleep(Duration::from_secs(11));
    let startup = conn.startup_trust(TRUST_USER, DATABASE);
    assert!(startup.error.is_none(), "slow login: {:?}", startup.error);
    assert_eq!(
        conn.simple_query("SELECT 1").rows,
        [[Some("1".to_string())]]
    );
}

/// Server connections PostgreSQL has to `db`.
fn connections_to(db: &str) -> i64 {
    cluster()
        .psql_admin(
            "postgres",
            &format!("SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'"),
        )
        .trim()
        .parse()
        .expect("count")
}

/// Leaves the proxy with idle pooled connections to `db`: several clients at once run a
/// query there and leave.
async fn use_database(target: &Proxy, db: &str) {
    let clients = futures_util::future::join_all(
        (0..6).map(|_| target.connect(common::SUPERUSER, Some(common::SUPERUSER_PASSWORD), db)),
    )
    .await;
    for client in clients {
        let client = client.unwrap_or_else(|e| panic!("login to {db}: {e:?}"));
        client.simple_query("SELECT 1").await.expect("query");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_need_a_database_to_themselves_are_not_blocked_by_the_pool() {
    for (mode, _) in modes(1) {
        let config = format!("workers = 2\n[pool_mode]\nmode = \"{mode}\"\nmax_pool_size = 16\n");
        let target = target(&config);
        let db = format!("fenced_{mode}");
        let renamed = format!("{db}_renamed");
        let copy = format!("{db}_copy");
        cluster().psql_admin("postgres", &format!("CREATE DATABASE {db}"));
        let admin = target.client().await;

        use_database(&target, &db).await;
        if !target.is_direct() {
            assert!(
                connections_to(&db) > 0,
                "{mode}: the proxy kept connections"
            );
        }
        admin
            .batch_execute(&format!("ALTER DATABASE {db} RENAME TO {renamed}"))
            .await
            .unwrap_or_else(|e| panic!("{mode}: RENAME: {e:?}"));

        use_database(&target, &renamed).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {copy} TEMPLATE {renamed}"))
            .await
            .unwrap_or_else(|e| panic!("{mode}: CREATE … TEMPLATE: {e:?}"));

        // Over the extended protocol too (drivers send it that way).
        use_database(&target, &renamed).await;
        admin
            .execute(&format!("DROP DATABASE {renamed}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{mode}: DROP: {e:?}"));
        assert_eq!(connections_to(&renamed), 0);

        // A real client in a transaction there still blocks it, as it would directly.
        let holder = target
            .connect(common::SUPERUSER, Some(common::SUPERUSER_PASSWORD), &copy)
            .await
            .expect("login to the copy");
        holder
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("BEGIN");
        let err = admin
            .batch_execute(&format!("DROP DATABASE {copy}"))
            .await
            .expect_err("DROP DATABASE while a client is in a transaction there");
        assert_eq!(common::sqlstate(&err), "55006", "{mode}: {err:?}");
        holder.batch_execute("COMMIT").await.expect("COMMIT");
        drop(holder);
        // Once it left, the database can go (its session-mode backend may take a moment).
        let mut dropped = Err(err);
        for _ in 0..50 {
            dropped = admin.batch_execute(&format!("DROP DATABASE {copy}")).await;
            if dropped.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        dropped.unwrap_or_else(|e| panic!("{mode}: DROP after the client left: {e:?}"));
        // Clients of other databases never noticed.
        admin.simple_query("SELECT 1").await.expect("still served");
        target.assert_running();
    }
}
