//! One private PostgreSQL per test binary: initdb into a temp dir, start it on a free loopback
//! port with SCRAM authentication over TCP, create the roles and database the scenarios use,
//! and stop it by PID when the process exits (the test harness runs no static destructors).
//!
//! PostgreSQL refuses to run as root, so under root initdb and postgres run as an unprivileged
//! user (`HELIOS_TEST_PG_USER`, else `helios-test`, `postgres` or `nobody`, the first that
//! exists; scripts/test.sh creates `helios-test`) that owns the temp dir.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::tools::{self, run_tool};

pub const SUPERUSER: &str = "helios";
pub const SUPERUSER_PASSWORD: &str = "helios-secret";
/// A role whose password PostgreSQL stores as an md5 hash and checks with md5.
pub const MD5_USER: &str = "md5user";
pub const MD5_PASSWORD: &str = "md5-secret";
/// Logs in to the proxy without a password; the proxy logs in to PostgreSQL as SUPERUSER.
/// PostgreSQL trusts the same role name so direct mode can run the same scenarios.
pub const TRUST_USER: &str = "trustme";
pub const DATABASE: &str = "app";
pub const MAX_CONNECTIONS: u32 = 300;

const START_ATTEMPTS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub struct PgCluster {
    pub port: u16,
    pub bin_dir: PathBuf,
    /// Directory of the unix socket (local connections are trusted).
    pub socket_dir: PathBuf,
    root: PathBuf,
    owner: Option<Owner>,
    child: Mutex<Option<Child>>,
    removed: Mutex<bool>,
}

/// The unprivileged account PostgreSQL runs as when the tests run as root.
#[derive(Clone, Debug)]
struct Owner {
    name: String,
    uid: u32,
    gid: u32,
}

static CLUSTER: OnceLock<PgCluster> = OnceLock::new();

/// The cluster shared by every test of this binary, started on first use.
pub fn cluster() -> &'static PgCluster {
    CLUSTER.get_or_init(|| {
        let cluster = PgCluster::start();
        // SAFETY: registers a plain function without captured state; it runs once at exit.
        unsafe { libc::atexit(stop_at_exit) };
        cluster
    })
}

extern "C" fn stop_at_exit() {
    super::proxy::kill_leftovers();
    if let Some(cluster) = CLUSTER.get() {
        cluster.stop();
    }
}

impl PgCluster {
    /// initdb + start + roles. Panics with PostgreSQL's own output when a step fails.
    pub fn start() -> PgCluster {
        let bin_dir = pg_bin_dir();
        let owner = unprivileged_owner();
        let root = tempfile::Builder::new()
            .prefix("helios-pg-")
            .tempdir()
            .expect("create temp dir for PostgreSQL")
            .keep();
        let mut cluster = PgCluster {
            port: 0,
            bin_dir,
            socket_dir: root.clone(),
            root,
            owner,
            child: Mutex::new(None),
            removed: Mutex::new(false),
        };
        // From here on a panic drops `cluster`, which stops postgres and removes the dir.
        cluster.give_to_owner(&cluster.root.clone());
        cluster.initdb();
        cluster.configure();
        cluster.launch_on_free_port();
        cluster.create_roles();
        cluster
    }

