//! The proxy's configuration: a TOML file, then `HELIOS_`-prefixed environment overrides,
//! then validation. Every error names the offending key so an operator can fix it without
//! reading code.

mod decode;
mod overrides;
mod validate;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::auth::Secret;

/// Why a configuration was refused: `key` is the dotted path (`nodes[0].port`), the
/// environment variable, or `config` for problems with the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config error: `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where clients connect.
    pub listen_address: String,
    /// Where the admin/metrics endpoint listens.
    pub admin_address: String,
    /// Shards (one executor thread each); 0 = one per two available cores, at least one.
    pub workers: usize,
    pub pool_mode: PoolConfig,
    pub auth: AuthConfig,
    pub users: Vec<UserConfig>,
    /// Per-database settings (pool mode overrides).
    pub databases: Vec<DatabaseConfig>,
    pub nodes: Vec<NodeConfig>,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub health: HealthConfig,
    /// Where the primary's identity comes from.
    pub topology: TopologyConfig,
    /// What happens when the primary is lost: promotion, the switchover buffer.
    pub failover: FailoverConfig,
    pub tls: TlsConfig,
    pub load_balancer: LoadBalancerConfig,
    pub routing: RoutingConfig,
    /// Tables whose reads go to a given node or role.
    pub schema_routes: Vec<SchemaRouteConfig>,
    /// When set, every mutating admin API request needs `Authorization: Bearer <token>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// How the admin REST API on `admin_address` bounds its threads, connections and waits.
    pub admin_api: AdminApiConfig,
    /// Users who may run every SQL admin console command (database `heliosproxy` or
    /// `pgbouncer`).
    pub admin_users: Vec<String>,
    /// Users who may run the console's SHOW commands only.
    pub stats_users: Vec<String>,
    /// The query result cache.
    pub cache: CacheConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_address: "127.0.0.1:6432".into(),
            admin_address: "127.0.0.1:9090".into(),
            workers: 0,
            pool_mode: PoolConfig::default(),
            auth: AuthConfig::default(),
            users: Vec::new(),
            databases: Vec::new(),
            nodes: Vec::new(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            health: HealthConfig::default(),
            topology: TopologyConfig::default(),
            failover: FailoverConfig::default(),
            tls: TlsConfig::default(),
            load_balancer: LoadBalancerConfig::default(),
            routing: RoutingConfig::default(),
            schema_routes: Vec::new(),
            admin_token: None,
            admin_api: AdminApiConfig::default(),
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            cache: CacheConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps its backend connection until it disconnects.
    #[default]
    Session,
    /// A backend connection is lent for one transaction.
    Transaction,
    /// A backend connection is lent for one statement.
    Statement,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub mode: PoolMode,
    /// Backend connections per (node, database, user), split across workers.
    pub max_pool_size: u32,
    /// Idle connections kept open per pool, split across workers.
    pub min_idle: u32,
    pub idle_timeout_secs: u64,
    pub max_lifetime_secs: u64,
    /// How long a client waits for a free connection before 53300.
    pub acquire_timeout_ms: u64,
    /// Run on a backend before another session-mode client gets it; "" disables.
    /// Transaction and statement modes track session state instead of resetting it.
    pub reset_query: String,
    /// Statements each server connection keeps prepared for transaction/statement
    /// pooling; the least recently used one is closed beyond this.
    pub max_prepared_statements: u32,
    /// In transaction/statement mode, LISTEN, session advisory locks, temporary tables,
    /// WITH HOLD cursors and SQL PREPARE keep the client on its server connection until
    /// that state is gone (true), or are refused with SQLSTATE 0A000 (false).
    pub pin_session_state: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            mode: PoolMode::Session,
            max_pool_size: 20,
            min_idle: 0,
            idle_timeout_secs: 600,
            max_lifetime_secs: 3600,
            acquire_timeout_ms: 5000,
            reset_query: "DISCARD ALL".into(),
            max_prepared_statements: 200,
            pin_session_state: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMethod {
    /// No password asked.
    #[serde(rename = "trust")]
    Trust,
    /// Clear-text password (only sensible on a trusted network).
    #[serde(rename = "password")]
    Password,
    #[serde(rename = "md5")]
    Md5,
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// A TLS client certificate (verified against `tls.client_ca_file`) whose common
    /// name is the user's name; no password.
    #[serde(rename = "cert")]
    Cert,
}

impl AuthMethod {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Cert => "cert",
        }
    }
}

