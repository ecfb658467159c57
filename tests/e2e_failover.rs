//! High availability on real servers: a primary with a synchronous streaming standby
//! (`synchronous_standby_names`) and a second, asynchronous one, all `pg_basebackup -R`.
//! The primary's postmaster is killed (`kill -9`) under steady autocommit INSERTs from 20
//! clients in transaction mode; the proxy fences it, promotes the synchronous standby
//! (or follows an external promotion), buffers writes meanwhile and resumes on the new
//! primary. Every INSERT a client saw acknowledged must be on the new primary, clients
//! that were idle see no error, every client connection works afterwards, and the old
//! primary restarted writable gets no writes. The switchover buffer's bounds give
//! `08006` and leave the proxy healthy.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{get, request};
use common::{proxy_only, sqlstate, wait_until, PgCluster, Proxy, DATABASE};

const WRITERS: usize = 20;
const IDLE_CLIENTS: usize = 5;

/// A primary, its synchronous standby `sync1` and an asynchronous one.
struct Cluster {
    primary: PgCluster,
    sync: PgCluster,
    async_: PgCluster,
}

impl Cluster {
    fn start() -> Cluster {
        let primary = PgCluster::start();
        let sync = primary.start_standby_named(Some("sync1"));
        let async_ = primary.start_standby_named(Some("async1"));
        primary.psql_admin(
            "postgres",
            // The harness turns synchronous_commit off for speed; a commit acknowledged
            // here must be on the synchronous standby.
            "ALTER SYSTEM SET synchronous_standby_names = 'sync1';\n\
             ALTER SYSTEM SET synchronous_commit = 'on';\n\
             SELECT pg_reload_conf();\n",
        );
        primary.psql_admin(
            DATABASE,
            "CREATE TABLE acked (client int, n int, PRIMARY KEY (client, n));\n",
        );
        // Both standbys streaming, the first one synchronous.
        let mut seen = String::new();
        assert!(
            wait_until(Duration::from_secs(30), || {
                seen = primary.psql_admin(
                    "postgres",
                    "SELECT string_agg(application_name || ':' || sync_state, ',' ORDER BY application_name) \
                     FROM pg_stat_replication;\n",
                );
                seen.trim() == "async1:async,sync1:sync"
            }),
            "standbys not streaming as expected: {seen}"
        );
        Cluster {
            primary,
            sync,
            async_,
        }
    }

    fn address(node: &PgCluster) -> String {
        format!("127.0.0.1:{}", node.port)
    }

