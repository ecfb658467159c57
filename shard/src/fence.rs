//! Database fences: while a client runs a statement that needs a database to itself (see
//! `sql::exclusive`), every shard closes its idle pooled connections to that database,
//! closes lent ones as they come back, and opens none — the proxy's own connections must
//! not be the "other users" that make PostgreSQL refuse it. A real client in a
//! transaction there still blocks it, exactly as it would without the proxy.
//!
//! Each shard keeps its own count of fences per database (raised and lowered over the
//! shard channels), so checking costs a hash lookup on the rare path that opens or pools
//! a connection, and nothing when no fence is up.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use crate::bus::ShardMsg;
use crate::context::ShardCtx;
use crate::sync::Signal;

/// Longest wait for the other shards to close their idle connections.
const SHARDS_REPLY_WITHIN: Duration = Duration::from_secs(2);

/// The fences up on one shard.
#[derive(Default)]
pub struct Fences {
    up: RefCell<HashMap<Box<str>, u32>>,
    lowered: Signal,
}

impl Fences {
    pub fn is_fenced(&self, database: &str) -> bool {
        let up = self.up.borrow();
        !up.is_empty() && up.contains_key(database)
    }

    pub fn raise(&self, database: &str) {
        *self.up.borrow_mut().entry(database.into()).or_insert(0) += 1;
    }

    pub fn lower(&self, database: &str) {
        let mut up = self.up.borrow_mut();
        if let Some(count) = up.get_mut(database) {
            *count -= 1;
            if *count == 0 {
                up.remove(database);
            }
        }
        drop(up);
        self.lowered.notify();
    }

    /// Waits until no fence is up for `database`, or `limit` passed; true if lifted.
    pub async fn wait_lifted(&self, database: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.is_fenced(database) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            crate::sync::timeout(left, self.lowered.wait()).await;
        }
        true
    }
}

/// Raises the fence for `database` on this shard (closing idle connections there).
pub fn raise_here(ctx: &ShardCtx, database: &str) {
    ctx.fences.raise(database);
    for pool in ctx.all_pools() {
        if &*pool.key.database == database {
            pool.close_idle();
        }
    }
}

/// A fence raised on every shard for one statement; dropping it lowers them.
pub struct FenceGuard {
    ctx: Rc<ShardCtx>,
    database: Arc<str>,
}

/// Raises a fence for `database` on every shard and waits (bounded) until each has closed
/// its idle connections there.
pub async fn fence_database(ctx: &Rc<ShardCtx>, database: &str) -> FenceGuard {
    log::debug!(
        "shard {}: closing pooled connections to database \"{database}\" for a statement that needs it to itself",
        ctx.id
    );
    let database: Arc<str> = database.into();
    raise_here(ctx, &database);
    let done = Arc::new(AtomicUsize::new(0));
    let asked = crate::bus::broadcast(ctx, || ShardMsg::Fence {
        database: database.clone(),
        raise: true,
        done: Some(done.clone()),
    })
    .await;
    let deadline = Instant::now() + SHARDS_REPLY_WITHIN;
    while done.load(Ordering::Acquire) < asked && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    FenceGuard {
        ctx: ctx.clone(),
        database,
    }
}

/// What a shard does with a fence message from another shard.
pub fn on_message(ctx: &ShardCtx, database: &str, raise: bool, done: Option<&AtomicUsize>) {
    if raise {
        raise_here(ctx, database);
    } else {
        ctx.fences.lower(database);
    }
    if let Some(done) = done {
        done.fetch_add(1, Ordering::Release);
    }
}

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.ctx.fences.lower(&self.database);
        let ctx = self.ctx.clone();
        let database = self.database.clone();
        glommio::spawn_local(async move {
            crate::bus::broadcast(&ctx, || ShardMsg::Fence {
                database: database.clone(),
                raise: false,
                done: None,
            })
            .await;
        })
        .detach();
    }
}
