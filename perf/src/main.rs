//! `helios-perf`: measures HeliosProxy beside direct PostgreSQL and PgBouncer in one run.
//!
//! It initdb's a private PostgreSQL under `target/perf/`, starts PgBouncer and the proxy in
//! front of it (transaction pooling, 16 backend connections each), drives pgbench workloads
//! against the three targets in interleaved order with repetitions, and writes a report
//! (terminal table, `report.md`, `report.json`) with medians, spread and ratios.
//!
//! When the read-mostly workload is selected it also starts a streaming standby and a
//! second proxy in front of both nodes (`standby.rs`). The failover workload runs last,
//! on a primary/standby pair and proxy of its own per run (`failover.rs`).
//!
//! Every process it starts runs in its own process group and is stopped by PID at the end,
//! on failure, and on SIGINT/SIGTERM. See `perf/README.md`.

mod failover;
mod overhead;
mod standby;
mod wire;

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Serialize;

type Res<T> = Result<T, String>;

/// Name of the unprivileged account servers run as when the harness runs as root.
const RUN_AS_USER: &str = "helios-test";
/// Backend connections of each pooler.
const POOL_SIZE: u32 = 16;
/// The caching proxy's `[cache]` section.
const CACHE_CONFIG: &str = "[cache]\nenabled = true\nmax_memory_mb = 64\n";

/// hot-select: one primary-key SELECT over the first 1,000 accounts.
const HOT_SELECT_SCRIPT: &str =
    "\\set aid random(1, 1000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n";

/// Role and database the workloads use.
const DB_USER: &str = "postgres";
const DB_NAME: &str = "bench";
/// pg_hba.conf line that lets the standby replicate from the perf PostgreSQL.
const HBA_REPLICATION: &str = "host replication all 127.0.0.1/32 trust\n";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

fn interrupted() -> bool {
    STOP.load(Ordering::SeqCst)
}

fn log(msg: impl AsRef<str>) {
    eprintln!("==> {}", msg.as_ref());
}

// --- options ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Quick,
    Full,
}

struct Opts {
    mode: Mode,
    only: Option<String>,
    proxy_bin: PathBuf,
    out: PathBuf,
    scale: u32,
    duration_s: u32,
    reps: u32,
    idle_clients: Option<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: helios-perf [--quick|--full] [--only WORKLOAD] --proxy-bin PATH [--out DIR]\n\
         \x20                  [--scale N] [--duration SECS] [--reps N] [--idle CLIENTS]\n\
         WORKLOAD is a workload name or a prefix of names (e.g. select-simple), or a \
         comma-separated list of them; --list prints them."
    );
    std::process::exit(2);
}

fn parse_opts() -> Opts {
    let mut mode = Mode::Quick;
    let mut only = None;
    let mut proxy_bin = None;
    let mut out = PathBuf::from("target/perf");
    let (mut scale, mut duration, mut reps, mut idle_clients) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>| -> u32 {
        v.and_then(|s| s.parse().ok())
            .filter(|&n: &u32| n > 0)
            .unwrap_or_else(|| usage())
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => mode = Mode::Quick,
            "--full" => mode = Mode::Full,
            "--only" => only = Some(args.next().unwrap_or_else(|| usage())),
            "--proxy-bin" => {
                proxy_bin = Some(PathBuf::from(args.next().unwrap_or_else(|| usage())))
            }
            "--out" => out = PathBuf::from(args.next().unwrap_or_else(|| usage())),
            "--scale" => scale = Some(num(args.next())),
            "--duration" => duration = Some(num(args.next())),
            "--reps" => reps = Some(num(args.next())),
            "--idle" => idle_clients = Some(num(args.next()) as usize),
            "--list" => {
                for m in [Mode::Quick, Mode::Full] {
                    let mut names: Vec<String> = workloads(m).into_iter().map(|w| w.name).collect();
                    names.extend([IDLE_NAME, overhead::NAME, failover::NAME].map(String::from));
                    println!(
                        "{}: {}",
                        if m == Mode::Quick { "quick" } else { "full" },
                        names.join(" ")
                    );
                }
                std::process::exit(0);
            }
            _ => usage(),
        }
    }
    let proxy_bin = proxy_bin.unwrap_or_else(|| usage());
    let (d_scale, d_duration, d_reps) = match mode {
        Mode::Quick => (10, 5, 1),
        Mode::Full => (10, 10, 3),
    };
    Opts {
        mode,
        only,
        proxy_bin,
        out,
        scale: scale.unwrap_or(d_scale),
        duration_s: duration.unwrap_or(d_duration),
        reps: reps.unwrap_or(d_reps),
        idle_clients,
    }
}

// --- workloads --------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    SelectSimple,
    SelectPrepared,
    Tpcb,
    Connect,
    /// select-only and simple-update mixed 9:1; the proxy column runs on two nodes.
    ReadMostly,
    /// The TPC-B-like script; the proxy column keeps a replay journal.
    TpcbReplay,
    /// select-only, simple protocol; the proxy column is a proxy with one worker per core.
    SelectPerCore,
    /// A primary-key SELECT over a hot set of 1,000 rows (simple protocol).
    HotSelect,
    /// The same; the proxy column is a proxy with the result cache on.
    HotSelectCached,
    /// The TPC-B-like script; the proxy column is a proxy with the result cache on.
    TpcbCached,
}

#[derive(Clone, Serialize)]
struct Workload {
    name: String,
    kind: Kind,
    clients: u32,
    description: &'static str,
    /// Per-transaction log (`-l`): latency p50/p99/p99.9.
    latency: bool,
    /// CPU seconds of the poolers during the run, per query.
    cpu: bool,
}

fn workloads(mode: Mode) -> Vec<Workload> {
    let simple: &[u32] = match mode {
        Mode::Quick => &[1, 16, 64],
        Mode::Full => &[1, 16, 64, 256, 1000],
    };
    let mut v: Vec<Workload> = simple
        .iter()
        .map(|&c| Workload {
            name: format!("select-simple-c{c}"),
            kind: Kind::SelectSimple,
            clients: c,
            description:
                "pgbench -S -M simple: one primary-key SELECT per transaction, simple protocol",
            latency: c == 1 || c == 1000,
            cpu: c == 1 || c == 64,
        })
        .collect();
    // The same against a proxy with one worker per core: the trade-off behind the
    // `workers` default (one per two cores) on a box shared with PostgreSQL.
    let per_core: &[u32] = match mode {
        Mode::Quick => &[1, 64],
        Mode::Full => &[1, 64, 1000],
    };
    v.extend(per_core.iter().map(|&c| Workload {
        name: format!("select-simple-percore-c{c}"),
        kind: Kind::SelectPerCore,
        clients: c,
        description: "select-simple; the proxy column is a proxy with one worker per core \
                      (compare with select-simple's proxy column, same run)",
        latency: c == 1 || c == 1000,
        cpu: c != 1000,
    }));
    v.push(Workload {
        name: "select-prepared-c64".into(),
        kind: Kind::SelectPrepared,
        clients: 64,
        description: "pgbench -S -M prepared: the same SELECT as a named prepared statement",
        latency: false,
        cpu: false,
    });
    v.push(Workload {
        name: "tpcb-c16".into(),
        kind: Kind::Tpcb,
        clients: 16,
        description: "pgbench default (TPC-B-like) script: BEGIN, 3 UPDATEs, SELECT, INSERT, END",
        latency: false,
        cpu: true,
    });
    v.push(Workload {
        name: "tpcb-replay-c16".into(),
        kind: Kind::TpcbReplay,
        clients: 16,
        description: "the tpcb-c16 script; the proxy column is a proxy with [failover] replay \
                      and track_commit_outcome on (the journal's cost: compare with tpcb-c16's \
                      proxy column, same run)",
        latency: false,
        cpu: true,
    });
    v.push(Workload {
        name: "hot-select-c16".into(),
        kind: Kind::HotSelect,
        clients: 16,
        description: "a primary-key SELECT over a hot set of 1,000 accounts, simple protocol",
        latency: false,
        cpu: true,
    });
    for clients in [16, 1] {
        v.push(Workload {
            name: format!("hot-select-cached-c{clients}"),
            kind: Kind::HotSelectCached,
            clients,
            description: "hot-select; the proxy column is a proxy with [cache] enabled \
                          (compare with hot-select-c16's proxy column, same run)",
            latency: clients == 1,
            cpu: clients == 16,
        });
    }
    v.push(Workload {
        name: "tpcb-cached-c16".into(),
        kind: Kind::TpcbCached,
        clients: 16,
        description: "the tpcb-c16 script; the proxy column is a proxy with [cache] enabled \
                      (every transaction writes: the cache's cost on a write-heavy load)",
        latency: false,
        cpu: true,
    });
    v.push(Workload {
        name: "connect-c16".into(),
        kind: Kind::Connect,
        clients: 16,
        description: "pgbench -S -C -M simple: a new connection (login) for every transaction",
        latency: false,
        cpu: false,
    });
    v.push(Workload {
        name: "read-mostly-c64".into(),
        kind: Kind::ReadMostly,
        clients: 64,
        description: "pgbench built-in select-only and simple-update mixed 9:1; \
                      the proxy column is the two-node proxy (primary + streaming standby, \
                      read/write split)",
        latency: false,
        cpu: false,
    });
    v
}

impl Workload {
    fn pgbench_args(&self, duration_s: u32) -> Vec<String> {
        let jobs = self.clients.min(16);
        let mut a: Vec<String> = vec![
            "-n".into(),
            "-c".into(),
            self.clients.to_string(),
            "-j".into(),
            jobs.to_string(),
            "-T".into(),
            duration_s.to_string(),
        ];
        match self.kind {
            Kind::SelectSimple | Kind::SelectPerCore => {
                a.extend(["-S".into(), "-M".into(), "simple".into()])
            }
            Kind::SelectPrepared => a.extend(["-S".into(), "-M".into(), "prepared".into()]),
            Kind::Tpcb | Kind::TpcbReplay | Kind::TpcbCached => {
                a.extend(["-M".into(), "simple".into()])
            }
            // The script file (`Env::hot_script`) is added by `run_pgbench`.
            Kind::HotSelect | Kind::HotSelectCached => a.extend(["-M".into(), "simple".into()]),
            Kind::Connect => a.extend(["-S".into(), "-C".into(), "-M".into(), "simple".into()]),
            Kind::ReadMostly => a.extend([
                "-M".into(),
                "simple".into(),
                "-b".into(),
                "select-only@9".into(),
                "-b".into(),
                "simple-update@1".into(),
            ]),
        }
        a
    }
}

