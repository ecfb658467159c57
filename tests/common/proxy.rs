//! The system under test: a `heliosdb-proxy` process in front of the cluster, or, with
//! HELIOS_TEST_TARGET=direct, PostgreSQL itself behind the same interface.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cluster::{
    stop_process, PgCluster, DATABASE, MD5_PASSWORD, MD5_USER, SUPERUSER, SUPERUSER_PASSWORD,
    TRUST_USER,
};
use super::tools::free_port;

pub const PROXY_BIN: &str = env!("CARGO_BIN_EXE_heliosdb-proxy");
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// PIDs of proxies not yet stopped, killed at exit should a test leak one.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub(crate) fn kill_leftovers() {
    let pids = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: a proxy we spawned whose Drop never ran; SIGKILL it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Where clients connect: the proxy, or PostgreSQL itself in direct mode.
pub struct Proxy {
    pub host: String,
    pub port: u16,
    pub admin_port: Option<u16>,
    pub config_path: Option<PathBuf>,
    /// The (merged) configuration the proxy runs with; empty in direct mode.
    pub config: toml::Table,
    child: Mutex<Option<Child>>,
    log_path: Option<PathBuf>,
    dir: Option<tempfile::TempDir>,
}

/// The target selected by HELIOS_TEST_TARGET, with `overrides` (TOML) merged into the proxy's
/// base configuration (ignored in direct mode).
pub fn target(overrides: &str) -> Proxy {
    let cluster = super::cluster();
    if super::is_direct() {
        Proxy::direct(cluster)
    } else {
        Proxy::start(cluster, overrides)
    }
}

/// The base configuration: two workers, the cluster as primary, and the three test users.
pub fn base_config(pg_port: u16, listen_port: u16, admin_port: u16) -> toml::Table {
    let text = format!(
        r#"
listen_address = "127.0.0.1:{listen_port}"
admin_address = "127.0.0.1:{admin_port}"
workers = 2

[timeouts]
shutdown_timeout_secs = 5

[[nodes]]
name = "pg"
host = "127.0.0.1"
port = {pg_port}
role = "primary"

[[users]]
name = "{SUPERUSER}"
password = "{SUPERUSER_PASSWORD}"

[[users]]
name = "{MD5_USER}"
password = "{MD5_PASSWORD}"
auth_method = "md5"

[[users]]
name = "{TRUST_USER}"
auth_method = "trust"
server_user = "{SUPERUSER}"
server_password = "{SUPERUSER_PASSWORD}"
"#
    );
    toml::from_str(&text).expect("base config is valid TOML")
}

/// Merges `overrides` into `base`: tables merge key by key, anything else (arrays of tables
/// included) replaces.
pub fn merge(base: &mut toml::Table, overrides: &str) {
    let overrides: toml::Table = toml::from_str(overrides)
        .unwrap_or_else(|e| panic!("test config overrides are not TOML: {e}\n{overrides}"));
    merge_tables(base, overrides);
}

