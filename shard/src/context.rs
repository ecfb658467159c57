//! Everything one shard owns: its users' credentials (with SCRAM verifiers computed once),
//! its pools, its cancel registry, buffers, counters and drain latch. Only this shard's
//! tasks touch it.

use crate::budget::Budgets;
use crate::fence::Fences;
use std::cell::{Cell, RefCell};

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use hashbrown::HashMap;

use crate::auth::secret::ScramVerifier;
use crate::auth::{Secret, ServerCredential};
use crate::backend::ConnectSpec;
use crate::bufpool::BufPool;
use crate::cancel::CancelRegistry;
use crate::config::{AuthMethod, Config};
use crate::control::ConsoleRequest;
use crate::pool::{Pool, PoolKey, PoolLimits};
use crate::prepared::Registry;
use crate::router::{Router, SchemaRoute};
use crate::session::auth_query::Found;
use crate::session::failures::AuthFailure;
use crate::sql::route::ReadOnlyFunctions;
use crate::stats::ShardStats;
use crate::sync::{Gate, Latch, Signal};
use crate::topology::{primary_of, LocalNode, Topology};

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
    /// Set for a stand-in: a name nobody knows, or a role `auth_query` found that cannot
    /// log in with a password. Such a login goes through the same exchange as a wrong
    /// password and fails the same way (no user enumeration); this says why, for the log.
    pub refusal: Option<AuthFailure>,
}

impl UserEntry {
    /// A stand-in for a user the proxy does not know, asked for a password by `method`
    /// as a known one would be. Its SCRAM salt depends only on the name (and this
    /// process), so repeated attempts see the same salt, as for a real user.
    pub fn unknown(name: &str, method: AuthMethod) -> UserEntry {
        Self::stand_in(name, method, AuthFailure::UnknownUser)
    }

    fn stand_in(name: &str, method: AuthMethod, refusal: AuthFailure) -> UserEntry {
        use sha2::{Digest, Sha256};
        static MOCK_KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        let key = MOCK_KEY.get_or_init(rand::random);
        let digest = Sha256::new()
            .chain_update(key)
            .chain_update(name.as_bytes())
            .finalize();
        // (Kept whatever the method: hba rules may ask for SCRAM.)
        let scram = Some(ScramVerifier {
            iterations: SCRAM_ITERATIONS,
            salt: digest[..16].to_vec(),
            // Keys nobody can produce a proof for.
            stored_key: rand::random(),
            server_key: rand::random(),
        });
        UserEntry {
            name: name.to_string(),
            method,
            secret: None,
            scram,
            server_user: name.to_string(),
            server_password: None,
            refusal: Some(refusal),
        }
    }

    /// A role `auth_query` found on the server, checked against the password it holds
    /// there (an expired one, or none, is a stand-in that cannot succeed).
    pub fn looked_up(name: &str, method: AuthMethod, found: &Found) -> UserEntry {
        let secret = match found {
            Found::NoRole => return Self::unknown(name, method),
            _ if found.expired(std::time::SystemTime::now()) => {
                return Self::stand_in(name, method, AuthFailure::PasswordExpired)
            }
            Found::Role {
                secret: Some(secret),
                ..
            } => secret.clone(),
            Found::Role { secret: None, .. } => {
                return Self::stand_in(name, method, AuthFailure::NoPassword)
            }
        };
        let scram = match &secret {
            Secret::Scram(verifier) => Some(verifier.clone()),
            Secret::Plain(password) => Some(ScramVerifier::from_password(password)),
            // As PostgreSQL: SCRAM against an md5 hash is a doomed exchange.
            Secret::Md5(_) => Self::unknown(name, method).scram,
        };
        UserEntry {
            name: name.to_string(),
            method,
            secret: Some(secret),
            scram,
            server_user: name.to_string(),
            server_password: None,
            refusal: None,
        }
    }
}

