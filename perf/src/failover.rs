//! The `failover` workload: how long writes through the proxy stop when the primary dies.
//!
//! Each run builds a fresh pair — a primary and a synchronous streaming standby (`sync1`),
//! so an acknowledged write is on the standby — and a transaction-mode proxy in front of
//! both. One writer inserts a row at a time through the proxy; after a second of writes
//! the primary's postmaster gets SIGKILL. The figure is the time from the kill to the
//! acknowledgement of the first write sent after it *by the promoted standby*: the killed
//! postmaster's backends (and WAL sender) live on until they notice, and for a few
//! milliseconds can still commit and acknowledge writes, which says nothing about the
//! failover. Each INSERT returns `inet_server_port()`, so the writer knows which server
//! acknowledged it; the first acknowledgement from any server is reported beside it,
//! with the writes that failed meanwhile and the proxy's own detection → resume time
//! (`/topology`). Two proxy configurations (health and failover defaults, and tuned
//! ones) run in turn.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::standby::{setup_standby, StandbySpec};
use super::{
    admin_get, interrupted, log, median, pid_of, psql, setup_proxy, start_postgres, wire, Mode,
    PgTools, ProxySpec, Res, RunAs, Services, DB_NAME,
};

/// The workload's name for `--only` and `--list`.
pub(crate) const NAME: &str = "failover";
/// The workload's line in report.md's list.
pub(crate) const DESCRIPTION: &str = "per run a fresh primary and synchronous streaming \
standby (pg_basebackup -R, cluster_name = 'sync1', synchronous_commit = on) behind a \
transaction-mode proxy; one client INSERTs a row at a time through the proxy, the \
primary's postmaster gets SIGKILL after a second of writes, and the figure is the time \
from the kill to the acknowledgement, by the promoted standby, of the first write sent \
after it (each INSERT returns inet_server_port(); the old primary's orphaned backends \
can still acknowledge writes for a few milliseconds after the kill, reported as \
kill->any ack); no PgBouncer or direct counterpart";
/// The standby's `cluster_name`, named in the primary's `synchronous_standby_names`.
const SYNC_NAME: &str = "sync1";
/// Returns the port of the server that ran it: which node acknowledged the write.
const INSERT: &str = "INSERT INTO failover_probe DEFAULT VALUES RETURNING inet_server_port()";
/// Writes acknowledged before the kill, so the pools and the writer are warm.
const WRITE_BEFORE_KILL: Duration = Duration::from_secs(1);
/// A run fails when no write sent after the kill is acknowledged within this.
const ACK_LIMIT: Duration = Duration::from_secs(30);
/// Pause after a failed write or login, as a client retrying would (and so a refusing
/// proxy does not spin the writer on a 2-core machine).
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How often a blocked read of the writer looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);

/// One proxy configuration under test.
pub(crate) struct Setting {
    name: &'static str,
    /// `[health]`/`[failover]` TOML added to the proxy's configuration.
    toml: &'static str,
}

const SETTINGS: [Setting; 2] = [
    // Only what every proxy of the harness has: the defaults are what is measured.
    Setting {
        name: "default",
        toml: "",
    },
    Setting {
        name: "tuned",
        toml: "[health]\ncheck_interval_secs = 0.5\ntimeout_ms = 500\nfailure_threshold = 2\n\n\
               [failover]\nfast_probe_ms = 50\n",
    },
];

/// Runs per setting.
pub(crate) fn runs_per_setting(mode: Mode) -> u32 {
    match mode {
        Mode::Quick => 3,
        Mode::Full => 5,
    }
}