    /// The proxy in transaction mode in front of all three.
    fn proxy(&self, failover: &str) -> Proxy {
        Proxy::start(
            &self.primary,
            &format!(
                "[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 40\n\
                 [health]\ncheck_interval_secs = 1\ntimeout_ms = 1000\nfailure_threshold = 3\n\
                 [failover]\nfast_probe_ms = 100\nwrite_timeout_secs = 30\n{failover}\n\
                 [[nodes]]\nname = \"primary\"\nhost = \"127.0.0.1\"\nport = {}\nrole = \"primary\"\n\
                 [[nodes]]\nname = \"sync1\"\nhost = \"127.0.0.1\"\nport = {}\nrole = \"standby\"\n\
                 [[nodes]]\nname = \"async1\"\nhost = \"127.0.0.1\"\nport = {}\nrole = \"standby\"\n",
                self.primary.port, self.sync.port, self.async_.port
            ),
        )
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

/// What the writers saw.
#[derive(Default)]
struct Seen {
    /// (client, n, sent, acknowledged).
    acked: Vec<(i32, i32, Instant, Instant)>,
    /// (client, SQLSTATE) of every error.
    errors: Vec<(i32, String)>,
}

/// `WRITERS` clients inserting (client, n) in autocommit until `stop`.
async fn writers(
    proxy: &Proxy,
    stop: Arc<AtomicBool>,
) -> (
    Vec<tokio::task::JoinHandle<tokio_postgres::Client>>,
    Arc<Mutex<Seen>>,
) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut tasks = Vec::new();
    for client_id in 0..WRITERS as i32 {
        let client = proxy.client().await;
        let stmt = client
            .prepare("INSERT INTO acked (client, n) VALUES ($1, $2)")
            .await
            .expect("prepare");
        let (stop, seen) = (stop.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let sent = Instant::now();
                match client.execute(&stmt, &[&client_id, &n]).await {
                    Ok(_) => seen
                        .lock()
                        .unwrap()
                        .acked
                        .push((client_id, n, sent, Instant::now())),
                    Err(e) => {
                        let code = sqlstate(&e);
                        let code = if code.is_empty() {
                            format!("{e}")
                        } else {
                            code
                        };
                        seen.lock().unwrap().errors.push((client_id, code));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            client
        }));
    }
    (tasks, seen)
}

/// What the new primary holds.
async fn rows_on(node: &PgCluster) -> HashSet<(i32, i32)> {
    let client = node.admin(DATABASE).await;
    client
        .query("SELECT client, n FROM acked", &[])
        .await
        .expect("read the new primary")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Kills the primary under load and checks what the clients saw. Returns the time from
/// the kill to the first acknowledged write.
async fn failover_under_load(
    c: &Cluster,
    proxy: &Proxy,
    promote: impl FnOnce(),
) -> (Duration, usize) {
    assert!(
        wait_until(Duration::from_secs(30), || confirmed_primary(proxy)
            == Some(Cluster::address(&c.primary))),
        "primary not confirmed: {}",
        topology(proxy)
    );
    let idle: Vec<tokio_postgres::Client> =
        futures_util::future::join_all((0..IDLE_CLIENTS).map(|_| proxy.client())).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, seen) = writers(proxy, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = seen.lock().unwrap().acked.len();
    assert!(before > 20, "the writers are not writing: {before} acks");
    c.primary.kill_postmaster();
    // The postmaster is reaped: from here on only a new primary can acknowledge a write
    // (the old one's backends can no longer reach the synchronous standby).
    let killed = Instant::now();
    promote();
    let sync = Cluster::address(&c.sync);
    assert!(
        common::wait_until_async(Duration::from_secs(30), || async {
            confirmed_primary(proxy) == Some(sync.clone())
        })
        .await,
        "the synchronous standby did not become the primary: {}\n{}",
        topology(proxy),
        proxy.log()
    );
    // Writes go on against the new primary for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writers = Vec::new();
    for task in tasks {
        writers.push(task.await.expect("writer"));
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let after_kill: Vec<&(i32, i32, Instant, Instant)> = seen
        .acked
        .iter()
        .filter(|(_, _, sent, _)| *sent > killed)
        .collect();
    let first = after_kill
        .iter()
        .map(|(_, _, _, acked)| *acked)
        .min()
        .expect("no write sent after the kill was acknowledged");
    // Every acknowledged INSERT survived the failover.
    let on_new_primary = rows_on(&c.sync).await;
    let lost: Vec<(i32, i32)> = seen
        .acked
        .iter()
        .map(|(c, n, _, _)| (*c, *n))
        .filter(|row| !on_new_primary.contains(row))
        .collect();
    if !lost.is_empty() {
        let lost_set: HashSet<(i32, i32)> = lost.iter().copied().collect();
        let before_kill = seen
            .acked
            .iter()
            .filter(|(c, n, _, at)| *at < killed && lost_set.contains(&(*c, *n)))
            .count();
        let on_async = rows_on(&c.async_).await;
        panic!(
            "{} acknowledged writes lost ({before_kill} acknowledged before the kill; {} rows on the new primary, {} on the other standby): first {:?}\n{}",
            lost.len(),
            on_new_primary.len(),
            on_async.len(),
            &lost[..lost.len().min(10)],
            proxy.log()
        );
    }
    // Only a statement in flight at the moment of the kill may fail, and only with
    // "connection lost" (08006) or "outcome unknown" (08007).
    for (client, code) in &seen.errors {
        assert!(
            code == "08006" || code == "08007",
            "client {client} got {code}: {:?}\n{}",
            seen.errors,
            proxy.log()
        );
    }
    let mut per_client = std::collections::HashMap::new();
    for (client, _) in &seen.errors {
        *per_client.entry(*client).or_insert(0) += 1;
    }
    assert!(
        per_client.values().all(|n| *n <= 1),
        "a client saw more than its in-flight statement fail: {:?}",
        seen.errors
    );
    // Every connection, busy or idle through it all, still works.
    for client in writers.iter().chain(idle.iter()) {
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .unwrap_or_else(|e| panic!("a client connection broke: {e:?}"))
            .get(0);
        assert_eq!(one, 1);
    }
    println!(
        "kill -9 to first acknowledged write: {:?}; {} writes acknowledged ({} after the kill), {} errors, 0 lost; {}",
        first - killed,
        seen.acked.len(),
        after_kill.len(),
        seen.errors.len(),
        topology(proxy)["last_failover"]
    );
    (first - killed, seen.errors.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_primary_promotes_the_sync_standby_and_fences_the_old_one() {
    if proxy_only("failover", "failover is the proxy's") {
        return;
    }
    let c = Cluster::start();
    let proxy = c.proxy("");
    failover_under_load(&c, &proxy, || {}).await;
    let t = topology(&proxy);
    assert_eq!(t["failovers"], 1, "{t}");
    let last = &t["last_failover"];
    assert_eq!(last["outcome"], "completed", "{t}");
    assert_eq!(last["trigger"], "primary_down", "{t}");
    let steps: Vec<&str> = last["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    for step in [
        "detected",
        "fenced",
        "candidates",
        "promoting",
        "confirmed",
        "resumed",
    ] {
        assert!(steps.contains(&step), "{step} missing: {t}");
    }
    let metrics = get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
    assert!(
        metrics.contains("heliosdb_proxy_failovers_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "heliosdb_proxy_primary{{node=\"{}\"}} 1",
            Cluster::address(&c.sync)
        )),
        "{metrics}"
    );

    // (d) The old primary comes back writable: fenced, reported, and given no writes.
    let old = Cluster::address(&c.primary);
    c.primary.restart_after_crash();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let nodes = get(proxy.admin_port.unwrap(), "/nodes").json();
            nodes.as_array().unwrap().iter().any(|n| {
                n["address"] == old.as_str() && n["writable"] == true && n["fenced"] == true
            })
        }),
        "the old primary was not seen writable and fenced: {}",
        get(proxy.admin_port.unwrap(), "/nodes").body
    );
    assert_eq!(topology(&proxy)["split_brain"], true);
    // A reload (the file still calls the old node the primary) changes none of that.
    let reload = request(
        proxy.admin_port.unwrap(),
        "POST",
        "/config/reload",
        &[],
        b"",
    );
    assert_eq!(reload.status, 200, "{}", reload.body);
    let t = topology(&proxy);
    assert_eq!(t["primary"], Cluster::address(&c.sync).as_str(), "{t}");
    assert!(
        t["fenced"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == old.as_str()),
        "{t}"
    );
    let before: i64 = c
        .primary
        .admin_i64_in(DATABASE, "SELECT count(*) FROM acked")
        .await;
    let client = proxy.client().await;
    for n in 0..50 {
        client
            .execute("INSERT INTO acked (client, n) VALUES (-1, $1)", &[&n])
            .await
            .expect("a write through the proxy");
    }
    let after: i64 = c
        .primary
        .admin_i64_in(DATABASE, "SELECT count(*) FROM acked")
        .await;
    assert_eq!(before, after, "the fenced old primary got writes");
    let on_new: i64 = c
        .sync
        .admin_i64_in(DATABASE, "SELECT count(*) FROM acked WHERE client = -1")
        .await;
    assert_eq!(on_new, 50);
    let metrics = get(proxy.admin_port.unwrap(), "/metrics/prometheus").body;
    assert!(
        metrics.contains("heliosdb_proxy_writable_nodes 2"),
        "{metrics}"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_promotion_is_followed_without_auto_promote() {
    if proxy_only("external promotion", "failover is the proxy's") {
        return;
    }
    let c = Cluster::start();
    let proxy = c.proxy("auto_promote = false");
    let admin = proxy.admin_port.unwrap();
    let sync = &c.sync;
    failover_under_load(&c, &proxy, || {
        // The external manager: waits until the proxy has given up on the primary,
        // then promotes the synchronous standby itself.
        assert!(
            wait_until(Duration::from_secs(30), || get(admin, "/topology").json()
                ["state"]
                == "none"),
            "the primary was not declared down"
        );
        sync.promote();
    })
    .await;
    let t = topology(&proxy);
    assert_eq!(t["last_failover"]["outcome"], "completed", "{t}");
    let steps = t["last_failover"]["steps"].to_string();
    assert!(
        !steps.contains("promoting"),
        "the proxy promoted by itself: {t}"
    );
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buffer_bounds_end_waits_with_08006_and_the_proxy_stays_healthy() {
    if proxy_only("buffer bounds", "the switchover buffer is the proxy's") {
        return;
    }
    // A lone primary: when it stops there is nothing to promote, so writes can only wait.
    let primary = PgCluster::start();
    let proxy = Proxy::start(
        &primary,
        "workers = 1\n[pool_mode]\nmode = \"transaction\"\n\
         [health]\ncheck_interval_secs = 1\ntimeout_ms = 1000\nfailure_threshold = 2\n\
         [failover]\nfast_probe_ms = 100\nwrite_timeout_secs = 1\nbuffer_max = 2\n",
    );
    let admin = proxy.admin_port.unwrap();
    assert!(wait_until(Duration::from_secs(30), || confirmed_primary(
        &proxy
    )
    .is_some()));
    let clients: Vec<tokio_postgres::Client> =
        futures_util::future::join_all((0..5).map(|_| proxy.client())).await;
    primary.stop_server();
    assert!(
        wait_until(Duration::from_secs(30), || get(admin, "/topology").json()
            ["state"]
            == "none"),
        "the primary was not declared down: {}",
        get(admin, "/topology").body
    );
    let started = Instant::now();
    let results =
        futures_util::future::join_all(clients.iter().map(|c| c.simple_query("SELECT 1"))).await;
    let waited = started.elapsed();
    let mut full = 0;
    for result in &results {
        let e = result
            .as_ref()
            .expect_err("no primary: the request must fail");
        assert_eq!(sqlstate(e), "08006", "{e:?}");
        let message = e.as_db_error().unwrap().message();
        assert!(message.contains("failover in progress"), "{message}");
        if message.contains("buffer_max") {
            full += 1;
        }
    }
    // Two wait (buffer_max), the others are refused at once; the waiters give up after
    // write_timeout_secs.
    assert_eq!(full, 3, "{results:?}");
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    let metrics = get(admin, "/metrics").json();
    assert_eq!(metrics["buffer_overflows"], 3, "{metrics}");
    assert_eq!(metrics["buffer_timeouts"], 2, "{metrics}");
    // A login meanwhile waits for a primary like a statement, then is told the same.
    let err = proxy
        .connect(
            common::SUPERUSER,
            Some(common::SUPERUSER_PASSWORD),
            DATABASE,
        )
        .await
        .expect_err("no primary: the login must fail");
    assert_eq!(sqlstate(&err), "08006", "{err:?}");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("failover in progress"),
        "{err:?}"
    );
    // The proxy stays up and answers probes; each client connection is still usable.
    assert_eq!(get(admin, "/health/live").status, 200);
    proxy.assert_running();
    // The primary back (nothing else took its place): writes flow again, on the same
    // client connections.
    primary.restart_server();
    assert!(
        wait_until(Duration::from_secs(30), || confirmed_primary(&proxy)
            .is_some()),
        "the primary did not come back: {}",
        get(admin, "/topology").body
    );
    for client in &clients {
        client
            .simple_query("SELECT 1")
            .await
            .expect("after the primary came back");
    }
    let reload = request(admin, "GET", "/topology", &[], b"");
    assert_eq!(reload.status, 200);
    proxy.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_under_load_loses_nothing_and_shows_no_error() {
    if proxy_only("switchover", "switchover is the proxy's") {
        return;
    }
    let c = Cluster::start();
    let proxy = c.proxy("");
    let admin = proxy.admin_port.unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || confirmed_primary(&proxy)
            == Some(Cluster::address(&c.primary))),
        "primary not confirmed: {}",
        topology(&proxy)
    );
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, seen) = writers(&proxy, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let target = Cluster::address(&c.sync);
    let body = format!("{{\"target\": \"{target}\"}}");
    let started = Instant::now();
    let reply = tokio::task::spawn_blocking(move || {
        request(admin, "POST", "/switchover", &[], body.as_bytes())
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(reply.status, 200, "{}\n{}", reply.body, proxy.log());
    assert_eq!(reply.json()["primary"], target.as_str(), "{}", reply.body);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("writer");
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.errors.is_empty(),
        "autocommit clients saw errors: {:?}\n{}",
        seen.errors,
        proxy.log()
    );
    let on_new_primary = rows_on(&c.sync).await;
    let lost = seen
        .acked
        .iter()
        .filter(|(c, n, _, _)| !on_new_primary.contains(&(*c, *n)))
        .count();
    assert_eq!(lost, 0, "acknowledged writes lost in the switchover");
    let t = topology(&proxy);
    let last = &t["last_failover"];
    assert_eq!(last["trigger"], "switchover", "{t}");
    assert_eq!(last["outcome"], "completed", "{t}");
    // The old primary refuses writes and gets none; it is fenced until rebuilt.
    let old = Cluster::address(&c.primary);
    let nodes = get(admin, "/nodes").json();
    let old_node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["address"] == old.as_str())
        .unwrap()
        .clone();
    assert_eq!(old_node["fenced"], true, "{nodes}");
    assert_eq!(t["split_brain"], false, "{t}");
    let read_only = c
        .primary
        .psql_admin("postgres", "SHOW default_transaction_read_only;\n");
    assert_eq!(read_only.trim(), "on");
    println!(
        "switchover took {took:?} under load: {} writes acknowledged, 0 errors, 0 lost; {}",
        seen.acked.len(),
        last
    );
    proxy.stop();
}
