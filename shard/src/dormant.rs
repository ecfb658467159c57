//! Parked clients: a client idle between units for `limits.park_idle_client_ms`, holding
//! no server connection, stops being a task. Its session moves into this shard's
//! dormitory with its socket, which one process-wide epoll set watches; the task, its
//! glommio socket state and the pending read's `Source` (about 1.6 KB a client) are
//! freed. The client's next byte (or its hang-up, a KILL_CLIENT, its idle timeout, the
//! shard draining) wakes it: a new task picks the session up where it stopped.
//!
//! glommio can wait on a socket it owns but not on an epoll set, so a small watcher
//! thread blocks in `epoll_wait` and passes each ready client's token to its shard over a
//! socket pair the shard reads like any other stream.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use slab::Slab;

use crate::context::ShardCtx;
use crate::engine::idle::Wake;
use crate::engine::session::Session;
pub use crate::engine::Resumed;
use crate::stream::NetStream;

/// A token names a shard (top 16 bits), a generation (next 16) and a slot (low 32), so a
/// late event for a slot since reused is recognised and dropped.
fn token(shard: usize, generation: u16, slot: usize) -> u64 {
    ((shard as u64) << 48) | (u64::from(generation) << 32) | slot as u64
}

fn untoken(token: u64) -> (usize, u16, usize) {
    (
        (token >> 48) as usize,
        (token >> 32) as u16,
        (token & 0xffff_ffff) as usize,
    )
}

/// The process-wide epoll set and the thread that reads it.
pub struct Watcher {
    epoll: OwnedFd,
}

/// One shard's end of the watcher: where its woken tokens arrive.
pub struct Inbox(OwnedFd);