fn merge_tables(base: &mut toml::Table, overrides: toml::Table) {
    for (key, value) in overrides {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => merge_tables(into, from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A `heliosdb-proxy` command with every HELIOS_* variable removed: the proxy reads them as
/// configuration overrides, and the test runner's own (HELIOS_TEST_TARGET) are not.
pub fn proxy_command() -> Command {
    let mut cmd = Command::new(PROXY_BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HELIOS_") {
            cmd.env_remove(key);
        }
    }
    let log_level = std::env::var("HELIOS_TEST_PROXY_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("RUST_LOG", log_level).stdin(Stdio::null());
    cmd
}

impl Proxy {
    /// Writes the config, spawns the proxy and waits until its port accepts connections.
    pub fn start(cluster: &PgCluster, overrides: &str) -> Proxy {
        Self::start_logged(cluster, overrides, None)
    }

    /// [`Proxy::start`] with its own `RUST_LOG` filter.
    pub fn start_logged(cluster: &PgCluster, overrides: &str, rust_log: Option<&str>) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("helios-proxy-")
            .tempdir()
            .expect("temp dir for the proxy");
        let (port, admin_port) = (free_port(), free_port());
        let mut config = base_config(cluster.port, port, admin_port);
        merge(&mut config, overrides);
        let text = toml::to_string(&config).expect("serialise config");
        Self::spawn(dir, &text, config, port, admin_port, rust_log)
    }

    /// The proxy with exactly the configuration `text(listen_port, admin_port)` returns
    /// (no base configuration): for checking the example configurations as written.
    pub fn start_exact(text: impl FnOnce(u16, u16) -> String) -> Proxy {
        let dir = tempfile::Builder::new()
            .prefix("helios-proxy-")
            .tempdir()
            .expect("temp dir for the proxy");
        let (port, admin_port) = (free_port(), free_port());
        let text = text(port, admin_port);
        let config: toml::Table = toml::from_str(&text).expect("config is TOML");
        Self::spawn(dir, &text, config, port, admin_port, None)
    }

    fn spawn(
        dir: tempfile::TempDir,
        text: &str,
        config: toml::Table,
        port: u16,
        admin_port: u16,
        rust_log: Option<&str>,
    ) -> Proxy {
        let config_path = dir.path().join("heliosdb-proxy.toml");
        fs::write(&config_path, text).expect("write proxy config");
        let log_path = dir.path().join("proxy.log");
        let log = fs::File::create(&log_path).expect("create proxy log");
        let log_err = log.try_clone().expect("dup proxy log");
        let mut command = proxy_command();
        if let Some(filter) = rust_log {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .arg("--config")
            .arg(&config_path)
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {PROXY_BIN}: {e}"));
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        let proxy = Proxy {
            host: "127.0.0.1".into(),
            port,
            admin_port: Some(admin_port),
            config_path: Some(config_path),
            config,
            child: Mutex::new(Some(child)),
            log_path: Some(log_path),
            dir: Some(dir),
        };
        proxy.wait_ready();
        proxy
    }

    /// PostgreSQL itself behind the proxy's interface (harness-validation mode).
    pub fn direct(cluster: &PgCluster) -> Proxy {
        Proxy {
            host: "127.0.0.1".into(),
            port: cluster.port,
            admin_port: None,
            config_path: None,
            config: toml::Table::new(),
            child: Mutex::new(None),
            log_path: None,
            dir: None,
        }
    }

    pub fn is_direct(&self) -> bool {
        self.log_path.is_none()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = self.exit_status() {
                panic!(
                    "proxy exited during start-up with {status}:\n{}",
                    self.log()
                );
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "proxy not accepting on {addr} after {READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The proxy's combined stdout/stderr so far ("" in direct mode).
    pub fn log(&self) -> String {
        self.log_path
            .as_deref()
            .map(|p: &Path| fs::read_to_string(p).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Child::id)
    }

    /// Some(status) once the proxy process has exited (None while running or in direct mode).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Panics with the log if the proxy process has died.
    pub fn assert_running(&self) {
        if let Some(status) = self.exit_status() {
            panic!("proxy died with {status}:\n{}", self.log());
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.pid().expect("a proxy process (not direct mode)");
        if self.exit_status().is_none() {
            let pid = i32::try_from(pid).expect("pid fits i32");
            // SAFETY: the child is not reaped yet (exit_status is None), so the PID is ours.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the proxy's config file as its start-up configuration changed by `change`
    /// (for reload tests; the running proxy reads it on reload).
    pub fn rewrite_config(&self, change: impl FnOnce(&mut toml::Table)) {
        let mut config = self.config.clone();
        change(&mut config);
        let path = self
            .config_path
            .as_ref()
            .expect("a config file (not direct mode)");
        fs::write(path, toml::to_string(&config).expect("serialise config"))
            .expect("write proxy config");
    }

    /// The configured value of `[pool_mode] max_pool_size` (the proxy's default 20 if unset).
    pub fn max_pool_size(&self) -> i64 {
        self.config
            .get("pool_mode")
            .and_then(|t| t.get("max_pool_size"))
            .and_then(toml::Value::as_integer)
            .unwrap_or(20)
    }

    /// tokio-postgres configuration for `user` on this target.
    pub fn pg_config(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(user)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = password {
            cfg.password(password);
        }
        cfg
    }

    /// Connects with `cfg`, spawning the connection driver; the handle lets a test drop the
    /// socket abruptly (abort it) instead of closing politely.
    pub async fn connect_with(
        cfg: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((client, driver))
    }

    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, _driver) = Self::connect_with(&self.pg_config(user, password, db)).await?;
        Ok(client)
    }

    /// The superuser on database `app`; panics if the login fails.
    pub async fn client(&self) -> tokio_postgres::Client {
        self.connect(SUPERUSER, Some(SUPERUSER_PASSWORD), DATABASE)
            .await
            .unwrap_or_else(|e| panic!("login as {SUPERUSER} failed: {e:?}\n{}", self.log()))
    }

    /// The superuser on `db`, retrying for a while: for a client that must wait until the
    /// pool gets back the backend a just-closed session held.
    pub async fn client_when_free(&self, db: &str) -> tokio_postgres::Client {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match self.connect(SUPERUSER, Some(SUPERUSER_PASSWORD), db).await {
                Ok(client) => return client,
                Err(e) if std::time::Instant::now() >= deadline => {
                    panic!("no login on {db} within 10 s: {e:?}\n{}", self.log())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// The password-less user on database `app`; panics if the login fails.
    pub async fn trust_client(&self) -> tokio_postgres::Client {
        self.connect(TRUST_USER, None, DATABASE)
            .await
            .unwrap_or_else(|e| panic!("login as {TRUST_USER} failed: {e:?}\n{}", self.log()))
    }

    /// Sends SIGTERM and waits for the exit status (SIGKILL after a bound). Prints the log.
    pub fn stop(&self) -> Option<ExitStatus> {
        let child = self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let pid = child.id();
        let status = stop_process(child, libc::SIGTERM, STOP_TIMEOUT);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != pid);
        status
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let status = self.stop();
        let failed = std::thread::panicking() || status.is_some_and(|s| !s.success());
        if failed && !self.is_direct() {
            eprintln!(
                "--- proxy log ({}; exit {status:?}) ---\n{}--- end of proxy log ---",
                self.dir
                    .as_ref()
                    .map(|d| d.path().display().to_string())
                    .unwrap_or_default(),
                self.log()
            );
        }
    }
}

/// Sets `[pool_mode] max_pool_size` in a configuration table.
pub fn set_pool_size(config: &mut toml::Table, size: i64) {
    config
        .entry("pool_mode")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .expect("[pool_mode] is a table")
        .insert("max_pool_size".into(), toml::Value::Integer(size));
}
