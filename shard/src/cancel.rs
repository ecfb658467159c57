//! Query cancellation across shards. Clients get a proxy-issued key whose pid names the
//! shard that owns the session; a CancelRequest landing on any shard is sent to the owner,
//! which forwards it to the backend with that backend's real key — and only while that
//! backend still serves the client that asked (a late cancel must not hit the next client).

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::net::TcpStream;
use hashbrown::HashMap;

use crate::backend::BackendKey;
use crate::codec::startup;
use crate::stats::ShardStats;

/// Bits of the proxy pid that number sessions within a shard; the shard id sits above.
const SESSION_BITS: u32 = 23;
const SESSION_MASK: i32 = (1 << SESSION_BITS) - 1;
pub const MAX_SHARDS: usize = 1 << (31 - SESSION_BITS);

/// A cancel request as it crosses shards.
#[derive(Clone, Copy, Debug)]
pub struct CancelMsg {
    pub pid: i32,
    pub secret: i32,
}

/// What one shard tells another over the channel mesh.
#[derive(Clone, Copy, Debug)]
pub enum ShardMsg {
    /// A CancelRequest for a session the receiving shard owns.
    Cancel(CancelMsg),
    /// A client changed the schema (CREATE, ALTER, DROP): the receiving shard prepares
    /// its shared statements afresh, so no stale plan serves its clients.
    SchemaChanged,
}

/// The shard that issued a proxy pid.
pub fn owner_shard(pid: i32) -> usize {
    (pid >> SESSION_BITS) as usize
}

/// Which backend a session's queries currently run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: SocketAddr,
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
    /// The client socket, so an administrator can disconnect it.
    pub fd: std::os::fd::RawFd,
}

/// The cancel-relevant part of one client session, shared with the shard registry.
pub struct CancelHandle {
    pub pid: i32,
    pub secret: i32,
    target: Cell<Option<CancelTarget>>,
    pub info: ClientInfo,
}

impl CancelHandle {
    pub fn attach(&self, target: CancelTarget) {
        self.target.set(Some(target));
    }
    pub fn detach(&self) {
        self.target.set(None);
    }
    pub fn target(&self) -> Option<CancelTarget> {
        self.target.get()
    }
}

/// A shard's live sessions by proxy pid.
pub struct CancelRegistry {
    shard: usize,
    next: Cell<i32>,
    sessions: RefCell<HashMap<i32, Rc<CancelHandle>>>,
    connect_timeout: Duration,
    stats: Arc<ShardStats>,
}

impl CancelRegistry {
    pub fn new(shard: usize, connect_timeout: Duration, stats: Arc<ShardStats>) -> Self {
        assert!(shard < MAX_SHARDS);
        CancelRegistry {
            shard,
            next: Cell::new(1),
            sessions: RefCell::new(HashMap::new()),
            connect_timeout,
            stats,
        }
    }

    /// Issues a fresh key for a new session.
    pub fn register(&self, info: ClientInfo) -> Rc<CancelHandle> {
        let mut sessions = self.sessions.borrow_mut();
        let pid = loop {
            let n = self.next.get();
            self.next.set(if n >= SESSION_MASK { 1 } else { n + 1 });
            let pid = ((self.shard as i32) << SESSION_BITS) | n;
            if !sessions.contains_key(&pid) {
                break pid;
            }
        };
        let handle = Rc::new(CancelHandle {
            pid,
            secret: rand::random(),
            target: Cell::new(None),
            info,
        });
        sessions.insert(pid, handle.clone());
        handle
    }

    pub fn unregister(&self, pid: i32) {
        self.sessions.borrow_mut().remove(&pid);
    }

    /// Every live session, for SHOW CLIENTS.
    pub fn sessions(&self) -> Vec<Rc<CancelHandle>> {
        self.sessions.borrow().values().cloned().collect()
    }

    /// Disconnects a client on an administrator's request: a FATAL 57P01 if it is idle
    /// (mid-response bytes must not be interleaved), then both directions of its socket
    /// shut, so the session ends through its usual path for a vanished client (a lent
    /// server connection is cancelled, drained and cleaned). False if no such session.
    pub fn kill(&self, pid: i32) -> bool {
        let Some(handle) = self.sessions.borrow().get(&pid).cloned() else {
            return false;
        };
        // A session unregisters a moment after its socket closed; make sure the fd still
        // is that client's socket, not a newer connection's.
        if peer_of(handle.info.fd) != handle.info.addr || handle.info.addr.is_none() {
            return false;
        }
        if handle.target().is_none() {
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
                    handle.info.fd,
                    out.as_ptr().cast(),
                    out.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                );
            }
        }
        // SAFETY: as above; shutdown leaves the fd open for its owner to close.
        unsafe {
            libc::shutdown(handle.info.fd, libc::SHUT_RDWR);
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
        let handle = match self.sessions.borrow().get(&msg.pid) {
            Some(h) if h.secret == msg.secret => h.clone(),
            _ => return,
        };
        let Some(target) = handle.target() else {
            return;
        };
        let timeout = self.connect_timeout;
        let stats = self.stats.clone();
        glommio::spawn_local(async move {
            let Ok(mut stream) = TcpStream::connect_timeout(target.addr, timeout).await else {
                return;
            };
            // Re-check after the connect: the backend must still serve this client.
            if handle.target() != Some(target) {
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
pub async fn send_cancel(addr: SocketAddr, key: BackendKey, timeout: Duration) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(addr, timeout).await else {
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
    fn pid_names_its_shard() {
        for shard in [0usize, 1, 7, MAX_SHARDS - 1] {
            let pid = ((shard as i32) << SESSION_BITS) | 12345;
            assert!(pid > 0);
            assert_eq!(owner_shard(pid), shard);
        }
    }
}