impl std::fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How clients prove who they are, unless a user overrides it.
    pub method: AuthMethod,
    /// Rules in `pg_hba.conf` syntax; when set, the first matching line decides each
    /// login's method (or refuses it). Re-read on reload.
    pub auth_hba_file: Option<String>,
    /// The role the proxy looks passwords up with, for users not in `[[users]]`;
    /// setting it turns `auth_query` on.
    pub auth_user: Option<String>,
    /// `auth_user`'s password on the servers (else its `[[users]]` entry's).
    pub auth_password: Option<String>,
    /// The lookup: takes the user name as `$1`, returns (name, password) and optionally
    /// the password's expiry as epoch seconds. Default: [`DEFAULT_AUTH_QUERY`].
    pub auth_query: Option<String>,
    /// The database the lookup runs in; default: the one the client asked for.
    pub auth_dbname: Option<String>,
    /// How long a looked-up password is reused, in seconds (0: look up at every login).
    pub auth_query_cache_secs: u64,
}

/// Reads `pg_authid` (so `auth_user` must be a superuser or hold the function below):
/// every name qualified and every operator pinned to `pg_catalog`, so no object on a
/// search path can stand in (CVE-2025-12819), and the expiry returned so `VALID UNTIL`
/// is honoured at every login, cached or not (CVE-2025-2291).
pub const DEFAULT_AUTH_QUERY: &str = "SELECT rolname::pg_catalog.text, rolpassword, \
     pg_catalog.date_part('epoch', rolvaliduntil) \
     FROM pg_catalog.pg_authid \
     WHERE rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name";

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            method: AuthMethod::default(),
            auth_hba_file: None,
            auth_user: None,
            auth_password: None,
            auth_query: None,
            auth_dbname: None,
            auth_query_cache_secs: 10,
        }
    }
}

impl AuthConfig {
    /// The lookup in force, when `auth_user` turns it on.
    pub fn query(&self) -> Option<&str> {
        self.auth_user.as_ref()?;
        Some(self.auth_query.as_deref().unwrap_or(DEFAULT_AUTH_QUERY))
    }
}

/// Passwords stay out of logs.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("method", &self.method)
            .field("auth_hba_file", &self.auth_hba_file)
            .field("auth_user", &self.auth_user)
            .field(
                "auth_password",
                &self.auth_password.as_ref().map(|_| "<redacted>"),
            )
            .field("auth_query", &self.auth_query)
            .field("auth_dbname", &self.auth_dbname)
            .field("auth_query_cache_secs", &self.auth_query_cache_secs)
            .finish()
    }
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    pub name: String,
    /// Plain password, md5 hash or SCRAM verifier that clients are checked against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_method: Option<AuthMethod>,
    /// Role the proxy logs in to backends as; default: `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_user: Option<String>,
    /// Plain password for backends; default: `password` when that is plain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_password: Option<String>,
    /// Pooling mode for this user's sessions; overrides `[[databases]]` and `[pool_mode]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_mode: Option<PoolMode>,
}

impl UserConfig {
    /// The parsed password; `None` when absent (validation rejects unparsable ones).
    pub fn secret(&self) -> Option<Secret> {
        self.password.as_deref().and_then(|p| Secret::parse(p).ok())
    }

    pub fn method(&self, default: AuthMethod) -> AuthMethod {
        self.auth_method.unwrap_or(default)
    }