#[derive(Serialize)]
pub(crate) struct FailoverRun {
    run: u32,
    /// A write sent after the kill was acknowledged by the new primary within the limit.
    ok: bool,
    /// Kill of the postmaster → acknowledgement, by the promoted standby, of the first
    /// write sent after the kill.
    kill_to_ack_ms: Option<f64>,
    /// Kill → the first acknowledgement of a write sent after it, from either server.
    kill_to_any_ack_ms: Option<f64>,
    /// Writes sent after the kill that the old primary's orphaned backends acknowledged,
    /// and when the last of those acknowledgements came.
    old_primary_acks_after_kill: usize,
    kill_to_last_old_ack_ms: Option<f64>,
    /// Writes acknowledged before the kill.
    acked_before_kill: usize,
    /// Writes answered with an error or cut off by a lost connection.
    failed_writes: usize,
    /// Logins (reconnections after a lost connection) that failed.
    failed_logins: usize,
    /// Failed writes by error text.
    errors: BTreeMap<String, usize>,
    /// `/topology` afterwards: `last_failover.duration_ms` (detection → resume).
    proxy_failover_ms: Option<f64>,
    proxy_outcome: Option<String>,
    proxy_steps: serde_json::Value,
    new_primary: Option<String>,
    /// Acknowledged writes (before and after the kill) against rows on the new primary.
    acked_writes: usize,
    rows_on_new_primary: Option<u64>,
    /// Processes of the killed server still running when the run ended, stopped by PID.
    orphans_stopped: usize,
    postgres_version: String,
    proxy_commit: String,
    error: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct FailoverResult {
    pub setting: &'static str,
    /// What the setting adds to the proxy's configuration.
    pub proxy_config: &'static str,
    pub runs: Vec<FailoverRun>,
    pub ok_runs: usize,
    /// Of `kill_to_ack_ms` over the counted runs.
    pub median_ms: Option<f64>,
    pub min_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Median of `kill_to_any_ack_ms` over the counted runs.
    pub median_any_ack_ms: Option<f64>,
    /// Median of the proxy's `last_failover.duration_ms` over the counted runs.
    pub median_proxy_failover_ms: Option<f64>,
    /// Over every run.
    pub failed_writes: usize,
}

impl FailoverResult {
    fn new(setting: &Setting) -> Self {
        FailoverResult {
            setting: setting.name,
            proxy_config: setting.toml,
            runs: Vec::new(),
            ok_runs: 0,
            median_ms: None,
            min_ms: None,
            max_ms: None,
            median_any_ack_ms: None,
            median_proxy_failover_ms: None,
            failed_writes: 0,
        }
    }

    fn summarize(&mut self) {
        let ok: Vec<&FailoverRun> = self.runs.iter().filter(|r| r.ok).collect();
        let mut ms: Vec<f64> = ok.iter().filter_map(|r| r.kill_to_ack_ms).collect();
        self.median_ms = median(&mut ms);
        self.min_ms = ms.first().copied();
        self.max_ms = ms.last().copied();
        let mut any: Vec<f64> = ok.iter().filter_map(|r| r.kill_to_any_ack_ms).collect();
        self.median_any_ack_ms = median(&mut any);
        let mut proxy: Vec<f64> = ok.iter().filter_map(|r| r.proxy_failover_ms).collect();
        self.median_proxy_failover_ms = median(&mut proxy);
        self.ok_runs = ok.len();
        self.failed_writes = self.runs.iter().map(|r| r.failed_writes).sum();
    }
}

/// What every run needs from the harness.
pub(crate) struct Ctx<'a> {
    pub pg: &'a PgTools,
    pub run_as: Option<RunAs>,
    pub proxy_bin: &'a Path,
    /// `target/perf/failover`: one directory per run, its logs kept, its data removed.
    pub dir: PathBuf,
}

