//! Limits that keep one client from hurting the others, through the running proxy in
//! transaction mode: a client stalled in the middle of a message holds no server
//! connection and is cut at `client_stall_timeout_ms`; partly received messages stay
//! within `message_memory`; `client_idle_timeout_ms`, `idle_transaction_timeout_ms` and
//! `query_timeout_ms` end a session with the SQLSTATE PostgreSQL uses; and a server
//! restart costs a client that holds no backend nothing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::{Ending, RawConn};
use common::{guarded, proxy_only, PgCluster, Proxy, HANG_GUARD, TRUST_USER};
use serde_json::Value;

const DATABASE: &str = common::DATABASE;

fn transaction_mode(pool_size: u32, extra: &str) -> String {
    format!("workers = 1\n[pool_mode]\nmode = \"transaction\"\nmax_pool_size = {pool_size}\nacquire_timeout_ms = 2000\n{extra}")
}

/// A client that queries every 100 ms while others misbehave; any failure fails the test.
struct Canary {
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Canary {
    async fn start(proxy: Arc<Proxy>) -> Canary {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (done.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = proxy.trust_client().await;
            while !stopped.load(Ordering::Relaxed) {
                let v: i32 = client
                    .query_one("SELECT $1::int4 + 1", &[&41i32])
                    .await
                    .expect("the canary's query failed while other clients misbehaved")
                    .get(0);
                assert_eq!(v, 42);
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let canary = Canary { done, stop, task };
        canary.wait_for(1).await;
        canary
    }

    async fn wait_for(&self, n: usize) {
        let reached = common::wait_until_async(HANG_GUARD, || async {
            self.done.load(Ordering::Relaxed) >= n || self.task.is_finished()
        })
        .await;
        assert!(reached, "the canary did not reach {n} queries");
        assert!(!self.task.is_finished() || self.done.load(Ordering::Relaxed) >= n);
    }

    fn count(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        guarded(HANG_GUARD, "canary", self.task)
            .await
            .expect("canary task");
    }
}

fn metrics(proxy: &Proxy) -> Value {
    common::http::get(proxy.admin_port.expect("admin port"), "/metrics").json()
}

/// Server connections the proxy has lent out now (from /pools).
fn lent_connections(proxy: &Proxy) -> u64 {
    let pools = common::http::get(proxy.admin_port.expect("admin port"), "/pools").json();
    pools
        .as_array()
        .expect("/pools is an array")
        .iter()
        .map(|node| {
            node["active_connections"]
                .as_u64()
                .expect("active_connections")
        })
        .sum()
}

fn cut_count(proxy: &Proxy, reason: &str) -> u64 {
    let m = metrics(proxy);
    m["clients_cut"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("/metrics has no clients_cut.{reason}: {m}"))
}

/// A logged-in raw client of the trusted user.
fn raw_client(port: u16) -> RawConn {
    let mut conn = RawConn::connect(port);
    let startup = conn.startup_trust(TRUST_USER, DATABASE);
    assert!(startup.error.is_none(), "login: {:?}", startup.error);
    conn
}

/// The header of a Query announcing `total` bytes (tag included), and `body` bytes of it.
fn partial_query(total: usize, body: usize) -> Vec<u8> {
    let mut bytes = vec![b'Q'];
    bytes.extend_from_slice(&((total - 1) as i32).to_be_bytes());
    bytes.extend(std::iter::repeat_n(b' ', body));
    bytes
}

fn expect_fatal(ending: Ending, code: &str, what: &str) -> String {
    match ending {
        Ending::Error(m) => {
            let fields = m.fields();
            assert_eq!(m.sqlstate(), code, "{what}: {fields:?}");
            assert_eq!(fields[&'S'], "FATAL", "{what}: {fields:?}");
            fields[&'M'].clone()
        }
        other => panic!("{what}: expected FATAL {code}, got {other:?}"),
    }
}

/// Twenty clients each announce a Query of 1,000,004 bytes, send 100 of them and stop.
/// Before, each leased a server connection and kept it: the pool filled and everyone else
/// got 53300. Now the message must be whole before a connection is leased, so the canary
/// never notices, and each stalled client is cut with 08006 at the stall timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_stalled_mid_message_hold_no_server_connection_and_are_cut() {
    if proxy_only("stalled clients", "the stall timeout is the proxy's") {
        return;
    }
    let proxy = Arc::new(Proxy::start(
        common::cluster(),
        &transaction_mode(4, "[timeouts]\nclient_stall_timeout_ms = 3000\n"),
    ));
    let port = proxy.port;
    let canary = Canary::start(proxy.clone()).await;
    let stalled: Vec<RawConn> = tokio::task::spawn_blocking(move || {
        (0..20)
            .map(|_| {
                let mut conn = raw_client(port);
                conn.write_all(&partial_query(1_000_004, 100))
                    .expect("send the partial message");
                conn
            })
            .collect()
    })
    .await
    .expect("stalling clients");
    // While they stall, the canary keeps being served (it would need the pool that the
    // stalled clients used to fill, after acquire_timeout_ms = 2000).
    let before = canary.count();
    canary.wait_for(before + 15).await;
    let lent = lent_connections(&proxy);
    assert!(
        lent <= 1,
        "{lent} server connections lent while twenty clients stall (the canary needs one at most)"
    );
    let endings = tokio::task::spawn_blocking(move || {
        stalled
            .into_iter()
            .map(|mut conn| conn.read_ending(Duration::from_secs(20)))
            .collect::<Vec<_>>()
    })
    .await
    .expect("read endings");
    for ending in endings {
        let message = expect_fatal(ending, "08006", "a stalled client");
        assert!(message.contains("3000 ms"), "{message}");
    }
    assert_eq!(cut_count(&proxy, "client_stall_timeout"), 20);
    canary.finish().await;
    proxy.assert_running();
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Eight clients each send 39 MB of a 40 MB Query and stop. Before, the proxy held all
/// of it (RSS grew by over 300 MB). With `message_memory` = 100 MiB the first two are
/// assembled, the rest are refused at once with 53200, and RSS grows by at most the
/// limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_received_messages_stay_within_message_memory() {
    if proxy_only("message memory", "message_memory is the proxy's") {
        return;
    }
    const MIB: usize = 1024 * 1024;
    let proxy = Arc::new(Proxy::start(
        common::cluster(),
        &transaction_mode(
            4,
            "[limits]\nmessage_memory = 104857600\n[timeouts]\nclient_stall_timeout_ms = 30000\n",
        ),
    ));
    let port = proxy.port;
    let pid = proxy.pid().expect("proxy pid");
    let canary = Canary::start(proxy.clone()).await;
    let rss_before = rss_kib(pid);
    let (endings, rss_during) = tokio::task::spawn_blocking(move || {
        let mut held = Vec::new();
        let mut endings = Vec::new();
        for _ in 0..8 {
            let mut conn = raw_client(port);
            // Written in pieces: a refused client's connection closes part way.
            let bytes = partial_query(40 * MIB, 39 * MIB);
            let sent = bytes.chunks(MIB).all(|chunk| conn.write_all(chunk).is_ok());
            if sent {
                held.push(conn);
            } else {
                endings.push(conn.read_ending(Duration::from_secs(10)));
            }
        }
        // Whatever was accepted is in the proxy now.
        std::thread::sleep(Duration::from_millis(500));
        let rss = rss_kib(pid);
        for mut conn in held {
            endings.push(conn.read_ending(Duration::from_millis(200)));
        }
        (endings, rss)
    })
    .await
    .expect("senders");
    let refused = endings
        .iter()
        .filter(|e| matches!(e, Ending::Error(m) if m.sqlstate() == "53200"))
        .count();
    let grew_mib = rss_during.saturating_sub(rss_before) / 1024;
    println!(
        "RSS {rss_before} KiB before, {rss_during} KiB while eight clients held 39 MB each: +{grew_mib} MiB; {refused} refused with 53200"
    );
    assert_eq!(
        refused, 6,
        "two fit in 100 MiB, six are refused: {endings:?}"
    );
    assert!(
        grew_mib <= 100 + 32,
        "RSS grew by {grew_mib} MiB with message_memory = 100 MiB"
    );
    assert_eq!(cut_count(&proxy, "message_memory"), 6);
    canary.wait_for(canary.count() + 3).await;
    canary.finish().await;
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idle_timeout_ends_an_idle_session_with_57p05() {
    if proxy_only("client_idle_timeout", "PgBouncer's key, on the proxy") {
        return;
    }
    let proxy = Proxy::start(
        common::cluster(),
        &transaction_mode(2, "[timeouts]\nclient_idle_timeout_ms = 700\n"),
    );
    let port = proxy.port;
    let (ending, busy_ok) = tokio::task::spawn_blocking(move || {
        let mut idle = raw_client(port);
        idle.simple_query("SELECT 1");
        // A client that keeps working is not idle.
        let mut busy = raw_client(port);
        let started = Instant::now();
        let mut busy_ok = 0;
        while started.elapsed() < Duration::from_millis(1500) {
            busy.simple_query("SELECT 1");
            busy_ok += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        (idle.read_ending(Duration::from_secs(10)), busy_ok)
    })
    .await
    .expect("clients");
    let message = expect_fatal(ending, "57P05", "an idle client");
    assert_eq!(
        message,
        "terminating connection due to idle-session timeout"
    );
    assert!(busy_ok > 5);
    assert!(cut_count(&proxy, "client_idle_timeout") >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transaction_timeout_rolls_back_and_ends_with_25p03() {
    if proxy_only("idle_transaction_timeout", "PgBouncer's key, on the proxy") {
        return;
    }
    let admin = common::cluster().admin(DATABASE).await;
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS limits_idle_tx (v int)")
        .await
        .expect("table");
    let proxy = Arc::new(Proxy::start(
        common::cluster(),
        &transaction_mode(1, "[timeouts]\nidle_transaction_timeout_ms = 700\n"),
    ));
    let port = proxy.port;
    let ending = tokio::task::spawn_blocking(move || {
        let mut conn = raw_client(port);
        conn.simple_query("BEGIN");
        conn.simple_query("INSERT INTO limits_idle_tx VALUES (25)");
        conn.read_ending(Duration::from_secs(10))
    })
    .await
    .expect("client");
    let message = expect_fatal(ending, "25P03", "a client idle in a transaction");
    assert_eq!(
        message,
        "terminating connection due to idle-in-transaction timeout"
    );
    // The pool's only connection was rolled back and serves the next client.
    let next = proxy.trust_client().await;
    let n: i64 = next
        .query_one("SELECT count(*) FROM limits_idle_tx WHERE v = 25", &[])
        .await
        .expect("the pool's connection is free again")
        .get(0);
    assert_eq!(n, 0, "the abandoned transaction was rolled back");
    assert_eq!(cut_count(&proxy, "idle_transaction_timeout"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_timeout_cancels_and_ends_with_57014() {
    if proxy_only("query_timeout", "PgBouncer's key, on the proxy") {
        return;
    }
    let proxy = Arc::new(Proxy::start(
        common::cluster(),
        &transaction_mode(1, "[timeouts]\nquery_timeout_ms = 700\n"),
    ));
    let port = proxy.port;
    let (ending, took) = tokio::task::spawn_blocking(move || {
        let mut conn = raw_client(port);
        conn.simple_query("SELECT 1");
        let started = Instant::now();
        conn.send(b'Q', b"SELECT pg_sleep(30)\0").expect("send");
        let ending = conn.read_ending(Duration::from_secs(20));
        (ending, started.elapsed())
    })
    .await
    .expect("client");
    let message = expect_fatal(ending, "57014", "a query past query_timeout");
    assert!(message.contains("query timeout"), "{message}");
    assert!(
        took < Duration::from_secs(10),
        "cut after {took:?} with query_timeout_ms = 700 (the query sleeps 30 s)"
    );
    // The sleep was cancelled: the pool's only connection serves the next client.
    let next = proxy.trust_client().await;
    let v: i32 = next
        .query_one("SELECT 7", &[])
        .await
        .expect("the pool's connection is free again")
        .get(0);
    assert_eq!(v, 7);
    let sleeping = common::cluster()
        .admin_i64("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
        .await;
    assert_eq!(sleeping, 0, "the timed-out query still runs on the server");
    assert_eq!(cut_count(&proxy, "query_timeout"), 1);
}

/// `pg_ctl restart -m fast` while a client holds no backend: its next query waits for the
/// server and succeeds; and when the server stays away longer than acquire_timeout_ms, the
/// client gets an ERROR (not FATAL) and keeps its session for when the server is back.
#[test]
fn a_server_restart_costs_a_client_holding_no_backend_nothing() {
    if proxy_only("server restart", "reconnecting is the proxy's") {
        return;
    }
    let pg = PgCluster::start();
    let config = |acquire_ms: u32| {
        format!("[pool_mode]\nmode = \"transaction\"\nacquire_timeout_ms = {acquire_ms}\n[health]\nenabled = false\n")
    };
    let patient = Proxy::start(&pg, &config(30_000));
    let hasty = Proxy::start(&pg, &config(1000));
    let mut client = raw_client(patient.port);
    assert_eq!(
        client.simple_query("SELECT 1").rows,
        vec![vec![Some("1".to_string())]]
    );

    // (a) Down briefly: the query sent meanwhile waits and is answered.
    pg.stop_server();
    client.send(b'Q', b"SELECT 2\0").expect("send while down");
    std::thread::sleep(Duration::from_millis(1500));
    pg.restart_server();
    let messages = client.read_until_ready();
    let errors = common::raw::errors(&messages);
    assert!(errors.is_empty(), "query during the restart: {errors:?}");
    assert_eq!(
        common::raw::first_column(&messages),
        vec![Some("2".to_string())]
    );

    // (b) Down longer than the acquire timeout: an ERROR, and the session survives.
    let mut client = raw_client(hasty.port);
    assert_eq!(
        client.simple_query("SELECT 1").rows,
        vec![vec![Some("1".to_string())]]
    );
    pg.stop_server();
    client.send(b'Q', b"SELECT 3\0").expect("send while down");
    let messages = client.read_until_ready();
    let errors = common::raw::errors(&messages);
    assert_eq!(errors.len(), 1, "{messages:?}");
    let fields = errors[0].fields();
    assert_eq!(fields[&'S'], "ERROR", "{fields:?}");
    assert_eq!(errors[0].sqlstate(), "08006", "{fields:?}");
    // Extended protocol too: the error, then everything up to Sync is skipped.
    client.send_all(&[
        common::raw::parse("", "SELECT 4"),
        common::raw::bind(""),
        common::raw::execute(),
        common::raw::sync(),
    ]);
    let messages = client.read_until_ready();
    assert_eq!(common::raw::errors(&messages).len(), 1, "{messages:?}");
    assert_eq!(messages.last().map(|m| m.body.clone()), Some(b"I".to_vec()));
    pg.restart_server();
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let result = client.simple_query("SELECT 5");
        if result.error.is_none() {
            assert_eq!(result.rows, vec![vec![Some("5".to_string())]]);
            break;
        }
        assert!(Instant::now() < deadline, "no answer after the restart");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Messages of a unit's start (up to `buffered_message_size`) are received whole before a
/// connection is leased: clients stalled inside them hold no server connection, and the
/// bytes they sent count against `message_memory`, so a third is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_messages_are_held_without_a_connection_and_within_message_memory() {
    if proxy_only("first-message intake", "message_memory is the proxy's") {
        return;
    }
    let proxy = Proxy::start(
        common::cluster(),
        &transaction_mode(
            4,
            "[limits]\nmessage_memory = 2097152\n[timeouts]\nclient_stall_timeout_ms = 30000\n",
        ),
    );
    let port = proxy.port;
    let mut held = Vec::new();
    let mut endings = Vec::new();
    for _ in 0..4 {
        let (conn, ending) = tokio::task::spawn_blocking(move || {
            let mut conn = raw_client(port);
            conn.write_all(&partial_query(1_000_000, 900_000))
                .expect("send 900 kB of a 1 MB Query");
            // Refused at once, or kept waiting for the rest.
            let ending = conn.read_ending(Duration::from_millis(500));
            (conn, ending)
        })
        .await
        .expect("sender");
        match ending {
            Ending::Silent => held.push(conn),
            other => endings.push(other),
        }
    }
    assert_eq!(held.len(), 2, "two 900 kB parts fit in 2 MiB: {endings:?}");
    for ending in endings {
        expect_fatal(ending, "53200", "a message past message_memory");
    }
    assert_eq!(
        lent_connections(&proxy),
        0,
        "a server connection was leased for a half-received message"
    );
    let memory = metrics(&proxy)["message_memory_bytes"]
        .as_u64()
        .expect("gauge");
    assert!(
        (1_800_000..=2_097_152).contains(&memory),
        "message_memory_bytes = {memory}"
    );
    // The rest arrives: both run, and the memory is given back.
    let results = tokio::task::spawn_blocking(move || {
        held.into_iter()
            .map(|mut conn| {
                conn.set_read_timeout(Duration::from_secs(30));
                conn.write_all(&[b' '; 99_994])
                    .expect("rest of the query text");
                conn.write_all(b"\0").expect("terminator");
                conn.read_until_ready()
            })
            .collect::<Vec<_>>()
    })
    .await
    .expect("finish");
    for messages in results {
        assert!(
            common::raw::errors(&messages).is_empty(),
            "an all-blank query is an empty query: {messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.tag == b'I'),
            "EmptyQueryResponse: {messages:?}"
        );
    }
    assert_eq!(metrics(&proxy)["message_memory_bytes"].as_u64(), Some(0));
}

/// Messages of every size pass whole, in every pool mode: a Query and a Parse larger than
/// a read buffer and than `buffered_message_size`, a Bind carrying megabytes, and COPY
/// data, sent at once or in pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_pass_in_every_pool_mode() {
    let admin = common::cluster().admin(DATABASE).await;
    admin
        .batch_execute("CREATE TABLE IF NOT EXISTS limits_big (v text)")
        .await
        .expect("table");
    for mode in ["session", "transaction", "statement"] {
        let proxy = common::target(&format!(
            "[pool_mode]\nmode = \"{mode}\"\n[limits]\nbuffered_message_size = 65536\n"
        ));
        let client = proxy.trust_client().await;
        for size in [20_000usize, 70_000, 3_000_000] {
            let sql = format!("SELECT {size} AS n{}", " ".repeat(size));
            let rows = client.simple_query(&sql).await.expect("large Query");
            assert!(
                rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some(size.to_string().as_str()))),
                "{mode}: Query of {size} bytes"
            );
            let text = "x".repeat(size);
            let n: i32 = client
                .query_one(
                    &format!("SELECT length($1::text){}", " ".repeat(size)),
                    &[&text],
                )
                .await
                .expect("large Parse and Bind")
                .get(0);
            assert_eq!(n as usize, size, "{mode}: Bind of {size} bytes");
        }
        let sink = client
            .copy_in("COPY limits_big FROM STDIN")
            .await
            .expect("COPY");
        let mut sink = std::pin::pin!(sink);
        use futures_util::SinkExt;
        let row = format!("{}\n", "y".repeat(2_000_000));
        sink.send(bytes::Bytes::from(row)).await.expect("COPY data");
        let copied = sink.finish().await.expect("COPY done");
        assert_eq!(copied, 1, "{mode}: COPY of a 2 MB row");
    }
}