pub struct ShardCtx {
    pub id: usize,
    pub workers: usize,
    /// This shard's own copy of the configuration (replaced on reload).
    config: RefCell<Arc<Config>>,
    pub users: RefCell<HashMap<String, Rc<UserEntry>>>,
    pub nodes: RefCell<Vec<LocalNode>>,
    pub topology_version: Cell<u64>,
    /// Whether the primary is confirmed, named but not yet seen writable, or lost.
    pub primary_state: Cell<crate::topology::PrimaryState>,
    /// See `Topology::primary_epoch` and `primary_first_xid`.
    pub primary_epoch: Cell<u64>,
    pub primary_first_xid: Cell<Option<u64>>,
    /// Units waiting in the switchover buffer on this shard.
    pub buffered: Cell<usize>,
    /// Where pools report a node they suspect is down (the health checker).
    pub suspects: Option<crossbeam_channel::Sender<String>>,
    /// Raised whenever the topology changes (a node came back, or another took over).
    pub topology_changed: Signal,
    /// Closed while PAUSEd: no server connections are handed out.
    pub gate: Rc<Gate>,
    /// Picks nodes for reads and writes (read/write splitting).
    pub router: Router,
    /// Functions a read may call (built-in list plus `load_balancer.read_only_functions`).
    pub read_only_functions: RefCell<Rc<ReadOnlyFunctions>>,
    pub schema_routes: RefCell<Rc<Vec<SchemaRoute>>>,
    /// Where SQL admin console statements go (the control plane).
    pub console: Option<Sender<ConsoleRequest>>,
    pub pools: RefCell<HashMap<PoolKey, Rc<Pool>>>,
    /// Databases a client's statement needs to itself right now (see `fence`).
    pub fences: Rc<Fences>,
    /// Every pool key's connection budget, shared with the other shards.
    pub budgets: Arc<Budgets>,
    pub cancels: CancelRegistry,
    pub bufs: BufPool,
    /// `[auth] auth_hba_file`, parsed (re-read on reload).
    pub hba: RefCell<Option<Rc<crate::auth::hba::Hba>>>,
    /// Recent failed logins by client address (damping).
    pub login_failures: RefCell<crate::session::failures::Failures>,
    /// Clients' TLS handshakes (`[tls]`; `None` when client_sslmode is disable).
    pub tls: RefCell<Option<futures_rustls::TlsAcceptor>>,
    /// TLS towards servers (`None` when server_sslmode is disable).
    pub server_tls: RefCell<Option<crate::tls::ServerTls>>,
    /// `auth_query`: looked-up passwords and the lookup connections.
    pub auth_query: crate::session::auth_query::AuthQuery,
    /// What clients' logins proved, by server user, for users with no configured
    /// `server_password` (SCRAM pass-through): what their pools log in with.
    learned: RefCell<HashMap<String, ServerCredential>>,
    /// Partly received client messages held on the side (`limits.message_memory`).
    pub message_memory: Rc<crate::engine::intake::MessageMemory>,
    /// Prepared statements shared by this shard's transaction-pooled clients.
    pub statements: Registry,
    pub stats: Arc<ShardStats>,
    pub draining: Latch,
    pub peers: RefCell<Option<Rc<crate::bus::Peers>>>,
    /// This shard's share of `limits.max_client_connections` (reloadable).
    pub max_clients: Cell<usize>,
    pub active_clients: Cell<usize>,
    /// Idle clients parked off their tasks (see `dormant`).
    pub dormitory: crate::dormant::Dormitory,
    /// This shard's part of the query result cache.
    pub cache: Rc<crate::cache::shard::ShardCache>,
    next_backend_id: Rc<Cell<u64>>,
    limits: RefCell<PoolLimits>,
}

/// This shard's share of the configured pool sizing.
fn pool_limits(config: &Config, workers: usize, id: usize) -> PoolLimits {
    let pool = &config.pool_mode;
    PoolLimits {
        // One budget for every shard (see `budget`); min_idle is kept per shard.
        max_size: (pool.max_pool_size as usize).max(1),
        min_idle: share(pool.min_idle as usize, workers, id),
        idle_timeout: Duration::from_secs(pool.idle_timeout_secs),
        max_lifetime: Duration::from_secs(pool.max_lifetime_secs),
        acquire_timeout: Duration::from_millis(pool.acquire_timeout_ms),
    }
}

fn user_entries(config: &Config) -> Result<HashMap<String, Rc<UserEntry>>, String> {
    config
        .users
        .iter()
        .map(|u| {
            let entry = user_entry(u, config.auth.method)?;
            Ok((u.name.clone(), Rc::new(entry)))
        })
        .collect()
}