    pub fn backend_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// The password for backends: `server_password`, else `password` if it is plain text
    /// (a hash cannot be turned back into a password).
    pub fn backend_password(&self) -> Option<&str> {
        if let Some(password) = self.server_password.as_deref() {
            return Some(password);
        }
        match self.secret() {
            Some(Secret::Plain(_)) => self.password.as_deref(),
            _ => None,
        }
    }
}

/// Passwords stay out of logs.
impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "<redacted>");
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &redacted(&self.password))
            .field("auth_method", &self.auth_method)
            .field("server_user", &self.server_user)
            .field("server_password", &redacted(&self.server_password))
            .field("pool_mode", &self.pool_mode)
            .finish()
    }
}

/// Settings for one database name clients connect to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub name: String,
    /// Pooling mode for sessions on this database, unless the user sets one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_mode: Option<PoolMode>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Takes writes; exactly one enabled node has this role.
    #[default]
    Primary,
    /// Streaming replica that can be promoted.
    Standby,
    /// Read-only replica.
    Replica,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Label for logs and stats; default: the address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    pub role: NodeRole,
    /// Relative share of read traffic.
    pub weight: u32,
    pub enabled: bool,
    /// Preference among standbys when one must be chosen (lower first); reported in the
    /// admin API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: None,
            host: String::new(),
            port: 5432,
            role: NodeRole::Primary,
            weight: 100,
            enabled: true,
            priority: None,
        }
    }
}

impl NodeConfig {
    /// "host:port", with IPv6 literals bracketed so the result resolves; for a Unix-socket
    /// directory (a `host` starting with `/`), the socket file `{host}/.s.PGSQL.{port}`.
    pub fn address(&self) -> String {
        crate::nodeaddr::address(&self.host, self.port)
    }

    /// Is this node reached over a Unix-domain socket?
    pub fn is_unix(&self) -> bool {
        crate::nodeaddr::is_socket_dir(&self.host)
    }

    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.address())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest single protocol message accepted, in bytes.
    pub max_message_size: usize,
    pub max_client_connections: usize,
    /// Size of each pooled I/O buffer, in bytes.
    pub buffer_size: usize,
    /// A client message up to this size is received whole before it is sent on: a
    /// unit's first message is in the proxy before a server connection is leased for
    /// it. A larger message streams to the server as it arrives (under
    /// `timeouts.client_stall_timeout_ms`).
    pub buffered_message_size: usize,
    /// Bytes of partly received client messages one worker may hold at once (messages
    /// larger than a read buffer being assembled); a client whose message would go
    /// beyond it is refused with 53200.
    pub message_memory: usize,
    /// A client idle between units this long, holding no server connection, is parked:
    /// its task and socket state are freed and only its session stays (under 1 KB), its
    /// socket watched by one epoll set until it speaks again. 0 keeps every client a
    /// task.
    pub park_idle_client_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 64 * 1024 * 1024,
            max_client_connections: 10_000,
            buffer_size: 16 * 1024,
            buffered_message_size: 1024 * 1024,
            message_memory: 128 * 1024 * 1024,
            park_idle_client_ms: 250,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP connect to a backend (and to a backend's port for a cancel request).
    pub connect_timeout_ms: u64,
    /// A backend's login after the connect: startup, authentication, first
    /// ReadyForQuery. As long as PostgreSQL's own `authentication_timeout` by default, so
    /// a slow but valid login is never cut short.
    pub server_login_timeout_ms: u64,
    /// Time a client has to finish startup and authentication (PostgreSQL's
    /// `authentication_timeout`, 60 s by default).
    pub startup_timeout_ms: u64,
    /// Grace period for sessions to finish on SIGTERM/SIGINT.
    pub shutdown_timeout_secs: u64,
    /// Longest wait to cancel and drain a backend whose client left mid-query.
    pub dirty_release_timeout_ms: u64,
    /// Longest silence of a client in the middle of a message before it is cut off
    /// (08006): a half-sent message must not hold memory or a server connection.
    pub client_stall_timeout_ms: u64,
    /// PgBouncer's `client_idle_timeout`: a client idle between transactions this long
    /// is disconnected (57P05, PostgreSQL's idle-session timeout). 0 disables it.
    pub client_idle_timeout_ms: u64,
    /// PgBouncer's `idle_transaction_timeout`: a client idle inside a transaction this
    /// long is disconnected (25P03) and its transaction rolled back. 0 disables it.
    pub idle_transaction_timeout_ms: u64,
    /// PgBouncer's `query_timeout`: a request the server has not finished answering
    /// this long after the client sent it is cancelled and the client disconnected
    /// (57014). 0 disables it.
    pub query_timeout_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect_timeout_ms: 5000,
            server_login_timeout_ms: 60_000,
            startup_timeout_ms: 60_000,
            shutdown_timeout_secs: 30,
            dirty_release_timeout_ms: 5000,
            client_stall_timeout_ms: 15_000,
            client_idle_timeout_ms: 0,
            idle_transaction_timeout_ms: 0,
            query_timeout_ms: 0,
        }
    }
}

