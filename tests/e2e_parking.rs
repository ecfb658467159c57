//! Parked idle clients (`limits.park_idle_client_ms`) through the running proxy in
//! transaction mode: a client idle past the delay leaves its task and is watched by the
//! epoll set; it comes back with its session intact (settings, prepared statements, its
//! place in the stream), its idle timeout still counts from when it went quiet, a
//! hang-up, a shutdown and many clients waking at once all go through the usual paths.

mod common;

use std::time::{Duration, Instant};

use common::raw::{Ending, RawConn};
use common::{guarded, proxy_only, Proxy, HANG_GUARD, TRUST_USER};
use serde_json::Value;

const DATABASE: &str = common::DATABASE;
const PARK_MS: u64 = 100;

fn start(extra: &str) -> Proxy {
    Proxy::start(
        common::cluster(),
        &format!(
            "workers = 1\n[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 4\n\
             [limits]\npark_idle_client_ms = {PARK_MS}\n{extra}"
        ),
    )
}

fn metrics(proxy: &Proxy) -> Value {
    common::http::get(proxy.admin_port.expect("admin port"), "/metrics").json()
}

fn parked_now(proxy: &Proxy) -> u64 {
    metrics(proxy)["clients_parked"]["now"]
        .as_u64()
        .expect("clients_parked.now in /metrics")
}

/// Waits (at most 10 s) until `/metrics` satisfies `done`; `what` names it on failure.
fn wait_metrics(proxy: &Proxy, what: &str, done: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(proxy);
        if done(&m) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} within 10 s: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `n` clients are parked.
fn wait_parked(proxy: &Proxy, n: u64) {
    wait_metrics(proxy, &format!("{n} clients parked"), |m| {
        m["clients_parked"]["now"].as_u64() >= Some(n)
    });
}