impl ShardCtx {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        stats: Arc<ShardStats>,
        budgets: Arc<Budgets>,
        epochs: Arc<crate::cache::Epochs>,
    ) -> Result<Self, String> {
        let workers = config.effective_workers();
        let limits = pool_limits(&config, workers, id);
        let users = user_entries(&config)?;
        let nodes = Topology::configured(&config)?
            .nodes
            .iter()
            .map(|n| n.local())
            .collect();
        Ok(ShardCtx {
            id,
            workers,
            users: RefCell::new(users),
            nodes: RefCell::new(nodes),
            topology_version: Cell::new(0),
            primary_state: Cell::new(crate::topology::PrimaryState::Confirmed),
            primary_epoch: Cell::new(0),
            primary_first_xid: Cell::new(None),
            buffered: Cell::new(0),
            suspects: None,
            topology_changed: Signal::default(),
            gate: Rc::default(),
            router: Router::new(rand::random()),
            read_only_functions: RefCell::new(Rc::new(ReadOnlyFunctions::new(
                &config.load_balancer.read_only_functions,
            ))),
            schema_routes: RefCell::new(Rc::new(SchemaRoute::compile(&config.schema_routes))),
            console: None,
            pools: RefCell::new(HashMap::new()),
            fences: Rc::default(),
            budgets,
            cancels: CancelRegistry::new(
                id,
                Duration::from_millis(config.timeouts.connect_timeout_ms),
                stats.clone(),
            ),
            bufs: BufPool::new(config.limits.buffer_size),
            login_failures: RefCell::default(),
            hba: RefCell::new(crate::auth::hba::load(&config.auth)?.map(Rc::new)),
            tls: RefCell::new(
                crate::tls::client_acceptor(&config.tls)
                    .map_err(|e| format!("{}: {}", e.key, e.message))?,
            ),
            server_tls: RefCell::new(
                crate::tls::server_connector(&config.tls)
                    .map_err(|e| format!("{}: {}", e.key, e.message))?,
            ),
            auth_query: Default::default(),
            learned: RefCell::default(),
            message_memory: crate::engine::intake::MessageMemory::new(
                config.limits.message_memory,
                stats.clone(),
            ),
            statements: Registry::default(),
            draining: Latch::new(),
            peers: RefCell::new(None),
            max_clients: Cell::new(share(config.limits.max_client_connections, workers, id).max(1)),
            active_clients: Cell::new(0),
            dormitory: crate::dormant::Dormitory::new(id),
            cache: Rc::new(crate::cache::shard::ShardCache::new(
                &config.cache,
                id,
                workers,
                epochs,
            )),
            next_backend_id: Rc::new(Cell::new(((id as u64) << 48) | 1)),
            limits: RefCell::new(limits),
            stats,
            config: RefCell::new(config),
        })
    }

    /// The configuration in force (a reload replaces it between two calls).
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    pub fn user(&self, name: &str) -> Option<Rc<UserEntry>> {
        self.users.borrow().get(name).cloned()
    }

    /// The node writes go to: the primary, when it may take work. A configured but
    /// disabled, draining or failing primary is still named (its pool waits for it to
    /// come back, up to the acquire timeout); `None` only when no primary is configured.
    pub fn primary(&self) -> Option<LocalNode> {
        primary_of(&self.nodes.borrow()).cloned()
    }

    fn node_fenced(&self, address: &str) -> bool {
        self.nodes
            .borrow()
            .iter()
            .any(|n| n.fenced && &*n.address == address)
    }

    /// No primary may take work and none is confirmed: a failover is under way, and
    /// units that need the primary wait in the switchover buffer.
    pub fn awaiting_primary(&self) -> bool {
        self.primary_state.get() != crate::topology::PrimaryState::Confirmed
            && !self
                .nodes
                .borrow()
                .iter()
                .any(|n| n.role == crate::config::NodeRole::Primary && n.routable())
    }

    fn node_routable(&self, address: &str) -> bool {
        self.nodes
            .borrow()
            .iter()
            .any(|n| n.routable() && &*n.address == address)
    }

    /// The pool for (node, database, backend user), created on first use.
    pub fn pool(&self, node: &LocalNode, database: &str, user: &UserEntry) -> Rc<Pool> {
        let key = PoolKey {
            node: node.address.clone(),
            database: database.into(),
            user: user.server_user.as_str().into(),
        };
        if let Some(pool) = self.pools.borrow().get(&key) {
            return pool.clone();
        }
        let config = self.config();
        let spec = ConnectSpec {
            addr: node.addr.clone(),
            user: user.server_user.clone(),
            database: database.to_string(),
            credential: self.credential_for(user),
            startup_params: Vec::new(),
            connect_timeout: Duration::from_millis(config.timeouts.connect_timeout_ms),
            login_timeout: Duration::from_millis(config.timeouts.server_login_timeout_ms),
            max_message_size: usize::MAX >> 1,
            scram_cache: Rc::default(),
            tls: self.server_tls_for(&node.address),
        };
        let label = format!("{}/{}@{}", database, user.server_user, node.label);
        let pool = Pool::new(
            key.clone(),
            label,
            spec,
            self.limits.borrow().clone(),
            crate::pool::ShardShared {
                stats: self.stats.clone(),
                next_id: self.next_backend_id.clone(),
                gate: self.gate.clone(),
                fences: self.fences.clone(),
                budget: self.budgets.get(
                    (
                        key.node.to_string(),
                        key.database.to_string(),
                        key.user.to_string(),
                    ),
                    self.limits.borrow().max_size,
                ),
                shard: self.id,
                suspects: self.suspects.clone(),
            },
        );
        if !node.routable() {
            pool.set_retired(true);
        }
        self.pools.borrow_mut().insert(key, pool.clone());
        pool
    }

    /// What pools of `user` log in with: the configured password, else what a client
    /// of that server user last proved at login.
    fn credential_for(&self, user: &UserEntry) -> Option<ServerCredential> {
        match &user.server_password {
            Some(password) => Some(ServerCredential::Password(password.clone())),
            None => self.learned.borrow().get(&user.server_user).cloned(),
        }
    }

    /// Keeps what a client's login proved for its server user (when no password is
    /// configured) and hands it to that user's pools, so their next connections log in
    /// with it.
    pub fn learn_credential(&self, user: &UserEntry, credential: ServerCredential) {
        if user.server_password.is_some() {
            return;
        }
        let mut learned = self.learned.borrow_mut();
        if learned.get(&user.server_user) == Some(&credential) {
            return;
        }
        for pool in self.all_pools() {
            if *pool.key.user == *user.server_user {
                pool.set_credential(Some(credential.clone()));
            }
        }
        learned.insert(user.server_user.clone(), credential);
    }

    pub fn all_pools(&self) -> Vec<Rc<Pool>> {
        self.pools.borrow().values().cloned().collect()
    }

    /// Follows a new topology: pools of nodes that may no longer take work are retired
    /// (idle connections close now, lent ones when they come back), and come back into
    /// service when their node does.
    pub fn apply_topology(&self, topology: &Topology) {
        if topology.version < self.topology_version.get() {
            return;
        }
        self.topology_version.set(topology.version);
        self.primary_state.set(topology.primary_state);
        self.primary_epoch.set(topology.primary_epoch);
        self.primary_first_xid.set(topology.primary_first_xid);
        *self.nodes.borrow_mut() = topology.nodes.iter().map(|n| n.local()).collect();
        for pool in self.all_pools() {
            if self.node_fenced(&pool.key.node) {
                pool.sever();
            } else {
                pool.set_retired(!self.node_routable(&pool.key.node));
            }
        }
        self.topology_changed.notify();
    }

    /// Takes a reloaded configuration: users, pool sizes and timeouts. Addresses and the
    /// worker count only change with a restart (the control plane says so).
    pub fn apply_config(&self, config: Arc<Config>) -> Result<(), String> {
        let users = user_entries(&config)?;
        // Certificates are read again: a renewed one takes effect for new clients.
        let tls = crate::tls::client_acceptor(&config.tls)
            .map_err(|e| format!("{}: {}", e.key, e.message))?;
        let server_tls = crate::tls::server_connector(&config.tls)
            .map_err(|e| format!("{}: {}", e.key, e.message))?;
        let hba = crate::auth::hba::load(&config.auth)?.map(Rc::new);
        let limits = pool_limits(&config, self.workers, self.id);
        for pool in self.all_pools() {
            let configured = users
                .values()
                .find(|u| *u.server_user == *pool.key.user)
                .and_then(|u| u.server_password.clone());
            let credential = configured
                .map(ServerCredential::Password)
                .or_else(|| self.learned.borrow().get(&*pool.key.user).cloned());
            pool.set_limits(limits.clone(), &config.timeouts, credential);
        }
        self.auth_query.reset();
        *self.users.borrow_mut() = users;
        *self.limits.borrow_mut() = limits;
        *self.read_only_functions.borrow_mut() = Rc::new(ReadOnlyFunctions::new(
            &config.load_balancer.read_only_functions,
        ));
        *self.schema_routes.borrow_mut() = Rc::new(SchemaRoute::compile(&config.schema_routes));
        self.max_clients
            .set(share(config.limits.max_client_connections, self.workers, self.id).max(1));
        self.message_memory.set_limit(config.limits.message_memory);
        *self.tls.borrow_mut() = tls;
        *self.server_tls.borrow_mut() = server_tls;
        *self.hba.borrow_mut() = hba;
        self.cache.apply_config(&config.cache);
        for pool in self.all_pools() {
            pool.set_tls(self.server_tls_for(&pool.key.node));
        }
        *self.config.borrow_mut() = config;
        Ok(())
    }

    /// How to reach the server at `address` ("host:port") over TLS, if at all: never
    /// for a Unix-socket node (its address is the socket's path), as with libpq.
    pub(crate) fn server_tls_for(
        &self,
        address: &str,
    ) -> Option<(
        crate::tls::ServerTls,
        futures_rustls::rustls::pki_types::ServerName<'static>,
    )> {
        if crate::nodeaddr::is_socket_dir(address) {
            return None;
        }
        let tls = self.server_tls.borrow().clone()?;
        Some((tls, crate::tls::server_name(address)?))
    }

    pub fn max_message_size(&self) -> usize {
        self.config.borrow().limits.max_message_size
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
        refusal: None,
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
