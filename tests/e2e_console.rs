//! The SQL admin console through the running proxy: psql on `heliosproxy` and
//! `pgbouncer`, every SHOW with PgBouncer's column names, KILL_CLIENT, PAUSE/RESUME
//! ordering, RELOAD, who may use it (admin and stats users), and what it refuses.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::Ending;
use common::{
    cluster, guarded, proxy_only, psql, sqlstate, Proxy, RawConn, DATABASE, HANG_GUARD, SUPERUSER,
    SUPERUSER_PASSWORD,
};
use tokio_postgres::SimpleQueryMessage;

const ADMIN: &str = "console_admin";
const ADMIN_PASSWORD: &str = "console-admin-secret";
const STATS: &str = "console_stats";
const STATS_PASSWORD: &str = "console-stats-secret";
/// An admin without a password, for the raw protocol client.
const TRUSTED: &str = "console_trusted";

/// The users the console tests need: the superuser for ordinary sessions, an admin and a
/// stats user that exist only in the proxy (the console never logs in to PostgreSQL).
fn overrides(extra: &str) -> String {
    format!(
        r#"
admin_users = ["{ADMIN}", "{TRUSTED}"]
stats_users = ["{STATS}"]
{extra}

[[users]]
name = "{SUPERUSER}"
password = "{SUPERUSER_PASSWORD}"

[[users]]
name = "{ADMIN}"
password = "{ADMIN_PASSWORD}"

[[users]]
name = "{TRUSTED}"
auth_method = "trust"

[[users]]
name = "{STATS}"
password = "{STATS_PASSWORD}"
auth_method = "md5"
"#
    )
}

fn start(extra: &str) -> Proxy {
    Proxy::start(cluster(), &overrides(extra))
}

async fn console(proxy: &Proxy, user: &str, password: &str) -> tokio_postgres::Client {
    proxy
        .connect(user, Some(password), "heliosproxy")
        .await
        .unwrap_or_else(|e| panic!("console login as {user}: {e:?}\n{}", proxy.log()))
}

/// One SHOW's column names and rows (NULL as None).
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Table {
    fn column(&self, name: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("no column {name} in {:?}", self.columns))
    }

    fn get<'a>(&'a self, row: &'a [Option<String>], name: &str) -> Option<&'a str> {
        row[self.column(name)].as_deref()
    }
}

async fn show(client: &tokio_postgres::Client, sql: &str) -> Table {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    let mut table = Table {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for message in messages {
        match message {
            SimpleQueryMessage::RowDescription(columns) => {
                table.columns = columns.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(row) => {
                table.rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(String::from))
                        .collect(),
                );
            }
            _ => {}
        }
    }
    table
}

