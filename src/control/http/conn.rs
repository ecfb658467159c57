//! One admin connection, as a cheap task on the I/O thread: read a request under the
//! read timeout, answer `/health*` right here, hand anything else to the worker pool,
//! write the reply, and keep the connection for the next request until the idle timeout.
//! A client never holds more than this task and its small buffer.

use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use helios_shard::sync::timeout;

use super::parse::{self, Head, Refusal};
use super::pool::{Outcome, Pool};
use super::response;
use crate::control::admin::{self, Reply};
use crate::control::Control;

/// Bytes read at a time.
const READ_CHUNK: usize = 4096;

/// How long, and how much, a connection closed on an error keeps being read, so the
/// client's unsent body does not turn the close into a reset that loses the reply.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 1024 * 1024;

/// What every connection task shares.
pub struct Shared {
    pub control: Arc<Control>,
    pub pool: Rc<Pool>,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a connection past `max_connections` has to show it is a probe.
    pub overflow_timeout: Duration,
}

enum Fill {
    Data,
    Closed,
    TimedOut,
}

/// Why no request could be read.
enum NoRequest {
    Closed,
    /// Nothing, or only part of a request, arrived in time.
    TimedOut {
        partial: bool,
    },
    Refused(Refusal),
}

struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: &'a Shared,
}

/// Serves one connection within `max_connections` until it closes or times out.
pub async fn serve(shared: &Shared, stream: TcpStream) {
    let accepted = Instant::now();
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    let stats = &shared.control.admin_http;
    let mut first = true;
    loop {
        // The first request must be complete within the read timeout of the accept;
        // a later one within the read timeout of its first byte, which must come before
        // the idle timeout.
        let started = if first {
            accepted
        } else {
            if conn.buf.is_empty() {
                match conn.fill(Instant::now() + shared.idle_timeout).await {
                    Fill::Data => {}
                    Fill::Closed => return,
                    Fill::TimedOut => {
                        stats.connections_timed_out.inc();
                        return;
                    }
                }
            }
            Instant::now()
        };
        let deadline = started + shared.read_timeout;
        let head = match conn.request(deadline).await {
            Ok(head) => head,
            Err(NoRequest::Closed) => return,
            Err(NoRequest::TimedOut { partial }) => {
                stats.connections_timed_out.inc();
                if partial {
                    let reply = Reply::error(408, "the request was not received in time");
                    conn.finish(&reply, false).await;
                }
                return;
            }
            Err(NoRequest::Refused(refusal)) => {
                let reply = Reply::error(refusal.status, refusal.message);
                conn.finish(&reply, false).await;
                conn.linger().await;
                return;
            }
        };
        let keep_alive = head.keep_alive;
        let head_only = head.request.is_head();
        let reply = if admin::is_probe(head.request.path()) {
            admin::handle(&shared.control, &head.request)
        } else {
            let fd = conn.stream.as_raw_fd();
            match shared.pool.submit(head.request, fd) {
                None => {
                    stats.requests_rejected_queue_full.inc();
                    let reply = busy("every admin worker is busy and the queue is full");
                    conn.finish(&reply, head_only).await;
                    return;
                }
                Some(job) => match job.await {
                    Outcome::Reply(reply) => reply,
                    Outcome::Gone => return,
                    Outcome::Expired => {
                        let reply = busy("the request waited too long for an admin worker");
                        conn.finish(&reply, head_only).await;
                        return;
                    }
                },
            }
        };
        if !conn.send(&reply, keep_alive, head_only).await || !keep_alive {
            return;
        }
        first = false;
    }
}