// --- processes --------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct RunAs {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// A command in its own process group (so a terminal's Ctrl-C reaches only the harness,
/// which then stops everything in order), optionally as the unprivileged account.
fn command(prog: impl AsRef<std::ffi::OsStr>, run_as: Option<RunAs>) -> Command {
    let mut c = Command::new(prog);
    c.process_group(0).stdin(Stdio::null());
    if let Some(r) = run_as {
        // std clears the supplementary groups when root changes uid.
        c.uid(r.uid).gid(r.gid);
    }
    c
}

fn pid_of(child: &Child) -> libc::pid_t {
    child.id() as libc::pid_t
}

/// Sends `sig`, waits up to `limit`, then SIGKILLs; always reaps.
fn stop_child(name: &str, child: &mut Child, sig: libc::c_int, limit: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = pid_of(child);
    // SAFETY: plain kill(2) on our own child's PID (not yet reaped, so not reused).
    unsafe { libc::kill(pid, sig) };
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(_)) = child.try_wait() {
            log(format!("stopped {name} (pid {pid})"));
            return;
        }
        sleep(Duration::from_millis(20));
    }
    log(format!(
        "{name} (pid {pid}) ignored signal {sig} for {limit:?}: SIGKILL"
    ));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = child.wait();
}

struct Service {
    name: String,
    child: Child,
    stop_signal: libc::c_int,
    log: PathBuf,
}

/// Long-running servers; dropped (also on error and panic) they are stopped in reverse
/// start order by PID.
#[derive(Default)]
struct Services(Vec<Service>);

impl Services {
    fn check_alive(&mut self) -> Res<()> {
        for s in &mut self.0 {
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!(
                    "{} exited unexpectedly ({st}); log: {}\n{}",
                    s.name,
                    s.log.display(),
                    tail(&s.log, 20)
                ));
            }
        }
        Ok(())
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        while let Some(mut s) = self.0.pop() {
            stop_child(
                &s.name,
                &mut s.child,
                s.stop_signal,
                Duration::from_secs(15),
            );
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs a command to completion with its output in `<log_base>.out`/`.err`, polling so a
/// signal or the time limit stops it by PID.
fn run_logged(cmd: &mut Command, log_base: &Path, limit: Duration) -> Res<Finished> {
    let out_path = log_base.with_extension("out");
    let err_path = log_base.with_extension("err");
    let out = File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
    let err = File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
    let prog = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {prog}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if interrupted() {
            stop_child(&prog, &mut child, libc::SIGTERM, Duration::from_secs(5));
            return Err("interrupted".into());
        }
        if start.elapsed() > limit {
            stop_child(&prog, &mut child, libc::SIGTERM, Duration::from_secs(5));
            return Err(format!("{prog} did not finish within {limit:?}"));
        }
        sleep(Duration::from_millis(20));
    };
    Ok(Finished {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

fn start_service(
    services: &mut Services,
    name: &str,
    cmd: &mut Command,
    log_path: &Path,
    stop_signal: libc::c_int,
) -> Res<()> {
    let f = File::create(log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let f2 = f.try_clone().map_err(|e| e.to_string())?;
    let child = cmd
        .stdout(f)
        .stderr(f2)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    log(format!(
        "started {name} (pid {}), log {}",
        child.id(),
        log_path.display()
    ));
    services.0.push(Service {
        name: name.into(),
        child,
        stop_signal,
        log: log_path.into(),
    });
    Ok(())
}

fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn chown(path: &Path, run_as: Option<RunAs>) -> Res<()> {
    let Some(r) = run_as else { return Ok(()) };
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), r.uid, r.gid) } != 0 {
        return Err(format!(
            "chown {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A directory the service account can write: `wanted` when it can reach it, otherwise a
/// private one under /tmp (a checkout under a closed home directory is not reachable by
/// `helios-test`). Temp dirs are listed in `TEMP_DIRS` and removed when the run ends.
fn service_dir(wanted: &Path, run_as: Option<RunAs>, label: &str) -> Res<PathBuf> {
    fs::create_dir_all(wanted).map_err(|e| e.to_string())?;
    chown(wanted, run_as)?;
    if run_as.is_none() {
        return Ok(wanted.to_path_buf());
    }
    let mut t = command("test", run_as);
    t.arg("-w").arg(wanted);
    if t.status().map(|s| s.success()).unwrap_or(false) {
        return Ok(wanted.to_path_buf());
    }
    let tmp = PathBuf::from(format!("/tmp/helios-perf-{label}.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    chown(&tmp, run_as)?;
    log(format!(
        "{RUN_AS_USER} cannot write {}; {label} lives in {} instead",
        wanted.display(),
        tmp.display()
    ));
    TEMP_DIRS.with(|d| d.borrow_mut().push(tmp.clone()));
    Ok(tmp)
}

thread_local! {
    /// Fallback service directories created under /tmp, removed at the end of the run.
    static TEMP_DIRS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Removes the fallback directories (after every service has stopped).
fn remove_temp_dirs() {
    TEMP_DIRS.with(|d| {
        for dir in d.borrow_mut().drain(..) {
            let _ = fs::remove_dir_all(dir);
        }
    });
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns NULL or a pointer to static storage, read at once.
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        if pw.is_null() {
            None
        } else {
            Some(RunAs {
                uid: (*pw).pw_uid,
                gid: (*pw).pw_gid,
            })
        }
    }
}

fn capture(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

// --- PostgreSQL tools -------------------------------------------------------------------

#[derive(Clone)]
struct PgTools {
    bin: PathBuf,
}

impl PgTools {
    fn find() -> Res<Self> {
        let mut dirs: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| {
                        let v = e
                            .file_name()
                            .to_string_lossy()
                            .split('.')
                            .map(|p| p.parse().unwrap_or(0))
                            .collect();
                        (v, e.path().join("bin"))
                    })
                    .filter(|(_, p)| p.join("initdb").exists() && p.join("postgres").exists())
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        if let Some((_, d)) = dirs.pop() {
            return Ok(Self { bin: d });
        }
        let initdb = capture("sh", &["-c", "command -v initdb"]);
        if !initdb.is_empty() {
            if let Some(d) = fs::canonicalize(&initdb)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                return Ok(Self { bin: d });
            }
        }
        Err(
            "PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql"
                .into(),
        )
    }

    fn tool(&self, name: &str) -> PathBuf {
        let p = self.bin.join(name);
        if p.exists() {
            p
        } else {
            PathBuf::from(name)
        }
    }
}

/// `psql -Atc SQL` over TCP; Ok(stdout) when it exits 0.
fn psql(pg: &PgTools, port: u16, db: &str, sql: &str, log_base: &Path) -> Res<String> {
    let mut c = command(pg.tool("psql"), None);
    c.args([
        "-X",
        "-q",
        "-At",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        DB_USER,
        "-d",
        db,
        "-c",
        sql,
    ]);
    let f = run_logged(&mut c, log_base, Duration::from_secs(30))?;
    if f.status.success() {
        Ok(f.stdout.trim().to_string())
    } else {
        Err(format!("psql on port {port}: {}", f.stderr.trim()))
    }
}

fn wait_ready(
    pg: &PgTools,
    name: &str,
    port: u16,
    db: &str,
    services: &mut Services,
    logs: &Path,
) -> Res<()> {
    let start = Instant::now();
    let base = logs.join(format!("ready-{name}"));
    loop {
        services.check_alive()?;
        if interrupted() {
            return Err("interrupted".into());
        }
        match psql(pg, port, db, "SELECT 1", &base) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                return Err(format!("{name} not ready after 30 s: {e}"))
            }
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}

// --- targets ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    Direct,
    Pgbouncer,
    Proxy,
}

const TARGETS: [Target; 3] = [Target::Direct, Target::Pgbouncer, Target::Proxy];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Pgbouncer => "pgbouncer",
            Target::Proxy => "proxy",
        }
    }
}

struct Env {
    pg: PgTools,
    ports: [u16; 3],
    /// Pooler PIDs whose CPU time is measured (none for direct PostgreSQL).
    pids: [Option<libc::pid_t>; 3],
    pgbouncer_prepared: bool,
    /// The two-node proxy's port, when the read-mostly workload is selected.
    proxy_2node_port: Option<u16>,
    /// The replaying proxy's port and PID, when the tpcb-replay workload is selected.
    proxy_replay: Option<(u16, Option<libc::pid_t>)>,
    /// The one-worker-per-core proxy's port and PID, when a select-simple-percore workload
    /// is selected.
    proxy_per_core: Option<(u16, Option<libc::pid_t>)>,
    /// The caching proxy's port, PID and admin port, when a cached workload is selected.
    proxy_cache: Option<(u16, Option<libc::pid_t>, u16)>,
    /// The hot-select script.
    hot_script: PathBuf,
}

impl Env {
    fn port(&self, t: Target) -> u16 {
        self.ports[t as usize]
    }

    /// The port a workload runs against: the proxy column of the read-mostly workload is
    /// the two-node proxy.
    fn port_for(&self, w: &Workload, t: Target) -> u16 {
        if let (Kind::HotSelectCached | Kind::TpcbCached, Target::Proxy, Some((p, _, _))) =
            (w.kind, t, self.proxy_cache)
        {
            return p;
        }
        match (w.kind, t, self.proxy_2node_port, self.proxy_replay) {
            (Kind::ReadMostly, Target::Proxy, Some(p), _) => p,
            (Kind::TpcbReplay, Target::Proxy, _, Some((p, _))) => p,
            (Kind::SelectPerCore, Target::Proxy, _, _) => {
                self.proxy_per_core.map_or(self.port(t), |(p, _)| p)
            }
            _ => self.port(t),
        }
    }

    /// The process whose CPU time a workload's column measures.
    fn pid_for(&self, w: &Workload, t: Target) -> Option<libc::pid_t> {
        if let (Kind::HotSelectCached | Kind::TpcbCached, Target::Proxy, Some((_, pid, _))) =
            (w.kind, t, self.proxy_cache)
        {
            return pid;
        }
        match (w.kind, t, self.proxy_replay, self.proxy_per_core) {
            (Kind::TpcbReplay, Target::Proxy, Some((_, pid)), _) => pid,
            (Kind::SelectPerCore, Target::Proxy, _, Some((_, pid))) => pid,
            _ => self.pids[t as usize],
        }
    }

    fn unsupported(&self, w: &Workload, t: Target) -> Option<&'static str> {
        if t == Target::Proxy && w.kind == Kind::ReadMostly && self.proxy_2node_port.is_none() {
            return Some("not run: the two-node proxy was not started");
        }
        if t == Target::Proxy && w.kind == Kind::SelectPerCore && self.proxy_per_core.is_none() {
            return Some("not run: the one-worker-per-core proxy was not started");
        }
        if t == Target::Proxy
            && matches!(w.kind, Kind::HotSelectCached | Kind::TpcbCached)
            && self.proxy_cache.is_none()
        {
            return Some("not run: the caching proxy was not started");
        }
        if t == Target::Proxy && w.kind == Kind::TpcbReplay && self.proxy_replay.is_none() {
            return Some("not run: the replaying proxy was not started");
        }
        if t == Target::Pgbouncer && w.kind == Kind::SelectPrepared && !self.pgbouncer_prepared {
            return Some("not supported: PgBouncer < 1.21 cannot keep named prepared statements in transaction mode");
        }
        None
    }
}

// --- results ----------------------------------------------------------------------------

#[derive(Serialize, Clone)]
struct Run {
    rep: u32,
    ok: bool,
    tps: Option<f64>,
    processed: Option<u64>,
    failed: Option<u64>,
    latency_avg_ms: Option<f64>,
    /// From the per-transaction log, when the workload keeps one.
    latency: Option<Latency>,
    /// User + system CPU seconds of the pooler process during the run.
    cpu_s: Option<f64>,
    /// `cpu_s` per processed transaction (one query each), in microseconds.
    cpu_us_per_query: Option<f64>,
    error: Option<String>,
    log: String,
}

#[derive(Serialize, Clone, Copy)]
struct Latency {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    samples: usize,
}

#[derive(Serialize)]
struct Cell {
    target: Target,
    /// "ok", "failed" (no run counted) or "not supported".
    status: String,
    note: Option<String>,
    median_tps: Option<f64>,
    min_tps: Option<f64>,
    max_tps: Option<f64>,
    /// (max - min) / median of the counted runs, in percent.
    spread_pct: Option<f64>,
    /// Medians over the counted runs.
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_p999_ms: Option<f64>,
    cpu_us_per_query: Option<f64>,
    runs: Vec<Run>,
}

#[derive(Serialize)]
struct WorkloadResult {
    workload: Workload,
    pgbench_args: String,
    cells: Vec<Cell>,
    proxy_vs_direct: Option<f64>,
    proxy_vs_pgbouncer: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    date_utc: String,
    mode: Mode,
    complete: bool,
    machine: serde_json::Value,
    postgres: serde_json::Value,
    pgbouncer: serde_json::Value,
    proxy: serde_json::Value,
    /// The streaming standby and the proxy in front of both nodes (null unless the
    /// read-mostly workload ran).
    standby: serde_json::Value,
    proxy_2node: serde_json::Value,
    /// The proxy with replay on (null unless the tpcb-replay workload ran).
    proxy_replay: serde_json::Value,
    /// The caching proxy's settings, and its `/cache` counters after the workloads.
    proxy_cache: serde_json::Value,
    cache_stats: serde_json::Value,
    /// The machine's floor for any answer over loopback: p50 of a 60-byte TCP ping-pong
    /// between two threads (blocking sockets, TCP_NODELAY).
    loopback_rtt_p50_us: Option<f64>,
    /// The proxy with one worker per core (null unless a select-simple-percore workload ran).
    proxy_per_core: serde_json::Value,
    pgbench: serde_json::Value,
    workloads: Vec<WorkloadResult>,
    /// Memory of each pooler per logged-in idle client (not measured for direct
    /// PostgreSQL, which forks a backend per connection).
    idle_clients: Vec<IdleResult>,
    /// System calls and heap allocations per query of each pooler.
    overhead: Vec<overhead::OverheadResult>,
    /// Kill of the primary → first write acknowledged by the promoted standby, per proxy
    /// setting (a pair of servers of its own per run, no PgBouncer or direct
    /// counterpart).
    failover: Vec<failover::FailoverResult>,
}

#[derive(Serialize)]
struct IdleResult {
    target: Target,
    clients_requested: usize,
    clients_held: usize,
    rss_before_kib: Option<u64>,
    rss_after_kib: Option<u64>,
    bytes_per_client: Option<f64>,
    /// The proxy's own count of heap bytes in use, per client.
    heap_bytes_per_client: Option<f64>,
    error: Option<String>,
}

fn field_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
}