fn strs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const POOLS_COLUMNS: [&str; 16] = [
    "database",
    "user",
    "cl_active",
    "cl_waiting",
    "cl_active_cancel_req",
    "cl_waiting_cancel_req",
    "sv_active",
    "sv_active_cancel",
    "sv_being_canceled",
    "sv_idle",
    "sv_used",
    "sv_tested",
    "sv_login",
    "maxwait",
    "maxwait_us",
    "pool_mode",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_every_show_use_pgbouncer_columns() {
    if proxy_only("console SHOW", "the console is the proxy's") {
        return;
    }
    let proxy = start("");
    // A regular session, so pools and clients have something to show.
    let app = proxy.client().await;
    app.simple_query("SELECT 1").await.unwrap();

    for database in ["heliosproxy", "pgbouncer"] {
        let out = psql(
            &proxy,
            ADMIN,
            Some(ADMIN_PASSWORD),
            &["-d", database, "-A", "-F", ",", "-c", "SHOW POOLS"],
            None,
        );
        assert!(out.status.success(), "{out}");
        let header = out.stdout.lines().next().unwrap_or_default();
        assert_eq!(header, POOLS_COLUMNS.join(","), "{out}");
        let app_row = format!("{DATABASE},{SUPERUSER},");
        assert!(
            out.stdout.lines().any(|l| l.starts_with(&app_row)),
            "no pool row for {app_row}: {out}"
        );
    }

    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    let pools = show(&admin, "show pools;").await;
    assert_eq!(pools.columns, strs(&POOLS_COLUMNS));
    let row = pools
        .rows
        .iter()
        .find(|r| pools.get(r, "database") == Some(DATABASE))
        .expect("pool of the app session");
    assert_eq!(pools.get(row, "cl_active"), Some("1"));
    assert_eq!(pools.get(row, "pool_mode"), Some("session"));
    assert_eq!(pools.get(row, "sv_active"), Some("1"));

    let stats = show(&admin, "SHOW STATS").await;
    for column in [
        "database",
        "total_xact_count",
        "total_query_count",
        "total_received",
        "total_sent",
        "total_xact_time",
        "total_query_time",
        "total_wait_time",
        "avg_xact_count",
        "avg_query_count",
        "avg_recv",
        "avg_sent",
        "avg_xact_time",
        "avg_query_time",
        "avg_wait_time",
    ] {
        stats.column(column);
    }
    let all = stats
        .rows
        .iter()
        .find(|r| stats.get(r, "database") == Some("(all)"))
        .expect("process-wide row");
    let queries: u64 = stats
        .get(all, "total_query_count")
        .unwrap()
        .parse()
        .unwrap();
    assert!(queries >= 1, "the SELECT 1 was counted");
    let per_db = stats
        .rows
        .iter()
        .find(|r| stats.get(r, "database") == Some(DATABASE))
        .expect("row of the app database");
    assert_eq!(stats.get(per_db, "total_xact_count"), Some("1"));

    let clients = show(&admin, "SHOW CLIENTS").await;
    for column in [
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "local_addr",
        "local_port",
        "connect_time",
        "request_time",
        "wait",
        "wait_us",
        "close_needed",
        "ptr",
        "link",
        "remote_pid",
        "tls",
        "application_name",
        "id",
    ] {
        clients.column(column);
    }
    // The console session itself is a client too.
    assert!(clients
        .rows
        .iter()
        .any(|r| clients.get(r, "database") == Some("heliosproxy")));

    let servers = show(&admin, "SHOW SERVERS").await;
    assert_eq!(servers.columns, clients.columns);
    let server = servers
        .rows
        .iter()
        .find(|r| servers.get(r, "database") == Some(DATABASE))
        .expect("the app session's server");
    assert_eq!(servers.get(server, "type"), Some("S"));
    assert_eq!(
        servers.get(server, "port"),
        Some(&*cluster().port.to_string())
    );

    let databases = show(&admin, "SHOW DATABASES").await;
    assert_eq!(
        databases.columns,
        strs(&[
            "name",
            "host",
            "port",
            "database",
            "force_user",
            "pool_size",
            "min_pool_size",
            "reserve_pool",
            "pool_mode",
            "max_connections",
            "current_connections",
            "paused",
            "disabled",
        ])
    );
    let config = show(&admin, "SHOW CONFIG").await;
    assert_eq!(
        config.columns,
        strs(&["key", "value", "default", "changeable"])
    );
    let key = |k: &str| {
        config
            .rows
            .iter()
            .find(|r| config.get(r, "key") == Some(k))
            .unwrap_or_else(|| panic!("no config key {k}"))
    };
    assert_eq!(config.get(key("workers"), "value"), Some("2"));
    assert_eq!(config.get(key("workers"), "changeable"), Some("no"));
    assert_eq!(
        config.get(key("users[1].password"), "value"),
        Some("<redacted>")
    );

    let version = show(&admin, "SHOW VERSION").await;
    assert_eq!(version.columns, strs(&["version"]));
    assert!(version.rows[0][0]
        .as_deref()
        .unwrap()
        .starts_with("HeliosProxy "));

    let nodes = show(&admin, "SHOW NODES").await;
    let node = &nodes.rows[0];
    assert_eq!(
        nodes.get(node, "address"),
        Some(&*format!("127.0.0.1:{}", cluster().port))
    );
    assert_eq!(nodes.get(node, "role"), Some("primary"));

    let state = show(&admin, "SHOW STATE").await;
    assert_eq!(state.columns, strs(&["key", "value"]));
    assert!(state
        .rows
        .iter()
        .any(|r| r[0].as_deref() == Some("paused") && r[1].as_deref() == Some("no")));

    let users = show(&admin, "SHOW USERS").await;
    assert!(users
        .rows
        .iter()
        .any(|r| users.get(r, "name") == Some(ADMIN)));
    let help = show(&admin, "SHOW HELP").await;
    assert!(help
        .rows
        .iter()
        .any(|r| help.get(r, "command") == Some("KILL_CLIENT <id>")));
    proxy.assert_running();
}

/// The SHOW CLIENTS row of the client with this application_name.
fn client_row<'t>(clients: &'t Table, app: &str) -> &'t Vec<Option<String>> {
    clients
        .rows
        .iter()
        .find(|r| clients.get(r, "application_name") == Some(app))
        .unwrap_or_else(|| panic!("{app} not in SHOW CLIENTS: {:?}", clients.rows))
}

