//! Query cancellation across shards. Every client gets a cancel key whose secret names the
//! shard that owns the session (its top byte); a CancelRequest landing on any shard is
//! sent to the owner, which forwards it to the backend with that backend's real key — and
//! only while that backend still serves the client that asked (a late cancel must not hit
//! the next client).
//!
//! The pid in the key is what the client believes `pg_backend_pid()` to be. In session
//! pooling it is the real pid of the client's one backend. In the pooled modes the client
//! has no backend of its own, so the proxy makes one up from a range no real process can
//! have (Linux's pid_max is at most 2^22): a pid there can never be passed to
//! `pg_terminate_backend()` and hit somebody else's backend.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use hashbrown::HashMap;

use crate::backend::BackendKey;
use crate::codec::startup;
use crate::nodeaddr::NodeAddr;
use crate::stats::ShardStats;
use crate::stream::NetStream;

/// The lowest pid the proxy makes up: above `PID_MAX_LIMIT` (2^22 on 64-bit Linux), the
/// largest pid the kernel can ever hand out.
pub const PROXY_PID_BASE: i32 = 1 << 22;
/// Bits of a made-up pid (above the base) and of a secret that name the shard.
const SHARD_BITS: u32 = 8;
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// Session numbers a shard uses before its counter wraps; with the shard below them they
/// fill the range from the base up to `i32::MAX`.
const SESSIONS_PER_SHARD: i32 = (i32::MAX - PROXY_PID_BASE) >> SHARD_BITS;
/// The random part of a secret: everything below the shard byte.
const SECRET_RANDOM_MASK: u32 = (1 << (32 - SHARD_BITS)) - 1;

/// A cancel request as it crosses shards.
#[derive(Clone, Copy, Debug)]
pub struct CancelMsg {
    pub pid: i32,
    pub secret: i32,
}

/// The shard that owns the session a cancel key's secret belongs to.
pub fn owner_shard(secret: i32) -> usize {
    ((secret as u32) >> (32 - SHARD_BITS)) as usize
}

/// The shard that numbered a session id (see [`CancelHandle::id`]); `None` for a
/// number the proxy never issues.
pub fn shard_of_id(id: i32) -> Option<usize> {
    is_proxy_pid(id).then(|| ((id - PROXY_PID_BASE) as usize) & (MAX_SHARDS - 1))
}

/// True for a pid the proxy made up (never a real backend's).
pub fn is_proxy_pid(pid: i32) -> bool {
    pid >= PROXY_PID_BASE
}

/// Which backend a session's queries currently run on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: NodeAddr,
    pub key: BackendKey,
    pub backend_id: u64,
}

/// Who a client is, for SHOW CLIENTS and KILL_CLIENT.
pub struct ClientInfo {
    pub user: Rc<str>,
    pub database: Rc<str>,
    pub application_name: Option<Box<str>>,
    pub addr: Option<SocketAddr>,
    pub connected: std::time::SystemTime,
    /// The client socket, so an administrator can disconnect it (a parked client's
    /// socket gets a new number).
    pub fd: Cell<std::os::fd::RawFd>,
}

/// The cancel-relevant part of one client session, shared with the shard registry.
pub struct CancelHandle {
    /// The proxy's own number for the session (SHOW CLIENTS, KILL_CLIENT); in the pooled
    /// modes also the pid the client was given.
    pub id: i32,
    /// The pid in the client's BackendKeyData.
    pub pid: i32,
    pub secret: i32,
    target: RefCell<Option<CancelTarget>>,
    pub info: ClientInfo,
}

impl CancelHandle {
    pub fn attach(&self, target: CancelTarget) {
        *self.target.borrow_mut() = Some(target);
    }
    pub fn detach(&self) {
        *self.target.borrow_mut() = None;
    }
    pub fn target(&self) -> Option<CancelTarget> {
        self.target.borrow().clone()
    }
    /// Attached to a server connection right now.
    pub fn attached(&self) -> bool {
        self.target.borrow().is_some()
    }
}

/// A shard's live sessions by proxy id, and by the cancel key clients were given.
pub struct CancelRegistry {
    shard: usize,
    next: Cell<i32>,
    sessions: RefCell<HashMap<i32, Rc<CancelHandle>>>,
    by_key: RefCell<HashMap<(i32, i32), i32>>,
    connect_timeout: Duration,
    stats: Arc<ShardStats>,
}

impl CancelRegistry {
    pub fn new(shard: usize, connect_timeout: Duration, stats: Arc<ShardStats>) -> Self {
        assert!(shard < MAX_SHARDS);
        CancelRegistry {
            shard,
            next: Cell::new(0),
            sessions: RefCell::new(HashMap::new()),
            by_key: RefCell::new(HashMap::new()),
            connect_timeout,
            stats,
        }
    }

    /// Issues a fresh key for a new session. `backend_pid` is the pid the client is to
    /// see (session pooling: its backend's); without one the client gets the session's
    /// made-up pid.
    pub fn register(&self, info: ClientInfo, backend_pid: Option<i32>) -> Rc<CancelHandle> {
        let mut sessions = self.sessions.borrow_mut();
        let id = loop {
            let n = self.next.get();
            self.next.set(if n + 1 >= SESSIONS_PER_SHARD {
                0
            } else {
                n + 1
            });
            let id = PROXY_PID_BASE + ((n << SHARD_BITS) | self.shard as i32);
            if !sessions.contains_key(&id) {
                break id;
            }
        };
        let pid = backend_pid.unwrap_or(id);
        let mut by_key = self.by_key.borrow_mut();
        let secret = loop {
            let random = rand::random::<u32>() & SECRET_RANDOM_MASK;
            let secret = (((self.shard as u32) << (32 - SHARD_BITS)) | random) as i32;
            if !by_key.contains_key(&(pid, secret)) {
                break secret;
            }
        };
        let handle = Rc::new(CancelHandle {
            id,
            pid,
            secret,
            target: RefCell::new(None),
            info,
        });
        sessions.insert(id, handle.clone());
        by_key.insert((pid, secret), id);
        handle
    }