/// Judges one pgbench run: it counts only with exit status 0, 0 failed transactions and
/// no aborted client (pgbench prints "failed: 0" even when clients aborted).
fn judge(rep: u32, f: &Finished, log: &Path) -> Run {
    let tps = field_after(&f.stdout, "tps = ").and_then(|s| s.parse::<f64>().ok());
    let processed =
        field_after(&f.stdout, "number of transactions actually processed:").and_then(|s| {
            // "N" or "N/M"
            s.split('/').next().and_then(|n| n.parse().ok())
        });
    let failed =
        field_after(&f.stdout, "number of failed transactions:").and_then(|s| s.parse().ok());
    let latency = field_after(&f.stdout, "latency average = ").and_then(|s| s.parse().ok());
    let all = format!("{}\n{}", f.stdout, f.stderr).to_lowercase();
    let error = if !f.status.success() {
        Some(format!(
            "pgbench exited with {}: {}",
            f.status,
            first_error(&f.stderr)
        ))
    } else if all.contains("aborted") {
        Some(format!("a client aborted: {}", first_error(&f.stderr)))
    } else if failed != Some(0) {
        Some(format!("failed transactions: {failed:?}"))
    } else if tps.is_none() || processed.unwrap_or(0) == 0 {
        Some("no tps / no transactions in pgbench output".into())
    } else {
        None
    };
    Run {
        rep,
        ok: error.is_none(),
        tps,
        processed,
        failed,
        latency_avg_ms: latency,
        latency: None,
        cpu_s: None,
        cpu_us_per_query: None,
        error,
        log: log.display().to_string(),
    }
}

fn first_error(stderr: &str) -> String {
    stderr
        .lines()
        .find(|l| l.contains("error") || l.contains("FATAL") || l.contains("abort"))
        .or_else(|| stderr.lines().next())
        .unwrap_or("")
        .chars()
        .take(300)
        .collect()
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn summarize(target: Target, runs: Vec<Run>, unsupported: Option<&str>) -> Cell {
    if let Some(why) = unsupported {
        return Cell {
            target,
            status: "not supported".into(),
            note: Some(why.into()),
            median_tps: None,
            min_tps: None,
            max_tps: None,
            spread_pct: None,
            latency_p50_ms: None,
            latency_p99_ms: None,
            latency_p999_ms: None,
            cpu_us_per_query: None,
            runs,
        };
    }
    let mut ok: Vec<f64> = runs.iter().filter(|r| r.ok).filter_map(|r| r.tps).collect();
    let med = median(&mut ok);
    let (min, max) = (ok.first().copied(), ok.last().copied());
    let spread = match (med, min, max) {
        (Some(m), Some(lo), Some(hi)) if m > 0.0 => Some((hi - lo) / m * 100.0),
        _ => None,
    };
    let bad = runs.iter().filter(|r| !r.ok).count();
    let note = (bad > 0).then(|| {
        format!(
            "{bad} of {} runs did not count: {}",
            runs.len(),
            runs.iter()
                .find_map(|r| r.error.clone())
                .unwrap_or_default()
        )
    });
    Cell {
        target,
        status: if med.is_some() { "ok" } else { "failed" }.into(),
        note,
        median_tps: med,
        min_tps: min,
        max_tps: max,
        spread_pct: spread,
        latency_p50_ms: stat(&runs, |r| r.latency.map(|l| l.p50_ms)),
        latency_p99_ms: stat(&runs, |r| r.latency.map(|l| l.p99_ms)),
        latency_p999_ms: stat(&runs, |r| r.latency.map(|l| l.p999_ms)),
        cpu_us_per_query: stat(&runs, |r| r.cpu_us_per_query),
        runs,
    }
}

/// Median of one figure over the counted runs.
fn stat(runs: &[Run], f: impl Fn(&Run) -> Option<f64>) -> Option<f64> {
    let mut v: Vec<f64> = runs.iter().filter(|r| r.ok).filter_map(f).collect();
    median(&mut v)
}

// --- setup ------------------------------------------------------------------------------

/// A PostgreSQL server the harness initdb'd and started.
struct PgNode {
    port: u16,
    data: PathBuf,
    /// What it appended to postgresql.conf (port and socket directory included).
    settings: Vec<(&'static str, String)>,
}

/// initdb's `wanted/data` (or a /tmp stand-in, see [`service_dir`]) with the harness's
/// settings on a free port, starts it as service `name` and waits until it accepts
/// connections.
fn start_postgres(
    pg: &PgTools,
    wanted: &Path,
    name: &str,
    run_as: Option<RunAs>,
    services: &mut Services,
    logs: &Path,
) -> Res<PgNode> {
    let dir = service_dir(wanted, run_as, name)?;
    let data = dir.join("data");
    let port = free_port()?;
    log(format!("initdb {}", data.display()));
    let mut c = command(pg.tool("initdb"), run_as);
    c.current_dir(&dir).arg("-D").arg(&data).args([
        "-U",
        DB_USER,
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--no-instructions",
    ]);
    let f = run_logged(
        &mut c,
        &logs.join(format!("{name}-initdb")),
        Duration::from_secs(120),
    )?;
    if !f.status.success() {
        return Err(format!("initdb failed: {}", f.stderr.trim()));
    }
    let settings: Vec<(&str, String)> = vec![
        ("listen_addresses", "'127.0.0.1'".into()),
        ("port", port.to_string()),
        ("unix_socket_directories", format!("'{}'", dir.display())),
        ("max_connections", "1200".into()),
        ("shared_buffers", "'256MB'".into()),
        ("fsync", "off".into()),
        ("synchronous_commit", "off".into()),
        ("full_page_writes", "off".into()),
        ("max_wal_size", "'4GB'".into()),
        ("checkpoint_timeout", "'30min'".into()),
        // The defaults, named because the standbys stream from here.
        ("wal_level", "replica".into()),
        ("max_wal_senders", "10".into()),
    ];
    let mut conf = String::from("\n# helios-perf\n");
    for (k, v) in &settings {
        let _ = writeln!(conf, "{k} = {v}");
    }
    fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .and_then(|mut f| f.write_all(conf.as_bytes()))
        .map_err(|e| format!("postgresql.conf: {e}"))?;
    // pg_basebackup and the standby's WAL receiver connect over TCP.
    fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))
        .and_then(|mut f| f.write_all(HBA_REPLICATION.as_bytes()))
        .map_err(|e| format!("pg_hba.conf: {e}"))?;
    let mut c = command(pg.tool("postgres"), run_as);
    c.current_dir(&dir).arg("-D").arg(&data);
    start_service(
        services,
        name,
        &mut c,
        &dir.join("postgres.log"),
        libc::SIGINT,
    )?;
    wait_ready(pg, name, port, "postgres", services, logs)?;
    Ok(PgNode {
        port,
        data,
        settings,
    })
}