/// KILL_CLIENT `id`, then the victim's next query fails: 57P01, or its connection closed.
async fn kill_and_check(admin: &tokio_postgres::Client, id: &str, victim: &tokio_postgres::Client) {
    admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .unwrap();
    let err = guarded(
        HANG_GUARD,
        "victim's query",
        victim.simple_query("SELECT 2"),
    )
    .await
    .expect_err("a killed client cannot query");
    assert!(victim.is_closed() || sqlstate(&err) == "57P01", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_disconnects_only_that_client() {
    if proxy_only("KILL_CLIENT", "the console is the proxy's") {
        return;
    }
    let proxy = start("");
    let mut cfg = proxy.pg_config(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE);
    cfg.application_name("victim-app");
    let (victim, _driver) = Proxy::connect_with(&cfg).await.unwrap();
    victim.simple_query("SELECT 1").await.unwrap();
    let bystander = proxy.client().await;

    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    let clients = show(&admin, "SHOW CLIENTS").await;
    let row = client_row(&clients, "victim-app");
    assert_eq!(clients.get(row, "user"), Some(SUPERUSER));
    assert_eq!(clients.get(row, "database"), Some(DATABASE));
    let id = clients.get(row, "id").unwrap().to_string();
    kill_and_check(&admin, &id, &victim).await;

    bystander.simple_query("SELECT 3").await.unwrap();
    proxy.assert_running();
    let clients = show(&admin, "SHOW CLIENTS").await;
    assert!(!clients
        .rows
        .iter()
        .any(|r| clients.get(r, "application_name") == Some("victim-app")));

    let err = admin
        .simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .expect_err("no such client any more");
    assert_eq!(sqlstate(&err), "42704", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_client_reaches_a_parked_client() {
    if proxy_only("KILL_CLIENT", "the console is the proxy's") {
        return;
    }
    let proxy = start("[pool_mode]\nmode = \"transaction\"\n[limits]\npark_idle_client_ms = 50\n");
    let mut cfg = proxy.pg_config(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE);
    cfg.application_name("parked-victim");
    let (victim, _driver) = Proxy::connect_with(&cfg).await.unwrap();
    victim.simple_query("SELECT 1").await.unwrap();
    let admin_port = proxy.admin_port.expect("admin port");
    let parked =
        || common::http::get(admin_port, "/metrics").json()["clients_parked"]["now"].as_u64();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while parked() < Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the idle victim was never parked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    let clients = show(&admin, "SHOW CLIENTS").await;
    let id = clients
        .get(client_row(&clients, "parked-victim"), "id")
        .unwrap()
        .to_string();
    kill_and_check(&admin, &id, &victim).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while show(&admin, "SHOW CLIENTS")
        .await
        .rows
        .iter()
        .any(|r| r.iter().any(|v| v.as_deref() == Some("parked-victim")))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the killed client is still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_until_resume() {
    if proxy_only("PAUSE", "the console is the proxy's") {
        return;
    }
    let proxy = start(
        "[pool_mode]\nmode = \"transaction\"\nacquire_timeout_ms = 60000\n[timeouts]\nshutdown_timeout_secs = 20\n",
    );
    // Logged in before PAUSE: a transaction-mode login itself needs a server connection.
    let app = proxy.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    guarded(HANG_GUARD, "PAUSE", admin.simple_query("PAUSE"))
        .await
        .expect("PAUSE returns once no server connection is in use");
    let databases = show(&admin, "SHOW DATABASES").await;
    assert!(databases
        .rows
        .iter()
        .all(|r| databases.get(r, "paused") == Some("1")));
    let state = show(&admin, "SHOW STATE").await;
    assert!(state
        .rows
        .iter()
        .any(|r| r[0].as_deref() == Some("paused") && r[1].as_deref() == Some("yes")));

    let resumed = Arc::new(AtomicBool::new(false));
    let seen = resumed.clone();
    let query = tokio::spawn(async move {
        let rows = app.simple_query("SELECT 42").await;
        (rows.is_ok(), seen.load(Ordering::SeqCst))
    });
    // Give a wrongly unpaused proxy every chance to answer first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!query.is_finished(), "a query ran while paused");

    resumed.store(true, Ordering::SeqCst);
    admin.simple_query("RESUME").await.unwrap();
    let (ok, after_resume) = guarded(HANG_GUARD, "query after RESUME", query)
        .await
        .unwrap();
    assert!(ok, "the held query succeeds after RESUME");
    assert!(after_resume, "the held query finished only after RESUME");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_reports_connections_still_in_use_and_stays_paused() {
    if proxy_only("PAUSE bound", "the console is the proxy's") {
        return;
    }
    let proxy = start("[timeouts]\nshutdown_timeout_secs = 1\n");
    // A session-mode client holds its server connection for the whole session.
    let app = proxy.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    let err = guarded(HANG_GUARD, "PAUSE", admin.simple_query("PAUSE"))
        .await
        .expect_err("a session still holds its connection");
    assert_eq!(sqlstate(&err), "57014", "{err:?}");
    let message = err.as_db_error().unwrap().message().to_string();
    assert!(message.contains("1 server connection"), "{message}");
    let databases = show(&admin, "SHOW DATABASES").await;
    assert!(databases
        .rows
        .iter()
        .all(|r| databases.get(r, "paused") == Some("1")));
    // The session that holds its connection carries on; RESUME lifts the pause.
    app.simple_query("SELECT 2").await.unwrap();
    admin.simple_query("RESUME").await.unwrap();
    let databases = show(&admin, "SHOW DATABASES").await;
    assert!(databases
        .rows
        .iter()
        .all(|r| databases.get(r, "paused") == Some("0")));
    let other = proxy.client().await;
    other.simple_query("SELECT 3").await.unwrap();
}

async fn pool_sizes(admin: &tokio_postgres::Client) -> Vec<String> {
    let databases = show(admin, "SHOW DATABASES").await;
    databases
        .rows
        .iter()
        .filter(|r| databases.get(r, "name") == Some(DATABASE))
        .map(|r| databases.get(r, "pool_size").unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changes_the_pool_size() {
    if proxy_only("RELOAD", "the console is the proxy's") {
        return;
    }
    let proxy = start("[pool_mode]\nmax_pool_size = 7\n");
    let app = proxy.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    assert_eq!(pool_sizes(&admin).await, vec!["7"]);

    proxy.rewrite_config(|c| common::proxy::set_pool_size(c, 9));
    admin.simple_query("RELOAD").await.unwrap();
    assert_eq!(pool_sizes(&admin).await, vec!["9"]);
    let r = common::http::get(proxy.admin_port.unwrap(), "/pools");
    assert_eq!(r.json()[0]["max_connections"], 9);

    // A broken file is refused and the running configuration stays.
    std::fs::write(proxy.config_path.as_ref().unwrap(), "workers = \"many\"\n").unwrap();
    let err = admin.simple_query("RELOAD").await.expect_err("bad file");
    assert_eq!(sqlstate(&err), "F0000", "{err:?}");
    assert_eq!(pool_sizes(&admin).await, vec!["9"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_use_the_console_and_what_it_refuses() {
    if proxy_only("console access", "the console is the proxy's") {
        return;
    }
    let proxy = start("");
    // A configured user who is neither an admin nor a stats user.
    let err = proxy
        .connect(SUPERUSER, Some(SUPERUSER_PASSWORD), "heliosproxy")
        .await
        .expect_err("not a console user");
    assert_eq!(sqlstate(&err), "42501", "{err:?}");
    let err = proxy
        .connect(ADMIN, Some("wrong"), "pgbouncer")
        .await
        .expect_err("wrong password");
    assert_eq!(sqlstate(&err), "28P01", "{err:?}");

    let stats = console(&proxy, STATS, STATS_PASSWORD).await;
    assert!(!show(&stats, "SHOW POOLS").await.columns.is_empty());
    for refused in [
        "PAUSE",
        "RESUME",
        "RELOAD",
        "KILL_CLIENT 1",
        "SHOW VERSION; RESUME",
    ] {
        let err = stats.simple_query(refused).await.expect_err(refused);
        assert_eq!(sqlstate(&err), "42501", "{refused}: {err:?}");
    }

    let admin = console(&proxy, ADMIN, ADMIN_PASSWORD).await;
    let err = admin
        .simple_query("SELECT 1")
        .await
        .expect_err("not a command");
    assert_eq!(sqlstate(&err), "42601", "{err:?}");
    assert!(err.as_db_error().unwrap().message().contains("SHOW POOLS"));
    let err = admin.simple_query("SHUTDOWN").await.expect_err("refused");
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");

    // The extended protocol is refused, and the session goes on.
    let err = admin.query("SHOW POOLS", &[]).await.expect_err("extended");
    assert_eq!(sqlstate(&err), "0A000", "{err:?}");
    let version = show(&admin, "SHOW VERSION").await;
    assert_eq!(version.rows.len(), 1);
    // An empty query is answered like a server does.
    let messages = admin.simple_query(";").await.unwrap();
    assert!(messages.is_empty() || matches!(messages[0], SimpleQueryMessage::CommandComplete(_)));
    proxy.assert_running();
}

#[test]
fn the_protocol_seen_byte_by_byte() {
    if proxy_only("console protocol", "the console is the proxy's") {
        return;
    }
    let proxy = start("");
    let mut raw = RawConn::connect(proxy.port);
    let startup = raw.startup_trust_with(TRUSTED, "pgbouncer", &[("application_name", "raw-app")]);
    assert!(
        startup.error.is_none(),
        "{:?}",
        startup.error.map(|e| e.fields())
    );
    assert_eq!(startup.ready_status, Some(b'I'));
    assert!(startup.backend_key.is_some());
    assert!(
        startup.params["server_version"].contains("HeliosProxy"),
        "{:?}",
        startup.params
    );
    assert_eq!(startup.params["application_name"], "raw-app");
    assert_eq!(startup.params["client_encoding"], "UTF8");
    assert_eq!(startup.params["standard_conforming_strings"], "on");

    // Several commands in one query: one result each, in order.
    let r = raw.simple_query("show version; SHOW HELP;");
    assert!(r.error.is_none(), "{:?}", r.error.map(|e| e.fields()));
    assert_eq!(r.tags, vec!["SHOW", "SHOW"]);
    assert_eq!(r.rows.len(), 1 + 16);
    let r = raw.simple_query("  ");
    assert!(r.error.is_none() && r.tags.is_empty() && r.status == b'I');

    // Parse/Bind/Execute: one 0A000, the rest skipped up to the Sync.
    raw.send(b'P', b"\0SHOW POOLS\0\0\0").unwrap();
    raw.send(b'B', b"\0\0\0\0\0\0\0\0").unwrap();
    raw.send(b'E', b"\0\0\0\0\0").unwrap();
    raw.send(b'S', b"").unwrap();
    let first = raw.read_message().unwrap().expect("an answer");
    assert_eq!((first.tag, first.sqlstate()), (b'E', "0A000".to_string()));
    let second = raw.read_message().unwrap().expect("ReadyForQuery");
    assert_eq!(second.tag, b'Z');
    assert_eq!(raw.simple_query("SHOW VERSION").rows.len(), 1);

    // Shutdown tells an idle console session 57P01.
    proxy.signal(libc::SIGTERM);
    match raw.read_ending(Duration::from_secs(30)) {
        Ending::Error(m) => assert_eq!(m.sqlstate(), "57P01"),
        other => panic!("expected 57P01 at shutdown, got {other:?}"),
    }
    assert!(proxy
        .wait_exit(Duration::from_secs(30))
        .is_some_and(|s| s.success()));

    // A message type that does not exist closes a (new proxy's) session with 08P01.
    let proxy = start("");
    let mut raw = RawConn::connect(proxy.port);
    raw.startup_trust(TRUSTED, "heliosproxy");
    raw.send(b'x', b"junk").unwrap();
    match raw.read_ending(Duration::from_secs(30)) {
        Ending::Error(m) => assert_eq!(m.sqlstate(), "08P01"),
        other => panic!("expected 08P01, got {other:?}"),
    }
    assert!(raw.closed_within(Duration::from_secs(30)));
    proxy.assert_running();
}