/// A connection past `max_connections`: answered only if it is a `/health*` probe that
/// arrives within the overflow timeout, so a flood can never lock the probe out; anything
/// else gets a 503 (or, if silent, nothing) and the connection closes.
pub async fn overflow(shared: &Shared, stream: TcpStream) {
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    let stats = &shared.control.admin_http;
    let deadline = Instant::now() + shared.overflow_timeout;
    match conn.request(deadline).await {
        Ok(head) if admin::is_probe(head.request.path()) && head.body_len == 0 => {
            let reply = admin::handle(&shared.control, &head.request);
            conn.finish(&reply, head.request.is_head()).await;
        }
        Ok(head) => {
            stats.connections_refused.inc();
            conn.finish(&too_many(), head.request.is_head()).await;
        }
        Err(NoRequest::Refused(_)) => {
            stats.connections_refused.inc();
            conn.finish(&too_many(), false).await;
            conn.linger().await;
        }
        Err(NoRequest::Closed | NoRequest::TimedOut { .. }) => stats.connections_refused.inc(),
    }
}

fn busy(message: &str) -> Reply {
    Reply::error(503, message).with_header("Retry-After", "1")
}

fn too_many() -> Reply {
    busy("too many admin connections; only /health probes are answered")
}

impl Conn<'_> {
    /// Reads more bytes into the buffer, waiting until `deadline` at most.
    async fn fill(&mut self, deadline: Instant) -> Fill {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Fill::TimedOut;
        }
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK, 0);
        let read = timeout(left, self.stream.read(&mut self.buf[start..])).await;
        let got = match read {
            Some(Ok(n)) => n,
            Some(Err(_)) => 0,
            None => {
                self.buf.truncate(start);
                return Fill::TimedOut;
            }
        };
        self.buf.truncate(start + got);
        if got == 0 {
            Fill::Closed
        } else {
            Fill::Data
        }
    }

    /// Reads one whole request (head and body) by `deadline`; the bytes of any request
    /// that follows stay in the buffer.
    async fn request(&mut self, deadline: Instant) -> Result<Head, NoRequest> {
        let mut head = loop {
            match parse::head(&self.buf) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(refusal) => return Err(NoRequest::Refused(refusal)),
            }
            match self.fill(deadline).await {
                Fill::Data => {}
                Fill::Closed => return Err(NoRequest::Closed),
                Fill::TimedOut => {
                    return Err(NoRequest::TimedOut {
                        partial: !self.buf.is_empty(),
                    })
                }
            }
        };
        let end = head.len + head.body_len;
        if head.expects_continue
            && self.buf.len() < end
            && !self.write(b"HTTP/1.1 100 Continue\r\n\r\n").await
        {
            return Err(NoRequest::Closed);
        }
        while self.buf.len() < end {
            match self.fill(deadline).await {
                Fill::Data => {}
                Fill::Closed => return Err(NoRequest::Closed),
                Fill::TimedOut => return Err(NoRequest::TimedOut { partial: true }),
            }
        }
        head.request.body = self.buf[head.len..end].to_vec();
        self.buf.drain(..end);
        Ok(head)
    }

    /// Writes `reply`; false when the client is gone or did not take it in time.
    async fn send(&mut self, reply: &Reply, keep_alive: bool, head_only: bool) -> bool {
        let bytes = response::encode(reply, keep_alive, head_only);
        let sent = self.write(&bytes).await;
        if sent {
            self.shared.control.admin_http.requests_served.inc();
        }
        sent
    }

    /// Sends `reply` as the connection's last response.
    async fn finish(&mut self, reply: &Reply, head_only: bool) {
        self.send(reply, false, head_only).await;
    }

    async fn write(&mut self, bytes: &[u8]) -> bool {
        let limit = self.shared.read_timeout;
        matches!(
            timeout(limit, self.stream.write_all(bytes)).await,
            Some(Ok(()))
        )
    }

    /// Before closing after an error: stop sending and read (and drop) what the client
    /// is still sending, for a little while, so its reply is not lost to a reset.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write).await;
        let deadline = Instant::now() + LINGER;
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            self.buf.clear();
            match self.fill(deadline).await {
                Fill::Data => dropped += self.buf.len(),
                Fill::Closed | Fill::TimedOut => break,
            }
        }
    }
}