fn setup_postgres(
    pg: &PgTools,
    out: &Path,
    run_as: Option<RunAs>,
    services: &mut Services,
    scale: u32,
) -> Res<(u16, serde_json::Value)> {
    let logs = out.join("logs");
    let PgNode {
        port,
        data,
        settings,
    } = start_postgres(pg, &out.join("pg"), "postgres", run_as, services, &logs)?;
    psql(
        pg,
        port,
        "postgres",
        &format!("CREATE DATABASE {DB_NAME}"),
        &logs.join("createdb"),
    )?;
    let version = psql(
        pg,
        port,
        "postgres",
        "SHOW server_version",
        &logs.join("version"),
    )?;
    log(format!("pgbench -i -s {scale}"));
    let mut c = command(pg.tool("pgbench"), None);
    c.args([
        "-i",
        "-q",
        "-s",
        &scale.to_string(),
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        DB_USER,
        DB_NAME,
    ]);
    let f = run_logged(&mut c, &logs.join("pgbench-init"), Duration::from_secs(600))?;
    if !f.status.success() {
        return Err(format!("pgbench -i failed: {}", f.stderr.trim()));
    }
    let mut s = serde_json::Map::new();
    s.insert("version".into(), version.into());
    s.insert("port".into(), port.into());
    s.insert("data".into(), data.display().to_string().into());
    let mut set = serde_json::Map::new();
    for (k, v) in settings {
        if k != "port" && k != "unix_socket_directories" {
            set.insert(k.into(), v.trim_matches('\'').into());
        }
    }
    set.insert("auth".into(), "trust".into());
    set.insert("pg_hba".into(), HBA_REPLICATION.trim().into());
    s.insert("settings".into(), set.into());
    Ok((port, s.into()))
}

/// PgBouncer's binary: on PATH, or where Debian puts it (/usr/sbin is not on every PATH).
fn pgbouncer_bin() -> String {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("pgbouncer").is_file()))
        .unwrap_or(false);
    if !on_path && Path::new("/usr/sbin/pgbouncer").is_file() {
        "/usr/sbin/pgbouncer".into()
    } else {
        "pgbouncer".into()
    }
}

fn pgbouncer_version() -> Option<(u32, u32)> {
    let v = capture(&pgbouncer_bin(), &["--version"]);
    let first = v.lines().next()?;
    let num = first.split_whitespace().nth(1)?;
    let mut it = num.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Some((it.next()?, it.next()?))
}

fn setup_pgbouncer(
    pg: &PgTools,
    out: &Path,
    run_as: Option<RunAs>,
    services: &mut Services,
    pg_port: u16,
) -> Res<(u16, bool, serde_json::Value)> {
    let (major, minor) =
        pgbouncer_version().ok_or("pgbouncer not found (perf/run.sh installs Debian's package)")?;
    let prepared = (major, minor) >= (1, 21);
    let dir = service_dir(&out.join("pgbouncer"), run_as, "pgbouncer")?;
    let port = free_port()?;
    let userlist = dir.join("userlist.txt");
    fs::write(&userlist, format!("\"{DB_USER}\" \"\"\n")).map_err(|e| e.to_string())?;
    chown(&userlist, run_as)?;
    let mut settings: Vec<(&str, String)> = vec![
        ("listen_addr", "127.0.0.1".into()),
        ("listen_port", port.to_string()),
        ("unix_socket_dir", String::new()),
        ("auth_type", "trust".into()),
        ("auth_file", userlist.display().to_string()),
        ("pool_mode", "transaction".into()),
        ("default_pool_size", POOL_SIZE.to_string()),
        ("max_client_conn", "12000".into()),
        ("ignore_startup_parameters", "extra_float_digits".into()),
        ("logfile", dir.join("pgbouncer.log").display().to_string()),
        ("log_connections", "0".into()),
        ("log_disconnections", "0".into()),
    ];
    if prepared {
        settings.push(("max_prepared_statements", "200".into()));
    }
    let mut ini = format!(
        "[databases]\n{DB_NAME} = host=127.0.0.1 port={pg_port} dbname={DB_NAME}\n\n[pgbouncer]\n"
    );
    for (k, v) in &settings {
        let _ = writeln!(ini, "{k} = {v}");
    }
    let ini_path = dir.join("pgbouncer.ini");
    fs::write(&ini_path, ini).map_err(|e| e.to_string())?;
    let mut c = command(pgbouncer_bin(), run_as);
    c.current_dir(&dir).arg(&ini_path);
    // SIGINT is PgBouncer's "safe shutdown" (waits for clients); SIGTERM closes at once.
    start_service(
        services,
        "pgbouncer",
        &mut c,
        &dir.join("stdout.log"),
        libc::SIGTERM,
    )?;
    wait_ready(pg, "pgbouncer", port, DB_NAME, services, &out.join("logs"))?;
    let mut s = serde_json::Map::new();
    s.insert("version".into(), format!("{major}.{minor}").into());
    s.insert("port".into(), port.into());
    let mut set = serde_json::Map::new();
    for (k, v) in settings {
        if !matches!(
            k,
            "listen_port" | "auth_file" | "logfile" | "unix_socket_dir" | "listen_addr"
        ) {
            set.insert(k.into(), v.into());
        }
    }
    s.insert("settings".into(), set.into());
    Ok((port, prepared, s.into()))
}

/// One proxy instance: `label` names its directory and (as `heliosdb-<label>`) its service.
struct ProxySpec<'a> {
    label: &'a str,
    /// `[[nodes]]` as (name, port, role).
    nodes: &'a [(&'a str, u16, &'a str)],
    /// Adds `[load_balancer]` with the read/write split and round-robin reads.
    split: bool,
    /// More TOML sections, verbatim (the failover workload's `[health]`/`[failover]`).
    extra: &'a str,
    /// `workers`; `None` leaves the proxy's default.
    workers: Option<u32>,
}

/// The `[load_balancer]` section of the two-node proxy.
const LOAD_BALANCER: &str =
    "[load_balancer]\nread_write_split = true\nread_strategy = \"round_robin\"\n";

fn setup_proxy(
    pg: &PgTools,
    out: &Path,
    proxy_bin: &Path,
    services: &mut Services,
    spec: &ProxySpec,
) -> Res<(u16, serde_json::Value)> {
    let dir = out.join(spec.label);
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let port = free_port()?;
    let admin = free_port()?;
    let mut nodes = String::new();
    for (name, node_port, role) in spec.nodes {
        let _ = write!(
            nodes,
            "[[nodes]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {node_port}\nrole = \"{role}\"\n\n"
        );
    }
    if spec.split {
        nodes.push_str(LOAD_BALANCER);
        nodes.push('\n');
    }
    if !spec.extra.is_empty() {
        nodes.push_str(spec.extra);
        nodes.push('\n');
    }
    let workers = spec
        .workers
        .map_or(String::new(), |n| format!("workers = {n}\n"));
    let config = format!(
        "# Written by helios-perf.\n\
         listen_address = \"127.0.0.1:{port}\"\n\
         admin_address = \"127.0.0.1:{admin}\"\n\
         {workers}\n\
         [pool_mode]\nmode = \"transaction\"\nmax_pool_size = {POOL_SIZE}\n\n\
         [auth]\nmethod = \"trust\"\n\n\
         [[users]]\nname = \"{DB_USER}\"\nauth_method = \"trust\"\n\n\
         {nodes}\
         [limits]\nmax_client_connections = 12000\n\n\
         [timeouts]\nshutdown_timeout_secs = 5\n"
    );
    let cfg_path = dir.join("proxy.toml");
    fs::write(&cfg_path, &config).map_err(|e| e.to_string())?;
    let mut check = command(proxy_bin, None);
    check.arg("--config").arg(&cfg_path).arg("--check-config");
    let f = run_logged(
        &mut check,
        &out.join("logs").join("proxy-check-config"),
        Duration::from_secs(30),
    )?;
    if !f.status.success() {
        return Err(format!(
            "the generated {} does not validate: {}",
            cfg_path.display(),
            f.stderr.trim()
        ));
    }
    let mut c = command(proxy_bin, None);
    c.arg("--config").arg(&cfg_path).env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    start_service(
        services,
        &format!("heliosdb-{}", spec.label),
        &mut c,
        &dir.join("proxy.log"),
        libc::SIGTERM,
    )?;
    wait_ready(pg, spec.label, port, DB_NAME, services, &out.join("logs"))?;
    let commit = capture("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !capture("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let mut s = serde_json::Map::new();
    s.insert("binary".into(), proxy_bin.display().to_string().into());
    s.insert(
        "commit".into(),
        format!("{commit}{}", if dirty { "-dirty" } else { "" }).into(),
    );
    s.insert("port".into(), port.into());
    s.insert("admin_port".into(), admin.into());
    let mut set = serde_json::Map::new();
    set.insert("mode".into(), "transaction".into());
    set.insert("max_pool_size".into(), POOL_SIZE.into());
    set.insert(
        "workers".into(),
        spec.workers
            .map_or("the default".into(), |n| n.to_string())
            .into(),
    );
    if spec.nodes.len() > 1 {
        let nodes: Vec<String> = spec
            .nodes
            .iter()
            .map(|(name, _, role)| format!("{name} ({role})"))
            .collect();
        set.insert("nodes".into(), nodes.join(" + ").into());
    }
    if spec.split {
        let lb = LOAD_BALANCER.lines().skip(1).collect::<Vec<_>>().join("; ");
        let lb = lb.replace('"', "");
        set.insert("load_balancer".into(), lb.into());
    }
    s.insert("settings".into(), set.into());
    Ok((port, s.into()))
}

fn machine_info() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|r| r.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    serde_json::json!({
        "cpu": model,
        "cpus": cpus,
        "memory_mib": mem_kb / 1024,
        "kernel": capture("uname", &["-sr"]),
        "host": capture("uname", &["-n"]),
    })
}

