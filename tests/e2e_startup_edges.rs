//! Edges of starting the proxy and of cancelling through it: a too-low locked-memory limit
//! is refused with a message saying what to change, `--listen` overrides the config, and a
//! cancel sent with the key of a session that has ended does not touch the next client
//! of the same backend (the stale-cancel bug other poolers shipped).

mod common;

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use common::proxy::proxy_command;
use common::tools::free_port;
use common::{run_tool, target, SUPERUSER, SUPERUSER_PASSWORD};

#[test]
fn too_low_memlock_limit_is_refused_with_advice() {
    if common::proxy_only(
        "too_low_memlock_limit_is_refused_with_advice",
        "preflight is the proxy's",
    ) {
        return;
    }
    let proxy = target("");
    let config = proxy.config_path.clone().expect("proxy config path");
    proxy.stop();
    let mut cmd = proxy_command();
    cmd.arg("--config").arg(&config);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64 * 1024,
                rlim_max: 64 * 1024,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = run_tool(cmd, None, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(1), "{out}");
    assert!(out.stderr.contains("locked-memory limit"), "{out}");
    assert!(out.stderr.contains("ulimit -l"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_flag_overrides_the_config() {
    if common::proxy_only("listen_flag_overrides_the_config", "flags are the proxy's") {
        return;
    }
    let proxy = target("");
    let config = proxy.config_path.clone().expect("proxy config path");
    proxy.stop();
    let port = free_port();
    let mut child = proxy_command()
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--admin")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn proxy");
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user(SUPERUSER)
        .password(SUPERUSER_PASSWORD)
        .dbname(common::DATABASE)
        .connect_timeout(Duration::from_secs(5));
    let connected = common::wait_until_async(Duration::from_secs(20), || async {
        match cfg.connect(tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                client.simple_query("SELECT 1").await.is_ok()
            }
            Err(_) => false,
        }
    })
    .await;
    // SAFETY: plain kill(2) on the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait for proxy");
    assert!(connected, "nothing answered on the --listen port {port}");
    assert!(status.success(), "proxy exit {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cancel_does_not_hit_the_next_client() {
    if common::proxy_only(
        "a_stale_cancel_does_not_hit_the_next_client",
        "cancel routing is the proxy's",
    ) {
        return;
    }
    // One backend: the second client is served by the backend the first one used.
    let proxy = target("workers = 1\n[pool_mode]\nmax_pool_size = 1\n");
    let first = proxy.client().await;
    let first_pid: i32 = first
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let stale = first.cancel_token();
    drop(first);

    let second = proxy.client_when_free(common::DATABASE).await;
    let second_pid: i32 = second
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_eq!(first_pid, second_pid, "the backend was not reused");

    let sleeper = tokio::spawn(async move {
        second
            .query_one("SELECT pg_sleep(1.5)::text", &[])
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    stale
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("send the stale cancel");
    let result = common::guarded(common::HANG_GUARD, "stale cancel", sleeper)
        .await
        .expect("sleeper task");
    assert!(
        result.is_ok(),
        "a cancel with a finished session's key cancelled the next client: {result:?}"
    );
}
