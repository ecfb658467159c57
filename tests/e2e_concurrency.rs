//! 200 concurrent clients, each with its own protocol-level prepared statements (different
//! SQL per client under the same statement names), its own `application_name` and its own
//! custom GUC `helios.client`, checking in every round that the answers and settings are its
//! own. Alone in its binary so the backend count on PostgreSQL is this test's alone.
//!
//! In transaction mode 200 clients share 20 backends (10 per worker): every statement name
//! and every SET must follow the client from backend to backend. Session mode cannot hold
//! 200 clients on 20 backends (a client keeps its backend until it leaves), so the
//! session-mode test gives the pool room for all of them; with HELIOS_TEST_TARGET=direct it
//! runs the same clients against PostgreSQL itself, which validates the scenario.
//!
//! The clients speak the wire protocol themselves (tokio-postgres picks its own statement
//! names, unique per process) and log in as the password-less user, so 200 logins cost no
//! SCRAM.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

use common::{guarded, target, Proxy, DATABASE, TRUST_USER};

const CLIENTS: usize = 200;
const ROUNDS: usize = 20;
/// Every client's whole run; the test as a whole gets a little more.
const CLIENT_LIMIT: Duration = Duration::from_secs(90);

/// One client's connection: a socket with a read buffer.
struct Wire {
    stream: BufReader<TcpStream>,
    id: usize,
}

/// What the server answered up to ReadyForQuery.
#[derive(Debug, Default)]
struct Outcome {
    rows: Vec<Vec<Option<String>>>,
    errors: Vec<String>,
    status: u8,
}

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let len = i32::try_from(body.len() + 4).expect("message fits i32");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(body: &mut Vec<u8>, s: &str) {
    body.extend_from_slice(s.as_bytes());
    body.push(0);
}

fn query(out: &mut Vec<u8>, sql: &str) {
    let mut body = Vec::new();
    cstr(&mut body, sql);
    message(out, b'Q', &body);
}

fn parse(out: &mut Vec<u8>, name: &str, sql: &str) {
    let mut body = Vec::new();
    cstr(&mut body, name);
    cstr(&mut body, sql);
    body.extend_from_slice(&0i16.to_be_bytes());
    message(out, b'P', &body);
}