    pub fn unregister(&self, handle: &CancelHandle) {
        self.sessions.borrow_mut().remove(&handle.id);
        self.by_key
            .borrow_mut()
            .remove(&(handle.pid, handle.secret));
    }

    /// Every live session, for SHOW CLIENTS.
    pub fn sessions(&self) -> Vec<Rc<CancelHandle>> {
        self.sessions.borrow().values().cloned().collect()
    }

    /// Disconnects a client on an administrator's request: a FATAL 57P01 if it is idle
    /// (mid-response bytes must not be interleaved), then both directions of its socket
    /// shut, so the session ends through its usual path for a vanished client (a lent
    /// server connection is cancelled, drained and cleaned). False if no such session.
    pub fn kill(&self, id: i32) -> bool {
        let Some(handle) = self.sessions.borrow().get(&id).cloned() else {
            return false;
        };
        // A session unregisters a moment after its socket closed; make sure the fd still
        // is that client's socket, not a newer connection's.
        let fd = handle.info.fd.get();
        if peer_of(fd) != handle.info.addr || handle.info.addr.is_none() {
            return false;
        }
        if !handle.attached() {
            let mut out = Vec::with_capacity(96);
            crate::codec::backend::write_error(
                &mut out,
                "FATAL",
                "57P01",
                "terminating connection due to administrator command",
            );
            // SAFETY: the fd is the live client socket of a registered session (sessions
            // unregister before their socket closes, on this same thread); a non-blocking
            // send of a few bytes.
            unsafe {
                libc::send(
                    fd,
                    out.as_ptr().cast(),
                    out.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
            }
        }
        // SAFETY: as above; shutdown leaves the fd open for its owner to close.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
        true
    }

    pub fn len(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forwards a cancel owned by this shard, if the key matches a live session that is
    /// attached to a backend. Runs the backend connection in its own task.
    pub fn cancel(&self, msg: CancelMsg) {
        self.stats.cancels_received.inc();
        let id = self.by_key.borrow().get(&(msg.pid, msg.secret)).copied();
        let Some(handle) = id.and_then(|id| self.sessions.borrow().get(&id).cloned()) else {
            return;
        };
        let Some(target) = handle.target() else {
            return;
        };
        let timeout = self.connect_timeout;
        let stats = self.stats.clone();
        glommio::spawn_local(async move {
            let Ok(mut stream) = NetStream::connect(&target.addr, timeout).await else {
                return;
            };
            // Re-check after the connect: the backend must still serve this client.
            if handle.target().as_ref() != Some(&target) {
                return;
            }
            let mut out = Vec::with_capacity(16);
            startup::encode_cancel(&mut out, target.key.pid, target.key.secret);
            if stream.write_all(&out).await.is_ok() {
                stats.cancels_forwarded.inc();
            }
            let _ = stream.close().await;
        })
        .detach();
    }
}

/// The peer address of a socket, if it is a connected TCP socket.
fn peer_of(fd: std::os::fd::RawFd) -> Option<SocketAddr> {
    // SAFETY: a borrowed view of an fd for one getpeername call; it is not closed here.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    socket2::SockRef::from(&sock)
        .peer_addr()
        .ok()
        .and_then(|a| a.as_socket())
}

/// Sends a CancelRequest for `key` to the server at `addr` (best effort).
pub async fn send_cancel(addr: &NodeAddr, key: BackendKey, timeout: Duration) -> bool {
    let Ok(mut stream) = NetStream::connect(addr, timeout).await else {
        return false;
    };
    let mut out = Vec::with_capacity(16);
    startup::encode_cancel(&mut out, key.pid, key.secret);
    let sent = stream.write_all(&out).await.is_ok();
    let _ = stream.close().await;
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_pids_are_never_real_and_keys_name_their_shard() {
        const LINUX_PID_MAX_LIMIT: i32 = 4_194_304;
        for shard in [0usize, 1, 7, MAX_SHARDS - 1] {
            let stats = Arc::<ShardStats>::default();
            let registry = CancelRegistry::new(shard, Duration::from_secs(1), stats);
            let info = || ClientInfo {
                user: "u".into(),
                database: "d".into(),
                application_name: None,
                addr: None,
                connected: std::time::SystemTime::now(),
                fd: Cell::new(-1),
            };
            let pooled = registry.register(info(), None);
            assert!(pooled.pid >= LINUX_PID_MAX_LIMIT && is_proxy_pid(pooled.pid));
            assert_eq!(pooled.id, pooled.pid);
            assert_eq!(owner_shard(pooled.secret), shard);
            let session = registry.register(info(), Some(4242));
            assert_eq!(session.pid, 4242);
            assert!(is_proxy_pid(session.id));
            assert_eq!(owner_shard(session.secret), shard);
            registry.unregister(&pooled);
            registry.unregister(&session);
            assert!(registry.is_empty());
        }
        // The last session number of the last shard still fits in an i32.
        let top =
            PROXY_PID_BASE + (((SESSIONS_PER_SHARD - 1) << SHARD_BITS) | (MAX_SHARDS as i32 - 1));
        assert!(top > PROXY_PID_BASE);
    }
}