/// How reads are spread over standbys and replicas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadStrategy {
    /// Each read node in turn.
    #[default]
    RoundRobin,
    /// In turn, in proportion to `weight` (smooth weighted round-robin).
    WeightedRoundRobin,
    /// The node with the fewest server connections in use on this worker.
    LeastConnections,
    /// The node with the lowest health-check latency.
    #[serde(alias = "latency")]
    LatencyBased,
    /// Two nodes picked at random; the one with fewer connections in use.
    RandomTwoChoices,
}

impl ReadStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadStrategy::RoundRobin => "round_robin",
            ReadStrategy::WeightedRoundRobin => "weighted_round_robin",
            ReadStrategy::LeastConnections => "least_connections",
            ReadStrategy::LatencyBased => "latency_based",
            ReadStrategy::RandomTwoChoices => "random_two_choices",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadBalancerConfig {
    /// Send reads to standbys and replicas (transaction and statement pooling).
    pub read_write_split: bool,
    pub read_strategy: ReadStrategy,
    /// Functions a SELECT may call and still go to a replica, besides the built-in list
    /// of read-only ones (`name` or `schema.name`).
    pub read_only_functions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Replicas further behind than this (by replay time) get no reads; 0 = no limit.
    pub max_replica_lag_ms: u64,
    /// How often standbys and replicas report their lag and replay position.
    pub lag_check_interval_secs: f64,
    /// After a session writes, its reads go to the primary until a replica has replayed
    /// past that write.
    pub read_your_writes: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            max_replica_lag_ms: 1000,
            lag_check_interval_secs: 1.0,
            read_your_writes: true,
        }
    }
}

/// The query result cache (see `cache`): results of read-only statements answered by
/// the proxy until a write to a table they read, their time to live, or memory pressure
/// ends them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Memory for cached results, shared out evenly between the shards.
    pub max_memory_mb: u64,
    /// How long a result may be served; 0 = until a write or eviction ends it.
    pub default_ttl_secs: u64,
    /// Larger results are not cached (counted while the answer streams by).
    pub max_result_bytes: u64,
    /// Per-table overrides: a shorter or longer time to live, or never cached.
    pub tables: Vec<CacheTableConfig>,
    /// What invalidates results: writes through the proxy, or also every write on the
    /// primary, followed in its WAL (logical decoding).
    pub invalidation: CacheInvalidation,
    /// The role the WAL follower logs in as (needs REPLICATION); default: the health
    /// checker's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_user: Option<String>,
    /// Its password; default: the health checker's (when `wal_user` is not set) or that
    /// user's server password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_password: Option<String>,
}