/// Runs every setting `runs` times, interleaved (default 1, tuned 1, default 2, …), into
/// `results` as they finish. A run that gets no acknowledgement counts as failed; a
/// setup error ends the workload.
pub(crate) fn run(ctx: &Ctx, runs: u32, results: &mut Vec<FailoverResult>) -> Res<()> {
    results.extend(SETTINGS.iter().map(FailoverResult::new));
    for n in 1..=runs {
        for (i, setting) in SETTINGS.iter().enumerate() {
            if interrupted() {
                return Err("interrupted".into());
            }
            log(format!("{NAME} {} run {n}/{runs}", setting.name));
            let r = one_run(ctx, setting, n)?;
            match (&r.error, r.kill_to_ack_ms) {
                (None, Some(ms)) => log(format!(
                    "  kill -> first ack by the new primary {ms:.0} ms (any server {} ms, \
                     {} acks from the old one), proxy detect -> resume {} ms, {} failed writes",
                    fmt_ms(r.kill_to_any_ack_ms),
                    r.old_primary_acks_after_kill,
                    fmt_ms(r.proxy_failover_ms),
                    r.failed_writes
                )),
                (Some(e), _) => log(format!("  does not count: {e}")),
                (None, None) => {}
            }
            results[i].runs.push(r);
            results[i].summarize();
        }
    }
    Ok(())
}

/// One run in `<dir>/<setting>-<n>`: whatever happened, everything it started is stopped
/// and the data directories of the servers that started are removed before it returns
/// (logs stay).
fn one_run(ctx: &Ctx, setting: &Setting, n: u32) -> Res<FailoverRun> {
    let run_dir = ctx.dir.join(format!("{}-{n}", setting.name));
    let logs = run_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let mut services = Services::default();
    let mut nodes: Vec<(PathBuf, PathBuf)> = Vec::new();
    let result = measure(ctx, setting, n, &run_dir, &mut services, &mut nodes);
    drop(services);
    let mut orphans = 0;
    for (wanted, data) in &nodes {
        orphans += stop_orphans(data);
        discard(wanted, data);
    }
    result.map(|mut r| {
        r.orphans_stopped = orphans;
        r
    })
}