fn raw_client(port: u16) -> RawConn {
    let mut conn = RawConn::connect(port);
    let startup = conn.startup_trust(TRUST_USER, DATABASE);
    assert!(startup.error.is_none(), "login: {:?}", startup.error);
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_client_resumes_with_its_session() {
    if proxy_only("parking", "the proxy's own idle-client parking") {
        return;
    }
    let proxy = start("");
    let client = proxy.trust_client().await;
    client
        .batch_execute("SET application_name = 'parked-app'; SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let statement = client
        .prepare(
            "SELECT $1::int4 * 2, current_setting('application_name'), current_setting('TimeZone')",
        )
        .await
        .unwrap();
    let parked_before = metrics(&proxy)["clients_parked"]["parked"]
        .as_u64()
        .unwrap();
    for round in 0..3 {
        tokio::task::block_in_place(|| wait_parked(&proxy, 1));
        let row = guarded(
            HANG_GUARD,
            "query after parking",
            client.query_one(&statement, &[&21i32]),
        )
        .await
        .expect("a parked client's query");
        assert_eq!(row.get::<_, i32>(0), 42, "round {round}");
        assert_eq!(row.get::<_, String>(1), "parked-app");
        assert_eq!(row.get::<_, String>(2), "Asia/Tokyo");
        // A transaction spanning a pause longer than the delay keeps its connection: a
        // client holding a server is never parked.
        client
            .batch_execute("BEGIN; CREATE TEMP TABLE IF NOT EXISTS t (x int)")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(PARK_MS * 4)).await;
        assert_eq!(
            parked_now(&proxy),
            0,
            "a client inside a transaction was parked"
        );
        client
            .batch_execute("INSERT INTO t VALUES (1); ROLLBACK")
            .await
            .unwrap();
    }
    let m = metrics(&proxy);
    assert!(
        m["clients_parked"]["parked"].as_u64().unwrap() >= parked_before + 3,
        "{m}"
    );
    assert!(m["clients_parked"]["woken"].as_u64().unwrap() >= 3, "{m}");
    let prometheus = common::http::get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
    assert!(
        prometheus.contains("heliosdb_proxy_clients_parked_total"),
        "{prometheus}"
    );
    assert!(
        prometheus.contains("heliosdb_proxy_clients_parked "),
        "{prometheus}"
    );
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_parked_clients_wake_at_once_and_a_hang_up_is_seen() {
    if proxy_only("parking", "the proxy's own idle-client parking") {
        return;
    }
    let proxy = start("");
    let port = proxy.port;
    const CLIENTS: usize = 200;
    let mut clients: Vec<RawConn> = (0..CLIENTS).map(|_| raw_client(port)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_all(&[common::raw::query(&format!(
            "SET application_name = 'c{i}'"
        ))]);
        c.read_until_ready();
    }
    tokio::task::block_in_place(|| wait_parked(&proxy, CLIENTS as u64));
    // Every client speaks at once; each gets its own answer.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send_all(&[common::raw::query(&format!(
            "SELECT {i}, current_setting('application_name')"
        ))]);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let messages = c.read_until_ready();
        let row = messages
            .iter()
            .find(|m| m.tag == b'D')
            .unwrap_or_else(|| panic!("client {i}: no row in {messages:?}"));
        let text = String::from_utf8_lossy(&row.body).to_string();
        assert!(
            text.contains(&i.to_string()) && text.contains(&format!("c{i}")),
            "client {i}: {text}"
        );
    }
    // Parked clients that hang up are counted gone.
    tokio::task::block_in_place(|| wait_parked(&proxy, CLIENTS as u64));
    drop(clients);
    wait_metrics(&proxy, "hung-up parked clients no longer counted", |m| {
        m["connections_active"].as_u64() == Some(0)
            && m["clients_parked"]["now"].as_u64() == Some(0)
    });
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_clients_idle_timeout_counts_from_when_it_went_quiet() {
    if proxy_only("parking", "the proxy's own idle-client parking") {
        return;
    }
    let proxy = start("[timeouts]\nclient_idle_timeout_ms = 1500\n");
    let port = proxy.port;
    let (ending, waited) = tokio::task::spawn_blocking(move || {
        let mut idle = raw_client(port);
        idle.simple_query("SELECT 1");
        let quiet = Instant::now();
        let ending = idle.read_ending(Duration::from_secs(15));
        (ending, quiet.elapsed())
    })
    .await
    .unwrap();
    match ending {
        Ending::Error(m) => {
            assert_eq!(m.sqlstate(), "57P05", "{:?}", m.fields());
        }
        other => panic!("expected FATAL 57P05, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(10),
        "idle timeout of 1.5 s ended the session after {waited:?}"
    );
    assert!(
        metrics(&proxy)["clients_parked"]["parked"]
            .as_u64()
            .unwrap()
            >= 1
    );
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_a_parked_client() {
    if proxy_only("parking", "the proxy's own idle-client parking") {
        return;
    }
    let proxy = start("[timeouts]\nshutdown_timeout_secs = 20\n");
    let mut idle = raw_client(proxy.port);
    idle.simple_query("SELECT 1");
    wait_parked(&proxy, 1);
    let started = Instant::now();
    proxy.signal(libc::SIGTERM);
    match idle.read_ending(Duration::from_secs(15)) {
        Ending::Error(m) => assert_eq!(m.sqlstate(), "57P01", "{:?}", m.fields()),
        other => panic!("expected FATAL 57P01 at shutdown, got {other:?}"),
    }
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?}\n{}",
        proxy.log()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a parked client held the shutdown for {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_off_keeps_every_client_a_task() {
    if proxy_only("parking", "the proxy's own idle-client parking") {
        return;
    }
    let proxy = Proxy::start(
        common::cluster(),
        "workers = 1\n[pool_mode]\nmode = \"transaction\"\n[limits]\npark_idle_client_ms = 0\n",
    );
    let client = proxy.trust_client().await;
    client.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    client.simple_query("SELECT 2").await.unwrap();
    assert_eq!(
        metrics(&proxy)["clients_parked"]["parked"].as_u64(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_parking_off_takes_parked_clients_up() {
    if proxy_only("parking", "the proxy's own idle-client parking") {
        return;
    }
    let proxy = start("");
    let client = proxy.trust_client().await;
    client
        .simple_query("SET application_name = 'stays'")
        .await
        .unwrap();
    tokio::task::block_in_place(|| wait_parked(&proxy, 1));
    proxy.rewrite_config(|c| {
        c["limits"]
            .as_table_mut()
            .expect("[limits]")
            .insert("park_idle_client_ms".into(), toml::Value::Integer(0));
    });
    let admin = proxy.admin_port.expect("admin port");
    let reload = common::http::request(admin, "POST", "/config/reload", &[], b"");
    assert_eq!(reload.status, 200, "{}", reload.body);
    tokio::task::block_in_place(|| {
        wait_metrics(&proxy, "parked clients taken up once parking is off", |m| {
            m["clients_parked"]["now"].as_u64() == Some(0)
        })
    });
    // Taken up, not lost: the session goes on with its settings, and is not parked again.
    tokio::time::sleep(Duration::from_millis(PARK_MS * 5)).await;
    let rows = client.simple_query("SHOW application_name").await.unwrap();
    let value = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("stays"));
    assert_eq!(parked_now(&proxy), 0);
}
