//! The bounded worker pool: every request that does real work (a report gathered from
//! the shards, the metrics page, a reload, a node action) runs on one of glommio's
//! blocking threads, never on the I/O thread, so it cannot delay `/health*`. At most
//! `workers + queue_depth` requests are in flight; one more is turned away at once
//! rather than queued without bound. Before running a request, a worker drops it if it
//! waited too long or if its client has gone.

use std::cell::Cell;
use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::parse::Request;
use crate::control::admin::{self, Reply};
use crate::control::Control;

/// What became of a queued request.
pub enum Outcome {
    Reply(Reply),
    /// The client closed its connection while the request waited: nothing was run.
    Gone,
    /// The request waited longer than `queue_timeout_ms`: nothing was run.
    Expired,
}

pub struct Pool {
    control: Arc<Control>,
    in_flight: Cell<usize>,
    limit: usize,
    max_wait: Duration,
}

impl Pool {
    pub fn new(control: Arc<Control>, limit: usize, max_wait: Duration) -> Pool {
        Pool {
            control,
            in_flight: Cell::new(0),
            limit,
            max_wait,
        }
    }

    /// Queues `request` from the client on socket `fd`; `None` when the queue is full.
    /// The caller keeps the socket open until the returned future finishes.
    pub fn submit(
        self: &Rc<Self>,
        request: Request,
        fd: RawFd,
    ) -> Option<impl Future<Output = Outcome>> {
        if self.in_flight.get() >= self.limit {
            return None;
        }
        self.in_flight.set(self.in_flight.get() + 1);
        let slot = Slot(self.clone());
        let control = self.control.clone();
        let (queued, max_wait) = (Instant::now(), self.max_wait);
        let job = glommio::executor()
            .spawn_blocking(move || run(&control, &request, fd, queued, max_wait));
        Some(async move {
            let outcome = job.await;
            drop(slot);
            outcome
        })
    }
}

/// One place in the queue, given back when the request is done.
struct Slot(Rc<Pool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.set(self.0.in_flight.get() - 1);
    }
}

/// Worker threads run at a lower CPU priority (nice 10) than the I/O thread and the
/// shards: rendering a report may take the CPU the data plane and the probes do not need.
const WORKER_NICE: libc::c_int = 10;

thread_local! {
    static NICED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn lower_priority_once() {
    if NICED.with(|n| n.replace(true)) {
        return;
    }
    // SAFETY: gettid has no arguments; setpriority on this thread's id changes only this
    // thread's nice value on Linux. Failure (e.g. a seccomp filter) leaves it as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, WORKER_NICE);
    }
}

/// On a worker thread.
fn run(
    control: &Control,
    request: &Request,
    fd: RawFd,
    queued: Instant,
    max_wait: Duration,
) -> Outcome {
    lower_priority_once();
    let stats = &control.admin_http;
    if queued.elapsed() > max_wait {
        stats.requests_rejected_expired.inc();
        return Outcome::Expired;
    }
    if client_gone(fd) {
        stats.requests_skipped.inc();
        return Outcome::Gone;
    }
    // A bug in one endpoint must not cost a worker thread and leave its client waiting.
    let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        admin::handle(control, request)
    }));
    Outcome::Reply(
        handled.unwrap_or_else(|_| Reply::error(500, "internal error; see the proxy log")),
    )
}

/// True when the peer has closed or reset the connection: a peek finds end-of-stream
/// (the request itself was already read) or an error other than "nothing to read yet".
/// A client that only half-closed its sending side counts as gone too; HTTP clients
/// that wait for an answer do not do that.
fn client_gone(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is the connection's socket, kept open by its I/O task until this job's
    // result is collected; the peek neither blocks nor consumes anything.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN | libc::EINTR)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_closed_peer_is_gone_a_quiet_one_is_not() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert!(!client_gone(server.as_raw_fd()), "quiet");
        client.write_all(b"x").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!client_gone(server.as_raw_fd()), "unread data");
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !client_gone(server.as_raw_fd()),
            "data still before the end"
        );
        let mut byte = [0u8; 1];
        std::io::Read::read(&mut &server, &mut byte).unwrap();
        assert!(client_gone(server.as_raw_fd()), "closed");
    }
}
