//! External programs (psql, pgbench, initdb) run with a time bound, free ports, and bounded
//! waiting.

use std::collections::HashSet;
use std::fmt;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::proxy::Proxy;

/// What a finished program printed.
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for ToolOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion, feeding `stdin`; kills it and panics if it outlives `limit`.
pub fn run_tool(mut cmd: Command, stdin: Option<&[u8]>, limit: Duration) -> ToolOutput {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let feeder = stdin.map(|bytes| {
        let bytes = bytes.to_vec();
        let mut pipe = child.stdin.take().expect("piped stdin");
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let readers = [
        child.stdout.take().map(|mut p| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                buf
            })
        }),
        child.stderr.take().map(|mut p| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                buf
            })
        }),
    ];
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{program} did not finish within {limit:?}");
            }
            Err(e) => panic!("waiting for {program}: {e}"),
        }
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let [out, err] = readers.map(|r| {
        r.and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    });
    ToolOutput {
        status,
        stdout: out,
        stderr: err,
    }
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A PostgreSQL client program: the one matching the server binaries, else from PATH.
pub fn pg_tool(name: &str) -> PathBuf {
    let beside_server = super::cluster::pg_bin_dir().join(name);
    if beside_server.is_file() {
        return beside_server;
    }
    find_on_path(name).unwrap_or_else(|| {
        panic!("{name} not found beside initdb or on PATH: install postgresql-client")
    })
}

/// A command for a client program with every inherited PG* variable removed, so the
/// caller's environment cannot redirect it.
pub fn tool_command(name: &str) -> Command {
    let mut cmd = Command::new(pg_tool(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PGCONNECT_TIMEOUT", "10").env("LC_ALL", "C");
    cmd
}

/// A client program aimed at `target` as `user` (password via PGPASSWORD).
fn client_command(name: &str, target: &Proxy, user: &str, password: Option<&str>) -> Command {
    let mut cmd = tool_command(name);
    cmd.env("PGHOST", &target.host)
        .env("PGPORT", target.port.to_string())
        .env("PGUSER", user)
        .env("PGDATABASE", super::DATABASE);
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd
}

/// `psql -X -v ON_ERROR_STOP=1 ARGS` through `target`.
pub fn psql(
    target: &Proxy,
    user: &str,
    password: Option<&str>,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> ToolOutput {
    let mut cmd = client_command("psql", target, user, password);
    cmd.args(["-X", "-v", "ON_ERROR_STOP=1"]).args(args);
    run_tool(cmd, stdin, Duration::from_secs(120))
}

/// `pgbench ARGS` through `target` as the superuser.
pub fn pgbench(target: &Proxy, args: &[&str], limit: Duration) -> ToolOutput {
    let mut cmd = client_command(
        "pgbench",
        target,
        super::SUPERUSER,
        Some(super::SUPERUSER_PASSWORD),
    );
    cmd.args(args);
    run_tool(cmd, None, limit)
}

/// A loopback port nobody listens on now, never handed out twice by this process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind an ephemeral loopback port")
            .port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no fresh loopback port after 100 tries")
}

/// Polls `cond` every 50 ms until it holds (true) or `limit` passes (false).
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async `wait_until` for conditions that query a server.
pub async fn wait_until_async<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