// --- main loop --------------------------------------------------------------------------

const IDLE_NAME: &str = "idle-clients";

/// Resident set size of a process in KiB, from /proc/PID/status.
fn rss_kib(pid: libc::pid_t) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// RSS of a pooler before and after `n` logged-in idle clients.
/// Where the idle clients go: a pooler's port, its PID (for RSS) and, for the proxy,
/// its admin API (for the heap in use).
struct IdleSubject {
    target: Target,
    port: u16,
    pid: Option<libc::pid_t>,
    admin_port: Option<u16>,
}

fn heap_in_use(admin_port: Option<u16>) -> Option<f64> {
    admin_get(admin_port?, "/metrics").ok()?["allocations"]["in_use_bytes"].as_f64()
}

fn measure_idle(subject: &IdleSubject, n: usize) -> IdleResult {
    let (t, pid) = (subject.target, subject.pid);
    let before = pid.and_then(rss_kib);
    let heap_before = heap_in_use(subject.admin_port);
    let mut held = Vec::with_capacity(n);
    let mut error = None;
    for _ in 0..n {
        if interrupted() {
            error = Some("interrupted".into());
            break;
        }
        match wire::login(subject.port) {
            Ok(s) => held.push(s),
            Err(e) => {
                error = Some(format!("after {} clients: {e}", held.len()));
                break;
            }
        }
    }
    // Let the pooler settle before reading its RSS: buffers released after login, and
    // the proxy's idle clients parked (`limits.park_idle_client_ms`, 250 ms by default).
    sleep(Duration::from_secs(1));
    let after = pid.and_then(rss_kib);
    let bytes_per_client = match (before, after) {
        (Some(b), Some(a)) if !held.is_empty() => {
            Some((a as f64 - b as f64) * 1024.0 / held.len() as f64)
        }
        _ => None,
    };
    let heap_bytes_per_client = match (heap_before, heap_in_use(subject.admin_port)) {
        (Some(b), Some(a)) if !held.is_empty() => Some((a - b) / held.len() as f64),
        _ => None,
    };
    let clients_held = held.len();
    drop(held);
    sleep(Duration::from_millis(500));
    IdleResult {
        target: t,
        clients_requested: n,
        clients_held,
        rss_before_kib: before,
        rss_after_kib: after,
        bytes_per_client,
        heap_bytes_per_client,
        error,
    }
}

fn run_pgbench(
    env: &Env,
    w: &Workload,
    t: Target,
    rep: u32,
    duration_s: u32,
    runs_dir: &Path,
) -> Res<Run> {
    let mut c = command(env.pg.tool("pgbench"), None);
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &env.port_for(w, t).to_string(),
        "-U",
        DB_USER,
    ])
    .args(w.pgbench_args(duration_s));
    if matches!(w.kind, Kind::HotSelect | Kind::HotSelectCached) {
        c.arg("-f").arg(&env.hot_script);
    }
    let file = format!("{}-{}-r{}", w.name, t.name(), rep + 1);
    let base = runs_dir.join(&file);
    let txlog = format!("{file}.txlog");
    if w.latency {
        c.arg("-l")
            .arg(format!("--log-prefix={}", runs_dir.join(&txlog).display()));
    }
    c.arg(DB_NAME);
    let limit = Duration::from_secs(u64::from(duration_s) * 3 + 60);
    let pid = if w.cpu { env.pid_for(w, t) } else { None };
    let cpu_before = pid.and_then(proc_cpu_seconds);
    let f = run_logged(&mut c, &base, limit)?;
    let cpu_after = pid.and_then(proc_cpu_seconds);
    let mut r = judge(rep, &f, &base.with_extension("out"));
    if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
        r.cpu_s = Some(b - a);
        r.cpu_us_per_query = r
            .processed
            .filter(|&n| n > 0)
            .map(|n| (b - a) / n as f64 * 1e6);
    }
    if w.latency {
        r.latency = latency_from_logs(runs_dir, &txlog);
    }
    Ok(r)
}

/// User + system CPU seconds of a process (all its threads), from /proc/PID/stat.
fn proc_cpu_seconds(pid: libc::pid_t) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (hz > 0.0).then(|| (utime + stime) / hz)
}

/// Percentiles of the per-transaction latencies (third column, microseconds) of every
/// `<prefix>.<pid>[.<thread>]` file pgbench wrote; failed or skipped ones are left out.
fn latency_from_logs(dir: &Path, prefix: &str) -> Option<Latency> {
    let mut us: Vec<u64> = Vec::new();
    for e in fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{prefix}.")) {
            continue;
        }
        let text = fs::read_to_string(e.path()).ok()?;
        us.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    if us.is_empty() {
        return None;
    }
    us.sort_unstable();
    let pct = |p: f64| {
        let i = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
        us[i] as f64 / 1000.0
    };
    Some(Latency {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        samples: us.len(),
    })
}

fn fmt_tps(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into())
}

fn cell_text(c: &Cell) -> String {
    match c.status.as_str() {
        "ok" => match c.spread_pct {
            Some(s) if c.runs.iter().filter(|r| r.ok).count() > 1 => {
                format!("{} ±{:.1}%", fmt_tps(c.median_tps), s / 2.0)
            }
            _ => fmt_tps(c.median_tps),
        },
        other => other.to_string(),
    }
}

fn terminal_table(r: &Report) -> String {
    let mut s = String::new();
    if !r.workloads.is_empty() {
        let _ = writeln!(
            s,
            "{:<22} {:>16} {:>16} {:>16} {:>13} {:>13}",
            "workload (TPS)", "direct", "pgbouncer", "proxy", "proxy/direct", "proxy/pgb"
        );
    }
    for w in &r.workloads {
        let _ = writeln!(
            s,
            "{:<22} {:>16} {:>16} {:>16} {:>13} {:>13}",
            w.workload.name,
            cell_text(&w.cells[0]),
            cell_text(&w.cells[1]),
            cell_text(&w.cells[2]),
            fmt_ratio(w.proxy_vs_direct),
            fmt_ratio(w.proxy_vs_pgbouncer)
        );
    }
    s.push_str(&two_node_notes(r, "\nNote: ", ""));
    s.push_str(&extra_tables(r, false));
    for w in &r.workloads {
        for c in &w.cells {
            if let Some(n) = &c.note {
                let _ = writeln!(s, "  {} / {}: {n}", w.workload.name, c.target.name());
            }
        }
    }
    let f = failover::section(&r.failover, false);
    s.push_str(if s.is_empty() { f.trim_start() } else { &f });
    s
}

/// Printed under the table when the read-mostly workload ran: its proxy column is not the
/// same setup as the other rows.
const TWO_NODE_NOTE: &str = "read-mostly-c64: the proxy column runs on two nodes, the primary \
and its streaming standby (read_write_split = true, read_strategy = round_robin): reads \
split to the standby, writes and a session's reads after its own writes go to the primary. \
PgBouncer cannot split reads, so its column (like direct) runs on the primary only. On a \
2-core machine the standby shares the same CPUs, so the figure shows routing overhead and \
balance rather than added capacity.";

/// The two-node proxy's routing decisions (`routing_decisions` of its `/metrics`): where
/// its units of work went, and why, over the whole run (warm-up included).
/// The p50 of 20,000 round trips of 60 bytes over a loopback TCP connection between two
/// threads: no server can answer faster than this on this machine.
fn loopback_round_trip_us() -> Res<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            conn.write_all(&buf[..n])?;
        }
    });
    let mut conn = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut samples = Vec::with_capacity(20_000);
    let mut buf = [0u8; 60];
    for _ in 0..20_000 {
        let t = Instant::now();
        conn.write_all(&buf).map_err(|e| e.to_string())?;
        conn.read_exact(&mut buf).map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(conn);
    let _ = echo.join();
    median(&mut samples).ok_or_else(|| "no samples".to_string())
}

