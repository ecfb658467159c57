//! Starting and stopping the shards: one pinned glommio executor per worker, each with its
//! own SO_REUSEPORT listener, its own context, and a cancel channel to every other shard.

use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::AsyncWriteExt;
use glommio::{ExecutorJoinHandle, LocalExecutorBuilder, Placement};

use crossbeam_channel::{Receiver, Sender};

use crate::budget::Budgets;
use crate::bus::Mesh;
use crate::cancel::MAX_SHARDS;
use crate::codec::backend as be;
use crate::config::Config;
use crate::context::ShardCtx;
use crate::control::{ConsoleRequest, ControlMsg, ShardLink};
use crate::readiness::{Listener, Sock};
use crate::stats::ShardStats;

/// How often shards look at the process-wide shutdown flag and run pool maintenance.
const TICK: Duration = Duration::from_millis(50);
const MAINTENANCE_EVERY: u32 = 20;
/// How often idle clients are looked at for parking (and parked ones for their idle
/// timeout), in ticks.
const SWEEP_EVERY: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("configuration cannot be used: {0}")]
    Config(String),
    #[error("cannot start worker {id}: {reason}")]
    Executor { id: usize, reason: String },
    #[error("cannot start the parked-client watcher: {0}")]
    Watcher(std::io::Error),
    #[error("workers = {0} is more than the {MAX_SHARDS} the cancel key can name")]
    TooManyWorkers(usize),
}

/// The running data plane.
pub struct Runtime {
    handles: Vec<ExecutorJoinHandle<()>>,
    /// The control plane's handle on each shard: mailbox and counters.
    pub links: Vec<ShardLink>,
    shutdown: Arc<AtomicBool>,
    pub local_addr: std::net::SocketAddr,
    /// The result cache's epochs, shared by every shard (the admin API invalidates
    /// through them).
    pub epochs: Arc<crate::cache::Epochs>,
}

impl Runtime {
    /// Binds every shard's listener first (so a busy port fails cleanly), then starts
    /// the executors. SQL admin console statements are sent to `console`.
    pub fn start(
        config: Arc<Config>,
        console: Option<Sender<ConsoleRequest>>,
        suspects: Option<Sender<String>>,
    ) -> Result<Runtime, StartError> {
        let workers = config.effective_workers();
        if workers > MAX_SHARDS {
            return Err(StartError::TooManyWorkers(workers));
        }
        // Build one context up front so config problems surface before any thread starts.
        ShardCtx::new(
            0,
            config.clone(),
            Arc::default(),
            Arc::default(),
            Arc::default(),
        )
        .map_err(StartError::Config)?;
        let listeners = (0..workers)
            .map(|_| bind_reuseport(&config.listen_address))
            .collect::<Result<Vec<_>, _>>()?;
        let local_addr = socket2::SockRef::from(&listeners[0])
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .ok_or_else(|| StartError::Listen {
                addr: config.listen_address.clone(),
                source: std::io::Error::other("no local address"),
            })?;
        let cpus = allowed_cpus();
        let mesh = crate::bus::mesh(workers);
        let budgets = Arc::new(Budgets::new(workers));
        let epochs = Arc::new(crate::cache::Epochs::default());
        let shutdown = Arc::new(AtomicBool::new(false));
        let (watcher, inboxes) = crate::dormant::Watcher::start(workers, shutdown.clone())
            .map_err(StartError::Watcher)?;
        let mut links = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for ((id, listener), wakeups) in listeners.into_iter().enumerate().zip(inboxes) {
            let placement = match cpus.get(id % cpus.len().max(1)) {
                Some(cpu) => Placement::Fixed(*cpu),
                None => Placement::Unbound,
            };
            // Each shard gets its own copy, so reading it never shares a cache line.
            let config = Arc::new((*config).clone());
            let stats = Arc::<ShardStats>::default();
            let (mailbox, inbox) = crossbeam_channel::unbounded();
            links.push(ShardLink {
                id,
                mailbox,
                stats: stats.clone(),
            });
            let mesh = mesh.clone();
            let shard_shutdown = shutdown.clone();
            let console = console.clone();
            let suspects = suspects.clone();
            let shard = ShardStart {
                id,
                budgets: budgets.clone(),
                epochs: epochs.clone(),
                config,
                stats,
                listener,
                mesh,
                shutdown: shard_shutdown,
                inbox,
                console,
                suspects,
                parking: (watcher.clone(), wakeups),
            };
            let handle = LocalExecutorBuilder::new(placement)
                .name(&format!("shard-{id}"))
                .spawn(move || async move {
                    shard_main(shard).await;
                })
                .map_err(|e| {
                    // The watcher thread and any shard already started stop with it.
                    shutdown.store(true, Ordering::Release);
                    StartError::Executor {
                        id,
                        reason: e.to_string(),
                    }
                })?;
            handles.push(handle);
        }
        Ok(Runtime {
            handles,
            links,
            shutdown,
            local_addr,
            epochs,
        })
    }

