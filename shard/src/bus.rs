//! The shard bus: everything one shard tells another, over glommio's channel mesh — the
//! message type, each shard's receive loop, and the senders (cancel routing, schema-change
//! and fence broadcasts). Only what must cross cores travels here, never query traffic.

use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};

use crate::cancel::{owner_shard, CancelMsg};
use crate::context::ShardCtx;

/// What one shard tells another.
#[derive(Clone, Debug)]
pub enum ShardMsg {
    /// A CancelRequest for a session the receiving shard owns.
    Cancel(CancelMsg),
    /// A client changed the schema (CREATE, ALTER, DROP): the receiving shard prepares
    /// its shared statements afresh, so no stale plan serves its clients.
    SchemaChanged,
    /// Raise (or lower) a database fence (see `fence`); `done` is counted up once the
    /// receiving shard closed its idle connections there.
    Fence {
        database: Arc<str>,
        raise: bool,
        done: Option<Arc<AtomicUsize>>,
    },
    /// L2: the receiving shard owns `key`; shard `from` waits (`ticket`) for the fresh
    /// result, if it has one.
    CacheGet {
        key: u128,
        from: usize,
        ticket: crate::cache::l2::Ticket,
    },
    /// The owner's answer to a `CacheGet`.
    CacheGot {
        ticket: crate::cache::l2::Ticket,
        entry: Option<Arc<crate::cache::store::Entry>>,
    },
    /// L2: a result for the owner of `key` to keep.
    CachePut {
        key: u128,
        entry: Arc<crate::cache::store::Entry>,
    },
}

/// The mesh every shard joins at start.
pub type Mesh = MeshBuilder<ShardMsg, Full>;

/// This shard's senders to every shard (itself included).
pub type Peers = Senders<ShardMsg>;

/// How many messages may wait in one channel.
const CHANNEL_CAPACITY: usize = 1024;

pub fn mesh(workers: usize) -> Mesh {
    MeshBuilder::full(workers, CHANNEL_CAPACITY)
}

/// Joins the mesh and starts one receive loop per peer; without the mesh the shard works
/// alone (cancels and broadcasts stay local).
pub async fn join(ctx: &Rc<ShardCtx>, mesh: Mesh) {
    match mesh.join().await {
        Ok((senders, mut receivers)) => {
            *ctx.peers.borrow_mut() = Some(Rc::new(senders));
            for (_, stream) in receivers.streams() {
                let ctx = ctx.clone();
                glommio::spawn_local(async move {
                    while let Some(msg) = stream.recv().await {
                        receive(&ctx, msg);
                    }
                })
                .detach();
            }
        }
        Err(_) => log::warn!("shard {}: channels to other shards unavailable", ctx.id),
    }
}

fn receive(ctx: &ShardCtx, msg: ShardMsg) {
    match msg {
        ShardMsg::Cancel(cancel) => ctx.cancels.cancel(cancel),
        ShardMsg::SchemaChanged => ctx.statements.rename_all(),
        ShardMsg::Fence {
            database,
            raise,
            done,
        } => crate::fence::on_message(ctx, &database, raise, done.as_deref()),
        ShardMsg::CacheGet { key, from, ticket } => {
            let entry = crate::cache::shard::l2_lookup(ctx, key);
            try_send(ctx, from, ShardMsg::CacheGot { ticket, entry });
        }
        ShardMsg::CacheGot { ticket, entry } => ctx.cache.waiting.answer(ticket, entry),
        ShardMsg::CachePut { key, entry } => crate::cache::shard::l2_keep(ctx, key, entry),
    }
}

/// Sends `msg` to `shard` if its channel has room (the cache's messages are worth
/// nothing late); returns whether it went.
pub fn try_send(ctx: &ShardCtx, shard: usize, msg: ShardMsg) -> bool {
    let peers = ctx.peers.borrow();
    match peers.as_ref() {
        Some(peers) if shard < peers.nr_consumers() => peers.try_send_to(shard, msg).is_ok(),
        _ => false,
    }
}

/// Sends `make()` to every other shard; returns how many took it.
pub async fn broadcast(ctx: &ShardCtx, make: impl Fn() -> ShardMsg) -> usize {
    let peers = ctx.peers.borrow().clone();
    let Some(peers) = peers else {
        return 0;
    };
    let mut sent = 0;
    for shard in (0..peers.nr_consumers()).filter(|&s| s != ctx.id) {
        if peers.send_to(shard, make()).await.is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Tells every other shard that the schema changed.
pub async fn broadcast_schema_change(ctx: &ShardCtx) {
    broadcast(ctx, || ShardMsg::SchemaChanged).await;
}

/// Sends a cancel to the shard that owns the key (maybe this one).
pub async fn route_cancel(ctx: &ShardCtx, msg: CancelMsg) {
    let owner = owner_shard(msg.secret);
    if owner == ctx.id {
        ctx.cancels.cancel(msg);
        return;
    }
    let peers = ctx.peers.borrow().clone();
    if let Some(peers) = peers {
        if owner < peers.nr_consumers() {
            let _ = peers.send_to(owner, ShardMsg::Cancel(msg)).await;
        }
    }
}