/// The result cache's figures: TPS with it against without it on the hot set, the hit
/// latency at one client, and its cost on the write-heavy script (all proxy columns of
/// the same run).
fn cache_summary(r: &Report) -> Option<String> {
    let by_name = |name: &str| r.workloads.iter().find(|w| w.workload.name == name);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let mut parts = Vec::new();
    if let (Some(on), Some(off)) = (by_name("hot-select-cached-c16"), by_name("hot-select-c16")) {
        parts.push(format!(
            "hot-select TPS with the cache / without it at 16 clients {} (CPU per query {})",
            fmt_ratio(ratio(on.cells[2].median_tps, off.cells[2].median_tps)),
            fmt_ratio(ratio(
                on.cells[2].cpu_us_per_query,
                off.cells[2].cpu_us_per_query
            )),
        ));
    }
    if let Some(one) = by_name("hot-select-cached-c1") {
        let p50 = |c: &Cell| {
            c.latency_p50_ms
                .map_or("-".to_string(), |ms| format!("{:.0} µs", ms * 1000.0))
        };
        let floor = r.loopback_rtt_p50_us.map_or(String::new(), |us| {
            format!("; a bare loopback TCP round trip here: p50 {us:.0} µs")
        });
        parts.push(format!(
            "hit latency at 1 client: p50 {} (direct PostgreSQL's p50 {}, PgBouncer's {}{floor})",
            p50(&one.cells[2]),
            p50(&one.cells[0]),
            p50(&one.cells[1]),
        ));
    }
    if let (Some(on), Some(off)) = (by_name("tpcb-cached-c16"), by_name("tpcb-c16")) {
        parts.push(format!(
            "tpcb with the cache / without it {} (CPU per transaction {})",
            fmt_ratio(ratio(on.cells[2].median_tps, off.cells[2].median_tps)),
            fmt_ratio(ratio(
                on.cells[2].cpu_us_per_query,
                off.cells[2].cpu_us_per_query
            )),
        ));
    }
    if parts.is_empty() {
        return None;
    }
    let stats = &r.cache_stats;
    let counters = if stats.is_null() {
        String::new()
    } else {
        format!(
            "\n  the caching proxy's /cache after the runs: {} hits, {} misses, {} fills, {} invalidations",
            stats["hits"], stats["misses"], stats["fills"], stats["invalidations"]
        )
    };
    Some(format!(
        "Result cache (proxy columns, same run): {}{counters}",
        parts.join("; ")
    ))
}

fn routing_decisions(admin_port: u16) -> Res<serde_json::Value> {
    Ok(admin_get(admin_port, "/metrics")?["routing_decisions"].clone())
}