    /// Asks every shard to stop accepting and drain.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::Release);
    }

    /// Waits for every shard to finish.
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn bind_reuseport(addr: &str) -> Result<OwnedFd, StartError> {
    let err = |source| StartError::Listen {
        addr: addr.to_string(),
        source,
    };
    let sockaddr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(sockaddr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_reuse_port(true).map_err(err)?;
    socket.bind(&sockaddr.into()).map_err(err)?;
    socket.listen(1024).map_err(err)?;
    // Queued connections are taken with plain accept4 between glommio's accepts.
    socket.set_nonblocking(true).map_err(err)?;
    Ok(socket.into())
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|cpu| libc::CPU_ISSET(*cpu, &set))
            .collect()
    }
}

/// Everything a shard thread is started with.
struct ShardStart {
    id: usize,
    budgets: Arc<Budgets>,
    epochs: Arc<crate::cache::Epochs>,
    config: Arc<Config>,
    stats: Arc<ShardStats>,
    listener: OwnedFd,
    mesh: Mesh,
    shutdown: Arc<AtomicBool>,
    inbox: Receiver<ControlMsg>,
    console: Option<Sender<ConsoleRequest>>,
    suspects: Option<Sender<String>>,
    /// The parked-client watcher and this shard's wake-ups from it.
    parking: (Arc<crate::dormant::Watcher>, crate::dormant::Inbox),
}

async fn shard_main(start: ShardStart) {
    let ShardStart {
        id,
        budgets,
        epochs,
        config,
        stats,
        listener,
        mesh,
        shutdown,
        inbox,
        console,
        suspects,
        parking,
    } = start;
    let ctx = match ShardCtx::new(id, config, stats, budgets, epochs) {
        Ok(mut ctx) => {
            ctx.console = console;
            ctx.suspects = suspects;
            Rc::new(ctx)
        }
        Err(e) => {
            log::error!("shard {id}: {e}");
            return;
        }
    };
    // SAFETY: the fd is a bound, listening TCP socket that we own and hand over here.
    let listener = match Listener::new(unsafe { OwnedFd::from_raw_fd(listener.into_raw_fd()) }) {
        Ok(listener) => listener,
        Err(e) => {
            log::error!("shard {id}: cannot watch the listening socket: {e}");
            return;
        }
    };
    crate::bus::join(&ctx, mesh).await;
    crate::dormant::join(&ctx, parking.0, parking.1);
    glommio::spawn_local(housekeeping(ctx.clone(), shutdown, inbox)).detach();
    log::info!("shard {id} accepting on {}", ctx.config().listen_address);
    accept_loop(&ctx, &listener).await;
    drop(listener);
    drain(&ctx).await;
    log::info!("shard {id} stopped");
}

async fn accept_loop(ctx: &Rc<ShardCtx>, listener: &Listener) {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            ctx.draining.wait().await;
            None
        })
        .await;
        let fd = match accepted {
            None => return,
            Some(Ok(fd)) => fd,
            Some(Err(e)) => {
                log::warn!("shard {}: accept failed: {e}", ctx.id);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        admit(ctx, fd);
        // Connections already queued are taken before waiting again.
        while let Ok(fd) = listener.try_accept() {
            admit(ctx, fd);
        }
    }
}

