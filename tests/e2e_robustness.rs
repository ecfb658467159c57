//! Hostile and broken clients: junk instead of a startup packet, junk after login, messages
//! over the size limit, and clients that never finish logging in. The proxy must answer
//! 08P01 (or hang up), stay up, and keep serving everyone else.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    guarded,
    raw::{Ending, RawConn},
    sqlstate, target, DATABASE, HANG_GUARD, TRUST_USER,
};

/// A client that keeps querying while another misbehaves; any failed query fails the test.
struct Bystander {
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    /// Starts querying and returns once the first query has succeeded.
    async fn start(target: Arc<common::Proxy>) -> Bystander {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (done.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let client = target.client().await;
            while !stopped.load(Ordering::Relaxed) {
                let v: i32 = client
                    .query_one("SELECT $1::int4 + 1", &[&41i32])
                    .await
                    .expect("bystander query failed while another client misbehaved")
                    .get(0);
                assert_eq!(v, 42);
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        let bystander = Bystander { done, stop, task };
        bystander.wait_for(1).await;
        bystander
    }

    async fn wait_for(&self, n: usize) {
        let reached = common::wait_until_async(HANG_GUARD, || async {
            self.done.load(Ordering::Relaxed) >= n || self.task.is_finished()
        })
        .await;
        assert!(reached, "the bystander did not reach {n} queries");
    }

    /// Lets it run ten more queries, then stops it; panics if any query failed.
    async fn finish(self) {
        let target = self.done.load(Ordering::Relaxed) + 10;
        self.wait_for(target).await;
        self.stop.store(true, Ordering::Relaxed);
        guarded(HANG_GUARD, "bystander", self.task)
            .await
            .expect("bystander task");
    }
}

/// Sends `bytes` on a fresh connection and reports how the server reacted.
fn send_junk(port: u16, bytes: &[u8]) -> Ending {
    let mut conn = RawConn::connect(port);
    // The server may hang up before reading everything; that is one of the allowed answers.
    let _ = conn.write_all(bytes);
    conn.read_ending(Duration::from_secs(8))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_instead_of_startup_is_refused() {
    let target = Arc::new(target(""));
    let bystander = Bystander::start(target.clone()).await;
    let port = target.port;
    let junk: Vec<(&str, Vec<u8>)> = vec![
        (
            "http request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        ),
        ("length below minimum", vec![0, 0, 0, 4]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        ("protocol 1.0", vec![0, 0, 0, 9, 0, 1, 0, 0, 0]),
        (
            "parameters without terminator",
            [&[0u8, 0, 0, 17, 0, 3, 0, 0][..], b"user\0abcd"].concat(),
        ),
        ("pseudo-random bytes", {
            // A first byte of 0x7f makes the length field absurd, so no server waits for more.
            let mut bytes = common::pseudo_random_bytes(300, 7);
            bytes[0] = 0x7f;
            bytes
        }),
    ];
    for (what, bytes) in junk {
        let ending = tokio::task::spawn_blocking(move || send_junk(port, &bytes))
            .await
            .expect("junk task");
        match ending {
            Ending::Error(m) => {
                let code = m.sqlstate();
                assert!(
                    code == "08P01" || code == "0A000",
                    "{what}: unexpected SQLSTATE {code}: {:?}",
                    m.fields()
                );
            }
            Ending::Closed => {}
            Ending::Silent => panic!("{what}: no error and the connection stayed open"),
        }
        target.assert_running();
    }
    // A startup packet cut short by the client hanging up.
    tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(port);
        let _ = conn.write_all(&[0, 0, 0, 40, 0, 3, 0, 0, b'u']);
    })
    .await
    .expect("truncated startup task");

    bystander.finish().await;
    target.assert_running();
    let client = target.trust_client().await;
    client
        .simple_query("SELECT 1")
        .await
        .expect("fresh client after junk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_after_login_is_08p01() {
    let target = Arc::new(target(""));
    let bystander = Bystander::start(target.clone()).await;
    let port = target.port;
    // (what, bytes, PostgreSQL itself only hangs up: it logs this one as COMMERROR)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "unknown message type",
            vec![0xff, 0, 0, 0, 8, 1, 2, 3, 4],
            false,
        ),
        ("length field below 4", vec![b'Q', 0, 0, 0, 2], true),
    ];
    for (what, bytes, silent_in_postgres) in cases {
        let ending = tokio::task::spawn_blocking(move || {
            let mut conn = RawConn::connect(port);
            let startup = conn.startup_trust(TRUST_USER, DATABASE);
            assert!(startup.error.is_none(), "{:?}", startup.error);
            conn.write_all(&bytes).expect("send junk");
            let ending = conn.read_ending(Duration::from_secs(8));
            let closed = conn.closed_within(Duration::from_secs(8));
            (ending, closed)
        })
        .await
        .expect("junk task");
        match ending {
            (Ending::Error(m), true) => {
                assert_eq!(m.sqlstate(), "08P01", "{what}: {:?}", m.fields())
            }
            (Ending::Error(m), false) => panic!(
                "{what}: error {:?} but the connection stayed open",
                m.fields()
            ),
            (Ending::Closed, _) if silent_in_postgres && target.is_direct() => {}
            (other, _) => panic!("{what}: expected ErrorResponse 08P01, got {other:?}"),
        }
        target.assert_running();
    }
    bystander.finish().await;
    let client = target.client().await;
    client
        .simple_query("SELECT 1")
        .await
        .expect("fresh client after junk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_08p01() {
    if common::proxy_only(
        "oversized_message_is_08p01",
        "PostgreSQL's own limit is 1 GB",
    ) {
        return;
    }
    let target = Arc::new(target("[limits]\nmax_message_size = 4096\n"));
    let bystander = Bystander::start(target.clone()).await;
    let port = target.port;

    // A header announcing far more than the limit: refused before any body is read.
    let (ending, closed) = tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(port);
        let startup = conn.startup_trust(TRUST_USER, DATABASE);
        assert!(startup.error.is_none(), "{:?}", startup.error);
        let len: i32 = 1_000_000;
        let mut header = vec![b'Q'];
        header.extend_from_slice(&len.to_be_bytes());
        conn.write_all(&header).expect("send oversized header");
        let ending = conn.read_ending(Duration::from_secs(8));
        (ending, conn.closed_within(Duration::from_secs(8)))
    })
    .await
    .expect("oversized header task");
    match ending {
        Ending::Error(m) => assert_eq!(m.sqlstate(), "08P01", "{:?}", m.fields()),
        other => panic!("expected ErrorResponse 08P01 for an oversized message, got {other:?}"),
    }
    assert!(
        closed,
        "the connection stayed open after the oversized message"
    );

    // A complete oversized Query from a real driver: refused; a query under the limit works.
    let client = target.client().await;
    let small = format!("SELECT length('{}')", "x".repeat(3000));
    let n: i32 = client
        .query_one(small.as_str(), &[])
        .await
        .expect("query under the limit")
        .get(0);
    assert_eq!(n, 3000);
    let big = format!("SELECT length('{}')", "x".repeat(10_000));
    let err = client
        .simple_query(&big)
        .await
        .expect_err("a 10 kB query passed a 4 kB limit");
    if err.as_db_error().is_some() {
        assert_eq!(sqlstate(&err), "08P01", "{err:?}");
    }

    bystander.finish().await;
    target.assert_running();
    let client = target.client().await;
    let v: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("fresh client after oversized message")
        .get(0);
    assert_eq!(v, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_startup_timeout() {
    if common::proxy_only(
        "silent_client_is_dropped_after_startup_timeout",
        "PostgreSQL's authentication_timeout is a minute",
    ) {
        return;
    }
    let target = target("[timeouts]\nstartup_timeout_ms = 1000\n");
    let port = target.port;
    let closed = tokio::task::spawn_blocking(move || {
        let mut conn = RawConn::connect(port);
        conn.closed_within(Duration::from_secs(10))
    })
    .await
    .expect("silent client task");
    assert!(
        closed,
        "a client that never sent a startup packet was kept past the timeout"
    );
    target.assert_running();
    target.trust_client().await;
}

/// SSLRequest and GSSENCRequest may each be asked once. PostgreSQL reads a repeated one's
/// code as a protocol version and refuses it at once; the proxy must not answer 'N' again
/// and leave the client waiting for the startup deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_negotiation_request_is_refused_at_once() {
    const SSL: i32 = 80877103;
    const GSSENC: i32 = 80877104;
    let target = Arc::new(target(""));
    let port = target.port;
    let cases = [
        (vec![SSL, SSL], "1234.5679"),
        (vec![GSSENC, GSSENC], "1234.5680"),
        (vec![SSL, GSSENC, SSL], "1234.5679"),
    ];
    for (requests, version) in cases {
        if common::is_direct() && requests.contains(&GSSENC) {
            // A server built with GSSAPI answers 'G' and expects a GSS handshake.
            continue;
        }
        let ending = tokio::task::spawn_blocking(move || {
            let mut conn = RawConn::connect(port);
            let (last, first) = requests.split_last().expect("requests");
            for &code in first {
                assert_eq!(conn.negotiate(code), b'N', "first request answered 'N'");
            }
            let mut packet = 8i32.to_be_bytes().to_vec();
            packet.extend_from_slice(&last.to_be_bytes());
            conn.write_all(&packet).expect("send repeated request");
            conn.read_ending(Duration::from_secs(5))
        })
        .await
        .expect("negotiation task");
        match ending {
            Ending::Error(m) => {
                let fields = m.fields();
                assert_eq!(m.sqlstate(), "0A000", "{fields:?}");
                assert_eq!(fields[&'S'], "FATAL");
                assert_eq!(
                    fields[&'M'],
                    format!("unsupported frontend protocol {version}: server supports 3.0 to 3.0")
                );
            }
            other => panic!("a repeated negotiation request got {other:?}"),
        }
    }
    target.assert_running();
    target.trust_client().await;
}

/// A flood that takes the proxy to its descriptor limit: connections past it wait in the
/// listen queue or are refused, and once the flood leaves the proxy serves again (its
/// readiness waits must not spin on the descriptor they cannot get).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_is_survived() {
    if common::proxy_only(
        "running_out_of_descriptors_is_survived",
        "the descriptor limit is the proxy's own",
    ) {
        return;
    }
    let target = target("");
    // A server connection in the pool first, so the recovery below needs only a client's.
    target
        .trust_client()
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    let pid = target.pid().expect("proxy pid") as libc::pid_t;
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proxy's descriptors")
        .count() as u64;
    let mut before = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on the proxy (a child of this test) with valid pointers.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut before) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let low = libc::rlimit {
        rlim_cur: open_now + 6,
        rlim_max: before.rlim_max,
    };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &low, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let port = target.port;
    let flood = tokio::task::spawn_blocking(move || {
        let conns: Vec<_> = (0..40)
            .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
            .collect();
        // Long enough for the proxy to accept up to its limit and fail the rest.
        std::thread::sleep(Duration::from_millis(500));
        drop(conns);
    });
    guarded(HANG_GUARD, "flood", flood).await.expect("flood");
    target.assert_running();
    // Still under the low limit: the flood's descriptors are freed as it hangs up.
    let served = common::wait_until_async(Duration::from_secs(10), || async {
        match target.connect(TRUST_USER, None, DATABASE).await {
            Ok(client) => client.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        served,
        "no client served after a descriptor flood\n{}",
        target.log()
    );
    // SAFETY: as above, restoring the limit.
    unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &before, std::ptr::null_mut()) };
    target.assert_running();
}