/// What invalidates cached results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheInvalidation {
    /// Writes through the proxy (before their completion reaches the client).
    #[default]
    Proxy,
    /// Those, and every committed change on the primary, from its WAL.
    Wal,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            max_memory_mb: 64,
            default_ttl_secs: 60,
            max_result_bytes: 1024 * 1024,
            tables: Vec::new(),
            invalidation: CacheInvalidation::Proxy,
            wal_user: None,
            wal_password: None,
        }
    }
}

/// How results that read one table are cached. `name` is `schema.table`, or `table`
/// for a table of that name in any schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheTableConfig {
    pub name: String,
    /// Time to live of results that read this table (the shortest of a result's tables
    /// wins); absent = `default_ttl_secs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// `false`: results that read this table are never cached.
    pub cache: bool,
}

impl Default for CacheTableConfig {
    fn default() -> Self {
        CacheTableConfig {
            name: String::new(),
            ttl_secs: None,
            cache: true,
        }
    }
}

/// Reads of these tables go to `target`: `primary`, `standby`, `replica`, or a node's
/// name or address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRouteConfig {
    /// `table` or `schema.table`.
    pub tables: Vec<String>,
    pub target: String,
}

/// How much TLS a side of the proxy offers or demands, with PgBouncer's meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SslMode {
    /// Plain TCP only: `SSLRequest` is answered `N`.
    #[default]
    #[serde(rename = "disable")]
    Disable,
    /// TLS when the client asks for it.
    #[serde(rename = "allow")]
    Allow,
    /// The same as `allow` for clients.
    #[serde(rename = "prefer")]
    Prefer,
    /// TLS only; a plain login is refused (28000, as PostgreSQL's `hostssl`).
    #[serde(rename = "require")]
    Require,
    /// TLS with a client certificate that `client_ca_file` vouches for.
    #[serde(rename = "verify-ca")]
    VerifyCa,
    /// The same as `verify-ca` for clients.
    #[serde(rename = "verify-full")]
    VerifyFull,
}

/// TLS towards clients (certificates are re-read on reload).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub client_sslmode: SslMode,
    /// The proxy's certificate chain (PEM) and private key shown to clients.
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    /// CA certificates (PEM) that client certificates must chain to.
    pub client_ca_file: Option<String>,
    /// TLS towards the servers (and the health checker's connections).
    pub server_sslmode: SslMode,
    /// CA certificates (PEM) a server's certificate must chain to (verify-ca,
    /// verify-full).
    pub server_ca_file: Option<String>,
    /// A client certificate (PEM) and key the proxy shows servers that ask for one.
    pub server_cert_file: Option<String>,
    pub server_key_file: Option<String>,
}

/// The admin REST API's own limits, so a flood of requests can neither grow the process
/// without bound nor delay the liveness probe. Read at start-up only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminApiConfig {
    /// Threads that run the requests that do real work (reports, metrics, reloads, node
    /// actions); `/health*` never waits for them.
    pub workers: usize,
    /// Requests that may wait for a worker; one more is answered 503 at once.
    pub queue_depth: usize,
    /// Open connections served normally; past it a new connection is answered only if
    /// it is a `/health*` probe.
    pub max_connections: usize,
    /// Time a client has to send a whole request (head and body), counted from the
    /// connection's accept or from a later request's first byte; also bounds sending a
    /// response.
    pub read_timeout_ms: u64,
    /// Time a kept-alive connection may sit between two requests.
    pub idle_timeout_ms: u64,
    /// A request that waited longer than this for a worker is answered 503 unrun.
    pub queue_timeout_ms: u64,
}

impl Default for AdminApiConfig {
    fn default() -> Self {
        AdminApiConfig {
            workers: 2,
            queue_depth: 32,
            max_connections: 256,
            read_timeout_ms: 5000,
            idle_timeout_ms: 30_000,
            queue_timeout_ms: 5000,
        }
    }
}