/// Sets up the pair and the proxy, writes, kills, measures. `nodes` gets each started
/// server's (wanted directory, data directory) for the cleanup.
fn measure(
    ctx: &Ctx,
    setting: &Setting,
    n: u32,
    run_dir: &Path,
    services: &mut Services,
    nodes: &mut Vec<(PathBuf, PathBuf)>,
) -> Res<FailoverRun> {
    let (pg, logs) = (ctx.pg, run_dir.join("logs"));
    let primary_dir = run_dir.join("pg");
    let primary = start_postgres(
        pg,
        &primary_dir,
        "failover-primary",
        ctx.run_as,
        services,
        &logs,
    )?;
    nodes.push((primary_dir, primary.data.clone()));
    let sql =
        |port: u16, db: &str, sql: &str, name: &str| psql(pg, port, db, sql, &logs.join(name));
    sql(
        primary.port,
        "postgres",
        &format!("CREATE DATABASE {DB_NAME}"),
        "createdb",
    )?;
    let version = sql(primary.port, "postgres", "SHOW server_version", "version")?;
    sql(
        primary.port,
        DB_NAME,
        "CREATE TABLE failover_probe (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())",
        "create-table",
    )?;
    let spec = StandbySpec {
        dir: run_dir.join("pg-standby"),
        name: "failover-standby",
        cluster_name: Some(SYNC_NAME),
        logs: logs.clone(),
    };
    let (standby_port, standby) = setup_standby(
        pg,
        ctx.run_as,
        services,
        primary.port,
        &serde_json::Value::Null,
        &spec,
    )?;
    if let Some(data) = standby["data"].as_str() {
        nodes.push((spec.dir.clone(), PathBuf::from(data)));
    }
    // The harness's servers run with synchronous_commit off; here a commit the writer
    // sees acknowledged must be on the standby. ALTER SYSTEM refuses a multi-statement
    // string, hence one psql each.
    for (i, stmt) in [
        format!("ALTER SYSTEM SET synchronous_standby_names = '{SYNC_NAME}'"),
        "ALTER SYSTEM SET synchronous_commit = on".into(),
        "SELECT pg_reload_conf()".into(),
    ]
    .iter()
    .enumerate()
    {
        sql(primary.port, "postgres", stmt, &format!("sync-{i}"))?;
    }
    wait_for("the standby to stream synchronously", services, || {
        Ok(sql(
            primary.port,
            "postgres",
            &format!(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{SYNC_NAME}'"
            ),
            "sync-state",
        )? == "sync")
    })?;
    let proxy_spec = ProxySpec {
        label: "proxy",
        nodes: &[
            ("primary", primary.port, "primary"),
            (SYNC_NAME, standby_port, "standby"),
        ],
        split: false,
        extra: setting.toml,
        workers: None,
    };
    let (proxy_port, proxy) = setup_proxy(pg, run_dir, ctx.proxy_bin, services, &proxy_spec)?;
    let admin = proxy["admin_port"].as_u64().unwrap_or(0) as u16;
    let (primary_addr, standby_addr) = (
        format!("127.0.0.1:{}", primary.port),
        format!("127.0.0.1:{standby_port}"),
    );
    // The proxy must know both nodes before the kill: the primary confirmed, the standby
    // checked (healthy, in recovery), or there is nothing to promote yet.
    wait_for(
        "the proxy to confirm the primary and see the standby",
        services,
        || {
            let t = admin_get(admin, "/topology")?;
            let nodes = admin_get(admin, "/nodes")?;
            let standby_seen = nodes.as_array().is_some_and(|v| {
                v.iter().any(|n| {
                    n["address"] == standby_addr.as_str()
                        && n["healthy"] == true
                        && n["in_recovery"] == true
                })
            });
            Ok(t["state"] == "confirmed" && t["primary"] == primary_addr.as_str() && standby_seen)
        },
    )?;

    let stop = AtomicBool::new(false);
    let writes: Mutex<Writes> = Mutex::new(Writes::default());
    let driven = std::thread::scope(|scope| {
        scope.spawn(|| writer(proxy_port, &stop, &writes));
        let r = drive(services, "failover-primary", standby_port, &writes);
        stop.store(true, Ordering::SeqCst);
        r
    });
    let w = writes.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut run = FailoverRun {
        run: n,
        ok: false,
        kill_to_ack_ms: None,
        kill_to_any_ack_ms: None,
        old_primary_acks_after_kill: 0,
        kill_to_last_old_ack_ms: None,
        acked_before_kill: 0,
        failed_writes: w.failed.len(),
        failed_logins: w.failed_logins,
        errors: BTreeMap::new(),
        proxy_failover_ms: None,
        proxy_outcome: None,
        proxy_steps: serde_json::Value::Null,
        new_primary: None,
        acked_writes: w.acked.len(),
        rows_on_new_primary: None,
        orphans_stopped: 0,
        postgres_version: version,
        proxy_commit: proxy["commit"].as_str().unwrap_or("").into(),
        error: None,
    };
    for e in &w.failed {
        *run.errors.entry(e.chars().take(160).collect()).or_default() += 1;
    }
    let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
    let kill_at = match driven {
        Ok(Driven::Acked { kill_at, ack }) => {
            run.kill_to_ack_ms = Some(ms(kill_at, ack));
            run.ok = true;
            kill_at
        }
        Ok(Driven::NoAck { kill_at }) => {
            run.error = Some(format!(
                "no write sent after the kill was acknowledged by the standby within \
                 {ACK_LIMIT:?} ({} failed writes, {} failed logins)",
                run.failed_writes, run.failed_logins
            ));
            kill_at
        }
        Err(e) => return Err(e),
    };
    let after: Vec<&Ack> = w.acked.iter().filter(|a| a.sent >= kill_at).collect();
    run.acked_before_kill = w.acked.len() - after.len();
    run.kill_to_any_ack_ms = after.first().map(|a| ms(kill_at, a.at));
    let old: Vec<&&Ack> = after
        .iter()
        .filter(|a| a.port != Some(standby_port))
        .collect();
    run.old_primary_acks_after_kill = old.len();
    run.kill_to_last_old_ack_ms = old.last().map(|a| ms(kill_at, a.at));
    // The failover record is complete once the proxy resumed; an ack implies it did.
    let limit = Instant::now() + Duration::from_secs(5);
    let topology = loop {
        let t = admin_get(admin, "/topology");
        match &t {
            Ok(v) if v["last_failover"]["duration_ms"].is_number() => break t,
            _ if Instant::now() > limit || interrupted() => break t,
            _ => sleep(Duration::from_millis(50)),
        }
    };
    match topology {
        Ok(t) => {
            let last = &t["last_failover"];
            run.proxy_failover_ms = last["duration_ms"].as_f64();
            run.proxy_outcome = last["outcome"].as_str().map(str::to_string);
            run.proxy_steps = last["steps"].clone();
            run.new_primary = t["primary"].as_str().map(str::to_string);
        }
        Err(e) => log(format!("  /topology unavailable: {e}")),
    }
    if run.ok {
        let count = sql(
            standby_port,
            DB_NAME,
            "SELECT count(*) FROM failover_probe",
            "rows",
        )
        .ok()
        .and_then(|s| s.parse::<u64>().ok());
        run.rows_on_new_primary = count;
        if run.new_primary.as_deref() != Some(standby_addr.as_str()) {
            run.ok = false;
            run.error = Some(format!(
                "the proxy's primary afterwards is {:?}, not the standby {standby_addr}",
                run.new_primary
            ));
        } else if let Some(rows) = count.filter(|&c| c < run.acked_writes as u64) {
            run.ok = false;
            run.error = Some(format!(
                "{} acknowledged writes, only {rows} rows on the new primary",
                run.acked_writes
            ));
        }
    }
    Ok(run)
}

