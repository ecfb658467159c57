//! Everything one shard owns: its users' credentials (with SCRAM verifiers computed once),
//! its pools, its cancel registry, buffers, counters and drain latch. Only this shard's
//! tasks touch it.

use std::cell::{Cell, RefCell};
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;

use crate::auth::secret::ScramVerifier;
use crate::auth::Secret;
use crate::backend::ConnectSpec;
use crate::bufpool::BufPool;
use crate::cancel::{CancelRegistry, ShardMsg};
use crate::config::{AuthMethod, Config, NodeRole};
use crate::pool::{Pool, PoolKey, PoolLimits, PoolSnapshot};
use crate::prepared::Registry;
use crate::stats::ShardStats;
use crate::sync::Latch;

/// SCRAM iteration count for verifiers the proxy derives from plain passwords.
const SCRAM_ITERATIONS: u32 = 4096;

/// A configured user, ready for authentication.
pub struct UserEntry {
    pub name: String,
    pub method: AuthMethod,
    pub secret: Option<Secret>,
    /// SCRAM verifier for `scram-sha-256` logins (configured, or derived once from a plain password).
    pub scram: Option<ScramVerifier>,
    pub server_user: String,
    pub server_password: Option<String>,
}

/// A backend node as a shard sees it.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub label: String,
    pub addr: SocketAddr,
    pub role: NodeRole,
    pub enabled: bool,
}

pub struct ShardCtx {
    pub id: usize,
    pub workers: usize,
    pub config: Arc<Config>,
    pub users: HashMap<String, Rc<UserEntry>>,
    pub nodes: Vec<NodeEntry>,
    pub pools: RefCell<HashMap<PoolKey, Rc<Pool>>>,
    pub cancels: CancelRegistry,
    pub bufs: BufPool,
    /// Prepared statements shared by this shard's transaction-pooled clients.
    pub statements: Registry,
    pub stats: Arc<ShardStats>,
    pub draining: Latch,
    pub peers: RefCell<Option<Rc<glommio::channels::channel_mesh::Senders<ShardMsg>>>>,
    pub max_clients: usize,
    pub active_clients: Cell<usize>,
    next_backend_id: Rc<Cell<u64>>,
    limits: PoolLimits,
}

impl ShardCtx {
    pub fn new(id: usize, config: Arc<Config>, stats: Arc<ShardStats>) -> Result<Self, String> {
        let workers = config.effective_workers();
        let pool = &config.pool_mode;
        let limits = PoolLimits {
            max_size: share(pool.max_pool_size as usize, workers, id).max(1),
            min_idle: share(pool.min_idle as usize, workers, id),
            idle_timeout: Duration::from_secs(pool.idle_timeout_secs),
            max_lifetime: Duration::from_secs(pool.max_lifetime_secs),
            acquire_timeout: Duration::from_millis(pool.acquire_timeout_ms),
        };
        let users = config
            .users
            .iter()
            .map(|u| {
                let entry = user_entry(u, config.auth.method)?;
                Ok((u.name.clone(), Rc::new(entry)))
            })
            .collect::<Result<HashMap<_, _>, String>>()?;
        let nodes = config
            .nodes
            .iter()
            .map(|n| {
                let addr = n
                    .address()
                    .to_socket_addrs()
                    .map_err(|e| format!("node {}: {e}", n.label()))?
                    .next()
                    .ok_or_else(|| format!("node {}: address resolves to nothing", n.label()))?;
                Ok(NodeEntry {
                    label: n.label(),
                    addr,
                    role: n.role,
                    enabled: n.enabled,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ShardCtx {
            id,
            workers,
            users,
            nodes,
            pools: RefCell::new(HashMap::new()),
            cancels: CancelRegistry::new(
                id,
                Duration::from_millis(config.timeouts.connect_timeout_ms),
                stats.clone(),
            ),
            bufs: BufPool::new(config.limits.buffer_size),
            statements: Registry::default(),
            draining: Latch::new(),
            peers: RefCell::new(None),
            max_clients: share(config.limits.max_client_connections, workers, id).max(1),
            active_clients: Cell::new(0),
            next_backend_id: Rc::new(Cell::new(((id as u64) << 48) | 1)),
            limits,
            stats,
            config,
        })
    }

    /// The node writes go to: the enabled primary.
    pub fn primary(&self) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.enabled && n.role == NodeRole::Primary)
    }

    /// The pool for (node, database, backend user), created on first use.
    pub fn pool(&self, node: usize, database: &str, user: &UserEntry) -> Rc<Pool> {
        let key = PoolKey {
            node,
            database: database.to_string(),
            user: user.server_user.clone(),
        };
        if let Some(pool) = self.pools.borrow().get(&key) {
            return pool.clone();
        }
        let entry = &self.nodes[node];
        let spec = ConnectSpec {
            addr: entry.addr,
            user: user.server_user.clone(),
            database: database.to_string(),
            password: user.server_password.clone(),
            connect_timeout: Duration::from_millis(self.config.timeouts.connect_timeout_ms),
            max_message_size: usize::MAX >> 1,
            scram_cache: Rc::default(),
        };
        let label = format!("{}/{}@{}", database, user.server_user, entry.label);
        let pool = Pool::new(
            key.clone(),
            label,
            spec,
            self.limits.clone(),
            self.stats.clone(),
            self.next_backend_id.clone(),
        );
        self.pools.borrow_mut().insert(key, pool.clone());
        pool
    }

    pub fn pool_snapshots(&self) -> Vec<PoolSnapshot> {
        self.pools.borrow().values().map(|p| p.snapshot()).collect()
    }

    pub fn max_message_size(&self) -> usize {
        self.config.limits.max_message_size
    }
}

/// Shard `id`'s part of `total` split across `workers` (the first shards take the remainder).
pub fn share(total: usize, workers: usize, id: usize) -> usize {
    total / workers + usize::from(id < total % workers)
}

fn user_entry(u: &crate::config::UserConfig, default: AuthMethod) -> Result<UserEntry, String> {
    let secret = u.secret();
    let method = u.method(default);
    let scram = match (&secret, method) {
        (Some(Secret::Scram(v)), _) => Some(v.clone()),
        (Some(Secret::Plain(p)), AuthMethod::ScramSha256) => {
            let salt: [u8; 16] = rand::random();
            Some(ScramVerifier::generate(p, &salt, SCRAM_ITERATIONS))
        }
        _ => None,
    };
    if method == AuthMethod::ScramSha256 && scram.is_none() {
        return Err(format!(
            "users.{}: scram-sha-256 needs a plain password or a SCRAM verifier",
            u.name
        ));
    }
    Ok(UserEntry {
        name: u.name.clone(),
        method,
        secret,
        scram,
        server_user: u.backend_user().to_string(),
        server_password: u.backend_password().map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_add_up() {
        for total in 0..50 {
            for workers in 1..9 {
                let sum: usize = (0..workers).map(|id| share(total, workers, id)).sum();
                assert_eq!(sum, total);
            }
        }
    }
}