/// `GET path` on a proxy's admin API, as JSON.
fn admin_get(admin_port: u16, path: &str) -> Res<serde_json::Value> {
    use std::io::{Read, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin_port))
        .map_err(|e| format!("admin API: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("admin API: {e}"))?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .map_err(|e| format!("admin API: {e}"))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("admin API: no body")?;
    serde_json::from_str(body).map_err(|e| format!("admin API {path}: {e}"))
}

/// "perf-pg-standby read_query 61% (…), perf-pg write_query 9% (…), …", largest first.
fn routing_summary(r: &Report) -> Option<String> {
    let decisions = r.proxy_2node["routing_decisions"].as_array()?;
    let total: u64 = decisions.iter().filter_map(|d| d["count"].as_u64()).sum();
    if total == 0 {
        return None;
    }
    let mut rows: Vec<(u64, String)> = decisions
        .iter()
        .map(|d| {
            let n = d["count"].as_u64().unwrap_or(0);
            (
                n,
                format!(
                    "{} {} {:.0}% ({n})",
                    d["node"].as_str().unwrap_or("?"),
                    d["reason"].as_str().unwrap_or("?"),
                    n as f64 * 100.0 / total as f64
                ),
            )
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    Some(format!(
        "proxy-2node routing over the whole run ({total} units of work): {}",
        rows.into_iter()
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// The note under the table when the two-node workload ran, and where its proxy routed
/// work: `lead` before the note, `gap` between its line and the routing line.
fn two_node_notes(r: &Report, lead: &str, gap: &str) -> String {
    if !has_two_node(r) {
        return String::new();
    }
    let mut s = format!("{lead}{TWO_NODE_NOTE}\n");
    if let Some(summary) = routing_summary(r) {
        s.push_str(gap);
        s.push_str(&summary);
        s.push('\n');
    }
    s
}

fn has_two_node(r: &Report) -> bool {
    r.workloads
        .iter()
        .any(|w| w.workload.kind == Kind::ReadMostly)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into())
}

/// Latency and CPU tables (terminal layout, or Markdown when `md`).
fn extra_tables(r: &Report, md: bool) -> String {
    let mut s = String::new();
    let lat: Vec<&WorkloadResult> = r.workloads.iter().filter(|w| w.workload.latency).collect();
    if !lat.is_empty() {
        let head = [
            "latency ms p50/p99/p99.9",
            "direct",
            "pgbouncer",
            "proxy",
            "proxy p99/p50",
            "proxy/direct p50",
        ];
        if md {
            let _ = writeln!(
                s,
                "\nLatency (ms, from pgbench's per-transaction log; medians of the runs):\n"
            );
            let _ = writeln!(
                s,
                "| {} |\n| --- | ---: | ---: | ---: | ---: | ---: |",
                head.join(" | ")
            );
        } else {
            let _ = writeln!(
                s,
                "\n{:<26} {:>22} {:>22} {:>22} {:>14} {:>17}",
                head[0], head[1], head[2], head[3], head[4], head[5]
            );
        }
        for w in lat {
            let cell = |c: &Cell| {
                if c.latency_p50_ms.is_none() {
                    return if c.status == "ok" {
                        "-".to_string()
                    } else {
                        c.status.clone()
                    };
                }
                format!(
                    "{}/{}/{}",
                    fmt_ms(c.latency_p50_ms),
                    fmt_ms(c.latency_p99_ms),
                    fmt_ms(c.latency_p999_ms)
                )
            };
            let p = &w.cells[2];
            let tail = match (p.latency_p99_ms, p.latency_p50_ms) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let vs = match (p.latency_p50_ms, w.cells[0].latency_p50_ms) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let row = [
                w.workload.name.clone(),
                cell(&w.cells[0]),
                cell(&w.cells[1]),
                cell(&w.cells[2]),
                fmt_ratio(tail),
                fmt_ratio(vs),
            ];
            if md {
                let _ = writeln!(s, "| {} |", row.join(" | "));
            } else {
                let _ = writeln!(
                    s,
                    "{:<26} {:>22} {:>22} {:>22} {:>14} {:>17}",
                    row[0], row[1], row[2], row[3], row[4], row[5]
                );
            }
        }
    }
    for w in r.workloads.iter().filter(|w| w.workload.cpu) {
        let us = |c: &Cell| {
            c.cpu_us_per_query
                .map(|x| format!("{x:.1} µs"))
                .unwrap_or_else(|| "-".into())
        };
        let ratio = match (w.cells[2].cpu_us_per_query, w.cells[1].cpu_us_per_query) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let _ = writeln!(
            s,
            "\nCPU (user+system) per query during {}: pgbouncer {}, proxy {} (proxy/pgbouncer {})",
            w.workload.name,
            us(&w.cells[1]),
            us(&w.cells[2]),
            fmt_ratio(ratio),
        );
    }
    let find = |kind: Kind| r.workloads.iter().find(|w| w.workload.kind == kind);
    if let (Some(plain), Some(replay)) = (find(Kind::Tpcb), find(Kind::TpcbReplay)) {
        let (a, b) = (&replay.cells[2], &plain.cells[2]);
        let tps = match (a.median_tps, b.median_tps) {
            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
            _ => None,
        };
        let cpu = match (a.cpu_us_per_query, b.cpu_us_per_query) {
            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
            _ => None,
        };
        let _ = writeln!(
            s,
            "\nReplay journal cost (tpcb-replay-c16 proxy vs tpcb-c16 proxy, same run): TPS {}, CPU per transaction {}",
            fmt_ratio(tps),
            fmt_ratio(cpu),
        );
    }
    if let Some(line) = cache_summary(r) {
        let _ = writeln!(s, "\n{line}");
    }
    let per_core: Vec<String> = r
        .workloads
        .iter()
        .filter(|w| w.workload.kind == Kind::SelectPerCore)
        .filter_map(|one| {
            let name = one.workload.name.replace("-percore", "");
            let both = r.workloads.iter().find(|w| w.workload.name == name)?;
            let (a, b) = (&one.cells[2], &both.cells[2]);
            let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            };
            Some(format!(
                "{name}: TPS {}, CPU per query {} ({} vs {} µs)",
                fmt_ratio(ratio(a.median_tps, b.median_tps)),
                fmt_ratio(ratio(a.cpu_us_per_query, b.cpu_us_per_query)),
                a.cpu_us_per_query.map_or("-".into(), |v| format!("{v:.1}")),
                b.cpu_us_per_query.map_or("-".into(), |v| format!("{v:.1}")),
            ))
        })
        .collect();
    if !per_core.is_empty() {
        let _ = writeln!(
            s,
            "\nOne worker per core against the default workers (select-simple-percore-cN proxy vs select-simple-cN proxy, same run): {}",
            per_core.join("; ")
        );
    }
    s.push_str(&overhead::section(&r.overhead, md));
    if !md && !r.idle_clients.is_empty() {
        s.push('\n');
    }
    for i in &r.idle_clients {
        let _ = writeln!(
            s,
            "{}Idle clients, {}: {} of {} logged in and held; RSS {} -> {} KiB = {} bytes per client{}{}",
            if md { "\n" } else { "" },
            i.target.name(),
            i.clients_held,
            i.clients_requested,
            i.rss_before_kib.map_or("-".into(), |v| v.to_string()),
            i.rss_after_kib.map_or("-".into(), |v| v.to_string()),
            i.bytes_per_client.map_or("-".into(), |v| format!("{v:.0}")),
            i.heap_bytes_per_client
                .map_or(String::new(), |v| format!(" (heap in use: {v:.0} bytes per client)")),
            i.error.as_ref().map_or(String::new(), |e| format!(" ({e})"))
        );
    }
    s
}

fn json_kv(v: &serde_json::Value) -> String {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# helios-perf report ({} mode, {})\n",
        if r.mode == Mode::Quick {
            "quick"
        } else {
            "full"
        },
        r.date_utc
    );
    if !r.complete {
        let _ = writeln!(
            s,
            "**Incomplete run** (interrupted or failed): only the workloads below were measured.\n"
        );
    }
    let m = &r.machine;
    let _ = writeln!(
        s,
        "Machine: {} × {} CPUs, {} MiB, {} ({})  ",
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory_mib"],
        m["kernel"].as_str().unwrap_or(""),
        m["host"].as_str().unwrap_or("")
    );
    if !r.postgres.is_null() {
        let _ = writeln!(
            s,
            "PostgreSQL {}: {}  ",
            r.postgres["version"].as_str().unwrap_or(""),
            json_kv(&r.postgres["settings"])
        );
    }
    if !r.pgbouncer.is_null() {
        let _ = writeln!(
            s,
            "PgBouncer {}: {}  ",
            r.pgbouncer["version"].as_str().unwrap_or(""),
            json_kv(&r.pgbouncer["settings"])
        );
    }
    if !r.proxy.is_null() {
        let _ = writeln!(
            s,
            "HeliosProxy {}: {}  ",
            r.proxy["commit"].as_str().unwrap_or(""),
            json_kv(&r.proxy["settings"])
        );
    }
    if !r.standby.is_null() {
        let _ = writeln!(
            s,
            "PostgreSQL standby {}: {}  ",
            r.standby["version"].as_str().unwrap_or(""),
            json_kv(&r.standby["settings"])
        );
        let _ = writeln!(
            s,
            "HeliosProxy two-node (proxy column of read-mostly-c64): {}  ",
            json_kv(&r.proxy_2node["settings"])
        );
    }
    if !r.workloads.is_empty() {
        let _ = writeln!(s, "pgbench: {}\n", json_kv(&r.pgbench));
        let _ = writeln!(
            s,
            "TPS: median of the counted runs, with min–max when there are several.\n"
        );
        let _ = writeln!(
            s,
            "| workload | direct | pgbouncer | proxy | proxy/direct | proxy/pgbouncer |"
        );
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: |");
    }
    let md_cell = |c: &Cell| -> String {
        match c.status.as_str() {
            "ok" if c.runs.iter().filter(|r| r.ok).count() > 1 => {
                format!(
                    "{} ({}–{})",
                    fmt_tps(c.median_tps),
                    fmt_tps(c.min_tps),
                    fmt_tps(c.max_tps)
                )
            }
            "ok" => fmt_tps(c.median_tps),
            other => other.into(),
        }
    };
    for w in &r.workloads {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            w.workload.name,
            md_cell(&w.cells[0]),
            md_cell(&w.cells[1]),
            md_cell(&w.cells[2]),
            fmt_ratio(w.proxy_vs_direct),
            fmt_ratio(w.proxy_vs_pgbouncer)
        );
    }
    s.push_str(&two_node_notes(r, "\n", "\n"));
    s.push_str(&extra_tables(r, true));
    s.push_str(&failover::section(&r.failover, true));
    let _ = writeln!(s, "\nWorkloads:\n");
    for w in &r.workloads {
        let _ = writeln!(
            s,
            "- `{}`: {} (`pgbench {}`)",
            w.workload.name, w.workload.description, w.pgbench_args
        );
        for c in &w.cells {
            if let Some(n) = &c.note {
                let _ = writeln!(s, "  - {}: {n}", c.target.name());
            }
        }
    }
    if !r.failover.is_empty() {
        let _ = writeln!(s, "- `{}`: {}", failover::NAME, failover::DESCRIPTION);
    }
    s
}

fn run(opts: &Opts, services: &mut Services, report: &mut Report) -> Res<()> {
    let pg = PgTools::find()?;
    let run_as = if unsafe { libc::geteuid() } == 0 {
        Some(lookup_user(RUN_AS_USER).ok_or_else(|| {
            format!("running as root, PostgreSQL needs an unprivileged account: useradd --system {RUN_AS_USER}")
        })?)
    } else {
        None
    };
    let out = &opts.out;
    let mut node_dirs = vec![out.join("pg"), out.join("pg-standby")];
    if let Ok(rd) = fs::read_dir(out.join(failover::NAME)) {
        for e in rd.flatten() {
            node_dirs.extend([e.path().join("pg"), e.path().join("pg-standby")]);
        }
    }
    for node in node_dirs {
        let Ok(pid) = fs::read_to_string(node.join("data/postmaster.pid")) else {
            continue;
        };
        if let Some(pid) = pid
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<libc::pid_t>().ok())
        {
            // SAFETY: signal 0 only checks existence.
            if unsafe { libc::kill(pid, 0) } == 0 {
                return Err(format!(
                    "an earlier run's PostgreSQL still runs (pid {pid}): kill -INT {pid}"
                ));
            }
        }
    }
    let _ = fs::remove_dir_all(out);
    for d in ["logs", "runs"] {
        fs::create_dir_all(out.join(d)).map_err(|e| format!("{}: {e}", out.join(d).display()))?;
    }
    let mut selected = workloads(opts.mode);
    let (mut idle, mut overhead, mut failover) = (true, true, true);
    if let Some(only) = &opts.only {
        let all = std::mem::take(&mut selected);
        (idle, overhead, failover) = (false, false, false);
        // A comma-separated list; an exact name picks that workload alone, anything else
        // is a prefix.
        for pick in only.split(',').filter(|p| !p.is_empty()) {
            let exact = all.iter().any(|w| w.name == pick)
                || [IDLE_NAME, overhead::NAME, failover::NAME].contains(&pick);
            let matches = |name: &str| {
                if exact {
                    name == pick
                } else {
                    name.starts_with(pick)
                }
            };
            let before = selected.len();
            for w in all.iter().filter(|w| matches(&w.name)) {
                if !selected.iter().any(|s: &Workload| s.name == w.name) {
                    selected.push(w.clone());
                }
            }
            let picks_idle = matches(IDLE_NAME);
            idle |= picks_idle;
            let picks_overhead = matches(overhead::NAME);
            overhead |= picks_overhead;
            let picks_failover = matches(failover::NAME);
            failover |= picks_failover;
            if selected.len() == before
                && !picks_idle
                && !picks_overhead
                && !picks_failover
                && !all.iter().any(|w| matches(&w.name))
            {
                return Err(format!("no workload named {pick} (--list shows them)"));
            }
        }
    }

    if !selected.is_empty() || idle || overhead {
        let extras = Extras { idle, overhead };
        run_shared(opts, &pg, run_as, services, report, &selected, extras)?;
        // The failover runs start servers of their own: stop these first.
        *services = Services::default();
    }
    if failover {
        let ctx = failover::Ctx {
            pg: &pg,
            run_as,
            proxy_bin: &opts.proxy_bin,
            dir: out.join(failover::NAME),
        };
        let runs = failover::runs_per_setting(opts.mode);
        failover::run(&ctx, runs, &mut report.failover)?;
    }
    report.complete = true;
    Ok(())
}

/// The figures measured after the pgbench workloads, on the same servers.
#[derive(Clone, Copy)]
struct Extras {
    /// Memory per logged-in idle client.
    idle: bool,
    /// System calls and allocations per query.
    overhead: bool,
}

/// The pgbench workloads and the idle-clients figure: one PostgreSQL (and, for the
/// read-mostly workload, its standby), PgBouncer and the proxies, shared by every run.
fn run_shared(
    opts: &Opts,
    pg: &PgTools,
    run_as: Option<RunAs>,
    services: &mut Services,
    report: &mut Report,
    selected: &[Workload],
    extras: Extras,
) -> Res<()> {
    let Extras { idle, overhead } = extras;
    let out = &opts.out;
    let (pg_port, pg_info) = setup_postgres(pg, out, run_as, services, opts.scale)?;
    report.postgres = pg_info;
    let two_node = selected.iter().any(|w| w.kind == Kind::ReadMostly);
    let standby_port = if two_node {
        let spec = standby::StandbySpec {
            dir: out.join("pg-standby"),
            name: "postgres-standby",
            cluster_name: None,
            logs: out.join("logs"),
        };
        let (port, info) =
            standby::setup_standby(pg, run_as, services, pg_port, &report.postgres, &spec)?;
        report.standby = info;
        Some(port)
    } else {
        None
    };
    let (pgb_port, pgb_prepared, pgb_info) = setup_pgbouncer(pg, out, run_as, services, pg_port)?;
    let pgb_pid = services.0.last().map(|s| pid_of(&s.child));
    report.pgbouncer = pgb_info;
    let one_node = ProxySpec {
        label: "proxy",
        nodes: &[("perf-pg", pg_port, "primary")],
        split: false,
        extra: "",
        workers: None,
    };
    let (proxy_port, proxy_info) = setup_proxy(pg, out, &opts.proxy_bin, services, &one_node)?;
    report.proxy = proxy_info;
    let proxy_pid = services.0.last().map(|s| pid_of(&s.child));
    let proxy_2node_port = match standby_port {
        Some(sb_port) => {
            let two = ProxySpec {
                label: "proxy-2node",
                nodes: &[
                    ("perf-pg", pg_port, "primary"),
                    ("perf-pg-standby", sb_port, "standby"),
                ],
                split: true,
                extra: "",
                workers: None,
            };
            let (port, info) = setup_proxy(pg, out, &opts.proxy_bin, services, &two)?;
            report.proxy_2node = info;
            Some(port)
        }
        None => None,
    };
    let proxy_replay = if selected.iter().any(|w| w.kind == Kind::TpcbReplay) {
        let replaying = ProxySpec {
            label: "proxy-replay",
            nodes: &[("perf-pg", pg_port, "primary")],
            split: false,
            extra: "[failover]\nreplay = true\ntrack_commit_outcome = true\n",
            workers: None,
        };
        let (port, info) = setup_proxy(pg, out, &opts.proxy_bin, services, &replaying)?;
        report.proxy_replay = info;
        Some((port, services.0.last().map(|s| pid_of(&s.child))))
    } else {
        None
    };
    let proxy_per_core = if selected.iter().any(|w| w.kind == Kind::SelectPerCore) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let per_core = ProxySpec {
            label: "proxy-percore",
            nodes: &[("perf-pg", pg_port, "primary")],
            split: false,
            extra: "",
            workers: Some(cores),
        };
        let (port, info) = setup_proxy(pg, out, &opts.proxy_bin, services, &per_core)?;
        report.proxy_per_core = info;
        Some((port, services.0.last().map(|s| pid_of(&s.child))))
    } else {
        None
    };
    let proxy_cache = if selected
        .iter()
        .any(|w| matches!(w.kind, Kind::HotSelectCached | Kind::TpcbCached))
    {
        let caching = ProxySpec {
            label: "proxy-cache",
            nodes: &[("perf-pg", pg_port, "primary")],
            split: false,
            extra: CACHE_CONFIG,
            workers: None,
        };
        let (port, info) = setup_proxy(pg, out, &opts.proxy_bin, services, &caching)?;
        let admin = info["admin_port"].as_u64().unwrap_or(0) as u16;
        report.proxy_cache = info;
        Some((port, services.0.last().map(|s| pid_of(&s.child)), admin))
    } else {
        None
    };
    let hot_script = out.join("hot-select.sql");
    fs::write(&hot_script, HOT_SELECT_SCRIPT).map_err(|e| e.to_string())?;
    let env = Env {
        pg: pg.clone(),
        ports: [pg_port, pgb_port, proxy_port],
        pids: [None, pgb_pid, proxy_pid],
        pgbouncer_prepared: pgb_prepared,
        proxy_2node_port,
        proxy_replay,
        proxy_per_core,
        proxy_cache,
        hot_script,
    };

    // Warm-up (not counted): fills the poolers' backend pools and PostgreSQL's caches.
    let warm = Workload {
        name: "warmup".into(),
        kind: Kind::SelectSimple,
        clients: 16,
        description: "",
        latency: false,
        cpu: false,
    };
    // The two-node proxy warms up with the read-mostly mix, which reaches both nodes once
    // reads are split.
    let warm_2node = Workload {
        name: "warmup-2node".into(),
        kind: Kind::ReadMostly,
        ..warm.clone()
    };
    let mut warmups: Vec<(&Workload, Target)> = TARGETS.iter().map(|&t| (&warm, t)).collect();
    if env.proxy_2node_port.is_some() {
        warmups.push((&warm_2node, Target::Proxy));
    }
    let warm_replay = Workload {
        name: "warmup-replay".into(),
        kind: Kind::TpcbReplay,
        ..warm.clone()
    };
    if env.proxy_replay.is_some() {
        warmups.push((&warm_replay, Target::Proxy));
    }
    let warm_per_core = Workload {
        name: "warmup-percore".into(),
        kind: Kind::SelectPerCore,
        ..warm.clone()
    };
    if env.proxy_per_core.is_some() {
        warmups.push((&warm_per_core, Target::Proxy));
    }
    // The caching proxy learns the statement and fills the hot set.
    let warm_cache = Workload {
        name: "warmup-cache".into(),
        kind: Kind::HotSelectCached,
        ..warm.clone()
    };
    if env.proxy_cache.is_some() {
        warmups.push((&warm_cache, Target::Proxy));
    }
    for (w, t) in warmups {
        services.check_alive()?;
        let r = run_pgbench(&env, w, t, 0, 1, &out.join("logs"))?;
        if !r.ok {
            return Err(format!(
                "{} against {} failed: {}",
                w.name,
                t.name(),
                r.error.unwrap_or_default()
            ));
        }
    }

    let runs_dir = out.join("runs");
    for w in selected {
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(), Vec::new(), Vec::new()];
        for rep in 0..opts.reps {
            for t in TARGETS {
                if env.unsupported(w, t).is_some() {
                    continue;
                }
                services.check_alive()?;
                log(format!(
                    "{} rep {}/{} {}",
                    w.name,
                    rep + 1,
                    opts.reps,
                    t.name()
                ));
                let r = run_pgbench(&env, w, t, rep, opts.duration_s, &runs_dir)?;
                match &r.error {
                    None => log(format!("  {} TPS", fmt_tps(r.tps))),
                    Some(e) => log(format!("  does not count: {e}")),
                }
                runs[t as usize].push(r);
            }
        }
        let cells: Vec<Cell> = TARGETS
            .iter()
            .zip(runs)
            .map(|(&t, r)| summarize(t, r, env.unsupported(w, t)))
            .collect();
        let ratio = |a: &Cell, b: &Cell| match (a.median_tps, b.median_tps) {
            (Some(x), Some(y)) if y > 0.0 => Some(x / y),
            _ => None,
        };
        report.workloads.push(WorkloadResult {
            workload: w.clone(),
            pgbench_args: w.pgbench_args(opts.duration_s).join(" "),
            proxy_vs_direct: ratio(&cells[2], &cells[0]),
            proxy_vs_pgbouncer: ratio(&cells[2], &cells[1]),
            cells,
        });
    }
    if let Some((_, _, admin)) = env.proxy_cache {
        match admin_get(admin, "/cache") {
            Ok(stats) => report.cache_stats = stats,
            Err(e) => log(format!("proxy-cache /cache unavailable: {e}")),
        }
        match loopback_round_trip_us() {
            Ok(us) => report.loopback_rtt_p50_us = Some(us),
            Err(e) => log(format!("loopback round trip not measured: {e}")),
        }
    }
    if let Some(admin) = report.proxy_2node["admin_port"].as_u64() {
        match routing_decisions(admin as u16) {
            Ok(decisions) => report.proxy_2node["routing_decisions"] = decisions,
            Err(e) => log(format!("proxy-2node routing decisions unavailable: {e}")),
        }
    }
    if overhead {
        services.check_alive()?;
        let subjects: Vec<overhead::Subject> = [Target::Pgbouncer, Target::Proxy]
            .into_iter()
            .filter_map(|t| {
                Some(overhead::Subject {
                    name: t.name(),
                    port: env.port(t),
                    pid: env.pids[t as usize]?,
                    admin_port: (t == Target::Proxy)
                        .then(|| report.proxy["admin_port"].as_u64())
                        .flatten()
                        .map(|p| p as u16),
                })
            })
            .collect();
        log(format!(
            "{}: system calls and allocations per query",
            overhead::NAME
        ));
        report.overhead =
            overhead::measure(&env.pg.tool("pgbench"), &subjects, &runs_dir, |port| {
                admin_get(port, "/metrics")
            });
        for r in &report.overhead {
            log(format!("  {}", overhead::line(r)));
        }
    }
    if idle {
        let n = opts.idle_clients.unwrap_or(match opts.mode {
            Mode::Quick => 1000,
            Mode::Full => 10000,
        });
        // A proxy of its own, started now: the workloads' proxy has grown its heap
        // (freed memory stays in RSS), which would hide what the idle clients add.
        let fresh = ProxySpec {
            label: "proxy-idle",
            nodes: &[("perf-pg", pg_port, "primary")],
            split: false,
            extra: "",
            workers: None,
        };
        let (idle_port, idle_info) = setup_proxy(pg, out, &opts.proxy_bin, services, &fresh)?;
        let idle_pid = services.0.last().map(|s| pid_of(&s.child));
        let subjects = [
            IdleSubject {
                target: Target::Pgbouncer,
                port: env.port(Target::Pgbouncer),
                pid: env.pids[Target::Pgbouncer as usize],
                admin_port: None,
            },
            IdleSubject {
                target: Target::Proxy,
                port: idle_port,
                pid: idle_pid,
                admin_port: idle_info["admin_port"].as_u64().map(|p| p as u16),
            },
        ];
        for subject in &subjects {
            services.check_alive()?;
            if interrupted() {
                return Err("interrupted".into());
            }
            log(format!(
                "{IDLE_NAME}: {n} logged-in idle clients on {}",
                subject.target.name()
            ));
            let r = measure_idle(subject, n);
            log(format!(
                "  {} held, {} bytes of RSS per client{}{}",
                r.clients_held,
                r.bytes_per_client.map_or("-".into(), |b| format!("{b:.0}")),
                r.heap_bytes_per_client
                    .map_or(String::new(), |b| format!(" ({b:.0} bytes of heap)")),
                r.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})"))
            ));
            report.idle_clients.push(r);
        }
    }
    Ok(())
}