    /// Starts postgres on a free port, trying a few ports; panics with the last error.
    fn launch_on_free_port(&mut self) {
        let mut last_error = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = tools::free_port();
            match self.launch(port) {
                Ok(()) => {
                    self.port = port;
                    return;
                }
                Err(e) => {
                    eprintln!("postgres start attempt {attempt} on port {port} failed: {e}");
                    last_error = e;
                }
            }
        }
        panic!("PostgreSQL did not start: {last_error}");
    }

    /// A streaming standby of this server (`pg_basebackup -R` over the trusted socket),
    /// started on its own free port and socket directory; stopped and removed on drop.
    pub fn start_standby(&self) -> PgCluster {
        self.start_standby_named(None)
    }

    /// [`Self::start_standby`] streaming under `name` (its `cluster_name`, which is what
    /// `synchronous_standby_names` matches).
    pub fn start_standby_named(&self, name: Option<&str>) -> PgCluster {
        let root = tempfile::Builder::new()
            .prefix("helios-pg-standby-")
            .tempdir()
            .expect("create temp dir for the standby")
            .keep();
        let mut standby = PgCluster {
            port: 0,
            bin_dir: self.bin_dir.clone(),
            socket_dir: root.clone(),
            root,
            owner: self.owner.clone(),
            child: Mutex::new(None),
            removed: Mutex::new(false),
        };
        standby.give_to_owner(&standby.root.clone());
        let mut cmd = standby.server_command("pg_basebackup");
        cmd.arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-D"])
            .arg(standby.data_dir())
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        let out = run_tool(cmd, None, Duration::from_secs(120));
        assert!(out.status.success(), "pg_basebackup failed:\n{out}");
        // The copied postgresql.conf names the primary's socket directory; the last line wins.
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(standby.data_dir().join("postgresql.conf"))
            .expect("open the standby's postgresql.conf");
        writeln!(
            conf,
            "unix_socket_directories = '{}'",
            standby.socket_dir.display()
        )
        .expect("append the standby's postgresql.conf");
        if let Some(name) = name {
            writeln!(conf, "cluster_name = '{name}'").expect("append cluster_name");
        }
        standby.launch_on_free_port();
        standby
    }

    /// `kill -9` of the postmaster alone: its backends live on until they notice, and the
    /// files stay for [`Self::restart_after_crash`].
    pub fn kill_postmaster(&self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(child) = child {
            stop_process(child, libc::SIGKILL, STOP_TIMEOUT);
        }
    }

    /// Starts the server again on its port after a crash (crash recovery: it comes back
    /// writable), trying again while orphaned backends still hold its shared memory.
    pub fn restart_after_crash(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.launch(self.port) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("PostgreSQL did not restart on port {}: {e}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Promotes this standby (`pg_promote()`, waiting until it is done).
    pub fn promote(&self) {
        let out = self.psql_admin("postgres", "SELECT pg_promote(true, 60);\n");
        assert_eq!(out.trim(), "t", "pg_promote did not finish");
    }

    /// Stops the server (fast shutdown) but keeps its files, for [`Self::restart_server`].
    pub fn stop_server(&self) {
        self.kill_child();
    }

    /// Starts the server again on its port after [`Self::stop_server`].
    pub fn restart_server(&self) {
        self.launch(self.port)
            .unwrap_or_else(|e| panic!("PostgreSQL did not restart on port {}: {e}", self.port));
    }

    /// Turns TLS on with this certificate and key and accepts only TLS connections over
    /// TCP (`hostssl` lines), then restarts the server.
    pub fn require_ssl(&self, cert_pem: &str, key_pem: &str) {
        let data = self.data_dir();
        for (name, pem) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            fs::write(&path, pem).expect("write TLS file");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
            self.give_to_owner(&path);
        }
        let hba = format!(
            "local all all trust\n\
             local replication all trust\n\
             hostssl all {MD5_USER} 127.0.0.1/32 md5\n\
             hostssl all {TRUST_USER} 127.0.0.1/32 trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n"
        );
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        conf.write_all(b"\nssl = on\n")
            .expect("append postgresql.conf");
        self.stop_server();
        self.restart_server();
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// A command for a PostgreSQL server program, run as the unprivileged owner under root.
    fn server_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.root)
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .stdin(Stdio::null());
        if let Some(owner) = &self.owner {
            cmd.uid(owner.uid).gid(owner.gid).env("HOME", &self.root);
        }
        cmd
    }

    fn give_to_owner(&self, path: &Path) {
        let Some(owner) = &self.owner else { return };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL");
        // SAFETY: chown on a NUL-terminated path we own; the result is checked.
        let rc = unsafe { libc::chown(c_path.as_ptr(), owner.uid, owner.gid) };
        assert_eq!(
            rc,
            0,
            "chown {} to {}: {}",
            path.display(),
            owner.name,
            std::io::Error::last_os_error()
        );
    }

    fn initdb(&self) {
        let pwfile = self.root.join("pwfile");
        fs::write(&pwfile, format!("{SUPERUSER_PASSWORD}\n")).expect("write pwfile");
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).expect("chmod pwfile");
        self.give_to_owner(&pwfile);
        let mut cmd = self.server_command("initdb");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-U", SUPERUSER, "--pwfile"])
            .arg(&pwfile)
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]);
        let out = run_tool(cmd, None, Duration::from_secs(120));
        assert!(out.status.success(), "initdb failed:\n{out}");
        let _ = fs::remove_file(pwfile);
    }

    /// Authentication rules and server settings for a small, fast, throwaway server.
    fn configure(&self) {
        let data = self.data_dir();
        let hba = format!(
            "local all all trust\n\
             local replication all trust\n\
             host all {MD5_USER} 127.0.0.1/32 md5\n\
             host all {TRUST_USER} 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n"
        );
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        let settings = format!(
            "\n# helios e2e harness\n\
             listen_addresses = '127.0.0.1'\n\
             max_connections = {MAX_CONNECTIONS}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             unix_socket_directories = '{}'\n\
             password_encryption = 'scram-sha-256'\n\
             shared_buffers = '64MB'\n\
             log_min_messages = warning\n\
             log_connections = off\n\
             wal_level = logical\n",
            self.socket_dir.display()
        );
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        conf.write_all(settings.as_bytes())
            .expect("append postgresql.conf");
    }

    /// Starts postgres on `port` and waits until it answers; Err with the log tail if it exits.
    fn launch(&self, port: u16) -> Result<(), String> {
        let log_path = self.root.join(format!("postgres-{port}.log"));
        let log = fs::File::create(&log_path).map_err(|e| format!("create log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("dup log: {e}"))?;
        let mut cmd = self.server_command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-p", &port.to_string()])
            .stdout(log)
            .stderr(log_err);
        let child = cmd.spawn().map_err(|e| format!("spawn postgres: {e}"))?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child_status() {
                self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("postgres exited with {status}:\n{log}"));
            }
            if self.ping(port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_child();
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "postgres not ready after {READY_TIMEOUT:?}:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn child_status(&self) -> Option<std::process::ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn ping(&self, port: u16) -> bool {
        let mut cmd = self.local_psql(port, "postgres");
        cmd.args(["-Atc", "SELECT 1"]);
        let out = run_tool(cmd, None, Duration::from_secs(10));
        out.status.success() && out.stdout.trim() == "1"
    }

    /// psql over the unix socket as the superuser (trusted, no password).
    fn local_psql(&self, port: u16, db: &str) -> Command {
        let mut cmd = tools::tool_command("psql");
        cmd.arg("-X")
            .args(["-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &port.to_string(), "-U", SUPERUSER, "-d", db]);
        cmd
    }

    /// Runs SQL as the superuser over the unix socket; panics with psql's output on error.
    pub fn psql_admin(&self, db: &str, sql: &str) -> String {
        let mut cmd = self.local_psql(self.port, db);
        cmd.args(["-At", "-f", "-"]);
        let out = run_tool(cmd, Some(sql.as_bytes()), Duration::from_secs(60));
        assert!(out.status.success(), "psql failed on {sql:?}:\n{out}");
        out.stdout
    }

    fn create_roles(&self) {
        self.psql_admin(
            "postgres",
            &format!(
                "SET password_encryption = 'md5';\n\
                 CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';\n\
                 RESET password_encryption;\n\
                 CREATE ROLE {TRUST_USER} LOGIN;\n\
                 CREATE DATABASE {DATABASE} OWNER {SUPERUSER};\n"
            ),
        );
        self.psql_admin(
            DATABASE,
            &format!("GRANT ALL ON SCHEMA public TO {MD5_USER}, {TRUST_USER};\n"),
        );
    }

    /// tokio-postgres configuration for the superuser over the unix socket (no SCRAM cost).
    pub fn admin_config(&self, db: &str) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(db)
            .application_name("helios-e2e-admin")
            .connect_timeout(Duration::from_secs(10));
        cfg
    }

    /// A superuser connection straight to PostgreSQL, for checking what the server sees.
    pub async fn admin(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = self
            .admin_config(db)
            .connect(tokio_postgres::NoTls)
            .await
            .expect("admin connection to PostgreSQL");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// One bigint computed directly on PostgreSQL (database `postgres`).
    pub async fn admin_i64(&self, sql: &str) -> i64 {
        let client = self.admin("postgres").await;
        client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("admin query {sql:?}: {e}"))
            .get(0)
    }

    /// One bigint computed directly on PostgreSQL in database `db`.
    pub async fn admin_i64_in(&self, db: &str, sql: &str) -> i64 {
        let client = self.admin(db).await;
        client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("admin query {sql:?}: {e}"))
            .get(0)
    }

    fn kill_child(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(child) = guard.take() {
            stop_process(child, libc::SIGINT, STOP_TIMEOUT);
        }
    }

    /// Stops postgres (SIGINT = fast shutdown, SIGKILL after a bound) and removes its files.
    /// Idempotent. Set HELIOS_TEST_KEEP=1 to keep the directory for a post-mortem.
    pub fn stop(&self) {
        self.kill_child();
        let mut removed = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        if *removed {
            return;
        }
        *removed = true;
        if std::env::var_os("HELIOS_TEST_KEEP").is_some() {
            eprintln!("keeping PostgreSQL files in {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `signal`, waits up to `limit`, then SIGKILLs; always reaps the child.
pub fn stop_process(
    mut child: Child,
    signal: i32,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signals a child we spawned and have not reaped yet, so the PID is ours.
        unsafe { libc::kill(pid, signal) };
    }
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Where initdb and postgres live: HELIOS_PG_BIN, the directory of `initdb` on PATH (symlinks
/// followed), `pg_config --bindir`, or the newest /usr/lib/postgresql/*/bin.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let has_server =
            |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Some(dir) = std::env::var_os("HELIOS_PG_BIN").map(PathBuf::from) {
            assert!(
                has_server(&dir),
                "HELIOS_PG_BIN={} has no initdb/postgres",
                dir.display()
            );
            return dir;
        }
        if let Some(initdb) = tools::find_on_path("initdb") {
            if let Some(dir) = fs::canonicalize(initdb)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                if has_server(&dir) {
                    return dir;
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if out.status.success() && has_server(&dir) {
                return dir;
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                let dir = e.path().join("bin");
                has_server(&dir).then_some((version, dir))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, dir)| dir).unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries not found (initdb/postgres): install postgresql \
                 (scripts/test.sh does) or set HELIOS_PG_BIN"
            )
        })
    })
    .clone()
}

/// None when not root; else the account PostgreSQL runs as.
fn unprivileged_owner() -> Option<Owner> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let candidates: Vec<String> = match std::env::var("HELIOS_TEST_PG_USER") {
        Ok(name) if !name.is_empty() => vec![name],
        _ => ["helios-test", "postgres", "nobody"]
            .map(String::from)
            .to_vec(),
    };
    for name in &candidates {
        if let Some((uid, gid)) = lookup_user(name) {
            if uid != 0 {
                return Some(Owner {
                    name: name.clone(),
                    uid,
                    gid,
                });
            }
        }
    }
    panic!(
        "running as root, and none of the users {candidates:?} exists to run PostgreSQL as \
         (it refuses root): run scripts/test.sh, which creates `helios-test`, or set \
         HELIOS_TEST_PG_USER"
    )
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain data; getpwnam_r fills it and points its strings into `buf`.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the stated sizes for the duration of the call.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}