impl Watcher {
    /// Starts the watcher thread for `shards` shards; it stops once `shutdown` is set.
    pub fn start(
        shards: usize,
        shutdown: Arc<AtomicBool>,
    ) -> io::Result<(Arc<Watcher>, Vec<Inbox>)> {
        // SAFETY: plain syscalls; every returned fd is checked and owned at once.
        let epoll = unsafe {
            let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let mut senders = Vec::with_capacity(shards);
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            let mut pair = [0 as RawFd; 2];
            // SAFETY: socketpair fills `pair` with two new fds on success.
            let (tx, rx) = unsafe {
                if libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                    0,
                    pair.as_mut_ptr(),
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1]))
            };
            set_nonblocking(rx.as_raw_fd())?;
            senders.push(tx);
            inboxes.push(Inbox(rx));
        }
        let watcher = Arc::new(Watcher { epoll });
        let thread_watcher = watcher.clone();
        std::thread::Builder::new()
            .name("park-watcher".into())
            .spawn(move || thread_watcher.watch(&senders, &shutdown))?;
        Ok((watcher, inboxes))
    }

    fn watch(&self, shards: &[OwnedFd], shutdown: &AtomicBool) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        // Tokens not yet taken by their shard: a shard that falls behind keeps its own
        // queue here and holds up no other shard.
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); shards.len()];
        while !shutdown.load(Ordering::Acquire) {
            let behind = out.iter().any(|buf| !buf.is_empty());
            // SAFETY: `events` is a valid buffer of the given length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    if behind { 1 } else { 500 },
                )
            };
            for event in &events[..n.max(0) as usize] {
                let (shard, ..) = untoken(event.u64);
                if let Some(buf) = out.get_mut(shard) {
                    buf.extend_from_slice(&event.u64.to_le_bytes());
                }
            }
            for (buf, fd) in out.iter_mut().zip(shards) {
                if !buf.is_empty() {
                    let sent = send_some(fd.as_raw_fd(), buf);
                    buf.drain(..sent);
                }
            }
        }
    }

    fn arm(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: token,
        };
        // SAFETY: a live fd and a valid event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) }
            != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn disarm(&self, fd: RawFd) {
        // SAFETY: removing a registration; a null event is allowed for DEL.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd,
                std::ptr::null_mut(),
            );
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends what the shard's socket takes now, without waiting; how many bytes went (the
/// shard reassembles tokens split across reads). A shard whose end is gone takes all.
fn send_some(fd: RawFd, bytes: &[u8]) -> usize {
    let mut sent = 0;
    while sent < bytes.len() {
        // SAFETY: a non-blocking send from a valid slice.
        let n = unsafe {
            libc::send(
                fd,
                bytes[sent..].as_ptr().cast(),
                bytes.len() - sent,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            sent += n as usize;
            continue;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => break,
            _ => return bytes.len(),
        }
    }
    sent
}

/// An idle session waiting to be parked: when it started waiting and its task's waker.
struct Nap {
    since: Instant,
    waker: Waker,
    due: bool,
}

/// A parked session.
struct Sleeper {
    generation: u16,
    socket: OwnedFd,
    session: Box<Session>,
    /// When its idle wait began (its idle timeout counts from there).
    since: Instant,
}

impl Sleeper {
    /// Whether `timeouts.client_idle_timeout_ms` has come for it.
    fn timed_out(&self, now: Instant) -> bool {
        self.session
            .limits
            .idle_session
            .is_some_and(|limit| now.duration_since(self.since) >= limit)
    }
}

/// This shard's napping and parked clients.
pub struct Dormitory {
    shard: usize,
    watcher: RefCell<Option<Arc<Watcher>>>,
    naps: RefCell<Slab<Nap>>,
    sleepers: RefCell<Slab<Sleeper>>,
    generation: Cell<u16>,
}

impl Dormitory {
    pub fn new(shard: usize) -> Self {
        Dormitory {
            shard,
            watcher: RefCell::new(None),
            naps: RefCell::new(Slab::new()),
            sleepers: RefCell::new(Slab::new()),
            generation: Cell::new(0),
        }
    }

    /// Whether a session waiting now may be parked later.
    pub fn may_park(&self, ctx: &ShardCtx) -> bool {
        self.watcher.borrow().is_some()
            && ctx.config().limits.park_idle_client_ms > 0
            && !ctx.draining.is_set()
    }

    /// A future that completes once the session has been idle long enough to park.
    pub fn nap(&self) -> NapWait<'_> {
        NapWait {
            dorm: self,
            slot: None,
        }
    }

    /// Marks every nap older than `after` due and wakes its session; wakes parked
    /// sessions whose idle timeout has come, or every one when the shard drains.
    pub fn sweep(&self, ctx: &Rc<ShardCtx>) {
        let now = Instant::now();
        let after = Duration::from_millis(ctx.config().limits.park_idle_client_ms);
        if !after.is_zero() {
            for (_, nap) in self.naps.borrow_mut().iter_mut() {
                if !nap.due && now.duration_since(nap.since) >= after {
                    nap.due = true;
                    nap.waker.wake_by_ref();
                }
            }
        }
        // Draining, or parking turned off by a reload: every parked client is taken up.
        let draining = ctx.draining.is_set() || after.is_zero();
        let due: Vec<usize> = self
            .sleepers
            .borrow()
            .iter()
            .filter(|(_, s)| draining || s.timed_out(now))
            .map(|(slot, _)| slot)
            .collect();
        for slot in due {
            self.wake(ctx, slot, None);
        }
        // A burst of naps leaves a large list behind; give the memory back once most of
        // it is unused.
        shrink(&mut self.naps.borrow_mut());
        shrink(&mut self.sleepers.borrow_mut());
    }

    /// Parks a session whose wait began at `since`: its socket goes to the epoll set,
    /// the task that served it ends. A client that cannot be parked is woken at once.
    pub fn park(
        &self,
        ctx: &Rc<ShardCtx>,
        client: NetStream,
        session: Box<Session>,
        since: Instant,
    ) {
        let socket = match client.into_parkable() {
            Ok(socket) => socket,
            Err(client) => {
                // (Not a plain TCP socket: it stays a task.)
                log::debug!("shard {}: could not park an idle client", self.shard);
                resume(
                    ctx.clone(),
                    client,
                    session,
                    Some(Resumed { since, first: None }),
                );
                return;
            }
        };
        session.cancel.info.fd.set(socket.as_raw_fd());
        let generation = self.generation.get().wrapping_add(1);
        self.generation.set(generation);
        let fd = socket.as_raw_fd();
        let slot = self.sleepers.borrow_mut().insert(Sleeper {
            generation,
            socket,
            session,
            since,
        });
        ctx.stats.clients_parked.inc();
        let armed = match &*self.watcher.borrow() {
            Some(watcher) => watcher.arm(fd, token(self.shard, generation, slot)),
            None => Err(io::Error::other("no watcher")),
        };
        if let Err(e) = armed {
            log::warn!("shard {}: could not watch a parked client: {e}", self.shard);
            self.wake(ctx, slot, None);
        }
    }

    /// Wakes the parked session in `slot` (if `generation`, when given, still names it):
    /// a new task serves it from its idle wait on.
    fn wake(&self, ctx: &Rc<ShardCtx>, slot: usize, generation: Option<u16>) {
        let sleeper = {
            let mut sleepers = self.sleepers.borrow_mut();
            match sleepers.get(slot) {
                Some(s) if generation.is_none_or(|g| g == s.generation) => sleepers.remove(slot),
                _ => return,
            }
        };
        if let Some(watcher) = &*self.watcher.borrow() {
            watcher.disarm(sleeper.socket.as_raw_fd());
        }
        ctx.stats.clients_woken.inc();
        // Read what woke it here: the socket's readiness was reported to the watcher, not
        // to this thread's epoll set.
        let first = first_read(ctx, sleeper.socket.as_raw_fd());
        sleeper
            .session
            .cancel
            .info
            .fd
            .set(sleeper.socket.as_raw_fd());
        let client = match NetStream::from_parked(sleeper.socket) {
            Ok(client) => client,
            Err(e) => {
                log::warn!(
                    "shard {}: a woken client cannot be watched: {e}",
                    self.shard
                );
                drop(sleeper.session);
                crate::runtime::client_left(ctx);
                return;
            }
        };
        let resumed = Resumed {
            since: sleeper.since,
            first,
        };
        resume(ctx.clone(), client, sleeper.session, Some(resumed));
    }
}

