//! What the control plane tells a shard, and what a shard reports back. Each shard reads
//! its mailbox on its housekeeping tick, so none of this is on the query path: a query
//! never waits for the control plane, and the control plane never touches shard memory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use crossbeam_channel::Sender;

use crate::config::{Config, PoolMode};
use crate::stats::ShardStats;
pub use crate::topology::Topology;

/// The control plane's handle on one running shard.
#[derive(Clone)]
pub struct ShardLink {
    pub id: usize,
    pub mailbox: Sender<ControlMsg>,
    pub stats: Arc<ShardStats>,
}

/// A command for one shard.
pub enum ControlMsg {
    /// The nodes and whether each may take new work; routing follows it at once.
    Topology(Arc<Topology>),
    /// A reloaded configuration: pool sizes, timeouts, users and modes.
    Config(Arc<Config>),
    /// Report the shard's pools, and its clients and servers when `detail` asks.
    Snapshot {
        detail: Detail,
        reply: Sender<ShardSnapshot>,
    },
    /// PAUSE (`true`): hand out no server connections until RESUME (`false`).
    Pause(bool),
    /// Disconnects the client with this proxy-issued pid; replies whether it was here.
    KillClient { pid: i32, reply: Sender<bool> },
}

/// How much a snapshot includes. Pools are always reported; clients and servers are
/// listed one by one, so only the SQL console's SHOW CLIENTS/SERVERS asks for them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detail {
    pub clients: bool,
    pub servers: bool,
}

/// One shard's state at one instant.
#[derive(Clone, Debug, Default)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub paused: bool,
    pub clients_active: u64,
    pub pools: Vec<PoolReport>,
    pub clients: Vec<ClientReport>,
    pub servers: Vec<ServerReport>,
    /// Routing decisions so far: (node address, reason, count).
    pub routes: Vec<(String, &'static str, u64)>,
}

/// One pool (node, database, user) on one shard.
#[derive(Clone, Debug, Default)]
pub struct PoolReport {
    pub node: String,
    pub database: String,
    pub user: String,
    pub mode: Option<PoolMode>,
    /// Server connections open or opening (idle + in use + connecting).
    pub total: usize,
    pub idle: usize,
    /// Clients waiting for a server connection.
    pub waiting: usize,
    /// Longest current wait, in microseconds.
    pub max_wait_us: u64,
    pub max: usize,
    pub created: u64,
    pub closed: u64,
    /// Leases handed out (transactions in transaction mode, sessions in session mode).
    pub leases: u64,
    /// Total time clients spent waiting for this pool, in microseconds.
    pub wait_us: u64,
    /// The node takes no new work (disabled, unhealthy or draining).
    pub retired: bool,
}

impl PoolReport {
    /// Server connections lent to clients (or being opened for them).
    pub fn active(&self) -> usize {
        self.total.saturating_sub(self.idle)
    }
}

/// One logged-in client.
#[derive(Clone, Debug)]
pub struct ClientReport {
    pub pid: i32,
    pub user: String,
    pub database: String,
    pub addr: Option<SocketAddr>,
    pub connected: SystemTime,
    pub application_name: String,
    /// Holds a server connection right now.
    pub active: bool,
    /// Address of the server it is attached to, if any.
    pub server: Option<crate::nodeaddr::NodeAddr>,
}

/// One open server connection.
#[derive(Clone, Debug)]
pub struct ServerReport {
    pub id: u64,
    pub node: String,
    pub database: String,
    pub user: String,
    pub addr: crate::nodeaddr::NodeAddr,
    /// The local TCP port (0 for a Unix-domain socket, or unknown).
    pub local_port: u16,
    /// The backend's own process id.
    pub backend_pid: i32,
    /// When the connection was opened (known for idle ones).
    pub connected: Option<SystemTime>,
    /// Sitting idle in the pool (otherwise lent to a client).
    pub idle: bool,
}

/// A statement typed into the SQL admin console (`psql … heliosproxy`), sent by the shard
/// that serves the console session to the control plane, which answers on `reply`.
pub struct ConsoleRequest {
    pub user: String,
    /// The user may run commands that change state (PAUSE, RESUME, RELOAD, KILL…), not
    /// just SHOW.
    pub admin: bool,
    pub sql: String,
    pub reply: Sender<ConsoleReply>,
}

/// What a console statement produced, in order, or why it failed.
pub type ConsoleReply = Result<Vec<ConsoleResult>, ConsoleError>;

/// One result: an optional row set, then its command tag.
#[derive(Clone, Debug, Default)]
pub struct ConsoleResult {
    pub columns: Vec<String>,
    /// Text values; `None` is SQL NULL.
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

/// An ErrorResponse for the console client.
#[derive(Clone, Debug)]
pub struct ConsoleError {
    pub code: &'static str,
    pub message: String,
}

/// A `pg_lsn` in its text form `X/Y` (two hex numbers, high and low 32 bits).
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    let high = u32::from_str_radix(high, 16).ok()?;
    let low = u32::from_str_radix(low, 16).ok()?;
    Some((u64::from(high) << 32) | u64::from(low))
}