/// Serves a newly accepted client in a task of its own, or refuses it over the limit.
fn admit(ctx: &Rc<ShardCtx>, fd: OwnedFd) {
    ctx.stats.clients_accepted.inc();
    let stream = match Sock::nonblocking(fd) {
        Ok(stream) => stream,
        Err(e) => {
            log::warn!("shard {}: cannot watch an accepted socket: {e}", ctx.id);
            ctx.stats.clients_closed.inc();
            return;
        }
    };
    if ctx.active_clients.get() >= ctx.max_clients.get() {
        ctx.stats.clients_rejected.inc();
        ctx.stats.clients_closed.inc();
        glommio::spawn_local(reject(stream)).detach();
        return;
    }
    ctx.active_clients.set(ctx.active_clients.get() + 1);
    let session_ctx = ctx.clone();
    glommio::spawn_local(async move {
        let mut stream = crate::stream::NetStream::from(stream);
        match crate::session::serve(&session_ctx, &mut stream).await {
            Some((session, since)) => {
                session_ctx
                    .dormitory
                    .park(&session_ctx, stream, session, since)
            }
            None => {
                drop(stream);
                client_left(&session_ctx);
            }
        }
    })
    .detach();
}

/// Counts a client gone (its session over, its socket closed).
pub fn client_left(ctx: &ShardCtx) {
    ctx.active_clients.set(ctx.active_clients.get() - 1);
    ctx.stats.clients_closed.inc();
}

async fn reject(mut stream: Sock) {
    let mut out = Vec::new();
    be::write_error(
        &mut out,
        "FATAL",
        "53300",
        "sorry, too many clients already",
    );
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

/// Watches the shutdown flag, applies the control plane's commands, and keeps pools
/// within their idle and lifetime limits.
async fn housekeeping(ctx: Rc<ShardCtx>, shutdown: Arc<AtomicBool>, inbox: Receiver<ControlMsg>) {
    let mut ticks = 0u32;
    while !ctx.draining.is_set() {
        glommio::timer::sleep(TICK).await;
        if shutdown.load(Ordering::Acquire) {
            ctx.draining.set();
            break;
        }
        crate::mailbox::drain(&ctx, &inbox);
        balance_budgets(&ctx);
        ticks += 1;
        if ticks.is_multiple_of(SWEEP_EVERY) {
            ctx.dormitory.sweep(&ctx);
        }
        if ticks.is_multiple_of(MAINTENANCE_EVERY) {
            // Pools that never connected (a client named a database that does not
            // exist) are dropped so they cannot accumulate. A pool a session still holds
            // stays, or a second pool for the same key could open connections beyond
            // the limit.
            ctx.pools
                .borrow_mut()
                .retain(|_, pool| !(pool.is_forgettable() && Rc::strong_count(pool) == 1));
            ctx.bufs.trim();
            ctx.statements.prune();
            let pools: Vec<_> = ctx.pools.borrow().values().cloned().collect();
            for pool in pools {
                pool.maintain();
            }
        }
    }
}

/// Shares pool budgets with the other shards: connections left unused for a tick while
/// another shard's clients wait close, and clients waiting here take what the others
/// gave back.
fn balance_budgets(ctx: &ShardCtx) {
    for pool in ctx.pools.borrow().values() {
        pool.yield_idle(TICK);
        if pool.has_waiters() {
            pool.grant_slots();
        }
    }
}

/// Lets sessions finish their in-flight work up to the shutdown timeout, then closes
/// idle backends with Terminate.
async fn drain(ctx: &Rc<ShardCtx>) {
    let deadline =
        Instant::now() + Duration::from_secs(ctx.config().timeouts.shutdown_timeout_secs);
    while ctx.active_clients.get() > 0 && Instant::now() < deadline {
        // Parked clients are woken to be told, like every idle one.
        ctx.dormitory.sweep(ctx);
        glommio::timer::sleep(TICK).await;
    }
    if ctx.active_clients.get() > 0 {
        log::warn!(
            "shard {}: {} sessions still busy after the shutdown timeout; closing them",
            ctx.id,
            ctx.active_clients.get()
        );
    }
    let pools: Vec<_> = ctx.pools.borrow().values().cloned().collect();
    for pool in &pools {
        pool.close_idle();
    }
    // Give the Terminate messages a moment to go out.
    glommio::timer::sleep(Duration::from_millis(100)).await;
}
