//! The admin API's own small HTTP/1.1 server. A general-purpose server such as tiny_http
//! gives every connection an OS thread and never times one out, so a flood of requests
//! (or of silent connections) grows the process without bound and queues the liveness
//! probe behind it. Here one glommio executor thread owns the listener and every
//! connection as a cheap task with read and idle timeouts; `/health*` is answered on that
//! thread, everything else runs on a fixed pool of workers behind a bounded queue
//! ([`pool`]); past `max_connections` only probes are answered ([`conn::overflow`]).

mod conn;
mod parse;
mod pool;
mod response;
mod stats;

use std::net::TcpListener as StdListener;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};

pub use parse::Request;
pub use stats::Stats;

use super::Control;

/// Pending connections the kernel keeps for us: a burst of clients must not fill the
/// accept queue, or a probe's connect would wait for a SYN retransmit (a second or more).
const BACKLOG: i32 = 4096;

/// The longest a connection past `max_connections` may take to send its request.
const OVERFLOW_TIMEOUT: Duration = Duration::from_millis(300);

/// How often the accept loop looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Binds the admin address (before the shards start, so a busy port fails cleanly).
pub fn bind(address: &str) -> std::io::Result<StdListener> {
    let listener = StdListener::bind(address)?;
    // SAFETY: listen(2) on the socket we just bound; calling it again only raises the
    // backlog.
    if unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), BACKLOG) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// Starts the `admin-io` thread (and its workers) serving `listener` until `stop` is
/// set; connections still open then are closed.
pub fn spawn(
    control: Arc<Control>,
    listener: StdListener,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let settings = control.config().admin_api.clone();
    let (started, outcome) = crossbeam_channel::bounded(1);
    let thread = std::thread::Builder::new()
        .name("admin-io".into())
        .spawn(move || {
            let executor = LocalExecutorBuilder::new(Placement::Unbound)
                .name("admin-io")
                .blocking_thread_pool_placement(PoolPlacement::Unbound(settings.workers))
                .make();
            let executor = match executor {
                Ok(executor) => {
                    let _ = started.send(Ok(()));
                    executor
                }
                Err(e) => {
                    let _ = started.send(Err(std::io::Error::other(e.to_string())));
                    return;
                }
            };
            executor.run(async move {
                // SAFETY: a bound, listening TCP socket that we own and hand over here.
                let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
                let ms = Duration::from_millis;
                let read_timeout = ms(settings.read_timeout_ms);
                let shared = Rc::new(conn::Shared {
                    pool: Rc::new(pool::Pool::new(
                        control.clone(),
                        settings.workers + settings.queue_depth,
                        ms(settings.queue_timeout_ms),
                    )),
                    control,
                    read_timeout,
                    idle_timeout: ms(settings.idle_timeout_ms),
                    overflow_timeout: OVERFLOW_TIMEOUT.min(read_timeout),
                });
                accept_loop(&listener, shared, settings.max_connections, &stop).await;
            });
        })?;
    match outcome.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(std::io::Error::other(
                "the admin-io thread exited during start-up",
            ))
        }
    }
}

async fn accept_loop(
    listener: &TcpListener,
    shared: Rc<conn::Shared>,
    max_connections: usize,
    stop: &AtomicBool,
) {
    let stats = &shared.control.admin_http;
    let open = Rc::new(std::cell::Cell::new(0usize));
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !stop.load(Ordering::Acquire) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            None
        })
        .await;
        let stream = match accepted {
            None => return,
            Some(Ok(stream)) => stream,
            Some(Err(e)) => {
                // Out of descriptors under a flood, typically: wait a little, and say
                // so at most once a second.
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    log::warn!("admin API: accept failed: {e}");
                    last_warning = Some(Instant::now());
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        stats.connections_accepted.inc();
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        if open.get() >= max_connections {
            glommio::spawn_local(async move { conn::overflow(&shared, stream).await }).detach();
            continue;
        }
        open.set(open.get() + 1);
        stats.connections_open.inc();
        let open = open.clone();
        glommio::spawn_local(async move {
            conn::serve(&shared, stream).await;
            open.set(open.get() - 1);
            shared.control.admin_http.connections_open.dec();
        })
        .detach();
    }
}