/// Bind (text parameters and results) to the unnamed portal, then Execute it.
fn bind_execute(out: &mut Vec<u8>, statement: &str, params: &[&str]) {
    let mut body = Vec::new();
    cstr(&mut body, "");
    cstr(&mut body, statement);
    body.extend_from_slice(&0i16.to_be_bytes());
    let count = i16::try_from(params.len()).expect("few parameters");
    body.extend_from_slice(&count.to_be_bytes());
    for p in params {
        let len = i32::try_from(p.len()).expect("short parameter");
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(p.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    message(out, b'B', &body);
    let mut exec = Vec::new();
    cstr(&mut exec, "");
    exec.extend_from_slice(&0i32.to_be_bytes());
    message(out, b'E', &exec);
}

fn sync(out: &mut Vec<u8>) {
    message(out, b'S', &[]);
}

impl Wire {
    /// Connects and logs in as the password-less user.
    async fn connect(target: &Proxy, id: usize) -> Result<Wire, String> {
        let stream = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("client {id}: connect: {e}"))?;
        stream.set_nodelay(true).ok();
        let mut wire = Wire {
            stream: BufReader::new(stream),
            id,
        };
        let mut params = Vec::new();
        params.extend_from_slice(&196_608i32.to_be_bytes());
        for (k, v) in [("user", TRUST_USER), ("database", DATABASE)] {
            cstr(&mut params, k);
            cstr(&mut params, v);
        }
        params.push(0);
        let mut startup = Vec::new();
        let len = i32::try_from(params.len() + 4).expect("short startup packet");
        startup.extend_from_slice(&len.to_be_bytes());
        startup.extend_from_slice(&params);
        wire.send(&startup).await?;
        let outcome = wire.until_ready().await?;
        if !outcome.errors.is_empty() {
            return Err(format!("client {id}: login: {:?}", outcome.errors));
        }
        Ok(wire)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .get_mut()
            .write_all(bytes)
            .await
            .map_err(|e| format!("client {}: write: {e}", self.id))
    }

    async fn read_message(&mut self) -> Result<(u8, Vec<u8>), String> {
        let id = self.id;
        let tag = self
            .stream
            .read_u8()
            .await
            .map_err(|e| format!("client {id}: read: {e}"))?;
        let len = self
            .stream
            .read_i32()
            .await
            .map_err(|e| format!("client {id}: read: {e}"))?;
        let len = usize::try_from(len - 4).map_err(|_| format!("client {id}: bad length"))?;
        let mut body = vec![0; len];
        self.stream
            .read_exact(&mut body)
            .await
            .map_err(|e| format!("client {id}: read: {e}"))?;
        Ok((tag, body))
    }

    /// Reads messages up to ReadyForQuery, keeping data rows and errors.
    async fn until_ready(&mut self) -> Result<Outcome, String> {
        let mut outcome = Outcome::default();
        loop {
            let (tag, body) = self.read_message().await?;
            match tag {
                b'Z' => {
                    outcome.status = body.first().copied().unwrap_or(0);
                    return Ok(outcome);
                }
                b'D' => outcome.rows.push(data_row(&body)),
                b'E' => outcome.errors.push(error_text(&body)),
                b'R' => {
                    let code = body
                        .get(..4)
                        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if code != Some(0) {
                        return Err(format!(
                            "client {}: server asked for authentication {code:?}",
                            self.id
                        ));
                    }
                }
                // ParameterStatus, BackendKeyData, ParseComplete, BindComplete,
                // CommandComplete, NoticeResponse, RowDescription, NoData…
                _ => {}
            }
        }
    }

    /// Sends `bytes` and reads the answer up to ReadyForQuery.
    async fn round_trip(&mut self, bytes: &[u8]) -> Result<Outcome, String> {
        self.send(bytes).await?;
        self.until_ready().await
    }

    async fn simple(&mut self, sql: &str, want_status: u8) -> Result<(), String> {
        let mut out = Vec::new();
        query(&mut out, sql);
        let outcome = self.round_trip(&out).await?;
        if !outcome.errors.is_empty() || outcome.status != want_status {
            return Err(format!(
                "client {}: {sql}: errors {:?}, status {:?} (want {:?})",
                self.id, outcome.errors, outcome.status as char, want_status as char
            ));
        }
        Ok(())
    }
}

fn data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut fields = Vec::new();
    let count = i16::from_be_bytes([body[0], body[1]]);
    let mut at = 2;
    for _ in 0..count {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            fields.push(None);
        } else {
            let len = len as usize;
            fields.push(Some(
                String::from_utf8_lossy(&body[at..at + len]).into_owned(),
            ));
            at += len;
        }
    }
    fields
}

/// "SQLSTATE message" of an ErrorResponse.
fn error_text(body: &[u8]) -> String {
    let (mut code, mut text) = (String::new(), String::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = value,
            b'M' => text = value,
            _ => {}
        }
    }
    format!("{code} {text}")
}