fn write_reports(out: &Path, report: &Report) -> Res<()> {
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    fs::write(out.join("report.json"), json + "\n").map_err(|e| e.to_string())?;
    fs::write(out.join("report.md"), markdown(report)).map_err(|e| e.to_string())?;
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one (inherited by the servers).
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
        rl.rlim_cur
    }
}

fn main() {
    install_signal_handlers();
    let fd_limit = raise_fd_limit();
    let opts = parse_opts();
    let mut report = Report {
        date_utc: capture("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        mode: opts.mode,
        complete: false,
        machine: machine_info(),
        postgres: serde_json::Value::Null,
        pgbouncer: serde_json::Value::Null,
        proxy: serde_json::Value::Null,
        standby: serde_json::Value::Null,
        proxy_2node: serde_json::Value::Null,
        proxy_replay: serde_json::Value::Null,
        proxy_cache: serde_json::Value::Null,
        cache_stats: serde_json::Value::Null,
        loopback_rtt_p50_us: None,
        proxy_per_core: serde_json::Value::Null,
        pgbench: serde_json::json!({
            "scale": opts.scale,
            "duration_s": opts.duration_s,
            "reps": opts.reps,
            "order": "per workload: direct, pgbouncer, proxy, repeated",
            "jobs": "min(clients, 16)",
            "fd_limit": fd_limit,
        }),
        workloads: Vec::new(),
        idle_clients: Vec::new(),
        overhead: Vec::new(),
        failover: Vec::new(),
    };
    let result = {
        let mut services = Services::default();
        let r = run(&opts, &mut services, &mut report);
        // Dropping `services` stops every server by PID, in reverse start order.
        drop(services);
        remove_temp_dirs();
        r
    };
    if !report.workloads.is_empty() || !report.failover.is_empty() || result.is_ok() {
        if let Err(e) = write_reports(&opts.out, &report) {
            eprintln!("helios-perf: cannot write the report: {e}");
        }
        println!();
        print!("{}", terminal_table(&report));
        println!(
            "\nreports: {} and {}",
            opts.out.join("report.md").display(),
            opts.out.join("report.json").display()
        );
    }
    if let Err(e) = result {
        eprintln!("helios-perf: {e}");
        std::process::exit(if interrupted() { 130 } else { 1 });
    }
}