/// An acknowledged write.
struct Ack {
    sent: Instant,
    at: Instant,
    /// `inet_server_port()` of the server that ran it.
    port: Option<u16>,
}

/// What the writer saw.
#[derive(Default)]
struct Writes {
    acked: Vec<Ack>,
    /// Error text of every failed write.
    failed: Vec<String>,
    failed_logins: usize,
}

/// Inserts one row at a time through the proxy until `stop`, reconnecting when the
/// connection is lost. A write cut off by `stop` is not counted.
fn writer(port: u16, stop: &AtomicBool, writes: &Mutex<Writes>) {
    let record =
        |f: &mut dyn FnMut(&mut Writes)| f(&mut writes.lock().unwrap_or_else(|e| e.into_inner()));
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::SeqCst) {
        let sock = match conn.take() {
            Some(s) => s,
            None => match wire::connect(port, TICK, Some(stop)) {
                Ok(s) => s,
                Err(_) => {
                    if !stop.load(Ordering::SeqCst) {
                        record(&mut |w| w.failed_logins += 1);
                        sleep(RETRY_PAUSE);
                    }
                    continue;
                }
            },
        };
        let sent = Instant::now();
        let result = wire::simple_query(&sock, INSERT, Some(stop));
        let done = Instant::now();
        if stop.load(Ordering::SeqCst) && result.as_ref().map_or(true, |r| r.is_err()) {
            return;
        }
        match result {
            Ok(Ok(port)) => {
                let port = port.and_then(|p| p.parse().ok());
                record(&mut |w| {
                    w.acked.push(Ack {
                        sent,
                        at: done,
                        port,
                    })
                });
                conn = Some(sock);
            }
            Ok(Err(e)) => {
                record(&mut |w| w.failed.push(e.clone()));
                conn = Some(sock);
                sleep(RETRY_PAUSE);
            }
            Err(e) => {
                record(&mut |w| w.failed.push(format!("connection lost: {e}")));
                sleep(RETRY_PAUSE);
            }
        }
    }
}