/// Client `n`'s statements: the same names for everyone, its own SQL behind two of them.
fn statements(n: usize) -> [(&'static str, String); 3] {
    [
        ("val", format!("SELECT $1::int * 1000 + {n}")),
        ("tag", format!("SELECT 'client-{n}:' || $1::text")),
        (
            "env",
            "SELECT current_setting('application_name'), current_setting('helios.client')"
                .to_string(),
        ),
    ]
}

/// Sets up client `n`: its settings and its prepared statements.
async fn setup(wire: &mut Wire, n: usize) -> Result<(), String> {
    wire.simple(&format!("SET application_name = 'client-{n}'"), b'I')
        .await?;
    wire.simple(&format!("SET helios.client = '{n}'"), b'I')
        .await?;
    let mut out = Vec::new();
    for (name, sql) in statements(n) {
        parse(&mut out, name, &sql);
    }
    sync(&mut out);
    let outcome = wire.round_trip(&out).await?;
    if !outcome.errors.is_empty() || outcome.status != b'I' {
        return Err(format!(
            "client {n}: Parse: {:?} status {:?}",
            outcome.errors, outcome.status as char
        ));
    }
    Ok(())
}

/// One round: the three statements in one Sync, inside an explicit transaction every fifth
/// round; every answer must be client `n`'s own.
async fn round(wire: &mut Wire, n: usize, r: usize) -> Result<(), String> {
    let in_tx = r % 5 == 4;
    if in_tx {
        wire.simple("BEGIN", b'T').await?;
    }
    let arg = r.to_string();
    let mut out = Vec::new();
    bind_execute(&mut out, "val", &[&arg]);
    bind_execute(&mut out, "tag", &[&arg]);
    bind_execute(&mut out, "env", &[]);
    sync(&mut out);
    let outcome = wire.round_trip(&out).await?;
    let want_rows = vec![
        vec![Some((r * 1000 + n).to_string())],
        vec![Some(format!("client-{n}:{r}"))],
        vec![Some(format!("client-{n}")), Some(n.to_string())],
    ];
    let want_status = if in_tx { b'T' } else { b'I' };
    if !outcome.errors.is_empty() || outcome.rows != want_rows || outcome.status != want_status {
        return Err(format!(
            "client {n} round {r}: got rows {:?} errors {:?} status {:?}; want rows {want_rows:?} \
             status {:?}",
            outcome.rows, outcome.errors, outcome.status as char, want_status as char
        ));
    }
    if in_tx {
        wire.simple("COMMIT", b'I').await?;
    }
    Ok(())
}

/// The two tests count every backend on database `app`, so they must not overlap.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs every client at once, checking backends on PostgreSQL meanwhile; returns the most
/// backends seen on database `app` at one time.
async fn run_clients(target: Arc<Proxy>) -> i64 {
    let _alone = ONE_AT_A_TIME.lock().await;
    let admin = common::cluster().admin("postgres").await;
    // Backends another test's proxy still keeps open do not count.
    let since: String = admin
        .query_one("SELECT clock_timestamp()::text", &[])
        .await
        .expect("server clock")
        .get(0);
    let peak = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (peak, done) = (peak.clone(), done.clone());
        let since = since.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok(row) = admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = $1 AND backend_type = 'client backend' \
                         AND backend_start >= $2::text::timestamptz",
                        &[&DATABASE, &since],
                    )
                    .await
                {
                    peak.fetch_max(row.get::<_, i64>(0), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let all_set_up = Arc::new(Barrier::new(CLIENTS));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..CLIENTS {
        let (target, all_set_up) = (target.clone(), all_set_up.clone());
        tasks.spawn(async move {
            let run = async {
                let ready = async {
                    let mut wire = Wire::connect(&target, n).await?;
                    setup(&mut wire, n).await?;
                    Ok::<Wire, String>(wire)
                }
                .await;
                // Every client is connected and set up before any round starts, so all 200
                // are alive at once; a failed one still arrives so the others go on.
                all_set_up.wait().await;
                let mut wire = ready?;
                for r in 0..ROUNDS {
                    // Small, different pauses interleave the clients' transactions.
                    tokio::time::sleep(Duration::from_millis(((n * 7 + r * 3) % 5) as u64)).await;
                    round(&mut wire, n, r).await?;
                }
                let mut bye = Vec::new();
                message(&mut bye, b'X', &[]);
                wire.send(&bye).await
            };
            match tokio::time::timeout(CLIENT_LIMIT, run).await {
                Ok(result) => result,
                Err(_) => Err(format!("client {n} did not finish within {CLIENT_LIMIT:?}")),
            }
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.expect("client task") {
            failures.push(e);
        }
    }
    done.store(true, Ordering::Relaxed);
    monitor.await.expect("backend monitor");
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed; first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    peak.load(Ordering::Relaxed)
}

/// Session mode keeps a backend per client, so the pool has room for all 200 (140 per
/// worker, leaving room for an uneven spread). In direct mode: the same clients against
/// PostgreSQL, validating the scenario.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_keep_their_own_statements_and_settings() {
    let target = Arc::new(target(
        "[pool_mode]\nmode = \"session\"\nmax_pool_size = 280\nacquire_timeout_ms = 20000\n",
    ));
    let peak = guarded(
        CLIENT_LIMIT + Duration::from_secs(30),
        "200 clients",
        run_clients(target.clone()),
    )
    .await;
    println!("peak backends on {DATABASE}: {peak}");
    if !target.is_direct() {
        assert!(
            peak <= target.max_pool_size(),
            "{peak} backends, more than max_pool_size"
        );
        target.assert_running();
    }
}

/// Transaction mode: 200 clients share 20 backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_share_twenty_backends_in_transaction_mode() {
    if common::proxy_only(
        "two_hundred_clients_share_twenty_backends_in_transaction_mode",
        "two_hundred_clients_keep_their_own_statements_and_settings runs these clients \
         against PostgreSQL",
    ) {
        return;
    }
    let target = Arc::new(target(
        "[pool_mode]\nmode = \"transaction\"\nmax_pool_size = 20\nacquire_timeout_ms = 20000\n",
    ));
    let peak = guarded(
        CLIENT_LIMIT + Duration::from_secs(30),
        "200 clients",
        run_clients(target.clone()),
    )
    .await;
    println!("peak backends on {DATABASE}: {peak}");
    assert!(peak <= 20, "{peak} backends for max_pool_size = 20");
    target.assert_running();
}