/// Who says which node is the primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologyProviderKind {
    /// Whichever enabled node reports `pg_is_in_recovery() = false`.
    #[default]
    Postgres,
    /// Only the admin API (`POST /primary`) names it.
    Manual,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    pub provider: TopologyProviderKind,
}

/// Losing the primary: who promotes a standby, and how long work for the primary waits.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Promote the best standby with `pg_promote()` (else wait for an external manager).
    pub auto_promote: bool,
    /// How long a unit that needs the primary waits in the switchover buffer.
    pub write_timeout_secs: f64,
    /// Units waiting in the switchover buffer at most (whole process).
    pub buffer_max: usize,
    /// Check interval of a node suspected down (and of standbys while there is no
    /// confirmed primary).
    pub fast_probe_ms: u64,
    /// Never promote a standby further behind the last primary position seen.
    pub max_lag_bytes: u64,
    /// How long `pg_promote()` may take, and a switchover's target to catch up.
    pub promote_timeout_secs: u64,
    /// A planned switchover lets transactions on the old primary finish this long before
    /// it ends the rest.
    pub switchover_drain_secs: f64,
    /// Replay a unit of work whose primary was lost on the new one, when the client can
    /// be shown to see nothing different (see `engine::replay`).
    pub replay: bool,
    /// Client bytes of one unit kept for replay; a larger unit is not replayable.
    pub replay_journal_max_bytes: usize,
    /// Learn each writing transaction's id ahead of its COMMIT so that a COMMIT lost in
    /// flight is answered from the new primary's `pg_xact_status()` (needs `replay`).
    pub track_commit_outcome: bool,
    /// Role for promote and fence; default: the `[health]` credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            auto_promote: true,
            write_timeout_secs: 15.0,
            buffer_max: 10_000,
            fast_probe_ms: 100,
            max_lag_bytes: 16 * 1024 * 1024,
            promote_timeout_secs: 30,
            switchover_drain_secs: 10.0,
            replay: false,
            replay_journal_max_bytes: 1024 * 1024,
            track_commit_outcome: false,
            user: None,
            password: None,
        }
    }
}

impl FailoverConfig {
    pub fn write_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.write_timeout_secs)
    }
}

/// The password stays out of logs.
impl std::fmt::Debug for FailoverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverConfig")
            .field("auto_promote", &self.auto_promote)
            .field("write_timeout_secs", &self.write_timeout_secs)
            .field("buffer_max", &self.buffer_max)
            .field("fast_probe_ms", &self.fast_probe_ms)
            .field("max_lag_bytes", &self.max_lag_bytes)
            .field("replay", &self.replay)
            .field("replay_journal_max_bytes", &self.replay_journal_max_bytes)
            .field("track_commit_outcome", &self.track_commit_outcome)
            .field("promote_timeout_secs", &self.promote_timeout_secs)
            .field("switchover_drain_secs", &self.switchover_drain_secs)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How the control thread checks each node.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    pub enabled: bool,
    /// Time between two checks of a node (fractions allowed, e.g. 0.5).
    pub check_interval_secs: f64,
    /// A check that takes longer (connect included) fails.
    pub timeout_ms: u64,
    /// Consecutive failed checks that mark a node unhealthy.
    pub failure_threshold: u32,
    /// Consecutive good checks that mark an unhealthy node healthy again.
    pub success_threshold: u32,
    /// The probe each check runs.
    pub query: String,
    /// Role the checks log in as; default: the first `[[users]]` entry's server role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Its password; default: that user's server password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    pub database: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            check_interval_secs: 5.0,
            timeout_ms: 2000,
            failure_threshold: 3,
            success_threshold: 1,
            query: "SELECT 1".into(),
            user: None,
            password: None,
            database: "postgres".into(),
        }
    }
}

impl HealthConfig {
    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.check_interval_secs)
    }
}