enum Driven {
    Acked { kill_at: Instant, ack: Instant },
    NoAck { kill_at: Instant },
}

/// Waits for a second of acknowledged writes, SIGKILLs the postmaster of service
/// `primary`, then waits until the server on `standby_port` acknowledges a write sent
/// after the kill.
fn drive(
    services: &mut Services,
    primary: &str,
    standby_port: u16,
    writes: &Mutex<Writes>,
) -> Res<Driven> {
    let acked = || writes.lock().unwrap_or_else(|e| e.into_inner()).acked.len();
    let start = Instant::now();
    while acked() == 0 {
        services.check_alive()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        if start.elapsed() > Duration::from_secs(15) {
            let w = writes.lock().unwrap_or_else(|e| e.into_inner());
            return Err(format!(
                "no write through the proxy was acknowledged before the kill: {:?}, {} failed logins",
                w.failed.last(),
                w.failed_logins
            ));
        }
        sleep(Duration::from_millis(10));
    }
    sleep(WRITE_BEFORE_KILL);
    services.check_alive()?;
    let kill_at = kill_postmaster(services, primary)?;
    loop {
        let first = writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acked
            .iter()
            .find(|a| a.sent >= kill_at && a.port == Some(standby_port))
            .map(|a| a.at);
        if let Some(ack) = first {
            return Ok(Driven::Acked { kill_at, ack });
        }
        if interrupted() {
            return Err("interrupted".into());
        }
        if kill_at.elapsed() > ACK_LIMIT {
            return Ok(Driven::NoAck { kill_at });
        }
        sleep(Duration::from_millis(5));
    }
}

/// SIGKILLs the postmaster of service `name` (only that process: its children are left
/// to notice) and reaps it; returns the instant after kill(2) returned.
fn kill_postmaster(services: &mut Services, name: &str) -> Res<Instant> {
    let i = services
        .0
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| format!("no service {name} to kill"))?;
    let mut s = services.0.remove(i);
    let pid = pid_of(&s.child);
    // SAFETY: kill(2) on our own child's PID, not yet reaped (so not reused).
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(format!(
            "kill -9 {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let at = Instant::now();
    let _ = s.child.wait();
    log(format!("killed {name} with SIGKILL, postmaster pid {pid}"));
    Ok(at)
}

/// Polls `ready` every 100 ms for up to 30 s.
fn wait_for(what: &str, services: &mut Services, mut ready: impl FnMut() -> Res<bool>) -> Res<()> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        services.check_alive()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        match ready() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = e,
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(format!("timed out waiting for {what} {last}").trim().into());
        }
        sleep(Duration::from_millis(100));
    }
}

/// PIDs of the live processes whose working directory is `dir`.
fn processes_in(dir: &Path) -> Vec<libc::pid_t> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|p| p == dir))
        .collect()
}

/// Stops what is left of a killed server. Its backends and auxiliary processes outlive
/// the postmaster until they notice it is gone; they are not in its process group
/// (PostgreSQL's children call setsid()), but all run in its data directory, which is how
/// they are found, then SIGKILLed by PID. Returns how many there were.
fn stop_orphans(data: &Path) -> usize {
    let Ok(dir) = fs::canonicalize(data) else {
        return 0;
    };
    let mut seen: HashSet<libc::pid_t> = HashSet::new();
    for _ in 0..50 {
        let pids = processes_in(&dir);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) on a PID just read as running in the killed server's data
            // directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            seen.insert(pid);
        }
        sleep(Duration::from_millis(100));
    }
    if !seen.is_empty() {
        let mut pids: Vec<_> = seen.iter().collect();
        pids.sort();
        log(format!(
            "stopped {} leftover processes of the killed primary: {pids:?}",
            seen.len()
        ));
    }
    seen.len()
}