/// What a woken client sent (or that it left), read at once; `None` when nothing is
/// there yet (a wake for its idle timeout or the drain).
fn first_read(ctx: &ShardCtx, fd: RawFd) -> Option<Wake> {
    let mut buf = ctx.bufs.take();
    // SAFETY: a non-blocking recv into a buffer we own, on the client's open socket.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    match n {
        0 => Some(Wake::ClientGone),
        n if n > 0 => Some(Wake::Client(buf, n as usize)),
        _ => match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => None,
            _ => Some(Wake::ClientGone),
        },
    }
}

/// Gives back a slab's memory once most of it is unused (only its vacant tail can go).
fn shrink<T>(slab: &mut Slab<T>) {
    if slab.capacity() > 64 && slab.len() < slab.capacity() / 4 {
        slab.shrink_to_fit();
    }
}

/// Starts serving a session again in a task of its own.
pub fn resume(
    ctx: Rc<ShardCtx>,
    client: NetStream,
    session: Box<Session>,
    resumed: Option<Resumed>,
) {
    glommio::spawn_local(async move {
        let mut client = client;
        let mut session = session;
        match crate::engine::serve(&ctx, &mut client, &mut session, resumed).await {
            crate::engine::Served::Idle(since) => ctx.dormitory.park(&ctx, client, session, since),
            crate::engine::Served::Over => {
                drop(session);
                drop(client);
                crate::runtime::client_left(&ctx);
            }
        }
    })
    .detach();
}

/// Joins the watcher and reads this shard's wake-ups until the shard stops.
pub fn join(ctx: &Rc<ShardCtx>, watcher: Arc<Watcher>, inbox: Inbox) {
    *ctx.dormitory.watcher.borrow_mut() = Some(watcher);
    let ctx = ctx.clone();
    glommio::spawn_local(async move {
        // SAFETY: the inbox is a connected, non-blocking Unix stream socket we own.
        let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(inbox.0.into_raw_fd()) };
        let mut buf = [0u8; 4096];
        let mut kept = 0;
        loop {
            let n = match stream.read(&mut buf[kept..]).await {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!(
                        "shard {}: parked clients' wake-ups cannot be read: {e}",
                        ctx.id
                    );
                    return;
                }
            };
            let end = kept + n;
            let whole = end - end % 8;
            for chunk in buf[..whole].chunks_exact(8) {
                let token = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                let (_, generation, slot) = untoken(token);
                ctx.dormitory.wake(&ctx, slot, Some(generation));
            }
            buf.copy_within(whole..end, 0);
            kept = end - whole;
        }
    })
    .detach();
}

/// Completes when the sweep finds the nap due; takes its slot off the list when dropped.
pub struct NapWait<'a> {
    dorm: &'a Dormitory,
    slot: Option<usize>,
}

impl Future for NapWait<'_> {
    type Output = Instant;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Instant> {
        let mut naps = self.dorm.naps.borrow_mut();
        match self.slot {
            None => {
                let slot = naps.insert(Nap {
                    since: Instant::now(),
                    waker: cx.waker().clone(),
                    due: false,
                });
                drop(naps);
                self.slot = Some(slot);
                Poll::Pending
            }
            Some(slot) => {
                let nap = &mut naps[slot];
                if nap.due {
                    return Poll::Ready(nap.since);
                }
                if !nap.waker.will_wake(cx.waker()) {
                    nap.waker = cx.waker().clone();
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for NapWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.dorm.naps.borrow_mut().remove(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for (shard, generation, slot) in [(0, 0, 0), (63, u16::MAX, 0xffff_ffff), (5, 7, 123_456)] {
            assert_eq!(
                untoken(token(shard, generation, slot)),
                (shard, generation, slot)
            );
        }
    }
}