/// The password stays out of logs.
impl std::fmt::Debug for HealthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthConfig")
            .field("enabled", &self.enabled)
            .field("check_interval_secs", &self.check_interval_secs)
            .field("timeout_ms", &self.timeout_ms)
            .field("failure_threshold", &self.failure_threshold)
            .field("success_threshold", &self.success_threshold)
            .field("query", &self.query)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .finish()
    }
}

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "HELIOS_";

impl Config {
    /// Parses TOML text, applies `HELIOS_`-prefixed overrides from `env` (other variables
    /// are ignored) and validates the result.
    pub fn from_toml_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut document = decode::parse_document(text)?;
        overrides::apply(&mut document, env)?;
        let config = decode::deserialize(document)?;
        config.validate()?;
        Ok(config)
    }

    /// [`Config::from_toml_str`] on the contents of `path`.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml_str(&text, env)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        validate::config(self)
    }

    /// The role and password health checks log in with (see [`HealthConfig::user`]).
    pub fn health_credentials(&self) -> (String, Option<String>) {
        if let Some(user) = &self.health.user {
            let password = self.health.password.clone().or_else(|| {
                self.users
                    .iter()
                    .find(|u| u.backend_user() == user)
                    .and_then(|u| u.backend_password().map(str::to_string))
            });
            return (user.clone(), password);
        }
        match self.users.first() {
            Some(u) => (
                u.backend_user().to_string(),
                self.health
                    .password
                    .clone()
                    .or_else(|| u.backend_password().map(str::to_string)),
            ),
            // A seed configuration: auth_query's role is the one the proxy has.
            None => match &self.auth.auth_user {
                Some(user) => (
                    user.clone(),
                    self.health
                        .password
                        .clone()
                        .or_else(|| self.auth.auth_password.clone()),
                ),
                None => ("postgres".into(), self.health.password.clone()),
            },
        }
    }

    /// Role and password of the cache's WAL follower: `[cache] wal_user`/`wal_password`,
    /// else the health checks' own.
    pub fn wal_credentials(&self) -> (String, Option<String>) {
        self.credentials_or_health(&self.cache.wal_user, &self.cache.wal_password)
    }

    /// Role and password for the operations the proxy runs itself during a failover
    /// (promote, fence): `[failover] user`/`password`, else the health checks' own.
    pub fn failover_credentials(&self) -> (String, Option<String>) {
        self.credentials_or_health(&self.failover.user, &self.failover.password)
    }

    /// `user` with `password`, or else that user's server password; without a user, the
    /// health checks' role and password.
    fn credentials_or_health(
        &self,
        user: &Option<String>,
        password: &Option<String>,
    ) -> (String, Option<String>) {
        match user {
            Some(user) => {
                let password = password.clone().or_else(|| {
                    self.users
                        .iter()
                        .find(|u| u.backend_user() == user)
                        .and_then(|u| u.backend_password().map(str::to_string))
                });
                (user.clone(), password)
            }
            None => self.health_credentials(),
        }
    }

    /// May `user` use the SQL admin console, and may it change state?
    pub fn console_access(&self, user: &str) -> Option<bool> {
        if self.admin_users.iter().any(|u| u == user) {
            Some(true)
        } else if self.stats_users.iter().any(|u| u == user) {
            Some(false)
        } else {
            None
        }
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|user| user.name == name)
    }

    /// The pooling mode for `user` on `database`: the user's, else the database's, else
    /// `[pool_mode] mode`.
    pub fn pool_mode_for(&self, user: &str, database: &str) -> PoolMode {
        self.user(user)
            .and_then(|u| u.pool_mode)
            .or_else(|| {
                self.databases
                    .iter()
                    .find(|d| d.name == database)
                    .and_then(|d| d.pool_mode)
            })
            .unwrap_or(self.pool_mode.mode)
    }

    pub fn effective_workers(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        // Measured on a 2-core box shared with PostgreSQL (README, Performance): one
        // worker used 5-12% less CPU per query than two at the same throughput, and its
        // single queue kept p99/p50 at 1,000 clients at 1.4 against 2.7.
        std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
    }
}