/// Removes a node's data directory, keeping its server log under `wanted` (the data lives
/// in a /tmp stand-in when the service account cannot write `wanted`).
fn discard(wanted: &Path, data: &Path) {
    match data.parent() {
        Some(dir) if dir != wanted => {
            let _ = fs::create_dir_all(wanted);
            let _ = fs::copy(dir.join("postgres.log"), wanted.join("postgres.log"));
            let _ = fs::remove_dir_all(dir);
        }
        _ => {
            let _ = fs::remove_dir_all(data);
        }
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

/// What the figures are, under the failover table.
const NOTE: &str = "kill->ack: from SIGKILL of the primary's postmaster to the \
acknowledgement, by the promoted standby, of the first write sent after the kill, through \
the proxy (one writer, one INSERT at a time, synchronous standby). any ack: the same to \
the first acknowledgement from either server (the killed postmaster's backends can still \
commit for a few ms). proxy detect->resume: the proxy's own last_failover.duration_ms \
from /topology. Medians of the counted runs.";

/// The failover section of the terminal table (`md` false) or of report.md.
pub(crate) fn section(results: &[FailoverResult], md: bool) -> String {
    let mut s = String::new();
    if results.is_empty() {
        return s;
    }
    let head = [
        "failover (ms)",
        "runs",
        "kill->ack median",
        "min",
        "max",
        "any ack",
        "proxy detect->resume",
        "failed writes",
    ];
    if md {
        let (version, commit) = results
            .iter()
            .flat_map(|r| &r.runs)
            .map(|r| (r.postgres_version.as_str(), r.proxy_commit.as_str()))
            .next()
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "\nFailover (ms; PostgreSQL {version}, HeliosProxy {commit}): {NOTE}\n"
        );
        let _ = writeln!(
            s,
            "| {} |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            head.join(" | ")
        );
    } else {
        let _ = writeln!(
            s,
            "\n{:<14} {:>5} {:>17} {:>7} {:>7} {:>8} {:>21} {:>14}",
            head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7]
        );
    }
    for r in results {
        let row = [
            r.setting.to_string(),
            format!("{}/{}", r.ok_runs, r.runs.len()),
            fmt_ms(r.median_ms),
            fmt_ms(r.min_ms),
            fmt_ms(r.max_ms),
            fmt_ms(r.median_any_ack_ms),
            fmt_ms(r.median_proxy_failover_ms),
            r.failed_writes.to_string(),
        ];
        if md {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        } else {
            let _ = writeln!(
                s,
                "{:<14} {:>5} {:>17} {:>7} {:>7} {:>8} {:>21} {:>14}",
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7]
            );
        }
    }
    if !md {
        let _ = writeln!(s, "{NOTE}");
    }
    let lead = if md { "\n" } else { "" };
    for r in results {
        let config = if r.proxy_config.is_empty() {
            "health and failover defaults".to_string()
        } else {
            r.proxy_config
                .lines()
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(s, "{lead}failover {}: {config}", r.setting);
        for run in r.runs.iter().filter(|r| r.error.is_some()) {
            let _ = writeln!(
                s,
                "{lead}  failover {} run {}: {}",
                r.setting,
                run.run,
                run.error.as_deref().unwrap_or("")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The orphan sweep finds a process by its working directory and stops it.
    #[test]
    fn stop_orphans_kills_what_runs_in_the_directory() {
        let dir = std::env::temp_dir().join(format!("helios-perf-orphans.{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .current_dir(&dir)
            .spawn()
            .unwrap();
        let canon = fs::canonicalize(&dir).unwrap();
        let start = Instant::now();
        while processes_in(&canon).is_empty() && start.elapsed() < Duration::from_secs(5) {
            sleep(Duration::from_millis(10));
        }
        assert_eq!(processes_in(&canon), vec![pid_of(&child)]);
        assert_eq!(stop_orphans(&dir), 1);
        assert!(!child.wait().unwrap().success());
        assert!(processes_in(&canon).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
